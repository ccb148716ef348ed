import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from conftest import synthetic_calibration, tiny_config
from prunelib import pruning
from prunelib.model.adapter import ModelAdapter
from prunelib.model.models import parameter_count
from prunelib.pruning.slicegpt import ScaleFreeRMSNorm, SlicedDecoderLayer

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
METHODS = ["slicegpt", "slicegpt_random"]


@pytest.fixture
def cal():
    return synthetic_calibration(8, 32)


def _scaled_norms(model):
    """Non-trivial RMSNorm scales, so that folding them into the Linears is really tested."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("method", METHODS)
def test_zero_sparsity_rotates_to_dense_logits(tiny_model, cal, method):
    model = _scaled_norms(tiny_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, report = pruning.prune(model, method, 0.0, calibration=cal)
    torch.testing.assert_close(logits(pruned), logits(model), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # input untouched
    assert report.removed == {"hidden_removed": 0, "hidden_kept": 64}
    assert not torch.allclose(pruned.model.embed_tokens.weight, model.model.embed_tokens.weight)  # really rotated


def test_zero_sparsity_without_calibration(tiny_model):
    model = _scaled_norms(tiny_model)
    pruned, _ = pruning.prune(model, "slicegpt", 0.0)
    torch.testing.assert_close(logits(pruned), logits(model), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_hidden_width_is_physically_sliced(tiny_model, cal, method):
    pruned, report = pruning.prune(tiny_model, method, 0.25, calibration=cal)
    w, V, L, inter = 48, 256, 4, 128
    assert pruned.model.embed_tokens.weight.shape == (V, w) and pruned.lm_head.weight.shape == (V, w)
    assert pruned.config.hidden_size == w and ModelAdapter(pruned).hidden_size == w
    for layer in pruned.model.layers:
        assert isinstance(layer, SlicedDecoderLayer)
        attn, mlp = layer.self_attn, layer.mlp
        assert [p.weight.shape for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)] == [
            (64, w), (32, w), (32, w), (w, 64)]
        assert [p.weight.shape for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)] == [(inter, w), (inter, w), (w, inter)]
        assert layer.attn_shortcut.weight.shape == layer.mlp_shortcut.weight.shape == (w, w)
        assert isinstance(layer.input_layernorm, ScaleFreeRMSNorm) and layer.input_layernorm.norm_dim == 64
    per_layer = (64 + 32 + 32) * w + 64 * w + 3 * inter * w + 2 * w * w  # q,k,v + o + mlp + two shortcuts; norms scale-free
    assert report.params_pruned == parameter_count(pruned) == 2 * V * w + L * per_layer
    assert all(s.hidden == w and s.shortcut == 2 for s in report.shapes)


def test_width_rounding(tiny_model, cal):
    pruned, report = pruning.prune(tiny_model, "slicegpt_random", 0.3)  # round(0.7 * 64) = 45 -> 48
    assert report.removed["hidden_kept"] == 48
    pruned, report = pruning.prune(tiny_model, "slicegpt_random", 0.3, round_to=None)
    assert report.removed["hidden_kept"] == 45 and pruned.lm_head.in_features == 45
    with pytest.raises(ValueError, match="round_to must be None or a positive integer"):
        pruning.prune(tiny_model, "slicegpt_random", 0.3, round_to=0)


@pytest.mark.parametrize("bad", [1.0, -0.1, 0.9, "0.5"])
def test_bad_sparsity(tiny_model, cal, bad):
    with pytest.raises(ValueError, match="sparsity"):  # 0.9 leaves round(6.4) = 6 < 8 dimensions
        pruning.prune(tiny_model, "slicegpt", bad, calibration=cal)


def test_needs_complete_dense_layers(tiny_model, cal):
    from prunelib.pruning.surgery import remove_sublayers

    with pytest.raises(ValueError, match=r"layers \[1\] have a removed sublayer"):
        pruning.prune(remove_sublayers(tiny_model, mlp=[1]), "slicegpt_random", 0.25)
    sliced, _ = pruning.prune(tiny_model, "slicegpt_random", 0.25)
    with pytest.raises(ValueError, match="already sliced"):
        pruning.prune(sliced, "slicegpt_random", 0.25)


def test_pca_needs_calibration_above_zero(tiny_model):
    with pytest.raises(ValueError, match="needs calibration data"):
        pruning.prune(tiny_model, "slicegpt", 0.25)


def test_pca_beats_random_rotation(tiny_model, cal):
    """At the same width, keeping the principal components loses far less of the output than a random subspace."""
    model = _scaled_norms(tiny_model)
    dense = logits(model, cal.input_ids)

    def err(method, seed):
        pruned, _ = pruning.prune(model, method, 0.25, calibration=cal, seed=seed)
        return ((logits(pruned, cal.input_ids) - dense) ** 2).mean().item()

    pca = err("slicegpt", 0)
    assert all(pca < 0.5 * err("slicegpt_random", seed) for seed in range(3))


def test_tied_embeddings_are_untied(cal):
    torch.manual_seed(0)
    model = _scaled_norms(AutoModelForCausalLM.from_config(tiny_config(tie_word_embeddings=True)).eval())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    pruned, _ = pruning.prune(model, "slicegpt", 0.0, calibration=cal)
    assert pruned.lm_head.weight is not pruned.model.embed_tokens.weight and not pruned.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    torch.testing.assert_close(logits(pruned), logits(model), atol=1e-4, rtol=1e-4)
    pruned, _ = pruning.prune(model, "slicegpt", 0.25, calibration=cal)
    assert pruned.lm_head.weight.shape == pruned.model.embed_tokens.weight.shape == (256, 48)


@pytest.mark.parametrize("method", METHODS)
def test_kv_cache_generate_and_padding(tiny_model, cal, method):
    pruned, _ = pruning.prune(tiny_model, method, 0.25, calibration=cal)
    full = logits(pruned)
    cache = DynamicCache(config=pruned.config)
    with torch.no_grad():
        steps = [pruned(IDS[:, :9], past_key_values=cache, use_cache=True).logits]
        for t in range(9, 12):  # decode one token at a time
            steps.append(pruned(IDS[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == 12
    out = pruned.generate(IDS, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(IDS))
    assert out.shape == (2, 16)
    # a left-padded batch (lm-eval style) gives the unpadded logits on its real tokens
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), IDS[1:, :9]], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    torch.testing.assert_close(logits(pruned, torch.cat([IDS[:1], padded]), attention_mask=torch.cat(
        [torch.ones(1, 12, dtype=torch.long), mask]))[1, 3:], logits(pruned, IDS[1:, :9])[0], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_embedded_model_keeps_quality(embedded):
    """SmolLM2-135M at 25% hidden sparsity, 1,024 calibration tokens: held-out perplexity within 8x of dense
    (measured 55.5 -> 231; a random rotation gives ~1.7e9)."""
    from prunelib.model.calibration import calibration_batch

    model, tok = embedded
    held = calibration_batch(tok, n=4, length=128, seed=1)

    def ppl(m):
        with torch.no_grad():
            return m(held.input_ids, labels=held.input_ids).loss.exp().item()

    pruned, report = pruning.prune(model, "slicegpt", 0.25, calibration=calibration_batch(tok, n=8, length=128))
    assert report.removed == {"hidden_removed": 144, "hidden_kept": 432}
    dense, sliced = ppl(model), ppl(pruned)
    assert dense < sliced < 8 * dense, (dense, sliced)
