"""Sweeps: prune with each method at each sparsity, time it against the dense model, score it, store it.

What a notebook or ``python -m prunelib.experiment`` calls. Every measurement is keyed in
the results store, so an interrupted sweep resumes where it stopped and a finished one
re-reads instead of re-measuring.

Rows written per (method, sparsity):
- ``metric="speedup"`` per phase/batch/length: median(dense) / median(pruned) of
  interleaved runs, ``ci_low``/``ci_high`` the bootstrap 95% CI, ``bound`` the roofline
  speedup on this device's spec; extra: both medians, efficiency = measured / bound,
  parameter counts, analytic FLOPs and bytes;
- quality rows from :func:`prunelib.quality.evaluate`, and ``metric="quality_loss_pct"``
  (``ci_low``/``ci_high`` its paired-bootstrap 95% CI, ``extra.stderr`` the unpaired se,
  ``extra.ci_method``, ``extra.realised_sparsity_scoring``);
- ``metric="fidelity_kl"`` / ``"fidelity_dnll"`` per evaluation domain (:mod:`prunelib.fidelity`).
"""
from __future__ import annotations

import argparse

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import checks, costmodel, hardware, quality, timing
from . import fidelity as fidelity_mod
from .calibration import calibration_batch
from .adapter import ModelAdapter
from .models import EMBEDDED, fingerprint, load_model, parameter_count
from .pruning import REGISTRY, get, prune
from .store import ResultsStore, config_hash


def _base(model_name, method, sparsity, device, dtype):
    cell = "dense" if method == "dense" else get(method).cell.name
    return dict(model=model_name, cell=cell, method=method, sparsity=sparsity, device=device, dtype=dtype)


def realised_sparsity(method: str, model) -> float | None:
    """What a dynamic method actually skipped since its counters were reset (None for static methods)."""
    fn = get(method).hook("realised_sparsity")
    return None if fn is None else float(fn(model))


QUALITY_BATCH = 16
"""lm-eval's batch size for every method. HFLM right-pads a batch; a static model's real
positions never see the padding (causal), and for a dynamic one ServingHFLM passes the
padding mask, so its routes, kept tokens and realised-sparsity counters are those of each
row alone (tests/test_servinglm.py checks batch 4 against batch 1 for every dynamic method)."""


def timing_text(tokenizer, batches, lengths, seed: int = 1) -> torch.Tensor | None:
    """Real-text prompts for timing (calibration text; dynamic methods route on content)."""
    if tokenizer is None:
        return None
    return calibration_batch(tokenizer, n=max(batches), length=max(lengths) + 1, seed=seed).input_ids


def timing_modes(method: str, model) -> dict:
    """Which timing modes ``method`` allows on ``model``: ``graph_ok``, ``compile_ok`` and ``why`` (if not).

    A method's module may define ``graph_safe(model)`` and ``compile_safe(model)``, each
    returning a bool or ``(bool, reason)``. Missing ``graph_safe``: allowed for a static
    method, not for a dynamic one (its routing runs on the host); missing ``compile_safe``:
    as ``graph_safe``.
    """
    if method == "dense":
        return {"graph_ok": True, "compile_ok": True, "why": ""}
    m = get(method)

    def ask(name, default):
        fn = m.hook(name)
        if fn is None:
            return default
        ans = fn(model)
        ok, why = ans if isinstance(ans, tuple) else (bool(ans), "")
        return bool(ok), why or ("" if ok else f"{fn.__module__}.{name}(model) is False")

    static = m.cell.static
    graph = ask("graph_safe", (static, "" if static else f"dynamic method {method!r} declares no graph_safe(model): "
                                                          "its routing is not known to be graph-capturable"))
    comp = ask("compile_safe", graph)
    return {"graph_ok": graph[0], "compile_ok": comp[0], "why": "; ".join(w for w in (graph[1], comp[1]) if w)}


def speed_rows(store, model_name, dense, pruned, method, sparsity, *, phases=("prefill", "decode"), batches=(1,),
               lengths=(512,), reps=20, hw=None, extra=None, text=None, timing_mode=None, ci_target=None,
               budget_s=timing.BUDGET_S):
    """Interleaved (ABBA) speedup of ``pruned`` over ``dense`` for each phase/batch/length, stored once.

    ``timing_mode``: one of :data:`prunelib.timing.MODES`, or None for the device's default
    (:func:`prunelib.timing.choose_mode`; the choice and its reason are stored). ``ci_target``:
    None for ``reps`` pairs, else a relative CI half-width (or ``"auto"``) reached by adding
    pairs within ``budget_s`` seconds per comparison. The bound is costed from the pruned
    model's shapes after the timed runs, so a dynamic method is bounded by what it realised on
    the timed prompt (``extra.realised_sparsity``), and 2:4 layers count as sparse only where
    their kernel engaged (``extra.kernel``, ``extra.kernel_fallback``). A roofline slower than a
    measured time re-measures a measured spec once, and otherwise flags the row
    (``extra.bound_flag``). Memory (``extra.mem_peak_bytes``, ``weight_bytes``,
    ``kv_bytes_per_token``, each beside its ``*_pred``) is measured per model (``*_dense``).
    """
    from .pruning.semistructured import engaged_shape, kernel_info

    dev = next(dense.parameters()).device
    dtype = str(next(dense.parameters()).dtype).removeprefix("torch.")
    hw = hw or hardware.for_device(dev)
    mode, mode_reason = timing.choose_mode(dev, timing_mode, **timing_modes(method, pruned))
    fp_d, fp_p = fingerprint(dense), fingerprint(pruned)
    sd = costmodel.ModelShape.of(dense)
    adapter = ModelAdapter(pruned)
    mem_mode = mode if dev.type == "cuda" else "eager"  # a CPU compile would show up in the RSS
    for phase in phases:
        for b in batches:
            for s in lengths:
                key = config_hash({"kind": "speed", "dense": fp_d, "pruned": fp_p, "phase": phase, "batch": b,
                                   "length": s, "device": str(dev), "dtype": dtype, "reps": reps,
                                   "threads": torch.get_num_threads(), "hw": hw.name,
                                   "prompt": "random" if text is None else "text", "mode": mode,
                                   **({} if ci_target is None else {"ci_target": ci_target, "budget_s": budget_s})})
                if store.has(key, "speedup"):
                    continue
                adapter.reset_stats()
                c = timing.compare(dense, pruned, phase, b, s, reps=reps, text=text, mode=mode, target=ci_target,
                                   budget_s=budget_s)
                realised = None if method == "dense" else realised_sparsity(method, pruned)
                sp = engaged_shape(pruned, costmodel.ModelShape.of(pruned))

                def rooflines(spec):
                    return {"dense": costmodel.cost(sd, phase, b, s, dtype, spec).seconds,
                            "pruned": costmodel.cost(sp, phase, b, s, dtype, spec).seconds}

                hw, flag = hardware.check_roofline(hw, rooflines, {"dense": c.base.median, "pruned": c.cand.median})
                bound = costmodel.theoretical_speedup(sd, sp, phase, b, s, dtype, hw)
                cost = costmodel.cost(sp, phase, b, s, dtype, hw)
                mem = {}
                for tag, m, shape in (("", pruned, sp), ("_dense", dense, sd)):
                    f = timing.footprint(m, phase, b, s, mode=mem_mode, text=text)
                    mem.update({k + tag: v for k, v in f.extra(timing.predicted_memory(m, dtype, hw, shape)).items()})
                store.append(dict(
                    _base(model_name, method, sparsity, str(dev), dtype), phase=phase, batch=b, length=s,
                    metric="speedup", value=c.speedup, ci_low=c.ci_low, ci_high=c.ci_high, bound=bound, n=c.base.n,
                    config_hash=key,
                    extra=dict(extra or {}, t_dense=c.base.median, t_pruned=c.cand.median, efficiency=c.speedup / bound,
                               params=parameter_count(pruned), params_dense=parameter_count(dense), flops=cost.flops,
                               bytes=cost.bytes, hw=hw.name, realised_sparsity=realised,
                               roofline_dense=rooflines(hw)["dense"], roofline_pruned=cost.seconds,
                               bound_flag=flag, timing_mode=mode, timing_mode_reason=mode_reason,
                               ci_target=c.target, ci_half_width=c.half_width, ci_stop=c.stop, mem_mode=mem_mode,
                               **mem, **kernel_info(pruned),
                               samples_dense=c.base.samples, samples_pruned=c.cand.samples)))


def run(model_name: str = EMBEDDED, methods=("last_n",), sparsities=(0.25,), *, phases=("prefill", "decode"),
        batches=(1,), lengths=(512,), reps=20, preset: str | None = "quick", calib_n=32, calib_len=256, seed=0,
        device="cpu", dtype="float32", store: ResultsStore | None = None, timing_mode: str | None = None,
        ci_target=None, budget_s: float = timing.BUDGET_S, fidelity: bool = True, **options) -> pd.DataFrame:
    """The sweep. Returns every stored row of this model (a tidy DataFrame).

    ``fidelity``: also score each pruned model's KL and NLL change against the dense model
    (:mod:`prunelib.fidelity`, about 20 s per model on 2 cores).

    ``timing_mode``, ``ci_target``, ``budget_s``: how each comparison is timed (see :func:`speed_rows`).
    """
    store = ResultsStore() if store is None else store
    checks.run_args(methods, sparsities, phases_=phases, batches=batches, lengths=lengths, reps_=reps, preset=preset,
                    calib_n=calib_n, calib_len=calib_len, seed=seed, options_=options)  # before any work
    timing.choose_mode(device, timing_mode)  # a mode this device cannot run fails before any work
    model, tok = load_model(model_name, device=device, dtype=dtype)
    checks.model_args(model, methods, sparsities, lengths, phases)  # per-method ranges, positions: nothing stored yet
    cal = calibration_batch(tok, n=calib_n, length=calib_len, seed=seed) if tok is not None else None
    text = timing_text(tok, batches, lengths, seed=seed + 1)
    dense_q = quality.evaluate(model, tok, preset=preset, store=store, model_name=model_name) if preset else None
    bar = tqdm(total=len(methods) * len(sparsities), desc="prune, time, score")  # one bar for the sweep
    for method in methods:
        for sparsity in sparsities:
            bar.set_postfix_str(f"{method} s={sparsity:g}")
            pruned, report = prune(model, method, sparsity, calibration=cal, seed=seed, **options)
            extra = {"removed": report.removed, "calibration": {"n": calib_n, "length": calib_len, "seed": seed},
                     "options": options}
            speed_rows(store, model_name, model, pruned, method, sparsity, phases=phases, batches=batches,
                       lengths=lengths, reps=reps, extra=extra, text=text, timing_mode=timing_mode,
                       ci_target=ci_target, budget_s=budget_s)
            if preset:
                ModelAdapter(pruned).reset_stats()
                q = quality.evaluate(pruned, tok, preset=preset, store=store, model_name=model_name,
                                     batch_size=QUALITY_BATCH, cell=report.cell, method=method,
                                     sparsity=sparsity, extra=extra)
                _store_loss(store, model_name, method, sparsity, report.cell, dense_q, q, device, dtype, preset,
                            realised_sparsity(method, pruned), seed, options)
            if fidelity and tok is not None:
                fidelity_mod.measure(model, pruned, tok, store=store, model_name=model_name, method=method,
                                     sparsity=sparsity, cell=report.cell, seed=seed, extra=extra)
            del pruned
            bar.update()
    bar.close()
    df = store.load()
    return df[df.model == model_name].reset_index(drop=True)


def long_context_perplexity(model_name: str = EMBEDDED, methods=(), sparsities=(), *, docs: int = 4,
                            max_length: int = 2048, calib_n=32, calib_len=256, seed=0, device="cpu", dtype="float32",
                            store: ResultsStore | None = None, **options) -> pd.DataFrame:
    """WikiText-2 word perplexity of the dense model and of each pruned one at long context.

    lm-eval's document-level ``wikitext`` task on the first ``docs`` test articles, scored in
    rolling windows of ``max_length`` tokens at batch size 1, cached in the store like any
    quality row. The quick suite's prompts are a few hundred tokens: methods that act only on
    long prompts (sparse attention leaves a prompt of fewer than two 64-token blocks dense)
    show no loss there, so this is their quality measure, reported beside the quick-suite
    loss. Returns one row per model: method, sparsity, word_perplexity, ratio to dense.
    """
    store = ResultsStore() if store is None else store
    for m in methods:
        get(m)
    model, tok = load_model(model_name, device=device, dtype=dtype)
    cal = calibration_batch(tok, n=calib_n, length=calib_len, seed=seed)

    def ppl(m, method, sparsity, cell):
        df = quality.evaluate(m, tok, ["wikitext"], limit=docs, batch_size=1, max_length=max_length, store=store,
                              model_name=model_name, method=method, sparsity=sparsity, cell=cell)
        return float(df[df.metric == "wikitext/word_perplexity"].value.iloc[-1])

    out = [{"method": "dense", "sparsity": 0.0, "word_perplexity": ppl(model, "dense", 0.0, "dense")}]
    for method in methods:
        for sparsity in tqdm(sparsities, desc=f"{method} (long context)"):
            pruned, report = prune(model, method, sparsity, calibration=cal, seed=seed, **options)
            out.append({"method": method, "sparsity": sparsity,
                        "word_perplexity": ppl(pruned, method, sparsity, report.cell)})
            del pruned
    out = pd.DataFrame(out)
    return out.assign(ratio_to_dense=out.word_perplexity / out.word_perplexity.iloc[0])


def _loss_key(dense_hashes, pruned_hashes, seed) -> str:
    """The key of a quality-loss row: the score rows of both models (their config hashes) and the CI settings.
    ``"names_scores"``: rows that record their score rows in ``extra["scores"]`` (older rows did not), so a
    criterion can be compared with its random baseline document by document (:func:`versus_random`)."""
    return config_hash({"kind": "loss", "dense": sorted(set(dense_hashes)), "pruned": sorted(set(pruned_hashes)),
                        "ci": "paired_bootstrap", "iters": quality.BOOTSTRAP_ITERS, "seed": seed,
                        "names_scores": True})


def _store_loss(store, model_name, method, sparsity, cell, dense_q, q, device, dtype, preset, realised=None, seed=0,
                options=None):
    """The quality-loss row: value, the paired-bootstrap 95% CI (or ±1.96 se, labelled ``unpaired``, where a
    score has no per-document outcomes), the independent-error se, and what defines the pruned model."""
    key = _loss_key(dense_q.config_hash, q.config_hash, seed)
    if store.has(key, "quality_loss_pct"):
        return
    r = quality.quality_loss(dense_q, q, store=store, seed=seed)
    seconds = {e["task"]: e.get("seconds") for e in q.extra  # the pruned model's scoring time, as stored
               if e.get("task") in set(r["per_task"].task) | {quality.PERPLEXITY_TASK}}
    per_task = {t.task: {"loss": t.loss_pct, "stderr": t.stderr_pct,
                         "ci": [getattr(t, "ci_low", None), getattr(t, "ci_high", None)]} for t in r["per_task"].itertuples()}
    store.append(dict(model=model_name, cell=cell, method=method, sparsity=sparsity, phase="quality", device=device,
                      dtype=dtype, metric="quality_loss_pct", value=r["loss_pct"], ci_low=r["ci_low"],
                      ci_high=r["ci_high"], config_hash=key,
                      extra={"stderr": r["stderr_pct"], "ci_method": r["ci_method"], "unpaired_tasks": r["unpaired_tasks"],
                             "bootstrap": r["bootstrap"], "per_task": per_task, "preset": preset, "seed": seed,
                             "options": options or {}, "realised_sparsity_scoring": realised,
                             "ppl_dense": r["ppl_dense"], "ppl_pruned": r["ppl_pruned"],
                             "seconds": sum(v for v in seconds.values() if v is not None),
                             "scores": {"dense": _by_task(dense_q), "pruned": _by_task(q)}}))


def _by_task(scores: pd.DataFrame) -> dict:
    """``{task: config hash}`` of one model's score rows."""
    return {e["task"]: h for e, h in zip(scores.extra, scores.config_hash)}


def summary(df: pd.DataFrame, batch: int = 1, length: int = 512) -> pd.DataFrame:
    """One line per pruned model (method, sparsity, seed, options): speedups with CI, bound, efficiency,
    parameters, quality loss with its CI.

    Speed meets quality through :func:`prunelib.pareto.join`, the join the Pareto figures use, so
    a loss is shown only beside the timings of the model it scored. A model scored for quality only
    (``--phases none``, or another seed) gets a line of its own, with its loss alone.
    """
    from . import pareto

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
    documents both answered (with the dense model's, :func:`prunelib.quality.paired_difference`)
    for the first seed both have, where their loss rows name their scores and the outcomes are
    stored; else the two loss CIs side by side (``ci_method="unpaired"``: overlapping CIs make a
    tie). ``verdict``: "better" or "worse" than random when the CI leaves 0 (or the CIs
    separate), else "tie"; "no CI" when a loss has none.
    """
    from . import pareto, samples

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
            ca, cb = (quality.stored_pair(folder, t, x["dense"].get(t), x["pruned"].get(t)) for x in (sa, sb))
            if ca is None or cb is None:
                break
            triples[t] = (*ca, cb[1])
        else:
            r = quality.paired_difference(triples, seed=seed)
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


def _fraction(flag: str, value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        v = -1.0
    if not 0 < v < 1:
        raise SystemExit(f"{flag} {value!r}: expected 'auto', 'none' or a fraction in (0, 1), e.g. 0.03")
    return v


def main(argv=None):
    p = argparse.ArgumentParser(description="prune, time and score; results go to the store")
    p.add_argument("--model", default=EMBEDDED)
    p.add_argument("--methods", default="last_n,shortgpt,angular")
    p.add_argument("--sparsities", default="0.1,0.25,0.4")
    p.add_argument("--lengths", default="512")
    p.add_argument("--batches", default="1")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--preset", default="quick")
    p.add_argument("--seed", type=int, default=0, help="calibration windows and random baselines")
    p.add_argument("--phases", default="prefill,decode", help="'none' scores quality only")
    p.add_argument("--round-to", type=int, default=None, help="width / low-rank: round kept sizes to 8 or 64")
    p.add_argument("--timing-mode", default="auto", choices=["auto", *timing.MODES],
                   help="auto: graph on CUDA where the method allows it, else compiled, else eager; eager on CPU")
    p.add_argument("--ci-target", default="auto",
                   help="relative 95%% CI half-width to reach by adding pairs (auto: 3%% decode, 5%% prefill); "
                        "'none': exactly --reps pairs")
    p.add_argument("--budget", type=float, default=timing.BUDGET_S, help="seconds of timing per comparison at most")
    p.add_argument("--table", action="store_true",
                   help="measure nothing: print the stored table (first batch and length) and each criterion vs random")
    p.add_argument("--spec", help="run a sweep spec (YAML/TOML, see docs/SWEEPS.md) instead of the options above")
    p.add_argument("--executor", choices=("inprocess", "local", "ray"), default="inprocess",
                   help="with --spec: in this process, a local process pool, or a Ray cluster")
    p.add_argument("--workers", type=int, default=1, help="with --spec: pool processes (local) or CPUs of a new "
                                                          "local Ray instance (ray without --address)")
    p.add_argument("--address", default=None, help="with --executor ray: the cluster ('auto', host:port)")
    a = p.parse_args(argv)
    if a.spec:
        from . import sweep

        return sweep.main(spec=a.spec, executor=a.executor, workers=a.workers, address=a.address)
    try:  # every argument checked before the model loads; the per-method ranges right after it (run)
        phases = () if a.phases == "none" else tuple(checks.csv("phases", a.phases))
        methods, sparsities = checks.csv("methods", a.methods), checks.csv("sparsities", a.sparsities, float)
        batches, lengths = checks.csv("batches", a.batches, int), checks.csv("lengths", a.lengths, int)
        options = {"round_to": a.round_to} if a.round_to is not None else {}
        preset = None if a.preset == "none" else a.preset
        checks.run_args(methods, sparsities, phases_=phases, batches=batches, lengths=lengths, reps_=a.reps,
                        preset=preset, seed=a.seed, options_=options)
        if a.table:  # measure nothing
            df = ResultsStore().load()
            df = df[df.model == a.model]
        else:
            df = run(a.model, methods, sparsities, phases=phases, batches=batches, lengths=lengths, reps=a.reps,
                     preset=preset, seed=a.seed, timing_mode=None if a.timing_mode == "auto" else a.timing_mode,
                     ci_target=(None if a.ci_target == "none" else "auto" if a.ci_target == "auto"
                                else _fraction("--ci-target", a.ci_target)),
                     budget_s=a.budget, **options)
    except checks.InputError as err:
        p.error(str(err))
    print_table(df, batches[0], lengths[0])


def print_table(df: pd.DataFrame, batch: int = 1, length: int = 512, store: ResultsStore | None = None) -> None:
    """The summary table, each criterion against random (outcomes read beside ``store``), and the jobs of a
    sweep that failed."""
    from .sweep import failures

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


if __name__ == "__main__":
    main()
