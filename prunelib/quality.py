"""Quality through lm-evaluation-harness, on in-memory (possibly pruned) models, cached in the store.

``evaluate(model, tokenizer, preset="quick")`` scores a model zero-shot with lm-eval's
``HFLM(pretrained=model)`` over the offline task suite (:mod:`prunelib.evaltasks`), or
the stock Hub tasks with ``offline=False``. Every metric becomes a row of the results
store (``phase="quality"``, ``metric="<task>/<metric>"``, stderr and n in the row), keyed
by the model's fingerprint, task, limit, seed and batch size: asking again reads the store.

Each score also keeps its per-document outcomes (lm-eval's ``log_samples``) in a sidecar
of the store (:mod:`prunelib.samples`), written before the score rows.

Quality loss (:func:`quality_loss`) = the mean over the preset's tasks of the relative
drop of each task's chosen accuracy (:data:`CHOSEN_METRIC`) against the dense model, in
percent. Its 95% CI comes from a paired bootstrap over documents (both models answer the
same documents, so most of their noise cancels); the independent-error standard error
(delta method on the per-task stderrs) is kept beside it, and is all a score without
per-document outcomes gets (labelled ``unpaired``). WikiText-2 word perplexity is
reported beside the loss, not averaged into it.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import checks, evaltasks, samples
from .models import fingerprint
from .store import ResultsStore, config_hash

#: the accuracy each task contributes to the quality score (acc_norm where papers report it)
CHOSEN_METRIC = {
    "arc_easy": "acc", "arc_challenge": "acc_norm", "boolq": "acc", "hellaswag": "acc_norm",
    "piqa": "acc", "winogrande": "acc", "openbookqa": "acc_norm", "lambada_openai": "acc", "blimp": "acc",
}
PERPLEXITY_TASK, PERPLEXITY_METRIC = "wikitext", "word_perplexity"
#: BLiMP paradigms scored per lm-eval call: the unit an interrupted run keeps (one call each costs
#: seconds of lm-eval set-up, 67 of them minutes)
BLIMP_CHUNK = 10
#: resamples of the paired bootstrap of a quality loss (percentile CI; its Monte-Carlo error is ~0.3 points here)
BOOTSTRAP_ITERS = 2000


@dataclass(frozen=True)
class Preset:
    tasks: tuple[str, ...]
    limit: int | None | dict  # documents per task: one number for all, or {task: number} (BLiMP: per paradigm)
    doc: str = ""


PRESETS = {
    "full": Preset(("wikitext", "lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande",
                    "boolq", "openbookqa", "blimp"), None, "every task, every document"),
    # Chosen for the most precision per second under paired statistics (issue 13), on the embedded model. First,
    # ShortGPT 25% against dense on 150 documents of each candidate task gave per-document sds of the paired relative
    # drop (arc_easy 89, piqa 59, lambada_openai 96 points): HellaSwag (0.34 s a document) is too dear; by the
    # README's dense scores ARC-c, OpenBookQA and WinoGrande sit near chance and BoolQ below its majority class;
    # BLiMP's per-paradigm set-up outweighs its documents. 500 / 250 / 200 documents of the three then cost 116-184 s
    # per model on 2 quiet cores (not the 80 s predicted), with paired half-widths of 2.7-6.2 points over 30 methods.
    # These counts come from those 30 methods' stored per-document outcomes: lm-eval's limit takes the first n
    # documents, so `python -m prunelib.quality --what-if lambada_openai=200,arc_easy=160,piqa=170` computes the
    # paired CI every stored method would get on fewer (largest half-width 7.4, mean 6.1, for about 74 s of documents
    # at the measured 0.12 / 0.18 / 0.125 s a document plus ~2 s of set-up per task). Measured with them on the
    # quiet box (2026-12-01): 67-91 s per pruned model (sparse attention 108-131 s), paired half-widths 3.0-7.5
    # points, mean 6.1 (docs/RESULTS.md).
    "quick": Preset(("lambada_openai", "arc_easy", "piqa"), {"lambada_openai": 200, "arc_easy": 160, "piqa": 170},
                    "3 tasks, their first 200 / 160 / 170 documents (chosen for paired precision per second; "
                    "WikiText-2 perplexity is too slow on 2 CPU cores for it)"),
}


def _needed(task: str):
    """The metrics a stored task must have to be skipped: its chosen accuracy or the perplexity (else any)."""
    if task in CHOSEN_METRIC:
        return [f"{task}/{CHOSEN_METRIC[task]}"]
    return [f"{task}/{PERPLEXITY_METRIC}"] if task == PERPLEXITY_TASK else None


def _check_limit(limit):
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
        raise checks.InputError(f"limit must be a positive number of documents, a fraction < 1, or None for all; "
                                f"got limit={limit!r}")
    return limit


def _limits(tasks, limit):
    """``task -> limit``: one checked limit for every task, or a dict covering each task (a BLiMP paradigm
    takes BLiMP's)."""
    if not isinstance(limit, dict):
        limit = _check_limit(limit)
        return lambda task: limit
    missing = [t for t in tasks if t not in limit]
    if missing:
        raise checks.InputError(f"limit: a per-task limit needs every task; {missing} missing from limit={limit!r}")
    limit = {t: _check_limit(v) for t, v in limit.items()}
    return lambda task: limit[task] if task in limit else limit["blimp"]


def evaluate(model, tokenizer, tasks=None, *, preset: str | None = None, limit=None, batch_size: int = 16,
             seed: int = 1234, offline: bool = True, store: ResultsStore | None = None, model_name: str = "",
             cell: str = "dense", method: str = "dense", sparsity: float = 0.0, extra: dict | None = None,
             bootstrap_iters: int = 1000, max_length: int = 2048, data_dir=None) -> pd.DataFrame:
    """Score ``model`` on ``tasks`` (or a preset) and return its rows from the store.

    Tasks already stored for this model fingerprint and settings are not re-run.
    """
    import lm_eval
    from .servinglm import ServingHFLM  # dynamic methods scored as they serve (prompt prefilled, answer decoded)

    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown quality preset {preset!r}; available: {sorted(PRESETS)}")
        tasks = tasks or PRESETS[preset].tasks
        limit = limit if limit is not None else PRESETS[preset].limit
    if not tasks:
        raise ValueError("give tasks or a preset")
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    limit_of = _limits(tasks, limit)
    checks.integer("batch_size", batch_size)
    evaltasks._expand(tasks)  # unknown names -> ValueError listing the allowed ones
    if tokenizer is None or getattr(tokenizer, "pad_token", None) is None:
        raise ValueError("the tokenizer has no pad token, which lm-eval needs for batching; "
                         "set tokenizer.pad_token = tokenizer.eos_token first")
    store = ResultsStore() if store is None else store
    fp = fingerprint(model)
    device = str(next(model.parameters()).device)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")

    code = code_version(model)
    sidecars = samples.folder(store.path)

    def key(task):
        defining = {"kind": "quality", "fingerprint": fp, "task": task, "limit": limit_of(task), "num_fewshot": 0,
                    "seed": seed, "offline": offline, "batch_size": batch_size, "max_length": max_length,
                    "lm_eval": lm_eval.__version__}
        return config_hash(defining if code is None else {**defining, "code": code})

    # BLiMP (134k requests) runs in chunks of paradigms, each stored as it finishes, so an interrupted run
    # keeps what it did; its group row is then aggregated from the stored paradigms with lm-eval's own functions
    wanted = {key(t) for t in tasks} | ({key(t) for t in evaltasks.BLIMP_TASKS} if "blimp" in tasks else set())
    runs = [[t] for t in tasks if t != "blimp" and not store.has(key(t), _needed(t))]
    if "blimp" in tasks and not store.has(key("blimp")):
        leaves = [t for t in evaltasks.BLIMP_TASKS if t not in tasks and not store.has(key(t))]
        runs += [leaves[i:i + BLIMP_CHUNK] for i in range(0, len(leaves), BLIMP_CHUNK)]
    if runs:
        from tqdm.auto import tqdm

        lm = ServingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, max_length=max_length)
        for chunk in tqdm(runs, desc="lm-eval tasks", leave=False):  # each chunk lands in the store when done
            tm = evaltasks.task_manager(chunk, offline=offline, data_dir=data_dir)
            t0 = time.perf_counter()
            out = lm_eval.simple_evaluate(model=lm, tasks=chunk, task_manager=tm, num_fewshot=0,
                                          limit=limit_of(chunk[0]), bootstrap_iters=bootstrap_iters, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                          log_samples=True)
            seconds = (time.perf_counter() - t0) / len(chunk)  # a chunk's time, shared by its tasks
            rows = []
            for task in chunk:
                for name, n, metrics in _task_results(out, task):
                    if name in out.get("samples", {}):  # the sidecar lands before its score rows
                        samples.write(sidecars, key(name), samples.compact(name, out["samples"][name]))
                    for metric, (value, stderr) in metrics.items():
                        half = 1.96 * stderr if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
                        rows.append(dict(
                            model=model_name or getattr(model.config, "name_or_path", ""), cell=cell, method=method,
                            sparsity=sparsity, phase="quality", device=device, dtype=dtype, metric=f"{name}/{metric}",
                            value=value, ci_low=None if half is None else value - half,
                            ci_high=None if half is None else value + half, n=n, config_hash=key(task),
                            extra=dict(extra or {}, task=name, requested=task, score=metric, stderr=stderr,
                                       limit=limit_of(task), fingerprint=fp, offline=offline, seed=seed, num_fewshot=0,
                                       batch_size=batch_size, max_length=max_length, seconds=seconds,
                                       scored_with=chunk, lm_eval=lm_eval.__version__, code=code)))
            store.append(rows)
    df = store.load()
    if "blimp" in tasks and not store.has(key("blimp")):
        parts = [samples.read(sidecars, key(t)) for t in evaltasks.BLIMP_TASKS]
        if None not in parts:  # the group's documents: its paradigms' (equal sizes, so the unweighted mean pools)
            samples.write(sidecars, key("blimp"), samples.pooled("blimp", parts))
        store.append([_blimp_group_row(df[df.config_hash.isin({key(t) for t in evaltasks.BLIMP_TASKS})], key("blimp"))])
        df = store.load()
    return df[df.config_hash.isin(wanted)].reset_index(drop=True)


def code_version(model) -> str | None:
    """A hash of the source that decides a dynamic method's forward, or None for a static (or dense) model.

    A model's fingerprint hashes its config and weights. A static method's effect is all in
    them, but a dynamic method (routing, token pruning, sparse attention) acts in code, and its
    fingerprint does not change when that code does; so its cached scores are keyed by this
    too: the source files of its method module and of the serving wrapper (where present).
    """
    import hashlib
    import sys
    from pathlib import Path

    from .pruning import get

    entries = getattr(model.config, "prunelib_pruning", None) or []
    modules = sorted({get(e["method"]).fn.__module__ for e in entries if not get(e["method"]).cell.static})
    if not modules:
        return None
    files = [Path(sys.modules[m].__file__) for m in modules] + [Path(__file__).with_name("servinglm.py")]
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def _blimp_group_row(leaves: pd.DataFrame, config_hash: str) -> dict:
    """The ``blimp/acc`` row from its 67 stored paradigms, as lm-eval's group (unweighted mean) computes it."""
    from lm_eval.api.metrics import aggregate_subtask_metrics, unweighted_mean_stderr

    acc = leaves[leaves.metric.str.endswith("/acc")].drop_duplicates("metric", keep="last")
    acc = acc.set_index(acc.metric.str.split("/").str[0]).reindex(list(evaltasks.BLIMP_TASKS))
    if acc.value.isna().any():
        raise RuntimeError(f"BLiMP paradigms missing from the store: {list(acc.index[acc.value.isna()])}")
    values, sizes = acc.value.tolist(), [int(n) for n in acc.n]
    stderrs = [e["stderr"] for e in acc.extra]
    value = aggregate_subtask_metrics(values, sizes, False)  # _blimp.yaml: weight_by_size false
    stderr = unweighted_mean_stderr(stderrs) if None not in stderrs else None
    first = acc.iloc[0]
    half = None if stderr is None else 1.96 * stderr
    extra = dict(first.extra, task="blimp", requested="blimp", stderr=stderr,
                 seconds=float(sum(e["seconds"] for e in acc.extra)), paradigms=len(values))
    return dict(model=first.model, cell=first.cell, method=first.method, sparsity=first.sparsity, phase="quality",
                device=first.device, dtype=first.dtype, metric="blimp/acc", value=value,
                ci_low=None if half is None else value - half, ci_high=None if half is None else value + half,
                n=sum(sizes), config_hash=config_hash, extra=extra)


def _task_results(out: dict, task: str):
    """(task name, n, {metric: (value, stderr)}) for a requested task and, for a group, its members."""
    names = [task] + sorted(k for k in out["results"] if k != task and out.get("group_subtasks", {}).get(task)
                            and k in out["group_subtasks"][task])
    for name in names:
        res = out["results"][name]
        metrics = {}
        for k, v in res.items():
            if "," not in k or "_stderr," in k or not isinstance(v, (int, float)):
                continue
            metric = k.split(",")[0]
            metrics[metric] = (float(v), _num(res.get(f"{metric}_stderr,{k.split(',', 1)[1]}")))
        n = out.get("n-samples", {}).get(name, {}).get("effective")
        if n is None and name in out.get("group_subtasks", {}):
            n = sum(out["n-samples"][s]["effective"] for s in out["group_subtasks"][name] if s in out["n-samples"])
        yield name, n, metrics


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" where it has no stderr


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
    per-document outcomes kept beside ``store`` (:mod:`prunelib.samples`); where a task of
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
    iteration draws, for each task in the given order and independently, ``n_task``
    document indices with replacement (``numpy.random.default_rng(seed).integers``, one
    ``[iters, n]`` draw per task), the *same* indices for both models; the task's drop is
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
    the same indices for every model (``default_rng(seed).integers``, one ``[iters, n]`` draw per task, in order)."""
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    rng = np.random.default_rng(seed)
    out = {}
    for task, arrays in groups.items():
        arrays = [np.asarray(x, float) for x in arrays]
        if len({x.shape for x in arrays}) != 1 or arrays[0].ndim != 1 or not len(arrays[0]):
            raise ValueError(f"task {task!r}: dense and pruned need the same non-empty list of documents, "
                             f"got shapes {' and '.join(str(x.shape) for x in arrays)}")
        idx = rng.integers(0, len(arrays[0]), size=(iters, len(arrays[0])))
        out[task] = statistic(arrays[0][idx].mean(1), [x[idx].mean(1) for x in arrays[1:]])
    return out


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
        raise checks.InputError(f"what_if: tasks {bad} have no chosen accuracy; allowed: {sorted(CHOSEN_METRIC)}")
    for t, n in limits.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise checks.InputError(f"what_if: {t}={n!r} must be a whole number of documents >= 1")
    store = store if store is not None else ResultsStore()
    df = store.load()
    df = df[(df.phase == "quality") & df.metric.isin([f"{t}/{CHOSEN_METRIC[t]}" for t in limits])]
    if model is not None:
        df = df[df.model == model]
    e = df.extra
    df = df.assign(task=[x.get("task") for x in e], fp=[x.get("fingerprint") for x in e],
                   docs=[math.inf if x.get("limit") is None else x.get("limit") for x in e])
    df = df[[n >= limits[t] for n, t in zip(df.docs, df.task)]]  # a fraction < 1 of the documents never qualifies
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


def scores(df: pd.DataFrame, tasks=None) -> pd.DataFrame:
    """One line per task and metric of :func:`evaluate`'s rows (BLiMP as its group only): value, stderr, n, seconds."""
    t = df.assign(task=df.metric.str.split("/").str[0], score=df.metric.str.split("/").str[1])
    t = t.drop_duplicates("metric", keep="last")
    t = t[t.task.isin(tasks)] if tasks else t
    return pd.DataFrame({"task": t.task, "metric": t.score, "value": t.value,
                         "stderr": [e.get("stderr") for e in t.extra], "n": t.n,
                         "seconds": [e.get("seconds") for e in t.extra]}).reset_index(drop=True)


def _limit_arg(text: str):
    """``--limit``: a whole number of documents stays an int (it is part of the cache key), else a fraction."""
    return int(text) if float(text).is_integer() else float(text)


_limit_arg.__name__ = "limit"  # argparse: "invalid limit value: 'x'"


def main(argv=None):
    from .models import EMBEDDED, load_model, resolve_dtype

    p = argparse.ArgumentParser(description="score a model with lm-eval on the offline suite (resumable: "
                                            "finished tasks are read from the store)")
    p.add_argument("--model", default=EMBEDDED)
    p.add_argument("--preset", default="full", choices=sorted(PRESETS))
    p.add_argument("--tasks", default=None, help="comma-separated, instead of the preset's tasks")
    p.add_argument("--limit", type=_limit_arg, default=None,
                   help="documents per task, or a fraction < 1 (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--what-if", default=None, metavar="TASK=N,...",
                   help="no scoring: the paired CI every stored pruned model would get on its first N documents")
    a = p.parse_args(argv)
    if a.what_if:
        try:
            pairs = [kv.split("=") for kv in a.what_if.split(",")]
            if any(len(kv) != 2 or not kv[1].strip().isdigit() for kv in pairs):
                raise ValueError("expected TASK=N pairs separated by commas, e.g. arc_easy=160,piqa=170")
            t = what_if({k.strip(): int(n) for k, n in pairs}, model=a.model)
        except ValueError as err:  # a malformed TASK=N, an unknown task, nothing stored
            p.error(f"--what-if {a.what_if}: {err}")
        with pd.option_context("display.width", 200, "display.max_rows", 200):
            print(t.round(2).to_string(index=False))
        print(f"{len(t)} models: paired 95% half-width max {t.half_width.max():.2f}, mean {t.half_width.mean():.2f} "
              f"points; seconds (stored, scaled to the documents kept) median {t.seconds.median():.0f}")
        return
    tasks = a.tasks.split(",") if a.tasks else list(PRESETS[a.preset].tasks)
    try:  # bad names, limits, batch sizes or devices fail here, before the model loads
        _check_limit(a.limit)
        checks.integer("batch_size", a.batch_size)
        resolve_dtype(a.dtype, a.device)
        evaltasks._expand(tasks)
    except ValueError as err:
        p.error(str(err))
    model, tok = load_model(a.model, device=a.device, dtype=a.dtype)
    df = evaluate(model, tok, tasks, preset=a.preset, limit=a.limit, batch_size=a.batch_size, model_name=a.model)
    table = scores(df, tasks)
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(table.round(4).to_string(index=False))
    per_task = table.drop_duplicates("task")
    print(f"scoring time (sum over tasks, as stored): {per_task.seconds.sum():.0f} s = {per_task.seconds.sum() / 60:.1f} min")


if __name__ == "__main__":
    main()
