"""The cells of ``make gpu-check`` (:mod:`prunelib.gpucheck`): build each pruned copy, time it against dense in
every mode, within a deadline.

Modes per cell and shape (each a column group ``<mode>_speedup``, ``_ci``, ``_efficiency``, ...):

- ``eager``: eager over a DynamicCache (transformers' default; ``torch.cat`` of the cache every decode step);
- ``static``: eager over a StaticCache: with ``eager`` it shows the cache effect, with ``graph`` the launch
  overhead (the graph replays this very step);
- ``graph``: the static step captured as a CUDA graph, for methods that allow graphs; a method that refuses
  them (dynamic depth, token pruning, sparse attention: decisions on the host) gets ``compiled`` instead:
  ``torch.compile(fullgraph=True)``, which keeps data-dependent routing exact (guards) or fails, and its
  failure is the row's reason. Every row has ``host_share`` (eager step of the pruned model: 1 - device
  busy / wall, from the profiler) so that an eager-only speedup shows how much of it is host time.

Prefill runs over a fresh DynamicCache in every mode (:mod:`prunelib.measure.workload`): a graph captures
the eager step and times the causal SDPA kernel eager runs and the cost model counts. Each workload's build
and first call (KV prefill, compilation, capture, a ``flex_attention`` compile per shape) is timed apart
(``<mode>_setup_s``), never in the samples.

:class:`Budget`: a deadline. A mode whose estimated cost (the same comparison's cost in an earlier cell:
dense runs first) does not fit what is left is not run and the row says ``skipped: budget``; a cell whose
set-up estimate does not fit is one row per shape saying so.
"""
from __future__ import annotations

import copy
import math
import time
import traceback

import torch

from prunelib.cost import costmodel
from prunelib.measure import timing
from prunelib.model.adapter import ModelAdapter
from prunelib.run.pipeline import timing_modes

CELLS = (  # (cell, method, sparsity, options); method "lowrank_shape": built here (see _lowrank)
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
# Seconds to build each cell's pruned copy of Llama-3.1-8B (bf16) on an H200: host-side set-up measured on
# the CPU at 8B shapes plus the roofline time of what now runs on the device (docs/RESULTS.md, 2026-12-01:
# an estimate, not a GPU run); scaled by parameter count for other models.
SETUP_S_8B = {"dense": 0.0, "last_n": 0.5, "width_random": 1.0, "slicegpt_random": 4.0, "sparse24_random": 2.0,
              "lowrank_shape": 1.0, "dyn_depth_random": 0.5, "token_prune_random": 0.5, "sparse_attn_block": 0.5}
FLEX_COMPILE_S = 40.0  # flex_attention's compile per prefill shape on CUDA (20-60 s), before the first timed call
COMPILE_S = 60.0  # inductor's compile of one 8B step (an assumption until measured on a GPU): the budget's first guess
# the configurations of python -m prunelib.gpucheck and of its --smoke
FULL = dict(model="random:llama-3.1-8b", dtype="bfloat16", shapes=(("prefill", 1, 2048), ("decode", 1, 2048),
                                                                    ("decode", 16, 2048)),
            modes=("graph", "eager", "static"), reps=10, warmup=3, budget_s=4.0, target="auto", profile=3,
            compile_probe=True)
# one thread: on a loaded 2-core machine the barriers of a multi-threaded microsecond op cost ~100x the op;
# bfloat16: the 2:4 cell's (faked) cuSPARSELt kernels take 16-bit weights; compile backend "eager": dynamo's
# capture (fullgraph) checked in seconds, without inductor's code generation
SMOKE = dict(model="tiny", dtype="bfloat16", shapes=(("prefill", 1, 32), ("decode", 1, 32), ("decode", 4, 32)),
             modes=("graph", "eager", "static"), reps=3, warmup=1, budget_s=None, target=None, threads=1,
             compile_backend="eager", profile=1)
MODE_REASON = {
    "static": "static: eager over a StaticCache (the step a graph replays): static vs eager = the cache effect",
    "graph": "graph: the static step replayed as a CUDA graph: graph vs static = the launch overhead",
}


class Budget:
    """A deadline (``seconds`` from ``start``; None: none) and the measured cost of each kind of step."""

    def __init__(self, seconds: float | None = None, start: float | None = None, clock=time.perf_counter):
        self.clock = clock
        self.end = None if seconds is None else (clock() if start is None else start) + seconds
        self.costs: dict = {}

    def left(self) -> float:
        return math.inf if self.end is None else self.end - self.clock()

    def fits(self, estimate: float) -> bool:
        return self.left() >= estimate

    def record(self, key, seconds: float) -> None:
        self.costs[key] = max(self.costs.get(key, 0.0), seconds)

    def estimate(self, key) -> float:
        return self.costs.get(key, 0.0)


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


def setup_estimate(method: str, model, shapes) -> float:
    """Seconds to build ``method``'s cell on ``model`` (:data:`SETUP_S_8B` by parameter count, plus
    flex_attention's compile per prefill shape for block-sparse attention on CUDA)."""
    from prunelib.model.models import parameter_count

    s = SETUP_S_8B.get(method, 1.0) * parameter_count(model) / 8.03e9
    if method.startswith("sparse_attn") and next(model.parameters()).is_cuda:
        s += FLEX_COMPILE_S * len({(b, n) for phase, b, n in shapes if phase == "prefill"})
    return s


def _method_for_modes(method: str) -> str:
    return "lowrank_random" if method == "lowrank_shape" else method


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _modes(method: str, pruned, cfg: dict) -> tuple[list, dict]:
    """``[(label, compare kwargs)]`` in the order ``cfg["modes"]`` gives, and the method's allowed modes."""
    allowed = timing_modes(_method_for_modes(method), pruned)
    third = "graph" if allowed["graph_ok"] else "compiled"
    kw = {"eager": {"mode": "eager"}, "static": {"mode": "eager", "static_cache": True}, "graph": {"mode": third}}
    out = [(third if m == "graph" else m, kw[m]) for m in cfg["modes"]]
    # compilation (a minute a model with inductor) goes last, after the cheap modes, where the budget allows it
    return sorted(out, key=lambda mode: mode[0] == "compiled"), allowed


def _reason(phase: str, labels, allowed: dict) -> str:
    parts = []
    parts.append("prefill: every mode over a fresh DynamicCache, so a graph captures the eager step: SDPA is_causal "
                 "(flash), the kernel eager runs and the cost model counts; over a StaticCache, capture makes "
                 "transformers build an explicit S x S mask with repeated K/V heads" if phase == "prefill" else
                 "decode: eager over a DynamicCache (torch.cat of the whole cache each step)")
    parts += [MODE_REASON[lab] for lab in labels if lab in MODE_REASON]
    if "compiled" in labels:
        parts.append(f"compiled: the method refuses CUDA graphs ({allowed['why'] or 'dynamic'}), so torch.compile"
                     "(fullgraph) instead, exact or an error; host_share says how much of the eager step is host time")
    return "; ".join(parts)


def cell_rows(dense, pruned, cell: str, method: str, sparsity: float, cfg: dict, hw, budget: Budget | None = None,
              on_row=None) -> list[dict]:
    """One row per shape: each mode's speedup and CI (or its error, or ``skipped: budget``), the bound,
    efficiencies, dense time against the roofline, memory against the prediction, kernel and host share."""
    from prunelib.pruning.semistructured import engaged_shape, kernel_info

    budget = budget or Budget()
    dev = next(dense.parameters()).device
    dtype = cfg["dtype"]
    modes, allowed = _modes(method, pruned, cfg)
    sd = costmodel.ModelShape.of(dense)
    rows = []
    for phase, b, s in cfg["shapes"]:
        row = {"cell": cell, "method": method, "sparsity": sparsity, "phase": phase, "batch": b, "length": s,
               **{k: v for k, v in kernel_info(pruned).items() if k != "sparse_layers"}}
        errors, skipped = [], []
        for label, kw in modes:
            key = (phase, b, s, label)
            first = 2 * COMPILE_S if label == "compiled" and cfg.get("compile_probe") else 0.0  # no cost seen yet
            if not budget.fits(budget.costs.get(key, first)):
                skipped.append(label)
                errors.append(f"{label}: skipped: budget")
                continue
            t0 = time.perf_counter()
            try:
                if kw["mode"] == "graph":
                    timing.choose_mode(dev, "graph", **allowed)
                if label == "compiled" and cfg.get("compile_probe"):  # dynamo's trace first: fails in seconds
                    timing.probe_compile(pruned, phase, b, s)
                c = timing.compare(dense, pruned, phase, b, s, reps=cfg["reps"], warmup=cfg["warmup"],
                                   target=cfg["target"], budget_s=min(cfg["budget_s"] or timing.BUDGET_S,
                                                                     max(budget.left() / 4, 0.5)),
                                   compile_backend=cfg.get("compile_backend", "inductor"),
                                   profile=cfg.get("profile", 3) if label == "eager" else 0, **kw)
                row.update({f"{label}_speedup": c.speedup, f"{label}_ci": f"[{c.ci_low:.3f}, {c.ci_high:.3f}]",
                            f"{label}_pairs": c.base.n, f"{label}_dense_ms": c.base.median * 1e3,
                            f"{label}_setup_s": c.setup_s[1], f"{label}_dense_setup_s": c.setup_s[0]})
                if c.host_share is not None:
                    row.update(dense_host_share=c.host_share[0], host_share=c.host_share[1])
            except Exception as e:  # noqa: BLE001 - every failure becomes the row's error
                errors.append(f"{label}: {_first_line(e)}")
                if cfg.get("debug"):
                    traceback.print_exc()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            budget.record(key, time.perf_counter() - t0)
        row["timing_mode_reason"] = _reason(phase, [m for m, _ in modes], allowed)
        try:
            sp = engaged_shape(pruned, costmodel.ModelShape.of(pruned))
            bound = costmodel.theoretical_speedup(sd, sp, phase, b, s, dtype, hw)
            roof = costmodel.cost(sd, phase, b, s, dtype, hw).seconds
            row.update(bound=bound, dense_roofline_ms=roof * 1e3)
            for label, _ in modes:
                if f"{label}_speedup" in row:
                    row[f"{label}_efficiency"] = row[f"{label}_speedup"] / bound
                    row[f"{label}_dense_vs_roofline"] = row[f"{label}_dense_ms"] / 1e3 / roof
        except Exception as e:  # noqa: BLE001
            errors.append(f"bound: {_first_line(e)}")
        if cfg.get("memory", True) and budget.fits(budget.estimate((phase, b, s, "memory"))):
            t0 = time.perf_counter()
            try:
                row.update(_memory(pruned, phase, b, s, dtype, hw))
            except Exception as e:  # noqa: BLE001
                errors.append(f"memory: {_first_line(e)}")
            budget.record((phase, b, s, "memory"), time.perf_counter() - t0)
        row["skipped"] = "budget: " + ", ".join(skipped) if skipped else None
        row["error"] = "; ".join(errors) or None
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def _memory(model, phase: str, b: int, s: int, dtype: str, hw) -> dict:
    """Peak memory of one eager step (weights + the step's KV cache and activations) against
    :func:`prunelib.measure.timing.predicted_memory` (weights + KV cache of the B x S tokens)."""
    f = timing.footprint(model, phase, b, s)
    pred = timing.predicted_memory(model, dtype, hw)
    slots = s + 1 if phase == "decode" else s
    return {"mem_peak_gb": (f.weight_bytes + (f.peak_bytes or 0)) / 1e9 if f.peak_bytes is not None else None,
            "mem_pred_gb": (pred["weight_bytes"] + pred["kv_bytes_per_token"] * b * slots) / 1e9,
            "weight_gb": f.weight_bytes / 1e9, "weight_gb_pred": pred["weight_bytes"] / 1e9}


def skipped_rows(cell: str, method: str, sparsity: float, shapes, why: str) -> list[dict]:
    return [{"cell": cell, "method": method, "sparsity": sparsity, "phase": p, "batch": b, "length": s,
             "skipped": why, "error": why} for p, b, s in shapes]


def run_cell(dense, cell: str, method: str, sparsity: float, options: dict, cfg: dict, hw, budget: Budget,
             on_row=None) -> list[dict]:
    """The rows of one cell, isolated: a cell that does not fit the budget, fails to build or fails to time
    is rows saying so, and the next cell runs."""
    est = setup_estimate(method, dense, cfg["shapes"])
    cheapest = min((v for k, v in budget.costs.items() if k[-1] != "memory"), default=0.0)
    if not budget.fits(est + cheapest):
        rows = skipped_rows(cell, method, sparsity, cfg["shapes"],
                            f"skipped: budget ({budget.left():.0f} s left, the cell needs ~{est + cheapest:.0f} s)")
        for r in rows:
            on_row and on_row(r)
        return rows
    t0 = time.perf_counter()
    try:
        pruned = build(dense, method, sparsity, options)
    except Exception as e:  # noqa: BLE001
        if cfg.get("debug"):
            traceback.print_exc()
        rows = [{"cell": cell, "method": method, "sparsity": sparsity, "error": f"prune: {_first_line(e)}"}]
        on_row and on_row(rows[0])
        return rows
    build_s = time.perf_counter() - t0
    try:
        rows = cell_rows(dense, pruned, cell, method, sparsity, cfg, hw, budget,
                         on_row=lambda r: on_row and on_row(dict(r, build_s=build_s)))
    except Exception as e:  # noqa: BLE001
        rows = [{"cell": cell, "method": method, "sparsity": sparsity, "error": f"cell: {_first_line(e)}"}]
        on_row and on_row(rows[0])
    finally:
        del pruned
        if next(dense.parameters()).is_cuda:
            torch.cuda.empty_cache()
    rows = [dict(r, build_s=build_s) for r in rows]
    rows[-1]["seconds"] = time.perf_counter() - t0
    return rows
