"""Time prefill (TTFT) and decode (TPOT) behind one interface for CPU and CUDA.

- CPU: ``time.perf_counter`` around the call, a fixed thread count.
- CUDA: CUDA events, an optional L2 flush before every run, optional CUDA-graph replay.

TTFT = one forward of B x S prompt tokens that fills a fresh KV cache (logits for the
last position only). Prompts are real text when ``text`` ids are given (dynamic methods
route on content, so :mod:`prunelib.experiment` always gives them), else seeded random ids.
TPOT = one decode step of B sequences against a KV cache of S tokens: the cache is
built once, and after every timed step it is cut back to S tokens (outside the
timed region), so each sample sees the same KV length. With CUDA graphs a static
cache of S + 1 slots is used and every replay writes slot S.

Noisy machines: :func:`compare` runs two models interleaved (ABBA order) and gives
the speedup as a ratio of medians with a bootstrap 95% confidence interval.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import checks

PHASES = ("prefill", "decode")


@dataclass
class Latency:
    """Raw samples (seconds) and their summary. The median is the headline number."""

    samples: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples, q))

    @property
    def p10(self) -> float:
        return self.percentile(10)

    @property
    def p90(self) -> float:
        return self.percentile(90)

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples))

    @property
    def std(self) -> float:
        return float(np.std(self.samples, ddof=1)) if self.n > 1 else 0.0

    def summary(self) -> dict:
        return {"n": self.n, "median": self.median, "p10": self.p10, "p90": self.p90, "mean": self.mean, "std": self.std}


# --- timers ---------------------------------------------------------------------
class CpuTimer:
    """Wall-clock timing with perf_counter at a fixed thread count."""

    def __init__(self, threads: int | None = None):
        self.threads = threads or torch.get_num_threads()

    @contextlib.contextmanager
    def session(self):
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    def __call__(self, fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


class CudaTimer:
    """CUDA-event timing; optionally flushes L2 (by overwriting a buffer twice its size) before each run."""

    def __init__(self, device="cuda", flush_l2: bool = True):
        self.device = torch.device(device)
        self.flush_l2 = flush_l2
        self._flush_buf = None
        if flush_l2:
            l2 = torch.cuda.get_device_properties(self.device).L2_cache_size
            self._flush_buf = torch.empty(max(2 * l2, 1 << 20), dtype=torch.uint8, device=self.device)

    @contextlib.contextmanager
    def session(self):
        with torch.cuda.device(self.device):
            yield

    def __call__(self, fn: Callable[[], object]) -> float:
        if self._flush_buf is not None:
            self._flush_buf.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def timer_for(device, threads: int | None = None, flush_l2: bool = True):
    dev = torch.device(device)
    return CudaTimer(dev, flush_l2) if dev.type == "cuda" else CpuTimer(threads)


# --- workloads --------------------------------------------------------------------
def _check(phase: str, batch: int, length: int) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r} is not one of {PHASES}")
    for what, v in (("batch", batch), ("length", length)):
        if not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{what} must be a positive integer, got {v!r}")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _tokens(model, batch: int, length: int, seed: int, text: torch.Tensor | None = None) -> torch.Tensor:
    """Prompt tokens: the first ``batch`` x ``length`` of ``text`` (real text, which dynamic methods
    route on), else seeded random ids (enough for static shapes)."""
    if text is not None:
        if text.dim() != 2 or text.shape[0] < batch or text.shape[1] < length:
            raise ValueError(f"text ids of shape {tuple(text.shape)} cannot supply {batch} x {length} tokens")
        return text[:batch, :length].to(_device(model))
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=g).to(_device(model))


class Workload:
    """A callable that runs one prefill or one decode step of ``model``; built once, called many times."""

    def __init__(self, model, phase: str, batch: int, length: int, *, seed: int = 0, cuda_graph: bool = False,
                 text: torch.Tensor | None = None):
        _check(phase, batch, length)
        self.model, self.phase, self.batch, self.length = model, phase, int(batch), int(length)
        dev = _device(model)
        if cuda_graph and dev.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        self.cuda_graph = cuda_graph
        self.cache = None
        prompt = _tokens(model, batch, length, seed, text)
        with torch.inference_mode():
            if phase == "prefill":
                # a real prefill also fills a (fresh) KV cache: its size shrinks with depth pruning
                self.inputs = {"input_ids": prompt, "use_cache": True, "logits_to_keep": 1}
            else:
                from transformers import DynamicCache, StaticCache

                if cuda_graph:
                    self.cache = StaticCache(config=model.config, max_cache_len=length + 1)
                else:
                    self.cache = DynamicCache(config=model.config)
                model(input_ids=prompt, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
                self._kv_lengths = [layer.get_seq_length() for layer in self.cache.layers]
                self.inputs = {
                    "input_ids": (_tokens(model, batch, 1, seed + 1) if text is None or text.shape[1] <= length
                                  else text[:batch, length : length + 1].to(dev)),
                    "past_key_values": self.cache,
                    "cache_position": torch.tensor([length], device=dev),
                    "use_cache": True,
                }
        self._graph = None
        if cuda_graph:
            self._capture()

    def _forward(self):
        return self.model(**self.inputs)

    def _capture(self):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(3):  # warm up on a side stream, as graph capture requires
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self._graph):
            self._out = self._forward()

    def __call__(self):
        if self._graph is not None:
            self._graph.replay()
            return self._out
        with torch.inference_mode():
            return self._forward()

    def reset(self):
        """Restore every layer's KV length after a decode step (not timed).

        Layers may hold different lengths (token pruning keeps fewer prompt tokens in
        later layers), so each is cut back to the length it had before the step.
        """
        if self.cache is not None and self._graph is None:
            for layer, n in zip(self.cache.layers, self._kv_lengths):
                extra = layer.get_seq_length() - n
                if extra > 0:
                    layer.crop(-extra)


def _sample(timer, work: Workload) -> float:
    t = timer(work)
    work.reset()
    return t


# --- measurement --------------------------------------------------------------------
@dataclass
class Timing:
    phase: str
    batch: int
    length: int
    device: str
    latency: Latency


def measure(model, phase: str, batch: int, length: int, *, reps: int = 20, warmup: int = 3,
            timer=None, seed: int = 0, cuda_graph: bool = False, text: torch.Tensor | None = None) -> Timing:
    """TTFT (phase="prefill") or TPOT (phase="decode") of one model, raw samples kept."""
    checks.timing_args(model, phase, batch, length, reps)  # before any work: names the bad argument
    timer = timer or timer_for(_device(model))
    with timer.session():
        work = Workload(model, phase, batch, length, seed=seed, cuda_graph=cuda_graph, text=text)
        for _ in range(warmup):
            _sample(timer, work)
        lat = Latency([_sample(timer, work) for _ in range(reps)])
    return Timing(phase, batch, length, str(_device(model)), lat)


def sweep(model, phases=PHASES, batches=(1,), lengths=(512,), **kw):
    """Timings for every (phase, batch, length) combination, with a progress bar."""
    from tqdm.auto import tqdm

    combos = [(p, b, s) for p in phases for b in batches for s in lengths]
    return [measure(model, p, b, s, **kw) for p, b, s in tqdm(combos, desc="timing", leave=False)]


def bootstrap_ratio_ci(base: list[float], cand: list[float], *, n_boot: int = 2000, level: float = 0.95, seed: int = 0):
    """Bootstrap CI of median(base) / median(cand) (the speedup of ``cand`` over ``base``)."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(base), np.asarray(cand)
    ia = rng.integers(0, len(a), (n_boot, len(a)))
    ib = rng.integers(0, len(b), (n_boot, len(b)))
    ratios = np.median(a[ia], axis=1) / np.median(b[ib], axis=1)
    lo, hi = np.percentile(ratios, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


@dataclass
class Comparison:
    phase: str
    batch: int
    length: int
    base: Latency
    cand: Latency
    speedup: float  # median(base) / median(cand)
    ci_low: float
    ci_high: float

    def __str__(self) -> str:
        return (f"{self.phase} B={self.batch} S={self.length}: {self.speedup:.3f}x "
                f"[95% CI {self.ci_low:.3f}, {self.ci_high:.3f}] (n={self.base.n}+{self.cand.n})")


def compare(base_model, cand_model, phase: str, batch: int, length: int, *, reps: int = 20, warmup: int = 3,
            timer=None, seed: int = 0, cuda_graph: bool = False, text: torch.Tensor | None = None) -> Comparison:
    """Time two models interleaved (ABBA order) and return the speedup of ``cand`` over ``base``."""
    checks.timing_args(base_model, phase, batch, length, reps, cand_model)  # before any work, vocabularies included
    timer = timer or timer_for(_device(base_model))
    with timer.session():
        wa = Workload(base_model, phase, batch, length, seed=seed, cuda_graph=cuda_graph, text=text)
        wb = Workload(cand_model, phase, batch, length, seed=seed, cuda_graph=cuda_graph, text=text)
        for _ in range(warmup):
            _sample(timer, wa), _sample(timer, wb)
        ta, tb = [], []
        for r in range(reps):
            if r % 2 == 0:
                ta.append(_sample(timer, wa)); tb.append(_sample(timer, wb))
            else:
                tb.append(_sample(timer, wb)); ta.append(_sample(timer, wa))
    a, b = Latency(ta), Latency(tb)
    lo, hi = bootstrap_ratio_ci(ta, tb, seed=seed)
    return Comparison(phase, batch, length, a, b, a.median / b.median, lo, hi)


def achieved_bandwidth(model, timing: Timing) -> float:
    """Bytes the GEMMs of this step must move (cost model) divided by its median time, in bytes/s."""
    from .costmodel import ModelShape, cost
    from .hardware import HardwareSpec

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    dummy = HardwareSpec("n/a", {dtype: 1.0}, 1.0)
    c = cost(ModelShape.of(model), timing.phase, timing.batch, timing.length, dtype, dummy)
    return c.bytes / timing.latency.median
