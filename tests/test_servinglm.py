"""Dynamic methods are scored as they serve: prompt prefilled, continuation decoded (prunelib.measure.servinglm)."""
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from prunelib import pruning
from prunelib.model.adapter import ModelAdapter
from prunelib.measure.servinglm import ServingHFLM, prompt_lengths, serving_modules

from conftest import tiny_config

# prompts of 70 tokens: 5 blocks of 16 (block-sparse prefill engages), 18 pages of 4 (Quest decode engages)
METHODS = {"token_prune_attn": dict(layer=2), "token_prune_random": dict(layer=2),
           "sparse_attn_block": dict(block=16, page=4), "sparse_attn_window": dict(block=16, page=4),
           "sparse_attn_random": dict(block=16, page=4)}
N, C = 70, 12  # prompt and continuation lengths
IDS = torch.randint(0, 256, (2, N + C), generator=torch.Generator().manual_seed(4))
TOL = dict(rtol=1e-4, atol=1e-4)


def pruned_model(tiny_model, method):
    return pruning.prune(tiny_model, method, 0.5, seed=2, **METHODS[method])[0]


@torch.inference_mode()
def served(model, ids, n):
    """Logits of the served positions (the last prompt token, then the continuation) from one full forward."""
    with prompt_lengths(model, [n] * ids.shape[0]):
        return model(ids).logits[:, n - 1 :]


@torch.inference_mode()
def prefill_then_decode(model, ids, n):
    """The same positions as served: prefill the prompt, then decode the continuation one cached token at a time."""
    cache = DynamicCache(config=model.config)
    out = [model(ids[:, :n], past_key_values=cache, use_cache=True).logits[:, -1:]]
    for t in range(n, ids.shape[1]):
        out.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("method", METHODS)
def test_full_forward_equals_prefill_plus_cached_decode(tiny_model, method):
    model = pruned_model(tiny_model, method)
    full = served(model, IDS, N)
    torch.testing.assert_close(full, prefill_then_decode(model, IDS, N), **TOL)
    cache = DynamicCache(config=model.config)  # prefill, then the continuation as one cached extension
    with torch.inference_mode():
        model(IDS[:, :N], past_key_values=cache, use_cache=True)
        with prompt_lengths(model, [N, N]):
            ext = model(IDS[:, N:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(ext, full[:, 1:], **TOL)
    dense = served(tiny_model, IDS, N)
    assert (full - dense).abs().max() > 1e-3  # the method did change the served logits


@pytest.mark.parametrize("method", METHODS)
def test_later_tokens_never_change_earlier_served_logits(tiny_model, method):
    model = pruned_model(tiny_model, method)
    base = served(model, IDS, N)
    for t in (N, N + 5, N + C - 1):
        ids = IDS.clone()
        ids[:, t] = (ids[:, t] + 1) % 256
        out = served(model, ids, N)
        torch.testing.assert_close(out[:, : t - N + 1], base[:, : t - N + 1], rtol=0, atol=0)  # positions < t
        assert (out[:, t - N + 1 :] != base[:, t - N + 1 :]).any()  # position t itself sees the change


@pytest.mark.parametrize("method", METHODS)
def test_rows_with_different_prompts_score_as_alone(tiny_model, method):
    model = pruned_model(tiny_model, method)
    lengths = [N, N - 23]
    with torch.inference_mode(), prompt_lengths(model, lengths):
        both = model(IDS).logits
    for b, n in enumerate(lengths):
        torch.testing.assert_close(both[b, n - 1 :], served(model, IDS[b : b + 1], n)[0], **TOL)


def test_prompt_lengths_are_checked_and_reset(tiny_model):
    model = pruned_model(tiny_model, "sparse_attn_block")
    assert serving_modules(tiny_model) == [] and len(serving_modules(model)) == 4
    with pytest.raises(ValueError, match=r"prompt lengths must be one integer >= 1 per row, got \[0\]"):
        with prompt_lengths(model, [0]):
            pass
    with pytest.raises(ValueError, match="3 prompt lengths were set for a batch of 2 rows"):
        with torch.inference_mode(), prompt_lengths(model, [5, 5, 5]):
            model(IDS)
    assert all(m.prompt_lengths is None for m in serving_modules(model))  # reset even after the error


# --- lm-eval --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from prunelib.model.models import embedded_path

    tok = AutoTokenizer.from_pretrained(embedded_path())
    tok.pad_token = tok.eos_token
    return tok


def requests(n=7, seed=0):
    """Token-level loglikelihood requests of mixed lengths: ((context, continuation), ctx ids, cont ids)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ctx = torch.randint(1, 49152, (int(torch.randint(20, 90, (1,), generator=g)),), generator=g).tolist()
        cont = torch.randint(1, 49152, (1 + i % 4,), generator=g).tolist()
        out.append((("", ""), ctx, cont))
    out.append((("", ""), out[0][1], out[0][2][:1]))  # one-token continuation sharing a context
    return out


def test_serving_hflm_is_plain_hflm_for_a_static_model(tokenizer):
    from lm_eval.models.huggingface import HFLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(vocab_size=49152)).eval()
    reqs = requests()
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)._loglikelihood_tokens(reqs)
    serving = ServingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)._loglikelihood_tokens(reqs)
    # the two requests sharing a context are scored in one row (test_sharedprefix.py): equal to 1e-4
    assert [ll for ll, _ in serving] == pytest.approx([ll for ll, _ in plain], abs=1e-4)
    assert [g for _, g in serving] == [g for _, g in plain]


def test_only_the_scored_positions_are_unembedded(tokenizer, monkeypatch):
    """Each batch's logits start at the first position any of its rows scores (its last context token): the
    unembedding and log-softmax of the contexts, most of each row, are skipped; the scores stay plain HFLM's."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(vocab_size=49152)).eval()
    lm = ServingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    shapes, call = [], ServingHFLM._model_call

    def spy(self, inps, **kw):
        out = call(self, inps, **kw)
        shapes.append((inps.shape[1], out.shape[1], min(self._lengths(r)[1] for r in inps.tolist())))
        return out
    monkeypatch.setattr(ServingHFLM, "_model_call", spy)
    lm._loglikelihood_tokens(requests())
    assert shapes and all(kept == width - (prompt - 1) < width for width, kept, prompt in shapes), shapes


DYNAMIC = [m for m in pruning.methods() if not pruning.get(m).cell.static]


@pytest.mark.parametrize("method", DYNAMIC)
def test_serving_hflm_scores_prefill_plus_decode(tokenizer, method):
    """Each loglikelihood is the one prefill(context) + cached decode(continuation) gives, at any batch size; the
    realised sparsity counts no padding (a batch of 4 counts what its rows count alone)."""
    from conftest import synthetic_calibration

    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(tiny_config(vocab_size=49152)).eval()
    s = 0.5 if method in METHODS else 0.25
    model = pruning.prune(dense, method, s, seed=2, calibration=synthetic_calibration(), **METHODS.get(method, {}))[0]
    reqs = requests()
    expected = []
    for _, ctx, cont in reqs:
        ids = torch.tensor([ctx + cont[:-1]])
        logp = prefill_then_decode(model, ids, len(ctx)).log_softmax(-1)[0]
        expected.append(float(logp.gather(-1, torch.tensor(cont)[:, None]).sum()))
    realised = {}
    for bs in (1, 4):
        ModelAdapter(model).reset_stats()
        got = [ll for ll, _ in ServingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=bs)._loglikelihood_tokens(reqs)]
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-3), bs
        realised[bs] = pruning.get(method).hook("realised_sparsity")(model)
    assert realised[4] == pytest.approx(realised[1], abs=1e-9)
    assert 0 < realised[1] < 1  # the method skipped work while scoring


def test_rolling_loglikelihood_prunes_nothing(tokenizer):
    """A perplexity window that starts the text has a one-token prompt: token pruning scores every token at full
    depth, as dense."""
    from lm_eval.api.instance import Instance

    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(tiny_config(vocab_size=49152)).eval()
    model = pruned_model(dense, "token_prune_attn")
    text = "The quick brown fox jumps over the lazy dog. " * 12  # one window of about 130 tokens
    req = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)]
    got = ServingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=512).loglikelihood_rolling(req)
    ref = ServingHFLM(pretrained=dense, tokenizer=tokenizer, batch_size=1, max_length=512).loglikelihood_rolling(req)
    assert got == pytest.approx(ref, rel=1e-6)
