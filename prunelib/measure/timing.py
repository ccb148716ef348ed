"""Time prefill (TTFT) and decode (TPOT): one model (:func:`measure`) or two interleaved (:func:`compare`).

Noisy machines: :func:`compare` runs two models as adjacent pairs in ABBA order, the speedup
is the median of the per-pair ratios with a bootstrap 95% CI over pairs, and with a
``target`` it adds pairs until the CI half-width reaches it or a time budget runs out.
What is timed (workloads, modes, timers) is :mod:`prunelib.measure.workload`; the statistics are
:mod:`prunelib.measure.stats`; memory is :mod:`prunelib.measure.memory`.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from prunelib.core import validate

from prunelib.measure.memory import Footprint, footprint, predicted_memory  # noqa: F401
from prunelib.measure.stats import Comparison, Latency, bootstrap_ratio_ci, paired_ratio_ci  # noqa: F401
from prunelib.measure.workload import (BUDGET_S, CI_TARGETS, MODES, PHASES, CpuTimer, CudaTimer, Workload,  # noqa: F401
                                      allowed_modes, choose_mode, timer_for, _device, _tokens)


def _sample(timer, work: Workload) -> float:
    t = timer(work)
    work.reset()
    return t


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _built(model, phase, batch, length, kw) -> tuple[Workload, float]:
    """A workload and the seconds to build it and run its first call (KV prefill, compilation, graph capture,
    a flex_attention compile per shape): all outside the timed region."""
    dev = _device(model)
    _sync(dev)
    t0 = time.perf_counter()
    work = Workload(model, phase, batch, length, **kw)
    work()
    work.reset()
    _sync(dev)
    seconds = time.perf_counter() - t0
    if work.mode == "compiled":  # a step that compiles again on its second call would time compilation
        graphs = _compiled_graphs()
        work()
        work.reset()
        if _compiled_graphs() > graphs:
            raise RuntimeError("torch.compile compiled the step again on its second call: host state it guards on "
                               "changes every step, so it is not one static graph (the timed loop would time "
                               "compilation)")
    return work, seconds


def probe_compile(model, phase: str, batch: int, length: int, **kw) -> float:
    """Seconds to trace one step of ``model`` with torch.compile's ``eager`` backend (dynamo's capture, no code
    generation) and check that a second call compiles nothing; raises where the step cannot be one graph.
    A cheap test before paying inductor's compilation for a step that would fail anyway."""
    kw = dict(kw, mode="compiled", compile_backend="eager")
    return _built(model, phase, batch, length, kw)[1]


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["stats"].values()) + sum(counters["frames"].values())


def busy_union(intervals) -> float:
    """Total length covered by ``(start, end)`` intervals (overlaps and nesting counted once)."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total, end = total + (b - a), b
        elif b > end:
            total, end = total + (b - end), b
    return total


def host_share(work: Workload, steps: int = 3) -> float:
    """Share of a step's wall time in which the device ran nothing: 1 - busy / wall (torch.profiler).

    CUDA: busy = the union of the GPU kernels' and copies' intervals, wall = each step from its launch to
    its end (synchronised). CPU: busy = the union of ATen operators' intervals (the work a device would
    do), so the share is Python and dispatch overhead. Near 1: the step measures the host, not the kernels.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    dev = _device(work.model)
    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(dev)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            with record_function("prunelib.step"):
                work()
                _sync(dev)
            work.reset()
    events = prof.profiler.kineto_results.events()  # the raw events: no tree of FunctionEvents to build
    wall = sum(e.duration_ns() for e in events if e.name() == "prunelib.step")
    if cuda:
        busy = busy_union((e.start_ns(), e.end_ns()) for e in events if e.device_type() == DeviceType.CUDA)
    else:
        busy = busy_union((e.start_ns(), e.end_ns()) for e in events
                          if e.device_type() == DeviceType.CPU and e.name().startswith("aten::"))
    return float(min(1.0, max(0.0, 1 - busy / wall))) if wall > 0 else float("nan")


# --- measurement --------------------------------------------------------------------
@dataclass
class Timing:
    phase: str
    batch: int
    length: int
    device: str
    latency: Latency
    mode: str = "eager"


def measure(model, phase: str, batch: int, length: int, *, reps: int = 20, warmup: int = 3, timer=None, seed: int = 0,
            mode: str = "eager", text: torch.Tensor | None = None, compile_backend: str = "inductor") -> Timing:
    """TTFT (phase="prefill") or TPOT (phase="decode") of one model, raw samples kept."""
    validate.timing_args(model, phase, batch, length, reps)  # before any work: names the bad argument
    timer = timer or timer_for(_device(model))
    with timer.session():
        work = Workload(model, phase, batch, length, seed=seed, mode=mode, text=text, compile_backend=compile_backend)
        for _ in range(warmup):
            _sample(timer, work)
        lat = Latency([_sample(timer, work) for _ in range(reps)])
    return Timing(phase, batch, length, str(_device(model)), lat, mode)


def sweep(model, phases=PHASES, batches=(1,), lengths=(512,), **kw):
    """Timings for every (phase, batch, length) combination, with a progress bar."""
    from tqdm.auto import tqdm

    combos = [(p, b, s) for p in phases for b in batches for s in lengths]
    return [measure(model, p, b, s, **kw) for p, b, s in tqdm(combos, desc="timing", leave=False)]


def resolve_target(target, phase: str, reps) -> float | None:
    """A compare's ``target`` as a relative CI half-width (``"auto"``: :data:`CI_TARGETS` of the phase), checked,
    with ``reps`` (the pairs to run, or the minimum with a target)."""
    if target == "auto":
        target = CI_TARGETS[phase] if phase in CI_TARGETS else None
    if target is not None and not (isinstance(target, (int, float)) and 0 < target < 1):
        raise ValueError(f"target must be a relative CI half-width in (0, 1) or 'auto', got {target!r}")
    if not isinstance(reps, int) or reps < 2:
        raise ValueError(f"reps must be an integer >= 2, got {reps!r}")
    return target


def interleave(sample_a: Callable[[], float], sample_b: Callable[[], float], *, reps: int, warmup: int,
               target: float | None, budget_s: float, max_reps: int, seed: int = 0) -> tuple[list, list, str, float]:
    """Run two timed steps as ABBA pairs: ``(times_a, times_b, why it stopped, seconds of the timed loop)``.

    ``warmup`` untimed pairs first (outside the loop's clock and samples). Without a ``target``: ``reps`` pairs.
    With one: at least ``reps`` pairs, then more until the paired-bootstrap CI's relative half-width reaches it,
    ``budget_s`` seconds have passed or ``max_reps`` pairs ran. Every runtime's comparison goes through here.
    """
    for _ in range(warmup):
        sample_a(), sample_b()
    ta, tb = [], []
    t0, stop, check_at = time.perf_counter(), "fixed repetitions", reps
    while True:
        if len(ta) % 2 == 0:
            ta.append(sample_a()); tb.append(sample_b())
        else:
            tb.append(sample_b()); ta.append(sample_a())
        n = len(ta)
        if target is None:
            if n >= reps:
                break
            continue
        if n >= check_at:
            sp, lo, hi = paired_ratio_ci(ta, tb, seed=seed)
            if (hi - lo) / 2 / sp <= target:
                stop = f"target ±{target:.0%} reached"
                break
            check_at = n + max(2, n // 10)
        if n >= reps and time.perf_counter() - t0 > budget_s:
            stop = f"time budget {budget_s:.0f} s spent"
            break
        if n >= max_reps:
            stop = f"max_reps {max_reps} reached"
            break
    return ta, tb, stop, time.perf_counter() - t0


def compare(base_model, cand_model, phase: str, batch: int, length: int, *, reps: int = 20, warmup: int = 3,
            timer=None, seed: int = 0, mode: str = "eager", text: torch.Tensor | None = None,
            target: float | str | None = None, budget_s: float = BUDGET_S, max_reps: int = 5000,
            compile_backend: str = "inductor", static_cache: bool | None = None, profile: int = 0) -> Comparison:
    """Time two models as ABBA pairs and return the speedup of ``cand`` over ``base``.

    ``reps``: pairs to run (with a ``target``: the minimum). ``target``: relative CI
    half-width to reach, e.g. 0.03, or ``"auto"`` for :data:`CI_TARGETS` of the phase;
    pairs are added until it is reached, ``budget_s`` seconds of timed loop have passed,
    or ``max_reps`` pairs were run, whichever comes first (``Comparison.stop`` says which).
    ``static_cache``: as :class:`Workload`'s (eager over a StaticCache: the cache effect apart from
    graph replay). Each workload's build and first call are timed apart (``Comparison.setup_s``:
    compilation, capture), never in the samples. ``profile``: that many profiled steps of each
    model after the timed loop give ``Comparison.host_share`` (:func:`host_share`).
    """
    validate.timing_args(base_model, phase, batch, length, reps, cand_model)  # before any work, vocabularies included
    validate.budget(budget_s)  # nan ran 5,000 pairs
    validate.token_ids("text", text, validate._vocab(base_model))
    target = resolve_target(target, phase, reps)
    timer = timer or timer_for(_device(base_model))
    kw = dict(seed=seed, mode=mode, text=text, compile_backend=compile_backend, static_cache=static_cache)
    with timer.session():
        wb, setup_b = _built(cand_model, phase, batch, length, kw)  # first: a step that cannot compile fails early
        wa, setup_a = _built(base_model, phase, batch, length, kw)
        ta, tb, stop, seconds = interleave(lambda: _sample(timer, wa), lambda: _sample(timer, wb), reps=reps,
                                           warmup=warmup, target=target, budget_s=budget_s, max_reps=max_reps,
                                           seed=seed)
        shares = (host_share(wa, profile), host_share(wb, profile)) if profile else None
    sp, lo, hi = paired_ratio_ci(ta, tb, seed=seed)
    return Comparison(phase, batch, length, Latency(ta), Latency(tb), sp, lo, hi, mode, target, stop, seconds,
                      (setup_a, setup_b), shares, wb.note)


def achieved_bandwidth(model, timing: Timing) -> float:
    """Bytes the GEMMs of this step must move (cost model) divided by its median time, in bytes/s."""
    from prunelib.cost.costmodel import ModelShape, cost
    from prunelib.cost.hardware import HardwareSpec

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    dummy = HardwareSpec("n/a", {dtype: 1.0}, 1.0)
    c = cost(ModelShape.of(model), timing.phase, timing.batch, timing.length, dtype, dummy)
    return c.bytes / timing.latency.median


# --- memory -------------------------------------------------------------------------
