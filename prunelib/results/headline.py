"""The paper's headline, point by point: what our data say about each of its claims (issue 23).

The claims (Beyond FLOPs, the GEMM-centric benchmark): static depth is the best choice at 0-4% quality loss;
in prefill, dynamic depth is the best at 5-16% and static width at 17-26%; and static depth comes closest to
its roofline bound in decode.

A band claim is read from the band answer with probabilities (:func:`prunelib.results.bands.band_table`):
P(cell) is the summed P(best) of the cell's methods. ``agrees`` when P(cell) >= 0.8, ``differs`` when another
cell holds >= 0.8, otherwise ``cannot tell`` (the numbers say how close). The bound claim compares the median
efficiency (measured / bound) of each cell's decode points: ``agrees`` when static depth's is the highest by
more than the widest efficiency CI half-width among the two, ``differs`` when another cell's is higher by more
than that, else ``cannot tell``.
"""
from __future__ import annotations

import pandas as pd

from prunelib.pruning import REGISTRY

CLAIMS = (
    ("static depth is the best at 0-4% loss", "static_depth", "0-4%", ("prefill", "decode")),
    ("dynamic depth is the best at 5-16% loss in prefill", "dynamic_depth", "5-16%", ("prefill",)),
    ("static width is the best at 17-26% loss in prefill", "static_width", "17-26%", ("prefill",)),
)
LEVEL = 0.8


def _cell(method: str) -> str:
    return REGISTRY[method].cell.name if method in REGISTRY else method


def band_claim(table: pd.DataFrame, cell: str, band: str, phase: str) -> dict:
    rows = table[(table.band == band) & (table.phase == phase)]
    if rows.empty:
        return dict(verdict="cannot tell", evidence=f"no {phase} shape measured")
    r = rows.iloc[0]  # the first shape of this phase (the table is sorted by batch and length)
    by_cell: dict = {}
    for m, p in (r.p or {}).items():
        by_cell[_cell(m)] = by_cell.get(_cell(m), 0.0) + p
    mine = by_cell.get(cell, 0.0)
    other, p_other = max(((c, p) for c, p in by_cell.items() if c != cell), key=lambda kv: kv[1], default=(None, 0.0))
    verdict = "agrees" if mine >= LEVEL else "differs" if p_other >= LEVEL else "cannot tell"
    shape = f"B={r.batch} S={r.length} {r.timing_mode}" if "batch" in r else ""
    ev = f"{phase} {shape}: P({cell})={mine:.2f}" + (f", P({other})={p_other:.2f}" if other else "") + \
        f", P(no point in band)={r.p_none:.2f}; answer: {r.answer}"
    return dict(verdict=verdict, evidence=ev)


def bound_claim(pts: pd.DataFrame, cell: str = "static_depth", phase: str = "decode") -> dict:
    d = pts[(pts.phase == phase) & pts.bound.notna() & (pts.bound > 0)]
    if d.empty or cell not in set(d.cell):
        return dict(verdict="cannot tell", evidence=f"no {phase} point of {cell}")
    d = d.assign(eff=d.speedup / d.bound, half=(d.ci_high - d.ci_low) / 2 / d.bound)
    med = d.groupby("cell").eff.median()
    half = d.groupby("cell").half.max()
    others = med.drop(cell)
    if others.empty:
        return dict(verdict="cannot tell", evidence=f"only {cell} has {phase} points")
    best_other = others.idxmax()
    gap, tol = med[cell] - med[best_other], max(half[cell], half[best_other])
    verdict = "agrees" if gap > tol else "differs" if gap < -tol else "cannot tell"
    return dict(verdict=verdict, evidence=f"median efficiency {cell} {med[cell]:.2f}, best other {best_other} "
                                          f"{med[best_other]:.2f} (CI half-width up to {tol:.2f})")


def headline(table: pd.DataFrame, pts: pd.DataFrame) -> pd.DataFrame:
    """One row per claim (and phase): the claim, our verdict and the numbers behind it."""
    rows = []
    for claim, cell, band, phases in CLAIMS:
        for phase in phases:
            rows.append(dict(claim=claim, phase=phase, **band_claim(table, cell, band, phase)))
    rows.append(dict(claim="static depth is closest to its bound in decode", phase="decode", **bound_claim(pts)))
    return pd.DataFrame(rows)
