"""``make gpu-check``: one offline command that validates the speed axis on a GPU, within a deadline.

A random-weight Llama-3.1-8B (bf16) against one pruned copy per taxonomy cell, each timed
dense-versus-pruned (ABBA pairs, bootstrap CI) in three modes (:mod:`prunelib.run.gpucells`):
``eager`` (DynamicCache), ``static`` (eager over a StaticCache) and ``graph`` (that static step as
a CUDA graph; ``compiled``, torch.compile fullgraph, for methods that refuse graphs), at prefill
B=1 S=2048 and decode B=1 / B=16 with a KV cache of 2048, beside the roofline bound on the
device's spec. Latency only: the weights are random, so no quality number comes from here. Cells:

==================  =====================================================================
dense               the model against itself (the CI must contain 1)
static depth        ``last_n`` 25% (the last quarter of the layers)
static width        ``width_random`` 25%, kept sizes rounded to 64
hidden width        ``slicegpt_random`` 25% (SliceGPT structure with a random rotation, no PCA)
2:4                 ``sparse24_random`` (semi-structured sparse kernels where they engage)
low rank            every projection replaced by a rank-r pair, r set by shape for 25% fewer
                    parameters (random factors: no SVD of random weights)
dynamic depth       ``dyn_depth_random`` 25% (hashed routes, no router training)
token pruning       ``token_prune_random`` 25%
block-sparse attn   ``sparse_attn_block`` 50%
==================  =====================================================================

Columns per cell and shape: speedup and 95% CI per mode, the roofline bound, efficiency
(speedup / bound), dense time against the dense roofline, each mode's untimed set-up (compile,
capture), peak memory against ``predicted_memory``, the 2:4 kernel that ran, the host-time share
of the eager step, ``timing_mode_reason``, and the error of what could not run (a cell that fails
is rows, never a crash). ``--budget SECONDS`` (default 420, from the start, model creation
included) is enforced: what would not fit is a row saying ``skipped: budget``. The CSV is written
as rows finish, so a run killed midway keeps what it measured.

It needs nothing installed beyond what ``import prunelib`` needs, and first prints the torch,
CUDA, GPU and cuSPARSELt it found. ``--smoke`` runs the same code on the CPU with a tiny Llama
in bfloat16 in seconds (the test suite runs it): its 2:4 cell runs cuSPARSELt's code path with
the kernels replaced by reference CPU code (:mod:`prunelib.run.fakekernels`); its ``graph``
cells fail with the error that CUDA graphs need CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time

import pandas as pd
import torch

from prunelib.core.config import results_dir
from prunelib.cost import hardware
from prunelib.run.gpucells import (CELLS, FULL, SMOKE, Budget, _lowrank, build, cell_rows, run_cell,  # noqa: F401
                                   tiny_model)

BUDGET_S = 420.0


def environment(device=None) -> dict:
    """What this machine has: torch, its CUDA, the GPU, cuSPARSELt, transformers (printed first, kept in the CSV)."""
    import transformers

    env = {"torch": torch.__version__, "cuda": torch.version.cuda or "none (a CPU build of torch)",
           "transformers": transformers.__version__, "python": platform.python_version(), "gpu": "none"}
    if torch.cuda.is_available():
        dev = torch.device(device if device and str(device).startswith("cuda") else "cuda")
        p = torch.cuda.get_device_properties(dev)
        env["gpu"] = f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
    try:
        env["cusparselt"] = str(torch.backends.cusparselt.version()) if torch.backends.cusparselt.is_available() \
            else "none"
    except Exception:  # noqa: BLE001 - a build without the module
        env["cusparselt"] = "none"
    return env


def describe(env: dict) -> str:
    return (f"gpu-check found: torch {env['torch']}, CUDA {env['cuda']}, GPU {env['gpu']}, cuSPARSELt "
            f"{env['cusparselt']}, transformers {env['transformers']}, Python {env['python']}")


def _write(rows: list[dict], csv, extra: dict) -> None:
    """The table so far, replacing the file atomically (a run killed midway keeps every finished row)."""
    if csv is None:
        return
    tmp = f"{csv}.tmp"
    pd.DataFrame(rows).assign(**extra).to_csv(tmp, index=False)
    os.replace(tmp, csv)


def run(smoke: bool = False, device: str | None = None, csv=None, cells=None, budget: float | None = None,
        **overrides) -> pd.DataFrame:
    """Every cell (or the named ``cells``) at every shape within ``budget`` seconds from now (None: no
    deadline); returns the table and writes ``csv`` as rows finish."""
    from prunelib.model.models import load_model
    from prunelib.run.fakekernels import fake_cusparselt

    deadline = Budget(budget)
    cfg = dict(SMOKE if smoke else FULL, **overrides)
    device = device or ("cpu" if smoke else "cuda")
    env = environment(device)
    if smoke:
        dense = tiny_model().to(device, getattr(torch, cfg["dtype"]))
    else:
        dense, _ = load_model(cfg["model"], device=device, dtype=cfg["dtype"])
    done, threads = [], torch.get_num_threads()
    torch.set_num_threads(cfg.get("threads") or threads)
    try:
        # at the thread count the cells run with (a CPU is measured: not when the budget is spent already)
        hw = hardware.for_device(device) if deadline.left() > 0 else hardware.HardwareSpec("not measured", {}, 0.0)
        extra = dict(hw=hw.name, device=str(device), model=cfg["model"], dtype=cfg["dtype"], torch=env["torch"],
                     cuda=env["cuda"], gpu=env["gpu"])
        with fake_cusparselt() if smoke else contextlib.nullcontext():
            for cell, method, sparsity, options in CELLS:
                if cells and cell not in cells:
                    continue
                partial = []

                def live(row, partial=partial):
                    partial.append(row)
                    _write(done + partial, csv, extra)

                done += run_cell(dense, cell, method, sparsity, options, cfg, hw, deadline, on_row=live)
                _write(done, csv, extra)
    finally:
        torch.set_num_threads(threads)
    return pd.DataFrame(done).assign(**extra)


COLUMNS = ["cell", "phase", "batch", "length", "graph_speedup", "graph_ci", "compiled_speedup", "compiled_ci",
           "eager_speedup", "eager_ci", "static_speedup", "static_ci", "bound", "graph_efficiency",
           "compiled_efficiency", "eager_efficiency", "eager_dense_vs_roofline", "graph_dense_vs_roofline",
           "host_share", "mem_peak_gb", "mem_pred_gb", "kernel", "skipped", "error"]


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, seconds (what the tests run)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--csv", default=None, help="default: <results>/gpu_check[_smoke].csv")
    p.add_argument("--budget", type=float, default=None,
                   help=f"deadline in seconds from the start, model creation included (default {BUDGET_S:.0f}; "
                        "none with --smoke); what would not fit is a row saying 'skipped: budget'")
    p.add_argument("--compare-budget", type=float, default=None,
                   help="seconds of timed loop per comparison at most (default 4)")
    p.add_argument("--cells", default=None, help="comma-separated subset of: " + ", ".join(c[0] for c in CELLS))
    p.add_argument("--debug", action="store_true", help="print the traceback of every failing cell")
    p.add_argument("--estimate", default=None, metavar="SPEC",
                   help="no GPU: estimate each cell's seconds on SPEC (e.g. h200-sxm) from host costs measured "
                        "here and the roofline (prunelib.run.gpubudget)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    env = environment(a.device)
    print(describe(env), flush=True)
    if a.estimate:
        return _estimate(a.estimate, a.csv)
    if not a.smoke and not torch.cuda.is_available():
        raise SystemExit(f"gpu-check needs a CUDA device (none here: {describe(env)}); `--smoke` runs the same "
                         "code on the CPU")
    known = [c[0] for c in CELLS]
    cells = a.cells.split(",") if a.cells else None
    if cells and set(cells) - set(known):
        raise SystemExit(f"--cells {sorted(set(cells) - set(known))} unknown; known: {known}")
    if a.budget is not None and a.budget <= 0:
        raise SystemExit(f"--budget must be a positive number of seconds, got {a.budget}")
    csv = a.csv or results_dir() / f"gpu_check{'_smoke' if a.smoke else ''}.csv"
    csv = type(results_dir())(csv)
    csv.parent.mkdir(parents=True, exist_ok=True)
    budget = a.budget if a.budget is not None else (None if a.smoke else BUDGET_S)
    over = {"debug": a.debug, **({"budget_s": a.compare_budget} if a.compare_budget else {})}
    df = run(a.smoke, a.device, csv, cells, None if budget is None else budget - (time.perf_counter() - t0), **over)
    cols = [c for c in COLUMNS if c in df.columns]
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.max_colwidth", 60):
        print(df[cols].round(3).to_string(index=False))
    print(f"\n{df.hw.iloc[0]} ({df.device.iloc[0]}), {df.model.iloc[0]} {df.dtype.iloc[0]}; "
          f"{time.perf_counter() - t0:.0f} s{f' of a {budget:.0f} s budget' if budget else ''}; CSV: {csv}")
    return df


def _estimate(spec: str, csv) -> pd.DataFrame:
    from prunelib.run.gpubudget import estimate

    df = estimate(spec)
    print(df.round(1).to_string(index=False))
    print(f"\nESTIMATE for {df.attrs['spec']} (nothing ran on a GPU): model creation ~{df.attrs['model_creation_s']:.0f} s, "
          f"all cells ~{df.attrs['total_s']:.0f} s against a {BUDGET_S:.0f} s budget")
    if csv:
        df.to_csv(csv, index=False)
    return df


if __name__ == "__main__":
    main()
