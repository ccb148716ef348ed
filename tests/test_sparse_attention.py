import copy
import math

import pytest
import torch
from transformers import DynamicCache

from prunelib import pruning
from prunelib.model.adapter import ModelAdapter
from prunelib.pruning import sparse_attention as sa
from prunelib.pruning import sparse_kernels as sk
from prunelib.pruning import sparse_select as ss

METHODS = ["sparse_attn_block", "sparse_attn_window", "sparse_attn_random"]
G = torch.Generator().manual_seed(0)
IDS = torch.randint(0, 256, (2, 200), generator=G)  # 200 tokens = 12.5 blocks of 16


def logits(model, ids=IDS, **kw):
    with torch.inference_mode():
        return model(ids, **kw).logits


def masked_reference(q, k, v, idx, valid, block, off, scaling, allowed=None):
    """Full attention with every non-selected (query block, key block) pair masked to -inf."""
    B, H, S, _ = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    nq, nk = idx.shape[2], math.ceil(T / block)
    keep = torch.zeros(B, Hkv, nq, nk + 1, dtype=torch.bool)
    keep.scatter_(-1, torch.where(valid, idx, nk), True)  # invalid slots land in the dropped extra column
    tok = keep[..., :nk].repeat_interleave(block, 2).repeat_interleave(block, 3)
    tok = tok[:, :, off % block : off % block + S, :T].repeat_interleave(H // Hkv, 1)
    seen = (torch.arange(T)[None] <= torch.arange(S)[:, None] + off) if allowed is None else allowed[:, None]
    scores = (q @ k.repeat_interleave(H // Hkv, 1).transpose(-1, -2)) * scaling
    p = scores.masked_fill(~(seen & tok), float("-inf")).softmax(-1)
    return (p @ v.repeat_interleave(H // Hkv, 1)).transpose(1, 2)


def qkv(S=200, off=0, B=2, H=4, Hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, S, d, generator=g), torch.randn(B, Hkv, S + off, d, generator=g),
            torch.randn(B, Hkv, S + off, d, generator=g))


@pytest.mark.parametrize("method", METHODS)
def test_zero_sparsity_equals_dense_prefill_and_decode(tiny_model, method):
    pruned, report = pruning.prune(tiny_model, method, 0.0, block=16, page=4)
    torch.testing.assert_close(logits(pruned), logits(tiny_model))
    caches = [DynamicCache(config=m.config) for m in (tiny_model, pruned)]
    out = [logits(m, IDS[:, :150], past_key_values=c, use_cache=True) for m, c in zip((tiny_model, pruned), caches)]
    for step in range(150, 155):  # decode: 38+ pages of 4, still dense at s=0
        out = [logits(m, IDS[:, step : step + 1], past_key_values=c, use_cache=True)
               for m, c in zip((tiny_model, pruned), caches)]
        torch.testing.assert_close(out[1], out[0])
    assert report.removed["density"] == 1.0
    assert isinstance(tiny_model.model.layers[0].self_attn, type(ModelAdapter(tiny_model).attn(1)))  # input untouched
    assert not isinstance(tiny_model.model.layers[0].self_attn, sa.SparseAttention)


@pytest.mark.parametrize("off", [0, 32, 21])  # fresh prompt, chunked prefill aligned / not aligned to blocks
@pytest.mark.parametrize("method", ["block", "window", "random"])
@pytest.mark.parametrize("density", [0.15, 0.4, 1.0])
def test_gather_equals_masked_dense_reference(off, method, density):
    q, k, v = qkv(off=off)
    b, S = 16, q.shape[2]
    first, nq = off // b, math.ceil((off % b + S) / b)
    idx, valid = ss.select_blocks(ss.block_scores(method, q, k, b, off, seed=1),
                                  ss.keep_counts(first, nq, density), first)
    torch.testing.assert_close(sk.gather_attention(q, k, v, idx, valid, b, off, 0.25),
                               masked_reference(q, k, v, idx, valid, b, off, 0.25))
    allowed = torch.ones(2, S, S + off, dtype=torch.bool).tril(off)
    allowed[1, :, :40] = False  # sequence 1 is left-padded by 40 tokens
    out = sk.gather_attention(q, k, v, idx, valid, b, off, 0.25, allowed)
    ref = masked_reference(q, k, v, idx, valid, b, off, 0.25, allowed)
    assert not out.isnan().any()
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1, max(0, 40 - off):], ref[1, max(0, 40 - off):])  # rows with a visible key


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_is_the_selection():
    """The CUDA path's BlockMask lists exactly the selected blocks, and its mask_mod is exact (eager check)."""
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = qkv()
    idx, valid = ss.select_blocks(ss.block_scores("block", q, k, 16, 0), ss.keep_counts(0, 13, 0.4), 0)
    bm = sk.flex_block_mask(idx, valid, 16, 0, 200, 200, 2)
    keep = torch.zeros(2, 2, 13, 13, dtype=torch.bool).scatter_(-1, idx, valid)
    assert torch.equal(bm.to_dense().bool(), keep.repeat_interleave(2, 1))
    out = flex_attention(q, k, v, block_mask=bm, scale=0.25, enable_gqa=True).transpose(1, 2)  # eager reference run
    torch.testing.assert_close(out, masked_reference(q, k, v, idx, valid, 16, 0, 0.25))


@pytest.mark.cuda
def test_flex_cuda_matches_gather():
    q, k, v = (x.cuda() for x in qkv(S=512, d=64))
    idx, valid = ss.select_blocks(ss.block_scores("block", q, k, 64, 0), ss.keep_counts(0, 8, 0.5), 0)
    torch.testing.assert_close(sk.flex_block_attention(q, k, v, idx, valid, 64, 0, 0.125),
                               sk.gather_attention(q, k, v, idx, valid, 64, 0, 0.125), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("n_blocks", [3, 8, 32, 100])
@pytest.mark.parametrize("density", [0.25, 0.5, 0.75])
def test_keep_counts_hit_the_target_density(n_blocks, density):
    counts = ss.keep_counts(0, n_blocks, density)
    n = torch.arange(1, n_blocks + 1)
    assert (counts <= n).all() and (counts >= n.clamp(max=2)).all()  # sink + diagonal at least
    floor = (2 * n_blocks - 1) / n.sum().item()
    realised = counts.sum().item() / n.sum().item()
    assert abs(realised - max(density, floor)) <= 0.5 / n.sum().item() + 1e-9 or realised == floor


@pytest.mark.parametrize("method", ["block", "window", "random"])
def test_sink_and_diagonal_always_kept(method):
    q, k, v = qkv(off=21)
    k[:, :, :16] = -q.mean((1, 2))[:, None, None] * 50  # the sink block scores worst of all
    scores = ss.block_scores(method, q, k, 16, 21, seed=0)
    idx, valid = ss.select_blocks(scores, ss.keep_counts(1, 13, 0.4), 1)  # 21 + 200 tokens: rows 1..13
    rows = torch.arange(1, 14)
    assert (idx[..., 0] == rows).all()  # slot 0: the diagonal block
    assert ((idx == 0) & valid).any(-1).all()  # the sink in every row
    if method == "window":
        assert valid[..., 1:, 2].all() and (idx[..., 1:, 2] == rows[1:] - 1).all()  # then the most recent


def test_realised_density_and_shape_overrides(tiny_model):
    pruned, _ = pruning.prune(tiny_model, "sparse_attn_block", 0.5, block=16, page=8)
    attn = pruned.model.layers[0].self_attn
    assert attn.shape_overrides() == {"attn_density": 1.0, "attn_block": 0, "attn_tile": 0}  # nothing ran yet
    ids = torch.randint(0, 256, (1, 512), generator=G)  # 32 blocks, 528 causal pairs
    logits(pruned, ids)
    got = attn.shape_overrides()
    assert abs(got["attn_density"] - 0.5) <= 1 / 528 and got["attn_block"] == got["attn_tile"] == 16
    assert abs(sa.realised_sparsity(pruned) - 0.5) <= 1 / 528
    shapes = ModelAdapter(pruned).layer_shapes()
    assert shapes[0].attn_density == got["attn_density"] and shapes[0].attn_block == 16
    sa.reset_stats(pruned)
    assert sa.realised_sparsity(pruned) == 0.0
    cache = DynamicCache(config=pruned.config)
    with torch.inference_mode():
        pruned(ids[:, :300], past_key_values=cache, use_cache=True)
        pruned(ids[:, 300:301], past_key_values=cache, use_cache=True)  # T = 301: 38 pages, 19 kept
    got = attn.shape_overrides()
    assert got == {"attn_density": 19 * 8 / 301, "attn_block": 8, "attn_tile": 8}  # the gathered slots computed
    window, _ = pruning.prune(tiny_model, "sparse_attn_window", 0.5, block=16)
    logits(window, ids)
    assert window.model.layers[0].self_attn.shape_overrides()["attn_block"] == 0  # no estimator ran
    assert window.model.layers[0].self_attn.shape_overrides()["attn_tile"] == 16  # but tiles were computed


def test_quest_bound_and_incremental_pages(tiny_model):
    """The page bound holds for every key; page metadata kept across steps equals a fresh recompute."""
    q, k, _ = qkv(S=1, off=99)
    lo, hi = ss.page_minmax(k, 8)
    bound = ss.quest_scores(q, lo, hi)  # summed over the 2 query heads of each KV head
    qk = (q.reshape(2, 2, 2, 16) @ k.transpose(-1, -2)).sum(2)  # [B, Hkv, T]
    per_page = torch.nn.functional.pad(qk, (0, 104 - 100), value=float("-inf")).reshape(2, 2, 13, 8).amax(-1)
    assert (bound >= per_page - 1e-5).all()
    pruned, _ = pruning.prune(tiny_model, "sparse_attn_block", 0.5, page=4)
    attn = pruned.model.layers[1].self_attn
    cache = DynamicCache(config=pruned.config)
    ids = torch.randint(0, 256, (2, 60), generator=G)
    with torch.inference_mode():
        pruned(ids[:, :40], past_key_values=cache, use_cache=True)
        for t in range(40, 60):
            pruned(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            if t == 50:
                cache.crop(-6)  # cropped back below the stored pages (51 -> 45 tokens): recomputed
    keys = cache.layers[1].keys
    _, stored_full, stored_lo, stored_hi = cache.layers[1].prunelib_quest  # kept on the cache, not the module
    lo, hi = ss.page_minmax(keys[:, :, : stored_full * 4], 4)
    assert stored_full == (keys.shape[2] - 1) // 4  # the pages before the last step's open page
    torch.testing.assert_close(stored_lo, lo)
    torch.testing.assert_close(stored_hi, hi)
    assert not hasattr(attn, "_pages")


@pytest.mark.parametrize("method", METHODS)
def test_decode_after_prefill_and_generate(tiny_model, method):
    pruned, _ = pruning.prune(tiny_model, method, 0.6, block=16, page=4, seed=3)
    out = pruned.generate(IDS[:, :100], attention_mask=torch.ones(2, 100, dtype=torch.long), max_new_tokens=12,
                          min_new_tokens=12, do_sample=False)
    assert out.shape == (2, 112)
    assert pruned.model.layers[0].self_attn.last_phase == "decode" and sa.realised_sparsity(pruned) > 0.3
    q, k, v = qkv(S=1, off=99)
    idx = torch.tensor([0, 5, 24])[None, None].expand(2, 2, 3)  # pages of 4; 24 is the last (current) page
    ref = masked_reference(q, k, v, idx[:, :, None], torch.ones(2, 2, 1, 3, dtype=torch.bool), 4, 99, 0.25)
    torch.testing.assert_close(sk.page_attention(q, k, v, idx, 4, 0.25), ref)


@pytest.mark.parametrize("method", METHODS)
def test_padded_batch(tiny_model, method):
    """Left padding (2 blocks): valid positions do not depend on the pad tokens, and nothing is NaN."""
    mask = torch.ones(2, 200, dtype=torch.long)
    mask[1, :32] = 0
    pruned, _ = pruning.prune(tiny_model, method, 0.5, block=16, page=4)
    other = IDS.clone()
    other[1, :32] = (other[1, :32] + 7) % 256
    a, b = (logits(copy.deepcopy(pruned), ids, attention_mask=mask) for ids in (IDS, other))
    assert not a.isnan().any()
    torch.testing.assert_close(a[1, 32:], b[1, 32:])
    torch.testing.assert_close(a[0], b[0])
    dense, _ = pruning.prune(tiny_model, method, 0.0, block=16)
    torch.testing.assert_close(logits(dense, IDS, attention_mask=mask)[1, 32:],
                               logits(tiny_model, IDS, attention_mask=mask)[1, 32:])
    right = torch.ones(2, 200, dtype=torch.long)
    right[1, 150:] = 0  # lm-eval style right padding
    assert not logits(pruned, IDS, attention_mask=right).isnan().any()


def test_eager_attention_masks(tiny_model):
    """Eager attention passes a float causal mask: same result as sdpa's None, padding still applied."""
    sdpa, _ = pruning.prune(tiny_model, "sparse_attn_block", 0.5, block=16)
    tiny_model.set_attn_implementation("eager")
    eager, _ = pruning.prune(tiny_model, "sparse_attn_block", 0.5, block=16)
    torch.testing.assert_close(logits(eager), logits(sdpa))
    mask = torch.ones(2, 200, dtype=torch.long)
    mask[1, :32] = 0
    torch.testing.assert_close(logits(eager, attention_mask=mask)[:, 32:], logits(sdpa, attention_mask=mask)[:, 32:])


def test_bad_input_errors(tiny_model):
    with pytest.raises(ValueError, match="sparsity 1.0 is out of range"):
        pruning.prune(tiny_model, "sparse_attn_block", 1.0)
    with pytest.raises(ValueError, match="block 0 is not allowed"):
        pruning.prune(tiny_model, "sparse_attn_block", 0.5, block=0)
    with pytest.raises(ValueError, match="page.*'x'.* is not allowed"):
        pruning.prune(tiny_model, "sparse_attn_window", 0.5, page="x")
    with pytest.raises(ValueError, match="blocks"):
        pruning.prune(tiny_model, "sparse_attn_random", 0.5, blocks=32)
    with pytest.raises(ValueError, match="density 0 is out of range"):
        sa.sparsify(tiny_model, "block", 0)
    with pytest.raises(ValueError, match="method 'topk' is unknown"):
        sa.SparseAttention(ModelAdapter(tiny_model), 0, "topk", 0.5)


def test_short_prompt_runs_dense(tiny_model):
    pruned, _ = pruning.prune(tiny_model, "sparse_attn_block", 0.75)  # block 64: 60 tokens are one block
    torch.testing.assert_close(logits(pruned, IDS[:, :60]), logits(tiny_model, IDS[:, :60]))
    assert sa.realised_sparsity(pruned) == 0.0


@pytest.mark.slow
def test_embedded_block_beats_random(embedded):
    """On calibration text the pooled estimate loses less than the random baseline at the same density."""
    from prunelib.model.calibration import calibration_batch

    model, tok = embedded
    ids = calibration_batch(tok, n=1, length=256, seed=3).input_ids
    losses = {}
    for method in ("sparse_attn_block", "sparse_attn_random"):
        pruned, _ = pruning.prune(model, method, 0.75, block=16)
        with torch.inference_mode():
            losses[method] = pruned(ids, labels=ids).loss.item()
        assert abs(sa.realised_sparsity(pruned) - 0.75) < 0.01
    assert losses["sparse_attn_block"] < losses["sparse_attn_random"]


@pytest.mark.parametrize("method", METHODS)
def test_decode_step_reads_no_device_values_and_pickles(tiny_model, method):
    """A sparse decode step never reads a tensor value on the host (no .item(), bool(), torch.equal: on CUDA each
    would wait for the device), and the model pickles after decoding (no weakref or generator on the module)."""
    import io

    from torch.utils._python_dispatch import TorchDispatchMode

    class NoHostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default):
                raise AssertionError(f"host read of a device value: {func}")
            return func(*args, **(kwargs or {}))

    pruned, _ = pruning.prune(tiny_model, method, 0.6, block=16, page=4)
    cache = DynamicCache(config=pruned.config)
    with torch.inference_mode():
        pruned(IDS[:, :100], past_key_values=cache, use_cache=True)
        pruned(IDS[:, 100:101], past_key_values=cache, use_cache=True)  # stores the Quest pages
        attn, h = pruned.model.layers[1].self_attn, torch.randn(2, 1, 64)
        rope = pruned.model.rotary_emb(h, position_ids=torch.tensor([[101]]))
        with NoHostReads():
            attn(h, position_embeddings=rope, attention_mask=None, past_key_values=cache)
    assert attn.last_phase == "decode" and attn.kept["decode"] < attn.total["decode"]  # the sparse path ran
    torch.save(pruned, io.BytesIO())


def test_partial_rotary_phi3_keeps_the_function():
    """Phi-3 with a partial rotary embedding (fused qkv_proj, half of each head rotated): at sparsity 0 the
    wrapper's own q/k/v reading and rotation give the model's logits; at 0.5 the blocks engage and change them."""
    from conftest import tiny_family_model

    model = tiny_family_model("phi3", partial_rotary_factor=0.5)
    a = ModelAdapter(model)
    assert a.rotary_emb(torch.zeros(1, 1, 1), torch.zeros(1, 1, dtype=torch.long))[0].shape[-1] == a.head_dim // 2
    ids = IDS[:1, :40]
    dense, _ = pruning.prune(model, "sparse_attn_block", 0.0, block=8, page=4)
    torch.testing.assert_close(logits(dense, ids), logits(model, ids), rtol=0, atol=1e-5)
    sparse, _ = pruning.prune(model, "sparse_attn_block", 0.5, block=8, page=4)
    assert not torch.allclose(logits(sparse, ids), logits(model, ids), atol=1e-3) and sa.realised_sparsity(sparse) > 0


def test_active_share_counts_where_a_sparse_rule_shaped_the_served_positions(tiny_model):
    """Short prompts and short caches run dense: a loss scored there barely measures the rule (6 of 1,179
    quick-suite requests ran the prefill rule); a long prompt makes every served position count."""
    from prunelib.measure.servinglm import prompt_lengths

    pruned, _ = pruning.prune(tiny_model, "sparse_attn_block", 0.75, block=16, page=16)
    sa.reset_stats(pruned)
    assert sa.active_share(pruned) is None  # nothing served yet
    with prompt_lengths(pruned, [20, 20]):  # one block and a bit: dense prefill; continuation's cache <= 2 pages
        logits(pruned, IDS[:, :30])
    assert sa.active_share(pruned) == 0.0
    sa.reset_stats(pruned)
    with prompt_lengths(pruned, [160, 160]):  # 10 blocks: the prefill rule ran
        logits(pruned, IDS[:, :200])
    assert sa.active_share(pruned) == 1.0
    from prunelib.run.pipeline import active_share

    assert active_share("sparse_attn_block", pruned) == 1.0 and active_share("shortgpt", tiny_model) is None


def test_inactive_quality_rows_leave_the_band_answers():
    import pandas as pd

    from prunelib.results import pareto

    base = dict(model="m", cell="dynamic_nk_attention", sparsity=0.75, device="cpu", dtype="float32", phase="prefill",
                batch=1, length=512)
    rows = [dict(base, method="sparse_attn_block", metric="speedup", value=1.2, ci_low=1.1, ci_high=1.3, bound=1.4,
                 config_hash="s", extra={"calibration": {"seed": 0}}),
            dict(base, method="sparse_attn_block", phase="quality", metric="quality_loss_pct", value=1.0, ci_low=0.0,
                 ci_high=2.0, config_hash="q", extra={"seed": 0, "active_share_scoring": 0.005})]
    pts = pareto.points(pd.DataFrame(rows))
    assert pts.inactive.tolist() == [True] and pts.active_share.tolist() == [0.005]
    t = pareto.best_per_band(pts, [(0, 4)])
    assert t.winners.tolist() == ["(none measured)"] and t.excluded_inactive.tolist() == [1]
