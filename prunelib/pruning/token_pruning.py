"""Prompt-token pruning: from layer l on, the model runs only the prompt tokens that matter.

Method (FastV, Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2"; LazyLLM,
Fu et al. 2024, "Dynamic Token Pruning for Efficient Long Context LLM Inference"):
the importance of prompt token j is the attention the last prompt token pays to it,
softmax(q_last . K^T / sqrt(d)) averaged over query heads, in the attention of layer
l - 1 (the layer before the first pruned one, as FastV uses layer K - 1). Its q/k
projections run anyway; we only read them (forward hooks on ``q_proj``/``k_proj``), so
the estimator is one extra M = 1 product per head (q_last against S keys), negligible
next to the layer and not costed. The top (1 - s) fraction is kept; the first token
(the attention sink) and the last one (it makes the next token) are always kept.

- ``token_prune_attn``: that criterion, recomputed for every prompt (nothing is learnt;
  calibration text only measures the realised sparsity reported in ``removed``).
- ``token_prune_random``: the baseline, the same keep count of seeded random tokens (first and last
  kept), drawn by position among the real tokens: a prompt's choice depends on the prompt only.

What is served and scored: in serving, the prompt is one prefill and pruned there; every
generated token is a decode step that runs at full depth. A forward's whole input is the
prompt unless :func:`prunelib.measure.servinglm.prompt_lengths` says where each row's prompt
ends (lm-eval scoring through :class:`prunelib.measure.servinglm.ServingHFLM` does): then only
prompt tokens are pruned, importance comes from the last *prompt* token's query over
the prompt's keys, and every later position (the continuation being scored) runs all
layers, attending to the kept prompt and the continuation before it. So one full forward
over prompt + continuation gives, at the last prompt token and at every continuation
position, the logits that prefill(prompt) + cached decode give (tests check it to 1e-4,
and that a later token never changes an earlier served position). Pruned prompt positions carry
early-exit states, never served or scored. Perplexity windows have a one-token prompt: nothing is
pruned there (see :mod:`prunelib.measure.servinglm`).

Option ``layer`` (default ``max(1, L // 4)``, FastV's early layer at our depths): the first layer
that runs the kept tokens only, 1 <= layer <= L - 1.

How the speedup is realised: layers >= l gather the kept hidden states and physically
run on K tokens instead of S (M of every GEMM and both attention lengths shrink); the
rotary embeddings and the attention mask are sliced to the kept positions, which keep
their original position ids. Pruned tokens exit early: they keep the hidden state they
had when they were dropped, scattered back before the final norm, so the output (and
the logits lm-eval needs) always has the input's length. The scatter is one
[B, S, hidden] copy and the final norm runs on all S tokens; the LM head runs only on
the ``logits_to_keep`` rows.

KV cache (``DynamicCache`` only; other caches are refused): layers < l cache every
token, layers >= l only the K kept ones. Pruning happens only on a prefill with an empty
cache and more than one token; every later forward (decode steps, further chunks)
runs all its tokens through all layers, each attending to its own (possibly shorter)
cache: the mask columns of layers >= l are mapped to the cached positions.

Padding (a 4-D or no attention mask; eager or sdpa attention): real tokens are those the
last query row may see. Each row keeps ceil((1 - s) * n_real) of its real tokens (at
least 2), so a padded row is pruned as it would be alone; rows with fewer real tokens
fill the common count K with padding positions (masked, never attended to). Without a
mask every token counts as real: lm-eval's HFLM passes no mask for causal models, so
score token-pruned models with ``batch_size=1`` or padding changes what is kept (with
prompt lengths set, right padding lies after the prompt and changes nothing). Rows that
run fewer positions than the longest (other prompt lengths) fill up with prompt
positions they did not keep, masked as keys for every later forward too, and keeping
their early-exit state (``last_filler`` marks them).

Sparsity = fraction of the prompt tokens removed from layer l on (0 <= s <= 0.99 through
the registry; :func:`token_prune` takes any 0 <= s < 1). Realised
sparsity = fraction of token-layer pairs skipped over the whole model,
(L - l) / L * (1 - K / S). Prompts too short to lose a token (K == S, e.g. 2 tokens, or
s = 0) run dense: a pass-through, not an error.

Realised values: ``shape_overrides()`` of layers >= l gives ``seq_frac`` = kept / total
prompt tokens over the prefills since ``reset_stats()`` (or, if only later forwards ran,
the ratio of their KV length to the full one); ``realised_sparsity(model)`` the
token-layer fraction. ``prune`` leaves the counters at what the calibration batches
realised (also in ``removed``) until the next ``reset_stats()``.
"""
from __future__ import annotations

import copy
import math

import torch
from transformers import DynamicCache

from prunelib.model.adapter import ModelAdapter, rope
from prunelib.pruning.ladders import grid
from prunelib.pruning.registry import register


def keep_count(n: int, sparsity: float) -> int:
    """Tokens kept out of ``n`` real ones: ceil((1 - s) n), at least 2 (first and last), at most n."""
    return min(n, max(2, n - math.floor(sparsity * n + 1e-9)))


def _visible(mask: torch.Tensor) -> torch.Tensor:
    """Boolean 'may attend' of a 4-D mask (bool, or additive float with a large negative for 'no')."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _hide(mask, hidden, q_pos, k_pos):
    """``mask`` (4-D bool / additive float, or None = causal) with the key columns ``hidden`` [B, kv] masked out.

    ``q_pos`` [B, q] / ``k_pos`` [B, kv]: original positions of the query rows / key columns
    (a None mask becomes the causal bool mask over them). ``hidden`` None: ``mask`` unchanged.
    """
    if hidden is None:
        return mask
    if mask is None:
        return (k_pos[:, None, None, :] <= q_pos[:, None, :, None]) & ~hidden[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & ~hidden[:, None, None, :]
    return mask.masked_fill(hidden[:, None, None, :], torch.finfo(mask.dtype).min)


class TokenPruner:
    """State shared by the scoring layer l - 1 and the pruned layers l..L-1 of one model.

    Holds the plan (layer, sparsity, criterion), the tapped q/k of layer l - 1, what the
    current forward kept, and running counters of the tokens seen and kept by prefills
    (and of the KV entries seen by later forwards) since ``reset()``.
    """

    def __init__(self, layer: int, n_layers: int, sparsity: float, criterion: str, seed: int, scaling: float,
                 head_dim: int):
        self.layer, self.n_layers, self.sparsity = layer, n_layers, sparsity
        self.criterion, self.seed, self.scaling, self.head_dim = criterion, seed, scaling, head_dim
        self.taps: dict[str, torch.Tensor] = {}
        self.last_kept = None  # [B, K] positions kept by the latest prefill (for inspection; None: all)
        self.last_filler = None  # [B, K] which of them only fill a shorter row (None: none)
        self.prompt_lengths = None  # [B] where each row's prompt ends (servinglm.prompt_lengths); None: all input
        self.table = torch.empty(0)  # seeded random scores by position (random criterion)
        self.reset()
        self._clear()

    def reset(self) -> None:
        self.seen = self.kept_tokens = 0  # prefill tokens reaching layer l / kept from there on
        self.kv_seen = self.kv_kept = 0  # later forwards: full KV length / KV length of layers >= l
        self.scored = [0, 0]  # served positions after a prompt that was pruned / all served positions

    def _clear(self) -> None:
        self.kept = self.full = self.mask = self.rope = self.position_ids = self.filler = None

    def set_prompt_lengths(self, lengths) -> None:
        """Per-row prompt lengths for the next forwards (see :mod:`prunelib.measure.servinglm`); None: all input is prompt."""
        self.prompt_lengths = lengths

    # --- per forward, at layer l -------------------------------------------
    def begin(self, hidden, mask, rope, position_ids, cache, cache_idx):
        """Decide what layers >= l run on; returns the hidden states they start from."""
        q_k = (self.taps.pop("q", None), self.taps.pop("k", None))
        self._clear()
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(f"token pruning needs a DynamicCache (layers keep different lengths); got {type(cache).__name__}")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
            raise ValueError(f"token pruning needs a 4-D attention mask or none (eager or sdpa attention); got "
                             f"{type(mask).__name__} of shape {tuple(getattr(mask, 'shape', ()))}")
        B, S = hidden.shape[:2]
        past = cache.get_seq_length(cache_idx) if cache is not None else 0
        self.mask, self.rope, self.position_ids = mask, rope, position_ids
        if past > 0 or S == 1:
            self._extend(cache, past, S, B)
            return hidden
        ar = torch.arange(S, device=hidden.device).expand(B, S)
        prompt = ar < self._prompt_ends(B, S, hidden.device)[:, None]  # continuation positions: never pruned
        real = torch.ones(B, S, dtype=torch.bool, device=hidden.device) if mask is None else \
            _visible(mask[:, 0, -1, :]).expand(B, S)
        ctx = real & prompt  # the prunable tokens
        keep = torch.tensor([keep_count(int(n), self.sparsity) for n in ctx.sum(-1).tolist()], device=hidden.device)
        if self.prompt_lengths is not None:  # served: the prompt's last position and every later real one
            served = (real & ~prompt).sum(-1) + (ctx.sum(-1) > 0).long()
            self.scored[0] += int(served[keep < ctx.sum(-1)].sum())
            self.scored[1] += int(served.sum())
        runs = keep + (~prompt).sum(-1)  # positions each row runs from layer l on
        K = int(runs.max())
        n_prompt = int(ctx.sum())  # counted per request: a row's padding and batch fillers are not its work
        self.seen += n_prompt
        kept = self._select(real, ctx, ~prompt, keep, K, q_k, rope) if K < S else None
        if cache is not None:
            cache.prunelib_kept = kept  # original positions held by the caches of layers >= l (None: all)
            cache.prunelib_filler = None if kept is None else self.filler
        if kept is None:  # nothing to prune: dense pass-through
            self.kept_tokens += n_prompt
            self.last_kept = self.last_filler = None
            return hidden
        self.kept_tokens += int(keep.sum())
        self.kept, self.full, self.last_kept, self.last_filler = kept, hidden, kept, self.filler
        rows = kept[:, :, None]
        if mask is not None:
            m = mask.expand(B, -1, -1, -1)
            m = m.gather(2, rows[:, None].expand(B, m.shape[1], K, S))
            self.mask = m.gather(3, kept[:, None, None, :].expand(B, m.shape[1], K, K))
        self.mask = _hide(self.mask, self.filler, kept, kept)
        self.rope = tuple(t.expand(B, -1, -1).gather(1, rows.expand(B, K, t.shape[-1])) for t in rope)
        if position_ids is not None:
            self.position_ids = position_ids.expand(B, -1).gather(1, kept)
        return hidden.gather(1, rows.expand(B, K, hidden.shape[-1]))

    def _prompt_ends(self, B, S, device) -> torch.Tensor:
        """[B] where each row's prompt ends (S when no prompt lengths were set)."""
        n = self.prompt_lengths
        if n is None:
            return torch.full((B,), S, device=device)
        if n.numel() != B:
            raise ValueError(f"token pruning: {n.numel()} prompt lengths were set for a batch of {B} rows")
        return n.to(device)

    def _select(self, real, ctx, forced, keep, K, q_k, rope) -> torch.Tensor:
        """[B, K] sorted positions: per row its ``keep`` best prompt tokens and every ``forced`` one, then fillers.

        A row that runs fewer than K positions fills up with prompt positions it did not keep
        (padding first); ``self.filler`` [B, K] marks them: no query sees them as keys and
        they keep their early-exit state.
        """
        B, S = real.shape
        ar = torch.arange(S, device=real.device).expand(B, S)
        last = torch.where(ctx, ar, -1).amax(-1)
        first = torch.where(ctx, ar, S).amin(-1)
        if self.criterion == "attention":
            score = self._attention(q_k, rope, ctx, last)
        else:  # seeded by the position among the real tokens: a prompt's choice depends on the prompt only
            rank_real = (real.cumsum(-1) - 1).clamp(min=0)
            score = self._random_table(S, real.device)[rank_real]
        score = score.float().masked_fill(~ctx, -math.inf)
        score = score.masked_fill((ar == last[:, None]) | (ar == first[:, None]), math.inf)
        rank = torch.argsort(score, dim=-1, descending=True, stable=True).argsort(-1)
        chosen = (ctx & (rank < keep[:, None])) | forced
        spare = ~chosen
        order = torch.where(spare & ~real, ar, ar + S).masked_fill(~spare, 3 * S)  # padding first
        filler = spare & (order.argsort(-1).argsort(-1) < (K - chosen.sum(-1))[:, None])
        kept = torch.where(chosen | filler, ar, ar + S).sort(-1).values[:, :K]
        self.filler = filler.gather(1, kept) if bool(filler.any()) else None
        return kept

    def _random_table(self, n: int, device) -> torch.Tensor:
        """Seeded random scores by position, drawn in fixed chunks: the same value at a position whatever n is."""
        chunk = 1024
        while self.table.numel() < n:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.table.numel() // chunk)
            self.table = torch.cat([self.table, torch.rand(chunk, generator=g)])
        return self.table[:n].to(device)

    def _attention(self, q_k, rotary, ctx, last) -> torch.Tensor:
        """softmax(q_last K^T / sqrt(d)) of layer l - 1 over the prompt, averaged over heads: [B, S].

        q_last is the last prompt token's query; only prompt tokens are keys (causal).
        """
        q, k = q_k
        if q is None or k is None:
            raise RuntimeError("token pruning: layer l - 1 did not record its q/k projections in this forward")
        B, S = ctx.shape
        d = self.head_dim
        b = torch.arange(B, device=ctx.device)
        cos, sin = (t.expand(B, -1, -1).float() for t in rotary)
        q_last = q[b, last].float().view(B, -1, d)  # [B, Hq, d]: M = 1 per row
        q_last = rope(q_last, cos[b, last][:, None], sin[b, last][:, None])
        keys = rope(k.float().view(B, S, -1, d), cos[:, :, None], sin[:, :, None])  # [B, S, Hkv, d]
        n_kv = keys.shape[2]
        q_last = q_last.view(B, n_kv, -1, d)
        logits = torch.einsum("bkgd,bskd->bkgs", q_last, keys) * self.scaling
        logits = logits.masked_fill(~ctx[:, None, None, :], -math.inf)
        return logits.softmax(-1).mean((1, 2))

    def _extend(self, cache, past, q, B) -> None:
        """A forward after the prefill: all tokens run; map the mask columns of layers >= l to their cache."""
        if cache is None:
            return
        full = cache.get_seq_length(0) - q  # positions cached by layer 0 (never pruned) before this forward
        self.kv_seen += B * full
        self.kv_kept += B * past
        kept, filler = getattr(cache, "prunelib_kept", None), getattr(cache, "prunelib_filler", None)
        if past == full or (self.mask is None and filler is None):  # every cached entry visible to every new token
            return
        if kept is None or kept.shape[0] != B or past < kept.shape[1]:
            raise ValueError("token pruning: this cache was not filled by a token-pruned prefill of the same batch")
        tail = torch.arange(full - (past - kept.shape[1]), full + q, device=kept.device).expand(B, -1)
        cols = torch.cat([kept, tail], dim=1)
        if self.mask is not None:
            m = self.mask.expand(B, -1, q, -1)
            self.mask = m.gather(3, cols[:, None, None, :].expand(B, m.shape[1], q, cols.shape[1]))
        if filler is not None:
            filler = torch.cat([filler, torch.zeros_like(tail, dtype=torch.bool)], dim=1)
        self.mask = _hide(self.mask, filler, torch.arange(full, full + q, device=kept.device).expand(B, q), cols)

    # --- per forward, at the last layer ------------------------------------
    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scatter the kept tokens back among the early-exited ones (input length restored)."""
        out = hidden
        if self.kept is not None:
            idx = self.kept[:, :, None].expand(-1, -1, hidden.shape[-1])
            if self.filler is not None:  # fillers keep their early-exit state
                hidden = torch.where(self.filler[:, :, None], self.full.gather(1, idx), hidden)
            out = self.full.scatter(1, idx, hidden)
        self._clear()
        return out

    # --- realised sparsity -------------------------------------------------
    def seq_frac(self) -> float:
        if self.seen:
            return self.kept_tokens / self.seen
        return self.kv_kept / self.kv_seen if self.kv_seen else 1.0

    def realised_sparsity(self) -> float:
        """Fraction of token-layer pairs skipped over the whole model on the prefills since ``reset()``."""
        return (self.n_layers - self.layer) / self.n_layers * (1 - self.seq_frac())


class _Tap:
    """Forward hook on the Linear holding the q (or k) role of layer l - 1: hands the role's output
    columns ``rows`` = (start, stop) to the pruner, a view (no copy); a fused q/k/v Linear gets two taps.

    An object rather than a closure, so a deep copy of the model hooks into the copied pruner.
    """

    def __init__(self, pruner: TokenPruner, name: str, rows: tuple | None = None):
        self.pruner, self.name, self.rows = pruner, name, rows

    def __call__(self, module, args, out):
        rows = getattr(self, "rows", None)  # None: the whole output (checkpoints written before fused layouts)
        self.pruner.taps[self.name] = out if rows is None else out[..., rows[0]:rows[1]]


class TokenPrunedLayer:
    """Mixin for decoder layers l..L-1: run the kept tokens only (see the module docstring).

    Mixed into the model's own decoder-layer class, so every attribute, parameter name
    and the original forward stay as they were.
    """

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        p = self.token_pruner
        if self.token_prune_first:
            hidden_states = p.begin(hidden_states, attention_mask, position_embeddings, position_ids, past_key_values,
                                    self._cache_idx())
        out = super().forward(hidden_states, attention_mask=p.mask, position_ids=p.position_ids,
                              past_key_values=past_key_values, use_cache=use_cache, position_embeddings=p.rope, **kwargs)
        return p.finish(out) if self.token_prune_last else out

    def _cache_idx(self) -> int:
        """The cache index of this layer's attention, recorded at wrap time (checkpoints written before
        that: read from the child module that has one)."""
        idx = getattr(self, "token_prune_cache_idx", None)
        return idx if idx is not None else next(m.layer_idx for m in self.children() if hasattr(m, "layer_idx"))

    def shape_overrides(self) -> dict:
        """Realised fraction of the prompt tokens this layer ran on since ``reset_stats()``."""
        return {"seq_frac": self.token_pruner.seq_frac()}

    def reset_stats(self) -> None:
        self.token_pruner.reset()

    def set_prompt_lengths(self, lengths) -> None:
        """Where each row's prompt ends in the next forwards (:func:`prunelib.measure.servinglm.prompt_lengths`)."""
        self.token_pruner.set_prompt_lengths(lengths)


_CLASSES: dict[type, type] = {}


def _pruned_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"TokenPruned{base.__name__}", (TokenPrunedLayer, base), {"__module__": __name__})
    return _CLASSES[base]


def _pruner(model) -> TokenPruner | None:
    for layer in ModelAdapter(model).layers:
        if isinstance(layer, TokenPrunedLayer):
            return layer.token_pruner
    return None


def active_share(model) -> float | None:
    """The share of served positions (scored through prompt lengths, since ``reset_stats()``) that follow a prompt
    from which tokens were actually dropped; None when nothing was served (a short prompt keeps every token)."""
    p = _pruner(model)
    if p is None or not p.scored[1]:
        return None
    return p.scored[0] / p.scored[1]


def realised_sparsity(model) -> float:
    """Fraction of token-layer pairs the model skipped since its last ``reset_stats()`` (0.0 if none)."""
    p = _pruner(model)
    return 0.0 if p is None else p.realised_sparsity()


def token_prune(model, sparsity: float, criterion: str, *, layer: int | None = None, seed: int = 0, calibration=None):
    """A copy of ``model`` whose layers >= ``layer`` run only the kept prompt tokens; returns ``(model, removed)``."""
    if criterion not in ("attention", "random"):
        raise ValueError(f"criterion {criterion!r} is not known; allowed: 'attention', 'random'")
    a = ModelAdapter(model)
    L = len(a.layers)
    if L < 2:
        raise ValueError(f"token pruning needs at least 2 layers (one to score, one to prune); the model has {L}")
    layer = max(1, L // 4) if layer is None else layer
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= L - 1:
        raise ValueError(f"layer {layer!r} is out of range: allowed 1 <= layer <= {L - 1} (layer - 1 scores the tokens)")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity {sparsity!r} is out of range: allowed 0 <= s < 1")
    new = copy.deepcopy(model)
    na = ModelAdapter(new)
    if any(na.attn(i) is None for i in range(layer - 1, L)):
        raise ValueError(f"token pruning needs the attention of layers {layer - 1}..{L - 1}; some were removed")
    scorer = na.attn(layer - 1)
    p = TokenPruner(layer, L, float(sparsity), criterion, seed, float(getattr(scorer, "scaling", a.head_dim ** -0.5)),
                    a.head_dim)
    if criterion == "attention":
        for role in ("q", "k"):
            lin, rows = na.role_rows(layer - 1, role)
            lin.register_forward_hook(_Tap(p, role, (rows.start, rows.stop)))
    for i in range(layer, L):
        mod = na.layers[i]
        mod.__class__ = _pruned_class(type(mod))
        mod.token_pruner, mod.token_prune_first, mod.token_prune_last = p, i == layer, i == L - 1
        mod.token_prune_cache_idx = na.attn(i).layer_idx
    removed = {"layer": layer, "keep_ratio": 1 - float(sparsity), "criterion": criterion,
               "seq_frac": None, "realised_sparsity": None}
    if calibration is not None:
        dev = next(new.parameters()).device
        with torch.inference_mode():
            for ids in calibration.batches(4):
                new(ids.to(dev), use_cache=False, logits_to_keep=1)
        removed.update(seq_frac=p.seq_frac(), realised_sparsity=p.realised_sparsity())
    return new, removed


_OPTIONS = ("layer",)


def _options(ctx) -> dict:
    bad = sorted(set(ctx.options) - set(_OPTIONS))
    if bad:
        raise ValueError(f"unknown token-pruning options {bad}; allowed: {list(_OPTIONS)}")
    return dict(ctx.options)


def _max_sparsity(model) -> float:
    return 0.99


@register("token_prune_attn", "token_pruning",
          "attention of the last prompt token at layer l - 1 (FastV / LazyLLM), first and last token always kept",
          baseline="token_prune_random", needs_calibration=False, max_sparsity=_max_sparsity, options={"layer": int},
          ladder=grid(0.1))
def token_prune_attn(model, sparsity, ctx):
    return token_prune(model, sparsity, "attention", seed=ctx.seed, calibration=ctx.calibration, **_options(ctx))


@register("token_prune_random", "token_pruning",
          "seeded random prompt tokens (baseline), same keep count, first and last token always kept",
          baseline=None, needs_calibration=False, max_sparsity=_max_sparsity, options={"layer": int},
          ladder=grid(0.1))
def token_prune_random(model, sparsity, ctx):
    return token_prune(model, sparsity, "random", seed=ctx.seed, calibration=ctx.calibration, **_options(ctx))
