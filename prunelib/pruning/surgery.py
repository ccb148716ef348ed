"""Physical model surgery: remove layers, slice heads and channels. No criteria here.

Every function returns a new model (the input is left untouched) whose Linear layers
really are smaller, so the speedup (or its absence) is real. GEMM view: removing a
layer deletes all its GEMMs; slicing MLP channels shrinks N of gate/up and K of down;
slicing heads shrinks N of q/k/v and K of o_proj.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from prunelib.model.adapter import ModelAdapter, Removed


def _slice_linear(lin: nn.Linear, idx: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping ``idx`` along output (dim=0) or input (dim=1) features."""
    w = lin.weight.data.index_select(dim, idx.to(lin.weight.device))
    out_f, in_f = w.shape
    new = nn.Linear(in_f, out_f, bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.data if dim == 1 else lin.bias.data.index_select(0, idx.to(w.device)))
    return new


def remove_layers(model: nn.Module, indices) -> nn.Module:
    """A copy of ``model`` without the decoder layers in ``indices`` (KV cache shrinks with them)."""
    a = ModelAdapter(model)
    n = len(a.layers)
    drop = sorted(set(int(i) for i in indices))
    bad = [i for i in drop if not 0 <= i < n]
    if bad:
        raise ValueError(f"layer indices {bad} out of range; the model has layers 0..{n - 1}")
    if len(drop) >= n:
        raise ValueError(f"cannot remove all {n} layers; remove at most {n - 1}")
    new = copy.deepcopy(model)
    na = ModelAdapter(new)
    na.set_layers([layer for i, layer in enumerate(na.layers) if i not in set(drop)])
    _renumber_attention(new)
    if getattr(new.config, "layer_types", None):
        new.config.layer_types = [t for i, t in enumerate(new.config.layer_types) if i not in set(drop)]
    return new


def _slice_roles(a: ModelAdapter, i: int, rows: dict) -> None:
    """In layer ``i``, keep ``rows[role]`` (indices within the role's own rows) of each role's output rows.

    Roles sharing a fused Linear (Phi-3's gate_up_proj) are sliced together: one new Linear keeps
    each role's rows at that role's offset.
    """
    by_linear = {}
    for role, idx in rows.items():
        lin, block = a.role_rows(i, role)
        by_linear.setdefault(id(lin), (lin, role, []))[2].append(idx + block.start)
    for lin, role, parts in by_linear.values():
        a.set_linear(i, a.linear_name(role), _slice_linear(lin, torch.cat(parts), 0))


def slice_mlp(model: nn.Module, keep: dict[int, torch.Tensor]) -> nn.Module:
    """A copy keeping, in layer ``i``, the intermediate channels ``keep[i]`` (N of gate/up, K of down)."""
    new = copy.deepcopy(model)
    a = ModelAdapter(new)
    for i, idx in keep.items():
        idx = torch.as_tensor(idx, dtype=torch.long).sort().values
        if idx.numel() == 0:
            raise ValueError(f"layer {i}: keeping no MLP channel; remove the sublayer instead")
        _slice_roles(a, i, {"gate": idx, "up": idx})
        a.set_proj(i, "down", _slice_linear(a.proj(i, "down"), idx, 1))
    return new


def slice_heads(model: nn.Module, keep_kv: dict[int, torch.Tensor]) -> nn.Module:
    """A copy keeping, in layer ``i``, the KV heads ``keep_kv[i]`` and all query heads of their groups.

    GQA-aware: query heads are removed group by group, so the query/KV ratio (and
    ``num_key_value_groups``) stays valid. Where a family fuses q/k/v (Phi-3's ``qkv_proj``) the
    kept rows of each role are sliced together and the layer is told its head counts.
    """
    new = copy.deepcopy(model)
    a = ModelAdapter(new)
    hd = a.head_dim
    for i, kv in keep_kv.items():
        kv = torch.as_tensor(kv, dtype=torch.long).sort().values
        shape = a.layer_shape(i)
        if kv.numel() == 0:
            raise ValueError(f"layer {i}: keeping no KV head; remove the attention sublayer instead")
        if kv.max() >= shape.n_kv_heads or kv.min() < 0:
            raise ValueError(f"layer {i}: KV head indices must be in 0..{shape.n_kv_heads - 1}, got {kv.tolist()}")
        group = shape.n_heads // shape.n_kv_heads
        q_heads = (kv[:, None] * group + torch.arange(group)).reshape(-1)
        q_rows = (q_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
        kv_rows = (kv[:, None] * hd + torch.arange(hd)).reshape(-1)
        _slice_roles(a, i, {"q": q_rows, "k": kv_rows, "v": kv_rows})
        a.set_proj(i, "o", _slice_linear(a.proj(i, "o"), q_rows, 1))
        a.set_head_counts(i, q_heads.numel(), kv.numel())
    return new


def _renumber_attention(model: nn.Module) -> None:
    """Give the remaining attention sublayers consecutive KV-cache slots 0, 1, ..."""
    a = ModelAdapter(model)
    j = 0
    for i in range(len(a.layers)):
        if a.attn(i) is not None:
            a.attn(i).layer_idx = j
            j += 1


def remove_sublayers(model: nn.Module, attention=(), mlp=()) -> nn.Module:
    """A copy without the attention sublayers of layers ``attention`` and the MLPs of layers ``mlp``.

    The residual stream passes through unchanged where a sublayer was; the KV cache
    keeps entries only for the attention sublayers that remain.
    """
    n = len(ModelAdapter(model).layers)
    for what, idx in (("attention", attention), ("mlp", mlp)):
        bad = [i for i in idx if not 0 <= int(i) < n]
        if bad:
            raise ValueError(f"{what} sublayer indices {bad} out of range; the model has layers 0..{n - 1}")
    new = copy.deepcopy(model)
    na = ModelAdapter(new)
    for what, idx in (("attention", attention), ("mlp", mlp)):
        for i in set(int(i) for i in idx):
            na.set_sublayer(i, what, Removed(what))
    _renumber_attention(new)
    return new
