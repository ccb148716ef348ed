"""Static width pruning: remove attention heads (GQA groups) and MLP channels by slicing Linear layers.

GEMM view: removing MLP channel c deletes row c of gate/up (N of the producers) and
column c of down (K of the consumer); removing a KV head deletes it with the query heads
of its group from q/k/v (N) and their columns from o_proj (K), so the query/KV ratio
stays valid.

Sparsity = the fraction of each layer's KV-head groups and MLP channels removed
(uniform over layers): ``round(s * n_kv_heads)`` groups and ``round(s * intermediate)``
channels per layer, the kept channel count optionally rounded up to a multiple of
``round_to`` (8 or 64: what GEMM kernels tile by). Criteria, all per structure:

- ``magnitude``: L2 norm of every weight that belongs to the structure (producer rows and
  consumer columns).
- ``wanda_sp``: Wanda's |W| * ||X|| summed over the structure's consumer columns
  (An et al., FLAP paper's Wanda-sp), ||X_j|| the L2 norm over calibration tokens of input
  feature j of down_proj / o_proj.
- ``random``: seeded random structures, the baseline a criterion must beat.
- ``flap``: FLAP's fluctuation, Var(X_j) * ||W[:, j]||^2 summed over the structure, with
  bias compensation: the consumer gets a bias W[:, removed] @ mean(X[removed]), so the
  removed features still contribute their calibration mean. (FLAP's global adaptive
  structure search is not used: every layer loses the same fraction.)
"""
from __future__ import annotations

import math

import torch
from torch import nn

from prunelib.model.adapter import ModelAdapter
from prunelib.model.calibration import per_calibration
from prunelib.pruning.ladders import mlp_quantum, snapped
from prunelib.pruning.registry import register
from prunelib.pruning.surgery import slice_heads, slice_mlp


@torch.inference_mode()
@per_calibration
def consumer_input_stats(model, calibration) -> dict:
    """Per layer: mean, variance and L2 norm over calibration tokens of the inputs of o_proj and down_proj."""
    a = ModelAdapter(model)
    dev = next(model.parameters()).device
    acc, hooks = {}, []

    def hook(key):
        def fn(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            s = acc.setdefault(key, [0, 0.0, 0.0])
            s[0] += x.shape[0]
            s[1] = s[1] + x.sum(0)
            s[2] = s[2] + (x * x).sum(0)
        return fn

    for i in range(len(a.layers)):
        for kind, role in (("attn", "o"), ("mlp", "down")):
            if a.sublayer(i, "attention" if kind == "attn" else "mlp") is not None:
                hooks.append(a.proj(i, role).register_forward_pre_hook(hook((kind, i))))
    try:
        for ids in calibration.batches(4):
            model(ids.to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for key, (n, s1, s2) in acc.items():
        mean = s1 / n
        out[key] = {"mean": mean.float().cpu(), "var": (s2 / n - mean**2).clamp_min(0).float().cpu(),
                    "norm": s2.sqrt().float().cpu()}
    return out


def _feature_scores(criterion: str, w_consumer: torch.Tensor, stats: dict | None, producers=()) -> torch.Tensor:
    """One score per consumer input feature (column of ``w_consumer``)."""
    w = w_consumer.detach().float().cpu()
    if criterion == "magnitude":
        sq = (w**2).sum(0)
        for p in producers:  # rows of the producers that create this feature
            sq = sq + (p.detach().float().cpu() ** 2).sum(1)
        return sq.sqrt()
    if criterion == "wanda_sp":
        return (w.abs() * stats["norm"][None, :]).sum(0)
    if criterion == "flap":
        return stats["var"] * (w**2).sum(0)
    if criterion == "random":  # the baseline: a seeded random score per feature
        return torch.rand(w.shape[1], generator=stats["generator"])
    raise ValueError(f"unknown width criterion {criterion!r}")


def _rows(a: ModelAdapter, i: int, role: str) -> torch.Tensor:
    """The weight rows of ``role`` in layer ``i`` (a block of a fused Linear where the family fuses it)."""
    lin, rows = a.role_rows(i, role)
    return lin.weight[rows]


def group_scores(criterion: str, a: ModelAdapter, i: int, stats: dict | None) -> torch.Tensor:
    """One score per KV-head group of a layer (its KV head and the query heads that share it).

    ``magnitude``: the L2 norm of every weight of the group, its q, k and v rows and its
    o_proj columns. The other criteria sum their per-feature scores of o_proj's input
    columns over the group.
    """
    shape = a.layer_shape(i)
    hd, group = shape.head_dim, shape.n_heads // shape.n_kv_heads
    s = _feature_scores(criterion, a.proj(i, "o").weight, stats, (_rows(a, i, "q"),))
    if criterion != "magnitude":
        return s.reshape(shape.n_kv_heads, group * hd).sum(1)
    sq = (s**2).reshape(shape.n_kv_heads, group * hd).sum(1)  # q rows and o columns of the group
    kv = _rows(a, i, "k").detach().float().cpu() ** 2 + _rows(a, i, "v").detach().float().cpu() ** 2
    return (sq + kv.sum(1).reshape(shape.n_kv_heads, hd).sum(1)).sqrt()


def _n_keep(total: int, sparsity: float, round_to: int | None) -> int:
    keep = total - int(round(sparsity * total))
    if round_to:
        keep = min(total, int(math.ceil(keep / round_to)) * round_to)
    return max(keep, 1)


def width_prune(model, sparsity: float, ctx, criterion: str):
    a = ModelAdapter(model)
    round_to = ctx.options.get("round_to")
    if round_to not in (None, 8, 64):
        raise ValueError(f"round_to must be None, 8 or 64, got {round_to!r}")
    if sparsity == 0:
        return slice_mlp(model, {}), {"mlp_channels": {}, "kv_heads": {}}
    stats = consumer_input_stats(model, ctx.calibration) if criterion not in ("magnitude", "random") else {}
    gen = torch.Generator().manual_seed(ctx.seed)
    keep_mlp, keep_kv, removed = {}, {}, {"mlp_channels": {}, "kv_heads": {}}
    comp = {}  # (kind, layer) -> bias to add to the sliced consumer (FLAP)
    for i in range(len(a.layers)):
        shape = a.layer_shape(i)
        if shape.has_mlp:
            down = a.proj(i, "down").weight
            s = _feature_scores(criterion, down, stats.get(("mlp", i), {"generator": gen}),
                                (_rows(a, i, "gate"), _rows(a, i, "up")))
            keep = torch.argsort(s, descending=True)[: _n_keep(shape.intermediate, sparsity, round_to)].sort().values
            keep_mlp[i] = keep
            gone = _complement(keep, shape.intermediate)
            removed["mlp_channels"][i] = gone.tolist()
            if criterion == "flap" and gone.numel():
                comp[("mlp", i)] = down.detach().float().cpu()[:, gone] @ stats[("mlp", i)]["mean"][gone]
        if shape.has_attn:
            hd, group = shape.head_dim, shape.n_heads // shape.n_kv_heads
            per_group = group_scores(criterion, a, i, stats.get(("attn", i), {"generator": gen}))
            n_keep = max(1, shape.n_kv_heads - int(round(sparsity * shape.n_kv_heads)))
            keep = torch.argsort(per_group, descending=True)[:n_keep].sort().values
            keep_kv[i] = keep
            gone = _complement(keep, shape.n_kv_heads)
            removed["kv_heads"][i] = gone.tolist()
            if criterion == "flap" and gone.numel():
                cols = ((gone[:, None] * group + torch.arange(group)).reshape(-1)[:, None] * hd + torch.arange(hd)).reshape(-1)
                comp[("attn", i)] = a.proj(i, "o").weight.detach().float().cpu()[:, cols] @ stats[("attn", i)]["mean"][cols]
    pruned = slice_heads(slice_mlp(model, keep_mlp), keep_kv)
    pa = ModelAdapter(pruned)
    for (kind, i), bias in comp.items():
        role = "down" if kind == "mlp" else "o"
        pa.set_proj(i, role, _with_bias(pa.proj(i, role), bias))
    return pruned, removed


def _with_bias(lin: nn.Linear, add: torch.Tensor) -> nn.Linear:
    new = nn.Linear(lin.in_features, lin.out_features, bias=True, device=lin.weight.device, dtype=lin.weight.dtype)
    new.weight.data.copy_(lin.weight.data)
    base = lin.bias.data if lin.bias is not None else torch.zeros_like(new.bias.data)
    new.bias.data.copy_(base + add.to(base))
    return new


def _complement(keep: torch.Tensor, total: int) -> torch.Tensor:
    mask = torch.ones(total, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().reshape(-1)


def _max_width(model) -> float:
    return 0.95


def _width(criterion: str):
    return lambda model, sparsity, ctx: width_prune(model, sparsity, ctx, criterion)


_WIDTH = dict(max_sparsity=_max_width, options={"round_to": (8, 64)}, ladder=snapped(0.05, mlp_quantum(64)))
register("width_magnitude", "static_width", "L2 norm of each head group's / channel's weights",
         baseline="width_random", needs_calibration=False, **_WIDTH)(_width("magnitude"))
register("width_wanda_sp", "static_width", "sum over consumer columns of |W| * ||X|| on calibration data (Wanda-sp)",
         baseline="width_random", needs_calibration=True, **_WIDTH)(_width("wanda_sp"))
register("width_flap", "static_width", "fluctuation Var(X) * ||W||^2 on calibration data, with bias compensation (FLAP)",
         baseline="width_random", needs_calibration=True, **_WIDTH)(_width("flap"))
register("width_random", "static_width", "random head groups and channels, seeded (the baseline every criterion must beat)",
         baseline=None, needs_calibration=False, **_WIDTH)(_width("random"))
