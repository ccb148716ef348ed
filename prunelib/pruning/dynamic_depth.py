"""Dynamic depth: a router decides, token by token, whether a decoder layer (or its MLP) runs.

Method (Mixture-of-Depths, Raposo et al. 2024, with a router fitted after training as
in router-tuning / "skip layers per token" work): every routed layer gets a router
``Linear(hidden, 1)`` on its normed input. It is fitted on calibration text to predict
how much the layer changes each token, t = ||h_out - h_in|| / ||h_in|| measured on the
dense model (for the MLP variant, h_in is the MLP's residual input), by ridge least
squares (closed form from normal equations accumulated over the calibration tokens; a
penalty of 0.3 x the mean feature energy ranked held-out tokens best among 0.001..1).
The relative update norm replaces the Block-Influence-style 1 - cos(h_in, h_out), which
ignores changes of the norm (measured with the earlier top-k routing on SmolLM2-135M at
s = 0.1, 8 x 128 calibration tokens: the 1 - cos router lost to random routing for MLP
skipping, the relative norm beat it).

- ``dyn_depth_router``: a skipped token skips the whole layer (attention and MLP).
- ``dyn_depth_router_mlp``: a skipped token skips only the MLP sublayer.
- ``dyn_depth_random`` / ``dyn_depth_random_mlp``: the random *baselines* of the two
  routers, same skip rate of layers / MLP sublayers, tokens chosen at random. The "score" is a hash of
  (seed, layer, token position) mapped to [0, 1): a pure function of its inputs, so the
  same sequence gets the same routes whatever ran before, in a full forward as in prefill
  and cached decode, and another seed draws other routes. It does not look at content,
  so every sequence skips the same positions of a layer (for a given seed).

Routing is causal and capacity-free: in every phase (full-sequence scoring, prefill in
any chunking, cached decode) a token runs the (sub)layer iff its router score exceeds a
fixed per-layer threshold. A token's score depends on its own hidden state only, which
depends on itself and earlier tokens, so a later token never changes an earlier route,
and the model that is scored is the model that serves. (Earlier versions kept each
sequence's top-k tokens in prefill, MoD's training-time capacity: a token's route then
depended on later tokens, and the full forward disagreed with prefill + decode.)
Thresholds: the r-quantile of each layer's router scores on the calibration tokens,
fitted layer by layer on the routed model (layer j's scores are taken with the
thresholds of layers < j already in force), so the calibration text skips r of its
tokens per routed layer. Other text skips more or fewer: the realised rate is measured,
per phase, and reported (``realised_sparsity``), never assumed. For the random baseline
the threshold is r itself (its scores are uniform).

Sparsity unit: the fraction s of token-layer pairs skipped over the whole model
(token-MLP pairs for the MLP variant). Routed layers: all but the first and the last
(ShortGPT finds their Block Influence the largest; they stay dense), so each routed
layer targets a skip rate r = s * L / (L - 2); r must lie in [0, 1), hence the largest
sparsity is just under (L - 2) / L.

How the speedup is realised (M of the skipped sublayers shrinks): the routed tokens are
gathered, the (sub)layer runs on them alone and the result is scattered back into the
residual stream; skipped tokens pass through unchanged. Keys and values of skipped
tokens stay available to later tokens: for every token, routed or not, the layer still
computes input_layernorm(h), k_proj and v_proj (with the rotary embedding of its own
position) and writes them to the KV cache; only q_proj, the attention-product rows of
the skipped queries, o_proj and the MLP are skipped. Causal and padding masks are the
model's own (their rows gathered for the routed queries). In a padded batch the routed
queries of each sequence are packed to the longest row, so B > 1 computes some empty
attention rows that the cost model does not count (B = 1 is exact). Supported:
Llama-family layouts with "eager" or "sdpa" attention, no sliding window, a
``DynamicCache``, a ``StaticCache`` or none.

Host-device synchronisation: routing decisions live on the device and nothing branches
on them, except that gathering the routed tokens needs their number on the host: each
routed layer reads its per-sequence routed counts once (one sync per routed layer, in
prefill and in decode alike; ``nonzero_static`` then gathers without a second one). A
decode step that really skips compute cannot be captured in a CUDA graph (its kernel
shapes depend on the route); a capturable masked variant would compute every token and
save nothing, so none is offered: :func:`graph_safe` says so.

Realised sparsity, per phase: each routed layer counts the non-padding tokens it ran and
skipped since ``reset_stats()``, separately for prefill (more than one new token per
sequence) and decode (one new token per sequence; a one-token prompt counts as decode).
``shape_overrides()`` reports the fractions of the phase that ran last, so a decode step
timed after its prefill is costed with the decode steps' own routing;
:func:`realised_sparsity` gives either phase (after :func:`prune` the stats hold the
calibration pass). Routers persist as a :class:`Routers` object keyed by the model
fingerprint.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, StaticCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from ..adapter import ModelAdapter, role_output, rope
from ..adapters import ATTN_ROLES, FamilyAdapter
from ..adapters.base import out_features
from ..adapters.llama import LlamaAdapter
from ..models import fingerprint
from .registry import register

VARIANTS = ("layer", "mlp")
PHASES = ("prefill", "decode")
CACHES = (DynamicCache, StaticCache)
RIDGE = 0.3  # ridge penalty, relative to the mean diagonal of the normal equations


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


def routed_layers(n_layers: int) -> list[int]:
    """All layers but the first and the last."""
    return list(range(1, n_layers - 1))


def layer_skip_rate(model, sparsity: float) -> float:
    """Per-routed-layer skip rate r = s * L / L_routed for a model-wide sparsity s."""
    L = len(ModelAdapter(model).layers)
    n = len(routed_layers(L))
    r = sparsity * L / n if n else math.inf
    if not 0 <= r < 1:
        raise ValueError(f"sparsity {sparsity!r} gives a per-layer skip rate {r:.4g} over {n} routed layers of {L}; "
                         f"allowed 0 <= skip rate < 1, i.e. 0 <= sparsity < {n / L:.4g}")
    return r


def _max_sparsity(model) -> float:
    L = len(ModelAdapter(model).layers)
    return len(routed_layers(L)) / L * (1 - 1e-6)


class LinearRouter(nn.Linear):
    """Linear(hidden, 1): a score per token; higher means the layer changes the token more."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__(weight.numel(), 1, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.weight.copy_(weight.reshape(1, -1))
            self.bias.copy_(bias.reshape(1))

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x).squeeze(-1)


_MASK32 = 0xFFFFFFFF


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


class RoutedDecoderLayer(nn.Module):
    """A decoder layer whose tokens run the layer (or its MLP) only when the router picks them.

    Keeps the wrapped layer's norms, attention and MLP under the names its family adapter
    (``family``, a class of :mod:`prunelib.adapters`; default Llama) gives them, so the adapter
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

    def route(self, x: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Which tokens run ([B, S] bool): score above the threshold, non-padding (positions: for the random router)."""
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)[None]
        return (self.router(x, positions) > self.threshold) & valid

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


def _collect(model, calibration, layers, variant, on_batch):
    """Run the model over the calibration batches; ``on_batch(j, x, h_in, h_out)`` per routed layer j.

    ``x`` is the router input (the normed input of the layer, or of its MLP), ``h_in`` the
    residual stream entering that (sub)layer and ``h_out`` the layer's output.
    """
    a = ModelAdapter(model)
    dev = next(model.parameters()).device
    seen, hooks = {}, []
    for j, i in enumerate(layers):
        layer = a.layers[i]
        norm = a.norm(i, "input" if variant == "layer" else "post")
        hooks.append(norm.register_forward_hook(lambda mod, args, out, j=j: seen.__setitem__(j, (out, args[0]))))
        hooks.append(layer.register_forward_hook(
            lambda mod, args, out, j=j: on_batch(j, *seen[j], out[0] if isinstance(out, tuple) else out)))
    try:
        with torch.inference_mode():
            for ids in calibration.batches(4):
                model(ids.to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()


def train_routers(model, calibration, sparsity: float, variant: str = "layer") -> Routers:
    """Fit one linear router per routed layer of ``model`` (left untouched) for a model-wide ``sparsity``.

    Targets: ||h_out - h_in|| / ||h_in|| of each token on the dense model; ridge least squares
    on the normed (sub)layer input. Thresholds: the skip-rate quantile of the scores on the
    calibration tokens, fitted layer by layer on the routed model.
    """
    _check_variant(variant)
    a = _check_model(model)
    skip = layer_skip_rate(model, sparsity)
    layers = routed_layers(len(a.layers))
    D = a.hidden_size
    A = torch.zeros(len(layers), D + 1, D + 1, dtype=torch.float64)
    rhs = torch.zeros(len(layers), D + 1, dtype=torch.float64)

    def accumulate(j, x, h_in, h_out):
        z = torch.cat([x.reshape(-1, D).double(), x.new_ones(x.shape[0] * x.shape[1], 1).double()], 1)
        h_in = h_in.reshape(-1, D).double()
        t = (h_out.reshape(-1, D).double() - h_in).norm(dim=-1) / h_in.norm(dim=-1)
        A[j] += (z.T @ z).cpu()
        rhs[j] += (z.T @ t).cpu()

    _collect(model, calibration, layers, variant, accumulate)
    reg = RIDGE * A.diagonal(dim1=1, dim2=2)[:, :D].mean(1)
    eye = torch.eye(D + 1, dtype=torch.float64)
    eye[D, D] = 0  # the bias is not penalised
    # one solve per layer: the batched solve of this torch build's MKL fails on these systems
    w = torch.stack([torch.linalg.solve(A[j] + reg[j] * eye, rhs[j]) for j in range(len(layers))])
    dtype = next(model.parameters()).dtype
    routers = Routers(fingerprint(model), D, variant, tuple(layers), skip, torch.full((len(layers),), -math.inf),
                      w[:, :D].to(dtype), w[:, D].to(dtype))
    if skip > 0:
        routers.threshold = _calibrate_thresholds(model, routers, calibration)
    return routers


def random_routers(model, sparsity: float, variant: str = "layer", seed: int = 0) -> Routers:
    """Routers of the random baseline: uniform scores, so the threshold is the skip rate itself."""
    _check_variant(variant)
    a = _check_model(model)
    skip = layer_skip_rate(model, sparsity)
    layers = routed_layers(len(a.layers))
    return Routers(fingerprint(model), a.hidden_size, variant, tuple(layers), skip,
                   torch.full((len(layers),), skip), seed=seed)


class _Stop(Exception):
    pass


def _first_layer_inputs(model, ids):
    """(hidden states, keyword arguments) that ``model`` feeds its first decoder layer for ``ids``."""
    seen = {}

    def grab(mod, args, kwargs):
        seen["h"], seen["kw"] = args[0], kwargs
        raise _Stop

    hook = ModelAdapter(model).layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(ids, use_cache=False)
    except _Stop:
        pass
    finally:
        hook.remove()
    return seen["h"], seen["kw"]


def _calibrate_thresholds(model, routers: Routers, calibration) -> torch.Tensor:
    """Per routed layer, the r-quantile of its router scores on the calibration tokens of the routed model.

    Layer by layer over all calibration batches: layer j's scores are collected with the
    thresholds of layers < j in force, then its threshold is set and its outputs computed.
    """
    routed = attach(model, routers)
    dev = next(routed.parameters()).device
    out = []
    with torch.inference_mode():
        states = [_first_layer_inputs(routed, ids.to(dev)) for ids in calibration.batches(4)]
        for layer in ModelAdapter(routed).layers:
            if isinstance(layer, RoutedDecoderLayer):
                scores = []
                hook = layer.router.register_forward_hook(
                    lambda mod, args, o: scores.append(o.detach().float().reshape(-1).cpu()))
                try:
                    for h, kw in states:
                        layer(h, **kw)
                finally:
                    hook.remove()
                layer.threshold = float(torch.quantile(torch.cat(scores), routers.skip))
                out.append(layer.threshold)
            states = [(layer(h, **kw), kw) for h, kw in states]
    return torch.tensor(out, dtype=torch.float64)


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


def _routed(model) -> list[RoutedDecoderLayer]:
    return [m for m in ModelAdapter(model).layers if isinstance(m, RoutedDecoderLayer)]


def graph_safe(model) -> tuple[bool, str]:
    """Whether a decode step of ``model`` can be captured in a CUDA graph, and why (not)."""
    if not _routed(model):
        return True, "no routed layers"
    return False, ("dynamic depth skips compute per token: each routed layer needs its routed-token count on the host "
                   "to size its kernels (one sync per layer), which a CUDA graph cannot capture; a capturable masked "
                   "variant would compute every token and save nothing, so decode runs eagerly")


def reset_stats(model) -> None:
    for layer in _routed(model):
        layer.reset_stats()


def realised_sparsity(model, phase: str | None = None) -> float:
    """Fraction of token-layer (token-MLP) pairs skipped since the last ``reset_stats()``; 0 if none ran.

    ``phase``: "prefill", "decode", or None for the phase that ran last (what ``shape_overrides`` costs).
    """
    _check_phase(phase)
    routed = _routed(model)
    if phase is None:
        phase = next((layer.last_phase for layer in routed if layer.last_phase), "prefill")
    stats = [layer.stats(phase) for layer in routed]
    tokens = max((run + skipped for run, skipped in stats), default=0)
    if tokens == 0:
        return 0.0
    return sum(skipped for _, skipped in stats) / (tokens * len(ModelAdapter(model).layers))


def _removed(model, calibration) -> dict:
    """Realised sparsity and per-layer skip rates of a routed model on the calibration data (full forward)."""
    removed = {"realised_sparsity": None, "layer_skip": None}
    if calibration is None:
        return removed
    reset_stats(model)
    dev = next(model.parameters()).device
    with torch.inference_mode():
        for ids in calibration.batches(4):
            model(ids.to(dev), use_cache=False)
    per_layer = {}
    for i, layer in enumerate(ModelAdapter(model).layers):
        if isinstance(layer, RoutedDecoderLayer):
            run, skipped = layer.stats("prefill")
            per_layer[i] = skipped / (run + skipped)
    return {"realised_sparsity": realised_sparsity(model, "prefill"), "layer_skip": per_layer}


def _method(var: str, random: bool):
    def fn(model, sparsity, ctx):
        if sparsity == 0:  # nothing to skip: the dense model
            return copy.deepcopy(model), {"realised_sparsity": 0.0, "layer_skip": {}, "variant": var}
        if random:
            routers = random_routers(model, sparsity, var, ctx.seed)
        else:
            routers = train_routers(model, ctx.calibration, sparsity, var)
        new = attach(model, routers)
        removed = _removed(new, ctx.calibration)
        removed.update(variant=var, skip=routers.skip, routed_layers=list(routers.layers))
        return new, removed

    return fn


LAYER_UNIT, MLP_UNIT = "token-layer pairs", "token-MLP pairs"
register("dyn_depth_router", "dynamic_depth",
         "linear router on the normed layer input fitted to ||h_out - h_in|| / ||h_in||; tokens scoring above the "
         "calibrated threshold run the layer (causal)", unit=LAYER_UNIT, baseline="dyn_depth_random",
         needs_calibration=True, max_sparsity=_max_sparsity)(_method("layer", random=False))
register("dyn_depth_router_mlp", "dynamic_depth",
         "linear router on the normed MLP input fitted to ||h_out - h_mid|| / ||h_mid||; tokens scoring above the "
         "calibrated threshold run the MLP (causal)", unit=MLP_UNIT, baseline="dyn_depth_random_mlp",
         needs_calibration=True, max_sparsity=_max_sparsity)(_method("mlp", random=False))
register("dyn_depth_random", "dynamic_depth",
         "random baseline: the same skip rate of whole layers, each token's route hashed from (seed, layer, position)",
         unit=LAYER_UNIT, baseline=None, needs_calibration=False, max_sparsity=_max_sparsity)(
    _method("layer", random=True))
register("dyn_depth_random_mlp", "dynamic_depth",
         "random baseline of the MLP router: the same skip rate of MLP sublayers, each token's route hashed from "
         "(seed, layer, position)", unit=MLP_UNIT, baseline=None, needs_calibration=False,
         max_sparsity=_max_sparsity)(_method("mlp", random=True))
