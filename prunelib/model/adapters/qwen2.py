"""Qwen2: the Llama layout with biases on the q, k and v projections."""
from prunelib.model.adapters.base import FamilyAdapter, register_family


@register_family
class Qwen2Adapter(FamilyAdapter):
    model_types = ("qwen2",)
    biased = ("q", "k", "v")
