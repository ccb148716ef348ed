"""Static K 2:4 semi-structured pruning: 2 of every 4 consecutive weights along K are zero.

GEMM view: in ``Y[M,N] = X[M,K] W[K,N]`` every output feature keeps 2 of each group of
4 consecutive input features (K). NVIDIA sparse tensor cores (Ampere and later) skip the
zeros: half the multiply-adds and about half the weight bytes (plus 2-bit indices).

Methods (cell ``static_k_24``), each choosing the 2 kept weights of every group of 4:

- ``sparse24_magnitude``: the 2 largest |W_ij|.
- ``sparse24_wanda``: the 2 largest |W_ij| * ||X_j||_2, ||X_j|| the L2 norm of input
  feature j over all calibration tokens (Sun et al. 2023, "A Simple and Effective Pruning
  Approach for Large Language Models", its N:M variant: groups along the input dimension).
- ``sparse24_sparsegpt``: SparseGPT (Frantar & Alistarh 2023). Per Linear, H = 2 X^T X / n
  of its calibration inputs, dampened by 1% of mean(diag H); columns in blocks of 128; at
  the first column of each group of 4 the 2 weights with the smallest w^2 / [H^-1]_jj^2
  are pruned ([H^-1]_jj: diagonal of the upper Cholesky factor of H^-1, as in the paper's
  code), and each column's error is propagated to the later columns (OBS update).
- ``sparse24_random``: the random *baseline*: 2 random weights of every 4, seeded by ``ctx.seed``.

Wanda and SparseGPT calibrate sequentially, as the papers' code does: the calibration
batches go through the layers one by one, the statistics of layer l's seven projections are
taken on one pass of the dense layer l, and once it is pruned its outputs (computed by the
pruned layer) are the inputs of layer l + 1.

Sparsity = fraction of the decoder projections' weights (q, k, v, o, gate, up, down of
every layer; embeddings and lm_head are never pruned) set to zero, 0 <= s <= 0.5.
s = 0.5 puts 2:4 on every projection of every layer; s < 0.5 puts 2:4 on every projection of
n = round(2 s L) of the L layers and leaves the others dense, so exactly s of the projection
weights are zero when 2 s L is an integer (and all layers have the same shape); s = 0 returns
an identical model. The n layers are those whose 2:4 masks lose least, each measured on the
dense model's calibration inputs by the method's own criterion, as the mean over the
layer's projections of: the pruned share of sum |W| (magnitude), the pruned share of
sum |W| * ||X|| (Wanda), the relative reconstruction error ||(W - W') X||^2 / ||W X||^2 after
the OBS update (SparseGPT). The random baseline draws the n layers at random.

How the speedup is realised: pruned projections become :class:`Sparse24Linear` (an
``nn.Linear`` with ``sparse24 = True`` and the same state_dict keys, so the cost model
costs them as 2:4). When the model is on CUDA in float16/bfloat16 and
``torch.sparse.to_sparse_semi_structured`` works there, their weights are converted to
``SparseSemiStructuredTensor`` (cuSPARSELt, else CUTLASS) and the sparse kernel runs;
otherwise the masked dense weights stay, with no speedup, and ``removed["kernel_note"]``
says so. Option ``sparse_kernel=False`` keeps masked dense weights anywhere (a control
for timing); :func:`enable_sparse_kernels` converts a model moved to a GPU after pruning.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

from prunelib.model.adapter import ModelAdapter
from prunelib.model.calibration import layer0_inputs
from prunelib.pruning.ladders import layers, whole
from prunelib.pruning.registry import register

BLOCK = 128  # SparseGPT column block
DAMP = 0.01  # SparseGPT dampening, fraction of mean(diag H)
BATCH = 4  # calibration sequences per forward
CALIBRATED = ("wanda", "sparsegpt")


class Sparse24Linear(nn.Linear):
    """A Linear whose weight has at most 2 non-zeros in every 4 consecutive input features."""

    sparse24 = True

    @classmethod
    def from_linear(cls, lin: nn.Linear, weight: torch.Tensor) -> "Sparse24Linear":
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        new.weight = nn.Parameter(weight.to(lin.weight), requires_grad=lin.weight.requires_grad)
        new.bias = lin.bias
        return new

    kernel_note = "masked dense weights: no sparse kernel tried"  # set by enable_sparse_kernels / sparse24_prune

    @property
    def sparse_kernel(self) -> bool:
        """True when the weight is a semi-structured sparse tensor (the sparse kernel runs)."""
        return isinstance(self.weight, SparseSemiStructuredTensor)

    @property
    def kernel(self) -> str:
        """The kernel this layer's GEMM runs: ``cuSPARSELt``, ``CUTLASS`` or ``none`` (masked dense)."""
        if isinstance(self.weight, SparseSemiStructuredTensorCUSPARSELT):
            return "cuSPARSELt"
        if isinstance(self.weight, SparseSemiStructuredTensorCUTLASS):
            return "CUTLASS"
        return "none"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, 2:4 {'sparse kernel' if self.sparse_kernel else 'masked dense'}"


def _projections(a: ModelAdapter, i: int) -> dict[str, nn.Linear]:
    return {**a.attn_proj(i), **a.mlp_proj(i)}


def _keep_top2(score: torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the 2 largest scores of every 4 consecutive columns."""
    n, k = score.shape
    idx = score.reshape(n, k // 4, 4).topk(2, dim=-1).indices
    return torch.zeros(n, k // 4, 4, dtype=torch.bool, device=score.device).scatter_(-1, idx, True).reshape(n, k)


def _by_score(w: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, float]:
    keep = _keep_top2(score)
    return w * keep, float(score[~keep].sum() / score.sum().clamp_min(1e-30))


def _sparsegpt(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """SparseGPT 2:4 with OBS updates (the paper's ``fasterprune`` with prune_n=2, prune_m=4).

    Works on W^T so that a column of W is a contiguous row; a kept weight has zero error,
    a pruned one error w / d, and the pruned entries are set to exact zeros per block.
    """
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h.diagonal().add_(DAMP * torch.mean(torch.diag(h)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    wt = w.T.contiguous()  # [K, N]
    k = wt.shape[0]
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        w1, hinv1 = wt[i1:i2].clone(), hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        err1 = torch.zeros_like(w1)
        pruned = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % 4 == 0:  # choose this group's mask on the weights updated so far
                obs = w1[i:i + 4] ** 2 / d[i:i + 4, None] ** 2
                pruned.scatter_(0, i + obs.topk(2, dim=0, largest=False).indices, True)
                scale = pruned[i:i + 4] / d[i:i + 4, None]
            torch.mul(w1[i], scale[i % 4], out=err1[i])
            w1[i:].addr_(hinv1[i, i:], err1[i], alpha=-1)
        wt[i1:i2] = w1.masked_fill_(pruned, 0)
        wt[i2:] -= hinv[i1:i2, i2:].T @ err1
    return wt.T


def _prune_weight(criterion: str, w: torch.Tensor, stats: dict | None, gen: torch.Generator):
    """The 2:4 weight and its loss by the method's own criterion (see the module docstring)."""
    if criterion == "magnitude":
        return _by_score(w, w.abs())
    if criterion == "random":
        return _by_score(w, torch.rand(w.shape, generator=gen, device=w.device))
    if criterion == "wanda":
        return _by_score(w, w.abs() * stats["m"].sqrt()[None])
    h = 2 * stats["m"] / stats["n"]
    new = _sparsegpt(w, h)
    dw = new - w
    return new, float(((dw @ h) * dw).sum() / ((w @ h) * w).sum().clamp_min(1e-30))


def _run(layer, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _layer_stats(layer, groups: dict, inputs: list, hessian: bool) -> tuple[dict, list]:
    """Per projection: token count ``n`` and X^T X (``hessian``) or sum of x^2 per feature; plus the layer's outputs.

    ``groups``: the layer's Linears by shared input (:meth:`ModelAdapter.linears_by_input`): one
    statistic per input, shared by the Linears that read it (q/k/v fused or not, gate/up)."""
    acc, hooks = {}, []

    def hook(key):
        def fn(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = acc.setdefault(key, {"n": 0, "m": 0})
            s["n"] += x.shape[0]
            s["m"] = s["m"] + (x.T @ x if hessian else (x * x).sum(0))
        return fn

    hooks = [next(iter(lins.values())).register_forward_pre_hook(hook(place)) for place, lins in groups.items() if lins]
    try:
        outs = [_run(layer, h, kw) for h, kw in inputs]
    finally:
        for h in hooks:
            h.remove()
    return {name: acc[place] for place, lins in groups.items() if place in acc for name in lins}, outs


def _walk(model, criterion: str, layers: set[int], ctx, apply: bool) -> dict[int, float]:
    """Prune the projections of ``layers`` in order; returns each layer's mean loss.

    With ``apply`` the projections become :class:`Sparse24Linear` and, for calibrated
    criteria, later layers calibrate on the pruned layers' outputs; without, nothing changes.
    """
    a = ModelAdapter(model)
    # random draws on the model's device: 7e9 of them for an 8B model take ~45 s serially on a CPU
    # (CPU results unchanged: the same CPU generator and seed)
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev if dev.type == "cuda" else "cpu").manual_seed(ctx.seed)
    data = criterion in CALIBRATED
    inputs = layer0_inputs(model, ctx.calibration, BATCH) if data else []
    last, losses = max(layers), {}
    for i in range(last + 1):
        layer, projs, outs = a.layers[i], _projections(a, i), None
        if i in layers:
            stats, outs = (_layer_stats(layer, a.linears_by_input(i), inputs, criterion == "sparsegpt") if data
                           else ({}, None))
            res = {name: _prune_weight(criterion, lin.weight.detach().float(), stats.get(name), gen)
                   for name, lin in projs.items()}
            losses[i] = sum(loss for _, loss in res.values()) / max(len(res), 1)
            if apply:
                for name, (w, _) in res.items():
                    a.set_linear(i, name, Sparse24Linear.from_linear(projs[name], w))
                outs = None  # the pruned layer's outputs feed the next layer
        if data and i < last:
            inputs = [(_run(layer, h, kw) if outs is None else outs[j], kw) for j, (h, kw) in enumerate(inputs)]
    return losses


def kernel_info(model) -> dict:
    """What the 2:4 layers of ``model`` really run, for a speed row: ``kernel`` (``cuSPARSELt``,
    ``CUTLASS``, ``none``; ``mixed: ...`` if layers differ; None without 2:4 layers),
    ``kernel_fallback`` (why layers run masked dense, else None) and ``sparse_layers``
    (how many 2:4 Linear layers run a sparse kernel, of how many)."""
    lins = [m for m in model.modules() if isinstance(m, Sparse24Linear)]
    if not lins:
        return {"kernel": None, "kernel_fallback": None, "sparse_layers": None}
    kinds = sorted({m.kernel for m in lins})
    dense = [m for m in lins if not m.sparse_kernel]
    notes = sorted({m.kernel_note for m in dense})
    return {"kernel": kinds[0] if len(kinds) == 1 else "mixed: " + "+".join(kinds),
            "kernel_fallback": "; ".join(notes) if dense else None,
            "sparse_layers": f"{len(lins) - len(dense)} of {len(lins)}"}


def engaged_shape(model, shape):
    """``shape`` (a cost-model ``ModelShape`` of ``model``) with 2:4 kept only on the projections whose
    sparse kernel really runs: a masked dense 2:4 weight is costed as the dense GEMM it is."""
    from dataclasses import replace

    a, layers = ModelAdapter(model), []
    for i, ls in enumerate(shape.layers):
        if ls.sparse24:
            projs = _projections(a, i)
            ls = replace(ls, sparse24=tuple(k for k in ls.sparse24 if getattr(projs.get(k), "sparse_kernel", False)))
        layers.append(ls)
    return replace(shape, layers=tuple(layers))


def _note(lins, note: str) -> None:
    for lin in lins:
        if not lin.sparse_kernel:
            lin.kernel_note = note


def enable_sparse_kernels(model) -> tuple[bool, str]:
    """Convert every :class:`Sparse24Linear` weight to a semi-structured sparse tensor where possible.

    Needs CUDA and float16/bfloat16 weights; a probe multiplication (checked against the
    dense product) picks cuSPARSELt, else CUTLASS. Returns (sparse kernel runs, note).
    """
    lins = [m for m in model.modules() if isinstance(m, Sparse24Linear) and not m.sparse_kernel]
    if not lins:
        return any(isinstance(m, Sparse24Linear) and m.sparse_kernel for m in model.modules()), "no 2:4 layer to convert"
    w = lins[0].weight
    # a CPU build has no cuSPARSELt (prunelib.run.fakekernels provides reference CPU kernels for tests and --smoke)
    if w.device.type != "cuda" and not torch.backends.cusparselt.is_available():
        note = f"no semi-structured sparse kernel on {w.device.type}: masked dense weights, no speedup expected"
    elif w.dtype not in (torch.float16, torch.bfloat16):
        note = (f"semi-structured sparse kernels need float16/bfloat16, the model is {w.dtype}: "
                "masked dense weights, no speedup expected")
    else:
        backend, why = _probe(w.device, w.dtype)
        note = None if backend else (f"torch.sparse.to_sparse_semi_structured does not work here ({why}): "
                                     "masked dense weights, no speedup expected")
    if note:
        _note(lins, note)
        return False, note
    done, failed = 0, []
    with torch.no_grad():
        for lin in lins:
            try:
                lin.weight = nn.Parameter(backend.from_dense(lin.weight.detach().contiguous()), requires_grad=False)
                done += 1
            except RuntimeError as e:  # shape constraints of the backend
                failed.append(f"{lin.out_features}x{lin.in_features}: {str(e).splitlines()[0]}")
                lin.kernel_note = f"{backend.BACKEND} refused {failed[-1]}: masked dense weights"
    gpu = torch.cuda.get_device_name(w.device)
    note = f"{done} of {len(lins)} 2:4 Linear layers run the {backend.BACKEND} semi-structured sparse kernel on {gpu}"
    if failed:
        note += f"; masked dense (no speedup) for {len(failed)}: {failed[0]}"
    return done > 0, note


def _probe(device, dtype):
    """The first sparse backend whose 2:4 product matches the dense one, else (None, reason)."""
    w = torch.randn(128, 128, device=device, dtype=dtype) * torch.tensor([1, 0, 1, 0], device=device, dtype=dtype).repeat(32)
    x = torch.randn(2, 128, device=device, dtype=dtype)
    backends = [SparseSemiStructuredTensorCUTLASS]
    if torch.backends.cusparselt.is_available():
        backends.insert(0, SparseSemiStructuredTensorCUSPARSELT)
    why = "no backend"
    for backend in backends:
        try:
            y = nn.functional.linear(x, backend.from_dense(w))
            if torch.allclose(y.float(), nn.functional.linear(x, w).float(), atol=1e-1, rtol=1e-2):
                return backend, ""
            why = f"{backend.BACKEND} gave a wrong product"
        except (RuntimeError, NotImplementedError) as e:
            why = f"{backend.BACKEND}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None, why


def _n_layers(sparsity: float, n_layers: int) -> int:
    if not 0 <= sparsity <= 0.5:
        raise ValueError(f"sparsity {sparsity!r} is out of range for 2:4 pruning: allowed 0 <= s <= 0.5")
    return int(round(2 * sparsity * n_layers))


@torch.no_grad()
def sparse24_prune(model, sparsity: float, ctx, criterion: str):
    """2:4-prune a copy of ``model`` with ``criterion`` (magnitude, wanda, sparsegpt, random)."""
    unknown = set(ctx.options) - {"sparse_kernel"}
    if unknown or not isinstance(ctx.options.get("sparse_kernel", True), bool):
        raise ValueError(f"2:4 pruning options {ctx.options!r} not understood: allowed sparse_kernel=True/False")
    L = len(ModelAdapter(model).layers)
    n = _n_layers(sparsity, L)
    new = copy.deepcopy(model)
    a = ModelAdapter(new)
    if n == 0:
        return new, {"layers": [], "layer_loss": None, "zero_fraction": 0.0, "sparse_kernel": False,
                     "kernel_note": "nothing pruned: dense model"}
    for i in range(L):
        for name, lin in _projections(a, i).items():
            if lin.in_features % 4:
                raise ValueError(f"layer {i} {name} has K = {lin.in_features} input features, not divisible by 4: "
                                 "2:4 sparsity needs K % 4 == 0")
    losses = None
    if n == L:
        chosen = list(range(L))
    elif criterion == "random":
        chosen = sorted(torch.randperm(L, generator=torch.Generator().manual_seed(ctx.seed))[:n].tolist())
    else:
        losses = _walk(new, criterion, set(range(L)), ctx, apply=False)
        chosen = sorted(sorted(losses, key=losses.get)[:n])
    applied = _walk(new, criterion, set(chosen), ctx, apply=True)
    weights = [lin.weight for i in range(L) for lin in _projections(a, i).values()]
    zero_fraction = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    if ctx.options.get("sparse_kernel", True):
        kernel, note = enable_sparse_kernels(new)
    else:
        kernel, note = False, "sparse kernels disabled (sparse_kernel=False): masked dense weights, no speedup expected"
        _note([m for m in new.modules() if isinstance(m, Sparse24Linear)], note)
    return new, {"layers": chosen, "layer_loss": losses or applied,
                 "zero_fraction": zero_fraction, "sparse_kernel": kernel, "kernel_note": note, **kernel_info(new)}


def _max_24(model) -> float:
    return 0.5


def _24(criterion: str):
    return lambda model, sparsity, ctx: sparse24_prune(model, sparsity, ctx, criterion)


_S24 = dict(max_sparsity=_max_24, options={"sparse_kernel": bool}, ladder=whole(layers, 0.5))  # k of L layers
register("sparse24_magnitude", "static_k_24", "keep the 2 largest |W| of every 4 weights along K",
         baseline="sparse24_random", needs_calibration=False, **_S24)(_24("magnitude"))
register("sparse24_wanda", "static_k_24",
         "keep the 2 largest |W| * ||X|| (calibration input norms) of every 4 along K (Wanda)",
         baseline="sparse24_random", needs_calibration=True, **_S24)(_24("wanda"))
register("sparse24_sparsegpt", "static_k_24",
         "OBS: prune the 2 smallest w^2 / [H^-1]_jj^2 of every 4 along K, update the rest (SparseGPT)",
         baseline="sparse24_random", needs_calibration=True, **_S24)(_24("sparsegpt"))
register("sparse24_random", "static_k_24", "2 random weights of every 4 along K, seeded (random baseline)",
         baseline=None, needs_calibration=False, **_S24)(_24("random"))
