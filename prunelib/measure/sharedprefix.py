"""Score a question's answer choices in one row: the context once, every continuation after it.

A multiple-choice task (ARC, PIQA, HellaSwag, ...) asks lm-eval for ``log P(continuation_i | context)`` for each
choice ``i`` of a document, and lm-eval's ``HFLM`` runs one forward over ``context + continuation_i[:-1]`` per
choice: the context, most of each row, runs once per choice (on the quick suite 20,161 ARC-Easy tokens where
6,675 are distinct, 12,329 PIQA tokens for 9,953). For a static causal model a continuation token's logits depend
only on the context and on the earlier tokens of its own continuation, so one row can hold them all
(:func:`pack`): the context, then each continuation's tokens but its last, each continuation's positions
restarting where the context ends, under a mask that lets a continuation see the context and its own earlier
tokens only (a tree of prefixes, as in speculative decoding's tree attention). The log-likelihood of each choice is
read at its own positions (:func:`score`); it equals the separate forward's up to float rounding (summation over a
longer, masked key axis), tested against lm-eval's own ``HFLM`` to 1e-4.

Only for a model without dynamic modules (a dynamic rule would see the packed choices as one prompt), and only for
a context shared by two or more requests whose packed row fits ``max_length``; every other request is scored by
``HFLM`` as before. The mask is additive (0 or the dtype's minimum), which both the eager and the SDPA attention of
transformers apply as given (a 4D mask is passed through unchanged; other attention kernels, flash-attention's,
take no such mask, so a model using one is not packed: :func:`supports`); :func:`score` checks its first row against
separate forwards and returns None (the caller scores everything the plain way) if a model's attention ignored it.
"""
from __future__ import annotations

import logging
from collections import defaultdict

import torch

log = logging.getLogger(__name__)

#: how far a packed row's log-likelihood may lie from the separate forwards' in the first-batch check
CHECK_TOL = 1e-3
#: a forward holds at most ``batch_size * ROW_TOKENS`` tokens (lm-eval's batches of short requests hold about as
#: many), so that wide packed rows do not make a batch's activations and log-probs unbounded
ROW_TOKENS = 128


#: the attention implementations of transformers that apply a 4D additive mask as given
MASKED_ATTENTION = ("eager", "sdpa")


def supports(model) -> bool:
    """Whether ``model``'s attention applies the packed rows' mask (eager or SDPA attention)."""
    return getattr(model.config, "_attn_implementation", None) in MASKED_ATTENTION


def groups(requests, max_length: int) -> list[list[int]]:
    """Indices of ``requests`` ((key, context ids, continuation ids)) sharing a context of two or more tokens, two or
    more requests per group, each group's packed row (the context, then every continuation but its last token) at
    most ``max_length`` tokens: a larger set of requests sharing a context is split into groups that fit. (A one-token
    context, lm-eval's prefix token before BLiMP's sentences or a perplexity window, saves nothing shared.)"""
    by_ctx = defaultdict(list)
    for i, (_, ctx, cont) in enumerate(requests):
        if len(ctx) > 1 and cont:
            by_ctx[tuple(ctx)].append(i)
    out = []
    for ctx, idx in by_ctx.items():
        group, width = [], len(ctx)
        for i in idx:
            extra = len(requests[i][2]) - 1
            if group and width + extra > max_length:
                out.append(group)
                group, width = [], len(ctx)
            if width + extra <= max_length:
                group.append(i)
                width += extra
        out.append(group)
    return [g for g in out if len(g) > 1]


def pack(segments):
    """One row holding one or more documents, ``segments`` = [(context ids, [continuation ids, ...])]: (token ids,
    position ids, allowed [L, L] bool, and per continuation, in order, the row indices whose logits predict its
    tokens). A continuation sees its own context and its own earlier tokens; documents do not see each other."""
    ids, pos, reads, blocks = [], [], [], []
    for ctx, conts in segments:
        c0 = len(ids)
        ids += ctx
        pos += range(len(ctx))
        spans = []
        for cont in conts:
            s = len(ids)
            ids += cont[:-1]
            pos += range(len(ctx), len(ctx) + len(cont) - 1)
            reads.append([c0 + len(ctx) - 1] + list(range(s, len(ids))))
            spans.append((s, len(ids)))
        blocks.append((c0, c0 + len(ctx), spans))
    n = len(ids)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for c0, c1, spans in blocks:
        allowed[c0:c1, c0:c1] = causal[c0:c1, c0:c1]
        for s, e in spans:
            allowed[s:e, c0:c1] = True
            allowed[s:e, s:e] = causal[s:e, s:e]
    return ids, pos, allowed, reads


def bins(lengths: list[int]) -> list[list[int]]:
    """First-fit decreasing: indices of ``lengths`` grouped so that each group's sum is at most the longest length
    (rows of equal width, so a batch is nearly free of padding)."""
    width = max(lengths)
    out, room = [], []
    for k in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for b, free in enumerate(room):
            if lengths[k] <= free:
                out[b].append(k)
                room[b] -= lengths[k]
                break
        else:
            out.append([k])
            room.append(width - lengths[k])
    return out


def _batch(rows, dtype, device):
    """Right-padded ids, positions and an additive [B, 1, L, L] mask; pad positions attend to themselves only."""
    width = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)
    for b, (row_ids, row_pos, row_allowed, _) in enumerate(rows):
        n = len(row_ids)
        ids[b, :n], pos[b, :n] = torch.tensor(row_ids), torch.tensor(row_pos)
        allowed[b, :n, :n] = row_allowed
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return ids.to(device), pos.to(device), mask[:, None].to(device)


def _autocast(lm):
    """The autocast lm-eval's HFLM runs its forwards under (none unless it was given a mixed-precision dtype)."""
    return torch.autocast(device_type=lm.device.type, dtype=lm.mixed_precision_dtype,
                          enabled=lm.mixed_precision_dtype is not None)


def _logprobs(lm, ids, reads, **kw):
    """Log-probs ``[sum of reads, vocab]`` at ``reads`` ((row, position) pairs) of one forward of ``lm.model``.

    Only those positions are unembedded: the output head's input is cut to them (a forward pre-hook on
    ``get_output_embeddings()``), so no head work is spent on context positions (the head is a fifth of the
    embedded model's per-token work, its 49k vocabulary)."""
    bidx, pidx = (torch.tensor(v, device=lm.device) for v in zip(*reads))
    handle = lm.model.get_output_embeddings().register_forward_pre_hook(lambda m, args: (args[0][bidx, pidx][None],))
    try:
        with _autocast(lm):
            logits = lm.model(ids, **kw).logits
    finally:
        handle.remove()
    return torch.log_softmax(logits[0], dim=-1, dtype=lm.softmax_dtype)


def _answers(logp, requests, order):
    """(log-likelihood, greedy) of each request of ``order`` from consecutive slices of ``logp``."""
    out, at = {}, 0
    for i in order:
        cont = torch.tensor(requests[i][2], device=logp.device)
        lp = logp[at:at + len(cont)]
        at += len(cont)
        out[i] = (float(lp.gather(-1, cont[:, None]).sum()), bool((lp.argmax(-1) == cont).all()))
    return out


@torch.no_grad()
def _packed(lm, rows, order, requests):
    """(log-likelihood, greedy) of the requests ``order`` whose continuations ``rows`` hold, in that order."""
    dtype = lm.mixed_precision_dtype or next(lm.model.parameters()).dtype
    ids, pos, mask = _batch(rows, dtype, lm.device)
    reads = [(b, p) for b, r in enumerate(rows) for read in r[3] for p in read]
    return _answers(_logprobs(lm, ids, reads, attention_mask=mask, position_ids=pos), requests, order)


@torch.no_grad()
def _separate(lm, requests, order):
    """The same requests scored as lm-eval does, one row each over context + continuation[:-1] (right-padded; a
    static causal model's real positions do not see the padding): the check of :func:`score`."""
    inps = [list(requests[i][1]) + list(requests[i][2])[:-1] for i in order]
    ids = torch.zeros(len(inps), max(map(len, inps)), dtype=torch.long)
    for b, inp in enumerate(inps):
        ids[b, :len(inp)] = torch.tensor(inp)
    reads = [(b, p) for b, i in enumerate(order) for p in range(len(requests[i][1]) - 1, len(inps[b]))]
    return _answers(_logprobs(lm, ids.to(lm.device), reads), requests, order)


def score(lm, requests, groups_, batch_size: int, progress=None) -> dict | None:
    """``{request index: (log-likelihood, greedy)}`` for the requests of ``groups_`` (:func:`groups`), scored
    packed by ``lm`` (an lm-eval ``HFLM``): documents binned into rows of the longest one's width
    (:func:`bins`), ``batch_size`` rows a forward. None if the first row disagrees with lm-eval's separate
    forwards by more than :data:`CHECK_TOL` (a model whose attention ignored the packed mask)."""
    segments = [(list(requests[g[0]][1]), [list(requests[i][2]) for i in g]) for g in groups_]
    lengths = [len(ctx) + sum(len(c) - 1 for c in conts) for ctx, conts in segments]
    rows = [(pack([segments[k] for k in b]), [i for k in b for i in groups_[k]]) for b in bins(lengths)]
    per = max(1, min(batch_size, batch_size * ROW_TOKENS // max(lengths)))  # rows a forward, bounded in tokens
    out = {}
    for s in range(0, len(rows), per):
        chunk = rows[s:s + per]
        got = _packed(lm, [r for r, _ in chunk], [i for _, order in chunk for i in order], requests)
        if s == 0:
            sample = chunk[0][1]
            ref = _separate(lm, requests, sample)
            worst = max(abs(got[i][0] - ref[i][0]) for i in sample)
            if worst > CHECK_TOL:
                log.warning("shared-prefix scoring disagrees with separate forwards by %.3g (> %g) on %s: scoring "
                            "every request separately", worst, CHECK_TOL, type(lm.model).__name__)
                return None
        out.update(got)
        if progress is not None:
            progress.update(sum(len(order) for _, order in chunk))
    return out
