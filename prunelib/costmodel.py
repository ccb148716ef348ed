"""GEMM-centric cost model: every matrix product of a forward pass, its FLOPs and bytes.

Every linear layer is a GEMM ``Y[M,N] = X[M,K] @ W[K,N]``: M = tokens in flight
(B*S in prefill, B in decode), N = output features, K = reduction features.
Attention adds two products per (sequence, query head):
``QK^T`` (M = query tokens, N = key tokens, K = head_dim) and
``PV``  (M = query tokens, N = head_dim, K = key tokens).

Shapes are read from the actual (possibly pruned) model through the adapter, so a
model with fewer layers, heads or channels is costed as it is. Conventions:

- prefill of B x S tokens computes logits for the last position only
  (``logits_to_keep=1``, what generation needs); pass ``logits="all"`` to cost
  every position;
- a decode step "at KV length S" feeds one new token per sequence with S cached
  tokens, so its attention spans S + 1 keys;
- attention FLOPs count the full S x S score matrix, as the math and SDPA CPU
  kernels (and ``torch.utils.flop_counter``) do; ``causal=True`` halves it, as
  flash kernels that skip masked blocks do;
- norms, rotary embeddings, softmax and activations are not GEMMs and are not counted.

Bytes moved per GEMM = read A + read B + write C, once each (the roofline ideal).
For attention, the K/V cache of a KV head is read once for all query heads of its group.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import pandas as pd

from .adapter import LayerShape, ModelAdapter
from .hardware import HardwareSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know of a model: its per-layer shapes."""

    hidden: int
    vocab: int
    layers: tuple[LayerShape, ...]

    @classmethod
    def of(cls, model) -> "ModelShape":
        """Read the shapes of a (possibly pruned) model."""
        a = model if isinstance(model, ModelAdapter) else ModelAdapter(model)
        return cls(hidden=a.hidden_size, vocab=a.vocab_size, layers=tuple(a.layer_shapes()))

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """Shapes of an unpruned model straight from its config (no weights needed)."""
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layer = LayerShape(
            hidden=config.hidden_size,
            n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads,
            head_dim=hd,
            intermediate=config.intermediate_size,
        )
        return cls(hidden=config.hidden_size, vocab=config.vocab_size, layers=(layer,) * config.num_hidden_layers)


@dataclass(frozen=True)
class Gemm:
    """One GEMM (``count`` independent copies of it, e.g. one per sequence and head)."""

    name: str
    layer: int | None
    kind: str  # "linear" | "attn_qk" | "attn_pv"
    m: int
    n: int
    k: int
    count: int
    flops: float
    bytes: float


def _check(phase: str, batch: int, length: int, dtype: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r} is not one of {PHASES}")
    for what, v in (("batch", batch), ("length", length)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{what} must be a positive integer, got {v!r}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}")


def _linear(name: str, layer: int | None, m: int, n: int, k: int, e: int) -> Gemm:
    return Gemm(name, layer, "linear", m, n, k, 1, 2.0 * m * n * k, float(e * (m * k + k * n + m * n)))


def gemms(
    shape: ModelShape,
    phase: str,
    batch: int,
    length: int,
    dtype: str = "float32",
    *,
    logits: str = "last",
    causal: bool = False,
) -> list[Gemm]:
    """Enumerate the GEMMs of one prefill (B x S tokens) or one decode step (KV length S)."""
    _check(phase, batch, length, dtype)
    if logits not in ("last", "all"):
        raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
    e = DTYPE_BYTES[dtype]
    B, S = batch, length
    tokens = B * S if phase == "prefill" else B
    q_len, kv_len = (S, S) if phase == "prefill" else (1, S + 1)
    out: list[Gemm] = []
    for i, ls in enumerate(shape.layers):
        p = f"layers.{i}."
        if ls.has_attn:
            hd, nq, nkv = ls.head_dim, ls.n_heads, ls.n_kv_heads
            out += [
                _linear(p + "self_attn.q_proj", i, tokens, nq * hd, ls.hidden, e),
                _linear(p + "self_attn.k_proj", i, tokens, nkv * hd, ls.hidden, e),
                _linear(p + "self_attn.v_proj", i, tokens, nkv * hd, ls.hidden, e),
            ]
            frac = 0.5 if (causal and phase == "prefill") else 1.0
            flops = frac * 2.0 * q_len * kv_len * hd * B * nq
            # Q and scores per query head; K (or V) once per KV head
            qk_bytes = e * B * (nq * (q_len * hd + q_len * kv_len) + nkv * kv_len * hd)
            pv_bytes = e * B * (nq * (q_len * kv_len + q_len * hd) + nkv * kv_len * hd)
            out += [
                Gemm(p + "self_attn.qk", i, "attn_qk", q_len, kv_len, hd, B * nq, flops, float(qk_bytes)),
                Gemm(p + "self_attn.pv", i, "attn_pv", q_len, hd, kv_len, B * nq, flops, float(pv_bytes)),
                _linear(p + "self_attn.o_proj", i, tokens, ls.hidden, nq * hd, e),
            ]
        if ls.has_mlp:
            out += [
                _linear(p + "mlp.gate_proj", i, tokens, ls.intermediate, ls.hidden, e),
                _linear(p + "mlp.up_proj", i, tokens, ls.intermediate, ls.hidden, e),
                _linear(p + "mlp.down_proj", i, tokens, ls.hidden, ls.intermediate, e),
            ]
    head_m = tokens if (phase == "decode" or logits == "all") else B
    out.append(_linear("lm_head", None, head_m, shape.vocab, shape.hidden, e))
    return out


def roofline_seconds(g: Gemm, hw: HardwareSpec, dtype: str) -> float:
    """Roofline time of one GEMM: limited by compute or by memory traffic, whichever is slower."""
    return max(g.flops / hw.flops(dtype), g.bytes / hw.bandwidth)


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float
    seconds: float  # roofline bound on ``hw``
    table: pd.DataFrame  # one row per GEMM

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes


def cost(shape: ModelShape, phase: str, batch: int, length: int, dtype: str, hw: HardwareSpec, **kw) -> Cost:
    """Total FLOPs, bytes and roofline time of a forward pass, with the per-GEMM table."""
    gs = gemms(shape, phase, batch, length, dtype, **kw)
    table = pd.DataFrame([g.__dict__ for g in gs])
    table["seconds"] = [roofline_seconds(g, hw, dtype) for g in gs]
    table["bound"] = ["compute" if g.flops / hw.flops(dtype) >= g.bytes / hw.bandwidth else "memory" for g in gs]
    return Cost(float(table.flops.sum()), float(table.bytes.sum()), float(table.seconds.sum()), table)


def theoretical_speedup(dense: ModelShape, pruned: ModelShape, phase: str, batch: int, length: int, dtype: str, hw: HardwareSpec, **kw) -> float:
    """t_dense / t_pruned under the roofline model: the speedup the GEMMs alone allow."""
    return cost(dense, phase, batch, length, dtype, hw, **kw).seconds / cost(pruned, phase, batch, length, dtype, hw, **kw).seconds


def drop_layers(shape: ModelShape, indices) -> ModelShape:
    """The shape of ``shape`` without the given layers (for what-if costing without pruning)."""
    drop = set(indices)
    return replace(shape, layers=tuple(ls for i, ls in enumerate(shape.layers) if i not in drop))
