"""Tables over stored rows: one row per (method, sparsity) with speed beside quality (:func:`summary`),
each criterion against its random baseline (:func:`versus_random`), and the sweep jobs that failed
(:func:`failures`), and each dynamic method's realised sparsity beside its target wherever it ran (:func:`realised`);
:func:`print_table` prints them all."""
from __future__ import annotations

import numpy as np
import pandas as pd

from prunelib.core.store import ResultsStore
from prunelib.measure import samples
from prunelib.pruning import REGISTRY, get
from prunelib.results import pareto
from prunelib.results.bands import _loss_draws

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


def realised(df: pd.DataFrame) -> pd.DataFrame:
    """Each dynamic method's realised sparsity (percent) beside its target, per (method, sparsity, seed, options),
    wherever it ran: ``calibration`` (the calibration text its threshold was set on, from the prune report),
    ``timing_prefill`` / ``timing_decode`` (while timed), ``quick`` (while the quick suite was scored) and
    ``<domain>_prefill`` / ``<domain>_decode`` (while the fidelity windows of each domain were scored: the prompt
    under the prefill rule, the continuation under the decode rule). A target is what the method was asked for;
    only these columns say what it did."""
    dyn = {m for m in set(df.method) if m in REGISTRY and not get(m).static}
    rows: dict = {}
    for r in df[df.method.isin(dyn)].itertuples():
        e = r.extra if isinstance(r.extra, dict) else {}
        seed = e.get("seed", (e.get("calibration") or {}).get("seed", 0))
        row = rows.setdefault((r.method, r.sparsity, seed, pareto.options_key(e)),
                              {"method": r.method, "sparsity": r.sparsity, "seed": seed, "target_pct": 100 * r.sparsity})
        got = {}
        cal = (e.get("removed") or {}).get("realised_sparsity")
        if cal is not None:
            got["calibration"] = cal
        if r.metric == "speedup":
            got[f"timing_{r.phase}"] = e.get("realised_sparsity")
        elif r.metric == pareto.X_METRICS["loss"]:
            got["quick"] = e.get("realised_sparsity_scoring")
        elif r.metric == pareto.X_METRICS["kl"]:
            got |= {f"{e.get('domain')}_{ph}": e.get(f"realised_{ph}", e.get("realised")) for ph in ("prefill", "decode")}
        row.update({k: 100 * v for k, v in got.items() if isinstance(v, (int, float)) and np.isfinite(v)})
    out = pd.DataFrame(list(rows.values()))
    if not len(out):
        return out
    order = ["calibration", "timing_prefill", "timing_decode", "quick"] + [
        f"{d}_{ph}" for d in pareto.DOMAINS for ph in ("prefill", "decode")]
    cols = ["method", "sparsity", "seed", "target_pct"] + [c for c in order if c in out]
    return out[cols].sort_values(["method", "sparsity", "seed"], ignore_index=True)


def versus_random(df: pd.DataFrame, store: ResultsStore | None = None, iters: int = 2000, seed: int = 0,
                  x: str = "loss", domain: str | None = None) -> pd.DataFrame:
    """Each criterion's quality loss against the *distribution* of its random baseline's draws
    (``register(baseline=...)``: same cell, same unit), at the same sparsity. A criterion whose baseline has no
    stored loss at that sparsity is left out. ``x="kl"`` or ``"dnll"`` compares fidelity on ``domain`` instead
    (seconds per seed, so five random seeds are cheap; no per-document outcomes: the "seeds t" interval); the
    columns keep their names (``loss_pct`` holds the KL then) and ``x`` says which it is. ``domain=None`` reads each
    method where its rule runs (:func:`fidelity_domain`): "ptb-long" for a rule that acts on long prompts (sparse
    attention, token pruning: on the short windows' 64-token prompts it barely runs), "ptb" for the others.

    One random draw decides nothing (depth_random at 25% ranged 2.9-10.9 nats of KL over 5 seeds), so:

    - ``share_beaten``: the share of the random seeds whose loss is above the criterion's mean loss;
    - ``diff_pct`` = criterion loss - mean random loss (points), with a 95% CI that holds both the documents'
      noise and the spread between random seeds: each resample draws the documents once for every model
      (the stored per-document outcomes, as the paired CIs do) and the seeds of each side with replacement
      (``ci_method="seeds+documents"``); where outcomes are missing, a t-interval over the seeds' losses with
      each loss's own standard error added (``"seeds t"``);
    - ``verdict``: "better" / "worse" than random when the CI leaves 0, else "tie"; "too few seeds" when the
      baseline has fewer than 2 seeds (its spread is unknown), "no CI" when a loss has none. ``seeds`` and
      ``random_seeds`` say how many draws each side used.

    Same nominal sparsity is not same work for a dynamic rule: the layer router skipped 30% of token-layers at
    25% while scoring, random 26%. ``realised_pct`` / ``random_realised_pct`` are the rates realised while
    scoring (mean over seeds), and :func:`_matched` reads random's loss at the criterion's realised rate along
    random's own ladder: ``matched`` says how (``same`` within :data:`MATCH_TOL` points, ``interpolated``
    between the two random rungs whose realised rates bracket it, or why not), ``diff_matched_pct`` /
    ``diff_matched_low`` / ``_high`` the difference there (the CI shifted with the point: the neighbouring
    rung's own noise is not added) and ``verdict_matched`` its verdict.
    """
    by_domain = {d: pareto.quality(df, x, d) for d in ((domain,) if domain else ("ptb", "ptb-long"))}
    folder = samples.folder((store if store is not None else ResultsStore()).path)
    out = []
    for method in sorted({m for q in by_domain.values() for m in q.method}):
        base = get(method).baseline if method in REGISTRY else None
        if not base:
            continue
        d = domain or fidelity_domain(method)
        loss = by_domain[d]
        for s, g in loss[loss.method == method].groupby("sparsity"):
            r = loss[(loss.method == base) & (loss.sparsity == s)]
            if len(r):
                out.append(_versus_row(x, d, method, base, s, g, r, loss, folder, iters, seed))
    return pd.DataFrame(out)


def fidelity_domain(method: str) -> str:
    """Where a method's fidelity measures its rule: "ptb-long" (1536 tokens prefilled) for a method whose rule
    acts on long prompts (it reports an ``active_share``), else "ptb"."""
    from prunelib.measure.fidelity import long_prompt_rule

    return "ptb-long" if long_prompt_rule(method) else "ptb"


def _versus_row(x, domain, method, base, s, g, r, loss, folder, iters, seed) -> dict:
    """One row of :func:`versus_random`: criterion rows ``g`` against random rows ``r`` at sparsity ``s``."""
    g, r = g.drop_duplicates("seed", keep="last"), r.drop_duplicates("seed", keep="last")
    row = {"x": x if x == "loss" else f"{x} {domain}", "method": method, "unit": get(method).unit, "sparsity": s,
           "loss_pct": g.value.mean(), "seeds": len(g), "baseline": base, "random_loss_pct": r.value.mean(),
           "random_std": r.value.std(), "random_seeds": len(r),
           "share_beaten": float((r.value > g.value.mean()).mean())}
    row |= _versus(g, r, folder, iters, seed)
    return row | _matched(row, g, loss[loss.method == base])


#: realised rates (points) closer than this count as the same work
MATCH_TOL = 1.0


def _realised(rows: pd.DataFrame) -> float:
    """Mean realised sparsity while scoring (percent) over ``rows``' seeds; nan where none was recorded. A quality
    row records it as ``realised_sparsity_scoring``; a fidelity row per phase (its windows run as one prefill
    forward, so ``realised_prefill``) or, for a hook without phases, as ``realised``."""
    v = [_first(e, "realised_sparsity_scoring", "realised_prefill", "realised") for e in rows.extra
         if isinstance(e, dict)]
    v = [x for x in v if isinstance(x, (int, float)) and np.isfinite(x)]
    return 100 * float(np.mean(v)) if v else float("nan")


def _first(e: dict, *keys):
    """The first of ``keys`` that ``e`` holds as a finite number, else None."""
    for k in keys:
        v = e.get(k)
        if isinstance(v, (int, float)) and np.isfinite(v):
            return v
    return None


def _matched(row: dict, crit: pd.DataFrame, rand_all: pd.DataFrame) -> dict:
    """Random's loss read at the criterion's realised rate along random's ladder (see :func:`versus_random`)."""
    rc = _realised(crit)
    rr = _realised(rand_all[rand_all.sparsity == row["sparsity"]])
    out = {"realised_pct": rc, "random_realised_pct": rr, "diff_matched_pct": np.nan}
    if np.isnan(rc) or np.isnan(rr):
        return out | {"matched": "no realised rate stored"}
    if abs(rc - rr) <= MATCH_TOL:
        shift = 0.0
        out["matched"] = "same"
    else:
        rungs = sorted((_realised(g), g.value.mean()) for _, g in rand_all.groupby("sparsity"))
        rungs = [(x, y) for x, y in rungs if not np.isnan(x)]
        below = [p for p in rungs if p[0] <= rc]
        above = [p for p in rungs if p[0] >= rc]
        if not below or not above:
            side = "below" if not below else "above"
            return out | {"matched": f"realised {rc:.1f}% vs random {rr:.1f}%: no random rung realised {side} it"}
        (x0, y0), (x1, y1) = below[-1], above[0]
        at = y0 if x1 == x0 else y0 + (y1 - y0) * (rc - x0) / (x1 - x0)
        shift = float(at - row["random_loss_pct"])
        out["matched"] = f"interpolated at {rc:.1f}% between random's {x0:.1f}% and {x1:.1f}%"
    out["diff_matched_pct"] = row["diff_pct"] - shift
    if "diff_low" in row:
        lo, hi = row["diff_low"] - shift, row["diff_high"] - shift
        out |= {"diff_matched_low": lo, "diff_matched_high": hi, "verdict_matched": _verdict(lo > 0, hi < 0)}
    else:
        out["verdict_matched"] = row["verdict"]
    return out


def _versus(crit: pd.DataFrame, rand: pd.DataFrame, folder, iters: int, seed: int) -> dict:
    """``diff_pct``, its CI, how it was computed and the verdict (see :func:`versus_random`)."""
    diff = float(crit.value.mean() - rand.value.mean())
    if len(rand) < 2:
        return {"diff_pct": diff, "ci_method": "none", "verdict": "too few seeds"}
    rng = np.random.default_rng(seed)
    doc_idx: dict = {}
    draws = []
    for rows in (crit, rand):
        side = []
        for e, v, lo, hi in zip(rows.extra, rows.value, rows.ci_low, rows.ci_high):
            d, approx = _loss_draws(e if isinstance(e, dict) else {}, v, lo, hi, folder, doc_idx, rng, iters)
            if approx:
                side = None
                break
            side.append(d)
        if side is None:
            draws = None
            break
        draws.append(np.stack(side))  # [seeds, iters]
    if draws is not None:
        picks = [rng.integers(0, len(x), size=(iters, len(x))) for x in draws]  # seeds with replacement, per resample
        sides = [np.nanmean(x[p, np.arange(iters)[:, None]], axis=1) for x, p in zip(draws, picks)]
        d = sides[0] - sides[1]
        lo, hi = np.nanpercentile(d, [2.5, 97.5])
        method = "seeds+documents"
    else:
        se = [((h - l) / (2 * 1.96)) ** 2 if pd.notna(l) and pd.notna(h) else np.nan
              for l, h in zip(pd.concat([crit.ci_low, rand.ci_low]), pd.concat([crit.ci_high, rand.ci_high]))]
        if any(np.isnan(se)):
            return {"diff_pct": diff, "ci_method": "none", "verdict": "no CI"}
        from scipy import stats

        var = rand.value.var(ddof=1) / len(rand) + (crit.value.var(ddof=1) / len(crit) if len(crit) > 1 else 0.0)
        var += float(np.mean(se)) * (1 / len(crit) + 1 / len(rand))
        half = stats.t.ppf(0.975, len(rand) - 1) * np.sqrt(var)
        lo, hi, method = diff - half, diff + half, "seeds t"
    return {"diff_pct": diff, "diff_low": float(lo), "diff_high": float(hi), "ci_method": method,
            "verdict": _verdict(lo > 0, hi < 0)}


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
            print("\ncriterion vs random (quality loss %; diff = criterion - mean random, its CI over the documents and "
                  "the random seeds; share_beaten = random seeds the criterion beats; 'tie' when the CI holds 0; "
                  "*_matched: random read at the criterion's realised rate):")
            print(vr.round(2).to_string(index=False))
        vk = versus_random(df, store, x="kl")
        if len(vk):
            print("\ncriterion vs random on fidelity (KL, nats, on PTB; on long-prefill PTB windows for a rule that acts on "
                  "long prompts; the same columns, 'loss_pct' holding the KL):")
            print(vk.round(3).to_string(index=False))
        rr = realised(df)
        if len(rr):
            print("\nrealised sparsity of the dynamic methods (%, beside the target): on the calibration text, while "
                  "timed, while the quick suite was scored, while each fidelity domain was scored (prompt: prefill "
                  "rule; continuation: decode rule):")
            print(rr.round(1).assign(sparsity=rr.sparsity.round(4)).to_string(index=False))
        f = failures(df)
        if len(f):
            print(f"\nfailed jobs ({len(f)}; logs in <results>/sweeps/logs):")
            print(f.to_string(index=False))



def failures(df: pd.DataFrame) -> pd.DataFrame:
    """Jobs whose last attempt failed (no ``sweep_job`` row for their key), with the reason."""
    f = df[(df.metric == FAILURE) & ~df.config_hash.isin(df[df.metric == DONE].config_hash)]
    return pd.DataFrame({"model": f.model, "method": f.method, "sparsity": f.sparsity, "device": f.device,
                         "seed": [e.get("seed") for e in f.extra], "error": [e.get("error") for e in f.extra]})
