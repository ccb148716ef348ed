"""The one place that knows where a decoder-only model keeps its parts.

Pruning methods, the cost model and the timing harness never touch module names: they
ask a :class:`ModelAdapter` for roles (layers, norms, the q/k/v/o and gate/up/down
projections, heads, embedding, head). The names live in one family adapter per
``model_type`` (``prunelib/adapters/``: llama, qwen2, mistral, phi3), found automatically.
Any other family gets a :class:`LayoutError` naming what was not found.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prunelib.model.adapters import ATTN_ROLES, FAMILIES, MLP_ROLES, FamilyAdapter, LayoutError, Removed, family_adapter  # noqa: F401
from prunelib.model.adapters.base import out_features

SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))
#: the Llama layout's projection names: the labels of a layer's GEMMs when a LayerShape does not give its own
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
LLAMA_LINEARS = tuple((f"self_attn.{n}", (r,)) for n, r in zip(ATTN_PROJ, ATTN_ROLES)) + tuple(
    (f"mlp.{n}", (r,)) for n, r in zip(MLP_PROJ, MLP_ROLES))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [..., head_dim], ``cos``/``sin`` broadcastable to [..., r]: a partial
    one (r < head_dim, a family's ``partial_rotary_factor``) rotates the leading r columns only."""
    r = cos.shape[-1]
    xr, half = x[..., :r], r // 2
    out = xr * cos + torch.cat((-xr[..., half:], xr[..., :half]), -1) * sin
    return out if r == x.shape[-1] else torch.cat([out, x[..., r:]], -1)


def role_output(lin: nn.Module, rows: slice, x: torch.Tensor) -> torch.Tensor:
    """Output columns ``rows`` of ``lin`` on ``x``, computing those rows only (a role of a fused Linear);
    the module itself when ``rows`` are all of its outputs."""
    if rows.start == 0 and rows.stop == out_features(lin):
        return lin(x)
    return F.linear(x, lin.weight[rows], None if lin.bias is None else lin.bias[rows])


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
    #: ``(label, roles)`` of each Linear: a fused one lists several roles (Phi-3's ``self_attn.qkv_proj``
    #: holds q, k, v); empty means the Llama layout (:data:`LLAMA_LINEARS`)
    linears: tuple = ()

    @property
    def linear_roles(self) -> tuple:
        return self.linears or LLAMA_LINEARS

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
    """Roles of a ``*ForCausalLM`` model (its shapes may be pruned), through its family's adapter."""

    @staticmethod
    def check_type(config) -> None:
        model_type = getattr(config, "model_type", None)
        if model_type not in FAMILIES:
            raise LayoutError(
                f"model_type {model_type!r} is not supported; supported families: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

    def __init__(self, model: nn.Module):
        self.model = model
        self.check_type(getattr(model, "config", None))
        self.fam: FamilyAdapter = family_adapter(model)
        missing = self.fam.missing()
        if missing:
            raise LayoutError(f"{type(model).__name__} ({self.family}) lacks the modules its family adapter "
                              f"{type(self.fam).__name__} expects: {', '.join(missing[:8])}")
        self.config = model.config

    @property
    def family(self) -> str:
        return self.model.config.model_type

    # --- whole-model parts -------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.fam.layers

    def set_layers(self, layers) -> None:
        """Replace the decoder layer list (the config's layer count follows)."""
        self.fam.set_layers(layers)
        self.config.num_hidden_layers = len(self.fam.layers)

    @property
    def embed(self) -> nn.Embedding:
        return self.fam.embed

    @property
    def final_norm(self) -> nn.Module:
        return self.fam.final_norm

    def set_final_norm(self, module: nn.Module) -> None:
        setattr(self.fam.base, self.fam.norm_name, module)

    @property
    def lm_head(self) -> nn.Linear:
        return self.fam.lm_head

    @property
    def rotary_emb(self) -> nn.Module:
        return self.fam.rotary_emb

    @property
    def tied(self) -> bool:
        """The LM head shares the embedding's weight."""
        return self.fam.tied

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
        return self.fam.sublayer(self.layers[i], "attention")

    def mlp(self, i: int) -> nn.Module | None:
        """The MLP sublayer of layer ``i`` (None if it was removed)."""
        return self.fam.sublayer(self.layers[i], "mlp")

    def sublayer(self, i: int, kind: str) -> nn.Module | None:
        """``kind``: 'attention' or 'mlp' (None if it was removed)."""
        return self.fam.sublayer(self.layers[i], kind)

    def set_sublayer(self, i: int, kind: str, module: nn.Module) -> None:
        """Put ``module`` in place of layer ``i``'s attention or MLP (``Removed(kind)`` removes it)."""
        self.fam.set_sublayer(self.layers[i], kind, module)

    def norm(self, i: int, which: str) -> nn.Module:
        """Layer ``i``'s norm before the attention (``which='input'``) or before the MLP (``'post'``)."""
        return self.fam.norm(self.layers[i], which)

    def set_norm(self, i: int, which: str, module: nn.Module) -> None:
        self.fam.set_norm(self.layers[i], which, module)

    def _owner(self, i: int, role: str) -> nn.Module:
        kind = self.fam.kind_of(role)
        sub = self.sublayer(i, kind)
        if sub is None:
            raise LayoutError(f"layer {i}: the {kind} sublayer was removed; it has no {role} projection")
        return sub

    def proj(self, i: int, role: str) -> nn.Linear:
        """The Linear of ``role`` (q k v o gate up down) in layer ``i``; a LayoutError if the family fuses it."""
        return self.fam.proj(self._owner(i, role), role)

    def set_proj(self, i: int, role: str, module: nn.Module) -> None:
        self.fam.set_proj(self._owner(i, role), role, module)

    def set_head_counts(self, i: int, n_heads: int, n_kv_heads: int) -> None:
        """After slicing layer ``i``'s q/k/v rows: tell its attention the new head counts (family-specific)."""
        self.fam.set_head_counts(self._owner(i, "q"), n_heads, n_kv_heads)

    def role_rows(self, i: int, role: str) -> tuple[nn.Module, slice]:
        """``(linear, rows)``: the Linear holding ``role`` in layer ``i`` and its rows that are ``role``'s."""
        return self.fam.role_rows(self._owner(i, role), role)

    def linear_name(self, role: str) -> str:
        """The name of the Linear holding ``role`` (its own, or the fused one): a key of attn_proj/mlp_proj."""
        self.fam.kind_of(role)
        return self.fam.linear_of[role]

    def fused_with(self, role: str) -> str | None:
        """The fused Linear holding ``role``'s rows in this family, or None if the role has its own Linear."""
        return self.fam.fused_with(role)

    def require_separate(self, roles, what: str) -> None:
        """Refuse, naming the family and the role, if ``what`` needs a Linear of its own for a fused role."""
        for role in roles:
            fused = self.fam.fused_with(role)
            if fused:
                raise LayoutError(f"{what} does not support the {self.family} family yet: it needs a separate {role} "
                                  f"projection, and {self.family} fuses roles {', '.join(self.fam.fused[fused])} "
                                  f"into {fused}")

    def attn_proj(self, i: int) -> dict[str, nn.Linear]:
        """The attention's Linears by attribute name (a fused one once); empty if the attention was removed."""
        attn = self.attn(i)
        return {} if attn is None else {n: getattr(attn, n) for n in self.fam.linear_names("attention")}

    def mlp_proj(self, i: int) -> dict[str, nn.Linear]:
        mlp = self.mlp(i)
        return {} if mlp is None else {n: getattr(mlp, n) for n in self.fam.linear_names("mlp")}

    def linears_by_input(self, i: int) -> dict[str, dict[str, nn.Linear]]:
        """Layer ``i``'s Linears by the input they read: 'attention_in' (q/k/v, fused or not), 'o', 'mlp_in'
        (gate/up), 'down'. Linears of one group read the same tensor (one Gram matrix, one rotation)."""
        place = {"q": "attention_in", "k": "attention_in", "v": "attention_in", "o": "o",
                 "gate": "mlp_in", "up": "mlp_in", "down": "down"}
        out = {p: {} for p in ("attention_in", "o", "mlp_in", "down")}
        for kind, roles in (("attention", ATTN_ROLES), ("mlp", MLP_ROLES)):
            sub = self.sublayer(i, kind)
            for role in roles if sub is not None else ():
                name = self.fam.linear_of[role]
                out[place[role]][name] = getattr(sub, name)
        return out

    def set_linear(self, i: int, name: str, module: nn.Module) -> None:
        """Replace the Linear called ``name`` (a key of :meth:`attn_proj` or :meth:`mlp_proj`) in layer ``i``."""
        for kind in ("attention", "mlp"):
            sub = self.sublayer(i, kind)
            if sub is not None and name in self.fam.linear_names(kind):
                setattr(sub, name, module)
                return
        raise LayoutError(f"layer {i} of this {self.family} model has no Linear {name!r}")

    def linear_labels(self) -> tuple:
        """``(label, roles)`` of a layer's Linears, e.g. ``("self_attn.qkv_proj", ("q", "k", "v"))``."""
        out = []
        for kind, roles in (("attention", ATTN_ROLES), ("mlp", MLP_ROLES)):
            for name in self.fam.linear_names(kind):
                out.append((f"{self.fam.sublayer_name(kind)}.{name}",
                            tuple(r for r in roles if self.fam.linear_of[r] == name)))
        out = tuple(out)
        return () if out == LLAMA_LINEARS else out

    def layer_shape(self, i: int) -> LayerShape:
        hd = self.head_dim
        attn, mlp = self.attn_proj(i), self.mlp_proj(i)
        n_heads = self.fam.out_rows(self.attn(i), "q") // hd if attn else 0
        n_kv = self.fam.out_rows(self.attn(i), "k") // hd if attn else 0
        inter = self.fam.out_rows(self.mlp(i), "up") if mlp else 0
        projs = {**attn, **mlp}
        ranks = tuple((k, int(p.rank)) for k, p in projs.items() if isinstance(getattr(p, "rank", None), int))
        sparse = tuple(k for k, p in projs.items() if getattr(p, "sparse24", False))
        overrides = {}
        layer = self.layers[i]
        subs = [getattr(layer, self.fam.sublayer_name(k)) for k in ("attention", "mlp")]
        for mod in (layer, *subs):  # dynamic / cross-layer modules say what they realised
            fn = getattr(mod, "shape_overrides", None)
            if callable(fn):
                overrides.update(fn())
        unknown = set(overrides) - set(LayerShape.__dataclass_fields__)
        if unknown:
            raise LayoutError(f"layer {i}: shape_overrides() returned unknown fields {sorted(unknown)}")
        return LayerShape(hidden=self.hidden_size, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd, intermediate=inter,
                          ranks=ranks, sparse24=sparse, linears=self.linear_labels(), **overrides)

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
            for kind, projs in (("attention", self.attn_proj(i)), ("mlp", self.mlp_proj(i))):
                out.update({f"layers.{i}.{self.fam.sublayer_name(kind)}.{k}": v for k, v in projs.items()})
        out[self.fam.head_name] = self.lm_head
        return out
