import copy

import pytest
import torch
from transformers import DynamicCache, StaticCache

from prunelib import pruning
from prunelib.model.adapter import ModelAdapter
from prunelib.model.calibration import CalibrationSet
from prunelib.pruning import token_pruning

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
METHODS = ["token_prune_attn", "token_prune_random"]
TOL = dict(rtol=1e-4, atol=1e-5)


def logits(model, ids=IDS, **kw):
    with torch.inference_mode():
        return model(ids, **kw).logits


def pruner(model):
    return ModelAdapter(model).layers[-1].token_pruner


def kept_mask(model, S):
    kept = pruner(model).last_kept
    return torch.zeros(kept.shape[0], S, dtype=torch.bool).scatter(1, kept, True)


@torch.inference_mode()
def masked_reference(model, ids, layer, visible):
    """Dense layers run on every token; from ``layer`` on, keys outside ``visible`` [B, S] are masked out."""
    m = model.model
    B, S = ids.shape
    h = m.embed_tokens(ids)
    pos = torch.arange(S)[None]
    rope = m.rotary_emb(h, position_ids=pos)
    causal = torch.ones(S, S, dtype=torch.bool).tril()[None]
    for i, block in enumerate(m.layers):
        allowed = causal & visible[:, None, :] if i >= layer else causal.expand(B, S, S)
        mask = torch.zeros(B, 1, S, S).masked_fill(~allowed[:, None], float("-inf"))
        h = block(h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
    return model.lm_head(m.norm(h))


@pytest.mark.parametrize("method", METHODS)
def test_zero_sparsity_equals_dense(tiny_model, method):
    pruned, report = pruning.prune(tiny_model, method, 0.0)
    torch.testing.assert_close(logits(pruned), logits(tiny_model))
    assert report.removed["keep_ratio"] == 1.0
    assert torch.equal(pruned.generate(IDS, max_new_tokens=3, do_sample=False),
                       tiny_model.generate(IDS, max_new_tokens=3, do_sample=False))
    assert tiny_model.model.layers[1].__class__.__name__ == "LlamaDecoderLayer"  # the input model is untouched


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_kept_tokens_are_the_top_attention_of_the_last_token(tiny_model, family):
    """The kept set is the top-K of layer l-1's eager attention row of the last token (+ first and last); on
    Phi-3 (fused qkv_proj, a partial rotary embedding: half of each head rotated) as on Llama."""
    from conftest import tiny_family_model

    if family == "phi3":
        tiny_model = tiny_family_model("phi3", partial_rotary_factor=0.5)
    pruned, _ = pruning.prune(tiny_model, "token_prune_attn", 0.5, layer=2)
    logits(pruned)
    eager = copy.deepcopy(tiny_model)
    eager.config._attn_implementation = "eager"
    with torch.inference_mode():
        att = eager(IDS, output_attentions=True).attentions[1][:, :, -1, :].mean(1)  # [B, S]
        att[:, 0] = att[:, -1] = float("inf")
        expected = att.topk(6, dim=-1).indices.sort(-1).values
    assert torch.equal(pruner(pruned).last_kept, expected)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layer", [1, 3])
def test_kept_tokens_run_as_a_masked_dense_model(tiny_model, method, layer):
    """Kept positions equal a dense run whose layers >= l see only kept keys; dropped ones exit early."""
    pruned, _ = pruning.prune(tiny_model, method, 0.5, layer=layer, seed=3)
    out = logits(pruned)
    vis = kept_mask(pruned, IDS.shape[1])
    assert vis.sum(-1).tolist() == [6, 6] and vis[:, 0].all() and vis[:, -1].all()
    ref = masked_reference(tiny_model, IDS, layer, vis)
    torch.testing.assert_close(out[vis], ref[vis], **TOL)
    with torch.inference_mode():
        h = tiny_model(IDS, output_hidden_states=True).hidden_states[layer]  # input of layer l
        early = tiny_model.lm_head(tiny_model.model.norm(h))
    torch.testing.assert_close(out[~vis], early[~vis], **TOL)
    torch.testing.assert_close(logits(pruned, logits_to_keep=1)[:, -1], out[:, -1], **TOL)


def test_realised_keep_fraction_and_shape_overrides(tiny_model):
    cal = CalibrationSet(torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(1)), "synthetic", None, 1)
    pruned, report = pruning.prune(tiny_model, "token_prune_attn", 0.25, calibration=cal, layer=1)
    assert report.removed["seq_frac"] == 0.75  # 12 of 16 tokens
    assert report.removed["realised_sparsity"] == pytest.approx(3 / 4 * 0.25)
    assert [s.seq_frac for s in report.shapes] == [1.0, 0.75, 0.75, 0.75]
    a = ModelAdapter(pruned)
    a.reset_stats()
    assert token_pruning.realised_sparsity(pruned) == 0.0 and a.layer_shape(2).seq_frac == 1.0
    logits(pruned, torch.randint(0, 256, (1, 20)))  # keeps 15 of 20
    assert a.layer_shape(3).seq_frac == 0.75 and a.layer_shape(0).seq_frac == 1.0
    assert token_pruning.realised_sparsity(pruned) == pytest.approx(3 / 4 * 0.25)
    assert [token_pruning.keep_count(n, 0.5) for n in (1, 2, 3, 10, 11)] == [1, 2, 2, 5, 6]


@pytest.mark.parametrize("method", METHODS)
def test_decode_after_prefill(tiny_model, method):
    layer = 2
    pruned, _ = pruning.prune(tiny_model, method, 0.5, layer=layer)
    cache = DynamicCache(config=pruned.config)
    with torch.inference_mode():
        first = pruned(IDS, past_key_values=cache, use_cache=True).logits
        assert [lay.get_seq_length() for lay in cache.layers] == [12, 12, 6, 6]
        nxt = first[:, -1].argmax(-1, keepdim=True)
        step1 = pruned(nxt, past_key_values=cache, use_cache=True).logits[:, -1]
        nxt2 = step1.argmax(-1, keepdim=True)
        step2 = pruned(nxt2, past_key_values=cache, use_cache=True).logits[:, -1]
    vis = torch.cat([kept_mask(pruned, 12), torch.ones(2, 2, dtype=torch.bool)], dim=1)
    ref = masked_reference(tiny_model, torch.cat([IDS, nxt, nxt2], dim=1), layer, vis)
    torch.testing.assert_close(step1, ref[:, -2], **TOL)
    torch.testing.assert_close(step2, ref[:, -1], **TOL)
    assert pruner(pruned).seq_frac() == 0.5  # the prefill's keep ratio
    out = pruned.generate(IDS, max_new_tokens=2, do_sample=False)
    assert torch.equal(out[:, 12:], torch.cat([nxt, nxt2], dim=1))


def test_second_chunk_runs_dense_on_the_pruned_cache(tiny_model):
    """A multi-token forward after the prefill is not pruned; it attends to each layer's own cache."""
    pruned, _ = pruning.prune(tiny_model, "token_prune_attn", 0.5, layer=1)
    cache = DynamicCache(config=pruned.config)
    with torch.inference_mode():
        pruned(IDS[:, :8], past_key_values=cache, use_cache=True)
        vis = kept_mask(pruned, 8)
        out = pruned(IDS[:, 8:], past_key_values=cache, use_cache=True).logits
    assert [lay.get_seq_length() for lay in cache.layers] == [12, 8, 8, 8]
    ref = masked_reference(tiny_model, IDS, 1, torch.cat([vis, torch.ones(2, 4, dtype=torch.bool)], dim=1))
    torch.testing.assert_close(out, ref[:, 8:], **TOL)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])  # boolean / additive float masks
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_prunes_each_row_as_alone(tiny_model, side, impl):
    """A padded row keeps ceil((1-s) n_real) of its real tokens and gives the logits it gives alone."""
    tiny_model.config._attn_implementation = impl
    pruned, _ = pruning.prune(tiny_model, "token_prune_attn", 0.5, layer=1)
    short = IDS[1, :8]
    pad = torch.zeros(4, dtype=torch.long)
    row = torch.cat([short, pad]) if side == "right" else torch.cat([pad, short])
    ids = torch.stack([IDS[0], row])
    mask = torch.ones_like(ids)
    mask[1, slice(8, None) if side == "right" else slice(0, 4)] = 0
    real = mask[1].bool()
    cache = DynamicCache(config=pruned.config)
    with torch.inference_mode():
        both = pruned(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        kept = pruner(pruned).last_kept
        alone_cache = DynamicCache(config=pruned.config)
        alone = pruned(short[None], past_key_values=alone_cache, use_cache=True).logits
        alone_kept = pruner(pruned).last_kept
    assert kept.shape == (2, 6)
    assert real[kept[1]].sum() == 4  # 4 of its 8 real tokens, then 2 padding fillers
    offset = 4 if side == "left" else 0
    assert torch.equal(kept[1][real[kept[1]]] - offset, alone_kept[0])
    torch.testing.assert_close(both[0], logits(pruned, IDS[:1])[0], **TOL)
    torch.testing.assert_close(both[1, real], alone[0], **TOL)
    if side == "left":  # decode continues from the padded cache as from the lone one
        nxt = torch.tensor([[5], [7]])
        with torch.inference_mode():
            step = pruned(nxt, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                          past_key_values=cache, use_cache=True).logits[1, -1]
            ref = pruned(nxt[1:], past_key_values=alone_cache, use_cache=True).logits[0, -1]
        torch.testing.assert_close(step, ref, **TOL)


def test_random_baseline_is_seeded(tiny_model):
    a, _ = pruning.prune(tiny_model, "token_prune_random", 0.5, seed=1)
    b, _ = pruning.prune(tiny_model, "token_prune_random", 0.5, seed=1)
    c, _ = pruning.prune(tiny_model, "token_prune_random", 0.5, seed=2)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(5))
    logits(a, ids), logits(b, ids), logits(c, ids)
    assert torch.equal(pruner(a).last_kept, pruner(b).last_kept)
    assert not torch.equal(pruner(a).last_kept, pruner(c).last_kept)
    assert pruner(a).last_kept.shape == (1, 20)


def test_deep_copy_runs_on_its_own_state(tiny_model):
    pruned, _ = pruning.prune(tiny_model, "token_prune_attn", 0.5)
    twin = copy.deepcopy(pruned)
    torch.testing.assert_close(logits(twin), logits(pruned))
    assert pruner(twin) is not pruner(pruned)
    assert torch.equal(pruner(twin).last_kept, pruner(pruned).last_kept)


def test_short_prompts_pass_through(tiny_model):
    pruned, _ = pruning.prune(tiny_model, "token_prune_attn", 0.9)
    for ids in (IDS[:, :1], IDS[:, :2]):
        torch.testing.assert_close(logits(pruned, ids), logits(tiny_model, ids))


def test_bad_input(tiny_model):
    for s in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="sparsity"):
            pruning.prune(tiny_model, "token_prune_attn", s)
    for layer in (0, 4, 1.5):
        with pytest.raises(ValueError, match=r"layer.*(out of range: allowed 1 <= layer <= 3|expected an integer)"):
            pruning.prune(tiny_model, "token_prune_attn", 0.5, layer=layer)
    with pytest.raises(ValueError, match=r"window"):
        pruning.prune(tiny_model, "token_prune_attn", 0.5, window=4)
    pruned, _ = pruning.prune(tiny_model, "token_prune_attn", 0.5)
    with pytest.raises(ValueError, match="needs a DynamicCache"):
        logits(pruned, past_key_values=StaticCache(config=pruned.config, max_cache_len=16), use_cache=True)


@pytest.mark.slow
def test_attention_beats_random_on_real_text(embedded):
    """On calibration text, keeping the most-attended half loses less next-token loss than a random half."""
    from prunelib.model.calibration import calibration_batch

    model, tok = embedded
    ids = calibration_batch(tok, n=8, length=128, seed=7).input_ids
    prompt, target = ids[:, :-1], ids[:, -1]

    def loss(m):
        with torch.inference_mode():
            return torch.nn.functional.cross_entropy(m(prompt, logits_to_keep=1).logits[:, -1], target).item()

    attn, _ = pruning.prune(model, "token_prune_attn", 0.5)
    rand, _ = pruning.prune(model, "token_prune_random", 0.5)
    dense, l_attn, l_rand = loss(model), loss(attn), loss(rand)
    assert dense < l_attn < l_rand


@pytest.mark.parametrize("method", METHODS)
def test_continuation_positions_are_never_pruned(tiny_model, method):
    """With the prompt lengths known, every continuation position is kept, and only prompt tokens compete."""
    from prunelib.measure.servinglm import prompt_lengths

    pruned, _ = pruning.prune(tiny_model, method, 0.5, layer=2)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    lengths = [30, 17]
    with torch.inference_mode(), prompt_lengths(pruned, lengths):
        pruned(ids)
    p = pruner(pruned)
    kept, filler = p.last_kept, p.last_filler
    assert filler is not None and filler.sum() == 7  # row 0 runs 15 + 10 positions, row 1 9 + 23
    for b, n in enumerate(lengths):
        real = kept[b] if filler is None else kept[b][~filler[b]]
        assert set(range(n, 40)) <= set(real.tolist())  # all continuation positions run at full depth
        assert (real < n).sum() == token_pruning.keep_count(n, 0.5)  # ceil(n / 2) of the prompt, no more
        assert {0, n - 1} <= set(real.tolist())  # first and last prompt token always kept
    with torch.inference_mode():  # the same prompt alone (no continuation) keeps the same prompt tokens
        pruned(ids[:1, :30])
    row0 = kept[0][~filler[0]]
    assert torch.equal(pruner(pruned).last_kept[0], row0[row0 < 30])
