import math
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.masking_utils import create_causal_mask

from conftest import tiny_config
from prunelib import pruning
from prunelib.model.adapter import ModelAdapter
from prunelib.pruning import dynamic_depth as dd
from prunelib.pruning import routed_layer, routers

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
METHODS = ["dyn_depth_router", "dyn_depth_router_mlp", "dyn_depth_random"]


def logits(model, ids=IDS, **kw):
    with torch.inference_mode():
        return model(ids, **kw).logits


def test_routed_layers_read_fused_roles_and_partial_rotary(cal):
    """Phi-3 (fused qkv_proj, half of each head rotated): a routed layer computes q, k, v from their rows of
    qkv_proj and rotates the leading half only; with every token routed it gives the model's logits."""
    from conftest import tiny_family_model

    model = tiny_family_model("phi3", partial_rotary_factor=0.5)
    routed = dd.attach(model, dd.train_routers(model, cal, 0.0, "layer"))
    assert isinstance(routed.model.layers[1], dd.RoutedDecoderLayer)
    assert routed.model.layers[1].rows["k"] == ("qkv_proj", 64, 96)  # 4 query heads of 16, then 2 KV heads
    torch.testing.assert_close(logits(routed), logits(model), rtol=0, atol=1e-5)
    skipping, _ = pruning.prune(model, "dyn_depth_router", 0.25, calibration=cal)
    assert not torch.allclose(logits(skipping), logits(model), atol=1e-3)


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
        valid = routed_layer._valid_tokens(kw_r["attention_mask"], B, S, past, h.device)
        seen = []
        hook = router.register_forward_hook(lambda mod, args, out: seen.append(args[0]))  # the router input
        out = routed(h, **kw_r)
        hook.remove()
        run = routed.route(seen[0], valid)
        by_score = (router(seen[0]) > 0.0) & valid  # a token runs iff its own score exceeds the threshold
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
    assert torch.equal(run, by_score) and not (run & ~valid).any()  # no capacity; padding never runs


@pytest.mark.parametrize("method", METHODS)
def test_realised_sparsity_on_calibration(tiny_model, cal, method):
    s = 0.3
    pruned, report = pruning.prune(tiny_model, method, s, calibration=cal)
    L, S, N = 4, cal.length, cal.input_ids.numel()
    r = s * L / 2  # routed layers 1 and 2
    assert report.removed["routed_layers"] == [1, 2] and report.removed["skip"] == pytest.approx(r)
    skip = report.removed["layer_skip"]
    # criterion and random alike: the threshold is the r-quantile of the calibration scores, so r of the calibration
    # tokens skip, up to one token (the random baseline's hashed scores used to skip r only in expectation); random
    # scores hash positions only, so the sequences tie and the step is one position of S
    tol = 1 / S if method == "dyn_depth_random" else 1 / N
    assert all(abs(skip[i] - r) <= tol for i in (1, 2)), skip
    assert report.removed["realised_sparsity"] == pytest.approx((skip[1] + skip[2]) / L)
    shapes = report.shapes
    assert shapes[0].attn_tokens == shapes[3].mlp_tokens == 1.0
    assert shapes[1].mlp_tokens == pytest.approx(1 - skip[1])
    assert shapes[1].attn_tokens == (1.0 if method == "dyn_depth_router_mlp" else pytest.approx(1 - skip[1]))
    assert shapes[1].router == (0 if method == "dyn_depth_random" else 1)
    ModelAdapter(pruned).reset_stats()
    assert dd.realised_sparsity(pruned) == 0.0 and ModelAdapter(pruned).layer_shape(1).mlp_tokens == 1.0
    with torch.inference_mode():  # one causal forward (how fidelity scores): every position counted as prefill
        pruned(cal.input_ids, use_cache=False)
    assert dd.realised_sparsity(pruned, "prefill") > 0
    assert math.isnan(dd.realised_sparsity(pruned, "decode"))  # no decode step ran: unknown, not "skipped nothing"


@pytest.mark.parametrize("method", METHODS)
def test_calibration_counts_equal_a_full_forward_on_the_calibration_text(tiny_model, cal, method):
    """prune reads the realised sparsity off the threshold calibration's routed pass (no extra forward): the same
    counters, per layer, as a full forward of the pruned model over the calibration batches."""
    pruned, report = pruning.prune(tiny_model, method, 0.3, calibration=cal)
    kept = [layer.counts.clone() for layer in ModelAdapter(pruned).layers if hasattr(layer, "counts")]
    again = dd._removed(pruned, cal)  # no counts given: the full forward
    assert {k: again[k] for k in ("realised_sparsity", "layer_skip")} == \
        {k: report.removed[k] for k in ("realised_sparsity", "layer_skip")}
    assert len(kept) == 2 and all(torch.equal(c, layer.counts) for c, layer in
                                  zip(kept, [x for x in ModelAdapter(pruned).layers if hasattr(x, "counts")]))


@pytest.mark.parametrize("method", METHODS)
def test_router_scores_read_off_the_input_equal_the_layers_own(tiny_model, cal, method):
    """A whole-layer router's scores come from the layer's input without running it (the threshold calibration's
    shortcut): the very scores the layer's forward hands its router, for every calibration batch and routed layer;
    the MLP variant has none (it routes on the attention's output)."""
    from prunelib.pruning.routed_layer import RoutedDecoderLayer

    pruned, _ = pruning.prune(tiny_model, method, 0.3, calibration=cal)
    for ids in cal.batches(4):
        h, kw = routers._first_layer_inputs(pruned, ids)
        for layer in ModelAdapter(pruned).layers:
            if isinstance(layer, RoutedDecoderLayer):
                seen = []
                hook = layer.router.register_forward_hook(lambda mod, args, o: seen.append(o))
                try:
                    with torch.inference_mode():
                        out, direct = layer(h, **kw), layer.scores(h, **kw)
                finally:
                    hook.remove()
                if method == "dyn_depth_router_mlp":
                    assert direct is None
                else:
                    assert torch.equal(direct, seen[0])
            else:
                with torch.inference_mode():
                    out = layer(h, **kw)
            h = out[0] if isinstance(out, tuple) else out


def test_decode_routes_the_calibration_text_as_its_full_forward(tiny_model, cal):
    """Token-by-token decoding of the calibration text skips exactly what the full forward skipped."""
    routed = dd.attach(tiny_model, dd.train_routers(tiny_model, cal, 0.25))
    full = routed.model.layers[1]
    with torch.inference_mode():
        routed(cal.input_ids, use_cache=False)
        prefill = [layer.stats("prefill") for layer in dd._routed(routed)]
        cache = DynamicCache(config=routed.config)
        for t in range(cal.length):
            routed(cal.input_ids[:, t : t + 1], past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == cal.length
    assert [layer.stats("decode") for layer in dd._routed(routed)] == prefill
    assert dd.realised_sparsity(routed, "decode") == dd.realised_sparsity(routed, "prefill") == pytest.approx(0.25, abs=0.1)
    assert full.last_phase == "decode"


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
    layer = pruned.model.layers[1]
    assert sum(layer.stats("prefill")) == IDS.numel() and sum(layer.stats("decode")) == IDS.shape[0]
    run, skipped = layer.stats("decode")  # the overrides cost the phase that ran last: the decode step
    assert layer.shape_overrides()["mlp_tokens"] == run / (run + skipped)
    gen = pruned.generate(IDS, max_new_tokens=4, do_sample=False)
    assert gen.shape == (2, 16)


VARIANT_CASES = [("dyn_depth_router", {}), ("dyn_depth_router_mlp", {}), ("dyn_depth_random", {}),
                 ("dyn_depth_random_mlp", {})]
CASE_IDS = ["router", "router_mlp", "random", "random_mlp"]


def _pruned(model, cal, case, sparsity=0.3, seed=3):
    method, options = case
    return pruning.prune(model, method, sparsity, calibration=cal, seed=seed, **options)[0]


@pytest.mark.parametrize("case", VARIANT_CASES, ids=CASE_IDS)
def test_later_tokens_never_change_earlier_logits(tiny_model, cal, case):
    pruned = _pruned(tiny_model, cal, case)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    base = logits(pruned, ids)
    dd.reset_stats(pruned)
    for t in (23, 12, 3):
        other = ids.clone()
        other[:, t:] = (other[:, t:] + 1 + torch.arange(24 - t)) % 256  # new tokens from t on
        changed = logits(pruned, other)
        torch.testing.assert_close(changed[:, :t], base[:, :t], rtol=0, atol=1e-5)
        assert not torch.allclose(changed[:, t:], base[:, t:])
    assert 0 < dd.realised_sparsity(pruned) < 0.5  # some tokens skipped, some ran


@pytest.mark.parametrize("case", VARIANT_CASES, ids=CASE_IDS)
def test_full_forward_equals_prefill_plus_decode(tiny_model, cal, case):
    """The scored model is the served model: full forward == chunked prefill + one-token cached decode."""
    pruned = _pruned(tiny_model, cal, case)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(6))
    full = logits(pruned, ids)
    for chunks in ((9,), (4, 5)):  # prefill of the first 9 tokens, in one or two chunks
        cache, start, outs = DynamicCache(config=pruned.config), 0, []
        dd.reset_stats(pruned)
        for n in chunks:
            outs.append(logits(pruned, ids[:, start : start + n], past_key_values=cache, use_cache=True))
            start += n
        prefill = dd.realised_sparsity(pruned, "prefill")
        for t in range(start, ids.shape[1]):
            outs.append(logits(pruned, ids[:, t : t + 1], past_key_values=cache, use_cache=True))
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-4)
        assert dd.realised_sparsity(pruned, "prefill") == prefill  # decode counted apart
        assert dd.realised_sparsity(pruned) == dd.realised_sparsity(pruned, "decode")


def test_static_cache_decodes_like_dynamic_cache(tiny_model, cal):
    from transformers import StaticCache

    for case in VARIANT_CASES[:2]:
        pruned = _pruned(tiny_model, cal, case)
        ids = IDS[:1]
        full = logits(pruned, ids)
        cache = StaticCache(config=pruned.config, max_cache_len=16)
        outs = [logits(pruned, ids[:, :5], past_key_values=cache, use_cache=True)]
        for t in range(5, ids.shape[1]):
            outs.append(logits(pruned, ids[:, t : t + 1], past_key_values=cache, use_cache=True))
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-4)


def test_unsupported_cache_is_refused(tiny_model, cal):
    pruned = _pruned(tiny_model, cal, VARIANT_CASES[0])

    class OffloadedThing:
        pass

    with pytest.raises(ValueError, match="cannot use a OffloadedThing; allowed: DynamicCache, StaticCache or none"):
        pruned.model.layers[1](torch.zeros(1, 2, 64), past_key_values=OffloadedThing())


def _random_scores(model, positions):
    return torch.stack([layer.router(torch.zeros(*positions.shape, 1), positions) for layer in dd._routed(model)])


def test_random_routes_are_history_independent_and_seeded(tiny_model, cal):
    fresh = _pruned(tiny_model, cal, VARIANT_CASES[2], seed=3)
    used = _pruned(tiny_model, cal, VARIANT_CASES[2], seed=3)
    other_seed = _pruned(tiny_model, cal, VARIANT_CASES[2], seed=4)
    with torch.inference_mode():  # some history: other texts, lengths and a cached decode
        used(IDS)
        cache = DynamicCache(config=used.config)
        used(IDS[:, :5], past_key_values=cache, use_cache=True)
        used(IDS[:, 5:6], past_key_values=cache, use_cache=True)
    dd.reset_stats(fresh), dd.reset_stats(used)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(logits(used, ids), logits(fresh, ids), rtol=0, atol=0)
    assert [layer.stats() for layer in dd._routed(used)] == [layer.stats() for layer in dd._routed(fresh)]
    pos = torch.arange(4096)[None]
    runs = _random_scores(fresh, pos) > 0.6
    assert torch.equal(runs, _random_scores(used, pos) > 0.6)
    assert not torch.equal(runs, _random_scores(other_seed, pos) > 0.6)
    assert not torch.equal(runs[0], runs[1])  # layers draw independently
    skipped = 1 - runs.float().mean(-1)
    assert torch.allclose(skipped, torch.full_like(skipped, 0.6), atol=0.03)  # uniform scores: r of positions skip


def test_graph_safe(tiny_model, cal):
    assert dd.graph_safe(tiny_model) == (True, "no routed layers")
    ok, reason = dd.graph_safe(_pruned(tiny_model, cal, VARIANT_CASES[0]))
    assert not ok and "sync" in reason


@pytest.mark.parametrize("length", [256, 2048])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("case", VARIANT_CASES[:3], ids=CASE_IDS[:3])
def test_flops_match_torch_flop_counter(cal, case, phase, length):
    """The cost model, fed the routing the model realised, counts what FlopCounterMode counts (within 1%)."""
    from torch.utils.flop_counter import FlopCounterMode

    from prunelib.cost import costmodel, hardware

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(max_position_embeddings=4096),
                                             attn_implementation="eager").eval()  # SDPA's CPU kernel has no formula
    pruned = _pruned(model, cal, case)
    ids = torch.randint(0, 256, (1, length + 1), generator=torch.Generator().manual_seed(8))
    dd.reset_stats(pruned)  # as the timing does: the decode step's stats follow its prefill's
    with torch.inference_mode():
        cache = DynamicCache(config=pruned.config)
        if phase == "decode":
            pruned(ids[:, :length], past_key_values=cache, use_cache=True)
            ids = ids[:, length:]
        with FlopCounterMode(display=False) as fc:
            pruned(ids[:, :length], past_key_values=cache, use_cache=True, logits_to_keep=1)
    hw = hardware.HardwareSpec("test", {"float32": 1e12}, 1e11)
    predicted = costmodel.cost(costmodel.ModelShape.of(pruned), phase, 1, length, "float32", hw).flops
    assert predicted == pytest.approx(fc.get_total_flops(), rel=0.01)
    dense = costmodel.cost(costmodel.ModelShape.of(model), phase, 1, length, "float32", hw).flops
    if phase == "prefill":  # some tokens skipped: the test can tell a routed model from the dense one
        assert 0 < dd.realised_sparsity(pruned, "prefill") < 0.5 and predicted < dense


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
    from prunelib.model.calibration import calibration_batch

    model, tok = embedded
    cal = calibration_batch(tok, n=4, length=128)

    def loss(m):
        with torch.inference_mode():
            return m(cal.input_ids, labels=cal.input_ids).loss.item()

    router, _ = pruning.prune(model, "dyn_depth_router", 0.1, calibration=cal)
    rand, _ = pruning.prune(model, "dyn_depth_random", 0.1, calibration=cal)
    assert loss(router) < loss(rand)  # (the MLP router's edge is too small to test on 4 sequences)
