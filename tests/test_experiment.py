import pytest

from prunelib import experiment
from prunelib.core.config import data_dir
from prunelib.core.store import ResultsStore


def test_speed_rows_stored_once(tiny_model, tmp_path):
    from prunelib.pruning import prune

    store = ResultsStore(tmp_path / "r.jsonl")
    pruned, _ = prune(tiny_model, "last_n", 0.5)
    kw = dict(phases=("prefill", "decode"), batches=(1,), lengths=(16,), reps=5)
    experiment.speed_rows(store, "tiny", tiny_model, pruned, "last_n", 0.5, **kw)
    df = store.load()
    assert len(df) == 2 and set(df.phase) == {"prefill", "decode"}
    r = df.iloc[0]
    assert r.metric == "speedup" and r.ci_low <= r.value <= r.ci_high and r.bound > 1
    assert r.extra["efficiency"] == pytest.approx(r.value / r.bound)
    assert len(r.extra["samples_dense"]) == 5
    experiment.speed_rows(store, "tiny", tiny_model, pruned, "last_n", 0.5, **kw)
    assert len(store.load()) == 2  # re-running skips what is stored
    table = experiment.summary(store.load(), 1, 16)
    assert table.loc[0, "method"] == "last_n" and "decode_bound" in table


def test_unknown_method_fails_before_work(tmp_path):
    with pytest.raises(ValueError, match="unknown pruning method 'nope'"):
        experiment.run(methods=["nope"], store=ResultsStore(tmp_path / "r.jsonl"))


def test_dynamic_speed_rows_record_what_was_realised(tiny_model, tmp_path):
    from prunelib.pruning import prune

    store = ResultsStore(tmp_path / "r.jsonl")
    pruned, _ = prune(tiny_model, "token_prune_attn", 0.5, layer=2)
    text = experiment.timing_text(None, (1,), (32,))
    experiment.speed_rows(store, "tiny", tiny_model, pruned, "token_prune_attn", 0.5, phases=("prefill",),
                          lengths=(32,), reps=3, text=text)
    r = store.load().iloc[0]
    assert 0 < r.extra["realised_sparsity"] < 0.5  # half the tokens from layer 2 of 4 on: a quarter of the pairs
    assert r.bound > 1  # costed from the tokens it really kept


def test_versus_random_pairs_criteria_with_their_cell_baseline():
    import pandas as pd

    rows = [("shortgpt", "static_depth", 20.0, 0), ("depth_random", "static_depth", 30.0, 0),
            ("depth_random", "static_depth", 50.0, 1), ("width_flap", "static_width", 10.0, 0)]
    df = pd.DataFrame([dict(method=m, cell=c, sparsity=0.25, metric="quality_loss_pct", value=v, extra={"seed": s})
                       for m, c, v, s in rows])
    t = experiment.versus_random(df)
    assert list(t.method) == ["shortgpt"]  # width has no random row: not compared
    assert t.random_loss_pct[0] == 40.0 and t.random_seeds[0] == 2
    assert t.verdict[0] == "no CI" and t.diff_pct[0] == -20.0  # losses without CIs: never called better


def test_summary_pairs_speed_with_the_loss_of_the_same_seed():
    import pandas as pd

    speed = dict(method="shortgpt", cell="static_depth", sparsity=0.25, metric="speedup", batch=1, length=512,
                 phase="prefill", value=1.3, ci_low=1.2, ci_high=1.4, bound=1.36,
                 extra={"params": 1e8, "calibration": {"seed": 0}})
    losses = [dict(method="shortgpt", cell="static_depth", sparsity=0.25, metric="quality_loss_pct", value=v,
                   batch=None, length=None, extra={"seed": s, "stderr": 1.0}) for v, s in ((20.0, 0), (35.0, 2))]
    t = experiment.summary(pd.DataFrame([speed] + losses))
    assert t.quality_loss_pct[0] == 20.0  # the seed-2 quality-only rerun does not replace it
    assert abs(t.prefill_efficiency[0] - 1.3 / 1.36) < 1e-12


def test_summary_lists_quality_only_runs_with_their_loss():
    import pandas as pd

    loss = dict(method="last_n", cell="static_depth", sparsity=0.25, metric="quality_loss_pct", value=50.0,
                batch=None, length=None, extra={"seed": 0, "stderr": 6.0})
    t = experiment.summary(pd.DataFrame([loss]))
    assert list(t.method) == ["last_n"] and t.quality_loss_pct[0] == 50.0 and t.loss_stderr[0] == 6.0
    assert "prefill_speedup" not in t  # nothing was timed: no speed column is made up


@pytest.mark.slow
@pytest.mark.skipif(not (data_dir() / "SOURCES.md").is_file(), reason="offline data kit not found")
def test_long_context_perplexity_scores_dense_and_pruned_and_caches(tmp_path):
    store = ResultsStore(tmp_path / "r.jsonl")
    kw = dict(docs=1, max_length=256, store=store)
    t = experiment.long_context_perplexity(methods=["sparse_attn_block"], sparsities=[0.0, 0.75], **kw)
    assert list(t.method) == ["dense", "sparse_attn_block", "sparse_attn_block"]
    assert t.word_perplexity[0] > 1 and t.ratio_to_dense[0] == 1
    assert t.word_perplexity[1] == pytest.approx(t.word_perplexity[0], rel=1e-4)  # sparsity 0 is the dense model
    assert t.word_perplexity[2] != t.word_perplexity[0]  # 4 blocks of 64 per window: the sparse path ran
    n = len(store)
    again = experiment.long_context_perplexity(methods=["sparse_attn_block"], sparsities=[0.75], **kw)
    assert len(store) == n and again.word_perplexity[1] == t.word_perplexity[2]  # read back, not re-scored


def test_table_prints_the_store_without_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRUNELIB_RESULTS", str(tmp_path))
    monkeypatch.setattr(experiment, "run", lambda *a, **k: pytest.fail("--table measured something"))
    base = dict(model="smollm2-135m", cell="static_depth", sparsity=0.25, device="cpu", dtype="float32")
    ResultsStore().append([
        dict(base, method="shortgpt", metric="speedup", phase="prefill", batch=1, length=512, value=1.3, ci_low=1.2,
             ci_high=1.4, bound=1.36, config_hash="a", extra={"params": 1.06e8, "calibration": {"seed": 0}}),
        dict(base, method="shortgpt", metric="quality_loss_pct", phase="quality", value=22.0, config_hash="b",
             extra={"seed": 0, "stderr": 8.0}),
        dict(base, method="depth_random", metric="quality_loss_pct", phase="quality", value=48.0, config_hash="c",
             extra={"seed": 0, "stderr": 7.0})])
    experiment.main(["--table"])
    out = capsys.readouterr().out
    assert "shortgpt" in out and "1.3" in out and "22.0" in out and "criterion vs random" in out


def test_versus_random_compares_each_criterion_with_its_own_unit():
    import pandas as pd

    rows = [("shortgpt", "static_depth", 20.0, {}), ("depth_random", "static_depth", 40.0, {}),
            ("shortgpt_attn", "static_depth", 5.0, {}),  # no random attention sublayers scored: not compared
            ("shortgpt_mlp", "static_depth", 7.0, {}), ("depth_random_mlp", "static_depth", 9.0, {}),
            ("dyn_depth_router_mlp", "dynamic_depth", 10.0, {}), ("dyn_depth_router", "dynamic_depth", 12.0, {}),
            ("dyn_depth_random", "dynamic_depth", 30.0, {}), ("dyn_depth_random_mlp", "dynamic_depth", 15.0, {})]
    df = pd.DataFrame([dict(method=m, cell=c, sparsity=0.25, metric="quality_loss_pct", value=v,
                            extra={"seed": 0, "options": o}) for m, c, v, o in rows])
    t = experiment.versus_random(df).set_index("method")
    assert sorted(t.index) == ["dyn_depth_router", "dyn_depth_router_mlp", "shortgpt", "shortgpt_mlp"]
    assert t.loc["shortgpt_mlp", "random_loss_pct"] == 9.0 and t.loc["shortgpt_mlp", "unit"] == "MLP sublayers"
    assert t.loc["dyn_depth_router_mlp", "random_loss_pct"] == 15.0  # the random MLP router, not the layer one
    assert t.loc["dyn_depth_router", "random_loss_pct"] == 30.0 and t.loc["shortgpt", "random_loss_pct"] == 40.0


def test_versus_random_compares_with_the_distribution_of_random_draws(tmp_path):
    """The criterion against five random draws on the same documents: its CI holds the documents' noise and the
    spread between seeds; one random draw gives no verdict; a draw far from the others widens the CI to a tie."""
    import numpy as np
    import pandas as pd

    from prunelib import quality
    from prunelib.measure import samples

    rng = np.random.default_rng(0)
    n = 400
    dense = (rng.random(n) < 0.6).astype(float)
    crit = dense * (rng.random(n) < 0.85)  # loses ~15% of what dense got right
    rands = [dense * (rng.random(n) < keep) for keep in (0.62, 0.6, 0.58, 0.61, 0.59)]  # each loses ~40%
    store = ResultsStore(tmp_path / "results.jsonl")
    folder = samples.folder(store.path)

    def put(name, x):
        samples.write(folder, name, {"task": "piqa", "doc_ids": list(range(n)), "doc_hashes": ["x"] * n,
                                     "outcomes": {"acc": x.tolist()}})

    def loss_row(method, x, h, seed):
        put(h, x)
        r = quality.paired_bootstrap({"piqa": (dense, x)})
        return dict(model="m", method=method, cell="static_depth", sparsity=0.25, phase="quality",
                    metric="quality_loss_pct", value=100 * (dense.mean() - x.mean()) / dense.mean(), ci_low=r["ci"][0],
                    ci_high=r["ci"][1], extra={"seed": seed, "scores": {"dense": {"piqa": "hd"}, "pruned": {"piqa": h}}})

    put("hd", dense)
    crit_row = loss_row("shortgpt", crit, "hc", 0)
    rand_rows = [loss_row("depth_random", x, f"hr{k}", k) for k, x in enumerate(rands)]
    t = experiment.versus_random(pd.DataFrame([crit_row] + rand_rows), store).iloc[0]
    assert t.ci_method == "seeds+documents" and t.verdict == "better" and t.diff_high < 0
    assert t.seeds == 1 and t.random_seeds == 5 and t.share_beaten == 1.0
    one = experiment.versus_random(pd.DataFrame([crit_row, rand_rows[0]]), store).iloc[0]
    assert one.verdict == "too few seeds" and one.random_seeds == 1  # one draw decides nothing
    lucky = loss_row("depth_random", dense * (rng.random(n) < 0.97), "hr9", 9)  # one random draw loses only ~3%
    wide = experiment.versus_random(pd.DataFrame([crit_row] + rand_rows + [lucky]), store).iloc[0]
    assert wide.share_beaten == pytest.approx(5 / 6) and (wide.diff_high - wide.diff_low) > (t.diff_high - t.diff_low)
    for k in range(5):
        (folder / f"hr{k}.json").unlink()  # no outcomes: a t-interval over the seeds' losses instead
    t = experiment.versus_random(pd.DataFrame([crit_row] + rand_rows), store).iloc[0]
    assert t.ci_method == "seeds t" and t.verdict == "better"

def test_versus_random_reads_random_at_the_criterion_s_realised_rate():
    """Same nominal 25%, but the router skipped 30% of token-layers while scoring and random 26%: random's loss is
    read at 30% along its own ladder (rungs realised 26% and 31%), and the verdict there is reported beside."""
    import pandas as pd

    def row(method, s, value, realised, seed=0):
        return dict(method=method, cell="dynamic_depth", sparsity=s, metric="quality_loss_pct", value=value,
                    ci_low=value - 2, ci_high=value + 2, extra={"seed": seed, "realised_sparsity_scoring": realised})

    rand = [row("dyn_depth_random", 0.25, 30.0 + k, 0.26, k) for k in (-1, 0, 1)]
    rand += [row("dyn_depth_random", 0.3, 40.0 + k, 0.31, k) for k in (-1, 0, 1)]
    df = pd.DataFrame([row("dyn_depth_router", 0.25, 37.0, 0.30)] + rand)
    t = experiment.versus_random(df).set_index("method").loc["dyn_depth_router"]
    assert t.realised_pct == pytest.approx(30.0) and t.random_realised_pct == pytest.approx(26.0)
    assert t.diff_pct == pytest.approx(7.0)  # at the same nominal rate: worse than random
    assert t.matched.startswith("interpolated at 30.0%")
    assert t.diff_matched_pct == pytest.approx(37.0 - 38.0)  # random at 30% realised: 30 + 10 * 4/5
    assert t.diff_matched_high - t.diff_matched_low == pytest.approx(t.diff_high - t.diff_low)
    same = experiment.versus_random(pd.DataFrame([row("dyn_depth_router", 0.25, 37.0, 0.265)] + rand)).iloc[0]
    assert same.matched == "same" and same.diff_matched_pct == same.diff_pct
    out = experiment.versus_random(pd.DataFrame([row("dyn_depth_router", 0.25, 37.0, 0.40)] + rand)).iloc[0]
    assert "no random rung realised above it" in out.matched and pd.isna(out.diff_matched_pct)


def test_versus_random_on_fidelity_uses_the_spread_of_the_seeds():
    """KL rows (no per-document outcomes): the criterion against five random seeds by a t-interval that holds
    their spread; one seed is "too few seeds"."""
    import pandas as pd

    def row(method, value, seed, half=0.1):
        return dict(method=method, cell="static_depth", sparsity=0.25, metric="fidelity_kl", value=value,
                    ci_low=value - half, ci_high=value + half, extra={"seed": seed, "domain": "ptb"})

    rand = [row("depth_random", v, k) for k, v in enumerate((2.9, 4.0, 5.5, 7.8, 10.9))]
    t = experiment.versus_random(pd.DataFrame([row("shortgpt", 1.1, 0)] + rand), x="kl").iloc[0]
    assert t.x == "kl ptb" and t.ci_method == "seeds t" and t.random_seeds == 5 and t.share_beaten == 1.0
    assert t.verdict == "better" and t.diff_pct == pytest.approx(1.1 - 6.22)
    close = experiment.versus_random(pd.DataFrame([row("shortgpt", 5.0, 0)] + rand), x="kl").iloc[0]
    assert close.verdict == "tie" and close.share_beaten == pytest.approx(0.6)
    one = experiment.versus_random(pd.DataFrame([row("shortgpt", 1.1, 0), rand[0]]), x="kl").iloc[0]
    assert one.verdict == "too few seeds"
    assert experiment.versus_random(pd.DataFrame([row("shortgpt", 1.1, 0)] + rand)).empty  # no loss rows


def test_versus_random_reads_a_prompt_length_rule_on_long_prefill_windows():
    """Sparse attention barely runs on the short windows' 64-token prompts, so its verdict is read on the
    long-prefill windows (ptb-long), where it runs; a depth criterion stays on ptb. On the old code both read ptb:
    the block rule's short-window KL (0.001) against random's (0.002) said nothing about the rule."""
    import pandas as pd

    def row(method, value, seed, domain, cell="dynamic_nk_attention", s=0.5):
        return dict(method=method, cell=cell, sparsity=s, metric="fidelity_kl", value=value,
                    ci_low=value - 0.005, ci_high=value + 0.005, extra={"seed": seed, "domain": domain})

    rows = [row("sparse_attn_block", 0.001, 0, "ptb"), row("sparse_attn_block", 0.015, 0, "ptb-long")]
    rows += [row("sparse_attn_random", 0.002, k, "ptb") for k in range(3)]
    rows += [row("sparse_attn_random", v, k, "ptb-long") for k, v in enumerate((0.20, 0.22, 0.24))]
    rows += [row("shortgpt", 1.1, 0, "ptb", "static_depth", 0.25), row("shortgpt", 9.9, 0, "ptb-long", "static_depth", 0.25)]
    rows += [row("depth_random", v, k, "ptb", "static_depth", 0.25) for k, v in enumerate((3.0, 5.0, 7.0))]
    t = experiment.versus_random(pd.DataFrame(rows), x="kl").set_index("method")
    assert t.loc["sparse_attn_block", "x"] == "kl ptb-long" and t.loc["shortgpt", "x"] == "kl ptb"
    assert t.loc["sparse_attn_block", "loss_pct"] == pytest.approx(0.015)
    assert t.loc["sparse_attn_block", "random_loss_pct"] == pytest.approx(0.22)
    assert t.loc["sparse_attn_block", "verdict"] == "better" and t.loc["shortgpt", "loss_pct"] == pytest.approx(1.1)
    assert experiment.versus_random(pd.DataFrame(rows), x="kl", domain="ptb").set_index("method").loc[
        "sparse_attn_block", "x"] == "kl ptb"  # a domain asked for by name is kept


def test_versus_random_on_fidelity_matches_the_rate_realised_on_the_windows():
    """A fidelity row records the rate its rule realised on the scored windows as ``realised_prefill`` (one prefill
    forward per window); the KL comparison reads it, so a router that skipped more than random is compared with
    random at the rate it really ran. The old code looked only for the quick suite's key: "no realised rate"."""
    import pandas as pd

    def row(method, s, value, realised, seed=0):
        return dict(method=method, cell="dynamic_depth", sparsity=s, metric="fidelity_kl", value=value,
                    ci_low=value - 0.1, ci_high=value + 0.1,
                    extra={"seed": seed, "domain": "ptb", "realised_prefill": realised, "realised_decode": float("nan")})

    rand = [row("dyn_depth_random", 0.2, 2.0 + 0.1 * k, 0.20, k) for k in range(3)]
    rand += [row("dyn_depth_random", 0.3, 3.0 + 0.1 * k, 0.30, k) for k in range(3)]
    t = experiment.versus_random(pd.DataFrame([row("dyn_depth_router", 0.2, 1.0, 0.25)] + rand), x="kl").iloc[0]
    assert t.realised_pct == pytest.approx(25.0) and t.random_realised_pct == pytest.approx(20.0)
    assert t.matched.startswith("interpolated at 25.0%") and t.diff_matched_pct == pytest.approx(1.0 - 2.6)


def test_realised_table_puts_each_dynamic_rate_beside_its_target():
    """The router asked for 25%: 25% on the calibration text, 30% while the quick suite was scored, 27% while
    timed, 26% on the PTB windows; a static method has no row."""
    import pandas as pd

    from prunelib.results.summary import realised

    e = {"seed": 0, "removed": {"realised_sparsity": 0.25}}
    rows = [dict(method="dyn_depth_router", sparsity=0.25, metric="speedup", phase="prefill",
                 extra=e | {"calibration": {"seed": 0}, "realised_sparsity": 0.27}),
            dict(method="dyn_depth_router", sparsity=0.25, metric="quality_loss_pct", phase="quality",
                 extra=e | {"realised_sparsity_scoring": 0.30}),
            dict(method="dyn_depth_router", sparsity=0.25, metric="fidelity_kl", phase="quality",
                 extra=e | {"domain": "ptb", "realised_prefill": 0.26, "realised_decode": float("nan")}),
            dict(method="shortgpt", sparsity=0.25, metric="fidelity_kl", phase="quality", extra={"domain": "ptb"})]
    t = realised(pd.DataFrame(rows))
    assert list(t.method) == ["dyn_depth_router"]
    r = t.iloc[0]
    assert (r.target_pct, r.calibration, r.timing_prefill, r.quick, r.ptb_prefill) == pytest.approx(
        (25.0, 25.0, 27.0, 30.0, 26.0))
    assert "ptb_decode" not in t  # nan: the windows ran as one prefill forward
