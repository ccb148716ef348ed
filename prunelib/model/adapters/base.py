"""What every family adapter shares: the registry keyed by ``model_type`` and the Llama layout.

A family adapter maps *roles* to a model's modules. Roles: the layer list; per layer the input
and post-attention norms, the attention and MLP sublayers, the projections ``q k v o`` and
``gate up down``; per model the embedding, final norm, LM head and rotary embedding. A family
that fuses projections (Phi-3: ``qkv_proj``, ``gate_up_proj``) declares which roles' row
blocks each fused Linear stacks, so an algorithm can read or write a role's rows
(:meth:`FamilyAdapter.role_rows`) without knowing the layout.
"""
from __future__ import annotations

from torch import nn

ATTN_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")

FAMILIES: dict[str, type["FamilyAdapter"]] = {}


class LayoutError(ValueError):
    """The model does not have the module layout prunelib knows how to handle."""


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


def register_family(cls):
    """Class decorator: the adapter of every ``model_type`` in ``cls.model_types`` (no duplicates)."""
    for t in cls.model_types:
        if t in FAMILIES:
            raise ValueError(f"model_type {t!r} already has the adapter {FAMILIES[t].__name__}")
        FAMILIES[t] = cls
    return cls


class FamilyAdapter:
    """The Llama layout (``model.layers[i].self_attn.q_proj`` ...); families override what differs."""

    model_types: tuple = ()
    backbone, layers_name, embed_name, norm_name, head_name, rotary_name = (
        "model", "layers", "embed_tokens", "norm", "lm_head", "rotary_emb")
    attn_name, mlp_name, input_norm_name, post_norm_name = "self_attn", "mlp", "input_layernorm", "post_attention_layernorm"
    #: role -> the attribute of its sublayer holding it (its own Linear, or the fused Linear holding its rows)
    linear_of = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                 "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    #: fused Linear -> the roles whose row blocks it stacks, in order
    fused: dict = {}
    #: roles whose Linear carries a bias
    biased: tuple = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    @property
    def family(self) -> str:
        return self.config.model_type

    # --- whole-model parts -----------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        return getattr(self.model, self.backbone)

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.base, self.layers_name)

    def set_layers(self, layers) -> None:
        setattr(self.base, self.layers_name, nn.ModuleList(layers))

    @property
    def embed(self) -> nn.Embedding:
        return getattr(self.base, self.embed_name)

    @property
    def final_norm(self) -> nn.Module:
        return getattr(self.base, self.norm_name)

    @property
    def lm_head(self) -> nn.Linear:
        return getattr(self.model, self.head_name)

    @property
    def rotary_emb(self) -> nn.Module:
        return getattr(self.base, self.rotary_name)

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.embed.weight

    # --- per-layer parts ---------------------------------------------------------------
    def sublayer_name(self, kind: str) -> str:
        if kind not in ("attention", "mlp"):
            raise ValueError(f"sublayer kind must be 'attention' or 'mlp', got {kind!r}")
        return self.attn_name if kind == "attention" else self.mlp_name

    def sublayer(self, layer: nn.Module, kind: str) -> nn.Module | None:
        """The attention or MLP of ``layer`` (None if it was removed)."""
        mod = getattr(layer, self.sublayer_name(kind))
        return None if isinstance(mod, Removed) else mod

    def set_sublayer(self, layer: nn.Module, kind: str, module: nn.Module) -> None:
        setattr(layer, self.sublayer_name(kind), module)

    def norm(self, layer: nn.Module, which: str) -> nn.Module:
        """``which``: 'input' (before attention) or 'post' (before the MLP)."""
        if which not in ("input", "post"):
            raise ValueError(f"norm must be 'input' or 'post', got {which!r}")
        return getattr(layer, self.input_norm_name if which == "input" else self.post_norm_name)

    def set_norm(self, layer: nn.Module, which: str, module: nn.Module) -> None:
        self.norm(layer, which)
        setattr(layer, self.input_norm_name if which == "input" else self.post_norm_name, module)

    @staticmethod
    def kind_of(role: str) -> str:
        if role in ATTN_ROLES:
            return "attention"
        if role in MLP_ROLES:
            return "mlp"
        raise ValueError(f"unknown projection role {role!r}; roles: {', '.join(ATTN_ROLES + MLP_ROLES)}")

    def fused_with(self, role: str) -> str | None:
        """The fused Linear holding ``role``'s rows, or None if the role has its own Linear."""
        name = self.linear_of[role]
        return name if name in self.fused else None

    def linear_names(self, kind: str) -> tuple:
        """The distinct Linear attributes of a sublayer (a fused one once)."""
        roles = ATTN_ROLES if kind == "attention" else MLP_ROLES
        return tuple(dict.fromkeys(self.linear_of[r] for r in roles))

    def proj(self, sub: nn.Module, role: str) -> nn.Module:
        """The Linear of ``role``; a :class:`LayoutError` if the family fuses it with other roles."""
        self.kind_of(role)
        fused = self.fused_with(role)
        if fused:
            raise LayoutError(f"{self.family} has no separate {role} projection: its rows are part of {fused} "
                              f"(roles {', '.join(self.fused[fused])})")
        return getattr(sub, self.linear_of[role])

    def set_proj(self, sub: nn.Module, role: str, module: nn.Module) -> None:
        self.proj(sub, role)
        setattr(sub, self.linear_of[role], module)

    def set_head_counts(self, sub: nn.Module, n_heads: int, n_kv_heads: int) -> None:
        """Tell attention sublayer ``sub`` its head counts after its q/k/v rows were sliced.

        Families whose attention reads the counts from its projections' shapes (views with -1
        heads: Llama, Qwen2, Mistral) need nothing; a fused family overrides this.
        """

    def row_sizes(self, sub: nn.Module, fused: str) -> dict:
        """Rows of each role stacked in the fused Linear ``fused`` of sublayer ``sub``."""
        raise LayoutError(f"{self.family} declares no fused Linear {fused!r}")

    def role_rows(self, sub: nn.Module, role: str) -> tuple[nn.Module, slice]:
        """``(linear, rows)``: the Linear holding ``role`` and the slice of its output rows that are ``role``'s."""
        self.kind_of(role)
        name = self.linear_of[role]
        lin = getattr(sub, name)
        if name not in self.fused:
            return lin, slice(0, out_features(lin))
        start = 0
        for r, n in self.row_sizes(sub, name).items():
            if r == role:
                return lin, slice(start, start + n)
            start += n
        raise LayoutError(f"{self.family}: {name} holds no rows of role {role!r}")

    def out_rows(self, sub: nn.Module, role: str) -> int:
        s = self.role_rows(sub, role)[1]
        return s.stop - s.start

    def missing(self) -> list[str]:
        """Module paths this layout expects and the model lacks (empty: the layout fits)."""
        base = getattr(self.model, self.backbone, None)
        if base is None:
            return [self.backbone]
        want = [(base, f"{self.backbone}.{n}", n) for n in (self.layers_name, self.embed_name, self.norm_name)]
        want.append((self.model, self.head_name, self.head_name))
        out = [path for obj, path, n in want if not hasattr(obj, n)]
        if out:
            return out
        for i, layer in enumerate(self.layers):
            p = f"{self.backbone}.{self.layers_name}.{i}"
            names = (self.input_norm_name, self.post_norm_name, self.attn_name, self.mlp_name)
            out += [f"{p}.{n}" for n in names if not hasattr(layer, n)]
            for kind in ("attention", "mlp"):
                sub = self.sublayer(layer, kind) if hasattr(layer, self.sublayer_name(kind)) else None
                out += [f"{p}.{self.sublayer_name(kind)}.{n}" for n in self.linear_names(kind)
                        if sub is not None and not hasattr(sub, n)]
        return out


def out_features(lin: nn.Module) -> int:
    """Output features of a Linear or of a module standing in for one (low-rank pair, 2:4 Linear)."""
    return lin.out_features if hasattr(lin, "out_features") else lin.weight.shape[0]
