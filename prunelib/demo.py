"""``make demo`` / ``make sweep``: run the notebooks through papermill into build/notebooks/.

Every measurement lands in the results store, so an interrupted demo resumes where it
stopped. ``--full`` (``make sweep``) uses full parameters. With the quick preset
``make demo`` takes about 41 minutes on 2 CPU cores (measured from a clean store: 2414 s,
3 to 6.5 minutes per axis notebook, before the sparse-attention notebook gained its
long-context perplexity cell, about a minute more): lm-eval scoring costs about a minute per pruned
model (the dense scores are computed once and cached in the store), so each axis runs its
strongest criterion at two sparsities (``make sweep`` runs every method, random baselines
included).

Plotly figures are rendered as HTML with plotly.js embedded once per notebook (renderer
``notebook``; set ``PLOTLY_RENDERER`` to override), so the executed notebooks and their
HTML rendering (``make report``) show the interactive figures offline.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .config import REPO_ROOT

QUICK_SWEEP = dict(sparsities=[0.1, 0.25], lengths=[512], reps=10, quality_preset="quick")
QUICK = {
    "baseline": dict(batches=[1, 4], lengths=[128, 512], reps=10, quality_preset="quick"),
    "static_depth": dict(QUICK_SWEEP, methods=["shortgpt"]),
    "static_width": dict(QUICK_SWEEP, methods=["width_flap"], round_to=64),
    "hidden_width": dict(QUICK_SWEEP, methods=["slicegpt"]),
    "sparse24": dict(QUICK_SWEEP, methods=["sparse24_wanda"], sparsities=[0.25, 0.5]),
    "lowrank": dict(QUICK_SWEEP, methods=["lowrank_asvd"]),
    "dynamic_depth": dict(QUICK_SWEEP, methods=["dyn_depth_router"]),
    "token_pruning": dict(QUICK_SWEEP, methods=["token_prune_attn"], sparsities=[0.25, 0.5]),
    "sparse_attention": dict(QUICK_SWEEP, methods=["sparse_attn_block"], sparsities=[0.5, 0.75], lengths=[2048],
                             reps=5, long_context_docs=2),
    "pareto": {},
}
FULL_SWEEP = dict(batches=[1, 8], reps=30, quality_preset="full", calib_n=128, calib_len=2048)
FULL = {
    "baseline": dict(batches=[1, 4, 16], lengths=[128, 512, 2048], reps=30, quality_preset="full"),
    "static_depth": dict(FULL_SWEEP, methods=["last_n", "shortgpt", "angular", "shortgpt_attn", "shortgpt_mlp",
                                                        "depth_random"],
                         sparsities=[0.1, 0.2, 0.3, 0.4, 0.5], lengths=[512, 2048]),
    "static_width": dict(FULL_SWEEP, methods=["width_magnitude", "width_wanda_sp", "width_flap", "width_random"],
                         sparsities=[0.1, 0.2, 0.3, 0.4, 0.5], lengths=[512, 2048], round_to=64),
    "hidden_width": dict(FULL_SWEEP, methods=["slicegpt", "slicegpt_random"], sparsities=[0.1, 0.2, 0.3, 0.4],
                         lengths=[512, 2048]),
    "sparse24": dict(FULL_SWEEP, methods=["sparse24_magnitude", "sparse24_wanda", "sparse24_sparsegpt",
                                          "sparse24_random"], sparsities=[0.25, 0.5], lengths=[512, 2048]),
    "lowrank": dict(FULL_SWEEP, methods=["lowrank_svd", "lowrank_asvd", "lowrank_random"],
                    sparsities=[0.1, 0.2, 0.3, 0.4, 0.5], lengths=[512, 2048]),
    "dynamic_depth": dict(FULL_SWEEP, methods=["dyn_depth_router", "dyn_depth_router_mlp", "dyn_depth_random"],
                          sparsities=[0.1, 0.2, 0.3, 0.4, 0.5], lengths=[512, 2048]),
    "token_pruning": dict(FULL_SWEEP, methods=["token_prune_attn", "token_prune_random"],
                          sparsities=[0.25, 0.5, 0.75], lengths=[512, 2048]),
    "sparse_attention": dict(FULL_SWEEP, methods=["sparse_attn_block", "sparse_attn_window", "sparse_attn_random"],
                             sparsities=[0.5, 0.75, 0.9], lengths=[2048, 4096]),
    "pareto": {},
}


def execute(name: str, out: Path, params: dict, progress_bar: bool = True) -> Path:
    """Run ``notebooks/<name>.ipynb`` with ``params`` into ``out/<name>.ipynb`` (papermill); returns that path."""
    import papermill as pm

    os.environ.setdefault("PLOTLY_RENDERER", "notebook")  # the kernel inherits it: figures as HTML, plotly.js inline
    path = Path(out) / f"{name}.ipynb"
    pm.execute_notebook(str(REPO_ROOT / "notebooks" / f"{name}.ipynb"), str(path), parameters=params,
                        cwd=str(REPO_ROOT / "notebooks"), progress_bar=progress_bar, kernel_name="python3")
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
