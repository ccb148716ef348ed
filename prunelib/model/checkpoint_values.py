"""Attribute values in a checkpoint: plain data only, as JSON, with tensors in a safetensors file beside it.

A value is None, a bool, int, float (``{"$float": "inf"}`` where not finite), str, a list, a tuple
(``{"$tuple": [...]}``), a dict (``{"$dict": [[key, value], ...]}``), a tensor (``{"$tensor": key}``, its
data in ``prunelib_state.safetensors``), the model's config or a copy with some fields changed
(``{"$config": {field: value}}``), or an object of a registered kind that several attributes may share
(``{"$shared": i}``: entry i of the structure's ``shared`` list, the kind's name and its own attributes).
Nothing else is stored, and nothing else is read: a function, a class or an object of an unregistered
class is refused when saving, and an unknown tag when loading.
"""
from __future__ import annotations

import copy
import json
import math

import torch

from prunelib.model.checkpoint_kinds import INTERNAL, CheckpointError, Rebuild, kind_of, lookup, settable

#: config fields that make transformers load code (remote code, Hub kernels, quantisers): never set from a file
DENIED_CONFIG = ("auto_map", "quantization_config", "attn_implementation", "experts_implementation",
                 "trust_remote_code")
MAX_DEPTH = 32  # nesting of one value (lists in dicts in tuples ...)
_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def is_config(v) -> bool:
    from transformers import PretrainedConfig

    return isinstance(v, PretrainedConfig)


class Encoder:
    """Turns attribute values into JSON, collecting tensors (``tensors``) and shared objects (``shared``)."""

    def __init__(self, config):
        self.config = config
        self.tensors: dict[str, torch.Tensor] = {}
        self.shared: list = []
        self._memo: dict[int, int] = {}

    def __call__(self, v, where: str, depth: int = 0):
        if depth > MAX_DEPTH:
            raise CheckpointError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else {"$float": repr(v)}
        if isinstance(v, list):
            return [self(x, f"{where}.{i}", depth + 1) for i, x in enumerate(v)]
        if isinstance(v, tuple):
            return {"$tuple": [self(x, f"{where}.{i}", depth + 1) for i, x in enumerate(v)]}
        if isinstance(v, dict):
            return {"$dict": [[self(k, where, depth + 1), self(x, f"{where}.{k}", depth + 1)] for k, x in v.items()]}
        if type(v) is torch.Tensor:
            key = f"attr:{where}"
            self.tensors[key] = v.detach()
            return {"$tensor": key}
        if is_config(v):  # the model's config, or a copy of it with some fields changed
            if type(v) is not type(self.config):
                raise CheckpointError(f"{where}: a config other than the model's (or a copy of it) cannot be stored")
            base, mine = self.config.to_dict(), v.to_dict()  # the copy may predate fields added to the model's since
            diff = {k: x for k, x in mine.items() if k not in base or base[k] != x}
            if diff and json.loads(json.dumps(diff)) != diff:
                raise CheckpointError(f"{where}: config fields {sorted(diff)} differ from the model's and are not JSON")
            return {"$config": diff or None}
        kind = kind_of(v)
        if kind is not None and not kind.module:
            if id(v) not in self._memo:
                i = self._memo[id(v)] = len(self.shared)
                self.shared.append(None)
                self.shared[i] = {"kind": kind.name, "attrs": self.attrs(v, f"shared.{i}")}
            return {"$shared": self._memo[id(v)]}
        what = f"{type(v).__module__}.{type(v).__qualname__}"
        if callable(v):
            raise CheckpointError(f"{where}: {what} is code (a function, class or callable object), which a checkpoint "
                                  "does not store; store its settings and register a kind that rebuilds it")
        raise CheckpointError(f"{where}: a {what} is not plain data and not of a registered checkpoint kind")

    def attrs(self, obj, where: str) -> dict:
        skip = INTERNAL if isinstance(obj, torch.nn.Module) else ()  # nn.Module's bookkeeping is rebuilt, not saved
        return {k: self(x, f"{where}:{k}") for k, x in vars(obj).items() if k not in skip}


def has_stored_value(enc) -> bool:
    """Does this encoded value hold a tensor or a shared object (always saved, never compared)?"""
    return any(tag in json.dumps(enc) for tag in ('"$tensor"', '"$shared"'))


class Decoder:
    """Turns a structure file's JSON values back into attribute values; anything unexpected is a CheckpointError."""

    def __init__(self, config, tensors, shared):
        self.config, self.tensors = config, tensors  # tensors: key -> tensor (already checked against the table)
        if not isinstance(shared, list):
            raise CheckpointError(f"'shared' is a {type(shared).__name__}, not a list")
        self.shared, self.built, self.building = shared, {}, set()

    def __call__(self, v, where: str, depth: int = 0):
        if depth > MAX_DEPTH:
            raise CheckpointError(f"{where}: a value nested deeper than {MAX_DEPTH} levels")
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, list):
            return [self(x, f"{where}.{i}", depth + 1) for i, x in enumerate(v)]
        if not isinstance(v, dict) or len(v) != 1:
            raise CheckpointError(f"{where}: {str(v)[:80]!r} is not a stored value")
        (tag, arg), = v.items()
        if tag == "$float" and arg in _FLOATS:
            return _FLOATS[arg]
        if tag == "$tuple" and isinstance(arg, list):
            return tuple(self(x, f"{where}.{i}", depth + 1) for i, x in enumerate(arg))
        if tag == "$dict" and isinstance(arg, list) and all(isinstance(p, list) and len(p) == 2 for p in arg):
            out = {}
            for k, x in arg:
                k = self(k, where, depth + 1)
                if not isinstance(k, (str, int, float, bool, tuple, type(None))):
                    raise CheckpointError(f"{where}: a dict key {k!r} is not plain data")
                out[k] = self(x, f"{where}.{k}", depth + 1)
            return out
        if tag == "$tensor" and isinstance(arg, str):
            if not arg.startswith("attr:") or arg not in self.tensors:
                raise CheckpointError(f"{where}: tensor {arg!r} is not an attribute tensor of the state file")
            return self.tensors.pop(arg)
        if tag == "$config" and (arg is None or isinstance(arg, dict)):
            return self._config(arg or {}, where)
        if tag == "$shared" and isinstance(arg, int) and not isinstance(arg, bool):
            return self.object(arg, where)
        raise CheckpointError(f"{where}: {tag!r} with {str(arg)[:60]!r} is not a stored value")

    def _config(self, fields: dict, where: str):
        if not fields:
            return self.config
        c = copy.copy(self.config)
        for k, x in fields.items():  # fields the config has, set to plain JSON (never its private settings)
            if not isinstance(k, str) or k.startswith("_") or k in DENIED_CONFIG or not hasattr(self.config, k) or \
                    (x is not None and not isinstance(x, (bool, int, float, str, list))) or \
                    json.loads(json.dumps(x)) != x:
                raise CheckpointError(f"{where}: config field {k!r} = {str(x)[:60]!r} cannot be set")
            setattr(c, k, x)
        return c

    def object(self, i: int, where: str):
        """Shared object ``i``, rebuilt once by its kind's function, however many attributes refer to it."""
        if i in self.built:
            return self.built[i]
        if not 0 <= i < len(self.shared) or not isinstance(self.shared[i], dict) or \
                set(self.shared[i]) != {"kind", "attrs"} or not isinstance(self.shared[i]["attrs"], dict):
            raise CheckpointError(f"{where}: shared object {i} is not a {{kind, attrs}} entry of 'shared'")
        if i in self.building:
            raise CheckpointError(f"{where}: shared object {i} refers to itself")
        self.building.add(i)
        spec, here = self.shared[i], f"shared object {i}"
        kind = lookup(spec["kind"], here)
        if kind.module:
            raise CheckpointError(f"{here}: {kind.name} is a module, not an object an attribute may hold")
        attrs = {k: self(x, f"{here}:{k}", 1) for k, x in spec["attrs"].items()}
        obj = build(kind, Rebuild(here, attrs, {}, None, self.config, {}))
        set_attrs(obj, attrs, here)
        self.building.discard(i)
        self.built[i] = obj
        return obj


def build(kind, r: Rebuild):
    """``kind.build(r)``, its errors (a wrong type, a bad value) as CheckpointErrors naming the module path."""
    try:
        obj = kind.build(r)
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as err:
        raise CheckpointError(f"{r.where}: {kind.name} cannot be rebuilt from the saved attributes: "
                              f"{type(err).__name__}: {err}") from err
    if kind_of(obj) is not kind:
        raise CheckpointError(f"{r.where}: {kind.name}'s build function made a {type(obj).__name__}")
    return obj


def set_attrs(obj, attrs: dict, where: str) -> None:
    for k, v in attrs.items():
        obj.__dict__[settable(obj, k, where)] = v
