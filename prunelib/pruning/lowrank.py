"""Static K low-rank factorisation: every projection W [N, K] becomes two Linears K -> r -> N.

GEMM view: ``Y = X W^T`` (M x K x N) is replaced by ``Y = (X A^T) B^T`` with
``A`` [r, K] and ``B`` [N, r]: two GEMMs M x K x r and M x r x N. Both the FLOPs and the
weight bytes fall from K*N to r*(K+N), so a factorisation only pays below the break-even
rank K*N/(K+N). The speedup is realised by :class:`LowRankLinear` (two smaller
``nn.Linear`` layers, ``first`` and ``second``); the cost model reads its ``rank``,
``in_features`` and ``out_features``.

Sparsity = the fraction of the parameters of every replaced projection that is removed.
Each of q, k, v, o, gate, up and down in every layer gets rank
``r = floor((1 - s) * K * N / (K + N))``, so ``r * (K + N) <= (1 - s) * K * N`` (+ the bias,
kept as it is). Option ``round_to`` (None by default, or 8 or 64: what GEMM kernels tile
by) rounds r down to a multiple of it (removing a little more than s), except where r is
already below ``round_to``. s = 0 returns an unchanged copy; s must leave r >= 1 in every
projection (s <= 1 - 1 / min K*N/(K+N)), else ``ValueError``.

Methods (how the r kept directions are chosen):

- ``lowrank_svd``: truncated SVD of W, the top r singular triplets (Eckart-Young: the
  best rank-r approximation of the weight in Frobenius norm).
- ``lowrank_svdllm``: SVD-LLM's truncation-aware data whitening (Wang et al., "SVD-LLM:
  Truncation-aware Singular Value Decomposition for Large Language Model Compression",
  2024). With X the calibration inputs of that Linear (forward pre-hooks on the dense
  model, X^T X accumulated in float64 over ``ctx.calibration.batches(4)``),
  S = Cholesky(X^T X), damped by d * mean(diag) * I (d = 1e-8, 1e-7, ... 1e2) when it is
  not positive definite (e.g. fewer calibration tokens than features);
  W S = U Sigma V^T, truncated to r, un-whitened: W ~ U_r Sigma_r^1/2 . Sigma_r^1/2 V_r^T S^-1.
  Since S^-1 X^T has orthonormal rows, dropping singular value i costs exactly sigma_i in
  the output error ||X W^T - X W_r^T||_F, so the top r are the best rank-r choice for the
  calibration outputs. (SVD-LLM's optional LoRA-style parameter update is not done.)
- ``lowrank_random``: the random *baseline*: r singular triplets of W drawn at random
  (seeded by ``ctx.seed``) instead of the top r.

``removed`` = ``{"ranks": {layer: {projection: r kept}}}``.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from prunelib.model.adapter import ModelAdapter
from prunelib.pruning.ladders import grid
from prunelib.pruning.registry import register



class LowRankLinear(nn.Module):
    """``second(first(x))``: a rank-``rank`` stand-in for an ``nn.Linear(in_features, out_features)``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def whitening_factor(gram: torch.Tensor) -> torch.Tensor:
    """Lower-triangular S with S S^T = ``gram`` (+ damping if ``gram`` is not positive definite)."""
    g = gram.double()
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    scale = g.diagonal().mean().clamp_min(1e-12)
    for damp in (0.0, *(10.0**k for k in range(-8, 3))):
        s, info = torch.linalg.cholesky_ex(g + damp * scale * eye)
        if int(info) == 0:
            return s
    raise ValueError("X^T X is not positive definite even with damping 100 x its mean diagonal (NaN/inf inputs?)")


@torch.no_grad()
def factorize(linear: nn.Linear, rank: int, whitening: torch.Tensor | None = None, keep=None) -> LowRankLinear:
    """Replace ``linear`` by a :class:`LowRankLinear` of rank ``rank``.

    ``whitening``: the lower-triangular S of :func:`whitening_factor` (SVD-LLM); None for a plain
    truncated SVD of the weight. ``keep``: indices of the singular triplets to keep (default:
    the ``rank`` largest).
    """
    n_out, n_in = linear.weight.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(n_in, n_out):
        raise ValueError(f"rank {rank!r} is not allowed for a {n_in}->{n_out} Linear: 1 <= rank <= {min(n_in, n_out)}")
    w = linear.weight.detach().double()
    if whitening is not None:
        s = whitening.to(w.device, torch.float64)
        if s.shape != (n_in, n_in):
            raise ValueError(f"whitening must be [{n_in}, {n_in}] for a {n_in}->{n_out} Linear, got {list(s.shape)}")
        w = w @ s
    u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    idx = torch.arange(rank, device=w.device) if keep is None else torch.as_tensor(keep, device=w.device)
    if idx.shape != (rank,) or not 0 <= int(idx.min()) <= int(idx.max()) < min(n_in, n_out):
        raise ValueError(f"keep must hold {rank} indices in 0..{min(n_in, n_out) - 1}, got {idx.tolist()}")
    root = sigma[idx].sqrt()
    a = root[:, None] * vh[idx]  # [r, K]
    if whitening is not None:
        a = torch.linalg.solve_triangular(s, a, upper=False, left=False)  # a S^-1
    b = u[:, idx] * root[None, :]  # [N, r]
    new = LowRankLinear(n_in, n_out, rank, linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)
    new.first.weight.copy_(a)
    new.second.weight.copy_(b)
    if linear.bias is not None:
        new.second.bias.copy_(linear.bias)
    return new


@torch.inference_mode()
def input_grams(model, calibration, batch_size: int = 4) -> dict[tuple[int, str], torch.Tensor]:
    """X^T X (float64) of the inputs of every projection over the calibration batches, keyed (layer, name).

    Projections that share an input (q/k/v, gate/up) share one tensor.
    """
    a = ModelAdapter(model)
    dev = next(model.parameters()).device
    grams, hooks = {}, []

    def hook(key):
        def fn(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            if key in grams:
                grams[key] += x.T @ x
            else:
                grams[key] = x.T @ x
        return fn

    groups = {i: a.linears_by_input(i) for i in range(len(a.layers))}  # Linears of a group read one input
    for i, by_input in groups.items():
        for place, lins in by_input.items():
            if lins:
                hooks.append(next(iter(lins.values())).register_forward_pre_hook(hook((i, place))))
    try:
        for ids in calibration.batches(batch_size):
            model(ids.to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {(i, name): grams[(i, place)] for i, by_input in groups.items()
            for place, lins in by_input.items() for name in lins}


def rank_for(in_features: int, out_features: int, sparsity: float, round_to: int | None = None) -> int:
    """floor((1 - s) K N / (K + N)), rounded down to a multiple of ``round_to`` where that stays >= round_to."""
    r = math.floor((1 - sparsity) * in_features * out_features / (in_features + out_features) + 1e-9)
    if round_to and r >= round_to:
        r -= r % round_to
    return r


def _max_lowrank(model) -> float:
    a = ModelAdapter(model)
    c = min((l.in_features * l.out_features / (l.in_features + l.out_features)
             for i in range(len(a.layers)) for l in {**a.attn_proj(i), **a.mlp_proj(i)}.values()), default=1.0)
    return max(0.0, 1 - 1 / c)


def lowrank_prune(model, sparsity: float, ctx, criterion: str):
    round_to = ctx.options.get("round_to")
    if round_to not in (None, 8, 64):
        raise ValueError(f"round_to must be None, 8 or 64, got {round_to!r}")
    new = copy.deepcopy(model)
    if sparsity == 0:
        return new, {"ranks": {}}
    a = ModelAdapter(new)
    grams = input_grams(model, ctx.calibration) if criterion == "svdllm" else {}
    gen = torch.Generator().manual_seed(ctx.seed)
    ranks = {}
    for i in range(len(a.layers)):
        for name, lin in {**a.attn_proj(i), **a.mlp_proj(i)}.items():  # a fused Linear is factorised whole
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"layer {i} {name} is a {type(lin).__name__}, not an nn.Linear: cannot factorise it")
            r = rank_for(lin.in_features, lin.out_features, sparsity, round_to)
            keep = None
            if criterion == "random":
                keep = torch.randperm(min(lin.in_features, lin.out_features), generator=gen)[:r].sort().values
            s = whitening_factor(grams[(i, name)]) if criterion == "svdllm" else None
            a.set_linear(i, name, factorize(lin, r, s, keep))
            ranks.setdefault(i, {})[name] = r
    return new, {"ranks": ranks}


def _registered(criterion: str):
    return lambda model, sparsity, ctx: lowrank_prune(model, sparsity, ctx, criterion)


register("lowrank_svd", "static_k_lowrank", "top-r singular triplets of W (truncated SVD)",
         baseline="lowrank_random", needs_calibration=False, max_sparsity=_max_lowrank, options={"round_to": (8, 64)}, ladder=grid(0.1))(_registered("svd"))
register("lowrank_svdllm", "static_k_lowrank",
         "top-r singular triplets of W S, S = Cholesky(X^T X) on calibration inputs (SVD-LLM whitening)",
         baseline="lowrank_random", needs_calibration=True, max_sparsity=_max_lowrank, options={"round_to": (8, 64)}, ladder=grid(0.1))(_registered("svdllm"))
register("lowrank_random", "static_k_lowrank", "r singular triplets of W drawn at random, seeded (random baseline)",
         baseline=None, needs_calibration=False, max_sparsity=_max_lowrank, options={"round_to": (8, 64)}, ladder=grid(0.1))(_registered("random"))
