"""``make demo`` / ``make sweep``: run the notebooks through papermill into build/notebooks/.

Every measurement lands in the results store, so an interrupted demo resumes where it
stopped. ``--full`` (``make sweep``) uses full parameters: every method, random baselines
included, five sparsities, two lengths.

``make demo`` covers every axis (each axis notebook, the baseline and the Pareto notebook) with its strongest
criterion, where the frontier is drawn: three rungs for each headline family (ShortGPT, FLAP width, the layer
router; :data:`HEADLINE_RUNGS`), one for every other cell. Its time is dominated by the quick preset's scoring of
each model (14 scorings) and the timing of each rung (~30 s). From a clean store on 2026-12-02 it took 2917 s and
2935 s (docs/RESULTS.md, stop 26), then, with answer choices sharing their question's forward
(:mod:`prunelib.measure.sharedprefix`), 3340 s on a host 1.4-1.5x slower (about 37-41 min at stop 26's speed;
stop 27): the 30-minute budget is not met, and even half the documents (much wider quality CIs) would not meet it.
``demo took ... s`` is printed at the end,
and what it leaves out (:data:`SKIPPED`) after it.

Plotly figures carry HTML with plotly.js embedded once per notebook and a PNG fallback
(:func:`prunelib.report.notebook_figures`, set by every notebook's first cell; ``PLOTLY_RENDERER``
overrides it), so the executed notebooks, their HTML rendering (``make report``) and a plain
``jupyter nbconvert --to html`` show the figures offline. Each notebook's
library logs go to ``<notebook>.log`` beside it (:func:`prunelib.report.route_logs`).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from prunelib.core.config import REPO_ROOT

#: the demo scores the KL / NLL change on PTB only (band targeting reads PTB; WikiText-2 would add ~10 s a model)
QUICK_SWEEP = dict(lengths=[512], reps=5, quality_preset="quick", fidelity_domains=["ptb"])
#: the three headline families get three rungs each, chosen by band targeting on the embedded model (2026-12-02,
#: ``python -m prunelib.experiment --target-bands --methods shortgpt,dyn_depth_router,width_flap --phases none``,
#: docs/RESULTS.md): ShortGPT loses 11.7% at 1 of 30 layers (5-16%) and 23.6% at 3 (17-26%), 2 lies between;
#: FLAP 6.7% at 1 of 24 MLP groups of 64 (5-16%), 4 groups aimed at 17-26%; the layer router 20.9% at 5% of
#: token-layers (17-26%), so its other two rungs lie below, in its ladder's 1% steps (1% and 3%), where the 0-4%
#: and 5-16% bands must be if it reaches them (10 and 15%, the demo's rungs until 2026-12-02, lay past every band).
HEADLINE_RUNGS = {"shortgpt": [1 / 30, 2 / 30, 3 / 30], "width_flap": [1 / 24, 2 / 24, 4 / 24],
                  "dyn_depth_router": [0.01, 0.03, 0.05]}
QUICK = {
    "baseline": dict(batches=[1], lengths=[128, 512], reps=5, quality_preset="quick"),
    "static_depth": dict(QUICK_SWEEP, methods=["shortgpt"], sparsities=HEADLINE_RUNGS["shortgpt"]),
    # round_to=None: its rungs keep whole groups of 64 channels already, so the rounded copy would re-time equal shapes
    "static_width": dict(QUICK_SWEEP, methods=["width_flap"], sparsities=HEADLINE_RUNGS["width_flap"], round_to=None),
    "hidden_width": dict(QUICK_SWEEP, methods=["slicegpt"], sparsities=[0.25]),
    "sparse24": dict(QUICK_SWEEP, methods=["sparse24_wanda"], sparsities=[0.5]),  # 2:4 on every layer
    "lowrank": dict(QUICK_SWEEP, methods=["lowrank_svdllm"], sparsities=[0.25]),
    "dynamic_depth": dict(QUICK_SWEEP, methods=["dyn_depth_router"], sparsities=HEADLINE_RUNGS["dyn_depth_router"]),
    "token_pruning": dict(QUICK_SWEEP, methods=["token_prune_attn"], sparsities=[0.5]),
    # scored where its prefill rule runs, by the ptb-long fidelity windows: not by the quick suite, whose short prompts
    # leave its rule idle (it shaped 39% of the scored tokens there, so the loss was flagged inactive and left out of
    # every band, for 140 s of scoring), nor by a long-context perplexity article
    "sparse_attention": dict(QUICK_SWEEP, methods=["sparse_attn_block"], sparsities=[0.75], lengths=[2048], reps=5,
                             long_context_docs=0, quality_preset=None),
    "pareto": {},
}
#: notebooks outside the demo's 30 minutes, and how to run them (``make demo`` prints this at its end)
SKIPPED = {"engines": "the llama.cpp runtime beside PyTorch (ShortGPT and magnitude width at 25% timed in both: 745 s "
                      "on a busy 2-core box, after `make setup-engines`, which built llama.cpp in 21 min): "
                      "python -m prunelib.demo --only engines"}
#: every notebook --only may name: the demo's, and those it skips, with their parameters
NOTEBOOKS = {**{name: {} for name in QUICK},
             "engines": dict(methods=["shortgpt", "width_magnitude"], sparsities=[0.25], lengths=[512], reps=6)}
#: make sweep: every method of every axis at every rung of its ladder (resumable: each rung lands in the store)
#: each random baseline at five seeds (scored, not timed): one random draw decides nothing (issue 26)
FULL_SWEEP = dict(batches=[1, 8], reps=30, quality_preset="full", calib_n=128, calib_len=2048, baseline_seeds=5)
FULL = {
    "baseline": dict(batches=[1, 4, 16], lengths=[128, 512, 2048], reps=30, quality_preset="full"),
    "static_depth": dict(FULL_SWEEP, methods=["last_n", "shortgpt", "angular", "shortgpt_attn", "shortgpt_mlp",
                                              "depth_random", "depth_random_attn", "depth_random_mlp"],
                         ladder=True, lengths=[512, 2048]),
    "static_width": dict(FULL_SWEEP, methods=["width_magnitude", "width_wanda_sp", "width_flap", "width_random"],
                         ladder=True, lengths=[512, 2048], round_to=64),
    "hidden_width": dict(FULL_SWEEP, methods=["slicegpt", "slicegpt_random"], ladder=True,
                         lengths=[512, 2048]),
    "sparse24": dict(FULL_SWEEP, methods=["sparse24_magnitude", "sparse24_wanda", "sparse24_sparsegpt",
                                          "sparse24_random"], ladder=True, lengths=[512, 2048]),
    "lowrank": dict(FULL_SWEEP, methods=["lowrank_svd", "lowrank_svdllm", "lowrank_random"], ladder=True,
                    lengths=[512, 2048]),
    "dynamic_depth": dict(FULL_SWEEP, methods=["dyn_depth_router", "dyn_depth_router_mlp", "dyn_depth_random",
                                               "dyn_depth_random_mlp"], ladder=True, lengths=[512, 2048]),
    "token_pruning": dict(FULL_SWEEP, methods=["token_prune_attn", "token_prune_random"], ladder=True,
                          lengths=[512, 2048]),
    "sparse_attention": dict(FULL_SWEEP, methods=["sparse_attn_block", "sparse_attn_window", "sparse_attn_random"],
                             ladder=True, lengths=[2048, 4096]),
    "pareto": {},
}


def execute(name: str, out: Path, params: dict, progress_bar: bool = True) -> Path:
    """Run ``notebooks/<name>.ipynb`` with ``params`` into ``out/<name>.ipynb`` (papermill); returns that path."""
    import papermill as pm

    from prunelib.report import LOG_ENV

    path = Path(out) / f"{name}.ipynb"
    env = {LOG_ENV: str(path.with_suffix(".log"))}  # the kernel's library logs, beside the notebook (the first
    # cell's report.route_logs also sets plotly's renderers: HTML with plotly.js inline, a PNG fallback)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits them
    try:
        pm.execute_notebook(str(REPO_ROOT / "notebooks" / f"{name}.ipynb"), str(path), parameters=params,
                            cwd=str(REPO_ROOT / "notebooks"), progress_bar=progress_bar, kernel_name="python3")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--only", default=None, metavar="NOTEBOOKS",
                   help=f"comma-separated notebooks to run, with the preset's parameters; allowed: {sorted(NOTEBOOKS)}")
    p.add_argument("--out", default=str(REPO_ROOT / "build" / "notebooks"))
    a = p.parse_args(argv)
    preset = dict(FULL if a.full else QUICK)
    if a.only is not None:
        names = [n.strip() for n in a.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in NOTEBOOKS]
        if unknown or not names:
            p.error(f"--only={a.only!r}: unknown notebooks {unknown}; allowed: {sorted(NOTEBOOKS)}")
        preset = {n: (FULL if a.full else QUICK).get(n, NOTEBOOKS[n]) for n in names}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for name, params in preset.items():
        t0 = time.perf_counter()
        print(f"== {name} {params}", flush=True)
        execute(name, out, params)
        print(f"   {name} took {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"demo took {time.perf_counter() - start:.0f} s; executed notebooks in {out}")
    for name, why in SKIPPED.items():
        if name not in preset:
            print(f"skipped {name}: {why}")


if __name__ == "__main__":
    main()
