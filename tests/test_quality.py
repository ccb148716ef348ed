import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from prunelib import quality
from prunelib.core.config import data_dir
from prunelib.core.store import ResultsStore
from prunelib.measure import scoring

pytestmark = pytest.mark.skipif(not (data_dir() / "SOURCES.md").is_file(), reason="offline data kit not found")


@pytest.fixture
def tiny_lm(embedded):
    """A 2-layer random Llama with the embedded model's tokenizer: lm-eval end to end in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = embedded[1]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval(), tok


def test_rows_stored_and_cached(tiny_lm, tmp_path, monkeypatch):
    model, tok = tiny_lm
    store = ResultsStore(tmp_path / "r.jsonl")  # empty (falsy length) yet must be the store used
    df = quality.evaluate(model, tok, ["arc_easy"], limit=4, store=store, model_name="tiny", method="dense")
    assert len(store) == 2 and len(ResultsStore()) == 0
    got = dict(zip(df.metric, df.value))
    assert set(got) == {"arc_easy/acc", "arc_easy/acc_norm"}
    row = df.iloc[0]
    assert row.phase == "quality" and row.n == 4 and row.extra["limit"] == 4
    assert row.extra["stderr"] > 0 and row.extra["fingerprint"] and row.versions["lm_eval"] == "0.4.13"
    assert row.ci_low < row.value < row.ci_high

    import lm_eval

    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda *a, **k: pytest.fail("cached score was re-computed"))
    again = quality.evaluate(model, tok, ["arc_easy"], limit=4, store=store)
    assert again.value.tolist() == df.value.tolist()


@pytest.mark.parametrize("kw,err,match", [
    (dict(tasks=["arc_hard"]), ValueError, "arc_hard"),
    (dict(tasks=["piqa"], limit=0), ValueError, "limit must be a positive"),
    (dict(preset="medium"), ValueError, "unknown quality preset 'medium'"),
])
def test_bad_input_stores_nothing(tiny_lm, tmp_path, kw, err, match):
    store = ResultsStore(tmp_path / "r.jsonl")
    with pytest.raises(err, match=match):
        quality.evaluate(*tiny_lm, store=store, **kw)
    assert len(store) == 0 and len(ResultsStore()) == 0  # neither the given nor the default store


def test_tokenizer_without_pad_token(tiny_lm, tmp_path):
    model, tok = tiny_lm
    import copy

    tok = copy.deepcopy(tok)
    tok.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        quality.evaluate(model, tok, ["piqa"], limit=2, store=ResultsStore(tmp_path / "r.jsonl"))


@pytest.mark.slow
def test_blimp_scored_by_paradigm_resumes_and_equals_lm_eval_group(tiny_lm, tmp_path, monkeypatch):
    """BLiMP runs in chunks of paradigms (an interrupted run keeps them); its group row equals lm-eval's own group."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from prunelib.core import evaltasks

    model, tok = tiny_lm
    store = ResultsStore(tmp_path / "r.jsonl")
    quality.evaluate(model, tok, ["blimp_passive_1"], limit=2, store=store)  # as if a run stopped after one paradigm
    real, calls = lm_eval.simple_evaluate, []
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda *a, **k: calls.append(k["tasks"]) or real(*a, **k))
    df = quality.evaluate(model, tok, ["blimp"], limit=2, store=store)
    scored = [t for c in calls for t in c]
    assert sorted(scored) == sorted(set(evaltasks.BLIMP_TASKS) - {"blimp_passive_1"})
    assert len(calls) == -(-66 // scoring.BLIMP_CHUNK)
    assert len(df) == 68 and df.metric.str.endswith("/acc").all()  # 67 paradigms and the group

    ref = real(model=HFLM(pretrained=model, tokenizer=tok), tasks=["blimp"],
               task_manager=evaltasks.task_manager(["blimp"]), limit=2)["results"]
    got = dict(zip(df.metric, df.value))
    for name in evaltasks.BLIMP_TASKS:
        assert got[f"{name}/acc"] == ref[name]["acc,none"], name
    group = df[df.metric == "blimp/acc"].iloc[0]
    assert group.value == pytest.approx(ref["blimp"]["acc,none"], rel=1e-12) and group.n == 67 * 2
    assert group.extra["stderr"] == pytest.approx(ref["blimp"]["acc_stderr,none"], rel=1e-12)
    calls.clear()
    assert quality.evaluate(model, tok, ["blimp"], limit=2, store=store).value.tolist() == df.value.tolist()
    assert calls == []  # all cached


def test_cli_scores_and_prints_table_with_time(tiny_lm, monkeypatch, capsys):
    import prunelib.model.models

    monkeypatch.setattr(prunelib.model.models, "load_model", lambda *a, **k: tiny_lm)
    quality.main(["--tasks", "piqa,arc_easy", "--limit", "3"])
    out = capsys.readouterr().out
    stored = quality.scores(ResultsStore().load())
    assert set(stored.task) == {"piqa", "arc_easy"} and (stored.n == 3).all() and len(stored) == 4
    for line in stored.itertuples():
        assert f"{line.task}" in out and f"{line.value:.4f}".rstrip("0") in out
    assert "scoring time (sum over tasks, as stored)" in out
    for bad in (["--preset", "medium"], ["--limit", "0"], ["--limit", "x"], ["--tasks", "piqa,arc_hard"]):
        with pytest.raises(SystemExit):
            quality.main(bad)
    assert "arc_hard" in capsys.readouterr().err


def test_quality_loss_definition():
    def rows(values, stderr):
        return pd.DataFrame({"metric": [f"{t}/{m}" for t, m in values], "value": list(values.values()),
                             "extra": [{"stderr": stderr}] * len(values)})

    dense = rows({("arc_easy", "acc"): 0.6, ("piqa", "acc"): 0.7, ("wikitext", "word_perplexity"): 20.0}, 0.01)
    pruned = rows({("arc_easy", "acc"): 0.45, ("piqa", "acc"): 0.63, ("wikitext", "word_perplexity"): 35.0}, 0.01)
    r = quality.quality_loss(dense, pruned)
    assert r["loss_pct"] == pytest.approx((25.0 + 10.0) / 2)
    assert r["ppl_dense"] == 20.0 and r["ppl_pruned"] == 35.0
    se_arc = 100 * (0.01**2 + (0.01 * 0.45 / 0.6) ** 2) ** 0.5 / 0.6
    se_piqa = 100 * (0.01**2 + (0.01 * 0.63 / 0.7) ** 2) ** 0.5 / 0.7
    assert r["stderr_pct"] == pytest.approx((se_arc**2 + se_piqa**2) ** 0.5 / 2)


@pytest.mark.slow
def test_stored_scores_equal_lm_eval_cli(embedded, tmp_path):
    """What prunelib stores for the embedded model equals what lm-eval's CLI prints for its saved copy."""
    from prunelib.core import evaltasks
    from prunelib.model.models import embedded_path

    model, tok = embedded
    tasks, limit = ["wikitext", "arc_easy", "piqa"], 3
    store = ResultsStore(tmp_path / "r.jsonl")
    df = quality.evaluate(model, tok, tasks, limit=limit, store=store, batch_size=4)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={embedded_path()},max_length=2048", "--batch_size", "4",
           "--tasks", ",".join(tasks), "--include_path", str(evaltasks.prepare_tasks(tasks)),
           "--limit", str(limit), "--device", "cpu",
           "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    cli = json.loads(result_file.read_text())["results"]
    stored = dict(zip(df.metric, df.value))
    checked = 0
    for task in tasks:
        for key, value in cli[task].items():
            metric = key.split(",")[0]
            if "_stderr" in metric or not isinstance(value, float):
                continue
            assert stored[f"{task}/{metric}"] == value, (task, metric)  # digit for digit
            checked += 1
    assert checked >= 7  # wikitext: 3 perplexity metrics; arc_easy and piqa: acc and acc_norm


def test_sidecar_written_with_scores_and_self_pair_ci_is_zero(tiny_lm, tmp_path):
    """Each score keeps its per-document outcomes; a model against itself has a paired CI of exactly [0, 0]."""
    from prunelib.measure import samples

    model, tok = tiny_lm
    store = ResultsStore(tmp_path / "r.jsonl")
    df = quality.evaluate(model, tok, ["arc_easy", "piqa"], limit=6, store=store)
    for task in ("arc_easy", "piqa"):
        row = df[df.metric == f"{task}/{quality.CHOSEN_METRIC[task]}"].iloc[0]
        side = samples.read(tmp_path / "samples", row.config_hash)
        assert side["doc_ids"] == list(range(6))
        assert sum(side["outcomes"][quality.CHOSEN_METRIC[task]]) / 6 == pytest.approx(row.value)
    r = quality.quality_loss(df, df, store=store)
    assert r["ci_method"] == "paired_bootstrap" and r["unpaired_tasks"] == []
    assert (r["loss_pct"], r["ci_low"], r["ci_high"]) == (0.0, 0.0, 0.0)
    assert r["stderr_pct"] > 0  # the independent-error se does not know the pair is the same model


def test_unpaired_when_outcomes_missing_and_refusals(tiny_lm, tmp_path):
    model, tok = tiny_lm
    store = ResultsStore(tmp_path / "r.jsonl")
    a = quality.evaluate(model, tok, ["arc_easy"], limit=6, store=store)
    b = quality.evaluate(model, tok, ["arc_easy"], limit=5, store=store)
    with pytest.raises(ValueError, match=r"different limits for 'arc_easy': 6 against 5"):
        quality.quality_loss(a, b, store=store)
    # same limit, other documents (a sidecar edited as if scored on another file)
    from prunelib.measure import samples

    folder = tmp_path / "samples"
    side = samples.read(folder, b.config_hash.iloc[0])
    samples.write(folder, b.config_hash.iloc[0], dict(side, doc_hashes=["00000000"] + side["doc_hashes"][1:]))
    b6 = b.assign(extra=[dict(e, limit=6) for e in b.extra])
    with pytest.raises(ValueError, match="different documents for 'arc_easy': 6 against 5 documents"):
        quality.quality_loss(a, b6, store=store)
    (folder / f"{a.config_hash.iloc[0]}.json").unlink()
    r = quality.quality_loss(a, a, store=store)  # no per-document outcomes: the unpaired figure, labelled
    assert r["ci_method"] == "unpaired" and r["unpaired_tasks"] == ["arc_easy"] and r["bootstrap"] is None
    assert r["ci_high"] == pytest.approx(1.96 * r["stderr_pct"]) and r["ci_high"] > 0


def test_paired_bootstrap_by_hand():
    """Two documents: a resample holds {d0,d0}, {d0,d1} or {d1,d1} (probabilities 1/4, 1/2, 1/4)."""
    dense, pruned = [1.0, 1.0], [1.0, 0.0]  # drops 0%, 50%, 100%: the 2.5/97.5 percentiles are 0 and 100
    r = quality.paired_bootstrap({"t": (dense, pruned)}, iters=2000, seed=3)
    assert r["ci"] == (0.0, 100.0) and r["per_task"]["t"] == (0.0, 100.0) and r["undefined"] == 0
    # dense right on only one document: a resample of {d1,d1} has no relative drop and is left out
    r = quality.paired_bootstrap({"t": ([1.0, 0.0], [0.0, 0.0])}, iters=2000, seed=3)
    assert r["ci"] == (100.0, 100.0) and 400 < r["undefined"] < 600


def test_paired_bootstrap_equals_a_plain_loop():
    import numpy as np

    g = np.random.default_rng(0)
    pairs = {t: (g.integers(0, 2, n).astype(float), g.integers(0, 2, n).astype(float)) for t, n in
             (("a", 7), ("b", 11), ("c", 5))}
    pairs["c"][0][:] = 1.0  # keep every dense mean positive
    iters, seed = 300, 42
    got = quality.paired_bootstrap(pairs, iters=iters, seed=seed)
    import zlib

    draws = {t: np.random.default_rng([seed, zlib.crc32(t.encode())]).integers(0, len(d), size=(iters, len(d)))
             for t, (d, _) in pairs.items()}  # each task its own stream
    overall = []
    for i in range(iters):
        drops = []
        for t, (d, p) in pairs.items():
            j = draws[t][i]
            if d[j].mean() == 0:
                drops.append(np.nan)
            else:
                drops.append(100 * (d[j].mean() - p[j].mean()) / d[j].mean())
        overall.append(sum(drops) / len(drops))
    lo, hi = np.nanpercentile(overall, [2.5, 97.5])
    assert got["ci"] == pytest.approx((lo, hi), abs=1e-9)
    with pytest.raises(ValueError, match="iters must be a positive integer, got 0"):
        quality.paired_bootstrap(pairs, iters=0)


@pytest.mark.slow
def test_run_stores_paired_loss_and_fidelity(tiny_lm, monkeypatch):
    """experiment.run (quality only): the loss row carries the paired CI, the unpaired se and what defines the
    model; every pruned model gets its fidelity rows; ``fidelity=False`` skips them, a list of domains scores those."""
    from prunelib import experiment
    from prunelib.run import pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: tiny_lm)
    monkeypatch.setitem(quality.PRESETS, "tiny", quality.Preset(("arc_easy", "piqa"), 8))
    kw = dict(phases=(), preset="tiny", calib_n=2, calib_len=32, seed=3)
    df = experiment.run("tiny", ["last_n"], [0.5], **kw)
    loss = df[df.metric == "quality_loss_pct"].iloc[0]
    e = loss.extra
    assert e["ci_method"] == "paired_bootstrap" and e["seed"] == 3 and e["preset"] == "tiny" and e["options"] == {}
    assert e["stderr"] > 0 and "realised_sparsity_scoring" in e and set(e["per_task"]) == {"arc_easy", "piqa"}
    assert loss.ci_low <= loss.value <= loss.ci_high
    fid = df[df.metric.isin(["fidelity_kl", "fidelity_dnll"])]
    assert len(fid) == 4 and set(fid.method) == {"last_n"}
    assert {(m, x["domain"]) for m, x in zip(fid.metric, fid.extra)} == {
        (m, d) for m in ("fidelity_kl", "fidelity_dnll") for d in ("ptb", "wikitext2")}
    assert (fid[fid.metric == "fidelity_kl"].ci_low > 0).all() and all(x["seed"] == 3 for x in fid.extra)
    df = experiment.run("tiny", ["last_n"], [0.25], fidelity=False, **kw)
    assert not ((df.sparsity == 0.25) & df.metric.str.startswith("fidelity")).any()
    df = experiment.run("tiny", ["last_n"], [0.375], fidelity=["ptb"], **kw)
    fid = df[(df.sparsity == 0.375) & df.metric.str.startswith("fidelity")]
    assert len(fid) == 2 and {x["domain"] for x in fid.extra} == {"ptb"}


def test_per_task_limits(tiny_lm, tmp_path):
    store = ResultsStore(tmp_path / "r.jsonl")
    df = quality.evaluate(*tiny_lm, ["arc_easy", "piqa"], limit={"arc_easy": 3, "piqa": 5}, store=store)
    assert dict(zip(df.metric, df.n)) == {"arc_easy/acc": 3, "arc_easy/acc_norm": 3, "piqa/acc": 5, "piqa/acc_norm": 5}
    assert {e["task"]: e["limit"] for e in df.extra} == {"arc_easy": 3, "piqa": 5}
    with pytest.raises(ValueError, match=r"per-task limit needs every task; \['piqa'\] missing"):
        quality.evaluate(*tiny_lm, ["arc_easy", "piqa"], limit={"arc_easy": 3}, store=store)
    with pytest.raises(ValueError, match="got limit=0"):
        quality.evaluate(*tiny_lm, ["arc_easy"], limit={"arc_easy": 0}, store=store)


def test_what_if_equals_scoring_the_first_documents(tiny_lm, tmp_path):
    """The paired CI a smaller limit would give, from outcomes stored at a larger one, is the CI of scoring
    with that limit: lm-eval's limit takes the first documents, and the sidecar keeps them in order."""
    import copy

    model, tok = tiny_lm
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned.model.layers[1].mlp.down_proj.weight.mul_(0.0)  # a different model, scored on the same documents
    store = ResultsStore(tmp_path / "r.jsonl")
    tasks = ["arc_easy", "piqa"]

    def score(m, method, limit):
        return quality.evaluate(m, tok, tasks, limit=limit, store=store, model_name="tiny", method=method,
                                sparsity=0.0 if method == "dense" else 0.5)

    big_d, big_p = score(model, "dense", 10), score(pruned, "mlp_zero", 10)
    got = quality.what_if({"arc_easy": 6, "piqa": 6}, store, model="tiny")
    assert got[["method", "sparsity"]].values.tolist() == [["mlp_zero", 0.5]]
    small = quality.quality_loss(score(model, "dense", 6), score(pruned, "mlp_zero", 6), store=store)
    row = got.iloc[0]
    assert (row.loss_pct, row.ci_low, row.ci_high) == pytest.approx((small["loss_pct"], small["ci_low"], small["ci_high"]))
    whole = quality.quality_loss(big_d, big_p, store=store)
    assert quality.what_if({"arc_easy": 10, "piqa": 10}, store).ci_low.item() == pytest.approx(whole["ci_low"])
    with pytest.raises(ValueError, match=r"no stored pruned model has per-document outcomes of at least"):
        quality.what_if({"arc_easy": 11, "piqa": 6}, store)
    with pytest.raises(ValueError, match=r"tasks \['wikitext'\] have no chosen accuracy"):
        quality.what_if({"wikitext": 5}, store)
    with pytest.raises(ValueError, match=r"arc_easy=0 must be a whole number"):
        quality.what_if({"arc_easy": 0}, store)


def test_paired_difference_against_dense_is_the_paired_bootstrap():
    """Comparing a model with the dense model itself gives its own paired-bootstrap CI (same draws, the
    dense model's drop 0 in every resample); a model against itself differs by exactly 0 [0, 0]."""
    import numpy as np

    rng = np.random.default_rng(1)
    d, a = (rng.random(50) < 0.7).astype(float), (rng.random(50) < 0.5).astype(float)
    d2, a2 = (rng.random(30) < 0.6).astype(float), (rng.random(30) < 0.4).astype(float)
    r = quality.paired_difference({"t": (d, a, d), "u": (d2, a2, d2)}, iters=500, seed=4)
    assert r["ci"] == quality.paired_bootstrap({"t": (d, a), "u": (d2, a2)}, iters=500, seed=4)["ci"]
    assert r["diff"] == pytest.approx(np.mean([100 * (d.mean() - a.mean()) / d.mean(),
                                               100 * (d2.mean() - a2.mean()) / d2.mean()]))
    same = quality.paired_difference({"t": (d, a, a)}, iters=200)
    assert (same["diff"], *same["ci"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same non-empty list of documents"):
        quality.paired_difference({"t": (d, a, a[:-1])})


def test_what_if_cli_refuses_malformed_pairs(capsys):
    with pytest.raises(SystemExit) as e:
        quality.main(["--what-if", "arc_easy:160"])
    assert e.value.code == 2 and "expected TASK=N pairs" in capsys.readouterr().err


def test_the_same_documents_give_the_same_ci_in_any_task_order():
    import numpy as np

    g = np.random.default_rng(3)
    pairs = {t: ((g.random(40) < 0.7).astype(float), (g.random(40) < 0.5).astype(float)) for t in ("a", "b", "c")}
    forward = quality.paired_bootstrap(pairs, iters=400, seed=1)
    backward = quality.paired_bootstrap(dict(reversed(list(pairs.items()))), iters=400, seed=1)
    assert forward["ci"] == pytest.approx(backward["ci"], abs=1e-12)
    alone = quality.paired_bootstrap({"b": pairs["b"]}, iters=400, seed=1)
    assert alone["per_task"]["b"] == pytest.approx(forward["per_task"]["b"], abs=1e-12)  # b's draws ignore a and c


def test_what_if_ignores_scores_of_an_older_code_version(tmp_path, monkeypatch):
    """A dynamic method's score is keyed by its code version: an older forward's score, even with more documents,
    is not today's model (it changed a what-if loss from 37.5 to 100)."""
    from prunelib.measure import lossstats, samples

    store = ResultsStore(tmp_path / "r.jsonl")
    folder = samples.folder(store.path)
    n_docs = {"dense": 8, "old": 12, "new": 8}
    outcomes = {"dense": [1.0] * 12, "old": [0.0] * 12, "new": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]}
    rows = []
    for who, code, method in (("dense", None, "dense"), ("old", "old-code", "dyn_depth_router"),
                              ("new", "new-code", "dyn_depth_router")):
        n = n_docs[who]
        h = f"h-{who}"
        samples.write(folder, h, {"task": "piqa", "doc_ids": list(range(n)), "doc_hashes": ["x"] * n,
                                  "outcomes": {"acc": outcomes[who][:n]}})
        rows.append(dict(model="m", method=method, cell="dense" if who == "dense" else "dynamic_depth",
                         sparsity=0.0 if who == "dense" else 0.25, phase="quality", device="cpu", dtype="float32",
                         metric="piqa/acc", value=sum(outcomes[who][:n]) / n, n=n, config_hash=h,
                         extra=dict(task="piqa", limit=n, fingerprint="fp-dense" if who == "dense" else "fp-dyn",
                                    code=code, seconds=1.0)))
    store.append(rows)
    monkeypatch.setattr(lossstats, "code_version_of", lambda methods: "new-code")
    got = quality.what_if({"piqa": 8}, store, model="m")
    assert got.loss_pct.tolist() == pytest.approx([25.0])  # the new code's 2 misses of 8, not the old 8 of 8


def test_lm_eval_bootstrap_lines_do_not_reach_stdout(tiny_lm, tmp_path, capfd):
    """lm-eval prints 'bootstrapping for stddev: ...' to stdout; in a notebook that lands in the outputs. Scoring
    sends it to stderr, which a notebook's first cell routes to its log file."""
    model, tok = tiny_lm
    quality.evaluate(model, tok, ["lambada_openai"], limit=3, store=ResultsStore(tmp_path / "r.jsonl"), bootstrap_iters=10,
                     batch_size=1, max_length=128)
    out, err = capfd.readouterr()
    assert "bootstrapping for stddev" not in out
    assert "bootstrapping for stddev" in err  # not lost: it went to stderr


def test_run_draws_a_random_baseline_at_baseline_seeds_scored_not_timed(tiny_lm, monkeypatch, tmp_path):
    """``baseline_seeds=3``: depth_random is drawn at seeds 0, 1, 2 (fidelity for each, one timing), the criterion
    at its seed only; the table then compares ShortGPT with three random draws, not one."""
    from prunelib import experiment
    from prunelib.run import pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: tiny_lm)
    store = ResultsStore(tmp_path / "r.jsonl")
    df = experiment.run("tiny", ["shortgpt", "depth_random"], [0.5], phases=("prefill",), lengths=(16,), reps=2,
                        preset=None, calib_n=2, calib_len=32, baseline_seeds=3, store=store, ci_target=None)
    kl = df[df.metric == "fidelity_kl"]
    seeds = {m: sorted({e["seed"] for e in g.extra}) for m, g in kl.groupby("method")}
    assert seeds == {"depth_random": [0, 1, 2], "shortgpt": [0]}
    sp = df[df.metric == "speedup"]
    assert sorted(sp.method) == ["depth_random", "shortgpt"]  # one timing each: the extra draws are not timed
    vk = experiment.versus_random(df, store, x="kl").iloc[0]
    assert vk.method == "shortgpt" and vk.random_seeds == 3 and vk.seeds == 1
    assert pipeline.seeds_of("depth_random", 4, 3) == [4, 0, 1, 2] and pipeline.seeds_of("shortgpt", 4, 3) == [4]
    assert pipeline.seeds_of("depth_random", 2) == [2]  # the default: only the seed asked for
    with pytest.raises(ValueError, match="baseline_seeds"):
        experiment.run("tiny", ["depth_random"], [0.5], baseline_seeds=0, store=store)
