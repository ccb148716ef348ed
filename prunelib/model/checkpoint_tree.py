"""The module tree of a checkpoint: how a pruned model differs from the model its config builds, and back.

Per module path, a node holds

- ``kind``: absent for the module the config builds there (same class; ``attrs`` then holds only the plain
  attributes that changed, e.g. a sliced Linear's ``out_features``), or the name of a registered kind
  (:mod:`prunelib.model.checkpoint_kinds`), rebuilt by its function from ``attrs`` (all its attributes);
- ``params`` / ``buffers``: per name ``{"key": ...}`` in the tensor table (``{"alias": key}`` for a tied
  parameter, null for an empty slot), with ``requires_grad`` / ``persistent``;
- ``hooks``: forward (pre-)hooks, objects of registered hook kinds only;
- ``children``: the child nodes by name, in order.

Loading builds the config's model on the meta device, rebuilds each node bottom-up, and fills every
slot from the safetensors files, checking each tensor against the shape the rebuilt module expects
(a Linear from its feature counts, an Embedding from its sizes, any other slot from the config's module
or the kind's construction) and against the model's dtype.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from prunelib.model.checkpoint_kinds import INTERNAL, NAME, CheckpointError, Rebuild, kind_of, lookup, settable
from prunelib.model.checkpoint_values import Decoder, Encoder, build, has_stored_value, is_config, set_attrs

MAX_DEPTH = 16  # of the module tree (model.layers.3.self_attn.q_proj.first is 6)
_HOOKS = {"forward": ("_forward_hooks", "_forward_hooks_with_kwargs", "register_forward_hook"),
          "forward_pre": ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "register_forward_pre_hook")}


# --- saving ---------------------------------------------------------------------------------
def describe(model: nn.Module, skel: nn.Module):
    """(tree, encoder, tensors): ``model``'s nodes, its attribute values' encoder and its slot tensors by key
    (``(tensor, persistent)``); raises, naming the module and attribute, before anything is written."""
    paths = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if paths.setdefault(id(mod), name) != name:
            raise CheckpointError(f"module {name or 'model'} is also module {paths[id(mod)] or 'model'}: a module at "
                                  "two places cannot be stored")
    enc, skel_modules = Encoder(model.config), dict(skel.named_modules())
    slots: dict[str, tuple] = {}
    seen: dict[int, str] = {}

    def node(mod, path):
        where = path or "model"
        skel_mod = skel_modules.get(path)
        out = {}
        if skel_mod is not None and type(mod) is type(skel_mod):
            out["attrs"] = _changed_attrs(mod, skel_mod, enc, skel.config, path)
        else:
            kind = kind_of(mod)
            if kind is None or not kind.module:
                raise CheckpointError(f"module {where}: class {type(mod).__module__}.{type(mod).__qualname__} is "
                                      "not a checkpoint kind; register it with prunelib.model.checkpoint_kinds."
                                      "register_kind to store it")
            out["kind"], out["attrs"] = kind.name, enc.attrs(mod, where)
        params = {}
        for k, p in mod._parameters.items():
            key = f"{path}.{k}" if path else k
            if p is None:
                params[k] = None
            elif id(p) in seen:
                params[k] = {"alias": seen[id(p)]}
            else:
                seen[id(p)] = key
                params[k] = {"key": key, "requires_grad": p.requires_grad}
                slots[key] = (p, True)
        buffers = {}
        for k, b in mod._buffers.items():
            key, persistent = (f"{path}.{k}" if path else k), k not in mod._non_persistent_buffers_set
            buffers[k] = None if b is None else {"key": key, "persistent": persistent}
            if b is not None:
                slots[key] = (b, persistent)
        out["params"], out["buffers"] = params, buffers
        hooks = {}
        for label, (kind_attr, kw_attr, _) in _HOOKS.items():
            hs = [{"hook": enc(h, f"{where}:{label} hook"), "with_kwargs": hid in getattr(mod, kw_attr)}
                  for hid, h in getattr(mod, kind_attr).items()]
            if hs:
                hooks[label] = hs
        for kind_attr in ("_backward_hooks", "_backward_pre_hooks"):
            if getattr(mod, kind_attr):
                raise CheckpointError(f"module {where} has {kind_attr.strip('_')}, which cannot be stored")
        if hooks:
            out["hooks"] = hooks
        out["children"] = {k: None if c is None else node(c, f"{path}.{k}" if path else k)
                           for k, c in mod._modules.items()}
        return out

    return node(model, ""), enc, slots


def _changed_attrs(mod, skel_mod, enc: Encoder, skel_config, path: str) -> dict:
    """The attributes of a module of the config's own class that differ from what the config builds."""
    base, attrs, probe = vars(skel_mod), {}, Encoder(skel_config)
    for k, v in vars(mod).items():
        if k in INTERNAL:
            continue
        try:
            e = enc(v, f"{path}:{k}" if path else k)
        except CheckpointError:
            if k in base:  # built from the config the same way (a function, a generation config): kept as built
                continue
            raise
        if k in base and not has_stored_value(e):
            try:
                if probe(base[k], k) == e:
                    continue
            except CheckpointError:
                pass
        attrs[k] = e
    gone = sorted(k for k in base if k not in INTERNAL and k not in vars(mod))
    if gone:
        raise CheckpointError(f"module {path or 'model'}: attributes {gone} were deleted, which cannot be stored")
    return attrs


# --- loading ----------------------------------------------------------------------------------
class Builder:
    """Rebuilds a tree described by :func:`describe` over ``skel`` (the config's model on the meta device)."""

    def __init__(self, skel: nn.Module, tensors: dict, files: dict, dtype: torch.dtype, shared):
        self.config, self.tensors, self.files, self.dtype = skel.config, tensors, files, dtype
        self.skel_modules = dict(skel.named_modules())
        self.values = Decoder(skel.config, tensors, shared)
        self.slots: list = []  # (module, is_param, name, key, spec, expected meta tensor or None, where)
        self.hooks: list = []
        self.kinds: dict = {}  # name -> kind, of every kind rebuilt (their checks run on the whole model)

    def model(self, tree) -> nn.Module:
        model = self.node(tree, "", 0)
        for register, hook, with_kwargs in self.hooks:
            register(hook, with_kwargs=with_kwargs)
        self._fill()
        self.kinds.update({k.name: k for k in map(kind_of, self.values.built.values())})
        for kind in self.kinds.values():
            if kind.check is not None:
                try:
                    kind.check(model)
                except (ValueError, TypeError, AttributeError, KeyError, IndexError) as err:
                    raise CheckpointError(f"{kind.name}: {err}") from None
        return model

    def node(self, spec, path: str, depth: int) -> nn.Module:
        where = path or "model"
        if depth > MAX_DEPTH:
            raise CheckpointError(f"{where}: the module tree is nested deeper than {MAX_DEPTH} levels")
        if not isinstance(spec, dict) or not {"attrs", "params", "buffers", "children"} <= set(spec) <= \
                {"kind", "attrs", "params", "buffers", "hooks", "children"}:
            raise CheckpointError(f"{where}: not a module node (keys kind, attrs, params, buffers, hooks, children)")
        children = OrderedDict()
        for k, child in _mapping(spec["children"], where, "children").items():
            if not isinstance(k, str) or not (NAME.fullmatch(k) or k.isdigit()):
                raise CheckpointError(f"{where}: {k!r} is not a child module name")
            children[k] = None if child is None else self.node(child, f"{path}.{k}" if path else k, depth + 1)
        attrs = {k: self.values(v, f"{where}:{k}") for k, v in _mapping(spec["attrs"], where, "attrs").items()}
        params, buffers = _mapping(spec["params"], where, "params"), _mapping(spec["buffers"], where, "buffers")
        base = self.skel_modules.get(path)
        if "kind" not in spec:
            if base is None:
                raise CheckpointError(f"{where}: the config builds no module here, and the node names no kind")
            mod = base
            for k, v in attrs.items():
                old = mod.__dict__.get(settable(mod, k, where), v)
                if not _compatible(old, v):
                    raise CheckpointError(f"{where}: attribute {k!r} = {str(v)[:60]!r} replaces a "
                                          f"{type(old).__name__} ({old!r})")
                mod.__dict__[k] = v
        else:
            kind = lookup(spec["kind"], where)
            if not kind.module:
                raise CheckpointError(f"{where}: {kind.name} is not a module kind")
            mod = build(kind, Rebuild(where, attrs, children, base, self.config, params))
            set_attrs(mod, attrs, where)
            self.kinds[kind.name] = kind
        expected = {**{k: (True, t) for k, t in mod._parameters.items()}, **{k: (False, t) for k, t in mod._buffers.items()}}
        undeclared = sorted(set(expected) - set(params) - set(buffers))
        if undeclared:  # the module uses them: each must be saved (or saved as empty)
            raise CheckpointError(f"{where}: tensor slots {undeclared} of this {type(mod).__name__} are missing")
        if "kind" not in spec and set(children) != set(mod._modules):  # the config's class runs its own, all
            raise CheckpointError(f"{where}: children {sorted(children)}, but a {type(mod).__name__} of this config "
                                  f"has {sorted(mod._modules)}")
        mod._parameters, mod._buffers, mod._modules = OrderedDict(), OrderedDict(), children
        mod._non_persistent_buffers_set = set()
        for is_param, specs in ((True, params), (False, buffers)):
            for k, s in specs.items():
                if not isinstance(k, str) or not NAME.fullmatch(k) or k in mod.__dict__ or k in children or \
                        (k in mod._parameters if not is_param else k in mod._buffers):
                    raise CheckpointError(f"{where}: {k!r} is not a tensor slot name")
                (mod._parameters if is_param else mod._buffers)[k] = None
                if s is None:
                    continue
                allowed = {"alias"} if is_param and isinstance(s, dict) and "alias" in s else \
                    {"key", "requires_grad" if is_param else "persistent"}
                if not isinstance(s, dict) or set(s) != allowed:
                    raise CheckpointError(f"{where}: slot {k!r} is {str(s)[:60]!r}, not one of {sorted(allowed)}")
                if not is_param and not s["persistent"]:
                    mod._non_persistent_buffers_set.add(k)
                meta = expected.get(k, (None, None))
                self.slots.append((mod, is_param, k, s, meta[1] if meta[0] == is_param else None, where))
        for kind_attr, kw_attr, _ in _HOOKS.values():  # only the file's hooks (the config's model has none)
            getattr(mod, kind_attr).clear(), getattr(mod, kw_attr).clear()
        for label, hs in _mapping(spec.get("hooks", {}), where, "hooks").items():
            if label not in _HOOKS or not isinstance(hs, list):
                raise CheckpointError(f"{where}: {label!r} is not a kind of forward hook")
            for i, h in enumerate(hs):
                if not isinstance(h, dict) or set(h) != {"hook", "with_kwargs"} or not isinstance(h["with_kwargs"], bool):
                    raise CheckpointError(f"{where}: {label} hook {i} is not a {{hook, with_kwargs}} entry")
                obj = self.values(h["hook"], f"{where}:{label} hook {i}")
                kind = kind_of(obj)
                if kind is None or not kind.hook:
                    raise CheckpointError(f"{where}: {label} hook {i} is a {type(obj).__name__}, not a registered hook")
                self.hooks.append((getattr(mod, _HOOKS[label][2]), obj, h["with_kwargs"]))
        return mod

    def _fill(self) -> None:
        params = {}
        for mod, is_param, k, s, meta, where in sorted(self.slots, key=lambda x: "alias" in x[3]):
            if "alias" in s:
                if not isinstance(s["alias"], str) or s["alias"] not in params:
                    raise CheckpointError(f"{where}: parameter {k!r} ties to {s['alias']!r}, which is no parameter")
                t = params[s["alias"]]
                if t.shape != _expected(mod, k, meta, where, str(s["alias"])):
                    raise CheckpointError(f"{where}: parameter {k!r} ties to {s['alias']!r} of shape {list(t.shape)}, "
                                          f"which does not fit")
                mod._parameters[k] = t
                continue
            key = s["key"]
            persistent = is_param or s["persistent"]
            if not isinstance(key, str) or key not in self.tensors or self.files[key] != persistent:
                raise CheckpointError(f"{where}: tensor {key!r} of slot {k!r} is not in "
                                      f"{'model.safetensors' if persistent else 'prunelib_state.safetensors'}")
            t = self.tensors.pop(key)
            want = _expected(mod, k, meta, where, key)
            if tuple(t.shape) != want:
                raise CheckpointError(f"tensor {key}: shape {list(t.shape)}, but module {where} "
                                      f"({type(mod).__name__}) expects {list(want)}")
            if t.is_floating_point() and is_param and t.dtype != self.dtype:
                raise CheckpointError(f"tensor {key}: dtype {t.dtype}, but the model's parameters are {self.dtype}")
            if meta is not None and not meta.is_floating_point() and t.dtype != meta.dtype:
                raise CheckpointError(f"tensor {key}: dtype {t.dtype}, but module {where} expects {meta.dtype}")
            if is_param:
                if not isinstance(s["requires_grad"], bool) or (s["requires_grad"] and not t.is_floating_point()):
                    raise CheckpointError(f"{where}: requires_grad of {k!r} is {s['requires_grad']!r}")
                t = params[key] = nn.Parameter(t, requires_grad=s["requires_grad"])
                mod._parameters[k] = t
            else:
                if not isinstance(s["persistent"], bool):
                    raise CheckpointError(f"{where}: persistent of buffer {k!r} is {s['persistent']!r}")
                mod._buffers[k] = t


def _expected(mod: nn.Module, name: str, meta, where: str, key: str) -> tuple:
    """The shape slot ``name`` of ``mod`` must have: a Linear's from its feature counts, an Embedding's from
    its sizes, any other from the module the config (or the kind's function) built."""
    if isinstance(mod, nn.Linear) and name in ("weight", "bias"):
        n_in, n_out = mod.in_features, mod.out_features
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (n_in, n_out)):
            raise CheckpointError(f"{where}: in_features {n_in!r} / out_features {n_out!r} are not positive integers")
        return (n_out, n_in) if name == "weight" else (n_out,)
    if isinstance(mod, nn.Embedding) and name == "weight":
        return mod.num_embeddings, mod.embedding_dim
    if meta is None:
        raise CheckpointError(f"tensor {key}: module {where} ({type(mod).__name__}) has no slot {name!r}")
    return tuple(meta.shape)


def _compatible(old, new) -> bool:
    """May a plain attribute of the config's module change from ``old`` to ``new`` (same kind of value)?"""
    if old is None or new is None or type(old) is type(new):
        return True
    if is_config(old):
        return is_config(new)
    return isinstance(old, float) and type(new) is int


def _mapping(v, where: str, what: str) -> dict:
    if not isinstance(v, dict):
        raise CheckpointError(f"{where}: {what} is a {type(v).__name__}, not an object")
    return v
