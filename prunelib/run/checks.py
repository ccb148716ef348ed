"""Input checks of the run layer, run before any work starts: the CLIs, the Python API and notebook
parameters (papermill injects them) share them. Every error names the parameter, the value given and what is
allowed, e.g. ``batches=0 is not allowed: expected integers >= 1``. The primitives live in
:mod:`prunelib.core.validate` (every layer uses them); these checks know the methods, presets and modes."""
from __future__ import annotations

from prunelib.core.validate import (PHASES, InputError, budget, ci_target, csv, distinct, fail, flag,  # noqa: F401
                                    integer, integers, lengths_fit, limit, number, phases, reps, sparsities,
                                    timing_args)
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
             calib_n=32, calib_len=256, seed=0, options_=None, ci_target_=None, budget_s=None, fidelity=True,
             timing_mode=None, device="cpu", dtype="float32", baseline_seeds=1) -> None:
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
    integer("baseline_seeds", baseline_seeds, 1, why=" (seeds of each random baseline: 0..n-1)")
    ci_target(ci_target_)
    if budget_s is not None:
        budget(budget_s)
    fidelity_domains(fidelity)
    resolve_dtype(dtype, device)  # the device exists and runs the dtype
    if timing_mode is not None:
        from prunelib.measure.timing import choose_mode

        choose_mode(resolve_device(device), timing_mode)  # a mode this device cannot run


def fidelity_domains(v):
    """``fidelity``: True (the default domains), False, or the held-out texts to score the KL / NLL change on (a
    prompt-aware rule's long windows are added by name: :func:`prunelib.measure.fidelity.long_prompt_rule`)."""
    from prunelib.measure.fidelity import DEFAULT_DOMAINS

    if isinstance(v, bool):
        return DEFAULT_DOMAINS if v else ()
    if not isinstance(v, (list, tuple)) or not all(d in DEFAULT_DOMAINS for d in v) or len(set(v)) != len(v):
        fail("fidelity", v, f"True, False, or distinct domains among {list(DEFAULT_DOMAINS)} ([] for none)")
    return tuple(v)


def model_args(model, methods_, sparsities_, lengths, phases_=PHASES) -> None:
    """The checks that need the model: each method's sparsity range, lengths within its positions."""
    if sparsities_ != LADDER:
        method_sparsities(methods_, sparsities_, model)
    lengths_fit(lengths, model.config, phases_)


def parameters(**p) -> None:
    """Notebook parameters (the first cell): unknown names are ignored, known ones must be valid; with ``model``,
    lengths and calibration windows must fit its positions (its config is read, not its weights), and a timing
    mode must run on ``device``."""
    _each_parameter(p)
    unknown_injected()
    if p.get("timing_mode") is not None:
        from prunelib.measure.timing import choose_mode

        choose_mode(resolve_device(p.get("device", "cpu")), p["timing_mode"])
    if "model" in p and any(k in p for k in ("lengths", "calib_len")):
        from prunelib.run.spec import model_config

        config = model_config(p["model"])[0]
        top = getattr(config, "max_position_embeddings", None)
        if "lengths" in p:
            lengths_fit(p["lengths"], config, tuple(p.get("phases", PHASES)))
        if "calib_len" in p and top is not None:
            integer("calib_len", p["calib_len"], 1, top, f" (max_position_embeddings {top} of {p['model']!r})")


def _each_parameter(p: dict) -> None:
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
        elif name == "baseline_seeds":
            integer(name, v, 1, why=" (seeds of each random baseline: 0..n-1)")
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
        elif name == "fidelity_domains":
            fidelity_domains(v)
        elif name == "long_context_docs":
            integer(name, v, 0, why=" (0 skips)")
        elif name in ("bands", "fine_bands"):
            if not isinstance(v, (list, tuple)) or not all(
                    isinstance(b, (list, tuple)) and len(b) == 2 and b[0] <= b[1] for b in v):
                fail(name, v, "a list of [low, high] percent pairs with low <= high")


def unknown_injected(history=None) -> None:
    """A name papermill injected (``-p sparsitys 0.3``) that the notebook's ``parameters`` cell does not define is
    refused: papermill only warns, and the run would use the default. ``history``: the kernel's executed cells
    (IPython's ``In``); outside a kernel, or with nothing injected, nothing to check."""
    import ast

    if history is None:
        try:
            from IPython import get_ipython
        except ImportError:
            return
        shell = get_ipython()
        history = shell.user_ns.get("In", []) if shell is not None else []
    cells = [c for c in history if isinstance(c, str)]
    for j, cell in enumerate(cells):
        if j and cell.lstrip().startswith("# Parameters"):  # papermill's injected cell follows the parameters cell

            def names(src):
                try:
                    tree = ast.parse(src)
                except SyntaxError:
                    return {}
                return {t.id: node for node in tree.body if isinstance(node, ast.Assign)
                        for t in node.targets if isinstance(t, ast.Name)}

            known, given = names(cells[j - 1]), names(cell)
            for name, node in given.items():
                if name not in known:
                    fail(name, ast.unparse(node.value), f"a parameter of this notebook: {sorted(known)}")
