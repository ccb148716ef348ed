import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from conftest import synthetic_calibration, tiny_config
from prunelib import pruning
from prunelib.model.adapter import ModelAdapter
from prunelib.pruning.semistructured import Sparse24Linear, engaged_shape, kernel_info

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
METHODS = ["sparse24_magnitude", "sparse24_wanda", "sparse24_sparsegpt", "sparse24_random"]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def cal():
    return synthetic_calibration(8, 32)


def logits(model, ids=IDS):
    with torch.inference_mode():
        return model(ids).logits


def projections(model, i):
    a = ModelAdapter(model)
    return {**a.attn_proj(i), **a.mlp_proj(i)}


def n_projection_weights(model):
    return sum(lin.weight.numel() for i in range(len(ModelAdapter(model).layers)) for lin in projections(model, i).values())


def nonzeros_per_group(w):
    return (w.detach().reshape(w.shape[0], -1, 4) != 0).sum(-1)


@pytest.mark.parametrize("method", METHODS)
def test_zero_sparsity_equals_dense(tiny_model, cal, method):
    pruned, report = pruning.prune(tiny_model, method, 0.0, calibration=cal)
    torch.testing.assert_close(logits(pruned), logits(tiny_model), rtol=0, atol=0)
    assert not any(isinstance(m, Sparse24Linear) for m in pruned.modules())
    assert report.removed["layers"] == [] and report.removed["sparse_kernel"] is False


@pytest.mark.parametrize("method", METHODS)
def test_every_projection_is_24_along_k(tiny_model, cal, method):
    dense = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    pruned, report = pruning.prune(tiny_model, method, 0.5, calibration=cal)
    assert all(torch.equal(v, dense[k]) for k, v in tiny_model.state_dict().items())  # input untouched
    assert pruned.state_dict().keys() == dense.keys()
    for i in range(4):
        for name, lin in projections(pruned, i).items():
            assert isinstance(lin, Sparse24Linear) and lin.sparse24, (i, name)
            assert (nonzeros_per_group(lin.weight) == 2).all(), (i, name)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):  # never pruned
        assert torch.equal(pruned.state_dict()[key], dense[key])
    assert report.removed["layers"] == [0, 1, 2, 3] and report.removed["zero_fraction"] == 0.5
    assert report.removed["sparse_kernel"] is False and "no semi-structured sparse kernel on cpu" in report.removed["kernel_note"]
    assert all(set(s.sparse24) == set(PROJ) for s in report.shapes)  # the cost model sees 2:4


@pytest.mark.parametrize("method", ["sparse24_magnitude", "sparse24_wanda", "sparse24_random"])
@pytest.mark.parametrize("sparsity", [0.125, 0.25, 0.375])
def test_zero_count_is_exact(tiny_model, cal, method, sparsity):
    pruned, report = pruning.prune(tiny_model, method, sparsity, calibration=cal)
    zeros = sum(int((lin.weight == 0).sum()) for i in range(4) for lin in projections(pruned, i).values())
    assert zeros == sparsity * n_projection_weights(tiny_model)
    chosen = report.removed["layers"]
    assert len(chosen) == round(2 * sparsity * 4)
    for i in range(4):  # the other layers are dense and untouched
        for name, lin in projections(pruned, i).items():
            assert isinstance(lin, Sparse24Linear) == (i in chosen)
            if i not in chosen:
                assert torch.equal(lin.weight, projections(tiny_model, i)[name].weight)


@pytest.mark.parametrize("method", ["sparse24_magnitude", "sparse24_wanda", "sparse24_sparsegpt"])
def test_layers_that_lose_least_are_chosen(tiny_model, cal, method):
    """Layers 1 and 3 are nearly 2:4 already (2 of every 4 weights tiny): every criterion prunes them first."""
    with torch.no_grad():
        for i in (1, 3):
            for lin in projections(tiny_model, i).values():
                lin.weight.view(lin.out_features, -1, 4)[:, :, 2:] *= 1e-3
    _, report = pruning.prune(tiny_model, method, 0.25, calibration=cal)
    assert report.removed["layers"] == [1, 3]
    loss = report.removed["layer_loss"]
    assert max(loss[1], loss[3]) < min(loss[0], loss[2])


def test_random_baseline_is_seeded(tiny_model):
    a, ra = pruning.prune(tiny_model, "sparse24_random", 0.5, seed=3)
    b, _ = pruning.prune(tiny_model, "sparse24_random", 0.5, seed=3)
    c, _ = pruning.prune(tiny_model, "sparse24_random", 0.5, seed=4)
    w = [m.model.layers[0].mlp.up_proj.weight for m in (a, b, c)]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])
    _, r1 = pruning.prune(tiny_model, "sparse24_random", 0.25, seed=3)
    _, r2 = pruning.prune(tiny_model, "sparse24_random", 0.25, seed=3)
    assert r1.removed["layers"] == r2.removed["layers"]


def test_sparsegpt_reconstructs_better_than_magnitude(tiny_model, cal):
    """On the calibration inputs of layer 0, ||W X - W' X|| of every projection is smaller with SparseGPT."""
    inputs = {}
    hooks = [lin.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, lin in projections(tiny_model, 0).items()]
    with torch.inference_mode():
        for ids in cal.batches(4):
            tiny_model(ids)
    for h in hooks:
        h.remove()
    sgpt, _ = pruning.prune(tiny_model, "sparse24_sparsegpt", 0.5, calibration=cal)
    mag, _ = pruning.prune(tiny_model, "sparse24_magnitude", 0.5)
    for name, lin in projections(tiny_model, 0).items():
        x = torch.cat(inputs[name])
        y = x @ lin.weight.detach().T
        err = {k: ((y - x @ projections(m, 0)[name].weight.detach().T) ** 2).sum() for k, m in (("sgpt", sgpt), ("mag", mag))}
        assert err["sgpt"] < 0.9 * err["mag"], (name, err)


def test_bad_arguments(tiny_model, cal):
    for s in (0.6, -0.1, 1.0):
        with pytest.raises(ValueError, match=r"allowed 0 <= s <= 0.5"):
            pruning.prune(tiny_model, "sparse24_magnitude", s)
    with pytest.raises(ValueError, match="needs calibration data"):
        pruning.prune(tiny_model, "sparse24_sparsegpt", 0.5)
    with pytest.raises(ValueError, match=r"blocksize=64 is not taken by pruning method .*its options: sparse_kernel"):
        pruning.prune(tiny_model, "sparse24_magnitude", 0.5, blocksize=64)
    torch.manual_seed(0)
    odd = AutoModelForCausalLM.from_config(tiny_config(intermediate_size=130)).eval()
    with pytest.raises(ValueError, match=r"layer 0 down_proj has K = 130 .*K % 4 == 0"):
        pruning.prune(odd, "sparse24_wanda", 0.5, calibration=cal)


def test_pruned_model_decodes_with_cache_and_generates(tiny_model, cal):
    pruned, _ = pruning.prune(tiny_model, "sparse24_sparsegpt", 0.5, calibration=cal)
    full = logits(pruned)
    with torch.inference_mode():
        cache = DynamicCache(config=pruned.config)
        pre = pruned(IDS[:, :-1], past_key_values=cache, use_cache=True)
        step = pruned(IDS[:, -1:], past_key_values=pre.past_key_values, use_cache=True)
        # a left-padded batch (what lm-eval's HFLM feeds) gives the unpadded logits at the real tokens
        padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), IDS], 1)
        mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones_like(IDS)], 1)
        pad = pruned(padded, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(pre.logits, full[:, :-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pad, full, rtol=1e-4, atol=1e-4)
    out = pruned.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 16) and torch.equal(out[0, :12], IDS[0])


@pytest.mark.cuda
def test_cuda_runs_the_sparse_kernel(tiny_model, cal):
    from torch.sparse import SparseSemiStructuredTensor

    model = tiny_model.to("cuda", torch.float16)
    sparse, report = pruning.prune(model, "sparse24_wanda", 0.5, calibration=cal)
    dense, control = pruning.prune(model, "sparse24_wanda", 0.5, calibration=cal, sparse_kernel=False)
    assert report.removed["sparse_kernel"] is True, report.removed["kernel_note"]
    assert control.removed["sparse_kernel"] is False
    assert all(isinstance(lin.weight, SparseSemiStructuredTensor) for i in range(4) for lin in projections(sparse, i).values())
    ids = IDS.cuda()
    torch.testing.assert_close(logits(sparse, ids).float(), logits(dense, ids).float(), rtol=2e-2, atol=2e-2)
    with torch.inference_mode():
        pre = sparse(ids[:, :-1], past_key_values=DynamicCache(config=sparse.config), use_cache=True)
        step = sparse(ids[:, -1:], past_key_values=pre.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits[:, -1].float(), logits(dense, ids)[:, -1].float(), rtol=2e-2, atol=2e-2)
    assert sparse.generate(ids[:1], max_new_tokens=4, do_sample=False).shape == (1, 16)


@pytest.mark.slow
def test_embedded_model_wanda_beats_magnitude_beats_random(embedded):
    """On SmolLM2-135M at 2:4, held-out calibration text: Wanda < magnitude < random baseline in NLL."""
    from prunelib.model.calibration import calibration_batch

    model, tok = embedded
    cal = calibration_batch(tok, n=4, length=128, seed=0)
    held = calibration_batch(tok, n=2, length=128, seed=1).input_ids

    def nll(m):
        with torch.inference_mode():
            return float(m(held, labels=held).loss)

    loss = {}
    for meth in ("wanda", "magnitude", "random"):
        pruned, report = pruning.prune(model, f"sparse24_{meth}", 0.5, calibration=cal)
        assert abs(report.removed["zero_fraction"] - 0.5) < 1e-3  # a few weights of the checkpoint are zero already
        loss[meth] = nll(pruned)
    assert nll(model) < loss["wanda"] < loss["magnitude"] < loss["random"], loss


# --- 2:4 weights as CUDA holds them: a SparseSemiStructuredTensor (built here on the CPU) ---------------
def _as_semi_structured(lin):
    """Swap ``lin``'s weight for a CUTLASS SparseSemiStructuredTensor of its shape: a wrapper subclass
    with no storage of its own (data_ptr() == 0, reshape raises), inner tensors made up on the CPU."""
    import warnings

    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    n, k = lin.weight.shape
    w = lin.weight.detach()
    packed = w.reshape(n, k // 4, 4)[:, :, :2].reshape(n, k // 2).contiguous()
    meta = torch.arange(n * k // 16, dtype=torch.int16).reshape(n, k // 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = SparseSemiStructuredTensorCUTLASS(w.shape, packed=packed, meta=meta, packed_t=packed.t().contiguous(),
                                              meta_t=meta.t().contiguous(), compressed_swizzled_bitmask=None)
    lin.weight = torch.nn.Parameter(t, requires_grad=False)
    return t


def test_parameter_count_fingerprint_and_bytes_of_sparse_tensors(tiny_model):
    from prunelib.model.models import fingerprint, parameter_count, weight_bytes

    pruned, _ = pruning.prune(tiny_model, "sparse24_magnitude", 0.5)
    n_dense, bytes_dense, fp_masked = parameter_count(pruned), weight_bytes(pruned), fingerprint(pruned)
    lins = [lin for i in range(4) for lin in projections(pruned, i).values()]
    with pytest.raises(Exception):  # what the old fingerprint and parameter count tripped on
        t = _as_semi_structured(lins[0])
        assert t.data_ptr() == 0
        t.reshape(-1)
    for lin in lins[1:]:
        _as_semi_structured(lin)
    assert parameter_count(pruned) == n_dense  # every sparse weight counted, at its logical shape
    # packed values (half) + metadata + their transposed copies, instead of the dense weight
    proj = sum(lin.in_features * lin.out_features for lin in lins)
    meta = sum(lin.in_features * lin.out_features // 16 * 2 for lin in lins)
    assert weight_bytes(pruned) == bytes_dense - 4 * proj + 2 * (4 * proj // 2 + meta)
    fp = fingerprint(pruned)
    assert fp != fp_masked and fp == fingerprint(pruned)
    with torch.no_grad():
        lins[5].weight.packed.mul_(2)
    assert fingerprint(pruned) != fp  # the packed values are hashed
    info = kernel_info(pruned)
    assert info["kernel"] == "CUTLASS" and info["kernel_fallback"] is None and info["sparse_layers"] == "28 of 28"


def test_kernel_record_and_engaged_shape(tiny_model):
    from prunelib.cost.costmodel import ModelShape

    pruned, report = pruning.prune(tiny_model, "sparse24_magnitude", 0.5)
    assert report.removed["kernel"] == "none" and "on cpu" in report.removed["kernel_fallback"]
    shape = ModelShape.of(pruned)
    assert all(engaged_shape(pruned, shape).layers[i].sparse24 == () for i in range(4))  # none engaged
    _as_semi_structured(projections(pruned, 2)["up_proj"])
    info = kernel_info(pruned)
    assert info["kernel"] == "mixed: CUTLASS+none" and info["sparse_layers"] == "1 of 28"
    assert "masked dense" in info["kernel_fallback"]
    eng = engaged_shape(pruned, shape)
    assert eng.layers[2].sparse24 == ("up_proj",) and eng.layers[1].sparse24 == ()
    _, control = pruning.prune(tiny_model, "sparse24_magnitude", 0.5, sparse_kernel=False)
    assert control.removed["kernel"] == "none" and "sparse_kernel=False" in control.removed["kernel_fallback"]
    dense, _ = pruning.prune(tiny_model, "last_n", 0.25)
    assert kernel_info(dense) == {"kernel": None, "kernel_fallback": None, "sparse_layers": None}
