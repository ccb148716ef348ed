"""The GEMM-centric taxonomy: which of M, N, K a method shrinks, statically or dynamically.

Every linear layer is a GEMM ``Y[M,N] = X[M,K] @ W[K,N]`` (see :mod:`prunelib.costmodel`).
A cell names what is removed, the GEMM dimensions that shrink, and the unit its
"sparsity" counts (the fraction of that unit removed).
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
    Cell("static_k_24", "K", True, "weights (2 of every 4 along K)", "semi-structured sparse kernels where the device has them"),
    Cell("static_k_lowrank", "K", True, "parameters of the replaced Linear layers", "two smaller Linear layers K->r->N"),
    Cell("dynamic_nk_attention", "NK", False, "key/value blocks per query block", "only selected blocks computed"),
)}
