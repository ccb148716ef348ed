"""Pruning: physical model surgery (``surgery``), the method registry, and the methods.

Importing this package registers every method: every module in this folder other than
``registry`` and ``surgery`` is imported, so a new method is one new file with an
``@register(...)`` function and needs no other edit; :func:`check_contract` then checks
every method's declared baseline and hooks.
``prunelib.pruning.prune(model, "shortgpt", 0.25, calibration=...)``.
"""
import importlib
import pkgutil

from prunelib.pruning.registry import REGISTRY, Report, check_contract, get, methods, prune  # noqa: F401

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _m.name not in ("registry", "surgery"):
        importlib.import_module(f"{__name__}.{_m.name}")  # importing registers the module's methods
check_contract()
