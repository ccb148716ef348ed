"""Score a model as it would serve: the prompt is prefilled, the continuation is decoded.

In serving, a request's prompt runs as one prefill and every later token as a decode
step over the KV cache. lm-eval's ``HFLM`` scores a (context, continuation) pair in one
forward pass over ``context + continuation[:-1]``; for a static model that equals
prefill plus cached decode, but a dynamic method that treats the whole input as its
prompt (prompt-token pruning, block-sparse prefill) would prune or sparsify the very
positions being scored. This module tells such a model where each row's prompt ends:

- :func:`prompt_lengths` (context manager): inside it, every forward of the model treats
  positions ``< lengths[b]`` of row ``b`` as the prompt (prefill rules) and later
  positions as continuation tokens (decode rules, at full depth). Modules opt in by
  defining ``set_prompt_lengths(lengths_or_None)``; a model without such a module (any
  static model) is untouched. Outside the block, a forward's whole input is the prompt.
- :class:`ServingHFLM`: ``HFLM`` that derives each loglikelihood request's prompt length
  (``len(context)`` after lm-eval's left truncation) and wraps its ``_model_call`` in
  :func:`prompt_lengths`. For a static model it is plain ``HFLM`` (identical scores), but for the shared contexts
  below.

Only the positions a batch scores are unembedded: HFLM log-softmaxes the logits of every position and keeps the
continuation's, so ``_model_call`` asks the model for the logits of the last positions only (``logits_to_keep``,
from the first position any row of the batch scores), which HFLM reads at the same positions (its causal
``ctx_len`` offset). The vocabulary projection of the context tokens, about a sixth of a scoring of the embedded
model (a 49k vocabulary), and a ``[batch, length, vocab]`` float tensor per batch are saved; the scores are
unchanged (tested equal to plain HFLM's).

Answer choices of a static model share their context: requests with the same context (a multiple-choice
document's choices) are scored in one row, the context once and each choice after it under a tree mask
(:mod:`prunelib.measure.sharedprefix`; ARC-Easy's quick-suite tokens 20,161 -> 6,675, 2.4x faster; PIQA 1.1x),
equal to lm-eval's separate forwards to 1e-4 and checked against them on the first row of every request set.
A model with dynamic modules is never packed (its rules would see the choices as one prompt); ``packed`` counts
the requests scored this way (stored as ``shared_context`` in each quality row's ``extra``).

Batches: HFLM right-pads a batch and passes no attention mask. For a static model (or a
causal dynamic one) padding after a row's tokens cannot change them, but a dynamic
method would route, prune and count the pad tokens. So for a model with dynamic modules
(any module with ``set_prompt_lengths`` or ``reset_stats``) ServingHFLM passes the
padding mask of each row's real length: pad tokens are neither routed nor counted in the
realised sparsity, and a batch scores as its rows would alone (tested at batch 1 and 4).

The position lm-eval scores first (the last context token) is the prefill's last
position; the continuation's positions are decode steps. With lm-eval's one-token
logits cache, requests whose ``context + continuation[:-1]`` coincide share one forward;
if their context lengths differ, the shortest is used, so each request's scored
positions are still served by prefill or decode, never from an early-exited state.

Rolling loglikelihood (perplexity): lm-eval cuts a text into windows of ``max_length``
tokens. A full window's context is one token (the prefix token, or the token before
it), so its prompt is that token and every scored token is a decode step: prompt-token
pruning prunes nothing there, and sparse attention is scored by its decode rule (Quest
pages). Only a text's last, shorter window has a longer context (the text before it),
which is then a prompt, prefilled as such. Either way no scored position comes from a
pruned (early-exited) state; perplexity measures the decode path, not prompt pruning.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm  # a per-request bar like HFLM's own: text on stderr, which notebooks send to their log

from prunelib.measure import sharedprefix

HOOK = "set_prompt_lengths"


def serving_modules(model) -> list:
    """The modules of ``model`` that change behaviour with the prompt length (empty: a static model)."""
    return [m for m in model.modules() if callable(getattr(m, HOOK, None))]


def dynamic_modules(model) -> list:
    """The modules of ``model`` whose work depends on the input: prompt-aware or counting what they skip."""
    return [m for m in model.modules() if callable(getattr(m, HOOK, None)) or callable(getattr(m, "reset_stats", None))]


@contextmanager
def prompt_lengths(model, lengths):
    """Forwards of ``model`` inside the block treat positions ``< lengths[b]`` of row ``b`` as the prompt."""
    lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1)
    if lengths.numel() == 0 or bool((lengths < 1).any()):
        raise ValueError(f"prompt lengths must be one integer >= 1 per row, got {lengths.tolist()}")
    mods = serving_modules(model)
    for m in mods:
        getattr(m, HOOK)(lengths)
    try:
        yield
    finally:
        for m in mods:
            getattr(m, HOOK)(None)


class ServingHFLM(HFLM):
    """lm-eval's HFLM that tells the model where each scored request's context ends (see the module docstring)."""

    _prompts: dict | None = None  # input tokens -> prompt length, for the requests being scored
    _prompt_aware = False  # whether the model has modules that take prompt lengths

    _dynamic = False  # whether the model has modules whose work depends on the input (masked, counted)

    #: requests scored with their context shared (:mod:`prunelib.measure.sharedprefix`), since the last reset
    packed = 0
    #: whether a static model's answer choices are scored in one row per context (False: lm-eval's way only)
    share_prefix = True

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        bs = override_bs or self.batch_size_per_gpu
        if not (self.share_prefix and isinstance(bs, int) and sharedprefix.supports(self.model)
                and not dynamic_modules(self.model)):
            return self._served(requests, disable_tqdm, override_bs)
        groups = sharedprefix.groups(requests, self.max_length)
        packed = {}
        if groups:
            bar = tqdm(total=sum(map(len, groups)), desc="Shared-context choices", disable=disable_tqdm or self.rank != 0)
            packed = sharedprefix.score(self, requests, groups, bs, progress=bar) or {}
            bar.close()
        self.packed += len(packed)
        out = dict(packed)
        rest = [i for i in range(len(requests)) if i not in packed]
        if rest:
            out.update(zip(rest, self._served([requests[i] for i in rest], disable_tqdm, override_bs)))
        for i, (key, _, _) in enumerate(requests):
            if i in packed and key is not None:
                self.cache_hook.add_partial("loglikelihood", key, packed[i])
        return [out[i] for i in range(len(requests))]

    def _served(self, requests, disable_tqdm: bool = False, override_bs=None):
        """HFLM's scoring, each row told where its prompt ends."""
        prompts = {}
        for _, context, continuation in requests:
            inp = tuple((context + continuation)[-(self.max_length + 1):][:-1])  # as HFLM builds it
            n = len(inp) - len(continuation) + 1
            prompts[inp] = min(n, prompts.get(inp, n))
        self._prompts = prompts
        self._dynamic = bool(dynamic_modules(self.model))  # found once per request set, not per batch
        self._prompt_aware = bool(serving_modules(self.model))
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._prompts = None

    def _lengths(self, row: list[int]) -> tuple[int, int]:
        """(real length, prompt length) of one input row, right-padded with 0: the longest known input it starts with."""
        for end in range(len(row), 0, -1):
            n = self._prompts.get(tuple(row[:end]))
            if n is not None:
                return end, n
            if row[end - 1] != 0:  # only zero padding may follow the input
                break
        raise RuntimeError(f"ServingHFLM: an input row of length {len(row)} matches no loglikelihood request")

    def _model_call(self, inps, attn_mask=None, labels=None):
        if self._prompts is None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        real, prompt = zip(*(self._lengths(r) for r in inps.tolist()))
        # logits of the last `keep` positions only: from the first position any row scores (its last prompt token)
        # to the end; HFLM reads the shorter logits at the same positions (its ctx_len offset), and the unembedding
        # and log-softmax of every context position, most of each row, are never computed
        keep = inps.shape[1] - (min(prompt) - 1)
        kw = dict(logits_to_keep=keep)
        if self._dynamic:  # pad tokens are neither routed nor counted (a static model, as HFLM, gets no mask)
            mask = torch.arange(inps.shape[1], device=inps.device)[None] < torch.tensor(real, device=inps.device)[:, None]
            kw["attention_mask"] = mask.long()
        prompts = prompt_lengths(self.model, prompt) if self._prompt_aware else nullcontext()
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None), prompts:
            return self.model(inps, **kw).logits
