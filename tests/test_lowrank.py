import pytest
import torch
from torch import nn
from transformers import DynamicCache

from prunelib.cost import hardware
from prunelib import pruning
from prunelib.model.adapter import ModelAdapter
from prunelib.model.models import parameter_count
from prunelib.pruning import lowrank

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
LOWRANK = ["lowrank_svd", "lowrank_svdllm", "lowrank_random"]


def logits(model, ids=IDS):
    with torch.inference_mode():
        return model(ids).logits


def output_error(w: torch.Tensor, lr: lowrank.LowRankLinear, gram: torch.Tensor) -> float:
    """||X W^T - X W_r^T||_F from X^T X: sqrt(tr(D G D^T)), D = W - W_r."""
    d = w.double() - (lr.second.weight @ lr.first.weight).detach().double()
    return torch.einsum("nk,kl,nl->", d, gram.double(), d).sqrt().item()


@pytest.mark.parametrize("method", LOWRANK)
def test_zero_sparsity_equals_dense(tiny_model, cal, method):
    pruned, report = pruning.prune(tiny_model, method, 0.0, calibration=cal)
    torch.testing.assert_close(logits(pruned), logits(tiny_model))
    assert report.params_pruned == parameter_count(tiny_model) and report.removed == {"ranks": {}}


@pytest.mark.parametrize("whitened", [False, True])
def test_full_rank_reproduces_weight(whitened):
    torch.manual_seed(0)
    lin = nn.Linear(24, 40, bias=True)
    s = None
    if whitened:  # anisotropic inputs, and only 16 tokens for 24 features: X^T X is singular and gets damped
        x = torch.randn(16, 24) * torch.logspace(-2, 1, 24)
        gram = x.double().T @ x.double()
        s = lowrank.whitening_factor(gram)
        assert torch.equal(s, s.tril()) and (s @ s.T - gram).norm() < 1e-5 * gram.norm()
    lr = lowrank.factorize(lin, 24, s)
    assert (lr.rank, lr.in_features, lr.out_features) == (24, 24, 40)
    torch.testing.assert_close(lr.second.weight @ lr.first.weight, lin.weight, atol=1e-5, rtol=1e-4)
    x = torch.randn(3, 24)
    torch.testing.assert_close(lr(x), lin(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", LOWRANK)
def test_ranks_and_parameter_counts(tiny_model, cal, method):
    pruned, report = pruning.prune(tiny_model, method, 0.5, calibration=cal, hw=hardware.KNOWN["h100-sxm"])
    assert report.cost["decode"]["bound_speedup"] > 1  # the decoder's weight bytes are halved
    # K*N/(K+N): q,o 64x64 -> 32; k,v 64->32 -> 21.3; gate,up,down 64<->128 -> 42.7; halved and floored
    ranks = {"q_proj": 16, "k_proj": 10, "v_proj": 10, "o_proj": 16, "gate_proj": 21, "up_proj": 21, "down_proj": 21}
    assert report.removed == {"ranks": {i: ranks for i in range(4)}}
    h = 64
    dims = {"q_proj": (h, 64), "k_proj": (h, 32), "v_proj": (h, 32), "o_proj": (64, h),
            "gate_proj": (h, 128), "up_proj": (h, 128), "down_proj": (128, h)}
    per_layer = sum(ranks[p] * (k + n) for p, (k, n) in dims.items()) + 2 * h  # + 2 norms
    assert report.params_pruned == parameter_count(pruned) == 2 * 256 * h + h + 4 * per_layer
    proj = pruned.model.layers[1].mlp.up_proj
    assert isinstance(proj, lowrank.LowRankLinear) and proj.first.weight.shape == (21, 64) and proj.second.weight.shape == (128, 21)
    shape, dense = ModelAdapter(pruned).layer_shape(1), ModelAdapter(tiny_model).layer_shape(1)
    assert dict(shape.ranks) == ranks and dense.ranks == ()  # the cost model sees K->r->N
    assert (shape.n_heads, shape.n_kv_heads, shape.intermediate) == (dense.n_heads, dense.n_kv_heads, dense.intermediate)
    assert all(isinstance(p, nn.Linear) for p in ModelAdapter(tiny_model).linears().values())  # input untouched


def test_bias_is_kept_and_counted():
    lin = nn.Linear(30, 20, bias=True)
    lr = lowrank.factorize(lin, 5)
    assert lr.first.bias is None and torch.equal(lr.second.bias, lin.bias)
    assert sum(p.numel() for p in lr.parameters()) == 5 * (30 + 20) + 20


def test_rounding(tiny_model, cal):
    assert lowrank.rank_for(576, 1536, 0.2) == 335 and lowrank.rank_for(576, 1536, 0.2, round_to=8) == 328
    assert lowrank.rank_for(576, 1536, 0.2, round_to=64) == 320 and lowrank.rank_for(64, 32, 0.5, round_to=64) == 10
    _, report = pruning.prune(tiny_model, "lowrank_svd", 0.5, round_to=8)
    assert report.removed["ranks"][0] == {"q_proj": 16, "k_proj": 8, "v_proj": 8, "o_proj": 16,
                                          "gate_proj": 16, "up_proj": 16, "down_proj": 16}
    with pytest.raises(ValueError, match=r"round_to=7 of pruning method .* expected one of \[8, 64\]"):
        pruning.prune(tiny_model, "lowrank_svd", 0.5, round_to=7)


def test_svdllm_beats_svd_on_calibration_outputs_and_svd_beats_random(tiny_model, cal):
    """SVD-LLM's whitening minimises the output error on the calibration inputs; plain SVD the weight error."""
    grams = lowrank.input_grams(tiny_model, cal)
    for key in [(0, "q_proj"), (1, "v_proj"), (2, "o_proj"), (3, "down_proj")]:
        lin = getattr(ModelAdapter(tiny_model).layers[key[0]], "mlp" if key[1] == "down_proj" else "self_attn")
        lin = getattr(lin, key[1])
        svd = lowrank.factorize(lin, 8)
        svdllm = lowrank.factorize(lin, 8, lowrank.whitening_factor(grams[key]))
        rnd = lowrank.factorize(lin, 8, keep=torch.randperm(min(lin.weight.shape))[:8])
        w = lin.weight.detach()
        assert output_error(w, svdllm, grams[key]) < output_error(w, svd, grams[key]), key
        err = {m: (w - mod.second.weight @ mod.first.weight).norm().item() for m, mod in (("svd", svd), ("rnd", rnd))}
        assert err["svd"] < err["rnd"], key


def test_gram_matches_hooked_inputs(tiny_model, cal):
    grams = lowrank.input_grams(tiny_model, cal)
    seen = []
    h = tiny_model.model.layers[2].mlp.up_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
    with torch.inference_mode():
        tiny_model(cal.input_ids, use_cache=False)
    h.remove()
    x = torch.cat(seen).double()
    torch.testing.assert_close(grams[(2, "up_proj")], x.T @ x)
    assert grams[(2, "up_proj")] is grams[(2, "gate_proj")]


def test_random_baseline_is_seeded(tiny_model):
    a, _ = pruning.prune(tiny_model, "lowrank_random", 0.5, seed=3)
    b, _ = pruning.prune(tiny_model, "lowrank_random", 0.5, seed=3)
    c, _ = pruning.prune(tiny_model, "lowrank_random", 0.5, seed=4)
    torch.testing.assert_close(logits(a), logits(b))
    assert not torch.allclose(logits(a), logits(c))


def test_bad_arguments(tiny_model, cal):
    hi = pruning.get("lowrank_svd").max_sparsity(tiny_model)
    assert hi == pytest.approx(1 - 3 / 64)  # k_proj/v_proj: K*N/(K+N) = 64/3, rank 1 at most this s
    for s in (-0.1, 1.0, hi + 1e-3, "0.5"):
        with pytest.raises(ValueError, match="out of range"):
            pruning.prune(tiny_model, "lowrank_svd", s)
    pruned, report = pruning.prune(tiny_model, "lowrank_svd", hi)
    assert report.removed["ranks"][0]["k_proj"] == 1
    with pytest.raises(ValueError, match="needs calibration"):
        pruning.prune(tiny_model, "lowrank_svdllm", 0.5)
    lin = nn.Linear(8, 4)
    for r in (0, 5, 2.0):
        with pytest.raises(ValueError, match="1 <= rank <= 4"):
            lowrank.factorize(lin, r)
    with pytest.raises(ValueError, match="keep must hold 2 indices in 0..3"):
        lowrank.factorize(lin, 2, keep=[0, 4])
    with pytest.raises(ValueError, match="not positive definite"):
        lowrank.whitening_factor(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match=r"whitening must be \[8, 8\]"):
        lowrank.factorize(lin, 2, torch.eye(4))


@pytest.mark.parametrize("method", LOWRANK)
def test_cache_and_generate(tiny_model, cal, method):
    pruned, _ = pruning.prune(tiny_model, method, 0.3, calibration=cal)
    full = logits(pruned)
    with torch.inference_mode():
        cache = DynamicCache(config=pruned.config)
        out = pruned(IDS[:, :8], past_key_values=cache, use_cache=True)
        torch.testing.assert_close(out.logits, full[:, :8], atol=1e-4, rtol=1e-4)
        for t in range(8, 12):
            out = pruned(IDS[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            torch.testing.assert_close(out.logits[:, 0], full[:, t], atol=1e-4, rtol=1e-4)
        mask = torch.ones_like(IDS)
        mask[1, :4] = 0  # left padding, as lm-eval batches have
        padded = pruned(IDS, attention_mask=mask).logits
        torch.testing.assert_close(padded[0], full[0], atol=1e-4, rtol=1e-4)
    assert pruned.generate(IDS[:1], max_new_tokens=3, do_sample=False).shape == (1, 15)


@pytest.mark.slow
def test_svdllm_on_embedded_model(embedded):
    """Real activations are far from isotropic: whitening cuts the calibration output error a lot."""
    from prunelib.model.calibration import calibration_batch

    model, tok = embedded
    cal = calibration_batch(tok, n=2, length=128)
    grams = lowrank.input_grams(model, cal)
    for i, name in [(3, "q_proj"), (3, "v_proj"), (20, "down_proj")]:
        owner = model.model.layers[i].mlp if name == "down_proj" else model.model.layers[i].self_attn
        lin = getattr(owner, name)
        r = lowrank.rank_for(lin.in_features, lin.out_features, 0.3)
        svd = lowrank.factorize(lin, r)
        svdllm = lowrank.factorize(lin, r, lowrank.whitening_factor(grams[(i, name)]))
        w = lin.weight.detach()
        assert output_error(w, svdllm, grams[(i, name)]) < 0.8 * output_error(w, svd, grams[(i, name)]), (i, name)
