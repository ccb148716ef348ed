"""Curves, not points: each method's speedup against quality loss across its ladder, and the frontier as the upper
envelope of every curve (issue 23).

- :func:`isotonic`: the pool-adjacent-violators fit of a non-decreasing sequence (weighted least squares).
- :func:`method_curve`: one method at one shape: its measured rungs sorted by loss, dense (0 loss, 1.0x) first,
  the rungs' speedup and both CI bounds fitted non-decreasing in loss (pruning more of the same method never makes
  it slower in expectation; a dip between rungs is noise, and the fit pools it). Dense is the curve's fixed start,
  not a point of the fit: a method can be slower than dense at every rung (a router's overhead), and pooling
  dense with such a rung would move dense off 1.0 and the rung towards it.
- :func:`speedup_at`: the curve read at a loss L, with its CI: measured where L is a rung's loss, linearly
  interpolated between the two rungs around it (``interpolated=True``), the last rung beyond the curve's end
  (``beyond=True``: reachable at loss <= L, not more).
- :func:`envelope`: the best speedup reachable at loss <= L over every point (dense included): a staircase that
  steps up at each point that beats all points of smaller loss.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from prunelib.results.pareto import SHAPE

CURVE_KEY = ["method", "options"]


def isotonic(y, w=None) -> np.ndarray:
    """The non-decreasing sequence closest to ``y`` in weighted least squares (pool adjacent violators)."""
    y = np.asarray(y, float)
    w = np.ones_like(y) if w is None else np.asarray(w, float)
    blocks = []  # [mean, weight, count]
    for yi, wi in zip(y, w):
        blocks.append([yi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.concatenate([[m] * n for m, _, n in blocks]) if blocks else y


def method_curve(pts: pd.DataFrame) -> pd.DataFrame:
    """One method's rungs at one shape (rows of :func:`prunelib.results.pareto.points`), sorted by loss, dense
    first, with ``fit``/``fit_low``/``fit_high``: the rungs' speedup and its CI bounds made non-decreasing in loss
    (dense stays 1.0; between it and the first rung a reading is interpolated). Seeds of one sparsity are averaged
    first (a random baseline's draws are one rung)."""
    g = (pts.groupby("sparsity", as_index=False)
         .agg(loss=("loss", "mean"), loss_low=("loss_low", "mean"), loss_high=("loss_high", "mean"),
              speedup=("speedup", "mean"), ci_low=("ci_low", "mean"), ci_high=("ci_high", "mean"),
              bound=("bound", "mean"), seeds=("speedup", "size")))
    dense = pd.DataFrame([dict(sparsity=0.0, loss=0.0, loss_low=0.0, loss_high=0.0, speedup=1.0, ci_low=1.0,
                               ci_high=1.0, bound=1.0, seeds=0)])
    rungs = g[g.sparsity > 0].sort_values(["loss", "sparsity"], ignore_index=True)
    for col, src in (("fit", "speedup"), ("fit_low", "ci_low"), ("fit_high", "ci_high")):
        rungs[col] = isotonic(rungs[src])
        dense[col] = 1.0
    c = pd.concat([dense, rungs], ignore_index=True).sort_values(["loss", "sparsity"], ignore_index=True)
    c["measured"] = c.sparsity > 0
    return c


def curves(pts: pd.DataFrame) -> dict:
    """Every (shape, method, options) curve of ``pts``: ``{(phase, batch, length, device, timing_mode, method,
    options): curve}``."""
    out = {}
    shape = [c for c in SHAPE if c in pts]
    keys = shape + [c for c in CURVE_KEY if c in pts]
    for key, g in pts.groupby(keys, dropna=False):
        out[key] = method_curve(g)
    return out


def speedup_at(curve: pd.DataFrame, loss: float) -> dict:
    """The curve at quality loss ``loss`` (%): speedup with its CI, whether it was interpolated between rungs, and
    whether ``loss`` lies beyond the curve's last rung (then the last rung: the most the method reaches there)."""
    x = curve.loss.to_numpy()
    cols = ("fit", "fit_low", "fit_high")
    if loss >= x[-1]:
        r = curve.iloc[-1]
        return dict(speedup=r.fit, ci_low=r.fit_low, ci_high=r.fit_high, interpolated=False,
                    beyond=bool(loss > x[-1]), sparsity=r.sparsity)
    if loss <= x[0]:
        r = curve.iloc[0]
        return dict(speedup=r.fit, ci_low=r.fit_low, ci_high=r.fit_high, interpolated=False, beyond=False,
                    sparsity=r.sparsity)
    j = int(np.searchsorted(x, loss, side="right"))  # x[j-1] <= loss < x[j]
    a, b = curve.iloc[j - 1], curve.iloc[j]
    if loss == a.loss:
        return dict(speedup=a.fit, ci_low=a.fit_low, ci_high=a.fit_high, interpolated=False, beyond=False,
                    sparsity=a.sparsity)
    t = (loss - a.loss) / (b.loss - a.loss)
    v = {c: float(a[c] + t * (b[c] - a[c])) for c in cols}
    return dict(speedup=v["fit"], ci_low=v["fit_low"], ci_high=v["fit_high"], interpolated=True, beyond=False,
                sparsity=float(a.sparsity + t * (b.sparsity - a.sparsity)))


def read_at(pts: pd.DataFrame, losses=(2.0, 10.0, 20.0)) -> pd.DataFrame:
    """Every method's speedup at each loss in ``losses`` (%), per shape, with its CI and how it was read."""
    rows = []
    shape = [c for c in SHAPE if c in pts]
    for key, c in curves(pts).items():
        k = dict(zip(shape + [c for c in CURVE_KEY if c in pts], key))
        for L in losses:
            rows.append(dict(k, loss=L, **speedup_at(c, L)))
    return pd.DataFrame(rows)


def envelope(pts: pd.DataFrame) -> pd.DataFrame:
    """The staircase frontier of one shape: the best speedup reachable at loss <= L, as the points where it steps
    up (dense first). Each step names the point that reaches it."""
    rows = [dict(method="dense", sparsity=0.0, loss=0.0, speedup=1.0, ci_low=1.0, ci_high=1.0)]
    cols = ["method", "sparsity", "loss", "speedup", "ci_low", "ci_high"]
    for r in pts.sort_values(["loss", "speedup"], ascending=[True, False])[cols].to_dict("records"):
        if r["speedup"] > rows[-1]["speedup"]:
            rows.append(r)
    return pd.DataFrame(rows, columns=cols)


def staircase_xy(env: pd.DataFrame, x_max: float) -> tuple[list, list]:
    """The envelope's line for plotting: horizontal to each next step's loss, then up, and on to ``x_max``."""
    xs, ys = [], []
    for i, r in enumerate(env.itertuples()):
        if i:
            xs.append(r.loss)
            ys.append(ys[-1])
        xs.append(r.loss)
        ys.append(r.speedup)
    xs.append(max(x_max, xs[-1]))
    ys.append(ys[-1])
    return xs, ys


__all__ = ["isotonic", "method_curve", "curves", "speedup_at", "read_at", "envelope", "staircase_xy"]
