"""``make demo`` / ``make sweep``: run the notebooks through papermill into build/notebooks/.

Every measurement lands in the results store, so an interrupted demo resumes where it
stopped. ``--full`` (``make sweep``) uses full parameters: every method, random baselines
included, five sparsities, two lengths.

``make demo`` covers every axis (each axis notebook, the baseline and the Pareto notebook)
with its strongest criterion at one sparsity, where the frontier is drawn, and is sized for
30 minutes on 2 quiet CPU cores. Measured from a clean store on 2026-12-01
(``PRUNELIB_RESULTS=$(mktemp -d) make demo``, quiet 2-core box): 1418 s = 23.6 minutes;
baseline 197 s, axis notebooks 107-162 s each (8 pruned models: pruning, 6 timing
repetitions, the quick preset's ~80 s of scoring and fidelity), sparse attention 212 s
(2048 tokens and one long-context perplexity article), Pareto 14 s. ``demo took ... s`` is
printed at the end. (Before: 40 minutes with two sparsities per axis and 10 repetitions.)

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

QUICK_SWEEP = dict(lengths=[512], reps=6, quality_preset="quick")
QUICK = {
    "baseline": dict(batches=[1, 4], lengths=[128, 512], reps=6, quality_preset="quick"),
    "static_depth": dict(QUICK_SWEEP, methods=["shortgpt"], sparsities=[0.25]),
    "static_width": dict(QUICK_SWEEP, methods=["width_flap"], sparsities=[0.1], round_to=64),
    "hidden_width": dict(QUICK_SWEEP, methods=["slicegpt"], sparsities=[0.25]),
    "sparse24": dict(QUICK_SWEEP, methods=["sparse24_wanda"], sparsities=[0.5]),  # 2:4 on every layer
    "lowrank": dict(QUICK_SWEEP, methods=["lowrank_svdllm"], sparsities=[0.25]),
    "dynamic_depth": dict(QUICK_SWEEP, methods=["dyn_depth_router"], sparsities=[0.25]),
    "token_pruning": dict(QUICK_SWEEP, methods=["token_prune_attn"], sparsities=[0.5]),
    "sparse_attention": dict(QUICK_SWEEP, methods=["sparse_attn_block"], sparsities=[0.75], lengths=[2048], reps=5,
                             long_context_docs=1),
    "pareto": {},
}
#: make sweep: every method of every axis at every rung of its ladder (resumable: each rung lands in the store)
FULL_SWEEP = dict(batches=[1, 8], reps=30, quality_preset="full", calib_n=128, calib_len=2048)
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
    p.add_argument("--out", default=str(REPO_ROOT / "build" / "notebooks"))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for name, params in (FULL if a.full else QUICK).items():
        t0 = time.perf_counter()
        print(f"== {name} {params}", flush=True)
        execute(name, out, params)
        print(f"   {name} took {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"demo took {time.perf_counter() - start:.0f} s; executed notebooks in {out}")


if __name__ == "__main__":
    main()
