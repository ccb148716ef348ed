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
:func:`prunelib.servinglm.prompt_lengths` says where each row's prompt ends (lm-eval
scoring through :class:`prunelib.servinglm.ServingHFLM` does). Then the prompt's
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

from ..adapter import ModelAdapter, rope
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


def hash_uniform(seed: int, *coords: torch.Tensor) -> torch.Tensor:
    """Seeded uniform [0, 1) numbers, one per (broadcast) integer coordinate tuple.

    The random baselines draw from this instead of a stateful generator, so a choice depends
    on where it is made (layer seed, head, position, block), not on how many forwards ran
    before: a full forward and prefill + decode draw the same numbers.
    """
    m = 2**31 - 1  # Lehmer (minstd) steps: every product stays below 2**62
    x = torch.tensor(seed % m + 1, dtype=torch.int64)
    for c in coords:
        x = (x * 48271 + c.long() % m) % m
        x = (x * 48271) % m
        x = (x * 48271) % m
    return (x.float() / m).clamp(max=1 - 2**-24)


def block_scores(method: str, q, k, block: int, off: int, key_valid=None, seed: int = 0) -> torch.Tensor:
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
        ar = lambda n, first=0: torch.arange(first, first + n, device=q.device)  # noqa: E731
        return hash_uniform(seed, ar(Hkv)[:, None, None], ar(nq, off // block)[:, None], ar(nk)).expand(B, Hkv, nq, nk)
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
    """No padding: query blocks grouped by how many key blocks they keep attend their gathered blocks,
    one SDPA call per group with one mask shared by its rows (slot 0 is the diagonal block: causal
    inside it). Every kept (query block, key block) tile is computed whole, nothing else: the cost
    model counts exactly these tiles."""
    B, H, S, d = q.shape
    G = H // k.shape[1]
    counts = valid[0, 0].sum(-1).tolist()  # the same for every sequence and KV head without padding
    out = torch.empty_like(qb)
    tri = torch.ones(block, block, dtype=torch.bool, device=q.device).triu(1)
    r0 = 0
    while r0 < len(counts):
        c, r1 = counts[r0], r0 + 1
        while r1 < len(counts) and counts[r1] == c:
            r1 += 1
        sel = idx[:, :, r0:r1, :c]
        bias = torch.zeros(G, block, c * block, dtype=q.dtype, device=q.device)
        bias[:, :, :block].masked_fill_(tri, NEG)
        out[:, r0:r1] = F.scaled_dot_product_attention(qb[:, r0:r1], _gather_blocks(k, sel, block),
                                                       _gather_blocks(v, sel, block), scale=scaling,
                                                       attn_mask=bias.reshape(G * block, c * block))
        r0 = r1
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
    """Quest's upper bound of q.k per page, summed over the query heads of each KV head: [B, Hkv, pages].

    sum_i max(q_i hi_i, q_i lo_i) = q+ . hi + q- . lo (q+ / q- the positive / negative parts of q):
    two small GEMMs per KV head, [G, d] x [d, pages].
    """
    return _bound(q, lo, hi)[:, :, 0]


def _bound(q, lo, hi) -> torch.Tensor:
    """q [B, H, Sq, d] against page bounds lo/hi [B, Hkv, pages, d]: [B, Hkv, Sq, pages] (summed over the group)."""
    B, H, Sq, d = q.shape
    Hkv = lo.shape[1]
    qg = q.float().reshape(B, Hkv, H // Hkv * Sq, d)
    s = qg.clamp(min=0) @ hi.float().transpose(-1, -2) + qg.clamp(max=0) @ lo.float().transpose(-1, -2)
    return s.reshape(B, Hkv, H // Hkv, Sq, -1).sum(2)


def _open_bound(q, lo, hi) -> torch.Tensor:
    """q [B, H, Sq, d] against one bound per query lo/hi [B, Hkv, Sq, d] (its open page): [B, Hkv, Sq]."""
    B, H, Sq, d = q.shape
    Hkv = lo.shape[1]
    qg = q.float().reshape(B, Hkv, H // Hkv, Sq, d)
    return (qg.clamp(min=0) * hi[:, :, None].float() + qg.clamp(max=0) * lo[:, :, None].float()).sum(-1).sum(2)


def pages_kept(n, density: float):
    """Pages read by a query that sees ``n`` pages (int or tensor): round(density n), at least 2 (first and
    current), at most n."""
    if isinstance(n, int):
        return min(n, max(2, round(density * n)))
    return torch.minimum(n, (density * n.double()).round().long().clamp(min=2))


def choose_pages(method: str, q, k, first: int, page: int, density: float, seed: int = 0, complete=None):
    """Quest's page choice for the queries ``q`` [B, H, Sq, d] at positions first..first+Sq-1 over ``k`` [B, Hkv, T, d].

    A query at position p sees pages 0..p // page, the last one open (keys up to p only).
    ``complete``: (lo, hi) of the pages before the last query's open page (the decode step's
    incremental metadata), else computed from ``k``. Returns ``keep`` [B, Hkv, Sq, pages]
    (bool; the first and the current page always kept) and ``top`` [B, Hkv, Sq, k] the page indices
    in rank order (a query keeps its first ``pages_kept`` of them).
    Positions come from shapes, never from device values: no host-device sync.
    """
    B, Hkv, T, d = k.shape
    Sq, dev = q.shape[2], k.device
    last_page = (first + Sq - 1) // page
    pos = torch.arange(first, first + Sq, device=dev)
    cur = pos // page  # each query's open page
    cols = torch.arange(last_page + 1, device=dev)
    if method == "block":
        lo, hi = page_minmax(k[:, :, : last_page * page], page) if complete is None else complete
        scores = F.pad(_bound(q, lo, hi), (0, 1))  # [B, Hkv, Sq, pages]; the open page's column set below
        if Sq == 1:  # the decode step: its open page is the cache's last, keys last_page * page .. T - 1
            tail = k[:, :, last_page * page : first + 1]
            open_lo, open_hi = tail.amin(2, keepdim=True), tail.amax(2, keepdim=True)
        else:  # running min / max inside each page: the open page as each query sees it
            kp = F.pad(k[:, :, : first + Sq], (0, 0, 0, (last_page + 1) * page - first - Sq)).reshape(B, Hkv, -1, page, d)
            open_lo = kp.cummin(3).values.reshape(B, Hkv, -1, d)[:, :, first : first + Sq]
            open_hi = kp.cummax(3).values.reshape(B, Hkv, -1, d)[:, :, first : first + Sq]
        scores = torch.where(cols == cur[:, None], _open_bound(q, open_lo, open_hi)[..., None], scores)
    elif method == "window":
        scores = cols.float().expand(B, Hkv, Sq, last_page + 1)
    else:
        h = torch.arange(Hkv, device=dev)
        scores = hash_uniform(seed, h[:, None, None], pos[:, None], cols).expand(B, Hkv, Sq, last_page + 1)
    forced = (cols == 0) | (cols == cur[:, None])
    scores = scores.masked_fill(forced, float("inf")).masked_fill(cols > cur[:, None], NEG)
    kmax = pages_kept(last_page + 1, density)
    top = scores.topk(kmax, dim=-1).indices
    slot_ok = torch.arange(kmax, device=dev) < pages_kept(cur + 1, density)[:, None]
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=dev).scatter_(-1, top, slot_ok.expand_as(top))
    return keep, top


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
        """Where each row's prompt ends in the next forwards (:func:`prunelib.servinglm.prompt_lengths`)."""
        self.prompt_lengths = lengths

    # counters -------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.kept = {"prefill": 0, "decode": 0}
        self.total = {"prefill": 0, "decode": 0}
        self.estimated = {"prefill": False, "decode": False}
        self.tiled = {"prefill": False, "decode": False}
        self.last_phase = None

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
            return self._dense(q, k, v, attention_mask, kwargs)
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
            if p:
                m = None if mask is None else mask[rows, :, :p, : off + p]
                out[rows, :p] = self._prefill(q[rows, :, :p], k[rows, :, : off + p], v[rows, :, : off + p], m, kwargs)
            if p < r:
                m = None if mask is None else mask[rows, :, p:r, : off + r]
                out[rows, p:r] = self._decode_all(q[rows, :, p:r], k[rows, :, : off + r], v[rows, :, : off + r],
                                                  off + p, m)
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


def _attn(method: str):
    return lambda model, sparsity, ctx: _prune(model, sparsity, ctx, method)


_SA = dict(needs_calibration=False, max_sparsity=lambda model: 0.95, options={"block": int, "page": int})
register("sparse_attn_block", "dynamic_nk_attention",
         "pooled mean(Q_block).mean(K_block) per KV head in prefill; Quest page bound of q.k in decode",
         baseline="sparse_attn_random", **_SA)(_attn("block"))
register("sparse_attn_window", "dynamic_nk_attention", "sink + most recent blocks / pages (local-window baseline)",
         baseline="sparse_attn_random", **_SA)(_attn("window"))
register("sparse_attn_random", "dynamic_nk_attention",
         "random key blocks / pages, seeded, sink and diagonal kept (random baseline)", baseline=None, **_SA)(
    _attn("random"))
