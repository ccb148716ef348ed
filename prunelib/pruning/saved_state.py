"""What the pruning methods' own modules save in a checkpoint, and the functions that rebuild them.

A checkpoint (:mod:`prunelib.model.checkpoint`) stores a module a method adds as its kind plus its
attributes as plain data (numbers, strings, per-layer sizes, tensors); the function registered here for
its class rebuilds it on the meta device from those attributes and the children already rebuilt below it,
checking what it is given (types, ranges, children that fit each other and the config); the loader then
sets the saved attributes and fills the tensors. Methods whose modules are the model's own (depth and
width pruning change layer lists and shapes only) need nothing here.

- low rank: :class:`LowRankLinear` (feature counts and rank; its two factors are Linears);
- 2:4: :class:`Sparse24Linear` (a Linear; its weights are stored dense);
- SliceGPT: :class:`ScaleFreeRMSNorm` (dense width, eps) and :class:`SlicedDecoderLayer` (the family's
  sublayer names; two hidden x hidden shortcuts);
- dynamic depth: :class:`RoutedDecoderLayer` (variant, skip rate, threshold, role rows, counters) with a
  :class:`LinearRouter` (hidden -> 1) or :class:`RandomRouter` (its hash key);
- sparse attention: :class:`SparseAttention` (method, density, block, page, seed, role rows, counters);
- token pruning: the decoder layers made :class:`TokenPrunedLayer` (first / last flags, cache index) and
  the one :class:`TokenPruner` they share (plan, counters, tables), with its :class:`_Tap` hooks.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from prunelib.model.adapter import ModelAdapter
from prunelib.model.checkpoint_kinds import Rebuild, register_kind
from prunelib.pruning.lowrank import LowRankLinear
from prunelib.pruning.routed_layer import PHASES, VARIANTS, LinearRouter, RandomRouter, RoutedDecoderLayer
from prunelib.pruning.semistructured import Sparse24Linear
from prunelib.pruning.slicegpt import ScaleFreeRMSNorm, SlicedDecoderLayer
from prunelib.pruning.sparse_attention import SparseAttention
from prunelib.pruning.sparse_select import METHODS, check_settings
from prunelib.pruning.token_pruning import TokenPrunedLayer, TokenPruner, _pruned_class, _Tap


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _tensor(r: Rebuild, name: str, dims: int, floating: bool, optional: bool = True):
    t = r.get(name, torch.Tensor, optional=optional)
    if t is not None and (t.dim() != dims or t.is_floating_point() != floating):
        raise r.fail(f"attribute {name!r} is a {t.dim()}-D {t.dtype} tensor, not {dims}-D {'float' if floating else 'int'}")
    return t


def _phase(r: Rebuild, name: str = "last_phase") -> None:
    if r.get(name, str, optional=True) not in (None, *PHASES):
        raise r.fail(f"attribute {name!r} = {r.attrs[name]!r} is not None or one of {PHASES}")


def _low_rank(r: Rebuild) -> LowRankLinear:
    n_in, n_out, rank = r.int("in_features", 1), r.int("out_features", 1), r.int("rank", 1)
    r.only("first", "second")
    first, second = r.child("first", nn.Linear), r.child("second", nn.Linear)
    if (first.in_features, first.out_features, second.in_features, second.out_features) != (n_in, rank, rank, n_out):
        raise r.fail(f"factors {first.in_features}->{first.out_features} and {second.in_features}->"
                     f"{second.out_features} are not a rank-{rank} pair for {n_in}->{n_out}")
    return LowRankLinear(n_in, n_out, rank, False, device="meta")


def _sparse24(r: Rebuild) -> Sparse24Linear:
    r.get("kernel_note", str, optional=True), r.only()
    return Sparse24Linear(r.int("in_features", 1), r.int("out_features", 1), bias=r.has_param("bias"), device="meta")


def _scale_free_norm(r: Rebuild) -> ScaleFreeRMSNorm:
    r.only()
    return ScaleFreeRMSNorm(r.int("norm_dim", 1), r.float("eps", 0))


def _sliced_layer(r: Rebuild) -> SlicedDecoderLayer:
    names = r.names()
    r.only(*names, "attn_shortcut", "mlp_shortcut")
    r.child(names[0], nn.Module), r.child(names[1], nn.Module)
    for n in names[2:]:
        r.child(n, ScaleFreeRMSNorm)
    width = r.config.hidden_size  # SliceGPT's config holds the sliced width
    for n in ("attn_shortcut", "mlp_shortcut"):
        lin = r.child(n, nn.Linear)
        if (lin.in_features, lin.out_features) != (width, width):
            raise r.fail(f"{n} is {lin.in_features} -> {lin.out_features}, not {width} -> {width} (hidden_size)")
    return r.new(SlicedDecoderLayer)


def _routed_layer(r: Rebuild) -> RoutedDecoderLayer:
    names = r.names()
    r.only(*names, "router"), _phase(r)
    layer = SimpleNamespace(**{n: r.child(n, nn.Module) for n in names})
    router = r.child("router", (LinearRouter, RandomRouter))
    rows = r.role_rows(getattr(layer, names[0]))
    return RoutedDecoderLayer(layer, router, r.str("variant", VARIANTS), r.float("skip", 0, 1),
                              r.get("threshold", float), r.family, rows)


def _linear_router(r: Rebuild) -> LinearRouter:
    hidden = r.int("in_features", 1)
    if hidden != r.config.hidden_size or r.int("out_features") != 1:
        raise r.fail(f"a router is hidden_size {r.config.hidden_size} -> 1, not {hidden} -> {r.attrs['out_features']}")
    r.only()
    router = r.new(LinearRouter)
    nn.Linear.__init__(router, hidden, 1, device="meta")
    return router


def _random_router(r: Rebuild) -> RandomRouter:
    r.int("key", 0, 2**32 - 1), r.only()
    return RandomRouter(0)  # its hashed key is one of the saved attributes


def _sparse_attention(r: Rebuild) -> SparseAttention:
    check_settings(r.float("density", 0, 1), r.int("block", 1), r.int("page", 1))
    r.str("method", METHODS), r.int("seed"), r.float("scaling", 0)
    r.int("layer_idx", 0, r.config.num_hidden_layers - 1)
    if r.int("head_dim", 1) != _head_dim(r.config):
        raise r.fail(f"head_dim {r.attrs['head_dim']} is not the config's {_head_dim(r.config)}")
    r.get("config", type(r.config)), r.get("is_causal", bool), r.float("attention_dropout", 0, 1)
    rows = r.role_rows(SimpleNamespace(**r.children))
    r.only(*{name for name, _, _ in rows.values()})
    width = {role: stop - start for role, (_, start, stop) in rows.items()}
    if (r.int("num_key_value_heads", 1), r.int("num_key_value_groups", 1)) != \
            (width["k"] // r.attrs["head_dim"], width["q"] // width["k"]):
        raise r.fail(f"num_key_value_heads / _groups {r.attrs['num_key_value_heads']} / "
                     f"{r.attrs['num_key_value_groups']} do not fit the q / k rows {width['q']} / {width['k']}")
    r.counters("kept", int), r.counters("total", int), r.counters("estimated", bool), r.counters("tiled", bool)
    _phase(r), _tensor(r, "prompt_lengths", 1, False)
    return r.new(SparseAttention)


def _token_pruned_layer(r: Rebuild) -> TokenPrunedLayer:
    if r.base is None or not type(r.base).__name__.endswith("DecoderLayer"):
        raise r.fail("token pruning wraps a decoder layer the config builds here; there is none")
    r.get("token_pruner", TokenPruner), r.bool("token_prune_first"), r.bool("token_prune_last")
    r.int("token_prune_cache_idx", 0, r.config.num_hidden_layers - 1), r.only(*r.base._modules)
    r.base.__class__ = _pruned_class(type(r.base))
    return r.base


def _token_pruner(r: Rebuild) -> TokenPruner:
    n = r.int("n_layers", 2, r.config.num_hidden_layers)
    for name in ("seen", "kept_tokens", "kv_seen", "kv_kept"):
        r.int(name, 0)
    _tensor(r, "table", 1, True, optional=False), _tensor(r, "prompt_lengths", 1, False)
    _tensor(r, "last_kept", 2, False), _tensor(r, "last_filler", 2, False)
    taps = r.get("taps", dict)
    for name in ("kept", "full", "mask", "position_ids", "filler"):  # one forward's; None between forwards
        r.get(name, torch.Tensor, optional=True)
    rope = r.get("rope", tuple, optional=True)
    if not all(isinstance(t, torch.Tensor) for t in (*taps.values(), *(rope or ()))) or not set(taps) <= {"q", "k"}:
        raise r.fail("taps / rope do not hold tensors of q / k")
    return TokenPruner(r.int("layer", 1, n - 1), n, r.float("sparsity", 0, 1), r.str("criterion", ("attention", "random")),
                       r.int("seed"), r.float("scaling", 0), r.int("head_dim", 1))


def _tap(r: Rebuild) -> _Tap:
    rows = r.get("rows", tuple, optional=True)
    if rows is not None and not (len(rows) == 2 and all(isinstance(x, int) for x in rows) and 0 <= rows[0] < rows[1]):
        raise r.fail(f"rows {rows!r} is not a (start, stop) row range")
    return _Tap(r.get("pruner", TokenPruner), r.str("name", ("q", "k")), rows)


def _token_pruning_fits(model) -> None:
    """Layers l..L-1, and those only, run token pruning, with one pruner, flags and cache indices that fit, and
    (attention criterion) the pruner's two taps on layer l - 1's q and k rows."""
    a = ModelAdapter(model)
    pruned = [i for i, layer in enumerate(a.layers) if isinstance(layer, TokenPrunedLayer)]
    taps = [(m, h) for m in model.modules() for h in m._forward_hooks.values() if isinstance(h, _Tap)]
    if not pruned:
        raise ValueError("a token pruner without token-pruned layers")
    p = a.layers[pruned[0]].token_pruner
    if p.n_layers != len(a.layers) or pruned != list(range(p.layer, p.n_layers)):
        raise ValueError(f"token-pruned layers {pruned}, but the pruner's plan is {p.layer}..{p.n_layers - 1}")
    for i in pruned:
        layer = a.layers[i]
        if layer.token_pruner is not p or (layer.token_prune_first, layer.token_prune_last) != \
                (i == p.layer, i == p.n_layers - 1) or layer.token_prune_cache_idx != a.attn(i).layer_idx:
            raise ValueError(f"layer {i}'s pruner, first / last flags or cache index do not fit the plan")
    want = {(id(lin), role, (rows.start, rows.stop)) for role in ("q", "k")
            for lin, rows in [a.role_rows(p.layer - 1, role)]} if p.criterion == "attention" else set()
    if {(id(m), h.name, h.rows) for m, h in taps} != want or len(taps) != len(want) or any(h.pruner is not p
                                                                                          for _, h in taps):
        raise ValueError(f"the pruner's taps are not the q and k rows of layer {p.layer - 1}")


register_kind(LowRankLinear, _low_rank)
register_kind(Sparse24Linear, _sparse24)
register_kind(ScaleFreeRMSNorm, _scale_free_norm)
register_kind(SlicedDecoderLayer, _sliced_layer)
register_kind(RoutedDecoderLayer, _routed_layer)
register_kind(LinearRouter, _linear_router)
register_kind(RandomRouter, _random_router)
register_kind(SparseAttention, _sparse_attention)
register_kind(TokenPrunedLayer, _token_pruned_layer, subclasses=True, module=True, check=_token_pruning_fits)
register_kind(TokenPruner, _token_pruner, check=_token_pruning_fits)
register_kind(_Tap, _tap, hook=True, check=_token_pruning_fits)
