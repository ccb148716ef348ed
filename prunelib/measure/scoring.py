"""Quality through lm-evaluation-harness, on in-memory (possibly pruned) models, cached in the store.

``evaluate(model, tokenizer, preset="quick")`` scores a model zero-shot with lm-eval's
``HFLM(pretrained=model)`` over the offline task suite (:mod:`prunelib.core.evaltasks`), or
the stock Hub tasks with ``offline=False``. Every metric becomes a row of the results
store (``phase="quality"``, ``metric="<task>/<metric>"``, stderr and n in the row), keyed
by the model's fingerprint, task, limit, seed and batch size: asking again reads the store.

A static model's answer choices are scored with their question's forward shared
(:mod:`prunelib.measure.sharedprefix`): the same scores to 1e-4 in a third to a half of the time on ARC; the
quality rows count those requests in ``extra["shared_context"]``.

Each score also keeps its per-document outcomes (lm-eval's ``log_samples``) in a sidecar
of the store (:mod:`prunelib.measure.samples`), written before the score rows.

Quality loss (:func:`quality_loss`) = the mean over the preset's tasks of the relative
drop of each task's chosen accuracy (:data:`CHOSEN_METRIC`) against the dense model, in
percent. Its 95% CI comes from a paired bootstrap over documents (both models answer the
same documents, so most of their noise cancels); the independent-error standard error
(delta method on the per-task stderrs) is kept beside it, and is all a score without
per-document outcomes gets (labelled ``unpaired``). WikiText-2 word perplexity is
reported beside the loss, not averaged into it.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass

import pandas as pd

from prunelib.core import validate
from prunelib.core import evaltasks
from prunelib.measure import samples
from prunelib.model.models import fingerprint
from prunelib.core.store import ResultsStore, config_hash

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
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0 \
            or (limit >= 1 and not float(limit).is_integer()):  # 1.5 documents: neither a count nor a fraction
        raise validate.InputError(f"limit must be a positive number of documents, a fraction < 1, or None for all; "
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
        raise validate.InputError(f"limit: a per-task limit needs every task; {missing} missing from limit={limit!r}")
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
    from prunelib.measure.servinglm import ServingHFLM  # dynamic methods scored as they serve (prompt prefilled, answer decoded)

    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown quality preset {preset!r}; available: {sorted(PRESETS)}")
        tasks = PRESETS[preset].tasks if tasks is None else tasks
        limit = limit if limit is not None else PRESETS[preset].limit
    if not tasks:
        validate.fail("tasks", tasks, "a non-empty list of task names (or tasks=None with a preset)")
    tasks = validate.distinct("tasks", [tasks] if isinstance(tasks, str) else list(tasks))
    validate.integer("max_length", max_length, 1)
    validate.seed("seed", seed)
    limit_of = _limits(tasks, limit)
    validate.integer("batch_size", batch_size)
    evaltasks._expand(tasks)  # unknown names -> ValueError listing the allowed ones
    if tokenizer is None or getattr(tokenizer, "pad_token", None) is None:
        raise ValueError("the tokenizer has no pad token, which lm-eval needs for batching; "
                         "set tokenizer.pad_token = tokenizer.eos_token first")
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:  # ids past the embedding would index out of range mid-scoring
        validate.fail("tokenizer vocabulary size", len(tokenizer), f"<= the model's {vocab} embeddings (is it the "
                      "model's own tokenizer?)")
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

        store.check_writable()  # a read-only folder or a full disk, before lm-eval scores anything

        lm = ServingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, max_length=max_length)
        for chunk in tqdm(runs, desc="lm-eval tasks", leave=False):  # each chunk lands in the store when done
            tm = evaltasks.task_manager(chunk, offline=offline, data_dir=data_dir)
            t0 = time.perf_counter()
            lm.packed = 0
            with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints "bootstrapping for stddev" lines
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
                                       scored_with=chunk, lm_eval=lm_eval.__version__, code=code,
                                       shared_context=lm.packed)))
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
    too (:func:`code_version_of` its methods).
    """
    entries = getattr(model.config, "prunelib_pruning", None) or []
    return code_version_of([e["method"] for e in entries])


def code_version_of(methods) -> str | None:
    """The code version of models pruned by ``methods``: a hash of the source files of each dynamic method's module,
    of the ``prunelib.pruning`` modules it takes its classes and functions from (a criterion, a serving module),
    and of the serving wrapper; None when every method is static."""
    import hashlib
    import sys
    from pathlib import Path

    from prunelib.pruning import get

    mods = {get(m).fn.__module__ for m in methods if not get(m).cell.static}
    if not mods:
        return None
    deps = set(mods)
    for m in mods:
        deps |= {getattr(v, "__module__", None) for v in vars(sys.modules[m]).values()}
    deps = sorted(d for d in deps if d and d.startswith("prunelib.pruning.") and d != "prunelib.pruning.registry")
    files = [Path(sys.modules[m].__file__) for m in deps] + [Path(__file__).with_name("servinglm.py")]
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


def scores(df: pd.DataFrame, tasks=None) -> pd.DataFrame:
    """One line per task and metric of :func:`evaluate`'s rows (BLiMP as its group only): value, stderr, n, seconds."""
    t = df.assign(task=df.metric.str.split("/").str[0], score=df.metric.str.split("/").str[1])
    t = t.drop_duplicates("metric", keep="last")
    t = t[t.task.isin(tasks)] if tasks else t
    return pd.DataFrame({"task": t.task, "metric": t.score, "value": t.value,
                         "stderr": [e.get("stderr") for e in t.extra], "n": t.n,
                         "seconds": [e.get("seconds") for e in t.extra]}).reset_index(drop=True)
