"""Tables over stored rows: one row per (method, sparsity) with speed beside quality (:func:`summary`),
each criterion against its random baseline (:func:`versus_random`), and the sweep jobs that failed
(:func:`failures`); :func:`print_table` prints all three."""
from __future__ import annotations

import pandas as pd

from prunelib.core.store import ResultsStore
from prunelib.measure import samples
from prunelib.measure.lossstats import paired_difference, stored_pair
from prunelib.pruning import REGISTRY, get
from prunelib.results import pareto

#: a sweep job's status rows: done, or failed (the reason in ``extra.error``)
DONE, FAILURE = "sweep_job", "failure"


def summary(df: pd.DataFrame, batch: int = 1, length: int = 512) -> pd.DataFrame:
    """One line per pruned model (method, sparsity, seed, options): speedups with CI, bound, efficiency,
    parameters, quality loss with its CI.

    Speed meets quality through :func:`prunelib.results.pareto.join`, the join the Pareto figures use, so
    a loss is shown only beside the timings of the model it scored. A model scored for quality only
    (``--phases none``, or another seed) gets a line of its own, with its loss alone.
    """
    timed = (df.metric != "speedup") | ((df.batch == batch) & (df.length == length))
    j = pareto.join(df[timed], how="outer")
    out = []
    for (_, method, s, seed, options), g in j.groupby(pareto.KEY, sort=True, dropna=False):
        row = {"method": method, "cell": g.cell.iloc[0], "sparsity": s, "what": g.label.iloc[0], "seed": seed}
        if options != "{}":
            row["options"] = options
        for r in g[g.phase.notna()].itertuples():
            row[f"{r.phase}_speedup"] = r.speedup
            row[f"{r.phase}_ci"] = f"[{r.ci_low:.2f}, {r.ci_high:.2f}]"
            row[f"{r.phase}_bound"] = r.bound
            row[f"{r.phase}_efficiency"] = r.speedup / r.bound
            if r.extra.get("realised_sparsity") is not None:
                row[f"{r.phase}_realised"] = r.extra["realised_sparsity"]
            if r.extra.get("mem_peak_bytes") is not None:
                row[f"{r.phase}_mem_MB"] = r.extra["mem_peak_bytes"] / 1e6
            row["params_M"] = r.extra["params"] / 1e6
        q = g.iloc[0]
        if pd.notna(q.loss):
            row.update(quality_loss_pct=q.loss, loss_low=q.loss_low, loss_high=q.loss_high,
                       loss_stderr=q.loss_stderr, loss_ci_method=q.ci_method)
        out.append(row)
    return pd.DataFrame(out)


def versus_random(df: pd.DataFrame, store: ResultsStore | None = None) -> pd.DataFrame:
    """Each criterion's quality loss beside its declared random baseline (``register(baseline=...)``:
    same cell, same unit), at the same sparsity, mean and spread over the stored seeds. A criterion
    whose baseline has no stored loss at that sparsity is left out.

    ``diff_pct`` = criterion loss - random loss (points) with its 95% CI: a paired bootstrap over the
    documents both answered (with the dense model's, :func:`prunelib.measure.lossstats.paired_difference`)
    for the first seed both have, where their loss rows name their scores and the outcomes are
    stored; else the two loss CIs side by side (``ci_method="unpaired"``: overlapping CIs make a
    tie). ``verdict``: "better" or "worse" than random when the CI leaves 0 (or the CIs
    separate), else "tie"; "no CI" when a loss has none.
    """
    loss = pareto.quality(df, "loss")
    folder = samples.folder((store if store is not None else ResultsStore()).path)
    out = []
    for (method, s), g in loss.groupby(["method", "sparsity"]):
        base = get(method).baseline if method in REGISTRY else None
        r = loss[(loss.method == base) & (loss.sparsity == s)] if base else loss.iloc[:0]
        if not len(r):
            continue
        row = {"method": method, "unit": get(method).unit, "sparsity": s, "loss_pct": g.value.mean(), "seeds": len(g),
               "baseline": base, "random_loss_pct": r.value.mean(), "random_std": r.value.std(), "random_seeds": len(r)}
        out.append(row | _versus(g, r, folder))
    return pd.DataFrame(out)


def _versus(crit: pd.DataFrame, rand: pd.DataFrame, folder) -> dict:
    """``diff_pct``, its CI, how it was computed and the verdict (see :func:`versus_random`)."""
    seeds = sorted(set(crit.seed) & set(rand.seed))
    for seed in seeds:
        a, b = (x[x.seed == seed].iloc[-1].extra for x in (crit, rand))
        sa, sb = a.get("scores"), b.get("scores")
        if not (sa and sb and sa["dense"] == sb["dense"]):
            continue
        triples = {}
        for t in sorted(a.get("per_task", {})):
            ca, cb = (stored_pair(folder, t, x["dense"].get(t), x["pruned"].get(t)) for x in (sa, sb))
            if ca is None or cb is None:
                break
            triples[t] = (*ca, cb[1])
        else:
            r = paired_difference(triples, seed=seed)
            return {"diff_pct": r["diff"], "diff_low": r["ci"][0], "diff_high": r["ci"][1], "ci_method": "paired_bootstrap",
                    "paired_seed": seed, "verdict": _verdict(r["ci"][0] > 0, r["ci"][1] < 0)}
    c, q = crit.iloc[-1], rand.iloc[-1]
    lows, highs = [x.get("ci_low") for x in (c, q)], [x.get("ci_high") for x in (c, q)]
    if any(v is None or pd.isna(v) for v in lows + highs):
        return {"diff_pct": crit.value.mean() - rand.value.mean(), "ci_method": "none", "verdict": "no CI"}
    return {"diff_pct": crit.value.mean() - rand.value.mean(), "ci_method": "unpaired",
            "verdict": _verdict(lows[0] > highs[1], highs[0] < lows[1])}


def _verdict(worse: bool, better: bool) -> str:
    return "worse" if worse else "better" if better else "tie"


def print_table(df: pd.DataFrame, batch: int = 1, length: int = 512, store: ResultsStore | None = None) -> None:
    """The summary table, each criterion against random (outcomes read beside ``store``), and the jobs of a
    sweep that failed."""
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_rows", 500,
                           "display.max_colwidth", 120):
        print(summary(df, batch, length).round(3).to_string(index=False))
        vr = versus_random(df, store)
        if len(vr):
            print("\ncriterion vs random (quality loss %, mean over stored seeds; diff = criterion - random, "
                  "its CI paired over documents where stored; a verdict of 'tie' when the CI holds 0):")
            print(vr.round(2).to_string(index=False))
        f = failures(df)
        if len(f):
            print(f"\nfailed jobs ({len(f)}; logs in <results>/sweeps/logs):")
            print(f.to_string(index=False))



def failures(df: pd.DataFrame) -> pd.DataFrame:
    """Jobs whose last attempt failed (no ``sweep_job`` row for their key), with the reason."""
    f = df[(df.metric == FAILURE) & ~df.config_hash.isin(df[df.metric == DONE].config_hash)]
    return pd.DataFrame({"model": f.model, "method": f.method, "sparsity": f.sparsity, "device": f.device,
                         "seed": [e.get("seed") for e in f.extra], "error": [e.get("error") for e in f.extra]})
