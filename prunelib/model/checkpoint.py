"""Checkpoints of pruned models as data: structure as JSON, tensors as safetensors, no code.

A folder written by :func:`save` holds

- ``config.json``: the plain transformers config when plain transformers can represent the
  model (every module of the class and shape a model built from that config has: depth
  pruning, uniform width, 2:4 weights stored dense), so ``from_pretrained`` loads it
  exactly; otherwise a stub whose ``model_type`` names prunelib's loader, so transformers
  and the lm-eval CLI refuse it instead of initialising the missing weights at random;
- ``model.safetensors``: the persistent state dict (a tied weight once);
- ``prunelib_structure.json``: the model's config and how its module tree differs from a model
  built from that config (:mod:`~prunelib.model.checkpoint_tree`): per module either the changed
  plain attributes of the config's own module, or a registered kind
  (:mod:`~prunelib.model.checkpoint_kinds`) and its attributes as data
  (:mod:`~prunelib.model.checkpoint_values`); every tensor's shape and dtype; the files the save wrote;
- ``prunelib_state.safetensors``: tensors a state dict leaves out (non-persistent buffers, tensor
  attributes such as the dynamic methods' counters and tables).

Loading builds the model from the config on the meta device, rebuilds each recorded module by its kind's
registered function from plain data, and fills every tensor, each checked against the shape the rebuilt
module expects and the model's dtype; the model must then agree with its config
(:mod:`~prunelib.model.checkpoint_checks`). Nothing named by the file is imported or called: a name the
registry lacks, a value that is not data, a tensor that does not fit or a malformed file is a
:class:`CheckpointError` naming the folder and what is wrong. Saving refuses to write over a file or over
a folder of someone else's files (:mod:`~prunelib.model.checkpoint_folder`).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from prunelib.model import checkpoint_folder as folder
from prunelib.model.checkpoint_checks import (FORMAT, KEPT_PRIVATE, LOADER, STATE_FILE, STRUCTURE_FILE, WEIGHTS_FILE,
                                              check_model, check_structure, config_of, read_structure, read_tensors)
from prunelib.model.checkpoint_kinds import DTYPES, CheckpointError
from prunelib.model.checkpoint_tree import _HOOKS, Builder, describe

__all__ = ["CheckpointError", "FORMAT", "LOADER", "STATE_FILE", "STRUCTURE_FILE", "WEIGHTS_FILE", "load",
           "plain_config", "save", "skeleton"]
STUB_MODEL_TYPE = f"prunelib-pruned (not a transformers model: load it with {LOADER})"


def skeleton(config, attn_implementation=None) -> nn.Module:
    """A model of ``config`` on the meta device (no memory, no initialisation cost)."""
    from transformers import AutoModelForCausalLM

    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), **kw)


def plain_config(model: nn.Module):
    """The transformers config that represents ``model`` exactly, or None if none does."""
    from prunelib.model.adapter import ModelAdapter

    a = ModelAdapter(model)
    shapes = a.layer_shapes()
    if not shapes or any(not (s.has_attn and s.has_mlp) for s in shapes):
        return None
    if len({(s.n_heads, s.n_kv_heads, s.intermediate) for s in shapes}) != 1:
        return None
    cfg = copy.deepcopy(model.config)
    s = shapes[0]
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size = s.n_heads, s.n_kv_heads, s.intermediate
    cfg.head_dim, cfg.num_hidden_layers = a.head_dim, len(shapes)
    if not a.tied:
        cfg.tie_word_embeddings = False
    skel = skeleton(cfg, model.config._attn_implementation)
    mods, smods = dict(model.named_modules()), dict(skel.named_modules())
    if set(mods) != set(smods):
        return None
    for path, mod in mods.items():
        sm = smods[path]
        if not isinstance(mod, type(sm)) or type(mod).forward is not type(sm).forward:
            return None
        if any(getattr(mod, attrs[0]) for attrs in _HOOKS.values()):
            return None
    want = {k: tuple(t.shape) for k, t in skel.state_dict().items()}
    have = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    return cfg if want == have else None


def _dense(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "to_dense") and type(t).__name__.startswith("SparseSemiStructured"):
        t = t.to_dense()  # 2:4 weights in a sparse-kernel layout: stored dense
    return t.detach()


def _contiguous(tensors: dict) -> dict:
    out, ptrs = {}, set()
    for k, t in tensors.items():
        t = t.contiguous()
        if t.numel() and t.data_ptr() in ptrs:
            t = t.clone()
        ptrs.add(t.data_ptr())
        out[k] = t.cpu()
    return out


def _model_dtype(model: nn.Module) -> str:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    names = sorted(str(d).removeprefix("torch.") for d in dtypes)
    if len(dtypes) != 1 or names[0] not in ("float32", "float16", "bfloat16"):
        raise CheckpointError(f"the model's floating-point parameters are {names or 'none'}: a checkpoint holds "
                              "one dtype of float32, float16 or bfloat16")
    return names[0]


# --- save and load --------------------------------------------------------------------
def save(model: nn.Module, path, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Write ``model`` (and ``tokenizer``, if given) to the folder ``path``, atomically.

    ``path`` may be new, an empty folder or a prunelib checkpoint (replaced); a folder of other files only
    with ``overwrite=True`` (its files are kept); never a file. Nothing is written if the model cannot be stored.
    """
    from safetensors.torch import save_file

    path = Path(path)
    folder.check_target(path, overwrite)
    plain = plain_config(model)
    config = plain if plain is not None else model.config
    attn = model.config._attn_implementation
    tree, enc, slots = describe(model, skeleton(config, attn))  # refuses before anything is written
    dtype = _model_dtype(model)
    weights = {k: _dense(t) for k, (t, persistent) in slots.items() if persistent}
    state = {**{k: _dense(t) for k, (t, persistent) in slots.items() if not persistent}, **enc.tensors}
    table = {}
    for name, tensors in ((WEIGHTS_FILE, weights), (STATE_FILE, state)):
        for k, t in tensors.items():
            kind = str(t.dtype).removeprefix("torch.")
            if kind not in DTYPES:
                raise CheckpointError(f"tensor {k} is {t.dtype}; a checkpoint holds {sorted(DTYPES)}")
            table[k] = {"file": name, "shape": list(t.shape), "dtype": kind}
    fields = {k: v for k, v in config.to_dict().items() if not k.startswith("_") or k in KEPT_PRIVATE}
    structure = {"format": FORMAT, "loader": LOADER, "representable": plain is not None, "config": fields,
                 "attn_implementation": attn, "dtype": dtype, "files": {}, "tree": tree, "shared": enc.shared,
                 "tensors": table}
    check_structure(structure, "the structure to save")  # what load would refuse is refused before anything is
    config_of(structure, "the structure to save")  # written
    tmp = folder.new_folder(path)
    try:
        save_file(_contiguous(weights), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        save_file(_contiguous(state), tmp / STATE_FILE, metadata={"format": "pt"})
        if plain is not None:
            plain.to_json_file(tmp / "config.json")
        else:
            (tmp / "config.json").write_text(json.dumps(
                {"model_type": STUB_MODEL_TYPE, "architectures": [f"see {STRUCTURE_FILE}; load with {LOADER}"]},
                indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        structure["files"] = folder.manifest(tmp)
        (tmp / STRUCTURE_FILE).write_text(json.dumps(structure, indent=1))
        folder.install(tmp, path)
    except BaseException:
        folder.discard(tmp)
        raise
    return path


def load(path) -> nn.Module:
    """The model stored in ``path`` by :func:`save`, on CPU, in eval mode."""
    path = Path(path)
    s = read_structure(path)
    config = config_of(s, path / STRUCTURE_FILE)
    try:
        skel = skeleton(config, s["attn_implementation"])
    except (TypeError, ValueError, AttributeError, KeyError, RuntimeError, ImportError) as err:
        raise CheckpointError(f"{path / STRUCTURE_FILE}: transformers cannot build a model of its config: "
                              f"{type(err).__name__}: {err}") from None
    tensors, files = read_tensors(path, s)
    try:
        model = Builder(skel, tensors, files, DTYPES[s["dtype"]], s["shared"]).model(s["tree"])
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: the structure is nested too deeply") from None
    if type(model) is not type(skel):
        raise CheckpointError(f"{path}: the structure's root is a {type(model).__name__}, not the config's "
                              f"{type(skel).__name__}")
    left = sorted(tensors)
    if left:
        raise CheckpointError(f"{path}: tensors {left[:5]} are declared but no module or attribute uses them")
    on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if on_meta:
        raise CheckpointError(f"{path}: tensors {on_meta[:5]} were never filled")
    try:
        check_model(model, config, path)
    except (TypeError, AttributeError, KeyError, IndexError, ZeroDivisionError) as err:
        raise CheckpointError(f"{path}: the rebuilt model does not fit its config: {type(err).__name__}: {err}") \
            from None
    return model.eval()
