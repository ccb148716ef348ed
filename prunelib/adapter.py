"""The one place that knows where a decoder-only model keeps its parts.

Pruning methods, the cost model and the timing harness never touch module names:
they ask a :class:`ModelAdapter` for layers, norms, projections, heads and KV heads.
Supported: the Llama family layout (Llama, Qwen2, Mistral), which shares module
names. Any other layout gets a :class:`LayoutError` naming what was not found.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


class Removed(nn.Module):
    """Stands in for a removed attention or MLP sublayer: contributes nothing to the residual.

    No GEMM runs; the residual add of a zero tensor remains (a few microseconds).
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, hidden_states=None, *args, **kwargs):
        x = hidden_states if hidden_states is not None else args[0]
        out = x.new_zeros(())  # broadcasts in the residual add: no [tokens, hidden] buffer
        return (out, None) if self.kind == "attention" else out

    def extra_repr(self) -> str:
        return f"removed {self.kind}"


class LayoutError(ValueError):
    """The model does not have the module layout prunelib knows how to handle."""


@dataclass(frozen=True)
class LayerShape:
    """Shapes of one decoder layer, read from its (possibly pruned) modules.

    ``n_heads``/``n_kv_heads`` are 0 and ``intermediate`` is 0 when the attention or MLP
    sublayer was removed. The remaining fields (dense defaults) describe the other cells:

    - ``ranks``: ``(proj, r)`` for projections factorised K->r->N (low rank);
    - ``sparse24``: projections holding 2:4 weights;
    - ``shortcut``: extra [hidden x hidden] GEMMs on every token (SliceGPT shortcuts);
    - ``attn_tokens`` / ``mlp_tokens``: fraction of tokens that run the attention (q/o
      projections and the query side of the attention products; k/v still run on all
      tokens) / the MLP (dynamic depth); ``router``: output features of the router(s);
    - ``seq_frac``: fraction of the prompt tokens that reach this layer (token pruning);
    - ``attn_density``: fraction of the attention score matrix computed (block-sparse
      attention), ``attn_block`` the block/page size of its estimator, ``attn_tile`` the
      block/page the sparse kernel computes whole tiles of (0: dense attention ran).

    Static fields are read from the modules; dynamic ones are what the layer's modules
    realised on the inputs they ran on since their last ``reset_stats()``.
    """

    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    ranks: tuple = ()
    sparse24: tuple = ()
    shortcut: int = 0
    attn_tokens: float = 1.0
    mlp_tokens: float = 1.0
    router: int = 0
    seq_frac: float = 1.0
    attn_density: float = 1.0
    attn_block: int = 0
    attn_tile: int = 0

    @property
    def rank(self) -> dict:
        return dict(self.ranks)

    @property
    def has_attn(self) -> bool:
        return self.n_heads > 0

    @property
    def has_mlp(self) -> bool:
        return self.intermediate > 0


class ModelAdapter:
    """Accessors for a Llama-family ``*ForCausalLM`` model (its shapes may be pruned)."""

    @staticmethod
    def check_type(config) -> None:
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise LayoutError(
                f"model_type {model_type!r} is not supported; supported layouts: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

    def __init__(self, model: nn.Module):
        self.model = model
        config = getattr(model, "config", None)
        self.check_type(config)
        model_type = config.model_type
        missing = [p for p in ("model", "model.layers", "model.embed_tokens", "model.norm", "lm_head") if not _has(model, p)]
        if not missing:
            for i, layer in enumerate(model.model.layers):
                for name in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp"):
                    if not hasattr(layer, name):
                        missing.append(f"model.layers.{i}.{name}")
                attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
                attn = None if isinstance(attn, Removed) else attn
                mlp = None if isinstance(mlp, Removed) else mlp
                missing += [f"model.layers.{i}.self_attn.{p}" for p in ATTN_PROJ if attn is not None and not hasattr(attn, p)]
                missing += [f"model.layers.{i}.mlp.{p}" for p in MLP_PROJ if mlp is not None and not hasattr(mlp, p)]
        if missing:
            raise LayoutError(f"{type(model).__name__} ({model_type}) lacks the modules prunelib expects: {', '.join(missing[:8])}")
        self.config = config

    # --- whole-model parts -------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def embed(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def hidden_size(self) -> int:
        return self.embed.embedding_dim

    @property
    def vocab_size(self) -> int:
        return self.lm_head.out_features

    @property
    def head_dim(self) -> int:
        """Explicit ``config.head_dim`` when the config has one, else hidden / heads."""
        hd = getattr(self.config, "head_dim", None)
        return int(hd) if hd else self.config.hidden_size // self.config.num_attention_heads

    # --- per-layer parts ---------------------------------------------------
    def attn(self, i: int) -> nn.Module | None:
        """The attention sublayer of layer ``i`` (None if it was removed)."""
        attn = self.layers[i].self_attn
        return None if isinstance(attn, Removed) else attn

    def mlp(self, i: int) -> nn.Module | None:
        """The MLP sublayer of layer ``i`` (None if it was removed)."""
        mlp = self.layers[i].mlp
        return None if isinstance(mlp, Removed) else mlp

    def attn_proj(self, i: int) -> dict[str, nn.Linear]:
        attn = self.attn(i)
        return {} if attn is None else {p: getattr(attn, p) for p in ATTN_PROJ}

    def mlp_proj(self, i: int) -> dict[str, nn.Linear]:
        mlp = self.mlp(i)
        return {} if mlp is None else {p: getattr(mlp, p) for p in MLP_PROJ}

    def layer_shape(self, i: int) -> LayerShape:
        hd = self.head_dim
        attn, mlp = self.attn_proj(i), self.mlp_proj(i)
        n_heads = attn["q_proj"].out_features // hd if attn else 0
        n_kv = attn["k_proj"].out_features // hd if attn else 0
        inter = mlp["up_proj"].out_features if mlp else 0
        projs = {**attn, **mlp}
        ranks = tuple((k, int(p.rank)) for k, p in projs.items() if isinstance(getattr(p, "rank", None), int))
        sparse = tuple(k for k, p in projs.items() if getattr(p, "sparse24", False))
        overrides = {}
        layer = self.layers[i]
        for mod in (layer, layer.self_attn, layer.mlp):  # dynamic / cross-layer modules say what they realised
            fn = getattr(mod, "shape_overrides", None)
            if callable(fn):
                overrides.update(fn())
        unknown = set(overrides) - set(LayerShape.__dataclass_fields__)
        if unknown:
            raise LayoutError(f"layer {i}: shape_overrides() returned unknown fields {sorted(unknown)}")
        return LayerShape(hidden=self.hidden_size, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd, intermediate=inter,
                          ranks=ranks, sparse24=sparse, **overrides)

    def reset_stats(self) -> None:
        """Reset the realised-sparsity counters of every dynamic module (see :class:`LayerShape`)."""
        for mod in self.model.modules():
            if mod is not self.model and callable(getattr(mod, "reset_stats", None)):
                mod.reset_stats()

    def layer_shapes(self) -> list[LayerShape]:
        return [self.layer_shape(i) for i in range(len(self.layers))]

    def linears(self) -> dict[str, nn.Linear]:
        """Every Linear layer of the decoder stack plus the LM head, by qualified name."""
        out = {}
        for i in range(len(self.layers)):
            out.update({f"layers.{i}.self_attn.{k}": v for k, v in self.attn_proj(i).items()})
            out.update({f"layers.{i}.mlp.{k}": v for k, v in self.mlp_proj(i).items()})
        out["lm_head"] = self.lm_head
        return out


def _has(obj, dotted: str) -> bool:
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True
