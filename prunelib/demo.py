"""``make demo`` / ``make sweep``: run the notebooks through papermill into build/notebooks/.

Every measurement lands in the results store, so an interrupted demo resumes where it
stopped. ``--full`` (``make sweep``) uses full parameters.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .config import REPO_ROOT

QUICK = {
    "baseline": dict(batches=[1, 4], lengths=[128, 512], reps=10, quality_preset="quick"),
    "static_depth": dict(methods=["last_n", "shortgpt", "angular", "shortgpt_attn", "shortgpt_mlp"],
                         sparsities=[0.1, 0.2, 0.3], lengths=[512], reps=10, quality_preset="quick"),
    "pareto": {},
}
FULL = {
    "baseline": dict(batches=[1, 4, 16], lengths=[128, 512, 2048], reps=30, quality_preset="full"),
    "static_depth": dict(methods=["last_n", "shortgpt", "angular", "shortgpt_attn", "shortgpt_mlp"],
                         sparsities=[0.1, 0.2, 0.3, 0.4, 0.5], batches=[1, 8], lengths=[512, 2048], reps=30,
                         quality_preset="full", calib_n=128, calib_len=2048),
    "pareto": {},
}


def main(argv=None):
    import papermill as pm

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
        pm.execute_notebook(str(REPO_ROOT / "notebooks" / f"{name}.ipynb"), str(out / f"{name}.ipynb"),
                            parameters=params, cwd=str(REPO_ROOT / "notebooks"), progress_bar=True, kernel_name="python3")
        print(f"   {name} took {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"demo took {time.perf_counter() - start:.0f} s; executed notebooks in {out}")


if __name__ == "__main__":
    main()
