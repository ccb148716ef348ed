"""Each quality band answered with a probability (issue 23).

Per shape and band, both axes are resampled jointly, many times: a point's speedup from its own interleaved
timing pairs (the median per-pair ratio of pairs drawn with replacement), every point's quality loss from one
common draw of the documents (all models answered the same documents, so one draw of document indices per task
serves every model, as the paired CIs do). In each draw, the band's winner is the fastest point whose loss falls
in the band; P(method) is the share of draws it wins (over all its rungs).

The answer (:func:`answer`): the winner when its P >= 0.8; otherwise the smallest set of methods that together
hold >= 0.8, labelled a tie; ``none`` when no point falls in the band in most draws. The CI-overlap ties of
:func:`prunelib.results.pareto.best_per_band` stay beside it.

Where a point lacks raw data, its draws come from a normal approximation of its stored CI (speed in log space),
and the row says so (``approx``): an unpaired loss CI ignores the document pairing and is wider than the truth.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from prunelib.core.store import ResultsStore
from prunelib.measure import samples
from prunelib.measure.scoring import CHOSEN_METRIC
from prunelib.results.pareto import KEY, PAPER_BANDS, SHAPE, band_edges, quality, speed

ITERS, LEVEL = 2000, 0.8


def winners(draws: dict, bands=PAPER_BANDS) -> dict:
    """``draws``: point label -> (method, speed draws [N], loss draws [N]). Returns per band
    ``{"p": {method: share of draws won}, "none": share of draws with no point in the band}``."""
    labels = list(draws)
    if not labels:
        return {b: {"p": {}, "none": 1.0} for b in map(tuple, bands)}
    speeds = np.stack([np.asarray(draws[k][1], float) for k in labels])  # [points, N]
    losses = np.stack([np.asarray(draws[k][2], float) for k in labels])
    methods = np.array([draws[k][0] for k in labels])
    n = speeds.shape[1]
    out = {}
    for band, (start, stop) in zip(map(tuple, bands), band_edges(bands)):
        inside = (losses >= start) & (losses < stop)
        masked = np.where(inside, speeds, -np.inf)
        best = masked.argmax(0)
        some = inside.any(0)
        p = {}
        for m in np.unique(methods):
            p[str(m)] = float(np.sum(some & (methods[best] == m)) / n)
        out[band] = {"p": p, "none": float(1 - some.mean())}
    return out


def answer(p: dict, none: float, level: float = LEVEL) -> tuple[str, bool]:
    """``(answer, tie)``: the winner if it holds >= ``level`` of the draws, else the smallest set of methods that
    together do (a tie); 'none' when most draws have no point in the band."""
    if none >= 0.5:
        return "none", False
    ranked = sorted(p.items(), key=lambda kv: -kv[1])
    picked, total = [], 0.0
    for m, share in ranked:
        if total >= level:
            break
        picked.append(m)
        total += share
    if total < level:  # the band is empty in so many draws that no set of methods reaches the level
        picked.append("none")
    return ", ".join(picked), len(picked) > 1


def _speed_draws(extra: dict, speedup: float, lo: float, hi: float, rng, iters: int):
    d, p = extra.get("samples_dense"), extra.get("samples_pruned")
    if d and p and len(d) == len(p) and len(d) >= 2:
        ratios = np.asarray(d, float) / np.asarray(p, float)
        idx = rng.integers(0, len(ratios), size=(iters, len(ratios)))
        return np.median(ratios[idx], axis=1), False
    sd = (math.log(hi) - math.log(lo)) / (2 * 1.96) if lo and hi and lo > 0 else 0.0
    return np.exp(math.log(speedup) + sd * rng.standard_normal(iters)), True


def _loss_draws(extra: dict, value: float, lo: float, hi: float, folder, doc_idx: dict, rng, iters: int):
    """Per-draw quality loss (%) of one pruned model on the shared document draws ``doc_idx`` (task -> [N, n])."""
    scores = (extra or {}).get("scores") or {}
    dense, pruned = scores.get("dense") or {}, scores.get("pruned") or {}
    tasks = [t for t in pruned if t in CHOSEN_METRIC and t in dense]
    drops = []
    for t in tasks:
        sd, sp = samples.read(folder, dense[t]), samples.read(folder, pruned[t])
        if sd is None or sp is None or sd["doc_ids"] != sp["doc_ids"]:
            drops = []
            break
        a = np.asarray(sd["outcomes"][CHOSEN_METRIC[t]], float)
        b = np.asarray(sp["outcomes"][CHOSEN_METRIC[t]], float)
        key = (t, len(a))
        if key not in doc_idx:
            doc_idx[key] = rng.integers(0, len(a), size=(iters, len(a)))
        i = doc_idx[key]
        dm, pm = a[i].mean(1), b[i].mean(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            drops.append(np.where(dm > 0, 100 * (dm - pm) / np.where(dm > 0, dm, 1), np.nan))
    if drops:
        return np.nanmean(np.stack(drops), axis=0), False
    sd = (hi - lo) / (2 * 1.96) if lo is not None and hi is not None and math.isfinite(hi - lo) else 0.0
    return value + sd * rng.standard_normal(iters), True


def draws(df: pd.DataFrame, pts: pd.DataFrame, store: ResultsStore | None = None, iters: int = ITERS,
          seed: int = 0) -> dict:
    """Joint draws of every point of ``pts`` (one shape), from the raw rows ``df`` it was built from:
    ``{label: (method, speed draws, loss draws, approx)}``."""
    rng = np.random.default_rng(seed)
    folder = samples.folder((store if store is not None else ResultsStore()).path)
    sp = speed(df).set_index(KEY + SHAPE)
    q = quality(df, "loss").set_index(KEY)
    doc_idx, out = {}, {}
    for r in pts.to_dict("records"):
        k = tuple(r[c] for c in KEY)
        se = sp.loc[k + tuple(r[c] for c in SHAPE)].extra if k + tuple(r[c] for c in SHAPE) in sp.index else {}
        qe = q.loc[k].extra if k in q.index else {}
        s, s_approx = _speed_draws(se if isinstance(se, dict) else {}, r["speedup"], r["ci_low"], r["ci_high"], rng,
                                   iters)
        lo_, l_approx = _loss_draws(qe if isinstance(qe, dict) else {}, r["loss"], r["loss_low"], r["loss_high"],
                                    folder, doc_idx, rng, iters)
        out[f"{r['method']} s={r['sparsity']:g} seed={r['seed']}"] = (r["method"], s, lo_, s_approx or l_approx)
    return out


def band_table(df: pd.DataFrame, pts: pd.DataFrame, bands=PAPER_BANDS, store: ResultsStore | None = None,
               iters: int = ITERS, seed: int = 0, level: float = LEVEL) -> pd.DataFrame:
    """Per shape and band: P(each method is the band's fastest), the answer (winner, or a tie of the smallest set
    holding >= ``level``), and how many points used approximate draws. Points flagged ``inactive`` (their rule
    ran on under half the scored tokens) are left out, and the row counts them."""
    rows = []
    shape = [c for c in SHAPE if c in pts]
    for key, g in pts.groupby(shape, dropna=False):
        excluded = 0
        if "inactive" in g:
            excluded = int(g.inactive.fillna(False).astype(bool).sum())
            g = g[~g.inactive.fillna(False).astype(bool)]
        d = draws(df, g, store, iters, seed)
        res = winners({k: v[:3] for k, v in d.items()}, bands)
        approx = sum(v[3] for v in d.values())
        for band, r in res.items():
            ans, tie = answer(r["p"], r["none"], level)
            probs = ", ".join(f"{m} {p:.2f}" for m, p in sorted(r["p"].items(), key=lambda kv: -kv[1]) if p >= 0.01)
            rows.append(dict(zip(shape, key if isinstance(key, tuple) else (key,)), band=f"{band[0]}-{band[1]}%",
                             answer=ans, tie=tie, p_best=probs, p_none=r["none"], points=len(g),
                             approx_points=approx, excluded_inactive=excluded, p=r["p"]))
    return pd.DataFrame(rows)
