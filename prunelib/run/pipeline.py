"""Sweeps: prune with each method at each sparsity, time it against the dense model, score it, store it.

What a notebook or ``python -m prunelib.experiment`` calls. Every measurement is keyed in
the results store, so an interrupted sweep resumes where it stopped and a finished one
re-reads instead of re-measuring.

Rows written per (method, sparsity):
- ``metric="speedup"`` per phase/batch/length: median(dense) / median(pruned) of
  interleaved runs, ``ci_low``/``ci_high`` the bootstrap 95% CI, ``bound`` the roofline
  speedup on this device's spec; extra: both medians, efficiency = measured / bound,
  parameter counts, analytic FLOPs and bytes;
- quality rows from :func:`prunelib.measure.scoring.evaluate`, and ``metric="quality_loss_pct"``
  (``ci_low``/``ci_high`` its paired-bootstrap 95% CI, ``extra.stderr`` the unpaired se,
  ``extra.ci_method``, ``extra.realised_sparsity_scoring``);
- ``metric="fidelity_kl"`` / ``"fidelity_dnll"`` per evaluation domain (:mod:`prunelib.measure.fidelity`).
"""
from __future__ import annotations

import pandas as pd
import torch
from tqdm.auto import tqdm

from prunelib.core.store import ResultsStore, config_hash
from prunelib.cost import costmodel, hardware
from prunelib.measure import fidelity as fidelity_mod
from prunelib.measure import timing
from prunelib.measure import lossstats, scoring
from prunelib.model.adapter import ModelAdapter
from prunelib.model.calibration import calibration_batch
from prunelib.model.models import EMBEDDED, fingerprint, load_model, parameter_count
from prunelib.pruning import get, prune
from prunelib.pruning.registry import rungs
from prunelib.run import checks, engine_rows


def _base(model_name, method, sparsity, device, dtype):
    cell = "dense" if method == "dense" else get(method).cell.name
    return dict(model=model_name, cell=cell, method=method, sparsity=sparsity, device=device, dtype=dtype)


def realised_sparsity(method: str, model) -> float | None:
    """What a dynamic method actually skipped since its counters were reset (None for static methods)."""
    fn = get(method).hook("realised_sparsity")
    return None if fn is None else float(fn(model))


def active_share(method: str, model) -> float | None:
    """For a method whose rule depends on the prompt (sparse attention, token pruning): the share of the positions
    scored since its counters were reset that its rule shaped; None for other methods or when nothing was served."""
    fn = get(method).hook("active_share")
    return None if fn is None else fn(model)


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

    ``timing_mode``: one of :data:`prunelib.measure.timing.MODES`, or None for the device's default
    (:func:`prunelib.measure.timing.choose_mode`; the choice and its reason are stored). ``ci_target``:
    None for ``reps`` pairs, else a relative CI half-width (or ``"auto"``) reached by adding
    pairs within ``budget_s`` seconds per comparison. The bound is costed from the pruned
    model's shapes after the timed runs, so a dynamic method is bounded by what it realised on
    the timed prompt (``extra.realised_sparsity``), and 2:4 layers count as sparse only where
    their kernel engaged (``extra.kernel``, ``extra.kernel_fallback``). A roofline slower than a
    measured time re-measures a measured spec once, and otherwise flags the row
    (``extra.bound_flag``). Memory (``extra.mem_peak_bytes``, ``weight_bytes``,
    ``kv_bytes_per_token``, each beside its ``*_pred``) is measured per model (``*_dense``).
    """
    from prunelib.pruning.semistructured import engaged_shape, kernel_info

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
                               bound_flag=flag, runtime="pytorch", threads=torch.get_num_threads(), timing_mode=mode,
                               timing_mode_reason=mode_reason,
                               ci_target=c.target, ci_half_width=c.half_width, ci_stop=c.stop, mem_mode=mem_mode,
                               **mem, **kernel_info(pruned),
                               samples_dense=c.base.samples, samples_pruned=c.cand.samples)))


def run(model_name: str = EMBEDDED, methods=("last_n",), sparsities=(0.25,), *, phases=("prefill", "decode"),
        batches=(1,), lengths=(512,), reps=20, preset: str | None = "quick", calib_n=32, calib_len=256, seed=0,
        device="cpu", dtype="float32", store: ResultsStore | None = None, timing_mode: str | None = None,
        ci_target=None, budget_s: float = timing.BUDGET_S, fidelity: bool | tuple = True, runtime: str = "pytorch",
        export_dtype: str = engine_rows.DEFAULT_EXPORT_DTYPE, threads: int | None = None, baseline_seeds: int = 1,
        **options) -> pd.DataFrame:
    """The sweep. Returns every stored row of this model (a tidy DataFrame).

    ``sparsities``: values in each method's unit, or ``"ladder"``: every rung of each method's declared ladder.

    ``baseline_seeds``: a random baseline (a method registered with ``baseline=None``) is also drawn at seeds
    0..baseline_seeds-1 besides ``seed``, so that a criterion is compared with the spread of random draws
    (:func:`prunelib.results.summary.versus_random`); those extra draws are scored (quality and fidelity), not
    timed: a random draw of the same sparsity has the same shapes, so its speed does not depend on the seed.

    ``fidelity``: also score each pruned model's KL and NLL change against the dense model
    (:mod:`prunelib.measure.fidelity`, about 10 s per model and domain on 2 cores): True on both default domains
    (PTB, WikiText-2), or a list of them (``make demo`` scores PTB only: band targeting reads PTB); False or [] for
    none. A rule that acts on long prompts is also scored on "ptb-long", where it runs.

    ``timing_mode``, ``ci_target``, ``budget_s``: how each comparison is timed (see :func:`speed_rows`).

    ``runtime``: ``"pytorch"`` (default) times the models as they are; ``"llama.cpp"`` exports each to GGUF at
    ``export_dtype`` and times it in llama.cpp at ``threads`` threads, storing whether it loads at all
    (:func:`prunelib.run.engine_rows.engine_speed_rows`); quality is scored on the PyTorch model either way.
    """
    store = ResultsStore() if store is None else store
    checks.run_args(methods, sparsities, phases_=phases, batches=batches, lengths=lengths, reps_=reps, preset=preset,
                    calib_n=calib_n, calib_len=calib_len, seed=seed, options_=options, ci_target_=ci_target,
                    budget_s=budget_s, fidelity=fidelity, timing_mode=timing_mode, device=device,
                    dtype=dtype, baseline_seeds=baseline_seeds)  # before any work
    engine_rows.check_runtime(runtime, export_dtype, threads, batches, device)
    domains = checks.fidelity_domains(fidelity)
    store.check_writable()  # a read-only folder or a full disk, refused before scoring
    model, tok = load_model(model_name, device=device, dtype=dtype)
    checks.model_args(model, methods, sparsities, lengths, phases)  # per-method ranges, positions: nothing stored yet
    plan = [(m, s, k) for m in methods for s in (rungs(m, model) if sparsities == checks.LADDER else sparsities)
            for k in seeds_of(m, seed, baseline_seeds)]
    cals = {}
    text = timing_text(tok, batches, lengths, seed=seed + 1)
    dense_q = scoring.evaluate(model, tok, preset=preset, store=store, model_name=model_name) if preset else None
    bar = tqdm(total=len(plan), desc="prune, time, score")  # one bar for the sweep
    for method, sparsity, k in plan:
        bar.set_postfix_str(f"{method} s={sparsity:g}" + (f" seed {k}" if k != seed else ""))
        if k not in cals:
            cals[k] = calibration_batch(tok, n=calib_n, length=calib_len, seed=k) if tok is not None else None
        pruned, report = prune(model, method, sparsity, calibration=cals[k], seed=k, **options)
        extra = {"removed": report.removed, "calibration": {"n": calib_n, "length": calib_len, "seed": k},
                 "options": options}
        timed = k == seed  # an extra random draw is scored, not timed (same shapes, so the same speed)
        if timed and runtime == "pytorch":
            speed_rows(store, model_name, model, pruned, method, sparsity, phases=phases, batches=batches,
                       lengths=lengths, reps=reps, extra=extra, text=text, timing_mode=timing_mode,
                       ci_target=ci_target, budget_s=budget_s)
        elif timed:
            ids = text[0] if text is not None else torch.randint(0, model.config.vocab_size, (max(lengths) + 1,),
                                                                 generator=torch.Generator().manual_seed(seed))
            engine_rows.engine_speed_rows(store, model_name, model, pruned, method, sparsity, report.cell,
                                          ids=ids, phases=phases, lengths=lengths, reps=reps,
                                          export_dtype=export_dtype, threads=threads, tokenizer=tok,
                                          ci_target=ci_target, budget_s=budget_s, extra=extra)
        if preset:
            ModelAdapter(pruned).reset_stats()
            q = scoring.evaluate(pruned, tok, preset=preset, store=store, model_name=model_name,
                                 batch_size=QUALITY_BATCH, cell=report.cell, method=method,
                                 sparsity=sparsity, extra=extra)
            _store_loss(store, model_name, method, sparsity, report.cell, dense_q, q, device, dtype, preset,
                        realised_sparsity(method, pruned), k, options, active_share(method, pruned))
        if domains and tok is not None:
            # a rule that acts on long prompts is also scored where it runs: 1536 tokens prefilled, 512 scored
            long = ("ptb-long",) if fidelity_mod.long_prompt_rule(method) else ()
            fidelity_mod.measure(model, pruned, tok, store=store, model_name=model_name, method=method,
                                 sparsity=sparsity, cell=report.cell, seed=k, extra=extra, domains=domains + long)
        del pruned
        bar.update()
    bar.close()
    df = store.load()
    return df[df.model == model_name].reset_index(drop=True)


def seeds_of(method: str, seed: int, baseline_seeds: int = 1) -> list[int]:
    """The seeds ``method`` runs at: ``seed``, and for a random baseline with ``baseline_seeds`` > 1 also
    0..baseline_seeds-1 (``seed`` first). 1, the default, is the one seed asked for."""
    extra = range(baseline_seeds) if get(method).baseline is None and baseline_seeds > 1 else ()
    return [seed] + [k for k in extra if k != seed]


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
        df = scoring.evaluate(m, tok, ["wikitext"], limit=docs, batch_size=1, max_length=max_length, store=store,
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
                        "ci": "paired_bootstrap", "iters": scoring.BOOTSTRAP_ITERS, "seed": seed,
                        "names_scores": True})


def _store_loss(store, model_name, method, sparsity, cell, dense_q, q, device, dtype, preset, realised=None, seed=0,
                options=None, active=None):
    """The quality-loss row: value, the paired-bootstrap 95% CI (or ±1.96 se, labelled ``unpaired``, where a
    score has no per-document outcomes), the independent-error se, and what defines the pruned model."""
    key = _loss_key(dense_q.config_hash, q.config_hash, seed)
    if store.has(key, "quality_loss_pct"):
        return
    r = lossstats.quality_loss(dense_q, q, store=store, seed=seed)
    seconds = {e["task"]: e.get("seconds") for e in q.extra  # the pruned model's scoring time, as stored
               if e.get("task") in set(r["per_task"].task) | {scoring.PERPLEXITY_TASK}}
    per_task = {t.task: {"loss": t.loss_pct, "stderr": t.stderr_pct,
                         "ci": [getattr(t, "ci_low", None), getattr(t, "ci_high", None)]} for t in r["per_task"].itertuples()}
    store.append(dict(model=model_name, cell=cell, method=method, sparsity=sparsity, phase="quality", device=device,
                      dtype=dtype, metric="quality_loss_pct", value=r["loss_pct"], ci_low=r["ci_low"],
                      ci_high=r["ci_high"], config_hash=key,
                      extra={"stderr": r["stderr_pct"], "ci_method": r["ci_method"], "unpaired_tasks": r["unpaired_tasks"],
                             "bootstrap": r["bootstrap"], "per_task": per_task, "preset": preset, "seed": seed,
                             "options": options or {}, "realised_sparsity_scoring": realised,
                             "active_share_scoring": active,
                             "ppl_dense": r["ppl_dense"], "ppl_pruned": r["ppl_pruned"],
                             "seconds": sum(v for v in seconds.values() if v is not None),
                             "scores": {"dense": _by_task(dense_q), "pruned": _by_task(q)}}))


def _by_task(scores: pd.DataFrame) -> dict:
    """``{task: config hash}`` of one model's score rows."""
    return {e["task"]: h for e, h in zip(scores.extra, scores.config_hash)}
