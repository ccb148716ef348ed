"""Input checks every layer shares (primitives and the model-shape checks), run before any work starts.
Every error names the parameter, the value given and what is allowed, e.g.
``batches=0 is not allowed: expected integers >= 1``. The run layer's checks (methods, presets,
notebook parameters) are in :mod:`prunelib.run.checks`."""
from __future__ import annotations

import math

PHASES = ("prefill", "decode")


class InputError(ValueError):
    """A bad input, found before any work started (the CLIs print it as a usage error)."""


def fail(name: str, value, allowed: str):
    raise InputError(f"{name}={value!r} is not allowed: expected {allowed}")


def _is_int(v) -> bool:
    import numpy as np

    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def integer(name: str, v, minimum: int = 1, maximum: int | None = None, why: str = "") -> int:
    """``v`` as an int in [minimum, maximum]."""
    allowed = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "") + why
    if not _is_int(v) or v < minimum or (maximum is not None and v > maximum):
        fail(name, v, allowed)
    return int(v)


def integers(name: str, values, minimum: int = 1, maximum: int | None = None, why: str = "") -> list[int]:
    """A non-empty list of ints in [minimum, maximum]; the error names the first bad one."""
    allowed = f"a non-empty list of integers >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "") + why
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        fail(name, values, allowed)
    values = list(values)
    if not values:
        fail(name, values, allowed)
    for v in values:
        if not _is_int(v) or v < minimum or (maximum is not None and v > maximum):
            fail(name, values, f"{allowed}; {v!r} is not")
    return [int(v) for v in values]


def number(name: str, v, lo: float | None = None, hi: float | None = None, *, hi_open: bool = False) -> float:
    """A finite number in [lo, hi] (or [lo, hi) with ``hi_open``)."""
    parts = ["a finite number"] + ([f">= {lo}"] if lo is not None else []) + \
        ([f"{'<' if hi_open else '<='} {hi}"] if hi is not None else [])
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (lo is None or v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        fail(name, v, " ".join(parts))
    return float(v)


def reps(v) -> int:
    return integer("reps", v, 2, why=" (a median and its confidence interval need at least 2 samples)")


def limit(v):
    """lm-eval's ``limit``: None (every document), a whole number of documents >= 1, or a fraction in (0, 1)."""
    if v is None:
        return None
    allowed = "None (every document), a whole number of documents >= 1, or a fraction 0 < limit < 1"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        fail("limit", v, allowed)
    if v >= 1 and not float(v).is_integer():
        fail("limit", v, allowed)
    return int(v) if v >= 1 else float(v)


def phases(values) -> tuple:
    allowed = f"a list of {list(PHASES)} (or 'none' on the command line: quality only)"
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        fail("phases", values, allowed + f", e.g. [{values!r}]")  # a bare string would be read letter by letter
    values = tuple(values)
    if len(set(values)) != len(values):
        fail("phases", list(values), allowed + ", each phase once")
    for p in values:
        if p not in PHASES:
            fail("phases", p, allowed)
    return values


def sparsities(values) -> list[float]:
    """Model-independent check: a non-empty list of fractions 0 <= s < 1 (each method narrows it, see
    :func:`method_sparsities`)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__") or not list(values):
        fail("sparsities", values, "a non-empty list of fractions 0 <= s < 1")
    values = list(values)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 <= v < 1):
            fail("sparsities", values, f"a list of fractions 0 <= s < 1; {v!r} is not")
    return [float(v) for v in values]


def max_length(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def lengths_fit(values, config, phase_list=PHASES) -> None:
    """A prompt of each length (plus the decoded token) must fit the model's positions."""
    top = max_length(config)
    if top is None:
        return
    extra = 1 if "decode" in phase_list else 0
    for s in values:
        if s + extra > top:
            fail("lengths" if not isinstance(values, int) else "length", s,
                 f"lengths <= {top - extra} (max_position_embeddings {top}"
                 + (", one position left for the decoded token)" if extra else ")"))


def timing_args(base_model, phase, batch, length, reps_=None, cand_model=None) -> None:
    """What :func:`prunelib.measure.timing.compare` / ``measure`` need: a phase, batch and length >= 1 within the
    model's positions, reps >= 2, and two models over the same vocabulary."""
    import torch

    for name, m in (("base_model", base_model), ("cand_model", cand_model)):
        if (m is not None or name == "base_model") and not isinstance(m, torch.nn.Module):
            fail(name, m if m is None or isinstance(m, (str, int, float)) else type(m).__name__,
                 "a loaded model (torch.nn.Module), e.g. load_model(name)[0]")
    if phase not in PHASES:
        fail("phase", phase, f"one of {list(PHASES)}")
    integer("batch", batch)
    top = max_length(base_model.config)
    extra = 1 if phase == "decode" else 0
    integer("length", length, 1, None if top is None else top - extra,
            "" if top is None else f" (max_position_embeddings {top}" + (", one left to decode)" if extra else ")"))
    if reps_ is not None:
        reps(reps_)
    if cand_model is not None:
        va, vb = _vocab(base_model), _vocab(cand_model)
        if va != vb:
            fail("cand_model vocabulary size", vb, f"the base model's vocabulary size {va} (the models must read the "
                 "same token ids)")


def _vocab(model) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(emb.num_embeddings) if emb is not None else int(model.config.vocab_size)


def csv(name: str, text: str, convert=str) -> list:
    """A comma-separated command-line list, each item converted; a bad item is named with its parameter."""
    out = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            out.append(convert(item))
        except ValueError:
            kind = {int: "integers", float: "numbers"}.get(convert, "values")
            fail(name, item, f"comma-separated {kind}")
    return out


def distinct(name: str, values) -> list:
    """A list without repeats (a value listed twice would be measured twice)."""
    values = list(values)
    twice = sorted({str(v) for v in values if values.count(v) > 1})
    if twice:
        fail(name, values, f"each value once; listed more than once: {twice}")
    return values


def budget(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        fail("budget_s", v, "a finite number of seconds > 0")
    return float(v)


def ci_target(v):
    """None (exactly ``reps`` pairs), ``"auto"`` or a relative half-width 0 < t < 1."""
    if v is None or v == "auto":
        return v
    allowed = "None (exactly reps pairs), 'auto' or a relative CI half-width 0 < ci_target < 1, e.g. 0.03"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 < v < 1):
        fail("ci_target", v, allowed)
    return float(v)


def flag(name: str, v) -> bool:
    import numpy as np

    if not isinstance(v, (bool, np.bool_)):
        fail(name, v, "True or False")
    return bool(v)


def seed(name: str, v) -> int:
    return integer(name, v, 0)


def token_ids(name: str, ids, vocab: int) -> None:
    """None, or an integer tensor of ids the model's embedding holds (0..vocab-1)."""
    import torch

    if ids is None:
        return
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
        fail(name, ids if not isinstance(ids, torch.Tensor) else f"a {ids.dtype} tensor of shape {tuple(ids.shape)}",
             "None or a non-empty integer tensor of token ids")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        fail(name, f"token ids {lo}..{hi}", f"token ids 0..{vocab - 1} (the model's vocabulary)")
