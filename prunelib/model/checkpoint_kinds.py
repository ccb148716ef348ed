"""What a checkpoint may rebuild: registered kinds of module and object, each rebuilt from plain data by its own function.

A *kind* is a class that a pruning method adds to a model (a low-rank pair, a routed layer, a token pruner),
registered with the function that rebuilds an instance from the attributes the checkpoint saved (numbers,
strings, tensors, the modules already rebuilt below it). Its name in the structure file is a key of
:data:`KINDS`, nothing more: the loader imports nothing and resolves no name from the file, so a structure
file can ask only for what a method registered here, and each kind's function checks what it is given.

A method registers its kinds where it defines the classes (``register_kind(LowRankLinear, _rebuild)``);
a method that adds no class needs nothing (its shapes and plain attributes are saved as they are).
"""
from __future__ import annotations

import importlib
import inspect
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from prunelib.model.adapters import ATTN_ROLES, FAMILIES, FamilyAdapter
from prunelib.model.adapters.base import Removed, out_features

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
INTERNAL = frozenset(vars(nn.Module()))  # nn.Module bookkeeping: never an attribute of the file's
#: imported when a structure names a kind not registered yet: it imports every method, which registers its kinds
METHODS_PACKAGE = "prunelib.pruning"


class CheckpointError(ValueError):
    """A model that cannot be stored safely, or a folder that is not a valid prunelib checkpoint."""


@dataclass(frozen=True)
class Kind:
    name: str
    build: Callable  # (Rebuild) -> the instance, before the saved attributes, children and tensors are set
    module: bool  # an nn.Module (a node of the module tree) or a plain object (an attribute value, a hook)
    subclasses: bool = False  # also stands for classes made from it at run time (a mixin over a family's layer)
    hook: bool = False  # may be registered as a forward (pre-)hook
    check: Callable | None = None  # (model) -> None: what instances of the kind must agree on across the model


KINDS: dict[str, Kind] = {}
_BY_CLASS: dict[type, Kind] = {}


def register_kind(cls: type, build: Callable, *, subclasses: bool = False, hook: bool = False,
                  module: bool | None = None, check: Callable | None = None) -> Kind:
    """Let checkpoints hold instances of ``cls``, rebuilt by ``build(r: Rebuild)`` from their saved attributes.

    ``build`` returns a new instance (modules on the meta device, tensors are filled after it) built from
    ``r``'s typed attributes and children; the loader then sets every saved attribute on it, so ``build``
    needs only what construction and validation need. ``subclasses``: ``cls`` is a mixin that classes made at
    run time derive from (``module``: they are modules, though ``cls`` is not one); ``hook``: a forward hook;
    ``check(model)``: raises (CheckpointError, ValueError) if the rebuilt model's instances do not fit together.
    """
    module = issubclass(cls, nn.Module) if module is None else module
    kind = Kind(f"{cls.__module__}.{cls.__qualname__}", build, module, subclasses, hook, check)
    KINDS[kind.name] = _BY_CLASS[cls] = kind
    return kind


def kind_of(obj) -> Kind | None:
    """The kind registered for ``obj``'s class (exactly, or a class made from a ``subclasses`` kind); None if none."""
    kind = _BY_CLASS.get(type(obj))
    if kind is None:
        kind = next((_BY_CLASS[c] for c in type(obj).__mro__[1:] if c in _BY_CLASS and _BY_CLASS[c].subclasses),
                    None)
    return kind


def lookup(name, where: str) -> Kind:
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{where}: kind {name!r} is not a kind name")
    if name not in KINDS:
        importlib.import_module(METHODS_PACKAGE)  # a fixed package (never a name from the file): registers methods
    if name not in KINDS:
        raise CheckpointError(f"{where}: kind {name!r} is not one prunelib can rebuild (registered: "
                              f"{sorted(KINDS)}); if a plugin method adds it, import the plugin first")
    return KINDS[name]


def settable(obj, name, where: str) -> str:
    """``name`` if a checkpoint may set it on ``obj``: an identifier, not private to Python or to nn.Module,
    and not shadowing a method or property of the class (an attribute is data, never behaviour)."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or name.startswith("__") or name in INTERNAL:
        raise CheckpointError(f"{where}: {name!r} is not an attribute a checkpoint may set")
    if name not in vars(obj):
        static = inspect.getattr_static(type(obj), name, None)
        if callable(static) or hasattr(static, "__get__"):
            raise CheckpointError(f"{where}: attribute {name!r} would hide {type(obj).__name__}.{name}")
    return name


class Rebuild:
    """What a kind's build function gets: the saved attributes (decoded), the children (already rebuilt), the
    skeleton's module at this path (``base``, None where the config has none), the config and its family.

    The typed getters raise :class:`CheckpointError` naming the module path and the attribute.
    """

    def __init__(self, where: str, attrs: dict, children: dict, base, config, params: dict):
        self.where, self.attrs, self.children, self.base, self.config = where, attrs, children, base, config
        self.params = params
        self.family: type[FamilyAdapter] = FAMILIES[config.model_type]

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {what}")

    def get(self, name: str, types, *, optional: bool = False):
        """Attribute ``name``, an instance of ``types`` (a bool is not an int here); None if ``optional``."""
        types = types if isinstance(types, tuple) else (types,)
        v = self.attrs.get(name)
        if v is None and (optional or name in self.attrs and type(None) in types):
            return None
        if isinstance(v, types) and (bool in types or not isinstance(v, bool)):
            return v
        what = "missing" if name not in self.attrs else f"{v!r}"
        raise self.fail(f"attribute {name!r} is {what}, not a {' or '.join(t.__name__ for t in types)}")

    def int(self, name: str, lo: int | None = None, hi: int | None = None) -> int:
        v = self.get(name, int)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self.fail(f"attribute {name!r} = {v} is outside [{lo}, {hi}]")
        return v

    def float(self, name: str, lo: float | None = None, hi: float | None = None) -> float:
        v = float(self.get(name, (int, float)))
        if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self.fail(f"attribute {name!r} = {v} is not finite within [{lo}, {hi}]")
        return v

    def bool(self, name: str) -> bool:
        return self.get(name, bool)

    def str(self, name: str, allowed=None) -> str:
        v = self.get(name, str)
        if allowed is not None and v not in allowed:
            raise self.fail(f"attribute {name!r} = {v!r} is not one of {list(allowed)}")
        return v

    def child(self, name: str, cls: type | tuple) -> nn.Module:
        mod = self.children.get(name)
        if not isinstance(mod, cls):
            raise self.fail(f"child {name!r} is {type(mod).__name__}, not a {cls}")
        return mod

    def only(self, *names: str) -> None:
        """The node's children are exactly ``names`` (a kind runs those; another would be silently ignored)."""
        if set(self.children) != set(names):
            raise self.fail(f"children {sorted(self.children)}, but a {self.where.rsplit('.', 1)[-1]} of this kind has "
                            f"{sorted(names)}")

    def counters(self, name: str, value_type, keys=("prefill", "decode")) -> dict:
        """A ``{phase: count}`` attribute (per-phase counters of a dynamic module)."""
        d = self.get(name, dict)
        if set(d) != set(keys) or not all(isinstance(v, value_type) and (value_type is bool or not isinstance(v, bool))
                                          for v in d.values()):
            raise self.fail(f"attribute {name!r} = {str(d)[:80]} is not {{{', '.join(keys)}: {value_type.__name__}}}")
        return d

    def has_param(self, name: str) -> bool:
        return self.params.get(name) is not None

    def names(self, name: str = "names") -> tuple:
        """The (attention, MLP, input norm, post norm) names of a layer-level kind: the family's own."""
        want = (self.family.attn_name, self.family.mlp_name, self.family.input_norm_name, self.family.post_norm_name)
        if self.get(name, tuple) != want:
            raise self.fail(f"attribute {name!r} = {self.attrs[name]!r}; this {self.config.model_type} model has {want}")
        return want

    def role_rows(self, attn: nn.Module, name: str = "rows") -> dict:
        """A ``{role: (Linear name, start, stop)}`` attribute over ``attn``'s Linears, checked against them."""
        rows = self.get(name, dict)
        if set(rows) != set(ATTN_ROLES):
            raise self.fail(f"attribute {name!r} has roles {sorted(rows)}, not {sorted(ATTN_ROLES)}")
        for role, spec in rows.items():
            ok = isinstance(spec, tuple) and len(spec) == 3 and spec[0] == self.family.linear_of[role] and \
                all(isinstance(x, int) and not isinstance(x, bool) for x in spec[1:])
            lin = getattr(attn, spec[0], None) if ok else None
            if not isinstance(lin, nn.Module) or not 0 <= spec[1] < spec[2] <= out_features(lin):
                raise self.fail(f"attribute {name!r}: role {role} = {spec!r} is not a row range of this layer's "
                                f"{self.family.linear_of[role]}")
        for lin_name in {spec[0] for spec in rows.values()}:  # a Linear's roles tile its rows, in the family's order
            spans = [rows[r][1:] for r in ATTN_ROLES if rows[r][0] == lin_name]
            ends = [0] + [stop for _, stop in spans]
            if [start for start, _ in spans] != ends[:-1] or ends[-1] != out_features(getattr(attn, lin_name)):
                raise self.fail(f"attribute {name!r}: the roles of {lin_name} ({spans}) do not tile its "
                                f"{out_features(getattr(attn, lin_name))} rows")
        hd = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        q, k, v = (rows[r][2] - rows[r][1] for r in "qkv")
        if q % hd or k % hd or k != v or (q // hd) % (k // hd):
            raise self.fail(f"attribute {name!r}: q / k / v have {q} / {k} / {v} rows, not whole heads of {hd}")
        return rows

    def new(self, cls: type):
        """An instance of ``cls`` without running its constructor (a module gets nn.Module's bookkeeping)."""
        obj = cls.__new__(cls)
        if isinstance(obj, nn.Module):
            nn.Module.__init__(obj)
        return obj


# --- the kinds of the model layer ---------------------------------------------------------
def _linear(r: Rebuild) -> nn.Linear:
    return nn.Linear(r.int("in_features", 1), r.int("out_features", 1), bias=r.has_param("bias"), device="meta")


def _removed(r: Rebuild) -> Removed:
    return Removed(r.str("kind", ("attention", "mlp")))


register_kind(nn.Linear, _linear)
register_kind(Removed, _removed)

#: dtypes a checkpoint's tensors may have (float64 is refused: no prunelib model holds one)
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                                      torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}
