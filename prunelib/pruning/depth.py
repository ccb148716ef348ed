"""Static depth pruning: remove whole decoder layers, or attention-only / MLP-only sublayers.

Criteria (all measured on calibration batches, averaged over every token):

- ``shortgpt``: Block Influence of layer l, BI_l = 1 - cos(h_l_in, h_l_out) (Men et al.,
  "ShortGPT"); the layers with the lowest BI are removed.
- ``angular``: angular distance of a contiguous block of n layers,
  d(l, n) = arccos(cos(h_l_in, h_{l+n-1}_out)) / pi (Gromov et al., "The Unreasonable
  Ineffectiveness of the Deeper Layers"); the block with the smallest distance goes.
  (The paper uses the last token of each sequence; averaging every token is more stable
  on few calibration sequences.)
- ``last_n``: the naive baseline, the last n layers.
- ``depth_random``: n layers drawn at random (seeded), the baseline a criterion must beat.
- ``shortgpt_attn`` / ``shortgpt_mlp``: BI of a sublayer alone, 1 - cos(h, h + f(h)),
  removing only attention or only MLP sublayers; ``depth_random_attn`` /
  ``depth_random_mlp`` remove random sublayers of the same kind (their baselines).

Sparsity = fraction of the layers (or sublayers) removed: n = round(sparsity * L).
"""
from __future__ import annotations

import torch

from prunelib.model.adapter import ModelAdapter
from prunelib.model.calibration import per_calibration
from prunelib.pruning.ladders import layers, whole
from prunelib.pruning.registry import register
from prunelib.pruning.surgery import remove_layers, remove_sublayers


def _count(model, sparsity: float) -> int:
    return int(round(sparsity * len(ModelAdapter(model).layers)))


def _max_layers(model) -> float:
    n = len(ModelAdapter(model).layers)
    return (n - 1) / n


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)


@per_calibration
@torch.inference_mode()
def layer_statistics(model, calibration, block: int | None = None) -> dict[str, torch.Tensor]:
    """Per-layer mean BI of layers and sublayers, and (if ``block``) the angular distance of each block start.

    Returns ``{"layer": [L], "attention": [L], "mlp": [L], "angular": [L - block + 1]}``.
    """
    a = ModelAdapter(model)
    L = len(a.layers)
    dev = next(model.parameters()).device
    sums = {k: torch.zeros(L, dtype=torch.float64) for k in ("layer", "attention", "mlp")}
    ang = torch.zeros(L - block + 1 if block else 0, dtype=torch.float64)
    tokens = 0
    h_in, attn_out, h_out = {}, {}, {}
    hooks = []
    for i, layer in enumerate(a.layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda mod, args, kw, i=i: h_in.__setitem__(i, (args[0] if args else kw["hidden_states"]).detach()),
            with_kwargs=True))
        hooks.append(layer.register_forward_hook(lambda mod, args, out, i=i: h_out.__setitem__(
            i, (out[0] if isinstance(out, tuple) else out).detach())))
        if a.attn(i) is not None:
            hooks.append(a.attn(i).register_forward_hook(
                lambda mod, args, out, i=i: attn_out.__setitem__(i, out[0].detach())))
    try:
        for ids in calibration.batches(4):
            model(ids.to(dev), use_cache=False)
            tokens += ids.numel()
            for i in range(L):
                x, y = h_in[i], h_out[i]
                mid = x + attn_out[i] if i in attn_out else x
                sums["layer"][i] += (1 - _cos(x, y)).sum().cpu()
                sums["attention"][i] += (1 - _cos(x, mid)).sum().cpu()
                sums["mlp"][i] += (1 - _cos(mid, y)).sum().cpu()
            for l in range(len(ang)):
                ang[l] += (torch.arccos(_cos(h_in[l], h_out[l + block - 1])) / torch.pi).sum().cpu()
            h_in.clear(), attn_out.clear(), h_out.clear()
    finally:
        for h in hooks:
            h.remove()
    out = {k: v / tokens for k, v in sums.items()}
    out["angular"] = ang / tokens
    return out


LAYERS, ATTN, MLP = "decoder layers", "attention sublayers", "MLP sublayers"


@register("shortgpt", "static_depth", "lowest Block Influence 1 - cos(h_in, h_out) on calibration data",
          unit=LAYERS, baseline="depth_random", needs_calibration=True, max_sparsity=_max_layers, ladder=whole(layers))
def shortgpt(model, sparsity, ctx):
    n = _count(model, sparsity)
    if n == 0:
        return remove_layers(model, []), {"layers": [], "score": None}
    bi = layer_statistics(model, ctx.calibration)["layer"]
    drop = sorted(torch.argsort(bi)[:n].tolist())
    return remove_layers(model, drop), {"layers": drop, "score": bi.tolist()}


@register("angular", "static_depth", "contiguous block with the smallest angular distance between its input and output",
          unit=LAYERS, baseline="depth_random", needs_calibration=True, max_sparsity=_max_layers, ladder=whole(layers))
def angular(model, sparsity, ctx):
    n = _count(model, sparsity)
    if n == 0:
        return remove_layers(model, []), {"layers": [], "score": None}
    d = layer_statistics(model, ctx.calibration, block=n)["angular"]
    start = int(torch.argmin(d))
    drop = list(range(start, start + n))
    return remove_layers(model, drop), {"layers": drop, "score": d.tolist()}


@register("last_n", "static_depth", "the last n layers (naive baseline)", unit=LAYERS, baseline="depth_random",
          needs_calibration=False,
          max_sparsity=_max_layers, ladder=whole(layers))
def last_n(model, sparsity, ctx):
    L, n = len(ModelAdapter(model).layers), _count(model, sparsity)
    drop = list(range(L - n, L))
    return remove_layers(model, drop), {"layers": drop}


@register("depth_random", "static_depth", "n random layers, seeded (the baseline every criterion must beat)",
          unit=LAYERS, baseline=None, needs_calibration=False, max_sparsity=_max_layers, ladder=whole(layers))
def depth_random(model, sparsity, ctx):
    L, n = len(ModelAdapter(model).layers), _count(model, sparsity)
    drop = sorted(torch.randperm(L, generator=torch.Generator().manual_seed(ctx.seed))[:n].tolist())
    return remove_layers(model, drop), {"layers": drop}


def _sublayer(kind: str, random: bool = False):
    def fn(model, sparsity, ctx):
        n = _count(model, sparsity)
        if n == 0:
            return remove_sublayers(model), {kind: [], "score": None}
        if random:
            L = len(ModelAdapter(model).layers)
            drop, score = sorted(torch.randperm(L, generator=torch.Generator().manual_seed(ctx.seed))[:n].tolist()), None
        else:
            bi = layer_statistics(model, ctx.calibration)[kind]
            drop, score = sorted(torch.argsort(bi)[:n].tolist()), bi.tolist()
        kw = {"attention": drop} if kind == "attention" else {"mlp": drop}
        return remove_sublayers(model, **kw), {kind: drop, "score": score}

    return fn


register("shortgpt_attn", "static_depth", "attention sublayers with the lowest BI 1 - cos(h, h + attn(h))",
         unit=ATTN, baseline="depth_random_attn", needs_calibration=True, max_sparsity=_max_layers, ladder=whole(layers))(_sublayer("attention"))
register("shortgpt_mlp", "static_depth", "MLP sublayers with the lowest BI 1 - cos(h, h + mlp(h))",
         unit=MLP, baseline="depth_random_mlp", needs_calibration=True, max_sparsity=_max_layers, ladder=whole(layers))(_sublayer("mlp"))
register("depth_random_attn", "static_depth", "n random attention sublayers, seeded (baseline of shortgpt_attn)",
         unit=ATTN, baseline=None, needs_calibration=False, max_sparsity=_max_layers, ladder=whole(layers))(_sublayer("attention", True))
register("depth_random_mlp", "static_depth", "n random MLP sublayers, seeded (baseline of shortgpt_mlp)",
         unit=MLP, baseline=None, needs_calibration=False, max_sparsity=_max_layers, ladder=whole(layers))(_sublayer("mlp", True))
