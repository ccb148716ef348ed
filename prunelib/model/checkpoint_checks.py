"""What a checkpoint folder must be before a model is built from it, and what the built model must fit.

Every refusal is a :class:`CheckpointError` naming the folder (or the tensor, or the module) and what is wrong:
the structure file must be a JSON object of this format with a config of a supported family; every tensor in
the safetensors files must be declared by the structure with its shape and dtype (float64 is refused);
the rebuilt model must agree with its config (layer count, hidden size, vocabulary, head_dim and the
row and column counts of every projection).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from prunelib.model.adapter import ModelAdapter
from prunelib.model.adapters import FAMILIES, LayoutError
from prunelib.model.adapters.base import out_features
from prunelib.model.checkpoint_kinds import DTYPES, CheckpointError
from prunelib.model.checkpoint_values import DENIED_CONFIG

FORMAT = 2
STRUCTURE_FILE = "prunelib_structure.json"
STATE_FILE = "prunelib_state.safetensors"
WEIGHTS_FILE = "model.safetensors"
LOADER = "prunelib.model.models.load_pruned"
#: attention implementations a checkpoint may ask for (a Hub kernel, ``org/name``, would download code)
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
#: private config fields a checkpoint keeps (the others are transformers' bookkeeping)
KEPT_PRIVATE = ("_name_or_path",)
_TOP = {"format", "loader", "representable", "config", "attn_implementation", "dtype", "files", "tree", "shared",
        "tensors"}


def read_structure(path: Path) -> dict:
    """The structure file of the folder ``path``, checked at the top level."""
    f = path / STRUCTURE_FILE
    if not f.exists():
        if (path / "prunelib_structure.pt").exists():
            raise CheckpointError(f"{path} was saved by an older prunelib as a pickle (prunelib_structure.pt), which is "
                                  "not loaded because unpickling can run code; prune and save it again")
        raise CheckpointError(f"{path} has no {STRUCTURE_FILE}: not a checkpoint written by {LOADER.rsplit('.', 1)[0]}"
                              ".save_pruned")
    try:
        s = json.loads(f.read_bytes())
    except (ValueError, RecursionError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{f}: not valid JSON (truncated, empty or nested too deeply?): "
                              f"{type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(s, dict):
        raise CheckpointError(f"{f}: a JSON {type(s).__name__}, not the object a checkpoint structure is")
    check_structure(s, f)
    return s


def check_structure(s: dict, f) -> None:
    """The top level of a structure (``f`` names it in errors): format, fields, attention, dtype, file list."""
    if s.get("format") == 1:
        raise CheckpointError(f"{f}: format 1, which named the classes for the loader to import, is no longer read "
                              "(a loader that imports what a file names can run foreign code); prune and save again")
    if s.get("format") != FORMAT:
        raise CheckpointError(f"{f}: checkpoint format {s.get('format')!r} is not supported (this prunelib reads {FORMAT})")
    missing, unknown = sorted(_TOP - set(s)), sorted(set(s) - _TOP)
    if missing or unknown:
        raise CheckpointError(f"{f}: fields missing {missing}, unknown {unknown}")
    if s["attn_implementation"] not in ATTN_IMPLEMENTATIONS:
        raise CheckpointError(f"{f}: attn_implementation {str(s['attn_implementation'])[:80]!r} is not one of "
                              f"{ATTN_IMPLEMENTATIONS}")
    if s["dtype"] not in ("float32", "float16", "bfloat16"):
        raise CheckpointError(f"{f}: dtype {str(s['dtype'])[:40]!r} is not float32, float16 or bfloat16")
    if not isinstance(s["files"], dict) or not all(isinstance(n, str) and "/" not in n and n not in ("", ".", "..")
                                                   and isinstance(k, int) for n, k in s["files"].items()):
        raise CheckpointError(f"{f}: 'files' is not an object of file names and sizes")


def config_of(s: dict, f):
    """The transformers config the structure holds (``f`` names it in errors): a supported family, no remote
    code, no Hub kernels, no quantisation."""
    from transformers import AutoConfig

    fields = s["config"]
    if not isinstance(fields, dict):
        raise CheckpointError(f"{f}: config is a {type(fields).__name__}, not an object")
    model_type = fields.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        what = "has no model_type" if model_type is None else f"model_type {str(model_type)[:60]!r} is not supported"
        raise CheckpointError(f"{f}: config {what}; supported: {sorted(FAMILIES)}")
    bad = sorted(k for k in fields if k in DENIED_CONFIG or k.startswith("_") and k not in KEPT_PRIVATE)
    if bad:
        raise CheckpointError(f"{f}: config fields {bad} are not allowed in a checkpoint (they load code: remote "
                              "code, Hub kernels, quantisers; or are transformers' private settings)")
    fields = dict(fields)
    try:
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        default = type(config)()
        for k, v in fields.items():  # a field of the family's config keeps the type of its default
            d = getattr(default, k, None)
            if d is not None and v is not None and type(v) is not type(d) and not \
                    (type(d) is float and type(v) is int) and isinstance(d, (bool, int, float, str, list, dict)):
                raise ValueError(f"{k} = {str(v)[:60]!r} is a {type(v).__name__}, not a {type(d).__name__}")
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            v = getattr(config, k, None)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{k} = {v!r} is not a positive integer")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 1 or head_dim % 2:
            raise ValueError(f"head_dim = {head_dim!r} is not a positive even integer")
    except Exception as err:  # noqa: BLE001 (transformers validates fields with its own error classes)
        raise CheckpointError(f"{f}: config is not a valid {model_type} config: {type(err).__name__}: "
                              f"{str(err)[:300]}") from None
    return config


def read_tensors(path: Path, s: dict) -> tuple[dict, dict]:
    """(tensors by key, key -> in the weights file?): both safetensors files, each tensor as the structure
    declares it (``tensors``: key -> {file, shape, dtype}); float64 and undeclared tensors refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    table = s["tensors"]
    if not isinstance(table, dict):
        raise CheckpointError(f"{path / STRUCTURE_FILE}: tensors is a {type(table).__name__}, not an object")
    tensors, files = {}, {}
    for name, persistent in ((WEIGHTS_FILE, True), (STATE_FILE, False)):
        declared = {k for k, d in table.items() if isinstance(d, dict) and d.get("file") == name}
        if not (path / name).exists():
            if declared:
                raise CheckpointError(f"{path / name} is missing; the structure declares {len(declared)} tensors in it")
            continue
        try:
            loaded = load_file(path / name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path / name}: not a readable safetensors file: {err}") from None
        extra = sorted(set(loaded) - declared)
        if extra:
            raise CheckpointError(f"{path / name}: tensors {extra[:5]} are not declared by the structure")
        for k in sorted(declared):
            if k not in loaded:
                raise CheckpointError(f"{path / name}: missing tensor {k}, which the structure declares")
            t, d = loaded[k], table[k]
            if t.dtype == torch.float64:
                raise CheckpointError(f"tensor {k} in {path / name} is float64, which a checkpoint may not hold "
                                      "(float32, float16 or bfloat16)")
            if set(d) != {"file", "shape", "dtype"} or not isinstance(d["dtype"], str) or d["dtype"] not in DTYPES or \
                    not isinstance(d["shape"], list):
                raise CheckpointError(f"{path / STRUCTURE_FILE}: tensor {k} is declared as {str(d)[:80]}, not "
                                      f"{{file, shape, dtype}} with a dtype of {sorted(DTYPES)}")
            if list(t.shape) != d["shape"] or t.dtype != DTYPES[d["dtype"]]:
                raise CheckpointError(f"tensor {k} in {path / name} is {list(t.shape)} {t.dtype}; the structure "
                                      f"declares {d['shape']} {d['dtype']}")
            tensors[k], files[k] = t, persistent
    undeclared = sorted(k for k in table if k not in tensors)
    if undeclared:
        raise CheckpointError(f"{path / STRUCTURE_FILE}: tensors {undeclared[:5]} name no safetensors file of the folder")
    return tensors, files


def check_model(model, config, path: Path) -> None:
    """The rebuilt model agrees with its config: layers, hidden size, vocabulary, head_dim, projection shapes."""
    try:
        a = ModelAdapter(model)
    except LayoutError as err:
        raise CheckpointError(f"{path}: the rebuilt model does not have its family's layout: {err}") from None
    W, V, hd, L = config.hidden_size, config.vocab_size, a.head_dim, len(a.layers)

    def fail(what):
        raise CheckpointError(f"{path}: {what} (config: hidden_size {W}, num_hidden_layers {config.num_hidden_layers}"
                              f", head_dim {hd}, vocab_size {V})")

    if L != config.num_hidden_layers:
        fail(f"the structure has {L} decoder layers")
    if tuple(a.embed.weight.shape) != (V, W):
        fail(f"the embedding is {list(a.embed.weight.shape)}")
    if (a.lm_head.out_features, a.lm_head.in_features) != (V, W):
        fail(f"the LM head is {a.lm_head.in_features} -> {a.lm_head.out_features}")
    norms = [("final norm", a.final_norm)] + [(f"layer {i} {w} norm", a.norm(i, w)) for i in range(L)
                                              for w in ("input", "post")]
    for name, norm in norms:
        w = getattr(norm, "weight", None)
        if isinstance(w, torch.Tensor) and tuple(w.shape) != (W,):
            fail(f"the {name} weight is {list(w.shape)}")
    for i in range(L):
        try:
            _check_layer(a, i, W, hd)
        except (ValueError, LayoutError) as err:
            fail(f"layer {i}: {err}")


def _check_layer(a: ModelAdapter, i: int, W: int, hd: int) -> None:
    attn, mlp = a.attn(i), a.mlp(i)
    if attn is not None:
        if getattr(attn, "head_dim", hd) != hd:
            raise ValueError(f"the attention's head_dim is {attn.head_dim!r}")
        q, k, v = (a.fam.out_rows(attn, r) for r in "qkv")
        if min(q, k, v) < 1 or q % hd or k % hd or k != v or (q // hd) % (k // hd):
            raise ValueError(f"q/k/v have {q}/{k}/{v} rows, not whole heads of {hd} (k = v, grouped queries)")
        for role, (want_in, want_out) in (("q", (W, None)), ("k", (W, None)), ("v", (W, None)), ("o", (q, W))):
            _check_linear(a.role_rows(i, role)[0], role, want_in, want_out)
    if mlp is not None:
        gate, up = a.fam.out_rows(mlp, "gate"), a.fam.out_rows(mlp, "up")
        if gate != up or up < 1:
            raise ValueError(f"gate / up have {gate} / {up} rows")
        for role, (want_in, want_out) in (("gate", (W, None)), ("up", (W, None)), ("down", (up, W))):
            _check_linear(a.role_rows(i, role)[0], role, want_in, want_out)


def _check_linear(lin, role: str, want_in: int, want_out: int | None) -> None:
    n_in, n_out = getattr(lin, "in_features", None), out_features(lin)
    if n_in != want_in or (want_out is not None and n_out != want_out):
        raise ValueError(f"the {role} projection is {n_in} -> {n_out}, not {want_in} -> {want_out or n_out}")
