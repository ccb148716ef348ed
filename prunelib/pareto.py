"""The acceleration-quality frontier, read from the results store (never re-measured).

A point is one (model, method, sparsity) at one phase/batch/length/device: its measured
speedup (with CI), roofline bound, and quality loss (with CI). Point q beats point p when
q loses no more quality and is *significantly* faster: q's speedup CI lies wholly above
p's. A point whose CI overlaps a faster one is therefore not beaten: the frontier keeps
every point that no other point beats.
"""
from __future__ import annotations

import pandas as pd

PAPER_BANDS = ((0, 4), (5, 16), (17, 26))
FINE_BANDS = ((0, 2), (2, 5), (5, 10), (10, 16), (16, 26), (26, 50))


def points(df: pd.DataFrame) -> pd.DataFrame:
    """Speedup rows joined to the quality loss of the same (model, method, sparsity); dense adds (0, 1)."""
    if df.empty:
        return pd.DataFrame(columns=["model", "method", "cell", "sparsity", "phase", "batch", "length", "device",
                                     "speedup", "ci_low", "ci_high", "bound", "loss", "loss_low", "loss_high"])
    sp = df[df.metric == "speedup"].drop_duplicates(
        ["model", "method", "sparsity", "phase", "batch", "length", "device"], keep="last")
    loss = df[df.metric == "quality_loss_pct"].drop_duplicates(["model", "method", "sparsity"], keep="last")
    loss = loss[["model", "method", "sparsity", "value", "ci_low", "ci_high"]].rename(
        columns={"value": "loss", "ci_low": "loss_low", "ci_high": "loss_high"})
    pts = sp.rename(columns={"value": "speedup"}).merge(loss, on=["model", "method", "sparsity"], how="inner")
    pts = pts.astype({"batch": int, "length": int})  # stored beside quality rows, which have none: NaN made them floats
    cols = ["model", "method", "cell", "sparsity", "phase", "batch", "length", "device", "speedup", "ci_low",
            "ci_high", "bound", "loss", "loss_low", "loss_high"]
    return pts[cols].reset_index(drop=True)


def beats(q, p) -> bool:
    """q loses no more quality than p and its speedup CI lies wholly above p's."""
    return q["loss"] <= p["loss"] and q["ci_low"] > p["ci_high"]


def frontier(pts: pd.DataFrame) -> pd.DataFrame:
    """The points that no other point (of the same phase, batch, length, device) beats, by loss."""
    keep = []
    for _, group in pts.groupby(["phase", "batch", "length", "device"]):
        rows = group.to_dict("records")
        for idx, p in zip(group.index, rows):
            if not any(beats(q, p) for q in rows if q is not p):
                keep.append(idx)
    return pts.loc[keep].sort_values(["phase", "batch", "length", "loss"])


def best_per_band(pts: pd.DataFrame, bands=PAPER_BANDS) -> pd.DataFrame:
    """Per phase/batch/length and quality-loss band [lo, hi] (percent): the fastest method measured there."""
    out = []
    for key, group in pts.groupby(["phase", "batch", "length"]):
        for lo, hi in bands:
            inband = group[(group.loss >= lo) & (group.loss <= hi)]
            row = dict(zip(["phase", "batch", "length"], key), band=f"{lo}-{hi}%")
            if len(inband):
                best = inband.loc[inband.speedup.idxmax()]
                row.update(method=best.method, cell=best.cell, sparsity=best.sparsity, speedup=best.speedup,
                           ci=f"[{best.ci_low:.2f}, {best.ci_high:.2f}]", loss=best.loss)
            else:
                row.update(method="(none measured)")
            out.append(row)
    return pd.DataFrame(out)
