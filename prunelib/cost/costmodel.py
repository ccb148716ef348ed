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
- attention products are costed as the kernel computes them. Dense prefill with
  ``causal=True`` (the default for sdpa / flash models) counts the causal lower
  triangle, S(S+1)/2 score entries per (sequence, head): SDPA with ``is_causal`` (flash
  on CUDA, the flash kernel on CPU; what transformers' sdpa attention runs on an
  unpadded prompt) skips the key blocks above the diagonal. It computes its diagonal
  tiles whole, about t/S more for query tiles of t rows (our reading of the kernels:
  t = 32..256 on CPU by length, +25% at S=256 and +12.5% at S=2048; 64..128 on CUDA),
  which the triangle leaves out. ``causal=False`` counts the full S x S product, what
  eager attention and SDPA with an explicit (padding) mask compute; by default a model
  read with eager attention is costed so (``ModelShape.causal_skip``);
- block-sparse attention (``attn_tile``) counts exactly the (query block, key block) tiles
  it computes, each whole (block x block, the diagonal included): realised density x
  nb(nb+1)/2 causal tiles, nb = ceil(S / block); its decode step the gathered page slots
  (kept pages x page). Its estimator costs the GEMMs it runs: pooled means per KV head in
  prefill ([nb, d] x [d, nb]), Quest's two bound GEMMs ([G, d] x [d, complete pages]) in decode;
- norms, rotary embeddings, softmax and activations are not GEMMs and are not counted.

Bytes moved per GEMM = read A + read B + write C, once each (the roofline ideal).
For attention, the K/V cache of a KV head is read once for all query heads of its group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pandas as pd

from prunelib.model.adapter import LayerShape, ModelAdapter
from prunelib.cost.hardware import HardwareSpec

#: bytes per element; ``q8_0`` is llama.cpp's 8-bit format (blocks of 32 int8 values and one f16 scale: 34 bytes
#: per 32), for bounds of GGUF exports (:mod:`prunelib.runtime`), where activations and KV are costed at it too
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "q8_0": 34 / 32}
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know of a model: its per-layer shapes."""

    hidden: int
    vocab: int
    layers: tuple[LayerShape, ...]
    #: the attention kernel skips the masked half of a causal prefill (sdpa, flash, flex); eager attention
    #: computes the full S x S product and masks it
    causal_skip: bool = True

    @classmethod
    def of(cls, model) -> "ModelShape":
        """Read the shapes of a (possibly pruned) model."""
        a = model if isinstance(model, ModelAdapter) else ModelAdapter(model)
        impl = getattr(a.config, "_attn_implementation", None) or "sdpa"
        return cls(hidden=a.hidden_size, vocab=a.vocab_size, layers=tuple(a.layer_shapes()), causal_skip=impl != "eager")

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


def _linear(name: str, layer: int | None, m: float, n: int, k: int, e: int, wfrac: float = 1.0) -> Gemm:
    """``wfrac``: expected fraction of steps that read the weights at all (dynamic depth, see gemms)."""
    return Gemm(name, layer, "linear", m, n, k, 1, 2.0 * m * n * k, float(e * (m * k + wfrac * k * n + m * n)))


def _weights_read(frac: float, tokens: float) -> float:
    """Chance that at least one of ``tokens`` tokens runs a sublayer each runs with chance ``frac``.

    A routed sublayer that no token runs reads no weights: at decode with batch 1 a skip
    rate r saves r of the weight traffic too; in prefill some token always runs it.
    """
    return 1.0 if frac >= 1 else 1.0 - (1.0 - frac) ** tokens


def _projection(p: str, proj: str, ls: LayerShape, layer: int, m: float, n: int, k: int, e: int,
                sparse_kernels: bool, wfrac: float = 1.0) -> list[Gemm]:
    """The GEMM(s) of one projection: one dense GEMM, two for a low-rank pair, a 2:4 one with sparse kernels."""
    name, proj = p + proj, proj.rsplit(".", 1)[-1]
    if proj in ls.rank:
        r = ls.rank[proj]
        return [_linear(name + ".first", layer, m, r, k, e, wfrac), _linear(name + ".second", layer, m, n, r, e, wfrac)]
    if proj in ls.sparse24 and sparse_kernels:
        # half the multiply-adds; half the weights plus 2 bits of metadata per kept weight
        w_bytes = wfrac * (e * k * n / 2 + k * n / 2 * 2 / 8)
        return [Gemm(name, layer, "linear_24", m, n, k, 1, 1.0 * m * n * k, float(e * (m * k + m * n) + w_bytes))]
    return [_linear(name, layer, m, n, k, e, wfrac)]


def _linears_by_place(ls: LayerShape) -> dict:
    """A layer's ``(label, roles)`` Linears by place: attention inputs (q/k/v, fused or not), o, MLP inputs, down."""
    place = {"q": "attention_in", "k": "attention_in", "v": "attention_in", "o": "o",
             "gate": "mlp_in", "up": "mlp_in", "down": "down"}
    out = {p: [] for p in ("attention_in", "o", "mlp_in", "down")}
    for label, roles in ls.linear_roles:
        out[place[roles[0]]].append((label, roles))
    return out


def _score_entries(ls: LayerShape, phase: str, q_rows: float, kv_len: float, causal: bool) -> float:
    """Score entries (query, key) one (sequence, query head) computes: see the module docstring."""
    if phase == "decode":
        return q_rows * kv_len * ls.attn_density  # a sparse step: the gathered page slots
    if ls.attn_tile:
        nb = math.ceil(kv_len / ls.attn_tile)
        return ls.attn_density * nb * (nb + 1) / 2 * ls.attn_tile ** 2
    if causal and ls.attn_tokens >= 1:  # routed queries (dynamic depth) run with an explicit mask: full rows
        return q_rows * (kv_len + 1) / 2 * ls.attn_density
    return q_rows * kv_len * ls.attn_density


def _estimate(p: str, i: int, ls: LayerShape, phase: str, q_rows: float, kv_len: float, B: int, e: int) -> Gemm:
    """The block / page estimator of sparse attention, per KV head.

    Prefill: pooled query means against pooled key means, [nb, d] x [d, nb]. Decode: Quest's
    bound q+ . hi + q- . lo, two [G, d] x [d, pages] GEMMs over the complete pages (the open
    page's bound is elementwise, not a GEMM).
    """
    hd, nkv, G = ls.head_dim, ls.n_kv_heads, ls.n_heads // ls.n_kv_heads
    b = ls.attn_block
    if phase == "prefill":
        m, n, k, copies = math.ceil(q_rows / b), math.ceil(kv_len / b), hd, 1
    else:
        m, n, k, copies = G, (math.ceil(kv_len) - 1) // b, hd, 2
    flops = copies * 2.0 * m * n * k * B * nkv
    return Gemm(p + "self_attn.estimate", i, "attn_est", m, n, k, copies * B * nkv, flops,
                float(e * B * nkv * copies * (m * k + n * k + m * n)))


def gemms(
    shape: ModelShape,
    phase: str,
    batch: int,
    length: int,
    dtype: str = "float32",
    *,
    logits: str = "last",
    causal: bool | None = None,
    sparse_kernels: bool = False,
) -> list[Gemm]:
    """Enumerate the GEMMs of one prefill (B x S tokens) or one decode step (KV length S).

    ``causal``: cost dense causal prefill attention as the lower triangle (None: as the
    model's attention kernel runs it, ``shape.causal_skip``).
    ``sparse_kernels``: cost 2:4 projections as the semi-structured kernels run them
    (the device has them); otherwise they are the dense GEMMs they really are.
    Dynamic fields of a layer (token fractions, kept sequence, attention density) scale
    M, the attention lengths and the score matrix as realised.
    """
    _check(phase, batch, length, dtype)
    causal = shape.causal_skip if causal is None else causal
    if logits not in ("last", "all"):
        raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
    e = DTYPE_BYTES[dtype]
    B, S = batch, length
    out: list[Gemm] = []
    for i, ls in enumerate(shape.layers):
        p = f"layers.{i}."
        proj = lambda name, m, n, k, w=1.0: _projection(p, name, ls, i, m, n, k, e, sparse_kernels, w)  # noqa: E731
        if phase == "prefill":
            seq = S * ls.seq_frac
            q_len, kv_len = seq, seq
        else:
            seq = 1
            q_len, kv_len = 1, S * ls.seq_frac + 1
        tokens = B * seq
        linears = _linears_by_place(ls)
        if ls.router:
            out.append(_linear(p + "router", i, tokens, ls.router, ls.hidden, e))
        out += [_linear(p + f"shortcut{j}", i, tokens, ls.hidden, ls.hidden, e) for j in range(ls.shortcut)]
        if ls.has_attn:
            hd, nq, nkv = ls.head_dim, ls.n_heads, ls.n_kv_heads
            q_rows = q_len * ls.attn_tokens
            w_attn = _weights_read(ls.attn_tokens, tokens)
            width = {"q": nq * hd, "k": nkv * hd, "v": nkv * hd, "o": ls.hidden}
            for label, roles in linears["attention_in"]:  # q alone runs on the routed tokens only
                if "q" in roles and len(roles) > 1 and ls.attn_tokens < 1:  # q's rows of a fused Linear apart
                    out += proj(label + "[q]", tokens * ls.attn_tokens, width["q"], ls.hidden, w_attn)
                    roles = tuple(r for r in roles if r != "q")
                    out += proj(label + "[" + "".join(roles) + "]", tokens, sum(width[r] for r in roles), ls.hidden)
                    continue
                routed = roles == ("q",)
                out += proj(label, tokens * ls.attn_tokens if routed else tokens, sum(width[r] for r in roles),
                            ls.hidden, w_attn if routed else 1.0)
            pairs = _score_entries(ls, phase, q_rows, kv_len, causal)  # per (sequence, query head)
            flops = 2.0 * pairs * hd * B * nq
            # Q and scores per query head; K (or V) once per KV head
            kv_read = kv_len * ls.attn_density
            qk_bytes = e * B * (nq * (q_rows * hd + pairs) + nkv * kv_read * hd)
            pv_bytes = e * B * (nq * (pairs + q_rows * hd) + nkv * kv_read * hd)
            if ls.attn_block:
                out.append(_estimate(p, i, ls, phase, q_rows, kv_len, B, e))
            out += [
                Gemm(p + "self_attn.qk", i, "attn_qk", q_rows, kv_len, hd, B * nq, flops, float(qk_bytes)),
                Gemm(p + "self_attn.pv", i, "attn_pv", q_rows, hd, kv_len, B * nq, flops, float(pv_bytes)),
            ]
            for label, _ in linears["o"]:
                out += proj(label, tokens * ls.attn_tokens, ls.hidden, nq * hd, w_attn)
        if ls.has_mlp:
            m, w_mlp = tokens * ls.mlp_tokens, _weights_read(ls.mlp_tokens, tokens)
            for label, roles in linears["mlp_in"]:
                out += proj(label, m, ls.intermediate * len(roles), ls.hidden, w_mlp)
            for label, _ in linears["down"]:
                out += proj(label, m, ls.hidden, ls.intermediate, w_mlp)
    tokens = B * S if phase == "prefill" else B
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
    kw.setdefault("sparse_kernels", hw.sparse24 and dtype in ("float16", "bfloat16"))
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
