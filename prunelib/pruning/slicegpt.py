"""Static hidden width: SliceGPT, delete rows and columns of every weight after a PCA rotation.

Ashkboos et al., "SliceGPT: Compress Large Language Models by Deleting Rows and
Columns" (ICLR 2024), following its reference implementation (microsoft/TransformerCompression,
``rotate_and_slice``):

1. *Computational invariance.* Every RMSNorm scale is folded into the Linears that read
   the norm's output (input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, final
   norm -> lm_head), leaving scale-free norms ``x / sqrt(sum(x^2) / d + eps)``. A tied LM
   head is untied first (``config.tie_word_embeddings = False``): the embedding and the
   head get different rotations. A scale-free RMSNorm commutes with any orthogonal Q, so
   the network can run in rotated coordinates: embedding ``E Q``, input projections
   ``W Q`` (K side), output projections ``Q^T W`` (N side, bias too), and where the two
   ends of a residual connection use different bases Q_a, Q_b the residual passes
   through a *shortcut* matrix ``Q_a^T Q_b`` (one after the attention, one after the MLP).
2. *PCA.* Each basis holds the eigenvectors of ``sum X^T X`` (float64, eigenvalues in
   descending order) of the residual-stream signal at that point on calibration tokens:
   the input of layer 0 (the embedding output), the input of each MLP and the output
   of each layer (the last one also feeds the LM head). As in the reference, layers are
   processed in sequence and each signal is collected from the model already sliced
   before it, so later bases see (and absorb) the error of earlier slicing.
3. *Slicing.* Only the first d' principal components are kept: every basis is cut to
   ``Q[:, :d']`` and the shortcuts to d' x d'. The residual stream is physically d' wide:
   embedding [V, d'], q/k/v/gate/up have K = d', o_proj/down_proj N = d', shortcuts
   d' x d', lm_head K = d' (``config.hidden_size = d'``). The scale-free norms keep
   dividing by the *dense* d, as the reference ``RMSN(mean_dim=hidden_size)`` does: the
   rotation preserves the norm of the full vector, and the sliced vector's norm is the
   approximation of it the paper relies on.

``slicegpt_random`` is the baseline of the same pipeline with a random orthogonal Q
(Haar, seeded by ``ctx.seed``) in place of every PCA basis; it needs no calibration.

Sparsity = the fraction of the hidden (residual-stream) dimension removed:
``d' = round((1 - s) * d)``, rounded up to a multiple of ``round_to`` (option, default 8;
None for no rounding), 0 <= s < 1 with d' >= 8. At s = 0 the model is only rotated and
reproduces the dense logits to float tolerance (with no calibration data at s = 0 the
PCA method uses Q = I). Parameters shrink less than s: each layer gains two d' x d'
shortcuts, and a tied head becomes a second [V, d'] matrix.

Speedup: every GEMM that reads or writes the residual stream shrinks (K of q/k/v/gate/up/
lm_head, N of o_proj/down_proj) by d'/d; the two shortcut GEMMs per layer are the
overhead (``shape_overrides()`` reports ``shortcut = 2`` to the cost model).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from prunelib.core.validate import InputError
from prunelib.model.adapter import ModelAdapter
from prunelib.model.calibration import layer0_inputs
from prunelib.pruning.ladders import hidden_quantum, snapped
from prunelib.pruning.registry import register


class ScaleFreeRMSNorm(nn.Module):
    """RMSNorm without a scale that normalises by the dense width ``norm_dim`` (SliceGPT's RMSN)."""

    def __init__(self, norm_dim: int, eps: float):
        super().__init__()
        self.norm_dim, self.eps = norm_dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / self.norm_dim + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"norm_dim={self.norm_dim}, eps={self.eps}"


class SlicedDecoderLayer(nn.Module):
    """A pre-norm decoder layer on a rotated, sliced residual stream with two shortcut matrices.

    ``h = attn_shortcut(x) + attn(norm(x))``; ``out = mlp_shortcut(h) + mlp(norm(h))``. The attention,
    MLP and norms sit under the names the model's family adapter gives them (``names``), so the
    adapter finds them in a sliced model as in a dense one.
    """

    def __init__(self, attn: nn.Module, mlp: nn.Module, names: tuple, width: int, norm_dim: int, eps: float,
                 ref: torch.Tensor):
        super().__init__()
        self.names = tuple(names)  # attention, MLP, input norm, post norm
        for name, mod in zip(self.names, (attn, mlp, ScaleFreeRMSNorm(norm_dim, eps), ScaleFreeRMSNorm(norm_dim, eps))):
            setattr(self, name, mod)
        self.attn_shortcut = nn.Linear(width, width, bias=False, device=ref.device, dtype=ref.dtype)
        self.mlp_shortcut = nn.Linear(width, width, bias=False, device=ref.device, dtype=ref.dtype)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                cache_position=None, position_embeddings=None, **kwargs):
        attn, mlp, norm_in, norm_post = (getattr(self, n) for n in self.names)
        attn_out, _ = attn(
            hidden_states=norm_in(hidden_states), attention_mask=attention_mask,
            position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
            cache_position=cache_position, position_embeddings=position_embeddings, **kwargs)
        h = self.attn_shortcut(hidden_states) + attn_out
        return self.mlp_shortcut(h) + mlp(norm_post(h))

    def shape_overrides(self) -> dict:
        return {"shortcut": 2}


class _Bases:
    """The sequence of orthogonal bases: PCA of calibration signals, random (baseline), or identity."""

    def __init__(self, d: int, width: int, random: bool, seed: int, device=None):
        self.d, self.width, self.device = d, width, torch.device(device or "cpu")
        # on the model's device: a d x d float64 QR per basis (65 for an 8B model) takes minutes on one CPU
        # thread and milliseconds on a GPU (CPU results unchanged: the same CPU generator and seed)
        self.gen = (torch.Generator(device=self.device if self.device.type == "cuda" else "cpu").manual_seed(seed)
                    if random else None)

    def next(self, signals) -> torch.Tensor:
        """The kept basis [d, d'] (float64): top-d' eigenvectors of sum X^T X over ``signals``."""
        if self.gen is not None:
            q, r = _lapack(torch.linalg.qr, torch.randn(self.d, self.d, generator=self.gen, dtype=torch.float64,
                                                        device=self.device))
            q = q * torch.sign(torch.diagonal(r))  # Haar-distributed
        elif signals is None:
            q = torch.eye(self.d, dtype=torch.float64, device=self.device)
        else:
            gram = sum(x.reshape(-1, self.d).double().T @ x.reshape(-1, self.d).double() for x in signals)
            vals, vecs = _lapack(torch.linalg.eigh, gram)
            q = vecs[:, torch.argsort(vals, descending=True)].to(self.device)
        return q[:, : self.width]


def _lapack(fn, x: torch.Tensor):
    """``fn(x)`` for a d x d LAPACK factorisation (eigh, QR), single-threaded on CPU: such small problems
    gain nothing from threads, and LAPACK's thread barriers stall badly on an oversubscribed machine."""
    if x.device.type != "cpu":
        return fn(x)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(x)
    finally:
        torch.set_num_threads(threads)


def _set(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Give ``lin`` a new (float64-computed) weight and bias, fixing its feature counts."""
    lin.weight = nn.Parameter(weight.to(lin.weight.dtype).contiguous())
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(lin.bias.dtype).contiguous())
    lin.out_features, lin.in_features = weight.shape


def _rotate_in(lins, q: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """Input projections read the rotated (sliced) stream: W <- W diag(scale) Q."""
    for lin in lins:
        w = lin.weight.detach().double()
        if scale is not None:
            w = w * scale.detach().double().to(w.device)
        _set(lin, w @ q.to(w.device))


def _rotate_out(lin: nn.Linear, q: torch.Tensor) -> None:
    """Output projections write the rotated (sliced) stream: W <- Q^T W, b <- Q^T b."""
    qd = q.to(lin.weight.device)
    _set(lin, qd.T @ lin.weight.detach().double(), None if lin.bias is None else qd.T @ lin.bias.detach().double())


def _width(d: int, sparsity: float, round_to) -> int:
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be None or a positive integer, got {round_to!r}")
    if round_to and round_to > d // 2:  # d' rounded up to d: nothing sliced, and the rotations make it larger
        raise InputError(f"option round_to={round_to!r} of pruning method 'slicegpt' is not allowed: expected an "
                         f"integer 1 <= round_to <= {d // 2} (half the hidden size {d}; 8 by default)")
    width = int(round((1 - sparsity) * d))
    if round_to:
        width = min(d, math.ceil(width / round_to) * round_to)
    if not 0 <= sparsity < 1 or width < 8:
        raise ValueError(f"sparsity {sparsity!r} leaves {width} of {d} hidden dimensions; allowed: 0 <= s <= {1 - 8 / d:.4g} "
                         f"(at least 8 kept)")
    return width


@torch.no_grad()
def slicegpt(model, sparsity: float, ctx, random: bool = False):
    """Rotate (PCA or random) and slice the residual stream of a copy of ``model`` to d' dimensions."""
    a = ModelAdapter(model)
    d = a.hidden_size
    odd = [i for i, layer in enumerate(a.layers) if a.attn(i) is None or a.mlp(i) is None or isinstance(layer, SlicedDecoderLayer)]
    if odd:
        raise ValueError(f"layers {odd} have a removed sublayer or are already sliced; SliceGPT needs complete dense layers")
    width = _width(d, sparsity, ctx.options.get("round_to", 8))
    new = copy.deepcopy(model)
    na = ModelAdapter(new)
    cfg, dtype = new.config, next(new.parameters()).dtype
    eps = getattr(na.final_norm, "variance_epsilon", getattr(cfg, "rms_norm_eps", 1e-6))
    if na.tied or getattr(cfg, "tie_word_embeddings", False):
        na.lm_head.weight = nn.Parameter(na.lm_head.weight.detach().clone())
        cfg.tie_word_embeddings = False

    bases = _Bases(d, width, random, ctx.seed, next(new.parameters()).device)
    batches = None if random or ctx.calibration is None else layer0_inputs(new, ctx.calibration)
    q = bases.next(None if batches is None else [x for x, _ in batches])
    emb = na.embed
    emb.weight = nn.Parameter((emb.weight.detach().double() @ q.to(emb.weight.device)).to(dtype))
    emb.embedding_dim = width
    if batches is not None:
        batches = [((x.double() @ q.to(x.device)).to(dtype), kw) for x, kw in batches]

    fam = na.fam
    names = (fam.attn_name, fam.mlp_name, fam.input_norm_name, fam.post_norm_name)
    for i in range(len(na.layers)):
        attn, mlp, by_input = na.attn(i), na.mlp(i), na.linears_by_input(i)
        layer = SlicedDecoderLayer(attn, mlp, names, width, d, eps, next(na.layers[i].parameters()))
        norm_in, norm_post = layer.get_submodule(names[2]), layer.get_submodule(names[3])
        _rotate_in(by_input["attention_in"].values(), q, na.norm(i, "input").weight)
        # signal entering the MLP (dense coordinates): residual mapped back by Q^T plus the unrotated attention output
        mid = None if batches is None else [
            (x.double() @ q.T.to(x.device)).to(dtype) + attn(hidden_states=norm_in(x), **kw)[0]
            for x, kw in batches]
        q_mid = bases.next(mid)
        layer.attn_shortcut.weight.copy_((q.T @ q_mid).T.to(dtype))
        for lin in by_input["o"].values():
            _rotate_out(lin, q_mid)
        _rotate_in(by_input["mlp_in"].values(), q_mid, na.norm(i, "post").weight)
        if batches is not None:
            mid = [(h.double() @ q_mid.to(h.device)).to(dtype) for h in mid]  # the sliced MLP input
        out = None if mid is None else [
            (h.double() @ q_mid.T.to(h.device)).to(dtype) + mlp(norm_post(h)) for h in mid]
        q_out = bases.next(out)
        layer.mlp_shortcut.weight.copy_((q_mid.T @ q_out).T.to(dtype))
        for lin in by_input["down"].values():
            _rotate_out(lin, q_out)
        if batches is not None:
            batches = [((o.double() @ q_out.to(o.device)).to(dtype), kw) for o, (_, kw) in zip(out, batches)]
        na.layers[i] = layer
        q = q_out

    _rotate_in([na.lm_head], q, na.final_norm.weight)
    na.set_final_norm(ScaleFreeRMSNorm(d, eps))
    if getattr(cfg, "head_dim", None) is None:
        cfg.head_dim = a.head_dim
    cfg.hidden_size = width
    return new, {"hidden_removed": d - width, "hidden_kept": width}


def _max_hidden(model) -> float:
    return 1 - 8 / ModelAdapter(model).hidden_size


register("slicegpt", "static_hidden",
         "PCA of the residual stream on calibration data (eigenvectors of X^T X); slice the smallest components (SliceGPT)",
         baseline="slicegpt_random", needs_calibration=True, max_sparsity=_max_hidden, options={"round_to": int},
         ladder=snapped(0.05, hidden_quantum(8)))(slicegpt)
register("slicegpt_random", "static_hidden",
         "random orthogonal rotation of the residual stream (seeded), then slice: baseline for SliceGPT's PCA",
         baseline=None, needs_calibration=False, max_sparsity=_max_hidden, options={"round_to": int},
         ladder=snapped(0.05, hidden_quantum(8)))(
    lambda model, sparsity, ctx: slicegpt(model, sparsity, ctx, random=True))
