"""Dynamic depth's serving module: a decoder layer that runs its sublayer on the routed tokens only (gather,
run, scatter back), keeping K/V complete for skipped tokens. See :mod:`prunelib.pruning.dynamic_depth`."""
from __future__ import annotations


import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, StaticCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from prunelib.model.adapter import ModelAdapter, role_output, rope
from prunelib.model.adapters import ATTN_ROLES, FamilyAdapter
from prunelib.model.adapters.base import out_features
from prunelib.model.adapters.llama import LlamaAdapter
from prunelib.model.models import fingerprint


_MASK32 = 0xFFFFFFFF
CACHES = (DynamicCache, StaticCache)


class RoutedDecoderLayer(nn.Module):
    """A decoder layer whose tokens run the layer (or its MLP) only when the router picks them.

    Keeps the wrapped layer's norms, attention and MLP under the names its family adapter
    (``family``, a class of :mod:`prunelib.model.adapters`; default Llama) gives them, so the adapter
    still recognises it; the routed attention computes the q/k/v/o projections by their roles:
    ``rows[role]`` = (Linear name, first, last + 1 output row), a block of a fused Linear
    (Phi-3's ``qkv_proj``) where the family fuses them, so q runs on the routed tokens only.
    """

    def __init__(self, layer: nn.Module, router: nn.Module, variant: str, skip: float, threshold: float,
                 family: type[FamilyAdapter] = LlamaAdapter, rows: dict | None = None):
        super().__init__()
        self.names = (family.attn_name, family.mlp_name, family.input_norm_name, family.post_norm_name)
        if rows is None:  # separate q/k/v/o Linears: each role is all of its Linear's rows
            attn = getattr(layer, family.attn_name)
            rows = {r: (family.linear_of[r], 0, out_features(getattr(attn, family.linear_of[r]))) for r in ATTN_ROLES}
        self.rows = rows
        for name in self.names:
            setattr(self, name, getattr(layer, name))
        self.router, self.variant, self.skip, self.threshold = router, variant, skip, float(threshold)
        # [phase (prefill, decode), (run, skipped)] non-padding tokens since the last reset
        self.register_buffer("counts", torch.zeros(2, 2, dtype=torch.long), persistent=False)
        self.last_phase = None

    def extra_repr(self) -> str:
        return f"variant={self.variant}, skip={self.skip:.4g}, threshold={self.threshold:.4g}"

    def reset_stats(self) -> None:
        self.counts.zero_()
        self.last_phase = None

    def stats(self, phase: str | None = None) -> tuple[int, int]:
        """Non-padding tokens (run, skipped) of ``phase`` since the last reset; None: the phase that ran last."""
        phase = _check_phase(phase) or self.last_phase or "prefill"
        run, skipped = self.counts[PHASES.index(phase)].tolist()
        return run, skipped

    def shape_overrides(self) -> dict:
        """Token fractions that ran, in the phase that ran last (dense if nothing ran)."""
        run, skipped = self.stats()
        f = run / (run + skipped) if run + skipped else 1.0
        out = {"mlp_tokens": f} if self.variant == "mlp" else {"attn_tokens": f, "mlp_tokens": f}
        out["router"] = int(isinstance(self.router, LinearRouter))
        return out

    def _scores(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The router's scores of the normed tokens ``x`` (positions: for the random router; default 0..S-1)."""
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)[None]
        return self.router(x, positions)

    def route(self, x: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Which tokens run ([B, S] bool): score above the threshold, non-padding (positions: for the random router)."""
        return (self._scores(x, positions) > self.threshold) & valid

    def scores(self, hidden_states, position_ids=None, **_) -> torch.Tensor | None:
        """The router's scores of the tokens of ``hidden_states`` (no cache) as :meth:`forward` computes them, without
        running the layer: for the ``layer`` variant, which routes on the layer's input; None for ``mlp``, which routes
        on the attention's output."""
        if self.variant != "layer":
            return None
        return self._scores(getattr(self, self.names[2])(hidden_states), position_ids)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        if past_key_values is not None and not isinstance(past_key_values, CACHES):
            raise ValueError(f"dynamic depth cannot use a {type(past_key_values).__name__}; "
                             f"allowed: {', '.join(c.__name__ for c in CACHES)} or none")
        h = hidden_states
        B, S = h.shape[:2]
        attn_mod, mlp, norm_in, norm_post = (getattr(self, n) for n in self.names)
        past = 0 if past_key_values is None else past_key_values.get_seq_length(attn_mod.layer_idx)
        if position_ids is None:
            position_ids = torch.arange(S, device=h.device)[None] + past
        valid = _valid_tokens(attention_mask, B, S, past, h.device)
        phase = 1 if S == 1 else 0
        self.last_phase = PHASES[phase]
        x = norm_in(h)
        if self.variant == "layer":
            run = self.route(x, valid, position_ids)
            self.counts[phase] += torch.stack([run.sum(), (valid & ~run).sum()])
            return self._routed_layer(h, x, run, attention_mask, past, past_key_values, position_embeddings)
        attn, _ = attn_mod(hidden_states=x, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=past_key_values, use_cache=use_cache,
                                 position_embeddings=position_embeddings, **kwargs)
        mid = h + attn
        x = norm_post(mid)
        run = self.route(x, valid, position_ids)
        self.counts[phase] += torch.stack([run.sum(), (valid & ~run).sum()])
        picked = _gather_index(run)
        if picked is None:
            return mid
        b, s = picked[0]
        return mid.index_put((b, s), mid[b, s] + mlp(x[b, s]))

    def _proj(self, attn: nn.Module, role: str, x: torch.Tensor) -> torch.Tensor:
        name, start, stop = self.rows[role]
        return role_output(getattr(attn, name), slice(start, stop), x)

    def _routed_layer(self, h, x, run, attention_mask, past, past_key_values, position_embeddings):
        """Keys/values for every token, the rest of the layer for the routed tokens only."""
        attn, mlp, _, norm_post = (getattr(self, n) for n in self.names)
        B, S, _ = h.shape
        hd = attn.head_dim
        cos, sin = (t.expand(B, -1, -1) for t in position_embeddings)
        k = self._proj(attn, "k", x).view(B, S, -1, hd).transpose(1, 2)
        v = self._proj(attn, "v", x).view(B, S, -1, hd).transpose(1, 2)
        k = rope(k, cos[:, None], sin[:, None])
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, attn.layer_idx)
        picked = _gather_index(run)
        if picked is None:
            return h
        (b, s), counts = picked
        # pack the routed queries as [rows with a routed token, most routed tokens in a row]
        rows = torch.tensor([i for i, c in enumerate(counts) if c], device=h.device)
        row = (run.any(1).cumsum(0) - 1)[b]
        slot = (run.cumsum(1) - 1)[b, s]
        K = max(counts)
        q = self._proj(attn, "q", x[b, s]).view(b.numel(), -1, hd)
        q = rope(q, cos[b, s, None], sin[b, s, None])
        q_pad = q.new_zeros(rows.numel(), K, *q.shape[1:])
        q_pad[row, slot] = q
        mask = _full_mask(attention_mask, B, S, k.shape[2], past, h.device, attn.config._attn_implementation, h.dtype)
        # empty slots attend to every key (True / 0.0): finite outputs, never scattered back
        mask_pad = mask.new_full((rows.numel(), 1, K, mask.shape[-1]), mask.dtype == torch.bool)
        mask_pad[row, :, slot] = mask[b, :, s]
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        out, _ = interface(attn, q_pad.transpose(1, 2), k[rows], v[rows], mask_pad, dropout=0.0, scaling=attn.scaling)
        out = self._proj(attn, "o", out.reshape(rows.numel(), K, -1)[row, slot])
        mid = h[b, s] + out
        return h.index_put((b, s), mid + mlp(norm_post(mid)))


def _gather_index(run: torch.Tensor):
    """((b, s), routed count per sequence) of the routed tokens, or None if none runs.

    The counts come to the host (the one sync of a routed layer: kernel shapes depend on
    them); ``nonzero_static`` then finds the tokens without a second sync.
    """
    counts = run.sum(1).tolist()
    total = sum(counts)
    if total == 0:
        return None
    return torch.nonzero_static(run, size=total).unbind(1), counts


def _valid_tokens(attention_mask, B: int, S: int, past, device) -> torch.Tensor:
    """Non-padding tokens: a real token always attends to itself (its own cache slot, ``past + i``)."""
    if attention_mask is None:
        return torch.ones(B, S, dtype=torch.bool, device=device)
    if attention_mask.dim() != 4:
        raise ValueError(f"dynamic depth needs a 4-D attention mask ('eager' or 'sdpa'), got {attention_mask.dim()}-D")
    i = torch.arange(S, device=attention_mask.device)
    diag = attention_mask[:, 0, i, i + past].expand(B, S)
    return diag if diag.dtype == torch.bool else diag == 0


def _full_mask(attention_mask, B: int, S: int, kv: int, past, device, implementation: str, dtype) -> torch.Tensor:
    """The [B, 1, S, kv] mask of the new queries: the model's own, or the causal one it left implicit."""
    if attention_mask is not None:
        return attention_mask.expand(B, -1, -1, -1)
    i = torch.arange(S, device=device)[:, None] + past
    causal = (torch.arange(kv, device=device)[None] <= i).expand(B, 1, S, kv)
    if implementation == "eager":
        return torch.zeros((), dtype=dtype, device=device).masked_fill(~causal, torch.finfo(dtype).min)
    return causal


VARIANTS = ("layer", "mlp")


PHASES = ("prefill", "decode")


def _check_phase(phase):
    if phase is not None and phase not in PHASES:
        raise ValueError(f"phase {phase!r} is not known; allowed: None (the phase that ran last), {PHASES}")
    return phase


def _check_model(model) -> ModelAdapter:
    a = ModelAdapter(model)
    impl = a.config._attn_implementation
    if impl not in ("eager", "sdpa"):
        raise ValueError(f"attention implementation {impl!r} is not supported by dynamic depth; "
                         "allowed: 'eager', 'sdpa'")
    if any(isinstance(layer, RoutedDecoderLayer) for layer in a.layers):
        raise ValueError("the model already has routed layers; attach routers to the dense model")
    if any(getattr(a.attn(i), "sliding_window", None) for i in range(len(a.layers))):
        raise ValueError("sliding-window attention is not supported by dynamic depth; allowed: full attention")
    if any(a.attn(i) is None or a.mlp(i) is None for i in range(len(a.layers))):
        raise ValueError("dynamic depth needs every layer with its attention and MLP (no removed sublayers)")
    return a


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not known; allowed: {VARIANTS}")


def attach(model, routers: Routers):
    """A copy of ``model`` (left untouched) whose routed layers skip tokens as ``routers`` decide."""
    a = _check_model(model)
    fp = fingerprint(model)
    if routers.fingerprint != fp or routers.hidden != a.hidden_size:
        raise ValueError(f"these routers were trained for model {routers.fingerprint} (hidden {routers.hidden}), "
                         f"not for this model {fp} (hidden {a.hidden_size}); train routers for it")
    new = copy.deepcopy(model)
    na = ModelAdapter(new)
    dev = next(new.parameters()).device
    for j, i in enumerate(routers.layers):
        if routers.weight is None:
            router = RandomRouter(routers.seed * 100_003 + i)
        else:
            router = LinearRouter(routers.weight[j].to(dev), routers.bias[j].to(dev))
        spans = {r: na.role_rows(i, r)[1] for r in ATTN_ROLES}
        rows = {r: (na.linear_name(r), sl.start, sl.stop) for r, sl in spans.items()}
        na.layers[i] = RoutedDecoderLayer(na.layers[i], router, routers.variant, routers.skip,
                                          float(routers.threshold[j]), type(na.fam), rows)
    return new


@dataclass
class Routers:
    """Fitted routers of one model: per routed layer a linear score and its threshold.

    ``weight``/``bias`` are None for the random baseline (hashed scores in [0, 1), seeded).
    """

    fingerprint: str
    hidden: int
    variant: str  # "layer" or "mlp"
    layers: tuple  # routed layer indices
    skip: float  # target skip rate r of each routed layer
    threshold: torch.Tensor  # [len(layers)] a token runs iff its score > threshold
    weight: torch.Tensor | None = None  # [len(layers), hidden]
    bias: torch.Tensor | None = None  # [len(layers)]
    seed: int = 0


class LinearRouter(nn.Linear):
    """Linear(hidden, 1): a score per token; higher means the layer changes the token more."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__(weight.numel(), 1, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.weight.copy_(weight.reshape(1, -1))
            self.bias.copy_(bias.reshape(1))

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x).squeeze(-1)


def _mix32(x):
    """A 32-bit integer hash (xorshift-multiply rounds); products stay below 2**63, so int64 never overflows."""
    for mult in (0x7FEB352D, 0x5BD1E995):
        x = x ^ (x >> 16)
        x = (x * mult) & _MASK32
    return x ^ (x >> 15)


class RandomRouter(nn.Module):
    """The random baseline: a score uniform in [0, 1) hashed from (key, token position); no GEMM, no state."""

    def __init__(self, key: int):
        super().__init__()
        self.key = _mix32(key & _MASK32)

    def extra_repr(self) -> str:
        return f"key={self.key}"

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = _mix32((positions.expand(x.shape[:-1]).long() & _MASK32) ^ self.key)
        return (h >> 8).float() / 2**24  # 24 bits: exact in float32, < 1
