"""The GEMM-centric taxonomy: which of M, N, K a method shrinks, statically or dynamically.

Every linear layer is a GEMM ``Y[M,N] = X[M,K] @ W[K,N]`` (see :mod:`prunelib.cost.costmodel`).
A cell names what is removed, the GEMM dimensions that shrink, and the unit its
"sparsity" counts (the fraction of that unit removed). :func:`sparsity_label` says in words
what one sparsity of a cell means, for tables and plots: 2:4 below 0.5 is 2:4 on a
fraction of the layers, low-rank sparsity is the fraction of parameters removed.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cell:
    name: str
    dims: str  # GEMM dims shrunk: some of "M", "N", "K"; "MNK" = the whole GEMM vanishes
    static: bool  # decided once, offline (True) or per input at run time (False)
    unit: str  # what "sparsity" is the removed fraction of
    realised_by: str


CELLS = {c.name: c for c in (
    Cell("static_depth", "MNK", True, "decoder layers (or attention / MLP sublayers)",
         "layer removed from the module list; KV cache shrinks"),
    Cell("dynamic_depth", "M", False, "token-layer pairs", "gather routed tokens, run the sublayer, scatter back"),
    Cell("token_pruning", "M", False, "prompt tokens after the pruning layer", "sequence physically shortened"),
    Cell("static_width", "NK", True, "attention heads and MLP channels",
         "Linear layers sliced: N of the producer, K of the consumer"),
    Cell("static_hidden", "NK", True, "residual-stream width", "smaller hidden size everywhere"),
    Cell("static_k_24", "K", True,
         "projection weights zeroed, at most 0.5: s = 0.5 is 2:4 on every layer; s < 0.5 is 2:4 on a fraction 2s "
         "of the layers, the others dense",
         "semi-structured sparse kernels where the device has them"),
    Cell("static_k_lowrank", "K", True, "parameters of the replaced Linear layers (the fraction removed)",
         "two smaller Linear layers K->r->N"),
    Cell("dynamic_nk_attention", "NK", False, "key/value blocks per query block", "only selected blocks computed"),
)}


def sparsity_label(cell: str, sparsity: float, unit: str | None = None) -> str:
    """What ``sparsity`` of ``cell`` removes, in words short enough for a table cell or a legend; ``unit``:
    the method's own unit where it is finer than its cell's (attention sublayers, token-MLP pairs)."""
    s = float(sparsity)
    if cell == "dense" or s == 0:
        return "dense"
    if cell == "static_k_24":
        if s >= 0.5:
            return f"s={s:g}: 2:4 on every layer"
        return f"s={s:g}: 2:4 on {2 * s:.0%} of the layers"  # round(2 s L) of the L layers
    if cell == "static_k_lowrank":
        return f"s={s:g}: {s:.0%} of the projections' parameters removed"
    unit = (unit or (CELLS[cell].unit if cell in CELLS else "the unit")).split(" (")[0]
    return f"s={s:g}: {s:.0%} of {unit}"
