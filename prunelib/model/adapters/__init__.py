"""One adapter per model family, found by ``config.model_type``: a new family is one file here.

Importing the package registers every family module in it (files are discovered, so adding
``gemma.py`` with a ``@register_family`` class needs no other edit).
"""
import importlib
import pkgutil

from prunelib.model.adapters.base import ATTN_ROLES, FAMILIES, MLP_ROLES, FamilyAdapter, LayoutError, Removed, register_family  # noqa: F401

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")


def family_adapter(model) -> FamilyAdapter:
    """The family adapter of ``model``; a :class:`LayoutError` naming the model_type if none is registered."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise LayoutError(f"model_type {model_type!r} is not supported; supported families: {', '.join(sorted(FAMILIES))}"
                          " (a new family is one file in prunelib/adapters/)")
    return FAMILIES[model_type](model)
