import math

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.masking_utils import create_causal_mask

from conftest import tiny_config
from prunelib import pruning
from prunelib.adapter import ModelAdapter
from prunelib.pruning import dynamic_depth as dd

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
METHODS = ["dyn_depth_router", "dyn_depth_router_mlp", "dyn_depth_random"]


def logits(model, ids=IDS, **kw):
    with torch.inference_mode():
        return model(ids, **kw).logits


def test_zero_sparsity_equals_dense(tiny_model, cal):
    for variant in dd.VARIANTS:
        routed = dd.attach(tiny_model, dd.train_routers(tiny_model, cal, 0.0, variant))
        assert isinstance(routed.model.layers[1], dd.RoutedDecoderLayer)
        torch.testing.assert_close(logits(routed), logits(tiny_model), rtol=0, atol=0)
        assert dd.realised_sparsity(routed) == 0.0
    for method in METHODS:
        pruned, report = pruning.prune(tiny_model, method, 0.0, calibration=cal)
        torch.testing.assert_close(logits(pruned), logits(tiny_model), rtol=0, atol=0)


def _layer_inputs(model, h, am2d, cache):
    """Mask and rotary embeddings for new tokens ``h`` after what layer 1 of ``cache`` holds, as LlamaModel builds them."""
    past = cache.get_seq_length(1)
    pos = (torch.arange(h.shape[1]) + past)[None]
    mask = create_causal_mask(config=model.config, inputs_embeds=h, attention_mask=am2d, past_key_values=cache,
                              position_ids=pos, layer_idx=1)
    return dict(attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                position_embeddings=model.model.rotary_emb(h, pos))


STEPS = [("sdpa", step) for step in ("prefill", "prefill_padded", "chunk", "decode")] + [
    ("eager", "prefill_padded"), ("eager", "decode")]


@pytest.mark.parametrize("variant", dd.VARIANTS)
@pytest.mark.parametrize("impl,step", STEPS)
def test_gather_scatter_equals_masked_reference(impl, step, variant):
    """Routed layer output == dense layer output on routed tokens, input elsewhere; the KV cache is complete."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(), attn_implementation=impl).eval()
    dense = model.model.layers[1]
    g = torch.Generator().manual_seed(2)
    router = dd.LinearRouter(torch.randn(64, generator=g), torch.zeros(()))
    routed = dd.RoutedDecoderLayer(dense, router, variant, skip=0.5, threshold=0.0)
    B, past, S = 4, (0 if step.startswith("prefill") else 7), (1 if step == "decode" else 9)
    am = torch.ones(B, past + S, dtype=torch.long)
    if step == "prefill_padded":
        am[0, :3] = 0  # left padding
        am[1, -2:] = 0  # right padding
    caches = [DynamicCache(config=model.config) for _ in range(2)]
    with torch.inference_mode():
        if past:
            h0 = torch.randn(B, past, 64, generator=g)
            for layer, cache in zip((dense, routed), caches):
                layer(h0, **_layer_inputs(model, h0, am[:, :past], cache))
        h = torch.randn(B, S, 64, generator=g)
        kw_r, kw_d = (_layer_inputs(model, h, am, c) for c in caches)
        valid = dd._valid_tokens(kw_r["attention_mask"], B, S, h.device)
        seen = []
        hook = router.register_forward_hook(lambda mod, args, out: seen.append(args[0]))  # the router input
        out = routed(h, **kw_r)
        hook.remove()
        run = routed.route(seen[0], valid)
        assert 0 < run.sum() < valid.sum()
        hook = dense.self_attn.register_forward_hook(lambda mod, args, out: seen.append(out[0]))
        ref_out = dense(h, **kw_d)
        hook.remove()
        skipped = h if variant == "layer" else h + seen[1]  # what a skipped token leaves the (sub)layer with
        ref = torch.where(run[..., None], ref_out, skipped)
    real = valid[..., None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(caches[0].layers[1].keys, caches[1].layers[1].keys):  # keys of skipped tokens too
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(caches[0].layers[1].values, caches[1].layers[1].values, rtol=1e-6, atol=1e-6)
    if step == "prefill_padded":  # each sequence routes exactly ceil((1 - r) n) of its n real tokens
        assert run.sum(1).tolist() == [math.ceil(0.5 * n) for n in valid.sum(1).tolist()]
        assert not (run & ~valid).any()


@pytest.mark.parametrize("method", METHODS)
def test_realised_sparsity_on_calibration(tiny_model, cal, method):
    s = 0.3
    pruned, report = pruning.prune(tiny_model, method, s, calibration=cal)
    L, S = 4, cal.length
    r = s * L / 2  # routed layers 1 and 2
    assert report.removed["routed_layers"] == [1, 2] and report.removed["skip"] == pytest.approx(r)
    # exact in prefill up to rounding k = ceil((1 - r) S) to whole tokens: |realised - s| < L_routed / (L S)
    per_layer = (S - math.ceil((1 - r) * S)) / S
    assert report.removed["layer_skip"] == {1: per_layer, 2: per_layer}
    assert report.removed["realised_sparsity"] == pytest.approx(per_layer * 2 / L)
    assert abs(report.removed["realised_sparsity"] - s) < 2 / (L * S)
    shapes = report.shapes
    assert shapes[0].attn_tokens == shapes[3].mlp_tokens == 1.0
    assert shapes[1].mlp_tokens == pytest.approx(1 - per_layer)
    assert shapes[1].attn_tokens == (1.0 if method == "dyn_depth_router_mlp" else pytest.approx(1 - per_layer))
    assert shapes[1].router == (0 if method == "dyn_depth_random" else 1)
    ModelAdapter(pruned).reset_stats()
    assert dd.realised_sparsity(pruned) == 0.0 and ModelAdapter(pruned).layer_shape(1).mlp_tokens == 1.0


def test_decode_threshold_matches_skip_rate_on_calibration(tiny_model, cal):
    """Token-by-token decoding of the calibration text skips about r of the tokens per routed layer."""
    routers = dd.train_routers(tiny_model, cal, 0.25)
    routed = dd.attach(tiny_model, routers)
    dd.reset_stats(routed)
    with torch.inference_mode():
        cache = DynamicCache(config=routed.config)
        for t in range(cal.length):
            routed(cal.input_ids[:, t : t + 1], past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == cal.length
    assert dd.realised_sparsity(routed) == pytest.approx(0.25, abs=0.1)


@pytest.mark.parametrize("method", METHODS)
def test_prefill_then_decode_with_cache(tiny_model, cal, method):
    pruned, _ = pruning.prune(tiny_model, method, 0.3, calibration=cal, seed=3)
    dd.reset_stats(pruned)
    with torch.inference_mode():
        cache = DynamicCache(config=pruned.config)
        out = pruned(IDS, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        step = pruned(nxt, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == IDS.shape[1] + 1  # skipped tokens keep their keys and values
    assert torch.isfinite(step.logits).all()
    run, skipped = pruned.model.layers[1].stats()
    assert run + skipped == IDS.numel() + IDS.shape[0]
    gen = pruned.generate(IDS, max_new_tokens=4, do_sample=False)
    assert gen.shape == (2, 16)


def test_padded_batch(tiny_model, cal):
    """A right-padded row gives the logits of the unpadded sequence (routing ignores padding)."""
    pruned, _ = pruning.prune(tiny_model, "dyn_depth_router", 0.3, calibration=cal)
    am = torch.ones_like(IDS)
    am[0, 9:] = 0
    padded = logits(pruned, IDS, attention_mask=am)
    torch.testing.assert_close(padded[0, :9], logits(pruned, IDS[:1, :9])[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded[1], logits(pruned, IDS[1:])[0], rtol=1e-4, atol=1e-4)
    left = am.flip(1)  # left padding, as in generation
    assert torch.isfinite(logits(pruned, IDS, attention_mask=left)).all()
    gen = pruned.generate(IDS, attention_mask=left, max_new_tokens=3, do_sample=False)
    assert gen.shape == (2, 15)


def test_router_of_another_model_is_rejected(tiny_model, cal):
    routers = dd.train_routers(tiny_model, cal, 0.25)
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(tiny_config()).eval()
    with pytest.raises(ValueError, match=f"trained for model {routers.fingerprint}"):
        dd.attach(other, routers)
    wider = AutoModelForCausalLM.from_config(tiny_config(hidden_size=128, head_dim=32)).eval()
    with pytest.raises(ValueError, match="hidden 64"):
        dd.attach(wider, routers)
    with pytest.raises(ValueError, match="already has routed layers"):
        dd.attach(dd.attach(tiny_model, routers), routers)


def test_bad_input(tiny_model, cal):
    with pytest.raises(ValueError, match=r"per-layer skip rate 1 .*allowed 0 <= skip rate < 1"):
        dd.train_routers(tiny_model, cal, 0.5)
    with pytest.raises(ValueError, match=r"sparsity -0.1 .*allowed 0 <= skip rate < 1"):
        dd.random_routers(tiny_model, -0.1)
    with pytest.raises(ValueError, match="variant 'attention' is not known"):
        dd.train_routers(tiny_model, cal, 0.2, variant="attention")
    with pytest.raises(ValueError, match=r"sparsity 0.5 is out of range for 'dyn_depth_router'"):
        pruning.prune(tiny_model, "dyn_depth_router", 0.5, calibration=cal)
    with pytest.raises(ValueError, match="needs calibration data"):
        pruning.prune(tiny_model, "dyn_depth_router", 0.2)
    flash = AutoModelForCausalLM.from_config(tiny_config()).eval()
    flash.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attention implementation 'flex_attention'"):
        dd.random_routers(flash, 0.2)
    assert set(METHODS) <= set(pruning.methods("dynamic_depth"))


@pytest.mark.slow
def test_router_beats_random_on_embedded_model(embedded):
    from prunelib.calibration import calibration_batch

    model, tok = embedded
    cal = calibration_batch(tok, n=4, length=128)

    def loss(m):
        with torch.inference_mode():
            return m(cal.input_ids, labels=cal.input_ids).loss.item()

    router, _ = pruning.prune(model, "dyn_depth_router", 0.1, calibration=cal)
    rand, _ = pruning.prune(model, "dyn_depth_random", 0.1, calibration=cal)
    assert loss(router) < loss(rand)  # (the MLP router's edge is too small to test on 4 sequences)
