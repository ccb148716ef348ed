"""One registry of pruning methods, keyed by name, each bound to a taxonomy cell.

A method is a function ``fn(model, sparsity, ctx) -> (pruned_model, removed)`` where
``removed`` says what went (layers, heads, channels, ranks); :func:`prune` wraps it
with argument checks, calibration data, and a :class:`Report` (shapes, parameter
counts, analytic FLOPs/bytes and the theoretical speedup from the cost model).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from prunelib.cost import costmodel
from prunelib.model.adapter import ModelAdapter
from prunelib.core.validate import InputError
from prunelib.cost.hardware import HardwareSpec
from prunelib.model.models import parameter_count
from prunelib.cost.taxonomy import CELLS, Cell


@dataclass(frozen=True)
class Method:
    name: str
    cell: Cell
    fn: Callable
    criterion: str  # one line: how the removed structures are chosen
    needs_calibration: bool
    max_sparsity: Callable  # model -> largest allowed sparsity (inclusive)
    options: dict = field(default_factory=dict)  # option name -> allowed values (see check_options)
    separate: tuple = ()  # projection roles the method needs as Linears of their own (refused where a family fuses them)
    unit: str = ""  # what its sparsity is the removed fraction of (default: its cell's unit)
    baseline: str | None = None  # the random baseline of the same unit it must beat; None: it is a baseline
    ladder: Callable | None = None  # model -> candidate sparsities in its own unit (see prunelib.pruning.ladders)

    @property
    def static(self) -> bool:
        """Decided once offline (True), or per input at run time (False: a dynamic method, with a
        ``realised_sparsity`` hook saying what it actually skipped)."""
        return self.cell.static

    def hook(self, name: str):
        """The method module's optional hook ``name`` (``realised_sparsity``, ``graph_safe``, ``compile_safe``), or None.

        Dynamic methods report what they skipped and whether they can be captured through
        module-level functions of these names; a static method's module defines none.
        """
        import sys

        return getattr(sys.modules[self.fn.__module__], name, None)


REGISTRY: dict[str, Method] = {}


def register(name: str, cell: str, criterion: str, *, baseline: str | None, needs_calibration: bool,
             max_sparsity: Callable, ladder: Callable | None = None, unit: str | None = None, options: dict | None = None,
             separate: tuple = ()):
    """Decorator adding a method; a duplicate name or unknown cell is an error.

    The contract a method declares here:

    - ``cell``: its taxonomy cell, hence static or dynamic. A dynamic method's module defines
      ``realised_sparsity(model)`` (what it skipped since ``reset_stats``), found by
      :meth:`Method.hook`; :func:`check_contract` refuses a dynamic method without it.
    - ``unit``: what its sparsity is the removed fraction of; default: the cell's unit. A
      method finer than its cell (an MLP-only router, attention-only sublayers) names its own.
    - ``baseline``: the registered random method of the same cell and unit that this criterion
      is compared with (``experiment.versus_random``); ``None`` declares the method a baseline.
    - ``options``: the keyword options the method takes, each mapped to what is allowed: a type
    (``int``, ``bool``) or a tuple of allowed values; None always means the method's default.
    :func:`prune` refuses any other option, and any value the schema does not allow.
    ``ladder``: the sparsities it is measured at across its range, in its own unit (whole layers, multiples of 64
    channels, target rates; :mod:`prunelib.pruning.ladders`); :func:`rungs` gives them for a model.
    ``separate``: projection roles (q k v o gate up down) the method needs as Linears of their own;
    :func:`prune` refuses, naming the family and the role, a model whose family fuses one of them.
    """
    if cell not in CELLS:
        raise ValueError(f"unknown taxonomy cell {cell!r}; known: {sorted(CELLS)}")

    def deco(fn):
        if name in REGISTRY:
            raise ValueError(f"pruning method {name!r} is already registered")
        REGISTRY[name] = Method(name, CELLS[cell], fn, criterion, needs_calibration, max_sparsity, dict(options or {}),
                                tuple(separate), unit or CELLS[cell].unit, baseline, ladder)
        return fn

    return deco


def check_contract() -> None:
    """Every registered method keeps the contract of :func:`register` (run once all modules are imported).

    Every method declares a ladder; a baseline must be registered, be a baseline itself, and share the method's
    cell and unit (and so its ladder's unit);
    a dynamic method's module must define ``realised_sparsity``.
    """
    for name, m in REGISTRY.items():
        if m.ladder is None:
            raise ValueError(f"method {name!r} declares no ladder: register(..., ladder=...) with its rungs")
        if m.baseline is not None:
            b = REGISTRY.get(m.baseline)
            if b is None:
                raise ValueError(f"method {name!r} names baseline {m.baseline!r}, which is not registered")
            if b.baseline is not None or (b.cell, b.unit) != (m.cell, m.unit):
                raise ValueError(f"baseline {m.baseline!r} of {name!r} must be a baseline of the same cell and unit "
                                 f"({m.cell.name}, {m.unit!r}); it is ({b.cell.name}, {b.unit!r}), baseline "
                                 f"{b.baseline!r}")
        if not m.static and m.hook("realised_sparsity") is None:
            raise ValueError(f"dynamic method {name!r}: its module {m.fn.__module__} defines no realised_sparsity(model)")


def _allowed(spec) -> str:
    return f"one of {list(spec)}" if isinstance(spec, tuple) else f"{'an integer' if spec is int else spec.__name__}"


def check_options(method: str, options: dict) -> None:
    """Refuse an option ``method`` does not declare, or a value its schema does not allow."""
    schema = get(method).options
    unknown = sorted(set(options) - set(schema))
    if unknown:
        allowed = ", ".join(f"{k} ({_allowed(v)})" for k, v in schema.items()) or "none"
        raise InputError(f"option {unknown[0]}={options[unknown[0]]!r} is not taken by pruning method {method!r}; "
                         f"its options: {allowed}")
    for k, v in options.items():
        spec = schema[k]
        if v is None:  # None: the method's default
            continue
        ok = v in spec if isinstance(spec, tuple) else (
            isinstance(v, spec) and (spec is bool or not isinstance(v, bool)))
        if not ok:
            raise InputError(f"option {k}={v!r} of pruning method {method!r} is not allowed: expected {_allowed(spec)}")


def check_sparsity(method: str, sparsity, model) -> float:
    """``sparsity`` as a float, or a ValueError naming the method, its unit and the allowed range on ``model``."""
    m = get(method)
    hi = m.max_sparsity(model)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity <= hi:
        raise InputError(f"sparsity {sparsity!r} is out of range for {method!r} ({m.unit}): "
                         f"allowed 0 <= s <= {hi:.10g}")
    return float(sparsity)


def rungs(method: str, model) -> list[float]:
    """The method's ladder on ``model``: its declared rungs within (0, max sparsity], distinct, ascending."""
    m = get(method)
    if m.ladder is None:
        raise InputError(f"pruning method {method!r} declares no ladder (register(..., ladder=...)); "
                         "give its sparsities explicitly")
    hi = m.max_sparsity(model)
    out = {}
    for s in m.ladder(model):  # exact values (29/30 stays 29/30), duplicates within 1e-9 merged
        if 0 < s <= hi + 1e-12:
            out.setdefault(round(float(s), 9), min(float(s), hi))
    return sorted(out.values())


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise InputError(f"unknown pruning method {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def methods(cell: str | None = None) -> list[str]:
    return sorted(n for n, m in REGISTRY.items() if cell is None or m.cell.name == cell)


@dataclass
class Context:
    """What a method may use besides the model: calibration batches and a seed."""

    calibration: object = None  # prunelib.model.calibration.CalibrationSet
    seed: int = 0
    options: dict = field(default_factory=dict)


@dataclass
class Report:
    method: str
    cell: str
    sparsity: float
    removed: dict
    params_dense: int
    params_pruned: int
    shapes: list  # per-layer LayerShape of the pruned model
    cost: dict = field(default_factory=dict)  # phase -> {flops, bytes, bound_speedup}

    @property
    def param_reduction(self) -> float:
        return 1 - self.params_pruned / self.params_dense


def _stamp(model, pruned, method, sparsity, seed, options) -> None:
    """Record the pruning in the pruned model's config (``prunelib_pruning``, a list: prunings stack).

    Provenance survives ``save_pretrained``, and the model fingerprint (which hashes the
    config) tells apart methods that change no weight (token pruning, sparse attention,
    random routing) from the dense model and from each other.
    """
    import copy
    import json

    if pruned.config is model.config:
        pruned.config = copy.deepcopy(model.config)
    history = list(getattr(model.config, "prunelib_pruning", None) or [])
    entry = {"method": method, "sparsity": sparsity, "seed": seed,
             "options": json.loads(json.dumps(options, sort_keys=True, default=str))}
    pruned.config.prunelib_pruning = history + [entry]


def _check_inputs(model, calibration, seed, hw) -> None:
    """Calibration windows of in-vocabulary token ids (at least one), a whole seed and a hardware spec."""
    import torch

    from prunelib.core.validate import fail, integer

    integer("seed", seed, 0)
    if hw is not None and not isinstance(hw, HardwareSpec):
        fail("hw", hw, "None or a HardwareSpec, e.g. hardware.spec('h100-sxm') or hardware.spec('cpu')")
    if calibration is None:
        return
    ids = getattr(calibration, "input_ids", None)
    allowed = "None or a CalibrationSet (calibration_batch(tokenizer, n, length)) of >= 1 windows of token ids"
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        fail("calibration", calibration if ids is None else f"input_ids {tuple(getattr(ids, 'shape', ()))} "
             f"{getattr(ids, 'dtype', type(ids).__name__)}", allowed + " (an integer tensor [n, length])")
    if ids.shape[0] < 1 or ids.shape[1] < 1:
        fail("calibration", f"input_ids of shape {tuple(ids.shape)}", allowed)
    vocab = model.get_input_embeddings().num_embeddings
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        fail("calibration", f"token ids {int(ids.min())}..{int(ids.max())}", f"token ids 0..{vocab - 1} (the model's "
             "vocabulary: was the calibration tokenized with another model's tokenizer?)")


def prune(model, method: str, sparsity: float, *, calibration=None, seed: int = 0, hw: HardwareSpec | None = None,
          batch: int = 1, length: int = 512, **options):
    """Prune ``model`` (left untouched) with a registered method; returns ``(pruned_model, report)``."""
    m = get(method)
    ModelAdapter(model).require_separate(m.separate, f"pruning method {method!r}")
    check_options(method, options)
    check_sparsity(method, sparsity, model)
    _check_inputs(model, calibration, seed, hw)
    if m.needs_calibration and calibration is None and sparsity > 0:
        raise ValueError(f"method {method!r} needs calibration data: pass calibration=calibration_batch(tokenizer, ...)")
    pruned, removed = m.fn(model, float(sparsity), Context(calibration, seed, options))
    _stamp(model, pruned, method, float(sparsity), seed, options)
    dense_shape, pruned_shape = costmodel.ModelShape.of(model), costmodel.ModelShape.of(pruned)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    report = Report(method, m.cell.name, float(sparsity), removed, parameter_count(model), parameter_count(pruned),
                    list(pruned_shape.layers))
    if hw is not None:
        for phase in costmodel.PHASES:
            c = costmodel.cost(pruned_shape, phase, batch, length, dtype, hw)
            report.cost[phase] = {"flops": c.flops, "bytes": c.bytes, "batch": batch, "length": length,
                                  "bound_speedup": costmodel.theoretical_speedup(dense_shape, pruned_shape, phase,
                                                                                 batch, length, dtype, hw)}
    return pruned, report
