"""Memory beside time: the measured footprint of a step (peak, weights, KV cache per token) and the cost
model's prediction of it."""
from __future__ import annotations

from dataclasses import dataclass

import torch


from prunelib.measure.workload import Workload, _device


def _rss_reset() -> bool:
    """Reset this process's peak RSS (Linux: ``5`` to /proc/self/clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field_name} not in /proc/self/status")


@dataclass
class Footprint:
    """Memory of one timed step: measured beside the cost model's prediction (bytes)."""

    peak_bytes: float | None  # working memory of the step beyond what was resident before it (KV cache + activations)
    peak_method: str  # how peak_bytes was measured
    weight_bytes: int
    kv_bytes_per_token: float

    def extra(self, pred: dict) -> dict:
        """The fields of a speed row's ``extra``."""
        return {"mem_peak_bytes": self.peak_bytes, "mem_peak_method": self.peak_method, "weight_bytes": self.weight_bytes,
                "weight_bytes_pred": pred["weight_bytes"], "kv_bytes_per_token": self.kv_bytes_per_token,
                "kv_bytes_per_token_pred": pred["kv_bytes_per_token"]}


def footprint(model, phase: str, batch: int, length: int, *, mode: str = "eager", seed: int = 0,
              text: torch.Tensor | None = None, compile_backend: str = "inductor") -> Footprint:
    """Build the timed step of ``model`` once and run it once, measuring its memory.

    Peak: on CUDA ``max_memory_allocated`` minus what was allocated before (the KV cache,
    activations and workspace of the step: the weights are resident already); on CPU the
    peak RSS (VmHWM, reset first) minus the RSS before: the same quantity as the allocator
    sees it, plus allocator slack. Weights: the bytes of every distinct parameter storage
    (tensor subclasses by their inner tensors). KV: the cache's bytes per token and sequence.
    """
    from prunelib.model.models import weight_bytes

    dev = _device(model)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        ok = _rss_reset()
        before = _rss("VmRSS") if ok else None
    work = Workload(model, phase, batch, length, seed=seed, mode=mode, text=text, compile_backend=compile_backend)
    work()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak, how = torch.cuda.max_memory_allocated(dev) - before, "cuda max_memory_allocated delta"
    elif before is not None:
        peak, how = _rss("VmHWM") - before, "cpu peak RSS delta (VmHWM after clear_refs)"
    else:
        peak, how = None, "not measurable here (no /proc/self/clear_refs)"
    kv = work.kv_bytes_per_token()
    work.reset()
    return Footprint(peak, how, weight_bytes(model), kv)


def predicted_memory(model, dtype: str | None = None, hw=None, shape=None) -> dict:
    """The cost model's weight bytes and KV-cache bytes per token of ``model`` (as pruned).

    Weights: the weight operand of every GEMM of a long prefill (2:4 projections at half
    size plus metadata where ``hw`` has sparse kernels; routed sublayers read in full),
    plus the embedding table unless it is tied to the head. KV: 2 (K and V) x KV heads x
    head_dim x element size per attention layer, times the layer's kept sequence fraction.
    ``shape``: the cost-model shape to use (default: read from ``model``).
    """
    from prunelib.cost import costmodel

    dtype = dtype or str(next(model.parameters()).dtype).removeprefix("torch.")
    shape = shape or costmodel.ModelShape.of(model)
    e = costmodel.DTYPE_BYTES[dtype]
    kw = {} if hw is None else {"sparse_kernels": hw.sparse24 and dtype in ("float16", "bfloat16")}
    gs = costmodel.gemms(shape, "prefill", 1, 4096, dtype, **kw)
    w = sum(g.bytes - e * (g.m * g.k + g.m * g.n) for g in gs if g.kind in ("linear", "linear_24"))
    if not getattr(model.config, "tie_word_embeddings", False):
        w += e * shape.vocab * shape.hidden
    kv = sum(2 * ls.n_kv_heads * ls.head_dim * e * ls.seq_frac for ls in shape.layers if ls.has_attn)
    return {"weight_bytes": float(w), "kv_bytes_per_token": float(kv)}
