"""Dynamic NK attention: each query block attends to a few key/value blocks chosen at run time.

Training-free; nothing is calibrated: the blocks are chosen per input from the input itself.

Prefill (more than one new token): queries and keys are cut into blocks of ``block`` tokens
(option, default 64) aligned to absolute positions. Query block j may see the causal key
blocks 0..j; it keeps the sink block 0, its diagonal block j, and the best others by
method:

- ``sparse_attn_block``: the pooled score mean(Q_block) . mean(K_block) (SeerAttention's
  pooled attention, Gao et al. 2024; FlexPrefill's pooled estimate, Lai et al. 2025), one
  score per query block, key block and KV head; with GQA the query means of the group's
  heads are averaged, so key blocks are chosen **per KV head** (its query heads share
  them, and each KV block is gathered once). Masked (padding) keys are left out of the
  key means.
- ``sparse_attn_window``: the sink + local-window baseline (StreamingLLM style): the
  sink plus the most recent blocks.
- ``sparse_attn_random``: the random *baseline*: random key blocks, sink and diagonal
  kept, drawn by a seeded hash of (``ctx.seed`` and layer, KV head, query block, key
  block) rather than a stateful generator, so a choice never depends on earlier forwards.

Decode (one new token): Quest (Tang et al. 2024). The KV cache is cut into pages of
``page`` tokens (option, default 16); per page and channel the min and max of the keys
bound q.k from above by sum_i max(q_i max_i, q_i min_i); the summed bound over the query
heads of a KV head ranks that KV head's pages, and the top pages are gathered (first
and current page always kept; the bound is q+ . hi + q- . lo, two small GEMMs). The
window baseline keeps the first and the most recent pages, the random one random pages
(hashed by position). Page metadata is kept incrementally on the DynamicCache layer
(not on the module, which stays picklable): min/max of the complete pages are reused
while that layer's key storage is the one this module last saw (it only grew, or was
cropped back no further than the stored pages, as the timing harness does); an append
by another forward, a reorder or a reset replaces the storage and they are recomputed,
a read of all cached keys. The decision is made on the host from shapes and storage
addresses: the decode step has no host-device sync. Only the open page is recomputed
every step.

What is served and scored: a forward's whole input is a prompt (prefill rule) unless
:func:`prunelib.measure.servinglm.prompt_lengths` says where each row's prompt ends (lm-eval
scoring through :class:`prunelib.measure.servinglm.ServingHFLM` does). Then the prompt's
positions run the prefill rule over the prompt's keys only, and every later position
runs the decode rule: the Quest choice it would make as a decode step (its own open page
bounded by the keys up to itself), computed for all of them at once as a masked dense
attention. One full forward thus gives, at the last prompt token and every continuation
position, the logits of prefill + cached decode (tests check 1e-4), and a later token
never changes an earlier served position. (Inside the prompt, pooled query means cover a
whole query block, as a served prefill computes them.) Perplexity windows have a
one-token prompt (but a text's last, shorter one): they score the decode rule.

Sparsity unit (``0 <= s < 1``, density = 1 - s): in prefill, the fraction of the causal
(query block, key block) pairs skipped; in decode, the fraction of the cached KV tokens
skipped (the round(density * pages) kept pages, at least 2; counted as the page slots
gathered and computed, the open page's unused tail included). Every query block keeps
the same number k of key blocks (k+1 for the last few rows, to hit the target exactly),
so the first k query blocks are dense and sink + diagonal set a floor on the density
(2 blocks per row: at S=2048, b=64 the floor is 63/528 = 0.12). What a run realised is
counted: ``shape_overrides()`` of each module reports ``attn_density`` (of the phase that
ran last since ``reset_stats()``) and ``attn_block`` (block or page of the estimator;
0 for the baselines, which estimate nothing); :func:`realised_sparsity` gives the skipped
fraction over the model. A prompt of fewer than 2 blocks (and density 1) has nothing to
skip: it runs the model's own dense attention.

How the speedup is realised (N of QK^T and K of PV shrink): the selected K/V blocks are
gathered per query block and attention runs densely over them, with the causal mask
inside the diagonal block; every kept tile is computed whole and nothing else (the cost
model counts these tiles, ``attn_tile``); on CUDA a ``flex_attention`` ``BlockMask`` built from the
same selection skips the other blocks in the kernel. Padding masks (lm-eval batches,
left-padded generate) are applied inside the gathered blocks, so padded rows stay
correct; a query whose kept keys are all masked (only padding positions) attends to all
its kept slots instead of producing NaN, as transformers' eager attention does. The
attention modules are replaced by :class:`SparseAttention`, which keeps the Linears of the
q/k/v/o roles (separate or fused, as the family has them: their columns are read through the
adapter's ``role_rows``) and works with a DynamicCache (prefill then decode) and ``generate``.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from prunelib.core.validate import InputError
from prunelib.model.adapter import ModelAdapter, rope
from prunelib.pruning.ladders import grid
from prunelib.pruning.registry import register
from prunelib.pruning.sparse_kernels import _allowed, flex_block_attention, gather_attention, page_attention
from prunelib.pruning.sparse_select import (METHODS, NEG, OPTIONS, block_scores, check_settings, choose_pages,
                                            keep_counts, page_minmax, pages_kept, select_blocks)

class SparseAttention(nn.Module):
    """The attention sublayer of layer ``i`` whose core attends only to selected blocks (prefill) / pages (decode).

    Built from the adapter's roles: the Linears holding q, k, v and o keep the attribute names
    the family gives them (a fused ``qkv_proj`` once), and ``rows`` says which output columns of
    which Linear each role is, so the state dict and the adapter's view of the layer are unchanged.
    """

    def __init__(self, a: ModelAdapter, i: int, method: str, density: float, block: int = 64, page: int = 16,
                 seed: int = 0):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"sparse attention method {method!r} is unknown; allowed: {METHODS}")
        check_settings(density, block, page)
        attn = a.attn(i)
        if attn is None:
            raise ValueError(f"layer {i} has no attention to sparsify: it was removed")
        self.rows = {}  # role -> (name of the Linear holding it, first and last + 1 output column)
        for role in ("q", "k", "v", "o"):
            lin, rows = a.role_rows(i, role)
            setattr(self, a.linear_name(role), lin)
            self.rows[role] = (a.linear_name(role), rows.start, rows.stop)
        self.config, self.layer_idx = attn.config, attn.layer_idx
        self.head_dim, self.scaling, self.is_causal = attn.head_dim, attn.scaling, True
        width = {r: self.rows[r][2] - self.rows[r][1] for r in ("q", "k")}
        self.num_key_value_heads = width["k"] // self.head_dim
        self.num_key_value_groups = width["q"] // width["k"]
        self.attention_dropout = 0.0
        self.method, self.density, self.block, self.page, self.seed = method, float(density), block, page, seed
        self.prompt_lengths = None  # [B] where each row's prompt ends (servinglm.prompt_lengths); None: all input
        self.reset_stats()

    def extra_repr(self) -> str:
        return f"method={self.method}, density={self.density:.4g}, block={self.block}, page={self.page}"

    def set_prompt_lengths(self, lengths) -> None:
        """Where each row's prompt ends in the next forwards (:func:`prunelib.measure.servinglm.prompt_lengths`)."""
        self.prompt_lengths = lengths

    # counters -------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.kept = {"prefill": 0, "decode": 0}
        self.total = {"prefill": 0, "decode": 0}
        self.estimated = {"prefill": False, "decode": False}
        self.tiled = {"prefill": False, "decode": False}
        self.last_phase = None
        self.scored = [0, 0]  # served positions whose logits a sparse rule shaped, of all served positions

    def _count(self, phase: str, kept: int, total: int, estimated: bool, tiled: bool = True) -> None:
        self.kept[phase] += kept
        self.total[phase] += total
        self.estimated[phase] |= estimated
        self.tiled[phase] |= tiled
        self.last_phase = phase

    def shape_overrides(self) -> dict:
        """Realised density of the phase that ran last since ``reset_stats()`` (dense defaults if none ran)."""
        p = self.last_phase
        if p is None or self.total[p] == 0:
            return {"attn_density": 1.0, "attn_block": 0, "attn_tile": 0}
        size = self.block if p == "prefill" else self.page
        return {"attn_density": self.kept[p] / self.total[p], "attn_block": size if self.estimated[p] else 0,
                "attn_tile": size if self.tiled[p] else 0}

    # forward --------------------------------------------------------------------------
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        B, S, _ = hidden_states.shape
        q, k, v = self._qkv(hidden_states)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)  # [B, 1, S, rotary dims]: every head
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        layer = _cache_layer(past_key_values, self.layer_idx)
        before = _keys_ptr(layer)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if S == 1:
            out = self._decode(q, k, v, attention_mask, layer, before, kwargs)
        elif self.prompt_lengths is None:
            out = self._prefill(q, k, v, attention_mask, kwargs)
        else:
            out = self._serve(q, k, v, attention_mask, kwargs)
        return self._linear("o")(out.reshape(B, S, -1)), None

    def _linear(self, role: str) -> nn.Module:
        return getattr(self, self.rows[role][0])

    def _qkv(self, hidden_states):
        """q, k, v as [B, heads, S, head_dim]: each role's columns of its Linear (a fused one runs once), views."""
        outs = {}
        for role in ("q", "k", "v"):
            name, start, stop = self.rows[role]
            if name not in outs:
                outs[name] = self._linear(role)(hidden_states)
            yield outs[name][..., start:stop].view(*hidden_states.shape[:2], -1, self.head_dim).transpose(1, 2)

    def _dense(self, q, k, v, attention_mask, kwargs):
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        return fn(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)[0]

    def _prefill(self, q, k, v, attention_mask, kwargs):
        B, H, S, _ = q.shape
        Hkv, T = k.shape[1], k.shape[2]
        b, off = self.block, T - S
        first, nq = off // b, math.ceil((off % b + S) / b)
        counts = keep_counts(first, nq, self.density)
        n_causal = int((torch.arange(nq) + first + 1).sum()) * B * Hkv
        if first + nq < 2 or self.density == 1 or bool((counts == torch.arange(nq) + first + 1).all()):
            self._count("prefill", n_causal, n_causal, False, False)
            self._sparse_prefill = False
            return self._dense(q, k, v, attention_mask, kwargs)
        self._sparse_prefill = True
        allowed = _allowed(attention_mask, B, S, T)
        if allowed is not None and torch.equal(allowed, torch.ones_like(allowed[0]).tril(off).expand(B, S, T)):
            allowed = None  # a plain causal mask (eager attention passes one): take the causal path
        key_valid = None if allowed is None else allowed.any(1)
        scores = block_scores(self.method, q, k, b, off, key_valid, self.seed)
        idx, valid = select_blocks(scores, counts, first)
        self._count("prefill", int(valid.sum()), n_causal, self.method == "block")
        if q.is_cuda and off % b == 0 and b % 16 == 0:
            return flex_block_attention(q, k, v, idx, valid, b, off, self.scaling, allowed)
        return gather_attention(q, k, v, idx, valid, b, off, self.scaling, allowed)

    def _decode(self, q, k, v, attention_mask, layer, before, kwargs):
        """One new token per sequence: Quest pages. No host-device sync (positions come from shapes)."""
        B, Hkv, T = k.shape[:3]
        n = math.ceil(T / self.page)
        kp = pages_kept(n, self.density)
        if kp == n:
            self._count("decode", T * B * Hkv, T * B * Hkv, False, False)
            return self._dense(q, k, v, attention_mask, kwargs)
        complete = self._page_bounds(k, layer, before) if self.method == "block" else None
        _, top = choose_pages(self.method, q, k, T - 1, self.page, self.density, self.seed, complete)
        self._count("decode", kp * self.page * B * Hkv, T * B * Hkv, self.method == "block")  # slots computed
        allowed = _allowed(attention_mask, B, 1, T)
        return page_attention(q, k, v, top[:, :, 0], self.page, self.scaling, None if allowed is None else allowed[:, 0])

    def _page_bounds(self, k, layer, before):
        """Quest min/max of the pages before the open one: the cache layer's stored pages reused while that
        layer only grew (or was cropped back no further than them), the new complete pages added.

        The metadata lives on the cache layer (``prunelib_quest``: keys storage, pages, lo, hi), not on
        this module: the module holds no cache reference and stays picklable. Reuse is decided on the
        host (the keys' storage address before this step's append, the page count), with no device
        read: a crop keeps the storage, an append, reorder or reset replaces it.
        """
        p, T = self.page, k.shape[2]
        full = (T - 1) // p
        m = getattr(layer, "prunelib_quest", None)
        if m is not None and before is not None and m[0] == before and m[1] <= full and m[2].shape[:2] == k.shape[:2]:
            lo_new, hi_new = page_minmax(k[:, :, m[1] * p : full * p], p)
            lo, hi = torch.cat([m[2], lo_new], 2), torch.cat([m[3], hi_new], 2)
        else:
            lo, hi = page_minmax(k[:, :, : full * p], p)
        if layer is not None:
            layer.prunelib_quest = (k.data_ptr(), full, lo, hi)
        return lo, hi

    def _serve(self, q, k, v, attention_mask, kwargs):
        """Prompt lengths known: each row's prompt positions run the prefill rule over the prompt's keys,
        its later positions the decode rule (Quest), exactly as prefill + cached decode would."""
        B, H, S, d = q.shape
        T = k.shape[2]
        off = T - S
        n = self.prompt_lengths
        if n.numel() != B:
            raise ValueError(f"sparse attention: {n.numel()} prompt lengths were set for a batch of {B} rows")
        mask = None if attention_mask is None else attention_mask.expand(B, -1, -1, -1)
        allowed = _allowed(mask, B, S, T)
        # a real token sees itself; right padding (after a row's last real token) runs no rule and is not counted
        ar = torch.arange(S, device=q.device)
        real = [S] * B if allowed is None else torch.where(allowed[:, ar, off + ar], ar + 1, 0).amax(1).tolist()
        out = torch.zeros(B, S, H, d, dtype=q.dtype, device=q.device)
        for b, end in enumerate(n.tolist()):  # rows one by one: each has its own prompt
            r = int(real[b])
            p = min(max(end - off, 0), r)  # this forward's prompt positions of row b
            rows = slice(b, b + 1)
            sparse_prompt, decode_active = False, 0
            if p:
                m = None if mask is None else mask[rows, :, :p, : off + p]
                out[rows, :p] = self._prefill(q[rows, :, :p], k[rows, :, : off + p], v[rows, :, : off + p], m, kwargs)
                sparse_prompt = self._sparse_prefill
            if p < r:
                m = None if mask is None else mask[rows, :, p:r, : off + r]
                out[rows, p:r] = self._decode_all(q[rows, :, p:r], k[rows, :, : off + r], v[rows, :, : off + r],
                                                  off + p, m)
                decode_active = self._decode_active
            # the served positions: the prompt's last (it predicts the first continuation token) and every later one;
            # a sparse prompt shapes them all (through its keys and values), else only where the decode rule skipped
            served = (r - p) + (1 if p else 0)
            self.scored[0] += served if sparse_prompt else decode_active
            self.scored[1] += served
        return out

    def _decode_all(self, q, k, v, first: int, attention_mask):
        """The decode rule for the queries at positions first.. at once: each reads its own Quest pages.

        Run as a masked dense attention over the keys (scoring only: same values as the decode
        steps' gathered pages); queries that see too few pages to skip one read them all."""
        B, H, Sq, d = q.shape
        Hkv, T = k.shape[1], k.shape[2]
        G, page = H // Hkv, self.page
        keep, _ = choose_pages(self.method, q, k, first, page, self.density, self.seed)
        pos = torch.arange(first, first + Sq, device=q.device)
        seen = torch.arange(T, device=q.device) <= pos[:, None]  # [Sq, T]
        n_vis = pos // page + 1
        dense = pages_kept(n_vis, self.density) == n_vis
        tok = keep.repeat_interleave(page, -1)[..., :T] | dense[:, None]  # [B, Hkv, Sq, T]
        allowed = seen & tok
        if attention_mask is not None:
            allowed = allowed & _allowed(attention_mask, B, Sq, T)[:, None]
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, NEG)
        qg = q.reshape(B, Hkv, G * Sq, d)
        bias = bias[:, :, None].expand(-1, -1, G, -1, -1).reshape(B, Hkv, G * Sq, T)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=bias, scale=self.scaling)
        kept_slots = torch.where(dense, pos + 1, pages_kept(n_vis, self.density) * page)
        self._decode_active = int((~dense).sum())  # positions whose decode rule skipped a page
        self._count("decode", int(kept_slots.sum()) * B * Hkv, int((pos + 1).sum()) * B * Hkv, self.method == "block")
        return out.reshape(B, Hkv, G, Sq, d).permute(0, 3, 1, 2, 4).reshape(B, Sq, H, d)


def _cache_layer(cache, idx: int):
    """The DynamicCache layer of ``idx`` (where Quest metadata is kept), or None for other caches."""
    layers = getattr(cache, "layers", None)
    if layers is None or idx >= len(layers) or not isinstance(layers[idx], DynamicLayer):
        return None
    return layers[idx]


def _keys_ptr(layer):
    keys = getattr(layer, "keys", None)
    return keys.data_ptr() if isinstance(keys, torch.Tensor) and keys.numel() else None


# --- model level ---------------------------------------------------------------------------
def sparsify(model, method: str, density: float, block: int = 64, page: int = 16, seed: int = 0):
    """A copy of ``model`` whose attention sublayers are :class:`SparseAttention` modules."""
    check_settings(density, block, page)
    new = copy.deepcopy(model)
    a = ModelAdapter(new)
    for i in range(len(a.layers)):
        if a.attn(i) is not None:
            a.set_sublayer(i, "attention", SparseAttention(a, i, method, density, block, page, seed * 1000 + i))
    return new


def sparse_modules(model) -> list[SparseAttention]:
    return [m for m in model.modules() if isinstance(m, SparseAttention)]


def reset_stats(model) -> None:
    for m in sparse_modules(model):
        m.reset_stats()


def realised_sparsity(model, phase: str | None = None) -> float:
    """Fraction of causal blocks (prefill) / KV tokens (decode) skipped since ``reset_stats()``, for ``phase`` or
    the phase that ran last; 0 if nothing ran."""
    mods = [m for m in sparse_modules(model) if m.last_phase is not None]
    if not mods:
        return 0.0
    phase = phase or mods[0].last_phase
    total = sum(m.total[phase] for m in mods)
    return 1 - sum(m.kept[phase] for m in mods) / total if total else 0.0


def active_share(model) -> float | None:
    """The share of served positions (since ``reset_stats()``, scored through prompt lengths) whose logits a sparse
    rule shaped: every position after a prompt the prefill rule sparsified, else those whose decode rule skipped a
    page; None when nothing was served. A short prompt (under 2 blocks) and a short cache run dense: a loss scored
    there says little about the rule (6 of 1,179 quick-suite requests ran the prefill rule)."""
    mods = sparse_modules(model)
    active, total = (sum(m.scored[i] for m in mods) for i in (0, 1))
    return active / total if total else None


def _prune(model, sparsity: float, ctx, method: str):
    unknown = set(ctx.options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)} for sparse attention; allowed: {OPTIONS}")
    block, page = ctx.options.get("block", 64), ctx.options.get("page", 16)
    top = getattr(model.config, "max_position_embeddings", None) or 2**31
    for k, v in (("block", block), ("page", page)):  # a block past the positions leaves every prompt dense
        if isinstance(v, int) and v > top // 2:  # (below 1: refused by sparsify)
            raise InputError(f"option {k}={v!r} of pruning method 'sparse_attn_{method}' is not allowed: expected an "
                             f"integer 1 <= {k} <= {top // 2} (two {k}s within max_position_embeddings {top})")
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity {sparsity!r} is out of range: allowed 0 <= s < 1")
    pruned = sparsify(model, method, 1 - sparsity, block, page, ctx.seed)
    return pruned, {"density": 1 - sparsity, "block": block, "page": page, "layers": len(sparse_modules(pruned)),
                    "unit": "causal (query block, key block) pairs in prefill; KV tokens in decode"}


def _attn(method: str):
    return lambda model, sparsity, ctx: _prune(model, sparsity, ctx, method)


_SA = dict(needs_calibration=False, max_sparsity=lambda model: 0.95, options={"block": int, "page": int},
           ladder=grid(0.1))
register("sparse_attn_block", "dynamic_nk_attention",
         "pooled mean(Q_block).mean(K_block) per KV head in prefill; Quest page bound of q.k in decode",
         baseline="sparse_attn_random", **_SA)(_attn("block"))
register("sparse_attn_window", "dynamic_nk_attention", "sink + most recent blocks / pages (local-window baseline)",
         baseline="sparse_attn_random", **_SA)(_attn("window"))
register("sparse_attn_random", "dynamic_nk_attention",
         "random key blocks / pages, seeded, sink and diagonal kept (random baseline)", baseline=None, **_SA)(
    _attn("random"))
