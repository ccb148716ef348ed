"""Input checks of the run layer, run before any work starts: the CLIs, the Python API and notebook
parameters (papermill injects them) share them. Every error names the parameter, the value given and what is
allowed, e.g. ``batches=0 is not allowed: expected integers >= 1``. The primitives live in
:mod:`prunelib.core.validate` (every layer uses them); these checks know the methods, presets and modes."""
from __future__ import annotations

from prunelib.core.validate import (PHASES, InputError, csv, fail, integer, integers, lengths_fit, limit,  # noqa: F401
                                    number, phases, reps, sparsities, timing_args)
from prunelib.cost import hardware
from prunelib.measure.scoring import PRESETS
from prunelib.measure.timing import MODES
from prunelib.model.models import resolve_device, resolve_dtype
from prunelib.pruning import get, methods as registered
from prunelib.pruning.registry import check_options, check_sparsity

#: ``sparsities="ladder"``: every method at each rung of its declared ladder
LADDER = "ladder"


def methods(names) -> list[str]:
    if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__") or not list(names):
        fail("methods", names, f"a non-empty list of method names from {registered()}")
    for m in names:
        if not isinstance(m, str):
            fail("methods", m, f"method names from {registered()}")
        get(m)  # names the registered ones
    return list(names)


def options(names, opts: dict) -> None:
    """Every option must be declared by every method it goes to (``prune(..., **options)``)."""
    for m in names:
        check_options(m, opts)


def method_sparsities(names, values, model) -> None:
    """Each (method, sparsity) within the method's range on ``model`` (its unit, and never emptying a
    whole sublayer type)."""
    for m in names:
        for s in values:
            check_sparsity(m, s, model)


def run_args(methods_, sparsities_, *, phases_=PHASES, batches=(1,), lengths=(512,), reps_=20, preset=None,
             calib_n=32, calib_len=256, seed=0, options_=None) -> None:
    """Everything of an experiment sweep that can be checked without the model (see :func:`model_args`)."""
    methods(methods_)
    options(methods_, options_ or {})
    if sparsities_ != LADDER:  # "ladder": each method's own rungs (prunelib.pruning.registry.rungs)
        sparsities(sparsities_)
    phases(phases_)
    integers("batches", batches)
    integers("lengths", lengths)
    reps(reps_)
    if preset is not None and preset not in PRESETS:
        fail("preset", preset, f"one of {sorted(PRESETS)} or None (no quality)")
    integer("calib_n", calib_n)
    integer("calib_len", calib_len)
    integer("seed", seed, 0)


def model_args(model, methods_, sparsities_, lengths, phases_=PHASES) -> None:
    """The checks that need the model: each method's sparsity range, lengths within its positions."""
    if sparsities_ != LADDER:
        method_sparsities(methods_, sparsities_, model)
    lengths_fit(lengths, model.config, phases_)


def parameters(**p) -> None:
    """Notebook parameters (the first cell): unknown names are ignored, known ones must be valid."""
    for name, v in p.items():
        if name == "model" and not isinstance(v, str):
            fail("model", v, "a model name or path (str)")
        elif name == "device":
            resolve_device(v)
        elif name == "dtype":
            resolve_dtype(v, p.get("device", "cpu"))
        elif name == "methods":
            methods(v)
        elif name == "sparsities":
            if v != LADDER:
                sparsities(v)
        elif name in ("batches", "lengths"):
            integers(name, v)
        elif name == "reps":
            reps(v)
        elif name in ("calib_n", "calib_len"):
            integer(name, v)
        elif name == "limit":
            limit(v)
        elif name == "phases":
            phases(v)
        elif name == "quality_preset":
            if v and v not in PRESETS:
                fail(name, v, f"one of {sorted(PRESETS)} or None")
        elif name == "timing_mode":
            if v is not None and v not in MODES:
                fail(name, v, f"None (the device's default) or one of {list(MODES)}")
        elif name == "hardware_spec":
            if v != "cpu" and v not in hardware.KNOWN:
                fail(name, v, f"'cpu' or one of {sorted(hardware.KNOWN)}")
        elif name == "long_context_docs":
            integer(name, v, 0, why=" (0 skips)")
        elif name in ("bands", "fine_bands"):
            if not isinstance(v, (list, tuple)) or not all(
                    isinstance(b, (list, tuple)) and len(b) == 2 and b[0] <= b[1] for b in v):
                fail(name, v, "a list of [low, high] percent pairs with low <= high")
