"""Sparse attention's kernels: attention over the gathered key blocks / pages only (and, on CUDA, a
``flex_attention`` BlockMask from the same selection). See :mod:`prunelib.pruning.sparse_attention`."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


from prunelib.pruning.sparse_select import NEG


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
