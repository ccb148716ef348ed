"""Sparsity ladders: the rungs a method is measured at, in the method's own unit (issue 23).

A method declares its ladder where it registers (``register(..., ladder=...)``); a ladder is a function of the
model that gives candidate sparsities, and :func:`prunelib.pruning.registry.rungs` keeps those within the
method's range, distinct and sorted. ``--sparsities ladder`` (or ``sparsities: ladder`` in a spec) expands to
them; explicit values still work.

- :func:`whole`: every whole count of a unit the model has (layers, sublayers): k / n for k = 1, 2, ...,
  optionally scaled (2:4 turns k of L layers into sparsity k / 2L).
- :func:`grid`: k * step (target rates, keep ratios, densities, ranks).
- :func:`fine_then_grid`: finer steps below the grid's first rung (dynamic depth's target rates: 1% steps to 5%).
- :func:`snapped`: a grid whose rungs are rounded to whole multiples of the structure the method removes
  (64 MLP channels, 8 hidden dimensions), so two rungs never prune the same model.
"""
from __future__ import annotations

import math
from typing import Callable

Ladder = Callable[[object], list]


def _config(model):
    return getattr(model, "config", model)


def whole(count: Callable[[object], int], scale: float = 1.0) -> Ladder:
    """k / n (times ``scale``) for k = 1..n, n = ``count(model)``."""
    def ladder(model) -> list[float]:
        n = int(count(model))
        return [scale * k / n for k in range(1, n + 1)]
    return ladder


def grid(step: float) -> Ladder:
    """k * step for k = 1, 2, ... below 1."""
    if not 0 < step < 1:
        raise ValueError(f"step={step!r} is not allowed: expected 0 < step < 1")
    return lambda model: [round(k * step, 10) for k in range(1, math.ceil(1 / step))]


def fine_then_grid(fine: float, step: float) -> Ladder:
    """k * ``fine`` below ``step``, then the grid of ``step``: a finer start where a method's loss climbs steeply
    (dynamic depth on the embedded model loses 20.9% at 5% of token-layers skipped, so the 0-4% and 5-16% bands
    lie between its first two rungs of 5%)."""
    if not 0 < fine < step:
        raise ValueError(f"fine={fine!r} is not allowed: expected 0 < fine < step={step!r}")
    base = grid(step)
    return lambda model: [round(k * fine, 10) for k in range(1, math.ceil(step / fine))] + base(model)


def snapped(step: float, quantum: Callable[[object], float]) -> Ladder:
    """The grid of ``step``, each rung rounded to the nearest multiple of ``quantum(model)`` (a fraction of the unit:
    e.g. 64 channels of an MLP of 1536 is 1/24); duplicates after rounding collapse into one rung."""
    base = grid(step)

    def ladder(model) -> list[float]:
        q = float(quantum(model))
        return sorted({round(s / q) * q for s in base(model)} - {0.0})
    return ladder


def layers(model) -> int:
    return int(_config(model).num_hidden_layers)


def mlp_quantum(channels: int = 64) -> Callable[[object], float]:
    """``channels`` MLP channels as a fraction of the MLP width."""
    return lambda model: min(1.0, channels / int(_config(model).intermediate_size))


def hidden_quantum(dims: int = 8) -> Callable[[object], float]:
    """``dims`` residual dimensions as a fraction of the hidden size."""
    return lambda model: min(1.0, dims / int(_config(model).hidden_size))
