"""The acceleration-quality frontier, read from the results store (never re-measured).

A point is one pruned model, keyed by (model, method, sparsity, seed, options), at one
phase/batch/length/device/timing mode: its measured speedup with its 95% CI, its roofline
bound, its memory relative to dense (weights, and peak while timing, where stored), and
its quality cost with its 95% CI on the x-axis. The x-axis is either the
quick-suite accuracy loss in percent (``x="loss"``, the paper's bands) or a fidelity
measure on held-out text of one domain (``x="kl"``: mean per-token KL divergence from the
dense model; ``x="dnll"``: the change of the mean NLL).

:func:`join` is the one speed-to-quality join: a speed row meets the quality row of the
same key, so a rerun at another seed (``--seed 1``) or with other options never lends its
loss to a model it did not score. ``experiment.summary`` and :func:`points` both use it.

Point q *beats* point p when q is no worse than p on both axes (speedup and quality
cost, point estimates) and *significantly* better on at least one: its speedup CI lies
wholly above p's, or its quality-cost CI lies wholly below p's. A point that only looks
better (overlapping CIs on both axes) beats nothing, so ties stay on the frontier; the
frontier keeps every point that no other point beats, nor the dense model itself (1.0x at
zero loss, judged by the CIs: see :func:`beats`), and the dense point itself is on it.
"""
from __future__ import annotations

import json
import math

import pandas as pd

from prunelib.core.store import COLUMNS as STORE_COLUMNS
from prunelib.cost.taxonomy import sparsity_label

PAPER_BANDS = ((0, 4), (5, 16), (17, 26))
FINE_BANDS = ((0, 2), (2, 5), (5, 10), (10, 16), (16, 26), (26, 50))
KEY = ["model", "method", "sparsity", "seed", "options"]
SHAPE = ["phase", "batch", "length", "device", "timing_mode"]
DOMAINS = ("ptb", "wikitext2", "ptb-long")  # held-out text of the fidelity rows (ptb-long: 1536 prefilled, 512 scored)
X_METRICS = {"loss": "quality_loss_pct", "kl": "fidelity_kl", "dnll": "fidelity_dnll"}
X_LABELS = {"quality_loss_pct": "quality loss (%): mean relative drop of the chosen accuracies vs dense",
            "fidelity_kl": "KL(dense || pruned), nats per token, held-out {domain} text",
            "fidelity_dnll": "NLL increase over dense, nats per token, held-out {domain} text"}
COLUMNS = KEY + ["cell", "label", *SHAPE, "speedup", "ci_low", "ci_high", "bound", "loss", "loss_low", "loss_high",
                 "loss_stderr", "ci_method", "x_metric", "domain", "weight_ratio", "mem_ratio", "active_share", "inactive"]
#: a quality row whose rule shaped fewer than this share of its scored positions is flagged and left out of bands
ACTIVE_MIN = 0.5


def inactive(extra) -> bool:
    """Whether a quality row's ``extra`` says the method's rule shaped fewer than :data:`ACTIVE_MIN` of the
    scored tokens (``active_share_scoring``; a static method stores none and is never inactive)."""
    share = extra.get("active_share_scoring") if isinstance(extra, dict) else None
    return share is not None and share < ACTIVE_MIN


def x_label(pts: pd.DataFrame) -> str:
    """The x-axis title of a frame from :func:`points`."""
    if not len(pts):
        return X_LABELS["quality_loss_pct"]
    return X_LABELS[pts.x_metric.iloc[0]].format(domain=pts.domain.iloc[0])


def options_key(extra) -> str:
    """A row's prune options (``extra.options``) as canonical JSON, ``"{}"`` when it has none."""
    return json.dumps((extra or {}).get("options") or {}, sort_keys=True, default=str)


def _keyed(rows: pd.DataFrame, seed_of) -> pd.DataFrame:
    """``rows`` with the key columns made explicit: seed (read by ``seed_of(extra)``) and options (canonical JSON)."""
    rows = rows.copy()
    extras = [e if isinstance(e, dict) else {} for e in rows.get("extra", pd.Series([{}] * len(rows), index=rows.index))]
    rows["seed"] = [int(seed_of(e)) for e in extras]
    rows["options"] = [options_key(e) for e in extras]
    rows["extra"] = extras
    for col in STORE_COLUMNS:  # frames built by hand may leave some out
        if col not in rows:
            rows[col] = None
    rows["model"] = rows.model.fillna("")
    return rows


def speed(df: pd.DataFrame) -> pd.DataFrame:
    """The speedup rows, the latest per key and shape, with seed (of the calibration), options and timing mode."""
    sp = _keyed(df[df.metric == "speedup"], lambda e: (e.get("calibration") or {}).get("seed", 0))
    sp["timing_mode"] = [e.get("timing_mode", "eager") for e in sp.extra]
    for col, key in (("weight_ratio", "weight_bytes"), ("mem_ratio", "mem_peak_bytes")):  # pruned / dense, if stored
        sp[col] = [e[key] / e[f"{key}_dense"] if e.get(key) and e.get(f"{key}_dense") else float("nan")
                   for e in sp.extra]
    sp = sp.drop_duplicates(KEY + SHAPE, keep="last")
    return sp.astype({"batch": int, "length": int}) if len(sp) else sp


def quality(df: pd.DataFrame, x: str = "loss", domain: str = "ptb") -> pd.DataFrame:
    """The quality-axis rows (``x``: loss, kl or dnll; fidelity on ``domain``), the latest per key."""
    if x not in X_METRICS:
        raise ValueError(f"x={x!r} is not a quality axis; allowed: {sorted(X_METRICS)}")
    if domain not in DOMAINS:
        raise ValueError(f"domain={domain!r} is not a fidelity domain; allowed: {list(DOMAINS)}")
    q = df[df.metric == X_METRICS[x]]
    if x != "loss":
        q = q[[isinstance(e, dict) and e.get("domain") == domain for e in q.extra]]
    q = _keyed(q, lambda e: e.get("seed", 0)).drop_duplicates(KEY, keep="last")
    q["loss_stderr"] = [e.get("stderr") for e in q.extra]
    q["ci_method"] = [e.get("ci_method", "unpaired" if x == "loss" else "paired_bootstrap") for e in q.extra]
    q["active_share"] = [e.get("active_share_scoring") for e in q.extra]
    # a loss scored where the method's rule barely ran does not measure the rule: flagged, and left out of bands
    q["inactive"] = [inactive(e) for e in q.extra]
    return q


def join(df: pd.DataFrame, x: str = "loss", domain: str = "ptb", how: str = "inner") -> pd.DataFrame:
    """Every speedup row beside the quality row of the same (model, method, sparsity, seed, options).

    ``how="outer"`` also keeps the speed rows no quality row matches and the quality rows
    of models that were never timed (their speed columns are NaN). The quality axis comes
    as ``loss``, ``loss_low``/``loss_high`` (its 95% CI), ``loss_stderr`` (unpaired se, where
    stored) and ``ci_method``, whatever ``x`` is; ``x_metric`` names the stored metric and
    ``domain`` the fidelity text ("" for the accuracy loss).
    """
    empty = pd.DataFrame(columns=COLUMNS)
    if df.empty or "metric" not in df:
        return empty
    sp = speed(df).rename(columns={"value": "speedup"})
    q = quality(df, x, domain).rename(columns={"value": "loss", "ci_low": "loss_low", "ci_high": "loss_high"})
    q = q[KEY + ["cell", "loss", "loss_low", "loss_high", "loss_stderr", "ci_method", "active_share", "inactive"]]
    out = sp.drop(columns=[c for c in ("loss_stderr", "ci_method", "active_share", "inactive") if c in sp]).merge(
        q, on=KEY, how=how, suffixes=("", "_quality"))
    if out.empty:
        return empty
    out["cell"] = out.cell.fillna(out.pop("cell_quality"))
    out["x_metric"], out["domain"] = X_METRICS[x], domain if x != "loss" else ""
    from prunelib.pruning import REGISTRY

    units = [REGISTRY[m].unit if m in REGISTRY else None for m in out.method]
    out["label"] = [sparsity_label(c, s, u) for c, s, u in zip(out.cell, out.sparsity, units)]
    for col in COLUMNS:
        if col not in out:
            out[col] = None
    return out


def points(df: pd.DataFrame, x: str = "loss", domain: str = "ptb") -> pd.DataFrame:
    """The timed models that have a quality measure: one row per key and shape (see :func:`join`)."""
    return join(df, x, domain)[COLUMNS].reset_index(drop=True)


def beats(q, p) -> bool:
    """q is no worse than p on both axes and significantly better on one (its CI separates from p's).

    Against the dense model (q is :data:`DENSE`) the CIs decide, never a point estimate against 1.0 or 0:
    dense beats p unless p is significantly faster than dense or significantly better on quality, when p is
    significantly slower or significantly worse (so 0.99x and 1.01x with the same CI fare alike, and a point
    significantly slower than dense leaves even when its loss estimate is negative).
    """
    if q is DENSE or q.get("method") == "dense":
        p_faster, p_better = p["ci_low"] > 1, p["loss_high"] < 0
        return bool(not p_faster and not p_better and (p["ci_high"] < 1 or p["loss_low"] > 0))
    no_worse = q["speedup"] >= p["speedup"] and q["loss"] <= p["loss"]
    return bool(no_worse and (q["ci_low"] > p["ci_high"] or q["loss_high"] < p["loss_low"]))


DENSE = {"method": "dense", "sparsity": 0.0, "cell": "dense", "label": "dense", "speedup": 1.0, "ci_low": 1.0,
         "ci_high": 1.0, "bound": 1.0, "loss": 0.0, "loss_low": 0.0, "loss_high": 0.0}


def vs_dense(p) -> str:
    """'faster' or 'slower' than the dense model where the speedup CI excludes 1.0, else 'tie'."""
    return "faster" if p["ci_low"] > 1 else "slower" if p["ci_high"] < 1 else "tie"


def frontier(pts: pd.DataFrame, dense: bool = True) -> pd.DataFrame:
    """The points that neither another point (of the same phase, batch, length, device, timing mode) nor the
    dense model beats, by loss; with ``dense``, each shape's dense point (1.0x at zero loss, ``method="dense"``)
    is a row of its frontier too: not pruning is always on it."""
    keep, rows_dense = [], []
    shape = [c for c in SHAPE if c in pts]
    for key, group in pts.groupby(shape, dropna=False):
        rows = group.to_dict("records")
        for idx, p in zip(group.index, rows):
            if not any(beats(q, p) for q in rows + [DENSE] if q is not p):
                keep.append(idx)
        rows_dense.append(dict(zip(shape, key if isinstance(key, tuple) else (key,))) | DENSE)
    out = pts.loc[keep]
    if dense and rows_dense:
        extra = pd.DataFrame(rows_dense, index=[f"dense:{i}" for i in range(len(rows_dense))])
        out = pd.concat([out, extra.reindex(columns=out.columns)]) if len(out) else extra.reindex(columns=pts.columns)
    return out.sort_values(["phase", "batch", "length", "loss"]) if len(out) else out


def _name(r) -> str:
    return f"{r.method} s={r.sparsity:g}"


def band_edges(bands) -> list[tuple[float, float]]:
    """Each band's ``[start, stop)`` in loss %: bands are named in whole percents (the paper's 0-4, 5-16, 17-26), so
    band [lo, hi] holds the losses with lo <= loss < hi + 1, up to where the next band starts (16.3% is in 5-16,
    not in the gap before 17); the first starts at -inf (a pruned model that scores above dense lost nothing)."""
    bands = [(float(lo), float(hi)) for lo, hi in bands]
    if any(hi < lo for lo, hi in bands) or any(b[0] < a[0] for a, b in zip(bands, bands[1:])):
        raise ValueError(f"bands must be [low, high] pairs with low <= high, in increasing order; got {bands}")
    starts = [-math.inf] + [lo for lo, _ in bands[1:]]
    stops = [min(hi + 1, nxt) for (_, hi), nxt in zip(bands, [lo for lo, _ in bands[1:]] + [math.inf])]
    return list(zip(starts, stops))


def best_per_band(pts: pd.DataFrame, bands=PAPER_BANDS) -> pd.DataFrame:
    """Per shape and quality band [lo, hi] (point estimates, see :func:`band_edges`): the fastest point and every
    point tied with it.

    A point is tied with the band's fastest when their speedup CIs overlap: the data cannot
    tell them apart, so the row names them all (``winners``) and says ``tie``. ``vs_dense``
    says whether the fastest is significantly faster or slower than not pruning at all. Points whose rule shaped
    under half of their scored positions (``inactive``) are left out and counted (``excluded_inactive``).
    """
    out = []
    shape = [c for c in SHAPE if c in pts]
    for key, group in pts.groupby(shape, dropna=False):
        flagged = group.inactive.fillna(False).astype(bool) if "inactive" in group else pd.Series(False, group.index)
        group = group[~flagged]  # a loss scored where the rule barely ran does not answer a band
        for (lo, hi), (start, stop) in zip(bands, band_edges(bands)):
            inband = group[(group.loss >= start) & (group.loss < stop)].sort_values("speedup", ascending=False)
            row = dict(zip(shape, key), band=f"{lo}-{hi}%", excluded_inactive=int(flagged.sum()))
            if not len(inband):
                out.append(dict(row, winners="(none measured)", tie=False))
                continue
            best = inband.iloc[0]
            tied = inband[inband.ci_high >= best.ci_low]
            out.append(dict(row, winners=", ".join(_name(r) for r in tied.itertuples()), tie=len(tied) > 1,
                            fastest=_name(best), vs_dense=vs_dense(best), cell=best.get("cell"), label=best.get("label"), speedup=best.speedup,
                            ci=f"[{best.ci_low:.2f}, {best.ci_high:.2f}]", loss=best.loss,
                            loss_ci=f"[{best.loss_low:.1f}, {best.loss_high:.1f}]"))
    return pd.DataFrame(out)


def where_active(df: pd.DataFrame, methods=None, domain: str = "ptb-long") -> pd.DataFrame:
    """Each timed point of ``methods`` with its KL on ``domain`` (long-prefill windows: the rule runs where it is
    scored) beside the share of the quick suite's scored tokens its rule shaped (``quick_active_share``; a loss
    there with ``quick_inactive`` set is left out of the bands) and its quick-suite loss."""
    if methods is not None:
        df = df[df.method.isin(list(methods))]
    long = points(df, "kl", domain).rename(columns={"loss": "kl", "loss_low": "kl_low", "loss_high": "kl_high"})
    quick = points(df)[KEY + SHAPE + ["loss", "loss_low", "loss_high", "active_share", "inactive"]].rename(columns={
        "loss": "quick_loss", "loss_low": "quick_loss_low", "loss_high": "quick_loss_high",
        "active_share": "quick_active_share", "inactive": "quick_inactive"})
    cols = ["method", "sparsity", "phase", "batch", "length", "speedup", "ci_low", "ci_high", "kl", "kl_low", "kl_high",
            "quick_loss", "quick_loss_low", "quick_loss_high", "quick_active_share", "quick_inactive"]
    return long.merge(quick, on=KEY + SHAPE, how="left")[cols].reset_index(drop=True)
