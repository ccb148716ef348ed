"""Llama: separate q/k/v/o and gate/up/down projections, no biases."""
from prunelib.model.adapters.base import FamilyAdapter, register_family


@register_family
class LlamaAdapter(FamilyAdapter):
    model_types = ("llama",)
