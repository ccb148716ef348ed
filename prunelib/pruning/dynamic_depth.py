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

import torch

from prunelib.model.adapter import ModelAdapter
from prunelib.pruning.ladders import fine_then_grid
from prunelib.pruning.registry import register
from prunelib.pruning.routed_layer import (PHASES, VARIANTS, LinearRouter, RandomRouter, RoutedDecoderLayer,  # noqa: F401
                                          Routers, _check_phase, attach)
from prunelib.pruning.routers import _max_sparsity, random_routers, train_routers  # noqa: F401

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
    """Fraction of token-layer (token-MLP) pairs skipped since the last ``reset_stats()``.

    ``phase``: "prefill", "decode", or None for the phase that ran last (what ``shape_overrides`` costs; 0 if
    nothing ran). A phase asked for by name in which no token ran gives nan, not 0: fidelity scores its windows
    in one causal forward, every position counted as prefill (the per-token rule is the same in both phases), and a
    0 there read as "decode skipped nothing".
    """
    asked = _check_phase(phase)
    routed = _routed(model)
    if phase is None:
        phase = next((layer.last_phase for layer in routed if layer.last_phase), "prefill")
    stats = [layer.stats(phase) for layer in routed]
    tokens = max((run + skipped for run, skipped in stats), default=0)
    if tokens == 0:
        return float("nan") if asked else 0.0
    return sum(skipped for _, skipped in stats) / (tokens * len(ModelAdapter(model).layers))


def _removed(model, calibration, counts: dict | None = None) -> dict:
    """Realised sparsity and per-layer skip rates of a routed model on the calibration data: from ``counts``, the
    counters of the threshold calibration's routed pass over the same batches (the same routes), where there are
    some for every routed layer, else from a full forward. Either way the model's counters then hold that pass."""
    removed = {"realised_sparsity": None, "layer_skip": None}
    if calibration is None:
        return removed
    reset_stats(model)
    routed = {i: layer for i, layer in enumerate(ModelAdapter(model).layers) if isinstance(layer, RoutedDecoderLayer)}
    if counts and set(counts) == set(routed):
        for i, layer in routed.items():
            layer.counts.copy_(counts[i])
            layer.last_phase = "prefill"
    else:
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
        counts = {}
        if random:
            routers = random_routers(model, sparsity, var, ctx.seed, ctx.calibration, counts)
        else:
            routers = train_routers(model, ctx.calibration, sparsity, var, counts)
        new = attach(model, routers)
        removed = _removed(new, ctx.calibration, counts)
        removed.update(variant=var, skip=routers.skip, routed_layers=list(routers.layers))
        return new, removed

    return fn


LAYER_UNIT, MLP_UNIT = "token-layer pairs", "token-MLP pairs"
#: target skip rates: 1% steps to 5% (the router already loses ~21% at 5% on the embedded model), then 5% steps
LADDER = fine_then_grid(0.01, 0.05)
register("dyn_depth_router", "dynamic_depth",
         "linear router on the normed layer input fitted to ||h_out - h_in|| / ||h_in||; tokens scoring above the "
         "calibrated threshold run the layer (causal)", unit=LAYER_UNIT, baseline="dyn_depth_random",
         needs_calibration=True, max_sparsity=_max_sparsity, ladder=LADDER)(_method("layer", random=False))
register("dyn_depth_router_mlp", "dynamic_depth",
         "linear router on the normed MLP input fitted to ||h_out - h_mid|| / ||h_mid||; tokens scoring above the "
         "calibrated threshold run the MLP (causal)", unit=MLP_UNIT, baseline="dyn_depth_random_mlp",
         needs_calibration=True, max_sparsity=_max_sparsity, ladder=LADDER)(_method("mlp", random=False))
register("dyn_depth_random", "dynamic_depth",
         "random baseline: each token's route hashed from (seed, layer, position), the threshold set so that the "
         "calibration tokens skip the same share of whole layers as the router's",
         unit=LAYER_UNIT, baseline=None, needs_calibration=True, max_sparsity=_max_sparsity, ladder=LADDER)(
    _method("layer", random=True))
register("dyn_depth_random_mlp", "dynamic_depth",
         "random baseline of the MLP router: each token's route hashed from (seed, layer, position), the threshold "
         "set so that the calibration tokens skip the same share of MLP sublayers", unit=MLP_UNIT, baseline=None,
         needs_calibration=True,
         max_sparsity=_max_sparsity, ladder=LADDER)(_method("mlp", random=True))
