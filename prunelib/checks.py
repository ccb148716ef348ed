"""Checks for notebook parameters (papermill injects them): wrong types or unknown names fail
in the first cell with a message that names the parameter, the value and what is allowed."""
from __future__ import annotations


def _positive_ints(name, v):
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
        raise ValueError(f"parameter {name}={v!r}: expected a non-empty list of positive integers")


def parameters(**p) -> None:
    from . import hardware, quality
    from .models import resolve_device, resolve_dtype
    from .pruning import get

    for name, v in p.items():
        if name in ("model",) and not isinstance(v, str):
            raise ValueError(f"parameter model={v!r}: expected a model name or path (str)")
        elif name == "device":
            resolve_device(v)
        elif name == "dtype":
            resolve_dtype(v, p.get("device", "cpu"))
        elif name == "methods":
            if not isinstance(v, (list, tuple)) or not v:
                raise ValueError(f"parameter methods={v!r}: expected a non-empty list of method names")
            for m in v:
                get(m)
        elif name == "sparsities":
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, (int, float)) and 0 <= x < 1 for x in v):
                raise ValueError(f"parameter sparsities={v!r}: expected a list of numbers in [0, 1)")
        elif name in ("batches", "lengths"):
            _positive_ints(name, v)
        elif name in ("reps", "calib_n", "calib_len"):
            _positive_ints(name, [v])
        elif name == "quality_preset":
            if v and v not in quality.PRESETS:
                raise ValueError(f"parameter quality_preset={v!r}: expected one of {sorted(quality.PRESETS)} or None")
        elif name == "hardware_spec":
            if v != "cpu" and v not in hardware.KNOWN:
                raise ValueError(f"parameter hardware_spec={v!r}: expected 'cpu' or one of {sorted(hardware.KNOWN)}")
        elif name == "long_context_docs":
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"parameter long_context_docs={v!r}: expected a whole number >= 0 (0 skips)")
        elif name in ("bands", "fine_bands"):
            if not all(isinstance(b, (list, tuple)) and len(b) == 2 and b[0] <= b[1] for b in v):
                raise ValueError(f"parameter {name}={v!r}: expected a list of [low, high] percent pairs")
