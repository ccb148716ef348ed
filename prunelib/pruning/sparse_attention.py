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
- ``sparse_attn_random``: the random *baseline*: random key blocks (seeded by
  ``ctx.seed`` and the layer index), sink and diagonal kept.

Decode (one new token): Quest (Tang et al. 2024). The KV cache is cut into pages of
``page`` tokens (option, default 16); per page and channel the min and max of the keys
bound q.k from above by sum_i max(q_i max_i, q_i min_i); the summed bound over the query
heads of a KV head ranks that KV head's pages, and the top pages are gathered (first
and current page always kept). The window baseline keeps the first and the most recent
pages, the random one random pages. Page metadata is kept incrementally: min/max of the
complete pages are stored per layer and reused while the same cache object only grew
(or was cropped back no further than the stored pages, as the timing harness does) and
the last key of the stored pages is unchanged; otherwise they are recomputed from the
cache, a read of all cached keys (half of what dense decode attention reads). Only the
open last page is recomputed every step. (Beam search reorders the cache in place: the
check on the last stored key misses it only where the swapped beams share that key.)

Sparsity unit (``0 <= s < 1``, density = 1 - s): in prefill, the fraction of the causal
(query block, key block) pairs skipped; in decode, the fraction of the cached KV tokens
skipped (the round(density * pages) kept pages, at least 2). Every query block keeps
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
inside the diagonal block; on CUDA a ``flex_attention`` ``BlockMask`` built from the
same selection skips the other blocks in the kernel. Padding masks (lm-eval batches,
left-padded generate) are applied inside the gathered blocks, so padded rows stay
correct; a query whose kept keys are all masked (only padding positions) attends to all
its kept slots instead of producing NaN, as transformers' eager attention does. The
attention modules are replaced by :class:`SparseAttention`, which keeps q/k/v/o_proj and
works with a DynamicCache (prefill then decode) and ``generate``.
"""
from __future__ import annotations

import copy
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from ..adapter import ModelAdapter
from .registry import register

METHODS = ("block", "window", "random")
OPTIONS = ("block", "page")
NEG = float("-inf")


def check_settings(density, block, page) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density {density!r} is out of range: allowed 0 < density <= 1 (sparsity 0 <= s < 1)")
    for name, v in (("block", block), ("page", page)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} {v!r} is not allowed: a positive int number of tokens")


# --- prefill: which key blocks each query block keeps ------------------------------------
def keep_counts(first_row: int, n_rows: int, density: float) -> torch.Tensor:
    """Key blocks kept by query blocks ``first_row..first_row+n_rows-1`` (row j sees j+1 causal blocks).

    One k for every row (at least 2: sink and diagonal), plus one more block for the last
    rows so that the total is round(density * causal blocks), or the floor if that is less.
    """
    n = torch.arange(first_row + 1, first_row + n_rows + 1)
    target = density * n.sum().item()
    k = 2
    while k < n.max() and n.clamp(max=k + 1).sum() <= target:
        k += 1
    counts = n.clamp(max=k)
    extra = int(round(target - counts.sum().item()))
    room = (n > k).nonzero().reshape(-1)
    if extra > 0:
        counts[room[-extra:]] += 1
    return counts


def block_scores(method: str, q, k, block: int, off: int, key_valid=None, generator=None) -> torch.Tensor:
    """Ranking of key blocks for each query block: [B, Hkv, n_qblocks, n_kblocks], larger = keep first.

    ``q`` [B, H, S, d] are the queries at absolute positions off..off+S-1, ``k`` [B, Hkv, T, d]
    all keys; ``key_valid`` [B, T] marks the keys some query may see (padding excluded).
    """
    B, H, S, d = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    lead = off % block
    nq, nk = math.ceil((lead + S) / block), math.ceil(T / block)
    if method == "window":
        return torch.arange(nk, device=q.device, dtype=torch.float32).expand(B, Hkv, nq, nk)
    if method == "random":
        return torch.rand((B, Hkv, nq, nk), generator=generator).to(q.device)
    qs = q.float().reshape(B, Hkv, H // Hkv, S, d).mean(2)  # GQA: the group's mean query
    qsum = F.pad(qs, (0, 0, lead, nq * block - lead - S)).reshape(B, Hkv, nq, block, d).sum(3)
    qn = torch.zeros(nq * block, device=q.device)
    qn[lead : lead + S] = 1
    qmean = qsum / qn.reshape(nq, block).sum(1)[:, None]
    w = torch.ones(B, T, device=k.device) if key_valid is None else key_valid.float()
    w = F.pad(w, (0, nk * block - T)).reshape(B, 1, nk, block, 1)
    ksum = (F.pad(k.float(), (0, 0, 0, nk * block - T)).reshape(B, Hkv, nk, block, d) * w).sum(3)
    kmean = ksum / w.sum(3).clamp(min=1)
    return qmean @ kmean.transpose(-1, -2)


def select_blocks(scores: torch.Tensor, counts: torch.Tensor, first_row: int):
    """Top ``counts[r]`` causal key blocks of query block row r, sink and diagonal forced.

    Returns ``idx`` [B, Hkv, nq, kmax] key block indices (slot 0 is the diagonal block, slot 1 the
    sink) and ``valid`` (which slots are kept: a prefix of each row).
    """
    nq, nk = scores.shape[-2:]
    rows = torch.arange(first_row, first_row + nq, device=scores.device)[:, None]
    cols = torch.arange(nk, device=scores.device)[None, :]
    s = scores.float().masked_fill(cols > rows, NEG)
    s = s.masked_fill(cols == 0, torch.finfo(torch.float32).max).masked_fill(cols == rows, float("inf"))
    kmax = int(counts.max())
    top, idx = s.topk(kmax, dim=-1)
    slot = torch.arange(kmax, device=s.device)
    valid = (slot < counts.to(s.device)[:, None]) & (top > NEG)
    return idx, valid


def _gather_blocks(x, idx, block: int):
    """Key or value blocks ``idx`` [B, Hkv, rows, c] of ``x`` [B, Hkv, T, d] as [B * Hkv, rows, c * block, d]."""
    B, Hkv, T, d = x.shape
    rows, c = idx.shape[2:]
    nk = math.ceil(T / block)
    x = F.pad(x, (0, 0, 0, nk * block - T)).reshape(B * Hkv, nk, block, d)
    bh = torch.arange(B * Hkv, device=x.device)[:, None]
    return x[bh, idx.reshape(B * Hkv, rows * c)].reshape(B * Hkv, rows, c * block, d)


def gather_attention(q, k, v, idx, valid, block: int, off: int, scaling: float, allowed=None) -> torch.Tensor:
    """Attention of each query block over its gathered key blocks only; returns [B, S, H, d].

    ``allowed`` [B, S, T] (bool, causal and padding) or None (plain causal). The query blocks
    of each GQA group are stacked so that one gathered K/V block serves the group's heads;
    4D inputs and additive masks keep SDPA on its fused kernel (5D or bool masks would not).
    """
    B, H, S, d = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G, lead = H // Hkv, off % block
    nq, kmax = idx.shape[2], idx.shape[3]
    qb = F.pad(q, (0, 0, lead, nq * block - lead - S)).reshape(B, Hkv, G, nq, block, d).transpose(2, 3)
    qb = qb.reshape(B * Hkv, nq, G * block, d)
    if allowed is None:
        out = _causal_gather(q, qb, k, v, idx, valid, block, off, scaling)
    else:  # the given mask (causal and padding), gathered tile by tile
        nk = math.ceil(T / block)
        m = F.pad(allowed, (0, nk * block - T, lead, nq * block - lead - S))
        tiles = m.reshape(B, nq, block, nk, block).transpose(2, 3)  # [B, nq, nk, b, b]
        bi = torch.arange(B, device=q.device)[:, None, None, None]
        ri = torch.arange(nq, device=q.device)[None, None, :, None]
        mask = tiles[bi, ri, idx] & valid[..., None, None]  # [B, Hkv, nq, kmax, b, b]
        mask = mask.transpose(3, 4).reshape(B, Hkv, nq, block, kmax * block)
        mask = mask | ~mask.any(-1, keepdim=True)  # a fully masked query row sees its slots (no NaN)
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, NEG)
        bias = bias[:, :, :, None].expand(-1, -1, -1, G, -1, -1).reshape(B * Hkv, nq, G * block, kmax * block)
        out = F.scaled_dot_product_attention(qb, _gather_blocks(k, idx, block), _gather_blocks(v, idx, block),
                                             attn_mask=bias, scale=scaling)
    out = out.reshape(B, Hkv, nq, G, block, d).permute(0, 1, 3, 2, 4, 5).reshape(B, H, nq * block, d)
    return out[:, :, lead : lead + S].transpose(1, 2)


def _causal_gather(q, qb, k, v, idx, valid, block: int, off: int, scaling: float) -> torch.Tensor:
    """No padding: the leading query blocks that keep all their causal blocks run one dense causal
    attention; the others, grouped by how many blocks they keep (k or k+1), attend their gathered
    blocks with one mask shared by all rows (slot 0 is the diagonal block: causal inside it)."""
    B, H, S, d = q.shape
    Hkv, G, first = k.shape[1], H // k.shape[1], off // block
    counts = valid[0, 0].sum(-1)  # the same for every sequence and KV head without padding
    n_causal = torch.arange(first + 1, first + idx.shape[2] + 1, device=counts.device)
    full = int((counts == n_causal).long().cumprod(0).sum())
    out = torch.empty_like(qb)
    tri = torch.ones(block, block, dtype=torch.bool, device=q.device).triu(1)
    r0 = full
    for c, rows in zip(*torch.unique_consecutive(counts[full:], return_counts=True)):
        c, r1 = int(c), r0 + int(rows)
        sel = idx[:, :, r0:r1, :c]
        bias = torch.zeros(G, block, c * block, dtype=q.dtype, device=q.device)
        bias[:, :, :block].masked_fill_(tri, NEG)
        out[:, r0:r1] = F.scaled_dot_product_attention(qb[:, r0:r1], _gather_blocks(k, sel, block),
                                                       _gather_blocks(v, sel, block), scale=scaling,
                                                       attn_mask=bias.reshape(G * block, c * block))
        r0 = r1
    if full:  # queries before position (first + full) * block: dense and causal
        sp = min(S, (first + full) * block - off)
        causal = torch.ones(sp, off + sp, dtype=torch.bool, device=q.device).tril(off)
        dense = F.scaled_dot_product_attention(q[:, :, :sp], k[:, :, : off + sp], v[:, :, : off + sp], attn_mask=causal,
                                               scale=scaling, enable_gqa=G > 1)
        lead = off % block
        dense = F.pad(dense, (0, 0, lead, full * block - lead - sp))
        out[:, :full] = dense.reshape(B, Hkv, G, full, block, d).transpose(2, 3).reshape(B * Hkv, full, G * block, d)
    return out


def flex_block_mask(idx, valid, block: int, off: int, S: int, T: int, G: int, allowed=None):
    """The selection as a ``flex_attention`` BlockMask over the query heads (G per KV head)."""
    from torch.nn.attention.flex_attention import BlockMask

    B, Hkv, nq = idx.shape[:3]
    nk = math.ceil(T / block)
    kv_idx = F.pad(idx, (0, nk - idx.shape[-1])).repeat_interleave(G, 1).int().contiguous()  # kept: a prefix
    kv_num = valid.sum(-1).repeat_interleave(G, 1).int().contiguous()
    keep = torch.zeros(B, Hkv, nq, nk, dtype=torch.bool, device=idx.device).scatter_(-1, idx, valid)
    seen = None if allowed is None else F.pad(allowed, (0, nk * block - T, 0, nq * block - S))

    def mask_mod(b, h, qi, ki):  # exact by itself; the block lists make the kernel skip the other blocks
        ok = keep[b, h // G, qi // block, ki // block]
        return ok & (ki <= qi + off) if seen is None else ok & seen[b, qi, ki]

    return BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(S, T),
                                    compute_q_blocks=False)


_FLEX = None


def flex_block_attention(q, k, v, idx, valid, block: int, off: int, scaling: float, allowed=None) -> torch.Tensor:
    """CUDA: the same selection run by the compiled ``flex_attention`` kernel; returns [B, S, H, d].

    Needs ``off % block == 0`` and ``block % 16 == 0`` (kernel tiles); the caller checks.
    """
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    S, G = q.shape[2], q.shape[1] // k.shape[1]
    bm = flex_block_mask(idx, valid, block, off, S, k.shape[2], G, allowed)
    tile = 64 if block % 64 == 0 else 32 if block % 32 == 0 else 16
    out = _FLEX(q, k, v, block_mask=bm, scale=scaling, enable_gqa=G > 1,
                kernel_options={"BLOCK_M": tile, "BLOCK_N": tile})
    return out.transpose(1, 2)


# --- decode: Quest pages ---------------------------------------------------------------
def page_minmax(k: torch.Tensor, page: int):
    """Per page and channel min and max of ``k`` [B, Hkv, T, d] (last page may be partial)."""
    B, Hkv, T, d = k.shape
    n = math.ceil(T / page)
    pad = n * page - T
    lo = F.pad(k, (0, 0, 0, pad), value=float("inf")).reshape(B, Hkv, n, page, d).amin(3)
    hi = F.pad(k, (0, 0, 0, pad), value=NEG).reshape(B, Hkv, n, page, d).amax(3)
    return lo, hi


def quest_scores(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound of q.k per page, summed over the query heads of each KV head: [B, Hkv, pages]."""
    B, H, _, d = q.shape
    Hkv = lo.shape[1]
    qg = q.float().reshape(B, Hkv, H // Hkv, 1, d)
    return torch.maximum(qg * hi[:, :, None].float(), qg * lo[:, :, None].float()).sum(-1).sum(2)


def page_attention(q, k, v, idx, page: int, scaling: float, allowed=None) -> torch.Tensor:
    """One query token over the gathered pages ``idx`` [B, Hkv, kp]; returns [B, 1, H, d].

    ``allowed`` [B, T] (bool) or None.
    """
    B, H, _, d = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    n, kp = math.ceil(T / page), idx.shape[-1]
    pos = (idx[..., None] * page + torch.arange(page, device=q.device)).reshape(B, Hkv, kp * page)
    mask = pos < T
    if allowed is not None:
        a = F.pad(allowed, (0, n * page - T)).reshape(B, 1, n * page).expand(-1, Hkv, -1)
        mask = mask & a.gather(-1, pos)
    mask = mask | ~mask.any(-1, keepdim=True)
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, NEG)[:, :, None]
    qg = q.reshape(B, Hkv, H // Hkv, d)
    kg, vg = (_gather_blocks(x, idx[:, :, None], page).reshape(B, Hkv, kp * page, d) for x in (k, v))
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=bias, scale=scaling)
    return out.reshape(B, 1, H, d)


# --- the attention module ----------------------------------------------------------------
def _allowed(mask, B: int, S: int, T: int):
    """The 4D mask transformers passes (bool: True = attend; float: additive) as bool [B, S, T]; None stays None."""
    if mask is None:
        return None
    if not torch.is_tensor(mask) or mask.dim() != 4:
        raise ValueError(f"sparse attention needs a 4D attention mask or None (attn_implementation 'sdpa' or "
                         f"'eager'), got {type(mask).__name__} {getattr(mask, 'shape', '')}")
    m = mask[:, 0, -S:, :T]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    return m.expand(B, S, T)


class SparseAttention(nn.Module):
    """A Llama-family attention sublayer whose core attends only to selected blocks (prefill) / pages (decode)."""

    def __init__(self, attn: nn.Module, method: str, density: float, block: int = 64, page: int = 16, seed: int = 0):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"sparse attention method {method!r} is unknown; allowed: {METHODS}")
        check_settings(density, block, page)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.config, self.layer_idx = attn.config, attn.layer_idx
        self.head_dim, self.scaling, self.is_causal = attn.head_dim, attn.scaling, True
        self.num_key_value_groups = self.q_proj.out_features // self.k_proj.out_features
        self.attention_dropout = 0.0
        self.method, self.density, self.block, self.page = method, float(density), block, page
        self.generator = torch.Generator().manual_seed(seed) if method == "random" else None
        self._pages = None  # Quest metadata of the complete pages: (cache ref, n pages, lo, hi, last key)
        self.reset_stats()

    def extra_repr(self) -> str:
        return f"method={self.method}, density={self.density:.4g}, block={self.block}, page={self.page}"

    # counters -------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.kept = {"prefill": 0, "decode": 0}
        self.total = {"prefill": 0, "decode": 0}
        self.estimated = {"prefill": False, "decode": False}
        self.last_phase = None

    def _count(self, phase: str, kept: int, total: int, estimated: bool) -> None:
        self.kept[phase] += kept
        self.total[phase] += total
        self.estimated[phase] |= estimated
        self.last_phase = phase

    def shape_overrides(self) -> dict:
        """Realised density of the phase that ran last since ``reset_stats()`` (dense defaults if none ran)."""
        p = self.last_phase
        if p is None or self.total[p] == 0:
            return {"attn_density": 1.0, "attn_block": 0}
        size = self.block if p == "prefill" else self.page
        return {"attn_density": self.kept[p] / self.total[p], "attn_block": size if self.estimated[p] else 0}

    # forward --------------------------------------------------------------------------
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        B, S, _ = hidden_states.shape
        shape = (B, S, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if S > 1:
            out = self._prefill(q, k, v, attention_mask, kwargs)
        else:
            out = self._decode(q, k, v, attention_mask, past_key_values, kwargs)
        return self.o_proj(out.reshape(B, S, -1)), None

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
            self._count("prefill", n_causal, n_causal, False)
            return self._dense(q, k, v, attention_mask, kwargs)
        allowed = _allowed(attention_mask, B, S, T)
        if allowed is not None and torch.equal(allowed, torch.ones_like(allowed[0]).tril(off).expand(B, S, T)):
            allowed = None  # a plain causal mask (eager attention passes one): take the causal path
        key_valid = None if allowed is None else allowed.any(1)
        scores = block_scores(self.method, q, k, b, off, key_valid, self.generator)
        idx, valid = select_blocks(scores, counts, first)
        self._count("prefill", int(valid.sum()), n_causal, self.method == "block")
        if q.is_cuda and off % b == 0 and b % 16 == 0:
            return flex_block_attention(q, k, v, idx, valid, b, off, self.scaling, allowed)
        return gather_attention(q, k, v, idx, valid, b, off, self.scaling, allowed)

    def _decode(self, q, k, v, attention_mask, cache, kwargs):
        B, Hkv, T = k.shape[:3]
        n = math.ceil(T / self.page)
        kp = min(n, max(2, int(round(self.density * n))))
        if kp == n:
            self._count("decode", T * B * Hkv, T * B * Hkv, False)
            return self._dense(q, k, v, attention_mask, kwargs)
        if self.method == "block":
            scores = quest_scores(q, *self._page_bounds(k, cache))
        elif self.method == "window":
            scores = torch.arange(n, device=q.device, dtype=torch.float32).expand(B, Hkv, n)
        else:
            scores = torch.rand((B, Hkv, n), generator=self.generator).to(q.device)
        scores = scores.clone()
        scores[..., 0] = scores[..., -1] = float("inf")
        idx = scores.topk(kp, dim=-1).indices
        kept = kp * self.page - (n * self.page - T)  # the last (partial) page is always kept
        self._count("decode", kept * B * Hkv, T * B * Hkv, self.method == "block")
        allowed = _allowed(attention_mask, B, 1, T)
        return page_attention(q, k, v, idx, self.page, self.scaling, None if allowed is None else allowed[:, 0])

    def _page_bounds(self, k, cache):
        """Quest min/max per page: stored complete pages reused when still valid, the open page recomputed."""
        p, T = self.page, k.shape[2]
        full = (T - 1) // p  # pages before the one holding the newest token
        m = self._pages
        if (m is not None and cache is not None and m[0]() is cache and m[1] <= full and m[2].shape[:2] == k.shape[:2]
                and (m[1] == 0 or torch.equal(m[4], k[:, :, m[1] * p - 1]))):
            lo_new, hi_new = page_minmax(k[:, :, m[1] * p : full * p], p) if full > m[1] else (m[2][:, :, :0],) * 2
            lo, hi = torch.cat([m[2], lo_new], 2), torch.cat([m[3], hi_new], 2)
        else:
            lo, hi = page_minmax(k[:, :, : full * p], p)
        if cache is not None:
            self._pages = (weakref.ref(cache), full, lo, hi, k[:, :, full * p - 1].clone() if full else None)
        lo_last, hi_last = page_minmax(k[:, :, full * p :], p)
        return torch.cat([lo, lo_last], 2), torch.cat([hi, hi_last], 2)


# --- model level ---------------------------------------------------------------------------
def sparsify(model, method: str, density: float, block: int = 64, page: int = 16, seed: int = 0):
    """A copy of ``model`` whose attention sublayers are :class:`SparseAttention` modules."""
    check_settings(density, block, page)
    new = copy.deepcopy(model)
    a = ModelAdapter(new)
    for i, layer in enumerate(a.layers):
        if a.attn(i) is not None:
            layer.self_attn = SparseAttention(layer.self_attn, method, density, block, page, seed * 1000 + i)
    return new


def sparse_modules(model) -> list[SparseAttention]:
    return [m for m in model.modules() if isinstance(m, SparseAttention)]


def reset_stats(model) -> None:
    for m in sparse_modules(model):
        m.reset_stats()


def realised_sparsity(model) -> float:
    """Fraction of causal blocks (prefill) / KV tokens (decode) skipped since ``reset_stats()``, for the
    phase that ran last; 0 if nothing ran."""
    mods = [m for m in sparse_modules(model) if m.last_phase is not None]
    if not mods:
        return 0.0
    phase = mods[0].last_phase
    total = sum(m.total[phase] for m in mods)
    return 1 - sum(m.kept[phase] for m in mods) / total if total else 0.0


def _prune(model, sparsity: float, ctx, method: str):
    unknown = set(ctx.options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)} for sparse attention; allowed: {OPTIONS}")
    block, page = ctx.options.get("block", 64), ctx.options.get("page", 16)
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity {sparsity!r} is out of range: allowed 0 <= s < 1")
    pruned = sparsify(model, method, 1 - sparsity, block, page, ctx.seed)
    return pruned, {"density": 1 - sparsity, "block": block, "page": page, "layers": len(sparse_modules(pruned)),
                    "unit": "causal (query block, key block) pairs in prefill; KV tokens in decode"}


for _name, _doc in (
    ("block", "pooled mean(Q_block).mean(K_block) per KV head in prefill; Quest page bound of q.k in decode"),
    ("window", "sink + most recent blocks / pages (local-window baseline)"),
    ("random", "random key blocks / pages, seeded, sink and diagonal kept (random baseline)"),
):
    register(f"sparse_attn_{_name}", "dynamic_nk_attention", _doc, needs_calibration=False,
             max_sparsity=lambda model: 0.95, options={"block": int, "page": int})(lambda model, sparsity, ctx, _m=_name: _prune(model, sparsity, ctx, _m))
