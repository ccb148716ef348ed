"""Dynamic depth's criterion: a linear router per layer, trained on calibration hidden states to predict
which tokens a layer (or its MLP) changes least, with thresholds calibrated to a target skip rate; and the
seeded random baseline. See :mod:`prunelib.pruning.dynamic_depth`."""
from __future__ import annotations

import math

import torch

from prunelib.model.adapter import ModelAdapter
from prunelib.model.calibration import per_calibration
from prunelib.model.models import fingerprint
from prunelib.pruning.routed_layer import RoutedDecoderLayer, Routers, _check_model, _check_variant, attach


RIDGE = 0.3  # ridge penalty, relative to the mean diagonal of the normal equations


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


def train_routers(model, calibration, sparsity: float, variant: str = "layer", counts: dict | None = None) -> Routers:
    """Fit one linear router per routed layer of ``model`` (left untouched) for a model-wide ``sparsity``.

    Targets: ||h_out - h_in|| / ||h_in|| of each token on the dense model; ridge least squares
    on the normed (sub)layer input. Thresholds: the skip-rate quantile of the scores on the
    calibration tokens, fitted layer by layer on the routed model; ``counts`` (a dict) receives what that routed
    pass ran and skipped per layer (:func:`_calibrate_thresholds`).
    """
    _check_variant(variant)
    a = _check_model(model)
    skip = layer_skip_rate(model, sparsity)
    layers = routed_layers(len(a.layers))
    w = router_weights(model, calibration, variant)
    D = a.hidden_size
    dtype = next(model.parameters()).dtype
    routers = Routers(fingerprint(model), D, variant, tuple(layers), skip, torch.full((len(layers),), -math.inf),
                      w[:, :D].to(dtype), w[:, D].to(dtype))
    if skip > 0:
        routers.threshold = _calibrate_thresholds(model, routers, calibration, counts)
    return routers


@per_calibration
def router_weights(model, calibration, variant: str = "layer") -> torch.Tensor:
    """The ridge fit of every routed layer's router, ``[layers, hidden + 1]`` (weights, then the bias), float64;
    it does not depend on the sparsity, so the rungs of a ladder share it."""
    layers = routed_layers(len(ModelAdapter(model).layers))
    D = ModelAdapter(model).hidden_size
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
    return torch.stack([torch.linalg.solve(A[j] + reg[j] * eye, rhs[j]) for j in range(len(layers))])


def random_routers(model, sparsity: float, variant: str = "layer", seed: int = 0, calibration=None,
                   counts: dict | None = None) -> Routers:
    """Routers of the random baseline: uniform scores hashed from positions. With ``calibration`` (what
    ``prune`` gives), each threshold is the skip-rate quantile of its scores on the calibration tokens, exactly as
    the trained router's: both then skip the target share of the calibration text (up to one token), so criterion
    and random are compared at the same realised sparsity there, not at a threshold that only skips the target in
    expectation (26.2% against the router's 30.0% at 25% on the quick tasks before). Without it, the threshold is
    the skip rate itself."""
    _check_variant(variant)
    a = _check_model(model)
    skip = layer_skip_rate(model, sparsity)
    layers = routed_layers(len(a.layers))
    routers = Routers(fingerprint(model), a.hidden_size, variant, tuple(layers), skip,
                      torch.full((len(layers),), skip), seed=seed)
    if calibration is not None and skip > 0:
        routers.threshold = _calibrate_thresholds(model, routers, calibration, counts)
    return routers


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


def _calibrate_thresholds(model, routers: Routers, calibration, counts: dict | None = None) -> torch.Tensor:
    """Per routed layer, the r-quantile of its router scores on the calibration tokens of the routed model.

    Layer by layer over all calibration batches: layer j's scores are collected with the
    thresholds of layers < j in force (read off its input for a whole-layer router, :meth:`RoutedDecoderLayer.scores`,
    else from a hooked run of the layer), then its threshold is set and its outputs computed. That last pass is the
    routed model's forward on the calibration batches, layer by layer; ``counts`` (a dict) receives each routed
    layer's (run, skipped) counters of it, ``{layer index: [phases, 2]}``, so that the caller need not run it again.
    """
    routed = attach(model, routers)
    dev = next(routed.parameters()).device
    out = []
    with torch.inference_mode():
        states = [_first_layer_inputs(routed, ids.to(dev)) for ids in calibration.batches(4)]
        for i, layer in enumerate(ModelAdapter(routed).layers):
            if isinstance(layer, RoutedDecoderLayer):
                scores = [layer.scores(h, **kw) for h, kw in states]  # the layer variant: no layer compute
                if scores[0] is None:  # the mlp variant routes on the attention's output: run the layer, hooked
                    scores = []
                    hook = layer.router.register_forward_hook(lambda mod, args, o: scores.append(o))
                    try:
                        for h, kw in states:
                            layer(h, **kw)
                    finally:
                        hook.remove()
                scores = [s.detach().float().reshape(-1).cpu() for s in scores]
                layer.threshold = float(torch.quantile(torch.cat(scores), routers.skip))
                out.append(layer.threshold)
                layer.reset_stats()  # the scoring pass ran every token; what follows is the routed pass
            states = [(layer(h, **kw), kw) for h, kw in states]
            if counts is not None and isinstance(layer, RoutedDecoderLayer):
                counts[i] = layer.counts.clone()
    return torch.tensor(out, dtype=torch.float64)
