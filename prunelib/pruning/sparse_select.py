"""Sparse attention's criterion: which key blocks each query block keeps in prefill (pooled scores, window or
seeded random) and which KV pages a decode step keeps (Quest's bound). See :mod:`prunelib.pruning.sparse_attention`."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F



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
