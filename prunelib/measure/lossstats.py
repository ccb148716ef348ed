"""Quality-loss statistics over stored scores: the loss against dense with its paired bootstrap CI over
the documents both models answered (:func:`quality_loss`), paired differences between two pruned models
(:func:`paired_difference`), and what a smaller document limit would have given (:func:`what_if`).

Quality loss = the mean over the preset's tasks of the relative drop of each task's chosen accuracy
(:data:`prunelib.measure.scoring.CHOSEN_METRIC`) against the dense model, in percent. Its 95% CI comes
from a paired bootstrap over documents (both models answer the same documents, so most of their noise
cancels); the independent-error standard error (delta method on the per-task stderrs) is kept beside it,
and is all a score without per-document outcomes gets (labelled ``unpaired``).
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pandas as pd

from prunelib.core.store import ResultsStore
from prunelib.core.validate import InputError
from prunelib.measure import samples
from prunelib.measure.scoring import (BOOTSTRAP_ITERS, CHOSEN_METRIC, PERPLEXITY_METRIC, PERPLEXITY_TASK,
                                      code_version_of)
from prunelib.pruning import REGISTRY


def _check_complete(d: pd.DataFrame, p: pd.DataFrame, tasks=None) -> None:
    """Every accuracy task either model was scored on (or ``tasks``) has a finite chosen metric for both."""
    seen = set(d.index.get_level_values(0)) | set(p.index.get_level_values(0))
    asked = list(tasks) if tasks else [t for t in CHOSEN_METRIC if t in seen]

    def ok(tab, t):
        k = (t, CHOSEN_METRIC.get(t))
        return k in tab.index and math.isfinite(float(tab.loc[k, "value"]))

    gaps = [f"{t}/{CHOSEN_METRIC.get(t)} ({'dense' if not ok(d, t) else 'pruned'})"
            for t in asked if not (ok(d, t) and ok(p, t))]
    if gaps:
        raise ValueError(f"quality loss refused: {', '.join(gaps)} missing or not finite, so the average would "
                         "silently cover fewer tasks; score them again (a resumed run redoes incomplete tasks)")


def quality_loss(dense: pd.DataFrame, pruned: pd.DataFrame, tasks=None, *, store: ResultsStore | None = None,
                 iters: int = BOOTSTRAP_ITERS, seed: int = 0) -> dict:
    """Mean relative drop (%) of the chosen accuracies, with its paired 95% CI, its unpaired stderr, the perplexities.

    ``dense``/``pruned`` are rows from :func:`evaluate` (or the store) for the two models.
    The CI comes from a paired bootstrap over documents (:func:`paired_bootstrap`) on the
    per-document outcomes kept beside ``store`` (:mod:`prunelib.measure.samples`); where a task of
    either model has none, the result is the unpaired one, labelled ``ci_method="unpaired"``:
    ±1.96 stderr, the stderr from the per-task stderrs by the delta method treating the two
    models' errors as independent. A pair scored on different documents or limits is refused.
    """
    def table(df):
        t = df.assign(task=df.metric.str.split("/").str[0], score=df.metric.str.split("/").str[1])
        t["stderr"] = [e.get("stderr") if isinstance(e, dict) else None for e in t.extra]
        t["limit"] = [e.get("limit") if isinstance(e, dict) else None for e in t.extra]
        return t.drop_duplicates(["task", "score"], keep="last").set_index(["task", "score"])

    d, p = table(dense), table(pruned)
    _check_complete(d, p, tasks)  # a missing or failed score is refused, never a silently smaller average
    tasks = tasks or [t for t in CHOSEN_METRIC if (t, CHOSEN_METRIC[t]) in d.index and (t, CHOSEN_METRIC[t]) in p.index]
    if not tasks:
        raise ValueError("no accuracy task is scored for both models; evaluate them on the same tasks first")
    folder = samples.folder((store if store is not None else ResultsStore()).path)
    per_task, var, pairs, missing = [], 0.0, {}, []
    for t in tasks:
        k = (t, CHOSEN_METRIC[t])
        if not _same(d.loc[k, "limit"], p.loc[k, "limit"]):
            raise ValueError(f"dense and pruned were scored on different limits for {t!r}: "
                             f"{d.loc[k, 'limit']} against {p.loc[k, 'limit']}; score them alike first")
        dv, pv = d.loc[k, "value"], p.loc[k, "value"]
        if not dv > 0:  # a relative drop from 0 is -inf or nan, never a loss
            raise InputError(f"dense {t}/{CHOSEN_METRIC[t]}={float(dv)!r} is not allowed: expected a dense accuracy > 0 "
                             "(a relative loss from 0 is undefined); leave the task out (tasks=[...])")
        ds, ps = d.loc[k, "stderr"] or 0.0, p.loc[k, "stderr"] or 0.0
        drop = 100 * (dv - pv) / dv
        se = 100 * math.sqrt(ps**2 + (ds * pv / dv) ** 2) / dv
        per_task.append({"task": t, "metric": CHOSEN_METRIC[t], "dense": dv, "pruned": pv, "loss_pct": drop, "stderr_pct": se})
        var += se**2
        pair = stored_pair(folder, t, d.loc[k].get("config_hash"), p.loc[k].get("config_hash"))
        if pair is None:
            missing.append(t)
        else:
            pairs[t] = pair
    per = pd.DataFrame(per_task)
    loss, stderr = float(per.loss_pct.mean()), math.sqrt(var) / len(tasks)
    if missing:
        ci, method, boot = (loss - 1.96 * stderr, loss + 1.96 * stderr), "unpaired", None
    else:
        boot = paired_bootstrap(pairs, iters=iters, seed=seed)
        ci, method = boot["ci"], "paired_bootstrap"
        per["ci_low"] = [boot["per_task"][t][0] for t in per.task]
        per["ci_high"] = [boot["per_task"][t][1] for t in per.task]
    ppl = (PERPLEXITY_TASK, PERPLEXITY_METRIC)
    return {
        "loss_pct": loss,
        "stderr_pct": stderr,
        "ci_low": ci[0], "ci_high": ci[1], "ci_method": method,
        "unpaired_tasks": missing,  # tasks without per-document outcomes for one of the models
        "bootstrap": None if boot is None else {"iters": iters, "seed": seed, "undefined": boot["undefined"]},
        "dense_score": float(per.dense.mean()),
        "pruned_score": float(per.pruned.mean()),
        "per_task": per,
        "ppl_dense": float(d.loc[ppl, "value"]) if ppl in d.index else None,
        "ppl_pruned": float(p.loc[ppl, "value"]) if ppl in p.index else None,
    }


def _same(a, b) -> bool:
    missing = [x is None or (isinstance(x, float) and math.isnan(x)) for x in (a, b)]
    return all(missing) or (not any(missing) and a == b)


def _aligned(task: str, sd: dict, sp: dict) -> tuple[np.ndarray, np.ndarray]:
    """The chosen metric's per-document outcomes of both models, refusing different documents."""
    if sd["doc_ids"] != sp["doc_ids"] or sd["doc_hashes"] != sp["doc_hashes"]:
        ids_d, ids_p = set(zip(sd["doc_ids"], sd["doc_hashes"])), set(zip(sp["doc_ids"], sp["doc_hashes"]))
        raise ValueError(f"dense and pruned were scored on different documents for {task!r}: "
                         f"{len(sd['doc_ids'])} against {len(sp['doc_ids'])} documents, "
                         f"{len(ids_d - ids_p)} only in dense and {len(ids_p - ids_d)} only in pruned")
    metric = CHOSEN_METRIC[task]
    return np.asarray(sd["outcomes"][metric], float), np.asarray(sp["outcomes"][metric], float)


def stored_pair(folder, task: str, dense_hash, pruned_hash, n: int | None = None):
    """The chosen metric's per-document outcomes of two stored scores, aligned by document (their first ``n``
    documents where given); None where either has no sidecar or fewer than ``n`` documents."""
    sd, sp = (samples.read(folder, h) if isinstance(h, str) else None for h in (dense_hash, pruned_hash))
    if sd is None or sp is None or n is not None and min(len(sd["doc_ids"]), len(sp["doc_ids"])) < n:
        return None
    return _aligned(task, *((_head(x, n) for x in (sd, sp)) if n is not None else (sd, sp)))


def paired_bootstrap(pairs: dict, iters: int = BOOTSTRAP_ITERS, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile CI of the relative drop (%) under a paired bootstrap over documents.

    ``pairs`` maps task -> (dense outcomes, pruned outcomes), aligned by document. Each
    iteration draws, for each task independently, ``n_task`` document indices with replacement
    (one ``[iters, n]`` draw per task from its own stream, :func:`task_rng`), the *same*
    indices for both models; the task's drop is
    100 (mean dense - mean pruned) / mean dense on them, the overall drop the mean over
    tasks. A resample whose dense mean is 0 has no relative drop (NaN, counted in
    ``undefined``) and is left out of the percentiles.
    """
    drops = _resampled(pairs, iters, seed, lambda dm, pm: _drop(dm, pm[0]))
    overall = np.mean(np.stack(list(drops.values())), axis=0)
    return {"ci": _percentiles(overall, level), "per_task": {t: _percentiles(x, level) for t, x in drops.items()},
            "undefined": int(np.isnan(overall).sum())}


def paired_difference(triples: dict, iters: int = BOOTSTRAP_ITERS, seed: int = 0, level: float = 0.95) -> dict:
    """Loss of model a minus loss of model b (points), with its CI under a paired bootstrap over documents.

    ``triples`` maps task -> (dense, a, b) outcomes aligned by document; each resample draws the
    same documents for all three (as :func:`paired_bootstrap` does for two), so a criterion and
    its random baseline are compared on what they both answered, not through two separate CIs.
    """
    diffs = _resampled(triples, iters, seed, lambda dm, pm: _drop(dm, pm[0]) - _drop(dm, pm[1]))
    overall = np.mean(np.stack(list(diffs.values())), axis=0)
    point = float(np.mean([_drop(np.mean(d), np.mean(a)) - _drop(np.mean(d), np.mean(b))
                           for d, a, b in (map(np.asarray, v) for v in triples.values())]))
    return {"diff": point, "ci": _percentiles(overall, level), "undefined": int(np.isnan(overall).sum())}


def _drop(dense_mean, pruned_mean):
    """The relative drop (%) of pruned means against dense means; NaN where the dense mean is 0."""
    dm, pm = np.asarray(dense_mean, float), np.asarray(pruned_mean, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(dm > 0, 100 * (dm - pm) / np.where(dm > 0, dm, 1), np.nan)


def _resampled(groups: dict, iters: int, seed: int, statistic) -> dict:
    """Per task, ``statistic(dense means, [other models' means])`` over ``iters`` resamples of its documents,
    the same indices for every model. Each task has its own stream (:func:`task_rng`), so the same documents give
    the same CI whatever the order or set of tasks around them (quality_loss and what_if agree)."""
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    out = {}
    for task, arrays in groups.items():
        rng = task_rng(seed, task)
        arrays = [np.asarray(x, float) for x in arrays]
        if len({x.shape for x in arrays}) != 1 or arrays[0].ndim != 1 or not len(arrays[0]):
            raise ValueError(f"task {task!r}: dense and pruned need the same non-empty list of documents, "
                             f"got shapes {' and '.join(str(x.shape) for x in arrays)}")
        idx = rng.integers(0, len(arrays[0]), size=(iters, len(arrays[0])))
        out[task] = statistic(arrays[0][idx].mean(1), [x[idx].mean(1) for x in arrays[1:]])
    return out


def task_rng(seed: int, task: str) -> np.random.Generator:
    """The bootstrap's random stream of one task: seeded by (seed, a stable hash of the task's name)."""
    return np.random.default_rng([int(seed), zlib.crc32(task.encode())])


def _percentiles(x, level: float) -> tuple[float, float]:
    q = [50 * (1 - level), 50 * (1 + level)]
    lo, hi = np.nanpercentile(x, q) if np.isfinite(x).any() else (np.nan, np.nan)
    return float(lo), float(hi)


def _head(sidecar: dict, n: int) -> dict:
    """A sidecar's first ``n`` documents (sidecars are sorted by doc id, as lm-eval's ``limit`` takes them)."""
    return {**sidecar, "doc_ids": sidecar["doc_ids"][:n], "doc_hashes": sidecar["doc_hashes"][:n],
            "outcomes": {m: v[:n] for m, v in sidecar["outcomes"].items()}}


def what_if(limits: dict, store: ResultsStore | None = None, *, model: str | None = None,
            iters: int = BOOTSTRAP_ITERS, seed: int = 0) -> pd.DataFrame:
    """The paired loss and 95% CI every stored pruned model would get on the first ``limits[task]`` documents.

    lm-eval's ``limit`` takes a task's first n documents, so a score stored with n or more documents
    (its per-document outcomes in the sidecar) holds the outcomes of any smaller limit: this is how a
    preset's document counts are chosen from measured variance, without scoring again. ``seconds`` is
    the stored scoring time scaled by the documents kept (set-up of ~2 s per task not subtracted).
    Each pruned model is paired with the dense model of the same name and dtype.
    """
    bad = [t for t in limits if t not in CHOSEN_METRIC]
    if bad:
        raise InputError(f"what_if: tasks {bad} have no chosen accuracy; allowed: {sorted(CHOSEN_METRIC)}")
    for t, n in limits.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"what_if: {t}={n!r} must be a whole number of documents >= 1")
    store = store if store is not None else ResultsStore()
    df = store.load()
    if df.empty:
        raise InputError(f"what_if: the store {store.path} holds no scores; score dense and pruned models first "
                         "(python -m prunelib.quality, python -m prunelib.experiment)")
    df = df[(df.phase == "quality") & df.metric.isin([f"{t}/{CHOSEN_METRIC[t]}" for t in limits])]
    if model is not None:
        df = df[df.model == model]
    e = df.extra
    df = df.assign(task=[x.get("task") for x in e], fp=[x.get("fingerprint") for x in e],
                   docs=[math.inf if x.get("limit") is None else x.get("limit") for x in e])
    df = df.loc[np.array([n >= limits[t] for n, t in zip(df.docs, df.task)], bool)]  # a fraction < 1 never qualifies
    # keyed like quality_loss: a dynamic method's score counts only under today's code (an older forward's is stale)
    current = {m: (None if m == "dense" or m not in REGISTRY else code_version_of([m])) for m in set(df.method)}
    df = df.loc[np.array([x.get("code") == current[m] for x, m in zip(df.extra, df.method)], bool)]
    # per model and task, the stored score with the most documents (the latest on ties)
    df = df.sort_values(["docs", "timestamp"]).drop_duplicates(["model", "dtype", "fp", "task"], keep="last")
    by_model = {k: g.set_index("task") for k, g in df.groupby(["model", "dtype", "fp"]) if set(g.task) == set(limits)}
    dense = {(m, d): g for (m, d, _), g in by_model.items() if (g.method == "dense").all()}
    folder = samples.folder(store.path)
    out = []
    for (name, dtype, _), g in by_model.items():
        dn = dense.get((name, dtype))
        if dn is None or (g.method == "dense").all():
            continue
        pairs = {t: stored_pair(folder, t, dn.config_hash[t], g.config_hash[t], n) for t, n in limits.items()}
        if None in pairs.values():
            continue
        lo, hi = paired_bootstrap(pairs, iters=iters, seed=seed)["ci"]
        seconds = sum((g.extra[t].get("seconds") or math.nan) * n / g.n[t] for t, n in limits.items())
        out.append(dict(model=name, method=g.method.iloc[0], sparsity=g.sparsity.iloc[0],
                        loss_pct=float(np.mean([_drop(d.mean(), p.mean()) for d, p in pairs.values()])),
                        ci_low=lo, ci_high=hi, half_width=(hi - lo) / 2, seconds=seconds))
    if not out:
        raise ValueError(f"what_if: no stored pruned model has per-document outcomes of at least {limits} "
                         f"documents beside a dense model's; score one with a larger limit first")
    return pd.DataFrame(out).sort_values("half_width", ascending=False).reset_index(drop=True)
