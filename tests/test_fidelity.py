import numpy as np
import pytest
import torch

from prunelib import fidelity as fidelity_cli
from prunelib.measure import fidelity
from prunelib.core.config import data_dir
from prunelib.core.store import ResultsStore
from test_quality import tiny_lm  # noqa: F401  (the fixture: a 2-layer random Llama with the embedded tokenizer)

needs_data = pytest.mark.skipif(not (data_dir() / "SOURCES.md").is_file(), reason="offline data kit not found")


def test_divergence_by_hand():
    p = torch.tensor([0.5, 0.25, 0.25]).log().view(1, 1, 3)
    q = torch.tensor([0.25, 0.5, 0.25]).log().view(1, 1, 3)
    r = fidelity.divergence(p, q, torch.tensor([[1]]))
    assert r["kl"][0] == pytest.approx(0.5 * np.log(2) + 0.25 * np.log(0.5))  # = 0.25 ln 2
    assert r["dnll"][0] == pytest.approx(-np.log(0.5) + np.log(0.25))  # NLL 0.69 (pruned) - 1.39 (dense)
    same = fidelity.divergence(p, p, torch.tensor([[0]]))
    assert same["kl"][0] == 0 and same["dnll"][0] == 0


def test_bootstrap_ci_by_hand():
    # two windows: a resample's mean is 0, 0.5 or 1 (probabilities 1/4, 1/2, 1/4) -> 2.5/97.5 percentiles 0 and 1
    assert fidelity.bootstrap_ci(np.array([0.0, 1.0]), iters=2000, seed=5) == (0.0, 1.0)
    assert fidelity.bootstrap_ci(np.array([0.3, 0.3, 0.3]), iters=50) == pytest.approx((0.3, 0.3))


@needs_data
def test_windows_deterministic_and_bad_input(embedded):
    tok = embedded[1]
    a = fidelity.windows(tok, "ptb", 4, 32)
    assert a.shape == (4, 32) and torch.equal(a, fidelity.windows(tok, "ptb", 4, 32))
    assert not torch.equal(a, fidelity.windows(tok, "wikitext2", 4, 32))
    with pytest.raises(ValueError, match=r"fidelity domain 'c4' is unknown; allowed: \['ptb', 'ptb-long', 'wikitext2'\]"):
        fidelity.windows(tok, "c4")
    with pytest.raises(ValueError, match="windows must be an integer >= 1, got 0"):
        fidelity.windows(tok, "ptb", 0)
    with pytest.raises(ValueError, match="length must be an integer >= 4, got 2.5"):
        fidelity.windows(tok, "ptb", 2, 2.5)


def test_served_equals_full_forward_for_a_static_model(tiny_model):
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    served = fidelity.served_logprobs(tiny_model, ids)
    with torch.no_grad():
        full = torch.log_softmax(tiny_model(ids).logits.float(), -1)[:, 9:-1]  # positions predicting tokens 10..19
    assert served.shape == (3, 10, 256)
    torch.testing.assert_close(served, full, atol=1e-4, rtol=1e-4)


def test_dense_head_inputs_are_cached_on_disk(tiny_model, tmp_path, monkeypatch):
    """The dense model's head inputs outlive the process (a notebook kernel); its log-probs are its head applied to
    them, equal to the served forward's; another prompt length is another file; a torn file is measured again."""
    from prunelib.model.models import fingerprint

    monkeypatch.setenv("PRUNELIB_CACHE", str(tmp_path))
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    fp = fingerprint(tiny_model)
    first = fidelity.dense_head_inputs(tiny_model, fp, "ptb", ids)
    assert first.shape == (3, 10, tiny_model.config.hidden_size)
    torch.testing.assert_close(fidelity.head_logprobs(tiny_model, first), fidelity.served_logprobs(tiny_model, ids),
                               atol=1e-5, rtol=1e-5)
    files = list((tmp_path / "fidelity").glob("*.safetensors"))
    assert len(files) == 1
    forward = fidelity._head_inputs
    calls = []
    monkeypatch.setattr(fidelity, "_head_inputs", lambda *a: calls.append(a) or forward(*a))
    assert torch.equal(fidelity.dense_head_inputs(tiny_model, fp, "ptb", ids), first) and not calls  # read back
    assert fidelity.dense_head_inputs(tiny_model, fp, "ptb", ids, 15).shape == (3, 5, first.shape[-1]) and calls
    assert len(list((tmp_path / "fidelity").glob("*.safetensors"))) == 2
    files[0].write_bytes(b"torn")
    assert torch.equal(fidelity.dense_head_inputs(tiny_model, fp, "ptb", ids), first) and len(calls) == 2


@needs_data
def test_measure_stores_self_zero_and_separates(tiny_lm, tmp_path, monkeypatch):
    model, tok = tiny_lm
    store = ResultsStore(tmp_path / "r.jsonl")
    kw = dict(store=store, n=3, length=16, iters=200)
    self_rows = fidelity.measure(model, model, tok, **kw)
    assert len(self_rows) == 4 and set(self_rows.extra.map(lambda e: e["domain"])) == {"ptb", "wikitext2"}
    assert (self_rows[["value", "ci_low", "ci_high"]] == 0).all().all()
    other = type(model)(model.config).eval()  # a different random model: far from the dense one
    rows = fidelity.measure(model, other, tok, method="width_flap", sparsity=0.1, **kw)
    kl = rows[rows.metric == "fidelity_kl"]
    assert (kl.ci_low > 0).all() and (kl.ci_low <= kl.value).all() and (kl.value <= kl.ci_high).all()
    e = kl.extra.iloc[0]
    assert e["windows"] == 3 and e["window_len"] == 16 and e["scored_tokens"] == 24 and len(e["per_window"]) == 3
    assert e["seconds"] > 0 and rows.n.iloc[0] == 24
    monkeypatch.setattr(fidelity, "served_logprobs", lambda *a: pytest.fail("stored fidelity was re-measured"))
    again = fidelity.measure(model, other, tok, **kw)
    assert again.value.tolist() == rows.value.tolist()
    with pytest.raises(ValueError, match="fidelity domain 'c4' is unknown"):
        fidelity.measure(model, other, tok, domains=("c4",), **kw)


def test_closing_table_and_spearman_from_the_store(capsys):
    base = dict(model="m", phase="quality", device="cpu", dtype="float32")
    rows = []
    for method, cell, s, loss, kl in (("shortgpt", "static_depth", 0.25, 22.0, 1.1),
                                      ("width_flap", "static_width", 0.1, 3.0, 0.3),
                                      ("width_flap", "static_width", 0.25, 30.0, 2.0),  # not the table's sparsity
                                      ("slicegpt", "static_hidden", 0.25, 15.0, 0.9),
                                      ("last_n", "static_depth", 0.25, 40.0, 1.8)):
        rows.append(dict(base, method=method, cell=cell, sparsity=s, metric="quality_loss_pct", value=loss,
                         ci_low=loss - 5, ci_high=loss + 5, config_hash=f"l{method}{s}",
                         extra={"seed": 0, "stderr": 4.0, "ci_method": "paired_bootstrap", "seconds": 60.0}))
        for domain in ("ptb", "wikitext2"):
            for metric, v in (("fidelity_kl", kl), ("fidelity_dnll", kl / 2)):
                rows.append(dict(base, method=method, cell=cell, sparsity=s, metric=metric, value=v, ci_low=v * 0.9,
                                 ci_high=v * 1.1, config_hash=f"f{method}{s}{domain}",
                                 extra={"seed": 0, "domain": domain, "seconds": 8.0}))
    ResultsStore().append(rows)
    t = fidelity_cli.closing_table(ResultsStore().load())
    assert sorted(t.method) == ["last_n", "shortgpt", "slicegpt", "width_flap"]
    w = t[t.method == "width_flap"].iloc[0]
    assert w.sparsity == 0.1 and w.loss_pct == 3.0 and w.kl_ptb == 0.3 and w.fidelity_s == 16.0 and w.quality_s == 60
    rho, n = fidelity_cli.spearman(t)
    assert n == 4 and rho == pytest.approx(1.0)  # the ranks agree: 3 < 15 < 22 < 40 and 0.3 < 0.9 < 1.1 < 1.8
    fidelity_cli.main(["--model", "m", "--table"])
    out = capsys.readouterr().out
    assert "Spearman(kl_ptb, quick-suite loss) = 1.000 over 4 methods" in out and "[17.0, 27.0]" in out
    with pytest.raises(SystemExit):
        fidelity_cli.main(["--measure", "nope"])
    assert "unknown methods ['nope']" in capsys.readouterr().err


@pytest.mark.parametrize("method,sparsity", [("token_prune_attn", 0.5), ("sparse_attn_block", 0.5),
                                             ("dyn_depth_router", 0.25)])
def test_served_equals_prefill_then_cached_decode_for_dynamic_methods(method, sparsity):
    """Fidelity scores a dynamic model as it serves: a prompt prefill, then one decode step per token."""
    pytest.importorskip("prunelib.measure.servinglm")
    from conftest import synthetic_calibration, tiny_config
    from transformers import AutoModelForCausalLM

    from prunelib.pruning import prune

    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(tiny_config(max_position_embeddings=1024)).eval()
    pruned, _ = prune(dense, method, sparsity, calibration=synthetic_calibration(n=6, length=64))
    ids = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(1))
    served = fidelity.served_logprobs(pruned, ids)
    with torch.no_grad():
        out = pruned(ids[:, :100], use_cache=True)
        cache, steps = out.past_key_values, [out.logits[:, -1:]]
        for i in range(100, 199):
            steps.append(pruned(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(served, torch.log_softmax(torch.cat(steps, 1).float(), -1), atol=1e-4, rtol=1e-4)


def test_closing_table_with_fidelity_only():
    ResultsStore().append(dict(model="m", method="shortgpt", cell="static_depth", sparsity=0.25, phase="quality",
                               metric="fidelity_kl", value=1.0, ci_low=0.9, ci_high=1.1, config_hash="k",
                               extra={"seed": 0, "domain": "ptb", "seconds": 9.0}))
    t = fidelity_cli.closing_table(ResultsStore().load())
    assert list(t.method) == ["shortgpt"] and t.kl_ptb[0] == 1.0 and "loss_pct" not in t
    assert np.isnan(fidelity_cli.spearman(t)[0])


def test_t_interval_by_hand():
    lo, hi = fidelity.t_interval(np.array([1.0, 2.0, 3.0]))
    half = 4.302652729911275 * 1.0 / np.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert (lo, hi) == pytest.approx((2.0 - half, 2.0 + half))
    assert fidelity.t_interval(np.array([0.4])) == (0.4, 0.4)


def test_fidelity_ci_covers_the_many_window_mean():
    """Per-window KL is skewed (here log-normal, skewness 1.75): the stored CI, a t-interval over the default 32
    windows, covers the mean of a large window population at least 91% of the time at a nominal 95% (measured
    0.92-0.93 for this fixture; BCa gave the same); the percentile bootstrap over 8 windows, what rows stored
    before, covers 0.87, which is what this check exists to catch."""
    rng = np.random.default_rng(0)
    population = rng.lognormal(0.0, 0.5, 20_000)
    truth, trials = population.mean(), 600

    def coverage(n, ci):
        hits = 0
        for _ in range(trials):
            lo, hi = ci(rng.choice(population, n, replace=False))
            hits += lo <= truth <= hi
        return hits / trials

    assert fidelity.DEFAULT_WINDOWS >= 32
    t32 = coverage(fidelity.DEFAULT_WINDOWS, fidelity.t_interval)
    assert 0.91 <= t32 <= 0.98, t32
    boot8 = coverage(8, lambda x: fidelity.bootstrap_ci(x, iters=400, seed=int(rng.integers(1 << 30))))
    assert boot8 < 0.90, boot8


@needs_data
def test_long_prefill_windows_score_sparse_attention_where_its_prefill_rule_runs(tiny_lm, tmp_path):
    """ptb-long prefills 1536 tokens and scores 512: the block-sparse prefill rule runs on every window, and the row
    says so (realised prefill sparsity while scoring, active share 1); the short windows barely run it."""
    from prunelib import pruning

    model, tok = tiny_lm
    pruned, _ = pruning.prune(model, "sparse_attn_block", 0.75)
    store = ResultsStore(tmp_path / "r.jsonl")
    rows = fidelity.measure(model, pruned, tok, store=store, method="sparse_attn_block", sparsity=0.75,
                            cell="dynamic_nk_attention", domains=("ptb", "ptb-long"), iters=50)
    kl = rows[rows.metric == "fidelity_kl"].set_index(rows[rows.metric == "fidelity_kl"].extra.map(lambda e: e["domain"]))
    long, short = kl.loc["ptb-long"].extra, kl.loc["ptb"].extra
    assert (long["windows"], long["window_len"], long["context"], long["scored_tokens"]) == (8, 2048, 1536, 8 * 512)
    assert long["active_share"] == 1.0 and long["realised_prefill"] > 0.5
    assert short["context"] == 64 and short["realised_prefill"] == 0.0  # 64-token prompts: one block, dense prefill


def test_window_count_from_the_environment(monkeypatch):
    monkeypatch.delenv("PRUNELIB_FIDELITY_WINDOWS", raising=False)
    assert fidelity._windows_from_env() == 32
    monkeypatch.setenv("PRUNELIB_FIDELITY_WINDOWS", "4")
    assert fidelity._windows_from_env() == 4
    for bad in ("0", "-3", "four"):
        monkeypatch.setenv("PRUNELIB_FIDELITY_WINDOWS", bad)
        with pytest.raises(ValueError, match=f"PRUNELIB_FIDELITY_WINDOWS='{bad}': expected a positive integer"):
            fidelity._windows_from_env()
