"""Checkpoints of pruned models without pickle: structure as JSON, tensors as safetensors.

A folder written by :func:`save` holds

- ``config.json``: the plain transformers config when plain transformers can represent the
  model (every module of the class and shape a model built from that config has: depth
  pruning, uniform width, 2:4 weights stored dense), so ``from_pretrained`` loads it
  exactly; otherwise a stub whose ``model_type`` names prunelib's loader, so transformers
  and the lm-eval CLI refuse it instead of initialising the missing weights at random;
- ``model.safetensors``: the persistent state dict (a tied weight once);
- ``prunelib_structure.json``: the model's config and how its module tree differs from a
  model built from that config: per module its class (only from prunelib, transformers or
  torch), its plain attributes as JSON, its parameters and buffers, its forward hooks;
- ``prunelib_state.safetensors``: what a state dict leaves out: non-persistent buffers,
  tensor attributes and random-generator states (routers, thresholds and counters of the
  dynamic methods included).

Loading builds the model from the config on the meta device, applies the recorded
differences and fills every tensor from the safetensors files: no code is unpickled, and
a class outside those packages is refused. Runtime caches that hold a weak reference
(Quest page metadata) come back as dead references, as after a fresh construction.
"""
from __future__ import annotations

import copy
import importlib
import json
import math
import os
import shutil
import types
import weakref
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

FORMAT = 1
STRUCTURE_FILE = "prunelib_structure.json"
STATE_FILE = "prunelib_state.safetensors"
WEIGHTS_FILE = "model.safetensors"
LOADER = "prunelib.model.models.load_pruned"
STUB_MODEL_TYPE = f"prunelib-pruned (not a transformers model: load it with {LOADER})"
ALLOWED_MODULES = ("prunelib.", "transformers.", "torch.")
_INTERNAL = set(nn.Module().__dict__)  # nn.Module bookkeeping, rebuilt on load
_HOOKS = (("_forward_hooks", "_forward_hooks_with_kwargs"), ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"))


class CheckpointError(ValueError):
    """A model that cannot be stored safely, or a folder that is not a valid prunelib checkpoint."""


# --- classes and functions by name ------------------------------------------------------
def _resolve(module: str, qualname: str):
    if not module.startswith(ALLOWED_MODULES):
        raise CheckpointError(f"{module}.{qualname} is outside {ALLOWED_MODULES}: refused")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


_DYNAMIC: dict[tuple, type] = {}


def _class_ref(cls: type):
    if _resolve(cls.__module__, cls.__qualname__) is cls:
        return [cls.__module__, cls.__qualname__]
    # a class made at run time (a mixin over the model's own layer class): its bases by name
    return {"name": cls.__name__, "module": cls.__module__, "bases": [_class_ref(b) for b in cls.__bases__]}


def _class(ref) -> type:
    if isinstance(ref, list):
        cls = _resolve(*ref)
        if not isinstance(cls, type):
            raise CheckpointError(f"{'.'.join(ref)} is not a class")
        return cls
    bases = tuple(_class(b) for b in ref["bases"])
    key = (ref["name"], ref["module"], bases)
    if key not in _DYNAMIC:
        _resolve(ref["module"], "__name__")  # the module must be an allowed one
        _DYNAMIC[key] = type(ref["name"], bases, {"__module__": ref["module"]})
    return _DYNAMIC[key]


# --- values ---------------------------------------------------------------------------
class _Encoder:
    """Turns attribute values into JSON, collecting tensors and shared objects on the side."""

    def __init__(self, config, module_paths: dict):
        self.config, self.module_paths = config, module_paths
        self.tensors: dict[str, torch.Tensor] = {}
        self.objects: list = []
        self.memo: dict[int, int] = {}

    def __call__(self, v, where: str):
        from transformers import PretrainedConfig

        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else {"$float": repr(v)}
        if isinstance(v, list):
            return [self(x, f"{where}.{i}") for i, x in enumerate(v)]
        if isinstance(v, tuple):
            return {"$tuple": [self(x, f"{where}.{i}") for i, x in enumerate(v)]}
        if isinstance(v, dict):
            return {"$dict": [[self(k, where), self(x, f"{where}.{k}")] for k, x in v.items()]}
        if isinstance(v, torch.Tensor):
            self.tensors[f"attr:{where}"] = v.detach()
            return {"$tensor": f"attr:{where}"}
        if isinstance(v, torch.Generator):
            self.tensors[f"rng:{where}"] = v.get_state()
            return {"$generator": f"rng:{where}", "device": str(v.device)}
        if isinstance(v, torch.dtype):
            return {"$dtype": str(v).removeprefix("torch.")}
        if isinstance(v, torch.device):
            return {"$device": str(v)}
        if isinstance(v, PretrainedConfig):  # the model's config, or a copy of it with some fields changed
            if type(v) is not type(self.config):
                raise CheckpointError(f"{where}: a config other than the model's (or a copy of it) cannot be stored")
            base, mine = self.config.to_dict(), v.to_dict()  # the copy may predate fields added to the model's since
            diff = {k: x for k, x in mine.items() if k not in base or base[k] != x}
            if diff and json.loads(json.dumps(diff)) != diff:
                raise CheckpointError(f"{where}: config fields {sorted(diff)} differ from the model's and are not JSON")
            return {"$config": diff or None}
        if isinstance(v, weakref.ref):
            return {"$weakref": None}  # a runtime cache's reference: dead after a reload, as after construction
        if isinstance(v, nn.Module):
            if id(v) in self.module_paths:
                return {"$module": self.module_paths[id(v)]}
            raise CheckpointError(f"{where}: refers to a module outside the model")
        if isinstance(v, (types.FunctionType, types.BuiltinFunctionType)):
            if (v.__module__ or "").startswith(ALLOWED_MODULES) and _resolve(v.__module__, v.__qualname__) is v:
                return {"$function": [v.__module__, v.__qualname__]}
            raise CheckpointError(f"{where}: function {v.__qualname__} cannot be stored by name (a lambda or closure?)")
        if type(v).__module__.startswith("prunelib.") and hasattr(v, "__dict__"):
            if id(v) not in self.memo:
                self.memo[id(v)] = len(self.objects)
                self.objects.append(None)
                attrs = {k: self(x, f"{where}.{k}") for k, x in vars(v).items()}
                self.objects[self.memo[id(v)]] = {"class": _class_ref(type(v)), "attrs": attrs}
            return {"$object": self.memo[id(v)]}
        raise CheckpointError(f"{where}: a {type(v).__module__}.{type(v).__qualname__} cannot be stored as JSON")


class _Decoder:
    def __init__(self, config, state: dict, objects: list):
        self.config, self.state, self.objects = config, state, objects
        self.built: dict[int, object] = {}
        self.modules: dict[str, nn.Module] = {}
        self.deferred: list = []  # module references resolved once the tree is built

    def __call__(self, v):
        if isinstance(v, list):
            return [self(x) for x in v]
        if not isinstance(v, dict):
            return v
        (tag, arg), *rest = v.items()
        if tag == "$float":
            return float(arg)
        if tag == "$tuple":
            return tuple(self(x) for x in arg)
        if tag == "$dict":
            return {self(k): self(x) for k, x in arg}
        if tag == "$tensor":
            return self._take(arg)
        if tag == "$generator":
            g = torch.Generator(device=v["device"])
            g.set_state(self._take(arg))
            return g
        if tag == "$dtype":
            return getattr(torch, arg)
        if tag == "$device":
            return torch.device(arg)
        if tag == "$config":  # None: the model's config; a dict: a copy with these fields changed
            if not arg:
                return self.config
            c = copy.copy(self.config)
            for k, x in arg.items():
                setattr(c, k, x)
            return c
        if tag == "$weakref":
            return weakref.ref(_Gone())  # already dead
        if tag == "$module":
            return self.modules[arg]
        if tag == "$function":
            return _resolve(*arg)
        if tag == "$object":
            if arg not in self.built:
                spec = self.objects[arg]
                obj = _class(spec["class"]).__new__(_class(spec["class"]))
                self.built[arg] = obj
                obj.__dict__.update({k: self(x) for k, x in spec["attrs"].items()})
            return self.built[arg]
        raise CheckpointError(f"unknown value tag {tag!r} in the structure file")

    def _take(self, key):
        if key not in self.state:
            raise CheckpointError(f"tensor {key!r} named by the structure file is missing from {STATE_FILE}")
        return self.state.pop(key)


class _Gone:
    pass


def _has_stored_value(enc) -> bool:
    return any(tag in json.dumps(enc) for tag in ('"$tensor"', '"$generator"', '"$object"'))


# --- the module tree ------------------------------------------------------------------
def skeleton(config, attn_implementation=None) -> nn.Module:
    """A model of ``config`` on the meta device (no memory, no initialisation cost)."""
    from transformers import AutoModelForCausalLM

    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), **kw)


def _describe(model: nn.Module, skel: nn.Module):
    """(tree, encoder): ``model``'s differences from ``skel``, module by module; raises before anything is written."""
    paths = {}
    for name, mod in model.named_modules(remove_duplicate=True):
        paths.setdefault(id(mod), name)
    enc = _Encoder(model.config, paths)
    skel_modules = dict(skel.named_modules())
    params_seen: dict[int, str] = {}

    def node(mod, path):
        skel_mod = skel_modules.get(path)
        same = skel_mod is not None and isinstance(mod, type(skel_mod))
        out = {}
        if not same:
            if not type(mod).__module__.startswith(ALLOWED_MODULES):
                raise CheckpointError(f"module {path or 'model'}: class {type(mod).__module__}.{type(mod).__qualname__} "
                                      f"is outside {ALLOWED_MODULES} and cannot be stored")
            out["new"] = _class_ref(type(mod))
        elif type(mod) is not type(skel_mod):
            out["class"] = _class_ref(type(mod))
        base = vars(skel_mod) if same else {}
        attrs, probe = {}, _Encoder(skel.config, {})
        for k, v in vars(mod).items():
            if k in _INTERNAL:
                continue
            try:
                e = enc(v, f"{path}:{k}" if path else k)
            except CheckpointError:
                if k in base:  # built from the config the same way (a function, a generation config): keep it
                    continue
                raise
            if k in base and not _has_stored_value(e):
                try:
                    if probe(base[k], k) == e:
                        continue
                except CheckpointError:
                    pass
            attrs[k] = e
        out["attrs"] = attrs
        gone = [k for k in base if k not in _INTERNAL and k not in vars(mod)]
        if gone:
            out["del_attrs"] = gone
        params = {}
        for k, p in mod._parameters.items():
            if p is None:
                params[k] = None
            elif id(p) in params_seen:
                params[k] = {"alias": params_seen[id(p)]}
            else:
                params_seen[id(p)] = f"{path}.{k}" if path else k
                params[k] = {"requires_grad": p.requires_grad}
        out["params"] = params
        out["buffers"] = {k: (None if b is None else {"persistent": k not in mod._non_persistent_buffers_set})
                          for k, b in mod._buffers.items()}
        hooks = {}
        for kind, kw_name in _HOOKS:
            hs = [{"hook": enc(h, f"{path}:{kind}"), "with_kwargs": hid in getattr(mod, kw_name)}
                  for hid, h in getattr(mod, kind).items()]
            if hs:
                hooks[kind] = hs
        for kind in ("_backward_hooks", "_backward_pre_hooks"):
            if getattr(mod, kind):
                raise CheckpointError(f"module {path or 'model'} has {kind.strip('_')}, which cannot be stored")
        if hooks:
            out["hooks"] = hooks
        children = {}
        for k, child in mod._modules.items():
            cpath = f"{path}.{k}" if path else k
            if child is None:
                children[k] = None
            elif paths[id(child)] != cpath:
                children[k] = {"ref": paths[id(child)]}
            else:
                children[k] = node(child, cpath)
        out["children"] = children
        return out

    return node(model, ""), enc


def _tensors(model: nn.Module):
    """(persistent, non-persistent) tensors by qualified name, each stored once, dense and contiguous."""
    persistent, other, seen = {}, {}, set()
    for path, mod in model.named_modules():
        for kind, items in (("p", mod._parameters.items()), ("b", mod._buffers.items())):
            for k, t in items:
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                if hasattr(t, "to_dense") and type(t).__name__.startswith("SparseSemiStructured"):
                    t = t.to_dense()  # 2:4 weights in a sparse-kernel layout: stored dense
                target = other if kind == "b" and k in mod._non_persistent_buffers_set else persistent
                target[f"{path}.{k}" if path else k] = t.detach()
    return persistent, other


def _contiguous(tensors: dict) -> dict:
    out, ptrs = {}, set()
    for k, t in tensors.items():
        t = t.contiguous()
        if t.numel() and t.data_ptr() in ptrs:
            t = t.clone()
        ptrs.add(t.data_ptr())
        out[k] = t.cpu()
    return out


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
        if any(getattr(mod, kind) for kind, _ in _HOOKS):
            return None
    want = {k: tuple(t.shape) for k, t in skel.state_dict().items()}
    have = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    return cfg if want == have else None


# --- save and load --------------------------------------------------------------------
def save(model: nn.Module, path, tokenizer=None) -> Path:
    """Write ``model`` (and ``tokenizer``, if given) to the folder ``path``, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    plain = plain_config(model)
    config = plain if plain is not None else model.config
    attn = model.config._attn_implementation
    tree, enc = _describe(model, skeleton(config, attn))  # refuses before anything is written
    persistent, other = _tensors(model)
    other.update(enc.tensors)
    structure = {"format": FORMAT, "loader": LOADER, "representable": plain is not None,
                 "config": config.to_dict(), "attn_implementation": attn, "tree": tree, "objects": enc.objects}
    text = json.dumps(structure, indent=1)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(_contiguous(persistent), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        save_file(_contiguous(other), tmp / STATE_FILE, metadata={"format": "pt"})
        (tmp / STRUCTURE_FILE).write_text(text)
        if plain is not None:
            plain.to_json_file(tmp / "config.json")
        else:
            (tmp / "config.json").write_text(json.dumps(
                {"model_type": STUB_MODEL_TYPE, "architectures": [f"see {STRUCTURE_FILE}; load with {LOADER}"]},
                indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load(path) -> nn.Module:
    """The model stored in ``path`` by :func:`save`, on CPU, in eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    if not (path / STRUCTURE_FILE).exists():
        if (path / "prunelib_structure.pt").exists():
            raise CheckpointError(f"{path} was saved by an older prunelib as a pickle (prunelib_structure.pt), which is "
                                  "not loaded because unpickling can run code; prune and save it again")
        raise CheckpointError(f"{path} has no {STRUCTURE_FILE}: not a checkpoint written by prunelib.model.models.save_pruned")
    s = json.loads((path / STRUCTURE_FILE).read_text())
    if s.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {s.get('format')!r} is not supported (this prunelib reads {FORMAT})")
    fields = dict(s["config"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = skeleton(config, s.get("attn_implementation"))
    weights = load_file(path / WEIGHTS_FILE)
    state = load_file(path / STATE_FILE) if (path / STATE_FILE).exists() else {}
    dec = _Decoder(model.config, state, s["objects"])
    skel_modules = dict(model.named_modules())
    slots = []  # (module, kind, name, key, spec)

    def build(node, mod_path):
        if "new" in node:
            cls = _class(node["new"])
            if not issubclass(cls, nn.Module):
                raise CheckpointError(f"{path}: {cls} is not a torch module")
            mod = cls.__new__(cls)
            nn.Module.__init__(mod)
        else:
            mod = skel_modules[mod_path]
            if "class" in node:
                mod.__class__ = _class(node["class"])
        dec.modules[mod_path] = mod
        for k in node.get("del_attrs", ()):
            mod.__dict__.pop(k, None)
        for k, v in node["attrs"].items():
            mod.__dict__[k] = dec(v)
        mod._parameters, mod._buffers = OrderedDict(), OrderedDict()
        mod._non_persistent_buffers_set = {k for k, b in node["buffers"].items() if b and not b["persistent"]}
        for kind, specs in (("p", node["params"]), ("b", node["buffers"])):
            for k, spec in specs.items():
                (mod._parameters if kind == "p" else mod._buffers)[k] = None
                if spec is not None:
                    slots.append((mod, kind, k, f"{mod_path}.{k}" if mod_path else k, spec))
        for kind, kw_name in _HOOKS:
            getattr(mod, kind).clear()
            getattr(mod, kw_name).clear()
            for h in node.get("hooks", {}).get(kind, ()):
                register = mod.register_forward_hook if kind == "_forward_hooks" else mod.register_forward_pre_hook
                dec.deferred.append((register, h))
        mod._modules = OrderedDict()
        for k, child in node["children"].items():
            cpath = f"{mod_path}.{k}" if mod_path else k
            if child is None:
                mod._modules[k] = None
            elif "ref" in child:
                dec.deferred.append((mod, k, child["ref"]))
            else:
                mod._modules[k] = build(child, cpath)
        return mod

    model = build(s["tree"], "")
    for item in dec.deferred:
        if len(item) == 3:
            mod, k, ref = item
            mod._modules[k] = dec.modules[ref]
        else:
            register, h = item
            register(dec(h["hook"]), with_kwargs=h["with_kwargs"])
    params, missing = {}, []
    for mod, kind, k, key, spec in slots:
        if kind == "p" and "alias" in spec:
            continue
        t = weights.pop(key, None) if key in weights else state.pop(key, None)
        if t is None:
            missing.append(key)
            continue
        if kind == "p":
            params[key] = mod._parameters[k] = nn.Parameter(t, requires_grad=spec["requires_grad"])
        else:
            mod._buffers[k] = t
    for mod, kind, k, key, spec in slots:
        if kind == "p" and "alias" in spec:
            if spec["alias"] not in params:
                missing.append(key)
            else:
                mod._parameters[k] = params[spec["alias"]]
    unexpected = sorted(weights) + sorted(k for k in state if not k.startswith(("attr:", "rng:")))
    if missing or unexpected:
        raise CheckpointError(f"{path}: saved weights do not fit the saved structure: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.eval()
