"""Export a (pruned) model to a GGUF file that llama.cpp loads, or refuse naming what the format lacks.

Architectures written:

- ``llama`` (Llama, Mistral, Phi-3 with its fused q/k/v and gate/up split by role) and ``qwen2`` (Qwen2) when
  every layer has the same head, KV-head and FFN counts; ``qwen2`` also needs heads x head_dim = hidden and no
  output biases, else it is written as ``deci``;
- ``deci`` where they differ by layer (width pruning, attention-only removal): the same tensor names with
  per-layer ``feed_forward_length``, ``attention.head_count`` and ``attention.head_count_kv`` arrays. Under
  ``llama`` llama.cpp takes layer 0's counts for every layer and refuses the tensors of a layer that differs.
  A layer without attention has head count 0 (llama.cpp skips its attention and norm). A layer with attention
  but no MLP gets a zero FFN of :data:`ZERO_FFN` channels (output exactly 0): llama.cpp's ``deci`` graph drops
  the attention output of a layer whose FFN length is 0. Likewise a layer 0 without attention gets a zero
  attention of one head: llama.cpp reads the head size (``key_length``) only when layer 0 has heads.
  ``ExportInfo.notes`` says where it did either.

Static depth is a model with fewer blocks; 2:4 weights are written as the dense matrices they are (llama.cpp
has no 2:4 kernel). ``attention.key_length``/``value_length`` are stated (a layer 0 without heads would
otherwise divide by zero), and q/k rows are permuted from Hugging Face's rotate-half layout to GGUF's
interleaved one for ``llama``/``deci`` (``qwen2`` keeps the Hugging Face layout: llama.cpp ropes it NEOX-style).

Refused (:class:`Unrepresentable`, naming the module and what GGUF / llama.cpp lacks): SliceGPT's shortcut
matrices, low-rank pairs, dynamic routing, token pruning, block-sparse / sparse attention, any other projection
module, non-SiLU MLPs, scaled or partial rotary embeddings.

Export dtypes: ``f32`` (for checking against PyTorch), ``f16``, ``q8_0`` (llama.cpp's 8-bit blocks of 32 with
an f16 scale, quantized by gguf-py; a matrix whose rows are not a multiple of 32 stays f16). Norms and biases
stay f32, as llama.cpp's converter writes them.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from prunelib.core.validate import InputError
from prunelib.model.adapter import ModelAdapter
from prunelib.runtime import gguf_vocab

EXPORT_DTYPES = ("f32", "f16", "q8_0")
#: the cost model's dtype (bytes per weight) of each export dtype
COST_DTYPES = {"f32": "float32", "f16": "float16", "q8_0": "q8_0"}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
#: llama.cpp architecture of each family when its layers are uniform (else ``deci``)
ARCH_OF = {"llama": "llama", "mistral": "llama", "phi3": "llama", "qwen2": "qwen2"}
FORMAT_VERSION = 1  # bump when what export() writes changes (cached exports are keyed by it)
#: a GEMM reduction size llama.cpp's fast CPU kernels take whole (q8_0 blocks are 32 wide too)
ALIGN = 32
ZERO_FFN = 32  # channels of the zero FFN given to a layer that kept its attention and lost its MLP


class Unrepresentable(InputError):
    """The model holds structure a GGUF file (as llama.cpp runs it) cannot express."""


def _lacks() -> tuple:
    """``(module class, what GGUF / llama.cpp lacks)`` for every pruned structure that cannot be exported."""
    from prunelib.pruning.lowrank import LowRankLinear
    from prunelib.pruning.routed_layer import RoutedDecoderLayer
    from prunelib.pruning.slicegpt import SlicedDecoderLayer
    from prunelib.pruning.sparse_attention import SparseAttention
    from prunelib.pruning.token_pruning import TokenPrunedLayer

    return (
        (SlicedDecoderLayer, "SliceGPT's shortcut matrices: a llama.cpp decoder layer adds its input to the "
                             "residual unchanged (no per-layer [hidden x hidden] shortcut GEMM, no scale-free norm)"),
        (LowRankLinear, "low-rank pairs: a GGUF projection is one weight matrix, so the K->r->N pair would have to be "
                        "multiplied back into a dense matrix (timing a dense layer, not the pruned one)"),
        (RoutedDecoderLayer, "dynamic routing: llama.cpp runs every layer on every token; GGUF has no router and no "
                             "per-token layer skipping"),
        (TokenPrunedLayer, "token pruning: llama.cpp keeps every prompt token in every layer; GGUF has no rule that "
                           "drops tokens part-way through the stack"),
        (SparseAttention, "block-sparse / sparse attention: llama.cpp computes dense attention over the whole KV "
                          "cache; GGUF has no block or page selection rule"),
    )


@dataclass(frozen=True)
class LayerPlan:
    n_head: int
    n_kv: int
    n_ff: int  # as written (ZERO_FFN for a layer given a zero FFN)
    zero_ffn: bool = False
    zero_attn: bool = False  # a zero attention of one head (layer 0 without attention, see the module docstring)


@dataclass(frozen=True)
class ExportPlan:
    arch: str
    family: str
    hidden: int
    head_dim: int
    n_vocab: int
    layers: tuple
    notes: tuple = ()

    @property
    def uniform(self) -> bool:
        return len({(p.n_head, p.n_kv, p.n_ff) for p in self.layers}) == 1


@dataclass
class ExportInfo:
    path: Path
    arch: str
    dtype: str
    bytes: int
    plan: ExportPlan
    tensor_types: dict = field(default_factory=dict)
    vocab: str = ""

    @property
    def notes(self) -> tuple:
        return self.plan.notes


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise Unrepresentable(f"rope_type={kind!r} is not allowed: the GGUF export writes plain rotary embeddings "
                              "('default') only")
    if float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)) != 1.0:
        raise Unrepresentable("partial_rotary_factor != 1 is not allowed: llama.cpp's llama/deci graphs rotate "
                              "the whole head")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise Unrepresentable("the config states no rope_theta; the GGUF needs rope.freq_base")
    return float(theta)


def check(model) -> ModelAdapter:
    """Refuse a model GGUF cannot represent (:class:`Unrepresentable`, naming the module and what is missing)."""
    a = ModelAdapter(model)
    if a.family not in ARCH_OF:
        raise Unrepresentable(f"model family {a.family!r} is not allowed: the GGUF export knows {sorted(ARCH_OF)}")
    for name, mod in model.named_modules():
        for cls, why in _lacks():
            if isinstance(mod, cls):
                raise Unrepresentable(f"{name or 'the model'} ({type(mod).__name__}) cannot be exported to GGUF: {why}")
    act = getattr(a.config, "hidden_act", "silu")
    if act != "silu":
        raise Unrepresentable(f"hidden_act={act!r} is not allowed: llama.cpp's llama/qwen2/deci FFN is SiLU-gated")
    _rope_theta(a.config)
    for i in range(len(a.layers)):
        for kind, projs in (("attention", a.attn_proj(i)), ("mlp", a.mlp_proj(i))):
            for n, lin in projs.items():
                if not isinstance(lin, nn.Linear):
                    raise Unrepresentable(f"layer {i} {kind} projection {n} is a {type(lin).__name__}: the GGUF "
                                          "export writes plain (or 2:4-masked) Linear weights only")
    return a


def plan(model) -> ExportPlan:
    """The architecture and per-layer counts ``model`` is written with (after :func:`check`)."""
    a = check(model)
    hd, hidden, notes, layers = a.head_dim, a.hidden_size, [], []
    for i in range(len(a.layers)):
        attn, mlp = a.attn(i) is not None, a.mlp(i) is not None
        n_head = a.fam.out_rows(a.attn(i), "q") // hd if attn else 0
        n_kv = a.fam.out_rows(a.attn(i), "k") // hd if attn else 0
        n_ff = a.fam.out_rows(a.mlp(i), "up") if mlp else 0
        zero = n_head > 0 and n_ff == 0
        if zero:
            notes.append(f"layer {i}: no MLP, written as a zero FFN of {ZERO_FFN} channels (output exactly 0)")
        layers.append(LayerPlan(n_head, n_kv, ZERO_FFN if zero else n_ff, zero))
    if not any(p.n_head for p in layers):
        raise Unrepresentable("a model without any attention cannot be exported: llama.cpp's deci graph reads the "
                              "head size from layer 0's heads")
    if layers[0].n_head == 0:
        layers[0] = LayerPlan(1, 1, layers[0].n_ff, layers[0].zero_ffn, zero_attn=True)
        notes.append("layer 0: no attention, written as a zero attention of one head (output exactly 0): llama.cpp "
                     "ignores attention.key_length when layer 0 has no heads")
    odd = sorted({p.n_ff for p in layers if p.n_ff % ALIGN})
    if odd:
        notes.append(f"MLP width {', '.join(map(str, odd))} is not a multiple of {ALIGN}: llama.cpp's prefill may "
                     "leave its fast GEMM (width 10% with 1382 channels: 0.54x; rounded to 1408: 1.04x, "
                     "docs/RESULTS.md); prune with round_to=64")
    counts = {(p.n_head, p.n_kv, p.n_ff) for p in layers}
    arch = ARCH_OF[a.family]
    if len(counts) != 1 or any(p.zero_ffn or p.zero_attn or p.n_head == 0 or p.n_ff == 0 for p in layers):
        arch = "deci"
    elif arch == "qwen2":
        out_bias = any(getattr(lin, "bias", None) is not None for i in range(len(a.layers))
                       for role in ("o", "down") for lin in (a.role_rows(i, role)[0],))
        if layers[0].n_head * hd != hidden or out_bias:
            arch = "deci"
            notes.append("qwen2 with heads x head_dim != hidden or output biases: written as deci")
    return ExportPlan(arch, a.family, hidden, hd, a.vocab_size, tuple(layers), tuple(notes))


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q or k projection (or its bias) from the rotate-half layout to GGUF's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _np(t: torch.Tensor) -> np.ndarray:
    if t.layout != torch.strided or "SparseSemiStructured" in type(t).__name__:
        t = t.to_dense()  # a 2:4 weight held as a semi-structured sparse tensor (the CUDA kernel's form)
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


class _Writer:
    def __init__(self, w: gguf.GGUFWriter, dtype: str):
        self.w, self.dtype, self.types = w, dtype, Counter()

    def add(self, name: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim == 1 or self.dtype == "f32":
            self.w.add_tensor(name, arr)
            self.types["F32"] += 1
        elif self.dtype == "q8_0" and arr.shape[-1] % 32 == 0:
            self.w.add_tensor(name, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            self.types["Q8_0"] += 1
        else:
            self.w.add_tensor(name, arr.astype(np.float16))
            self.types["F16"] += 1


def _metadata(w: gguf.GGUFWriter, p: ExportPlan, config, dtype: str, name: str) -> None:
    per = (lambda f: getattr(p.layers[0], f)) if p.arch != "deci" else (lambda f: [getattr(x, f) for x in p.layers])
    ctx = int(getattr(config, "max_position_embeddings", 4096))
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        ctx = min(ctx, int(window))  # llama.cpp's llama graph has no sliding window: within it the two agree
    w.add_name(name)
    w.add_file_type(FILE_TYPES[dtype])
    w.add_context_length(ctx)
    w.add_embedding_length(p.hidden)
    w.add_block_count(len(p.layers))
    w.add_feed_forward_length(per("n_ff"))
    w.add_head_count(per("n_head"))
    w.add_head_count_kv(per("n_kv"))
    w.add_key_length(p.head_dim)
    w.add_value_length(p.head_dim)
    w.add_rope_dimension_count(p.head_dim)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(p.n_vocab)


def _layer(out: _Writer, a: ModelAdapter, i: int, lp: LayerPlan, permute: bool) -> None:
    blk, hidden, hd = f"blk.{i}.", a.hidden_size, a.head_dim
    if lp.zero_attn:
        out.add(blk + "attn_norm.weight", np.ones(hidden, np.float32))
        for gg, shape in (("attn_q", (hd, hidden)), ("attn_k", (hd, hidden)), ("attn_v", (hd, hidden)),
                          ("attn_output", (hidden, hd))):
            out.add(blk + gg + ".weight", np.zeros(shape, np.float32))
    elif lp.n_head:
        out.add(blk + "attn_norm.weight", _np(a.norm(i, "input").weight))
        for role, gg in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
            lin, rows = a.role_rows(i, role)
            w = _np(lin.weight[rows] if role != "o" else lin.weight)
            b = None if lin.bias is None else _np(lin.bias[rows] if role != "o" else lin.bias)
            if permute and role in ("q", "k"):
                heads = lp.n_head if role == "q" else lp.n_kv
                w = permute_rotary(w, heads)
                b = None if b is None else permute_rotary(b, heads)
            out.add(blk + gg + ".weight", w)
            if b is not None:
                out.add(blk + gg + ".bias", b)
    if lp.zero_ffn:
        out.add(blk + "ffn_norm.weight", np.ones(hidden, np.float32))
        for gg, shape in (("ffn_gate", (ZERO_FFN, hidden)), ("ffn_up", (ZERO_FFN, hidden)),
                          ("ffn_down", (hidden, ZERO_FFN))):
            out.add(blk + gg + ".weight", np.zeros(shape, np.float32))
    elif lp.n_ff:
        out.add(blk + "ffn_norm.weight", _np(a.norm(i, "post").weight))
        for role, gg in (("gate", "ffn_gate"), ("up", "ffn_up"), ("down", "ffn_down")):
            lin, rows = a.role_rows(i, role)
            out.add(blk + gg + ".weight", _np(lin.weight[rows] if role != "down" else lin.weight))
            if lin.bias is not None:
                out.add(blk + gg + ".bias", _np(lin.bias[rows] if role != "down" else lin.bias))


def export(model, path, dtype: str = "f16", *, tokenizer=None, pre: str | None = None,
           name: str = "prunelib export") -> ExportInfo:
    """Write ``model`` (dense or pruned) to the GGUF file ``path`` in ``dtype`` (one of :data:`EXPORT_DTYPES`).

    ``tokenizer``: a Hugging Face fast tokenizer (byte-level BPE) written into the file; None writes no vocabulary
    (llama.cpp's ``none`` tokenizer: token ids only, for random-weight models). ``pre``: llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``),
    default ``"default"``. Refuses, before writing anything, what GGUF cannot represent (:class:`Unrepresentable`).
    The file appears whole or not at all (written beside it, then renamed).
    """
    if dtype not in EXPORT_DTYPES:
        raise InputError(f"dtype={dtype!r} is not allowed: expected one of {EXPORT_DTYPES}")
    p = plan(model)
    a = ModelAdapter(model)
    vocab = gguf_vocab.no_vocab(p.n_vocab) if tokenizer is None else gguf_vocab.hf_vocab(tokenizer, p.n_vocab)
    if pre and vocab["model"] != "none":
        vocab["pre"] = pre
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(str(tmp), p.arch)
    try:
        _metadata(w, p, a.config, dtype, name)
        w.add_string("prunelib.export", json.dumps({"family": p.family, "notes": list(p.notes)}))
        gguf_vocab.write_vocab(w, vocab)
        out = _Writer(w, dtype)
        with torch.no_grad():
            out.add("token_embd.weight", _np(a.embed.weight))
            for i, lp in enumerate(p.layers):
                _layer(out, a, i, lp, permute=p.arch != "qwen2")
            out.add("output_norm.weight", _np(a.final_norm.weight))
            if not a.tied:
                out.add("output.weight", _np(a.lm_head.weight))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportInfo(path, p.arch, dtype, path.stat().st_size, p, dict(out.types), vocab["source"])
