"""Pruning: physical model surgery (``surgery``), the method registry, and the methods.

Importing this package registers every method: ``prunelib.pruning.prune(model, "shortgpt", 0.25, calibration=...)``.
"""
from . import (  # noqa: F401  (importing registers the methods)
    depth,
    dynamic_depth,
    lowrank,
    semistructured,
    slicegpt,
    sparse_attention,
    token_pruning,
    width,
)
from .registry import REGISTRY, Report, get, methods, prune  # noqa: F401
