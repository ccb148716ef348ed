"""llama.cpp as a runtime: GGUF export checked against PyTorch per method and family, refusals per method
that GGUF cannot represent, and the interleaving / CI guarantees of engine timing (with a fake engine).

Tests that run llama.cpp skip, with the reason ``make setup-engines`` wrote, where llama_cpp is absent.
"""
import numpy as np
import pytest
import torch

from conftest import synthetic_calibration, tiny_family_model
from prunelib.pruning import prune
from prunelib.runtime import gguf_export, llamacpp

REASON = llamacpp.unavailable()
needs_engine = pytest.mark.skipif(REASON is not None, reason=f"llama.cpp unavailable: {REASON}")
PROMPT = torch.randint(3, 256, (24,), generator=torch.Generator().manual_seed(3)).tolist()
TOL = 1e-3

#: (method, sparsity, architecture written) of every registered method GGUF can represent, on the tiny Llama;
#: "mixed_width" puts layers of two width prunings in one model (per-layer head and FFN counts)
REPRESENTABLE = [("dense", 0.0, "llama"), ("shortgpt", 0.25, "llama"), ("angular", 0.5, "llama"),
                 ("last_n", 0.25, "llama"), ("depth_random", 0.25, "llama"), ("shortgpt_attn", 0.5, "deci"),
                 ("shortgpt_mlp", 0.5, "deci"), ("depth_random_attn", 0.25, "deci"),
                 ("depth_random_mlp", 0.25, "deci"), ("width_magnitude", 0.25, "llama"),
                 ("width_wanda_sp", 0.25, "llama"), ("width_flap", 0.25, "llama"), ("width_random", 0.5, "llama"),
                 ("mixed_width", 0.5, "deci"), ("sparse24_magnitude", 0.5, "llama"), ("sparse24_wanda", 0.5, "llama"),
                 ("sparse24_sparsegpt", 0.25, "llama"), ("sparse24_random", 0.5, "llama")]
#: (method, sparsity, what the refusal names)
UNREPRESENTABLE = [("slicegpt", 0.25, "SliceGPT's shortcut"), ("slicegpt_random", 0.25, "SliceGPT's shortcut"),
                   ("lowrank_svd", 0.3, "low-rank pairs"), ("lowrank_svdllm", 0.3, "low-rank pairs"),
                   ("lowrank_random", 0.3, "low-rank pairs"), ("dyn_depth_router", 0.25, "dynamic routing"),
                   ("dyn_depth_router_mlp", 0.25, "dynamic routing"), ("dyn_depth_random", 0.25, "dynamic routing"),
                   ("dyn_depth_random_mlp", 0.25, "dynamic routing"), ("token_prune_attn", 0.5, "token pruning"),
                   ("token_prune_random", 0.5, "token pruning"), ("sparse_attn_block", 0.5, "sparse attention"),
                   ("sparse_attn_window", 0.5, "sparse attention"), ("sparse_attn_random", 0.5, "sparse attention")]


def pruned(method, sparsity, family="llama"):
    model = tiny_family_model(family)
    if method == "dense":
        return model
    if method == "mixed_width":  # layers 0 and 2 with half their heads and channels, 1 and 3 with a quarter fewer
        a, b = pruned("width_random", sparsity, family), pruned("width_magnitude", sparsity / 2, family)
        for i in (1, 3):
            a.model.layers[i] = b.model.layers[i]
        return a
    return prune(model, method, sparsity, calibration=synthetic_calibration(), seed=0)[0].eval()


def torch_logprobs(model, ids=PROMPT) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().log_softmax(-1).numpy()


def engine_logprobs(path, ids=PROMPT, kv="f32") -> np.ndarray:
    eng = llamacpp.Engine(path, n_ctx=64, threads=1, kv=kv)
    try:
        return eng.logprobs(ids)
    finally:
        eng.close()


@needs_engine
@pytest.mark.parametrize("method,sparsity,arch", REPRESENTABLE)
def test_f32_export_gives_pytorchs_log_probs(method, sparsity, arch, tmp_path):
    model = pruned(method, sparsity)
    info = gguf_export.export(model, tmp_path / "m.gguf", "f32")
    assert info.arch == arch
    got, want = engine_logprobs(info.path), torch_logprobs(model)
    assert np.abs(got - want).max() < TOL, (info.arch, info.notes)


@needs_engine
@pytest.mark.parametrize("family,method,sparsity,arch", [
    ("qwen2", "dense", 0.0, "qwen2"), ("qwen2", "shortgpt", 0.25, "qwen2"), ("qwen2", "width_random", 0.5, "deci"),
    ("qwen2", "mixed_width", 0.5, "deci"), ("qwen2", "shortgpt_attn", 0.5, "deci"),
    ("mistral", "dense", 0.0, "llama"), ("mistral", "mixed_width", 0.5, "deci"),
    ("phi3", "dense", 0.0, "llama"), ("phi3", "mixed_width", 0.5, "deci"),
    ("qwen2", "sparse24_magnitude", 0.5, "qwen2")])
def test_families_export_with_their_architecture(family, method, sparsity, arch, tmp_path):
    model = pruned(method, sparsity, family)
    info = gguf_export.export(model, tmp_path / "m.gguf", "f32")
    assert info.arch == arch
    assert np.abs(engine_logprobs(info.path) - torch_logprobs(model)).max() < TOL


@pytest.mark.parametrize("method,sparsity,names", UNREPRESENTABLE)
def test_unrepresentable_methods_are_refused_naming_what_gguf_lacks(method, sparsity, names, tmp_path):
    model = pruned(method, sparsity)
    with pytest.raises(gguf_export.Unrepresentable, match=names):
        gguf_export.export(model, tmp_path / "m.gguf", "f16")
    assert not list(tmp_path.iterdir())  # nothing written


def test_bad_export_arguments_name_the_value_and_what_is_allowed(tmp_path):
    model = tiny_family_model("llama")
    with pytest.raises(ValueError, match=r"dtype='bf16' is not allowed: expected one of \('f32', 'f16', 'q8_0'\)"):
        gguf_export.export(model, tmp_path / "m.gguf", "bf16")
    model.config.hidden_act = "gelu"
    with pytest.raises(gguf_export.Unrepresentable, match="hidden_act='gelu'"):
        gguf_export.export(model, tmp_path / "m.gguf", "f16")


def test_per_layer_counts_and_q_k_permutation():
    model = pruned("mixed_width", 0.5)
    p = gguf_export.plan(model)
    assert p.arch == "deci" and len({(x.n_head, x.n_kv, x.n_ff) for x in p.layers}) > 1
    w = np.arange(2 * 4 * 3, dtype=np.float32).reshape(8, 3)  # 2 heads of head_dim 4
    got = gguf_export.permute_rotary(w, 2)
    assert got[:4, 0].tolist() == [0, 6, 3, 9] and sorted(got.ravel()) == sorted(w.ravel())


def test_an_mlp_width_off_the_gemm_tile_is_noted_in_the_export():
    """1382 of 1536 MLP channels ran llama.cpp's prefill at 0.54x (1408: 1.04x): the export says so, and names the
    fix; an aligned width (or round_to=64) gets no such note."""
    odd = prune(tiny_family_model("llama"), "width_magnitude", 0.1, calibration=synthetic_calibration(), seed=0)[0]
    notes = [n for n in gguf_export.plan(odd).notes if "not a multiple of 32" in n]
    assert len(notes) == 1 and notes[0].startswith("MLP width 115 ") and "round_to=64" in notes[0]
    for model in (pruned("width_magnitude", 0.25),  # 96 channels
                  prune(tiny_family_model("llama"), "width_magnitude", 0.1, calibration=synthetic_calibration(),
                        seed=0, round_to=64)[0]):
        assert not [n for n in gguf_export.plan(model).notes if "not a multiple" in n]


@needs_engine
@pytest.mark.parametrize("dtype,tol", [("f16", 0.02), ("q8_0", 0.1)])
def test_f16_and_q8_0_exports_load_and_stay_close(dtype, tol, tmp_path):
    model = pruned("shortgpt_attn", 0.5)
    info = gguf_export.export(model, tmp_path / "m.gguf", dtype)
    assert info.tensor_types.get({"f16": "F16", "q8_0": "Q8_0"}[dtype], 0) > 0
    diff = np.abs(engine_logprobs(info.path, kv="f16") - torch_logprobs(model)).max()
    assert diff < tol


@needs_engine
def test_a_byte_level_bpe_tokenizer_goes_into_the_gguf(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from conftest import tiny_config

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = "the quick brown fox jumps over the lazy dog; the dog sleeps. " * 20
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(vocab_size=len(hf))).eval()
    info = gguf_export.export(model, tmp_path / "m.gguf", "f32", tokenizer=hf, pre="gpt-2")
    ids = hf("the lazy fox sleeps")["input_ids"]
    eng = llamacpp.Engine(info.path, n_ctx=64, threads=1, kv="f32")
    try:
        assert eng.llm.tokenize(b"the lazy fox sleeps", add_bos=False, special=False) == ids
        assert eng.llm.token_eos() == hf.eos_token_id
        assert np.abs(eng.logprobs(ids) - torch_logprobs(model, ids)).max() < TOL
    finally:
        eng.close()


def test_a_sentencepiece_tokenizer_is_refused():
    from prunelib.runtime import gguf_vocab

    class Fake:
        class backend_tokenizer:
            @staticmethod
            def to_str():
                return '{"model": {"type": "Unigram", "vocab": []}}'

    with pytest.raises(ValueError, match="tokenizer model 'Unigram' is not allowed"):
        gguf_vocab.hf_vocab(Fake(), 256)


def test_a_missing_engine_says_why_with_the_build_status(tmp_path, monkeypatch):
    import sys

    status = tmp_path / "engines.status"
    status.write_text("failed: pip install llama-cpp-python==0.3.36 after 12 s: cmake not found\n")
    monkeypatch.setattr(llamacpp, "STATUS_FILE", status)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if it were not installed
    reason = llamacpp.unavailable()
    assert "llama_cpp cannot be imported" in reason and "cmake not found" in reason
    with pytest.raises(llamacpp.EngineUnavailable, match="cmake not found"):
        llamacpp.Engine(tmp_path / "m.gguf")


# --- timing: the same interleaving and CI as PyTorch's, with a fake engine --------------------------------
class FakeEngine:
    """Records every step call; its steps take ``t`` seconds times a drift the two engines share."""

    def __init__(self, name, t, log, threads=1):
        self.name, self.t, self.log, self.threads = name, t, log, threads

    def step(self, phase, length, ids):
        return FakeStep(self)


class FakeStep:
    def __init__(self, engine):
        self.engine = engine

    def __call__(self):
        self.engine.log.append(self.engine.name)

    def reset(self):
        self.engine.log.append("reset")


def fake_timer(noise=0.0, seed=0):
    rng, calls = np.random.default_rng(seed), [0]

    def timer(step):
        calls[0] += 1
        step()
        step.reset()
        drift = 1 + 0.5 * np.sin(calls[0] / 7)  # the machine's load, common to adjacent runs
        return step.engine.t * drift * (1 + noise * rng.standard_normal())

    return timer


def test_engine_timing_runs_abba_pairs_after_an_untimed_warm_up():
    log = []
    a, b = FakeEngine("A", 2.0, log), FakeEngine("B", 1.0, log)
    c = llamacpp.compare(a, b, "decode", 8, PROMPT, reps=4, warmup=2, timer=fake_timer())
    steps = [x for x in log if x != "reset"]
    assert steps[:4] == ["A", "B", "A", "B"]  # warm-up pairs, not in the samples
    assert steps[4:] == ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert log.count("reset") == len(steps)  # every timed call is reset (untimed) before the next
    assert c.base.n == c.cand.n == 4 and c.speedup == pytest.approx(2.0, rel=0.05) and c.ci_low <= c.speedup <= c.ci_high
    assert c.mode == "llama.cpp" and c.phase == "decode" and c.length == 8


def test_engine_timing_reaches_its_ci_target_or_stops_at_the_budget():
    c = llamacpp.compare(FakeEngine("A", 2.0, []), FakeEngine("B", 1.0, []), "prefill", 8, PROMPT, reps=6,
                         warmup=0, target="auto", timer=fake_timer(noise=0.05))
    assert c.target == 0.05 and c.stop == "target ±5% reached" and c.half_width <= 0.05
    c = llamacpp.compare(FakeEngine("A", 1.0, []), FakeEngine("B", 1.0, []), "decode", 8, PROMPT, reps=4,
                         warmup=0, target=0.001, budget_s=0.2, timer=fake_timer(noise=2.0))
    assert c.stop.startswith("time budget") and c.seconds >= 0.2


def test_engine_timing_refuses_different_thread_counts_and_bad_targets():
    with pytest.raises(ValueError, match="threads=2 is not allowed"):
        llamacpp.compare(FakeEngine("A", 1, []), FakeEngine("B", 1, [], threads=2), "decode", 8, PROMPT)
    with pytest.raises(ValueError, match="target must be"):
        llamacpp.compare(FakeEngine("A", 1, []), FakeEngine("B", 1, []), "decode", 8, PROMPT, target=2)


@needs_engine
def test_real_engine_steps_time_prefill_and_decode_at_a_fixed_kv_length(tmp_path):
    model = pruned("shortgpt", 0.5)
    dense = gguf_export.export(tiny_family_model("llama"), tmp_path / "d.gguf", "f16")
    small = gguf_export.export(model, tmp_path / "p.gguf", "f16")
    engines = [llamacpp.Engine(x.path, n_ctx=64, threads=1, dtype="f16") for x in (dense, small)]
    try:
        for phase in ("prefill", "decode"):
            c = llamacpp.compare(*engines, phase, 16, PROMPT, reps=4, warmup=1)
            assert c.base.n == 4 and all(t > 0 for t in c.base.samples + c.cand.samples)
        step = engines[0].step("decode", 16, PROMPT)
        for _ in range(3):
            llamacpp.clock(step)
        # after each timed step and its reset the cache holds exactly the 16 prompt tokens again
        assert engines[0].lc.llama_memory_seq_pos_max(engines[0].ctx.memory, 0) == 15
    finally:
        for e in engines:
            e.close()


# --- rows, tables, the spec -----------------------------------------------------------------------------
def store_of(tmp_path):
    from prunelib.core.store import ResultsStore

    return ResultsStore(tmp_path / "results.jsonl")


def test_a_refused_model_is_stored_as_not_loadable_even_without_the_engine(tmp_path):
    from prunelib.run import engine_rows

    store = store_of(tmp_path)
    engine_rows.engine_speed_rows(store, "tiny", tiny_family_model("llama"), pruned("slicegpt", 0.25), "slicegpt",
                                  0.25, "static_hidden", ids=PROMPT, lengths=(16,), folder=tmp_path / "gguf")
    df = store.load()
    assert list(df.metric) == ["loadable"] and df.value.iloc[0] == 0 and df.dtype.iloc[0] == "f16"
    assert df.extra.iloc[0]["runtime"] == "llama.cpp" and "SliceGPT's shortcut" in df.extra.iloc[0]["reason"]


@pytest.mark.parametrize("kw,match", [
    (dict(runtime="vllm"), r"runtime='vllm' is not allowed: expected one of \('pytorch', 'llama.cpp'\)"),
    (dict(runtime="llama.cpp", export_dtype="q4_0"), "export_dtype='q4_0' is not allowed"),
    (dict(runtime="llama.cpp", threads=0), "threads=0 is not allowed"),
    (dict(runtime="llama.cpp", batches=(1, 4)), r"batches=\[1, 4\] is not allowed with runtime='llama.cpp'"),
    (dict(runtime="llama.cpp", device="cuda"), "device='cuda' is not allowed with runtime='llama.cpp'")])
def test_bad_runtime_arguments_name_the_value_and_what_is_allowed(kw, match):
    from prunelib.run import engine_rows

    with pytest.raises(ValueError, match=match):
        engine_rows.check_runtime(**kw)


def test_rows_without_a_runtime_read_as_pytorch_and_the_table_puts_runtimes_side_by_side():
    import pandas as pd

    from prunelib.results import runtimes

    def speed(method, runtime, phase, v, lo, hi, mode):
        extra = {"timing_mode": mode, **({"runtime": runtime, "threads": 1} if runtime else {})}
        return dict(method=method, sparsity=0.25, metric="speedup", phase=phase, batch=1, length=512, value=v,
                    ci_low=lo, ci_high=hi, bound=1.4, dtype="f16" if runtime else "float32", extra=extra)

    rows = [speed("shortgpt", None, "decode", 1.2, 1.15, 1.25, "eager"),  # stored before runtimes existed
            speed("shortgpt", None, "prefill", 1.3, 1.25, 1.35, "eager"),
            speed("shortgpt", "llama.cpp", "decode", 1.33, 1.3, 1.36, "llama.cpp f16"),
            speed("shortgpt", "llama.cpp", "prefill", 1.31, 1.28, 1.34, "llama.cpp f16"),
            speed("slicegpt", None, "decode", 1.1, 1.0, 1.2, "eager"),
            dict(method="slicegpt", sparsity=0.25, metric="loadable", phase=None, batch=None, length=None, value=0,
                 ci_low=None, ci_high=None, bound=None, dtype="f16",
                 extra={"runtime": "llama.cpp", "reason": "SliceGPT's shortcut matrices"}),
            dict(method="shortgpt", sparsity=0.25, metric="quality_loss_pct", phase="quality", batch=None,
                 length=None, value=5.0, ci_low=4.0, ci_high=6.0, bound=None, dtype="float32", extra={})]
    rows[4]["extra"]["threads"] = 1  # PyTorch rows record their thread count too
    df = pd.DataFrame(rows)
    assert runtimes.runtime_of(df.extra.iloc[0]) == "pytorch"
    assert len(runtimes.for_runtime(df, "llama.cpp")) == 4  # its 3 timed rows and the quality row
    t = runtimes.method_runtime_table(df)
    assert list(zip(t.method, t.runtime, t.loadable.str[:3])) == [
        ("shortgpt", "llama.cpp", "yes"), ("shortgpt", "pytorch", "yes"), ("slicegpt", "llama.cpp", "no:"),
        ("slicegpt", "pytorch", "yes")]
    assert t.decode_efficiency.iloc[0] == pytest.approx(1.33 / 1.4)
    threads = t.set_index(["method", "runtime"]).threads
    assert threads[("slicegpt", "pytorch")] == 1 and threads[("shortgpt", "llama.cpp")] == 1
    assert pd.isna(threads[("shortgpt", "pytorch")])  # an old row without it shows none, not a guess
    a = runtimes.agreement(t).set_index(["method", "phase"])
    assert a.loc[("shortgpt", "decode"), "verdict"] == "differ"  # [1.15, 1.25] against [1.30, 1.36]
    assert a.loc[("shortgpt", "prefill"), "verdict"] == "agree"
    assert a.loc[("slicegpt", "decode"), "verdict"] == "not loadable"
    fig = runtimes.plot_agreement(a.reset_index())
    assert len(fig.axes[1].lines) >= 2  # the decode point and the diagonal


def test_the_runtime_table_keeps_models_of_other_prune_options_apart():
    """Width 10% unrounded and rounded to 64 are two models (1382 and 1408 MLP channels): llama.cpp's prefill was
    0.54x on the first and 1.04x on the second, so one must not overwrite the other in the table."""
    import pandas as pd

    from prunelib.results import runtimes

    def speed(runtime, v, options):
        extra = {"timing_mode": "llama.cpp f16" if runtime else "eager", "options": options,
                 **({"runtime": runtime} if runtime else {}), "threads": 1}
        return dict(method="width_magnitude", sparsity=0.1, metric="speedup", phase="prefill", batch=1, length=512,
                    value=v, ci_low=v - 0.02, ci_high=v + 0.02, bound=1.07, dtype="f16", extra=extra)

    df = pd.DataFrame([speed("llama.cpp", 0.54, {}), speed("llama.cpp", 1.04, {"round_to": 64}),
                       speed(None, 1.065, {}), speed(None, 1.06, {"round_to": 64})])
    t = runtimes.method_runtime_table(df)
    assert len(t) == 4 and sorted(t.options.unique()) == ['{"round_to": 64}', "{}"]
    a = runtimes.agreement(t)
    got = {(o if isinstance(o, str) else "{}"): v for o, v in zip(a.get("options", [None] * len(a)), a.verdict)}
    assert got == {"{}": "differ", '{"round_to": 64}': "agree"}
    plain = runtimes.method_runtime_table(df.assign(extra=[{k: v for k, v in e.items() if k != "options"}
                                                           for e in df.extra]))
    assert "options" not in plain  # no options anywhere: no column


def test_a_spec_takes_the_runtime_and_keeps_pytorch_job_keys(tmp_path):
    from prunelib import sweep

    path = tmp_path / "s.yaml"
    path.write_text("models: [random:llama-3.1-8b]\nmethods: [last_n]\nsparsities: [0.25]\nquality: none\n")
    plain = sweep.load_spec(path)
    path.write_text(path.read_text() + "runtime: llama.cpp\nexport_dtype: q8_0\n")
    engine = sweep.load_spec(path)
    assert (plain.runtime, engine.runtime, engine.export_dtype) == ("pytorch", "llama.cpp", "q8_0")
    keys = [j.key for s in (plain, engine) for j in sweep.jobs(s)]
    assert len(set(keys)) == len(keys)
    import dataclasses

    other = dataclasses.replace(plain, export_dtype="q8_0")  # a PyTorch job's key names neither field: the
    assert [j.key for j in sweep.jobs(other)] == [j.key for j in sweep.jobs(plain)]  # sweeps stored before stay done
    path.write_text(path.read_text() + "batches: [1, 2]\n")
    with pytest.raises(sweep.SpecError, match="runtime: 'llama.cpp' is not allowed with batches"):
        sweep.load_spec(path)


@needs_engine
def test_engine_rows_store_speedups_bounds_and_loadability(tmp_path):
    from prunelib.results import runtimes
    from prunelib.run import engine_rows

    store = store_of(tmp_path)
    dense, small = tiny_family_model("llama"), pruned("shortgpt", 0.5)
    engine_rows.engine_speed_rows(store, "tiny", dense, small, "shortgpt", 0.5, "static_depth", ids=PROMPT,
                                  lengths=(16,), reps=3, threads=1, folder=tmp_path / "gguf")
    df = store.load()
    sp = df[df.metric == "speedup"]
    assert sorted(sp.phase) == ["decode", "prefill"] and set(sp.dtype) == {"f16"} and set(sp.n) == {3}
    e = sp.extra.iloc[0]
    assert (e["runtime"], e["threads"], e["kv_type"], e["timing_mode"]) == ("llama.cpp", 1, "f16", "llama.cpp f16")
    assert (sp.bound > 1).all() and (sp.ci_low <= sp.value).all() and (sp.value <= sp.ci_high).all()
    t = runtimes.method_runtime_table(df, 16)
    assert t.loadable.tolist() == ["yes"] and t.prefill_speedup.notna().all()
    n = len(df)
    engine_rows.engine_speed_rows(store, "tiny", dense, small, "shortgpt", 0.5, "static_depth", ids=PROMPT,
                                  lengths=(16,), reps=3, threads=1, folder=tmp_path / "gguf")
    assert len(store.load()) == n  # keyed: a second run measures nothing


@pytest.mark.slow
def test_engines_notebook_runs_both_runtimes_and_says_where_they_agree(tmp_path, monkeypatch):
    import json

    from prunelib import demo

    monkeypatch.setenv("PRUNELIB_FIGURES", str(tmp_path / "fig"))
    out = demo.execute("engines", tmp_path, dict(methods=["last_n", "width_magnitude"], sparsities=[0.1],
                                                 lengths=[32], reps=2, calib_n=4, calib_len=32), progress_bar=False)
    text = json.dumps(json.loads(out.read_text())["cells"])
    if REASON is None:
        assert "agree" in text or "differ" in text
        assert (tmp_path / "fig" / "engines_agreement.png").stat().st_size > 1000
    else:
        assert "skipped (llama_cpp cannot be imported" in text


@needs_engine
def test_a_sweep_with_runtime_llama_cpp_stores_loadability_and_engine_speedups(tmp_path):
    from prunelib.run import pipeline

    path = tmp_path / "tiny-llama"
    tiny_family_model("llama").save_pretrained(path)
    store = store_of(tmp_path)
    df = pipeline.run(str(path), ("last_n", "lowrank_svd"), (0.25,), lengths=(16,), reps=2, preset=None,
                      fidelity=False, runtime="llama.cpp", threads=1, store=store)
    load = df[df.metric == "loadable"].set_index("method").value.to_dict()
    assert load == {"last_n": 1, "lowrank_svd": 0}
    sp = df[df.metric == "speedup"]
    assert set(sp.method) == {"last_n"} and {e["runtime"] for e in sp.extra} == {"llama.cpp"}
