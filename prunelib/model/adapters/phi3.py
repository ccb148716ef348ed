"""Phi-3: q, k and v stacked in one ``qkv_proj``; gate and up stacked in one ``gate_up_proj``.

Row blocks: ``qkv_proj`` holds [q heads | k heads | v heads]; the attention reads its query
rows from ``config.num_attention_heads`` and its KV rows from the module's
``num_key_value_heads``. ``gate_up_proj`` holds [gate | up], halves of equal size.
After head slicing an attention layer gets its own copy of the config with its head counts
(the model's config, shared by every layer, keeps the dense ones).
"""
import copy

from prunelib.model.adapters.base import FamilyAdapter, out_features, register_family


@register_family
class Phi3Adapter(FamilyAdapter):
    model_types = ("phi3",)
    linear_of = {"q": "qkv_proj", "k": "qkv_proj", "v": "qkv_proj", "o": "o_proj",
                 "gate": "gate_up_proj", "up": "gate_up_proj", "down": "down_proj"}
    fused = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": ("gate", "up")}

    def set_head_counts(self, sub, n_heads, n_kv_heads):
        sub.num_key_value_heads = n_kv_heads
        if (sub.config.num_attention_heads, sub.config.num_key_value_heads) != (n_heads, n_kv_heads):
            sub.config = copy.copy(sub.config)  # qkv_proj's query rows end where this layer's config says
            sub.config.num_attention_heads, sub.config.num_key_value_heads = n_heads, n_kv_heads

    def row_sizes(self, sub, fused):
        total = out_features(getattr(sub, fused))
        if fused == "qkv_proj":
            kv = sub.num_key_value_heads * sub.head_dim
            return {"q": total - 2 * kv, "k": kv, "v": kv}
        if fused == "gate_up_proj":
            return {"gate": total // 2, "up": total // 2}
        return super().row_sizes(sub, fused)
