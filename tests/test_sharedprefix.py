"""A question's answer choices scored in one row (prunelib.measure.sharedprefix) give lm-eval's own scores."""
import logging

import pytest
import torch
from lm_eval.models.huggingface import HFLM

from conftest import FAMILIES, synthetic_calibration, tiny_family_model
from prunelib import pruning
from prunelib.measure import sharedprefix
from prunelib.measure.servinglm import ServingHFLM


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from prunelib.model.models import embedded_path

    tok = AutoTokenizer.from_pretrained(embedded_path())
    tok.pad_token = tok.eos_token
    return tok


def choice_requests(docs=9, vocab=256, seed=0):
    """Multiple-choice-like requests: each document's context with 1-4 continuations of 1-7 tokens, and a lone
    request (a context no other request shares) after every third document."""
    g = torch.Generator().manual_seed(seed)

    def toks(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()
    out = []
    for d in range(docs):
        ctx = toks(int(torch.randint(3, 40, (1,), generator=g)))
        out += [(("", ""), ctx, toks(1 + (c * 3 + d) % 7)) for c in range(2 + d % 3)]
        if d % 3 == 0:
            out.append((("", ""), toks(12), toks(2)))
    return out


#: sharper output distributions than the default initialisation's, so that greedy answers differ between choices
SHARP = dict(initializer_range=0.2)


def plain_and_served(model, tokenizer, reqs, batch_size=4):
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)._loglikelihood_tokens(reqs)
    lm = ServingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return plain, lm._loglikelihood_tokens(reqs), lm


def assert_same_scores(plain, served):
    assert [ll for ll, _ in served] == pytest.approx([ll for ll, _ in plain], abs=1e-4)
    assert [g for _, g in served] == [g for _, g in plain]


def test_pack_by_hand():
    ids, pos, allowed, reads = sharedprefix.pack([([5, 6, 7], [[8], [9, 10, 11]]), ([1, 2], [[3, 4], [4, 3]])])
    # doc 1: context 5 6 7, choice [8] adds nothing, choice [9 10 11] adds 9 10; doc 2: context 1 2, choices add 3, 4
    assert ids == [5, 6, 7, 9, 10, 1, 2, 3, 4]
    assert pos == [0, 1, 2, 3, 4, 0, 1, 2, 2]
    assert reads == [[2], [2, 3, 4], [6, 7], [6, 8]]
    expected = torch.zeros(9, 9, dtype=torch.bool)
    for q, keys in {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [0, 1, 2, 3, 4], 5: [5], 6: [5, 6],
                    7: [5, 6, 7], 8: [5, 6, 8]}.items():
        expected[q, keys] = True
    assert torch.equal(allowed, expected)


def test_bins_by_hand():
    assert sharedprefix.bins([10, 3, 7, 4, 6, 2]) == [[0], [2, 1], [4, 3], [5]]  # rows of width 10, longest first
    assert sorted(k for b in sharedprefix.bins([5] * 7) for k in b) == list(range(7))


def test_groups_are_shared_contexts_that_fit():
    reqs = [(None, [1, 2], [3]), (None, [1, 2], [4, 5]), (None, [9], [3]), (None, [7, 7], [1] * 6), (None, [7, 7], [2]),
            (None, [9], [4])]
    assert sharedprefix.groups(reqs, max_length=16) == [[0, 1], [3, 4]]  # [9] is one token: nothing to share
    assert sharedprefix.groups(reqs, max_length=6) == [[0, 1]]  # 2 + 5 + 0 = 7 tokens do not fit in 6
    many = [(None, [5, 6, 7], [1, 2, 3])] * 7  # 3 + 2 per request: three fit in 9 tokens
    assert sharedprefix.groups(many, max_length=9) == [[0, 1, 2], [3, 4, 5]]  # the seventh alone is not a group


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_context_scores_are_lm_evals_on_every_family(family, tokenizer):
    model = tiny_family_model(family, **SHARP)
    reqs = choice_requests()
    plain, served, lm = plain_and_served(model, tokenizer, reqs)
    assert_same_scores(plain, served)
    assert lm.packed == sum(len(g) for g in sharedprefix.groups(reqs, lm.max_length)) > len(reqs) // 2


STATIC = ["shortgpt", "width_flap", "slicegpt", "sparse24_wanda", "lowrank_svdllm"]


@pytest.mark.parametrize("method", STATIC)
def test_shared_context_scores_are_lm_evals_on_pruned_models(method, tokenizer):
    model = tiny_family_model("llama", **SHARP)
    pruned = pruning.prune(model, method, min(0.5, pruning.get(method).max_sparsity(model)),
                           calibration=synthetic_calibration())[0]
    plain, served, lm = plain_and_served(pruned, tokenizer, choice_requests(seed=1))
    assert_same_scores(plain, served)
    assert lm.packed > 0


def test_a_dynamic_model_is_never_packed(tokenizer):
    model = pruning.prune(tiny_family_model("llama"), "token_prune_attn", 0.5, layer=2)[0]
    lm = ServingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    lm._loglikelihood_tokens(choice_requests())
    assert lm.packed == 0


def test_a_model_that_ignores_the_mask_is_scored_the_plain_way(tokenizer, monkeypatch, caplog):
    """If the first packed row disagrees with separate forwards (here: a mask that lets choices see each other),
    nothing is packed and every score is lm-eval's own."""
    pack = sharedprefix.pack

    def leaky(segments):
        ids, pos, allowed, reads = pack(segments)
        return ids, pos, torch.ones_like(allowed).tril(), reads
    monkeypatch.setattr(sharedprefix, "pack", leaky)
    model = tiny_family_model("llama")
    reqs = choice_requests()
    with caplog.at_level(logging.WARNING, logger="prunelib.measure.sharedprefix"):
        plain, served, lm = plain_and_served(model, tokenizer, reqs)
    assert served == plain and lm.packed == 0
    assert "disagrees with separate forwards" in caplog.text


def test_switched_off_it_is_plain_hflm(tokenizer):
    model = tiny_family_model("llama")
    reqs = choice_requests()
    lm = ServingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    lm.share_prefix = False
    assert lm._loglikelihood_tokens(reqs) == HFLM(pretrained=model, tokenizer=tokenizer,
                                                   batch_size=4)._loglikelihood_tokens(reqs)
    assert lm.packed == 0


def test_only_masked_attention_is_packed(tokenizer):
    """Flash-attention takes no 4D mask: a model configured for it is scored the plain way."""
    model = tiny_family_model("llama")
    assert sharedprefix.supports(model)
    model.config._attn_implementation = "flash_attention_2"  # as a CUDA model with flash-attn would be configured
    assert not sharedprefix.supports(model)
    model.config._attn_implementation = "sdpa"
    assert sharedprefix.supports(model)


def test_an_unsupported_attention_is_scored_the_plain_way(tokenizer, monkeypatch):
    monkeypatch.setattr(sharedprefix, "supports", lambda model: False)
    plain, served, lm = plain_and_served(tiny_family_model("llama"), tokenizer, choice_requests())
    assert served == plain and lm.packed == 0
