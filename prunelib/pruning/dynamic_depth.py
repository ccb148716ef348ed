"""Dynamic depth: a router decides, token by token, whether a decoder layer (or its MLP) runs.

Method (Mixture-of-Depths, Raposo et al. 2024, with a router fitted after training as
in router-tuning / "skip layers per token" work): every routed layer gets a router
``Linear(hidden, 1)`` on its normed input. It is fitted on calibration text to predict
how much the layer changes each token, t = ||h_out - h_in|| / ||h_in|| measured on the
dense model (for the MLP variant, h_in is the MLP's residual input), by ridge least
squares (closed form from normal equations accumulated over the calibration tokens; a
penalty of 0.3 x the mean feature energy ranked held-out tokens best among 0.001..1).
The relative update norm replaces the Block-Influence-style 1 - cos(h_in, h_out), which
ignores changes of the norm: on SmolLM2-135M at s = 0.1 (8 x 128 calibration tokens) the
1 - cos router lost to random routing for MLP skipping (loss 4.654 vs 4.620; dense 4.000),
the relative norm beat it (4.574) and also did better for whole layers (4.878 vs 4.899;
random 5.169). The MLP router's edge is marginal: fitted on 4 x 128 tokens it lost to
random (4.989 vs 4.777), while the layer router wins clearly.

- ``dyn_depth_router``: a skipped token skips the whole layer (attention and MLP).
- ``dyn_depth_router_mlp``: a skipped token skips only the MLP sublayer.
- ``dyn_depth_random``: the random *baseline*, same capacities, tokens chosen at random
  (seeded by ``ctx.seed``); ``options["variant"] = "mlp"`` skips MLPs instead of layers.

Capacity (MoD): in prefill (more than one new token per sequence) each sequence runs its
top k = ceil((1 - r) * n) tokens by router score, n = its non-padding tokens, so the
realised skip rate equals r by construction (up to rounding k to whole tokens, < 1/n).
Padding is known from the attention mask only: a padded batch without one (lm-eval's
loglikelihood calls) counts pad tokens as tokens, in the capacity and in the counters.
As in MoD, a top-k over the prompt lets a token's routing depend on later tokens'
scores. In decode (one token per sequence) the
token runs if its score exceeds a threshold: the r-quantile of the router scores of the
calibration tokens, collected on the routed model in prefill.

Sparsity unit: the fraction s of token-layer pairs skipped over the whole model
(token-MLP pairs for the MLP variant). Routed layers: all but the first and the last
(ShortGPT finds their Block Influence the largest; they stay dense), so each routed
layer skips r = s * L / (L - 2) of the tokens; r must lie in [0, 1), hence the largest
sparsity is just under (L - 2) / L.

How the speedup is realised (M of the skipped sublayers shrinks): the routed tokens are
gathered, the (sub)layer runs on them alone and the result is scattered back into the
residual stream; skipped tokens pass through unchanged. Keys and values of skipped
tokens stay available to later tokens: for every token, routed or not, the layer still
computes input_layernorm(h), k_proj and v_proj (with the rotary embedding of its own
position) and writes them to the KV cache; only q_proj, the attention-product rows of
the skipped queries, o_proj and the MLP are skipped. Causal and padding masks are the
model's own (their rows gathered for the routed queries). The router runs inside the
forward, so it is timed with the model. Supported: Llama-family layouts with "eager" or
"sdpa" attention, no sliding window, a DynamicCache (or none).

Realised sparsity: each routed layer counts the non-padding tokens it ran and skipped
since ``reset_stats()``; :func:`realised_sparsity` sums them and ``shape_overrides()``
reports the fractions to the cost model (after :func:`prune` they hold the calibration
pass). Routers persist as a :class:`Routers` object keyed by the model fingerprint.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half

from ..adapter import ModelAdapter
from ..models import fingerprint
from .registry import register

VARIANTS = ("layer", "mlp")
RIDGE = 0.3  # ridge penalty, relative to the mean diagonal of the normal equations


@dataclass
class Routers:
    """Fitted routers of one model: per routed layer a linear score and a decode threshold.

    ``weight``/``bias`` are None for the random baseline (scores uniform in [0, 1), seeded).
    """

    fingerprint: str
    hidden: int
    variant: str  # "layer" or "mlp"
    layers: tuple  # routed layer indices
    skip: float  # skip rate r of each routed layer
    threshold: torch.Tensor  # [len(layers)] decode thresholds
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).squeeze(-1)


class RandomRouter(nn.Module):
    """The random baseline: uniform scores in [0, 1) from a seeded generator (no GEMM)."""

    def __init__(self, seed: int):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rand(x.shape[:-1], generator=self.generator).to(x.device)


class RoutedDecoderLayer(nn.Module):
    """A decoder layer whose tokens run the layer (or its MLP) only when the router picks them.

    Keeps ``input_layernorm``, ``post_attention_layernorm``, ``self_attn`` and ``mlp`` of the
    wrapped layer, so the adapter still recognises it.
    """

    def __init__(self, layer: nn.Module, router: nn.Module, variant: str, skip: float, threshold: float):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.self_attn, self.mlp = layer.self_attn, layer.mlp
        self.router, self.variant, self.skip, self.threshold = router, variant, skip, float(threshold)
        self.register_buffer("counts", torch.zeros(2, dtype=torch.long), persistent=False)  # run, skipped

    def extra_repr(self) -> str:
        return f"variant={self.variant}, skip={self.skip:.4g}, threshold={self.threshold:.4g}"

    def reset_stats(self) -> None:
        self.counts.zero_()

    def stats(self) -> tuple[int, int]:
        """Non-padding tokens (run, skipped) since the last reset."""
        run, skipped = self.counts.tolist()
        return run, skipped

    def shape_overrides(self) -> dict:
        run, skipped = self.stats()
        f = run / (run + skipped) if run + skipped else 1.0
        out = {"mlp_tokens": f} if self.variant == "mlp" else {"attn_tokens": f, "mlp_tokens": f}
        out["router"] = int(isinstance(self.router, LinearRouter))
        return out

    def route(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Which tokens run ([B, S] bool) given the router input ``x`` and the non-padding tokens."""
        score = self.router(x)
        if x.shape[1] == 1:  # decode: calibrated threshold
            return (score > self.threshold) & valid
        n = valid.sum(1, keepdim=True).double()
        k = torch.ceil((1 - self.skip) * n - 1e-9)
        order = score.float().masked_fill(~valid, -math.inf).argsort(dim=1, descending=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(x.shape[1], device=x.device).expand_as(order))
        return (rank < k) & valid

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        if past_key_values is not None and not isinstance(past_key_values, DynamicCache):
            raise ValueError(f"dynamic depth needs a DynamicCache (or none), got {type(past_key_values).__name__}")
        h = hidden_states
        valid = _valid_tokens(attention_mask, *h.shape[:2], h.device)
        x = self.input_layernorm(h)
        if self.variant == "layer":
            run = self.route(x, valid)
            self._count(run, valid)
            if bool((run | ~valid).all()):
                return self._dense(h, x, attention_mask, position_ids, past_key_values, use_cache,
                                   position_embeddings, **kwargs)
            return self._routed_layer(h, x, run, attention_mask, past_key_values, position_embeddings)
        attn, _ = self.self_attn(hidden_states=x, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=past_key_values, use_cache=use_cache,
                                 position_embeddings=position_embeddings, **kwargs)
        mid = h + attn
        x = self.post_attention_layernorm(mid)
        run = self.route(x, valid)
        self._count(run, valid)
        if bool((run | ~valid).all()):
            return mid + self.mlp(x)
        b, s = run.nonzero(as_tuple=True)
        return mid.index_put((b, s), mid[b, s] + self.mlp(x[b, s]))

    def _count(self, run, valid):
        self.counts += torch.stack([run.sum(), (valid & ~run).sum()])

    def _dense(self, h, x, attention_mask, position_ids, past_key_values, use_cache, position_embeddings, **kwargs):
        attn, _ = self.self_attn(hidden_states=x, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=past_key_values, use_cache=use_cache,
                                 position_embeddings=position_embeddings, **kwargs)
        mid = h + attn
        return mid + self.mlp(self.post_attention_layernorm(mid))

    def _routed_layer(self, h, x, run, attention_mask, past_key_values, position_embeddings):
        """Keys/values for every token, the rest of the layer for the routed tokens only."""
        attn = self.self_attn
        B, S, _ = h.shape
        hd = attn.head_dim
        cos, sin = (t.expand(B, -1, -1) for t in position_embeddings)
        k = attn.k_proj(x).view(B, S, -1, hd).transpose(1, 2)
        v = attn.v_proj(x).view(B, S, -1, hd).transpose(1, 2)
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, attn.layer_idx)
        b, s = run.nonzero(as_tuple=True)
        if b.numel() == 0:
            return h
        # pack the routed queries as [rows with a routed token, most routed tokens in a row]
        has = run.any(1)
        rows = has.nonzero().squeeze(1)
        row = (has.cumsum(0) - 1)[b]
        slot = (run.cumsum(1) - 1)[b, s]
        K = int(slot.max()) + 1
        q = attn.q_proj(x[b, s]).view(b.numel(), -1, hd)
        q = q * cos[b, s, None] + rotate_half(q) * sin[b, s, None]
        q_pad = q.new_zeros(rows.numel(), K, *q.shape[1:])
        q_pad[row, slot] = q
        mask = _full_mask(attention_mask, B, S, k.shape[2], h.device, attn.config._attn_implementation, h.dtype)
        # empty slots attend to every key (True / 0.0): finite outputs, never scattered back
        mask_pad = mask.new_full((rows.numel(), 1, K, mask.shape[-1]), mask.dtype == torch.bool)
        mask_pad[row, :, slot] = mask[b, :, s]
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        out, _ = interface(attn, q_pad.transpose(1, 2), k[rows], v[rows], mask_pad, dropout=0.0, scaling=attn.scaling)
        out = attn.o_proj(out.reshape(rows.numel(), K, -1)[row, slot])
        mid = h[b, s] + out
        return h.index_put((b, s), mid + self.mlp(self.post_attention_layernorm(mid)))


def _valid_tokens(attention_mask, B: int, S: int, device) -> torch.Tensor:
    """Non-padding tokens: a real token always attends to itself (the diagonal of the causal mask)."""
    if attention_mask is None:
        return torch.ones(B, S, dtype=torch.bool, device=device)
    if attention_mask.dim() != 4:
        raise ValueError(f"dynamic depth needs a 4-D attention mask ('eager' or 'sdpa'), got {attention_mask.dim()}-D")
    kv = attention_mask.shape[-1]
    i = torch.arange(S, device=attention_mask.device)
    diag = attention_mask[:, 0, i, kv - S + i].expand(B, S)
    return diag if diag.dtype == torch.bool else diag == 0


def _full_mask(attention_mask, B: int, S: int, kv: int, device, implementation: str, dtype) -> torch.Tensor:
    """The [B, 1, S, kv] mask of the new queries: the model's own, or the causal one it left implicit."""
    if attention_mask is not None:
        return attention_mask.expand(B, -1, -1, -1)
    i = torch.arange(S, device=device)[:, None] + kv - S
    causal = (torch.arange(kv, device=device)[None] <= i).expand(B, 1, S, kv)
    if implementation == "eager":
        return torch.zeros((), dtype=dtype, device=device).masked_fill(~causal, torch.finfo(dtype).min)
    return causal


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
        norm = layer.input_layernorm if variant == "layer" else layer.post_attention_layernorm
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
    on the normed (sub)layer input. Decode thresholds: the skip-rate quantile of the scores
    on the calibration tokens, measured on the routed model.
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
    """Routers of the random baseline: uniform scores, so the decode threshold is the skip rate itself."""
    _check_variant(variant)
    a = _check_model(model)
    skip = layer_skip_rate(model, sparsity)
    layers = routed_layers(len(a.layers))
    return Routers(fingerprint(model), a.hidden_size, variant, tuple(layers), skip,
                   torch.full((len(layers),), skip), seed=seed)


def _calibrate_thresholds(model, routers: Routers, calibration) -> torch.Tensor:
    routed = attach(model, routers)
    scores = [[] for _ in routers.layers]
    hooks = [routed.model.layers[i].router.register_forward_hook(
        lambda mod, args, out, j=j: scores[j].append(out.detach().float().reshape(-1).cpu()))
        for j, i in enumerate(routers.layers)]
    try:
        with torch.inference_mode():
            dev = next(routed.parameters()).device
            for ids in calibration.batches(4):
                routed(ids.to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([torch.quantile(torch.cat(s), routers.skip) for s in scores])


def attach(model, routers: Routers):
    """A copy of ``model`` (left untouched) whose routed layers skip tokens as ``routers`` decide."""
    a = _check_model(model)
    fp = fingerprint(model)
    if routers.fingerprint != fp or routers.hidden != a.hidden_size:
        raise ValueError(f"these routers were trained for model {routers.fingerprint} (hidden {routers.hidden}), "
                         f"not for this model {fp} (hidden {a.hidden_size}); train routers for it")
    new = copy.deepcopy(model)
    dev = next(new.parameters()).device
    for j, i in enumerate(routers.layers):
        if routers.weight is None:
            router = RandomRouter(routers.seed * 100_003 + i)
        else:
            router = LinearRouter(routers.weight[j].to(dev), routers.bias[j].to(dev))
        new.model.layers[i] = RoutedDecoderLayer(new.model.layers[i], router, routers.variant, routers.skip,
                                                 float(routers.threshold[j]))
    return new


def _routed(model) -> list[RoutedDecoderLayer]:
    return [m for m in ModelAdapter(model).layers if isinstance(m, RoutedDecoderLayer)]


def reset_stats(model) -> None:
    for layer in _routed(model):
        layer.reset_stats()


def realised_sparsity(model) -> float:
    """Fraction of token-layer (token-MLP) pairs skipped since the last ``reset_stats()``; 0 if none ran."""
    routed = _routed(model)
    stats = [layer.stats() for layer in routed]
    tokens = max((run + skipped for run, skipped in stats), default=0)
    if tokens == 0:
        return 0.0
    return sum(skipped for _, skipped in stats) / (tokens * len(ModelAdapter(model).layers))


def _removed(model, calibration) -> dict:
    """Realised sparsity and per-layer skip rates of a routed model on the calibration data."""
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
            run, skipped = layer.stats()
            per_layer[i] = skipped / (run + skipped)
    return {"realised_sparsity": realised_sparsity(model), "layer_skip": per_layer}


def _method(variant: str | None, random: bool):
    def fn(model, sparsity, ctx):
        var = ctx.options.get("variant", "layer") if variant is None else variant
        _check_variant(var)
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


register("dyn_depth_router", "dynamic_depth",
         "linear router on the normed layer input fitted to ||h_out - h_in|| / ||h_in||; top-k tokens run the layer",
         needs_calibration=True, max_sparsity=_max_sparsity)(_method("layer", random=False))
register("dyn_depth_router_mlp", "dynamic_depth",
         "linear router on the normed MLP input fitted to ||h_out - h_mid|| / ||h_mid||; top-k tokens run the MLP",
         needs_calibration=True, max_sparsity=_max_sparsity)(_method("mlp", random=False))
register("dyn_depth_random", "dynamic_depth",
         "random baseline: the same per-sequence capacity, tokens chosen uniformly at random (seeded)",
         needs_calibration=False, max_sparsity=_max_sparsity)(_method(None, random=True))
