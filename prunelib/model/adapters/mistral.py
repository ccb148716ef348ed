"""Mistral: the Llama layout (sliding-window attention is the attention kernel's business)."""
from prunelib.model.adapters.base import FamilyAdapter, register_family


@register_family
class MistralAdapter(FamilyAdapter):
    model_types = ("mistral",)
