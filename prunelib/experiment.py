"""``python -m prunelib.experiment``: prune, time and score methods at sparsities into the store, run a sweep
spec (``--spec``), or print what is stored (``--table``).

The experiment API in one place: :func:`run` and :func:`speed_rows` (:mod:`prunelib.run.pipeline`, which
documents the rows written), :func:`summary`, :func:`versus_random` and :func:`print_table`
(:mod:`prunelib.results.summary`).
"""
from __future__ import annotations

import argparse

import torch

from prunelib import sweep
from prunelib.core.store import ResultsStore
from prunelib.measure import timing
from prunelib.model.models import EMBEDDED
from prunelib.results.summary import print_table, summary, versus_random  # noqa: F401
from prunelib.results.runtimes import for_runtime, method_runtime_table
from prunelib.run import checks, engine_rows, targeting
from prunelib.runtime.gguf_export import EXPORT_DTYPES
from prunelib.run.pipeline import (long_context_perplexity, realised_sparsity, run, speed_rows,  # noqa: F401
                                   timing_modes, timing_text)


def _ci_target(text: str):
    """``--ci-target``: 'auto', 'none' or a fraction in (0, 1); anything else a usage error naming it."""
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        v = float(text)
    except ValueError:
        v = text
    return checks.ci_target(v)


def main(argv=None):
    p = argparse.ArgumentParser(description="prune, time and score; results go to the store")
    p.add_argument("--model", default=EMBEDDED)
    p.add_argument("--methods", default="last_n,shortgpt,angular")
    p.add_argument("--sparsities", default="0.1,0.25,0.4",
                   help="comma-separated, in each method's unit, or 'ladder': every rung of each method's ladder")
    p.add_argument("--lengths", default="512")
    p.add_argument("--batches", default="1")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--preset", default="quick")
    p.add_argument("--seed", type=int, default=0, help="calibration windows and random baselines")
    p.add_argument("--baseline-seeds", type=int, default=1,
                   help="a random baseline is also drawn at seeds 0..n-1 (scored, not timed), so that a criterion is "
                        "compared with the spread of random draws; 5 in sweeps")
    p.add_argument("--phases", default="prefill,decode", help="'none' scores quality only")
    p.add_argument("--round-to", type=int, default=None, help="width / low-rank: round kept sizes to 8 or 64")
    p.add_argument("--timing-mode", default="auto", choices=["auto", *timing.MODES],
                   help="auto: graph on CUDA where the method allows it, else compiled, else eager; eager on CPU")
    p.add_argument("--ci-target", default="auto",
                   help="relative 95%% CI half-width to reach by adding pairs (auto: 3%% decode, 5%% prefill); "
                        "'none': exactly --reps pairs")
    p.add_argument("--budget", type=float, default=timing.BUDGET_S, help="seconds of timing per comparison at most")
    p.add_argument("--runtime", default="pytorch", choices=engine_rows.RUNTIMES,
                   help="time in PyTorch, or export each model to GGUF and time it in llama.cpp (make setup-engines)")
    p.add_argument("--export-dtype", default=engine_rows.DEFAULT_EXPORT_DTYPE, choices=EXPORT_DTYPES,
                   help="with --runtime llama.cpp: the GGUF weights' dtype")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of the timing: torch's, and with --runtime llama.cpp both engines' (default: torch's)")
    p.add_argument("--no-fidelity", action="store_true", help="skip the KL / NLL change against dense (10 s a model "
                                                              "and domain)")
    p.add_argument("--fidelity-domains", default="ptb,wikitext2",
                   help="held-out texts of the KL / NLL change against dense (comma-separated: ptb, wikitext2)")
    p.add_argument("--calib-n", type=int, default=32, help="calibration windows of the criteria")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--table", action="store_true",
                   help="measure nothing: print the stored table (first batch and length) and each criterion vs random")
    p.add_argument("--target-bands", action="store_true",
                   help="per method, find the ladder rungs whose quick-suite loss lands in each paper band (0-4, "
                        "5-16, 17-26%%): bisect on fidelity, confirm with the quick suite, then time what was found")
    p.add_argument("--scorings", type=int, default=6, help="with --target-bands: quick-suite scorings per method at most")
    p.add_argument("--spec", help="run a sweep spec (YAML/TOML, see docs/SWEEPS.md) instead of the options above")
    p.add_argument("--executor", choices=("inprocess", "local", "ray"), default="inprocess",
                   help="with --spec: in this process, a local process pool, or a Ray cluster")
    p.add_argument("--workers", type=int, default=1, help="with --spec: pool processes (local) or CPUs of a new "
                                                          "local Ray instance (ray without --address)")
    p.add_argument("--address", default=None, help="with --executor ray: the cluster ('auto', host:port)")
    a = p.parse_args(argv)
    if a.spec:  # the spec says what to run: a flag of a single run beside it would be ignored
        ignored = [f"--{k.replace('_', '-')}={getattr(a, k)!r}" for k in vars(a)
                   if k not in ("spec", "executor", "workers", "address") and getattr(a, k) != p.get_default(k)]
        if ignored:
            p.error(f"spec={a.spec!r} is not allowed with {', '.join(ignored)}: expected the spec alone (with "
                    "--executor, --workers, --address); put models, methods and sparsities in the spec")
        return sweep.main(spec=a.spec, executor=a.executor, workers=a.workers, address=a.address)
    try:  # every argument checked before the model loads; the per-method ranges right after it (run)
        phases = () if a.phases == "none" else tuple(checks.csv("phases", a.phases))
        methods = checks.csv("methods", a.methods)
        sparsities = (checks.LADDER if a.sparsities.strip() == checks.LADDER
                      else checks.csv("sparsities", a.sparsities, float))
        batches, lengths = checks.csv("batches", a.batches, int), checks.csv("lengths", a.lengths, int)
        options = {"round_to": a.round_to} if a.round_to is not None else {}
        preset = None if a.preset == "none" else a.preset
        fidelity = list(checks.fidelity_domains(checks.csv("fidelity_domains", a.fidelity_domains)))
        checks.run_args(methods, sparsities, phases_=phases, batches=batches, lengths=lengths, reps_=a.reps,
                        preset=preset, seed=a.seed, options_=options, budget_s=a.budget, calib_n=a.calib_n,
                        calib_len=a.calib_len, baseline_seeds=a.baseline_seeds)
        _ci_target(a.ci_target)
        engine_rows.check_runtime(a.runtime, a.export_dtype, a.threads, batches)
        if a.threads is not None:
            checks.integer("threads", a.threads)
            torch.set_num_threads(a.threads)
        if a.target_bands:
            checks.integer("scorings", a.scorings)
            ResultsStore().check_writable()  # before any model loads
            return target_and_time(a.model, methods, a.scorings, phases=phases, batches=batches, lengths=lengths,
                                   reps=a.reps, seed=a.seed, budget_s=a.budget, **options)
        if a.table:  # measure nothing
            df = ResultsStore().load()
            if not (df.model == a.model).any():
                stored = sorted(set(df.model))
                checks.fail("model", a.model, f"a model with stored rows: {stored}" if stored else
                            "a model with stored rows, and the store is empty (run without --table first)")
            df = df[df.model == a.model]
        else:
            df = run(a.model, methods, sparsities, phases=phases, batches=batches, lengths=lengths, reps=a.reps,
                     preset=preset, seed=a.seed, timing_mode=None if a.timing_mode == "auto" else a.timing_mode,
                     ci_target=_ci_target(a.ci_target), budget_s=a.budget, runtime=a.runtime,
                     export_dtype=a.export_dtype, threads=a.threads, fidelity=not a.no_fidelity and fidelity,
                     calib_n=a.calib_n, calib_len=a.calib_len, baseline_seeds=a.baseline_seeds, **options)
    except checks.InputError as err:
        p.error(str(err))
    print_table(for_runtime(df, a.runtime), batches[0], lengths[0])
    if a.runtime != "pytorch" or (df.metric == "loadable").any():
        print("\nmethod x runtime (speedups over dense with 95% CIs, roofline bound, efficiency = measured / bound):")
        print(method_runtime_table(df, lengths[0], batches[0]).round(3).to_string(index=False))


def target_and_time(model_name, methods, scorings: int = 6, *, phases=("prefill", "decode"), batches=(1,),
                    lengths=(512,), seed: int = 0, **kw):
    """Band targeting (:func:`prunelib.run.targeting.target`) for each method, then the found rungs timed; prints
    what was found, unreachable or left by the budget, and how many scorings it took against the ladder's rungs."""
    import pandas as pd

    rows = []
    options = {k: kw.pop(k) for k in ("round_to",) if k in kw}  # prune options: the search's models are the timed ones
    for method in methods:
        found, search = targeting.target(model_name, method, budget=scorings, seed=seed, **options)
        hits = [b.sparsity for b in found if b.status == "found"]
        if hits and phases:
            run(model_name, [method], hits, phases=phases, batches=batches, lengths=lengths, preset="quick",
                seed=seed, **options, **kw)
        for b in found:
            rows.append(dict(method=method, band=f"{b.band[0]}-{b.band[1]}%", status=b.status, sparsity=b.sparsity,
                             loss=b.loss, reason=b.reason, scorings=search.scorings, kl_evaluations=len(search.kls),
                             rungs=len(search.rungs)))
    t = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_colwidth", 90):
        print(t.round(3).to_string(index=False))
    return t


if __name__ == "__main__":
    main()
