"""llama.cpp (through llama-cpp-python) as a runtime: load a GGUF, score next-token log-probs, time steps.

llama_cpp is imported only here and only when a function needs it: nothing else in prunelib requires it.
``make setup-engines`` builds it and writes ``build/engines.status``; :func:`unavailable` says why it cannot
run (that file's reason included) and the engine tests skip with it.

Timing: TTFT = one ``llama_decode`` of a prompt of S tokens into an empty KV cache (one batch, logits of the
last position only); TPOT = one ``llama_decode`` of one token at position S over a KV cache holding S tokens,
the token removed from the cache after each step (untimed) so every step sees S. A monotonic clock
(``time.perf_counter``) brackets ``llama_decode`` and ``llama_synchronize``; llama.cpp's own
``llama_perf_context`` returned zeros through the binding. Dense and pruned engines run as ABBA pairs with
warm-up outside the timed region and the same paired-bootstrap CI as PyTorch's (:func:`compare`, through
:func:`prunelib.measure.timing.interleave`), at one thread count for both.
"""
from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np

from prunelib.core.validate import InputError
from prunelib.measure.stats import Comparison, Latency, paired_ratio_ci
from prunelib.measure.timing import BUDGET_S, PHASES, interleave, resolve_target

RUNTIME = "llama.cpp"
#: written by ``make setup-engines``: "ok ..." or "failed: <reason>"
STATUS_FILE = Path(__file__).resolve().parents[2] / "build" / "engines.status"
KV_TYPES = ("f32", "f16")


class EngineUnavailable(RuntimeError):
    """llama_cpp cannot be imported here; the message says why (the build status included)."""


def unavailable() -> str | None:
    """Why llama.cpp cannot run here, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as err:  # an ImportError, or an OSError from a library built for another CPU
        status = STATUS_FILE.read_text().strip() if STATUS_FILE.exists() else "make setup-engines has not been run"
        return f"llama_cpp cannot be imported ({type(err).__name__}: {err}); build status: {status}"
    return None


def _llama_cpp():
    reason = unavailable()
    if reason:
        raise EngineUnavailable(reason)
    import llama_cpp

    return llama_cpp


def version() -> str:
    return _llama_cpp().__version__


class Engine:
    """One GGUF model in one llama.cpp context (``threads`` for prompt and decode alike)."""

    def __init__(self, path, *, n_ctx: int = 1024, threads: int = 1, kv: str = "f16", n_batch: int | None = None,
                 dtype: str | None = None):
        lc = _llama_cpp()
        from llama_cpp._internals import LlamaBatch

        if kv not in KV_TYPES:
            raise InputError(f"kv={kv!r} is not allowed: expected one of {KV_TYPES} (the KV cache's type)")
        if not isinstance(threads, int) or threads < 1:
            raise InputError(f"threads={threads!r} is not allowed: expected a positive integer")
        if not Path(path).is_file():
            raise InputError(f"path={str(path)!r} is not allowed: expected an existing GGUF file")
        self.path, self.threads, self.kv, self.dtype, self.n_ctx = Path(path), threads, kv, dtype, int(n_ctx)
        n_batch = int(n_batch or n_ctx)  # a whole prompt is one batch, one graph
        ggml = {"f32": lc.GGML_TYPE_F32, "f16": lc.GGML_TYPE_F16}[kv]
        self.llm = lc.Llama(model_path=str(path), n_ctx=self.n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                            n_threads=threads, n_threads_batch=threads, type_k=ggml, type_v=ggml, logits_all=False,
                            verbose=False)
        self.lc, self.ctx, self.n_vocab = lc, self.llm._ctx, self.llm.n_vocab()
        self.batch = LlamaBatch(n_tokens=self.n_ctx, embd=0, n_seq_max=1, verbose=False)

    def close(self) -> None:
        self.batch.close()
        self.llm.close()

    def _check_ids(self, ids) -> list[int]:
        ids = [int(t) for t in ids]
        if not ids or len(ids) > self.n_ctx:
            raise InputError(f"{len(ids)} tokens are not allowed: expected 1..{self.n_ctx} (the context size)")
        bad = [t for t in ids if not 0 <= t < self.n_vocab]
        if bad:
            raise InputError(f"token ids {bad[:5]} are not allowed: expected ids in [0, {self.n_vocab})")
        return ids

    def decode(self, batch) -> None:
        self.ctx.decode(batch)
        self.lc.llama_synchronize(self.ctx.ctx)

    def clear(self) -> None:
        self.ctx.kv_cache_clear()

    def logprobs(self, ids) -> np.ndarray:
        """Log-probabilities of the next token after every prefix of ``ids``: [len(ids), n_vocab], float64."""
        ids = self._check_ids(ids)
        self.clear()
        self.batch.set_batch(ids, n_past=0, logits_all=True)
        self.decode(self.batch)
        ptr = self.lc.llama_get_logits(self.ctx.ctx)
        logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                       shape=(len(ids), self.n_vocab)).astype(np.float64)
        self.clear()
        logits -= logits.max(-1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(-1, keepdims=True))

    def step(self, phase: str, length: int, ids) -> "Step":
        return Step(self, phase, length, ids)


class Step:
    """One timed step of an :class:`Engine` (``__call__``) and its untimed reset, like PyTorch's Workload.

    ``ids``: at least ``length + 1`` token ids; prefill runs the first ``length``, decode prefills them once
    (untimed, at build) and decodes token ``length`` at position ``length``.
    """

    def __init__(self, engine: Engine, phase: str, length: int, ids):
        from llama_cpp._internals import LlamaBatch

        if phase not in PHASES:
            raise InputError(f"phase={phase!r} is not allowed: expected one of {PHASES}")
        if not isinstance(length, int) or not 1 <= length < engine.n_ctx:
            raise InputError(f"length={length!r} is not allowed: expected 1..{engine.n_ctx - 1} (the context size "
                             "less the decoded token)")
        ids = engine._check_ids(list(ids)[:length + 1])
        if len(ids) < length + 1:
            raise InputError(f"{len(ids)} token ids are not allowed: a step at length {length} needs {length + 1}")
        self.engine, self.phase, self.length = engine, phase, length
        engine.clear()
        if phase == "prefill":
            self.batch = engine.batch
            self.batch.set_batch(ids[:length], n_past=0, logits_all=False)
        else:
            engine.batch.set_batch(ids[:length], n_past=0, logits_all=False)
            engine.decode(engine.batch)  # the KV cache of S tokens: built once, outside the timed region
            self.batch = LlamaBatch(n_tokens=1, embd=0, n_seq_max=1, verbose=False)
            self.batch.set_batch(ids[length:length + 1], n_past=length, logits_all=False)

    def __call__(self) -> None:
        self.engine.decode(self.batch)

    def reset(self) -> None:
        if self.phase == "prefill":
            self.engine.clear()
        else:
            self.engine.ctx.kv_cache_seq_rm(0, self.length, -1)  # back to a cache of exactly S tokens


def clock(step) -> float:
    """Seconds one call of ``step`` takes on a monotonic clock, then its untimed reset."""
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    step.reset()
    return seconds


def compare(base, cand, phase: str, length: int, ids, *, reps: int = 20, warmup: int = 3, seed: int = 0,
            target: float | str | None = None, budget_s: float = BUDGET_S, max_reps: int = 5000,
            timer=clock) -> Comparison:
    """Speedup of engine ``cand`` over engine ``base`` (objects with ``step(phase, length, ids)``, such as
    :class:`Engine`) at prompt / KV length ``length``, batch 1: ABBA pairs, warm-up outside the timed region,
    the median of per-pair ratios with its bootstrap 95% CI (as :func:`prunelib.measure.timing.compare`).

    ``target``/``budget_s``/``max_reps``: as PyTorch's compare. ``timer(step) -> seconds`` runs a step once and
    resets it (default :func:`clock`). Both engines must run at the same thread count.
    """
    target = resolve_target(target, phase, reps)
    if getattr(base, "threads", None) != getattr(cand, "threads", None):
        raise InputError(f"threads={getattr(cand, 'threads', None)!r} is not allowed: the candidate must run at the "
                         f"dense engine's {getattr(base, 'threads', None)} threads")
    t0 = time.perf_counter()
    wb = cand.step(phase, length, ids)  # candidate first: a model that cannot run fails early
    setup_b = time.perf_counter() - t0
    wa = base.step(phase, length, ids)
    setup_a = time.perf_counter() - t0 - setup_b
    ta, tb, stop, seconds = interleave(lambda: timer(wa), lambda: timer(wb), reps=reps, warmup=warmup, target=target,
                                       budget_s=budget_s, max_reps=max_reps, seed=seed)
    sp, lo, hi = paired_ratio_ci(ta, tb, seed=seed)
    note = f"llama.cpp {getattr(base, 'dtype', None) or '?'} weights, {getattr(base, 'kv', '?')} KV cache, " \
           f"{getattr(base, 'threads', '?')} threads"
    return Comparison(phase, 1, length, Latency(ta), Latency(tb), sp, lo, hi, RUNTIME, target, stop, seconds,
                      (setup_a, setup_b), None, note)


def measure(engine, phase: str, length: int, ids, *, reps: int = 10, warmup: int = 2, timer=clock) -> Latency:
    """Raw samples of one engine's step (warm-up untimed)."""
    step = engine.step(phase, length, ids)
    for _ in range(warmup):
        timer(step)
    return Latency([timer(step) for _ in range(reps)])
