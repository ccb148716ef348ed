"""``make gpu-check``: one offline command that validates the speed axis on a GPU.

A random-weight Llama-3.1-8B (bf16) against one pruned copy per taxonomy cell, each timed
dense-versus-pruned (ABBA pairs, bootstrap CI) in ``eager`` and ``graph`` (CUDA graphs over
a static KV cache) modes, at prefill B=1 S=2048 and decode B=1 / B=16 with a KV cache of
2048, beside the roofline bound on the device's spec. Latency only: the weights are random,
so no quality number comes from here. Cells (dense against each):

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

Columns: speedup and 95% CI per mode, the roofline bound, efficiency (speedup / bound),
the dense time against the dense roofline, the 2:4 kernel, and the error of a cell that
could not run (a cell that fails is a row, never a crash). Writes a CSV (``--csv``).
``--smoke`` runs the same code on the CPU with a tiny Llama in seconds (the test suite
runs it; its ``graph`` cells fail with the error that CUDA graphs need CUDA).
"""
from __future__ import annotations

import argparse
import copy
import time
import traceback

import pandas as pd
import torch

from prunelib.cost import costmodel, hardware
from prunelib.measure import timing
from prunelib.model.adapter import ModelAdapter
from prunelib.core.config import results_dir

CELLS = (  # (cell, method, sparsity, options); method None: built here (see _lowrank)
    ("dense", "dense", 0.0, {}),
    ("static depth", "last_n", 0.25, {}),
    ("static width", "width_random", 0.25, {"round_to": 64}),
    ("hidden width", "slicegpt_random", 0.25, {}),
    ("2:4", "sparse24_random", 0.5, {}),
    ("low rank", "lowrank_shape", 0.25, {}),
    ("dynamic depth", "dyn_depth_random", 0.25, {}),
    ("token pruning", "token_prune_random", 0.25, {}),
    ("block-sparse attention", "sparse_attn_block", 0.5, {}),
)
FULL = dict(model="random:llama-3.1-8b", dtype="bfloat16", shapes=(("prefill", 1, 2048), ("decode", 1, 2048),
                                                                    ("decode", 16, 2048)),
            modes=("eager", "graph"), reps=10, warmup=3, budget_s=4.0, target="auto")
# one thread: on a loaded 2-core machine the barriers of a multi-threaded microsecond op cost ~100x the op
SMOKE = dict(model="tiny", dtype="float32", shapes=(("prefill", 1, 128), ("decode", 1, 128), ("decode", 4, 128)),
             modes=("eager", "graph"), reps=3, warmup=1, budget_s=None, target=None, threads=1)


def tiny_model(seed: int = 0):
    """A 4-layer random Llama (hidden 256, MLP 512, 4 query / 2 KV heads of 64) for ``--smoke``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                               tie_word_embeddings=False)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _lowrank(model, sparsity: float, round_to: int = 64):
    """Every Linear of every decoder layer replaced by a rank-r pair of random factors, r from
    :func:`prunelib.pruning.lowrank.rank_for` (the structure low-rank methods build, without an SVD)."""
    from prunelib.pruning.lowrank import LowRankLinear, rank_for

    new = copy.deepcopy(model)
    p = next(model.parameters())
    for layer in ModelAdapter(new).layers:
        for owner in list(layer.modules()):
            for name, lin in list(owner.named_children()):
                if type(lin) is torch.nn.Linear:
                    r = rank_for(lin.in_features, lin.out_features, sparsity, round_to)
                    setattr(owner, name, LowRankLinear(lin.in_features, lin.out_features, r, lin.bias is not None,
                                                       device=p.device, dtype=p.dtype))
    new.config = copy.deepcopy(model.config)
    new.config.prunelib_pruning = [{"method": "lowrank_shape", "sparsity": sparsity, "seed": 0, "options": {}}]
    return new.eval()


def build(model, method: str, sparsity: float, options: dict, seed: int = 0):
    """The pruned copy of one cell; random-token calibration where a method needs calibration."""
    from prunelib.model.calibration import CalibrationSet
    from prunelib.pruning import get, prune

    if method == "dense":
        return model
    if method == "lowrank_shape":
        return _lowrank(model, sparsity)
    cal = None
    if get(method).needs_calibration:  # latency only: random tokens on random weights
        ids = torch.randint(0, model.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(seed))
        cal = CalibrationSet(ids, "random tokens (latency only)", None, seed)
    return prune(model, method, sparsity, calibration=cal, seed=seed, **options)[0]


def _method_for_modes(method: str) -> str:
    return "lowrank_random" if method == "lowrank_shape" else method


def cell_rows(dense, pruned, cell: str, method: str, sparsity: float, cfg: dict, hw) -> list[dict]:
    """One row per shape: each mode's speedup and CI (or its error), the bound and efficiencies."""
    from prunelib.experiment import timing_modes
    from prunelib.pruning.semistructured import engaged_shape, kernel_info

    dev = next(dense.parameters()).device
    dtype = cfg["dtype"]
    allowed = timing_modes(_method_for_modes(method), pruned)
    sd = costmodel.ModelShape.of(dense)
    rows = []
    for phase, b, s in cfg["shapes"]:
        row = {"cell": cell, "method": method, "sparsity": sparsity, "phase": phase, "batch": b, "length": s,
               **{k: v for k, v in kernel_info(pruned).items() if k != "sparse_layers"}}
        errors = []
        for mode in cfg["modes"]:
            try:
                timing.choose_mode(dev, mode, **allowed)
                c = timing.compare(dense, pruned, phase, b, s, mode=mode, reps=cfg["reps"], warmup=cfg["warmup"],
                                   target=cfg["target"], budget_s=cfg["budget_s"] or timing.BUDGET_S)
                row.update({f"{mode}_speedup": c.speedup, f"{mode}_ci": f"[{c.ci_low:.3f}, {c.ci_high:.3f}]",
                            f"{mode}_pairs": c.base.n, f"{mode}_dense_ms": c.base.median * 1e3})
            except Exception as e:  # noqa: BLE001 - every failure becomes the row's error
                errors.append(f"{mode}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
                if cfg.get("debug"):
                    traceback.print_exc()
        try:
            sp = engaged_shape(pruned, costmodel.ModelShape.of(pruned))
            bound = costmodel.theoretical_speedup(sd, sp, phase, b, s, dtype, hw)
            roof = costmodel.cost(sd, phase, b, s, dtype, hw).seconds
            row.update(bound=bound, dense_roofline_ms=roof * 1e3)
            for mode in cfg["modes"]:
                if f"{mode}_speedup" in row:
                    row[f"{mode}_efficiency"] = row[f"{mode}_speedup"] / bound
                    row[f"{mode}_dense_vs_roofline"] = row[f"{mode}_dense_ms"] / 1e3 / roof
        except Exception as e:  # noqa: BLE001
            errors.append(f"bound: {type(e).__name__}: {e}"[:300])
        row["error"] = "; ".join(errors) or None
        rows.append(row)
    return rows


def run(smoke: bool = False, device: str | None = None, csv=None, cells=None, **overrides) -> pd.DataFrame:
    """Every cell (or the named ``cells``) at every shape; returns the table and writes ``csv``."""
    from prunelib.model.models import load_model

    cfg = dict(SMOKE if smoke else FULL, **overrides)
    device = device or ("cpu" if smoke else "cuda")
    if smoke:
        dense = tiny_model().to(device)
    else:
        dense, _ = load_model(cfg["model"], device=device, dtype=cfg["dtype"])
    rows, threads = [], torch.get_num_threads()
    torch.set_num_threads(cfg.get("threads") or threads)
    try:
        hw = hardware.for_device(device)  # at the thread count the cells run with
        for cell, method, sparsity, options in CELLS:
            if not cells or cell in cells:
                rows += _cell(dense, cell, method, sparsity, options, cfg, hw)
    finally:
        torch.set_num_threads(threads)
    df = pd.DataFrame(rows).assign(hw=hw.name, device=str(device), model=cfg["model"], dtype=cfg["dtype"])
    if csv is not None:
        df.to_csv(csv, index=False)
    return df


def _cell(dense, cell, method, sparsity, options, cfg, hw) -> list[dict]:
    """The rows of one cell: its pruned copy timed at every shape, or one row with the pruning error."""
    t0 = time.perf_counter()
    try:
        pruned = build(dense, method, sparsity, options)
    except Exception as e:  # noqa: BLE001
        return [{"cell": cell, "method": method, "sparsity": sparsity, "error": f"prune: {type(e).__name__}: {e}"[:300]}]
    rows = cell_rows(dense, pruned, cell, method, sparsity, cfg, hw)
    rows[-1]["seconds"] = time.perf_counter() - t0
    del pruned
    if next(dense.parameters()).is_cuda:
        torch.cuda.empty_cache()
    return rows


COLUMNS = ["cell", "phase", "batch", "length", "eager_speedup", "eager_ci", "graph_speedup", "graph_ci", "bound",
           "eager_efficiency", "graph_efficiency", "eager_dense_vs_roofline", "graph_dense_vs_roofline", "kernel",
           "error"]


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, seconds (what the tests run)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--csv", default=None, help="default: <results>/gpu_check[_smoke].csv")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per comparison (default 4)")
    p.add_argument("--cells", default=None, help="comma-separated subset of: " + ", ".join(c[0] for c in CELLS))
    p.add_argument("--debug", action="store_true", help="print the traceback of every failing cell")
    a = p.parse_args(argv)
    if not a.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA device (none here); `--smoke` runs the same code on the CPU")
    known = [c[0] for c in CELLS]
    cells = a.cells.split(",") if a.cells else None
    if cells and set(cells) - set(known):
        raise SystemExit(f"--cells {sorted(set(cells) - set(known))} unknown; known: {known}")
    csv = a.csv or results_dir() / f"gpu_check{'_smoke' if a.smoke else ''}.csv"
    csv = type(results_dir())(csv)
    csv.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    over = {"debug": a.debug, **({"budget_s": a.budget} if a.budget else {})}
    df = run(a.smoke, a.device, csv, cells, **over)
    cols = [c for c in COLUMNS if c in df.columns]
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 60):
        print(df[cols].round(3).to_string(index=False))
    print(f"\n{df.hw.iloc[0]} ({df.device.iloc[0]}), {df.model.iloc[0]} {df.dtype.iloc[0]}; "
          f"{time.perf_counter() - t0:.0f} s; CSV: {csv}")
    return df


if __name__ == "__main__":
    main()
