"""What is timed, and with which clock: a :class:`Workload` (one prefill or decode step of a model, in a
timing mode) and a timer for CPU or CUDA. :mod:`prunelib.measure.timing` times them.

- CPU: ``time.perf_counter`` around the call, a fixed thread count.
- CUDA: CUDA events, an optional L2 flush before every run.

Three timing modes (:data:`MODES`), each stored with every speed row:

- ``eager``: the model's own forward, one Python call per op (on a GPU, host overhead
  can dominate a small decode step: measured speedups then track how many Python ops a
  method removed, not the GEMMs);
- ``compiled``: ``torch.compile(fullgraph=True, dynamic=False)`` of the step over a
  static KV cache (CPU and CUDA; a graph break is an error, never a silent partial compile);
- ``graph``: the eager step captured once as a CUDA graph over a static KV cache and
  replayed (CUDA only): what the paper times.

TTFT = one forward of B x S prompt tokens that fills a fresh KV cache (logits for the
last position only). In every mode that cache is a fresh ``DynamicCache`` made inside the step
(a ``StaticCache`` only on request, in eager mode): under CUDA-graph capture or torch.compile,
transformers builds an explicit S x S mask with repeated K/V heads for a StaticCache (its
offset is a tensor), which rules out the causal flash kernel that eager runs and the cost model
counts (the triangle); over a fresh DynamicCache the captured step is the eager one. Prompts are real text when ``text`` ids are given (dynamic methods
route on content, so :mod:`prunelib.experiment` always gives them), else seeded random ids.
TPOT = one decode step of B sequences against a KV cache of S tokens.

KV-cache position, outside the timed region: transformers 5.x ignores ``cache_position``;
a ``StaticLayer`` writes at its own ``cumulative_length`` and advances it on every forward.
So after every timed call :meth:`Workload.reset` rewinds each layer (``cumulative_length``
filled in place to S for a decode step, 0 for a prefill; a ``DynamicCache`` is cropped back):
every replay of a decode step writes KV slot S of a cache of S + 1 slots and reads the same
S cached tokens, and gives the same logits.

Noisy machines: :func:`compare` runs two models as adjacent pairs in ABBA order, the speedup
is the median of the per-pair ratios with a bootstrap 95% CI over pairs, and with a
``target`` it adds pairs until the CI half-width reaches it or a time budget runs out.
:func:`footprint` measures memory (peak, weights, KV cache per token) beside the cost
model's prediction (:func:`predicted_memory`).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np
import torch


PHASES = ("prefill", "decode")
MODES = ("eager", "compiled", "graph")
CI_TARGETS = {"decode": 0.03, "prefill": 0.05}  # default relative 95% CI half-width of an adaptive compare
BUDGET_S = 60.0  # default time budget of an adaptive compare (timed loop only; compile and warm-up excluded)


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


# --- timing modes -------------------------------------------------------------------
def allowed_modes(device, *, graph_ok: bool = True, compile_ok: bool = True) -> list[str]:
    """The timing modes that can run on ``device`` for a method that allows graphs / compilation."""
    dev = torch.device(device)
    out = ["eager"] + (["compiled"] if compile_ok else [])
    return out + (["graph"] if graph_ok and dev.type == "cuda" else [])


def choose_mode(device, requested: str | None = None, *, graph_ok: bool = True, compile_ok: bool = True,
                why: str = "") -> tuple[str, str]:
    """``(mode, reason)``: ``requested`` if it can run here, else an error naming the allowed modes.

    ``requested=None`` (or ``"auto"``) picks the default: on CUDA ``graph`` where the method
    allows it, else ``compiled``, else ``eager``; on CPU ``eager``. ``why`` says why a
    method refuses graphs or compilation (stored in the reason).
    """
    dev = torch.device(device)
    allowed = allowed_modes(dev, graph_ok=graph_ok, compile_ok=compile_ok)
    if requested not in (None, "auto"):
        if requested not in MODES:
            raise ValueError(f"timing mode {requested!r} is not one of {list(MODES)} (or 'auto'); allowed here: {allowed}")
        if requested not in allowed:
            cause = "CUDA graphs need a CUDA device" if requested == "graph" and dev.type != "cuda" else why
            raise ValueError(f"timing mode {requested!r} cannot run on {dev.type} for this model"
                             f"{f' ({cause})' if cause else ''}; allowed modes: {allowed}")
        return requested, "requested"
    if dev.type != "cuda":
        return "eager", "default on CPU: eager (no CUDA graphs here; 'compiled' on request)"
    if "graph" in allowed:
        return "graph", "default on CUDA: CUDA-graph replay over a static KV cache (no host overhead in the timed step)"
    refused = f"the method refuses CUDA graphs: {why}" if why else "the method refuses CUDA graphs"
    if "compiled" in allowed:
        return "compiled", f"default on CUDA when graphs are not allowed: torch.compile ({refused})"
    return "eager", f"default on CUDA when neither graphs nor compilation are allowed ({refused})"


# --- workloads --------------------------------------------------------------------
def _check(phase: str, batch: int, length: int) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r} is not one of {PHASES}")
    for what, v in (("batch", batch), ("length", length)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
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


def _output(logits, cache):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast(logits=logits, past_key_values=cache)


class Workload:
    """A callable that runs one prefill or one decode step of ``model``; built once, called many times.

    ``mode`` is one of :data:`MODES`. Call :meth:`reset` after every call, outside the timed
    region: it rewinds the KV cache so the next call sees the same state. ``static_cache``
    runs the step over a ``StaticCache`` (default: a decode step in every mode but eager; a
    prefill never: see the module docstring); ``mode="eager", static_cache=True`` is the very
    decode step that ``graph`` captures, runnable without CUDA. :attr:`note` says which cache
    and attention path the step takes.

    No reference cycle: the workload holds no bound method of itself, so it (with its KV cache,
    CUDA graph and memory pool) is freed as soon as the last reference goes, without a GC pass.
    """

    def __init__(self, model, phase: str, batch: int, length: int, *, seed: int = 0, mode: str = "eager",
                 text: torch.Tensor | None = None, compile_backend: str = "inductor", static_cache: bool | None = None):
        _check(phase, batch, length)
        if mode not in MODES:
            raise ValueError(f"timing mode {mode!r} is not one of {list(MODES)}")
        self.model, self.phase, self.batch, self.length, self.mode = model, phase, int(batch), int(length), mode
        dev = _device(model)
        if mode == "graph" and not graphs_on(dev):
            raise ValueError(f"timing mode 'graph' (CUDA graphs) needs the model on a CUDA device, it is on {dev}; "
                             f"allowed modes there: {allowed_modes(dev)}")
        from transformers import DynamicCache, StaticCache

        self.static = (mode != "eager" and phase == "decode") if static_cache is None else bool(static_cache)
        if mode != "eager" and phase == "decode" and not self.static:
            raise ValueError(f"timing mode {mode!r} needs a static KV cache (static_cache=True)")
        if mode != "eager" and phase == "prefill" and self.static:
            raise ValueError(f"a {mode!r} prefill runs over a fresh DynamicCache, not a StaticCache: captured or "
                             "compiled over a StaticCache, transformers builds an explicit S x S mask (no causal "
                             "flash kernel), a different attention kernel from eager's")
        self.note = step_note(phase, mode, self.static)
        prompt = _tokens(model, batch, length, seed, text)
        self.cache = None
        with torch.inference_mode():
            if phase == "prefill":
                # a real prefill also fills a (fresh) KV cache: its size shrinks with depth pruning
                self.inputs = {"input_ids": prompt, "use_cache": True, "logits_to_keep": 1}
                if self.static:
                    self.cache = StaticCache(config=model.config, max_cache_len=length)
                self._kv_lengths = None  # every call starts from an empty cache
            else:
                if self.static:
                    _check_window(model.config, length + 1)
                self.cache = (StaticCache(config=model.config, max_cache_len=length + 1) if self.static
                              else DynamicCache(config=model.config))
                model(input_ids=prompt, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
                self._kv_lengths = [int(layer.get_seq_length()) for layer in self.cache.layers]
                nxt = (_tokens(model, batch, 1, seed + 1) if text is None or text.shape[1] <= length
                       else text[:batch, length: length + 1].to(dev))
                self.inputs = {"input_ids": nxt, "use_cache": True}
        self._step = None  # eager: self._forward, looked up per call (a stored bound method would be a cycle)
        if mode == "compiled":
            _raise_recompile_limit()
            self._step = torch.compile(_step_of(model, self.inputs, self.cache), fullgraph=True, dynamic=False,
                                       backend=compile_backend)
        self._graph = None
        if mode == "graph":
            self._capture()

    def _forward(self):
        cache = self.cache
        if cache is None:  # prefill: a fresh cache per call (what the model would make itself)
            from transformers import DynamicCache

            cache = self.last_cache = DynamicCache(config=self.model.config)
        return self.model(**self.inputs, past_key_values=cache).logits

    def _capture(self):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(3):  # warm up on a side stream, as graph capture requires; rewind after each
                self._forward()
                self.reset()
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self._graph):
            self._logits = self._forward()
        self.reset()

    def __call__(self):
        if self._graph is not None:
            self._graph.replay()
            return _output(self._logits, self.cache if self.cache is not None else self.last_cache)
        with torch.inference_mode():
            logits = self._forward() if self._step is None else self._step()
        return _output(logits, self.cache if self.cache is not None else getattr(self, "last_cache", None))

    def reset(self):
        """Rewind every layer's KV cache to where it was before the step (not timed).

        Static layers: ``cumulative_length`` filled in place (the same tensor the captured
        graph reads) with S for a decode step, 0 for a prefill. Dynamic layers may hold
        different lengths (token pruning keeps fewer prompt tokens in later layers), so each
        is cut back to the length it had before the step.
        """
        if self.cache is None:
            return
        from transformers.cache_utils import StaticLayer

        with torch.inference_mode():
            for i, layer in enumerate(self.cache.layers):
                n = 0 if self._kv_lengths is None else self._kv_lengths[i]
                if isinstance(layer, StaticLayer):
                    if layer.is_initialized:
                        layer.cumulative_length.fill_(n)
                    if hasattr(layer, "cumulative_length_int"):  # sliding-window layers also count on the host
                        layer.cumulative_length_int = n
                else:
                    extra = layer.get_seq_length() - n
                    if extra > 0:
                        layer.crop(-extra)

    def kv_bytes_per_token(self) -> float:
        """Bytes the KV cache holds per token and sequence: all layers' keys and values over the slots
        (S + 1 for a static decode cache, S for a prefill; a dynamic cache's own lengths)."""
        cache = self.cache if self.cache is not None else getattr(self, "last_cache", None)
        if cache is None and self._step is not None:  # a compiled prefill keeps its fresh cache inside: run it eagerly
            with torch.inference_mode():
                self._forward()
            cache = self.last_cache
        if cache is None:
            raise RuntimeError("run the workload once before reading its KV cache")
        total = slots = 0
        for layer in cache.layers:
            if getattr(layer, "keys", None) is None or not getattr(layer, "is_initialized", True):
                continue
            total += layer.keys.nbytes + layer.values.nbytes
            slots = max(slots, layer.keys.shape[-2])
        return total / (self.batch * slots) if slots else 0.0


def graphs_on(device) -> bool:
    """Whether ``device`` can capture CUDA graphs (CUDA only; tests fake this with torch's graph API)."""
    return torch.device(device).type == "cuda"


def _step_of(model, inputs: dict, cache):
    """The step as a closure over the model, inputs and cache (not the workload): what ``compiled`` compiles."""
    def step():
        if cache is None:
            from transformers import DynamicCache

            return model(**inputs, past_key_values=DynamicCache(config=model.config)).logits
        return model(**inputs, past_key_values=cache).logits
    return step


def step_note(phase: str, mode: str, static: bool) -> str:
    """Which KV cache and attention path a step of ``phase`` in ``mode`` takes (a speed row's reason)."""
    how = {"eager": "eager", "compiled": "torch.compile(fullgraph)", "graph": "CUDA graph"}[mode]
    if phase == "prefill":
        if static:
            return f"prefill, {how}, over a StaticCache of S slots (uncaptured: SDPA is_causal, as over a DynamicCache)"
        return (f"prefill, {how}, over a fresh DynamicCache: SDPA is_causal (flash where it can) in every mode, the "
                "kernel the cost model counts (captured or compiled over a StaticCache, transformers would build an "
                "explicit S x S mask with repeated K/V heads instead)")
    if static:
        return (f"decode, {how}, over a StaticCache (in-place KV write; transformers masks the S + 1 slots and "
                "repeats K/V heads)")
    return f"decode, {how}, over a DynamicCache (torch.cat copies the whole cache every step)"


def _check_window(config, slots: int) -> None:
    """A static sliding-window layer that is full rolls its keys on every step: its state cannot be rewound."""
    window = getattr(config, "sliding_window", None)
    if window is not None and slots > window:
        raise ValueError(f"static timing modes ('compiled', 'graph') cannot rewind a sliding-window KV cache filled "
                         f"beyond its window ({window} tokens) by a decode step at KV length {slots - 1}; "
                         f"allowed mode here: ['eager']")


def _raise_recompile_limit(limit: int = 256) -> None:
    """Every compiled workload is a new closure of the same code: raise dynamo's recompile limit so that a
    sweep never silently falls back to eager, make hitting it an error rather than a fallback, and guard
    on module hooks."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), limit))
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True
    # guard on module hooks too (dynamo skips them by default): every workload compiles the same code, so
    # without it a step compiled for one model is reused for another of the same shapes whose hooks differ
    if hasattr(cfg, "skip_nnmodule_hook_guards"):
        cfg.skip_nnmodule_hook_guards = False
