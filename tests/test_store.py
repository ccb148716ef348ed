import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest

from prunelib.core.store import CorruptRowError, CorruptRowWarning, ResultsStore, config_hash, make_row


def row(i, metric="ttft_s"):
    return dict(model="m", cell="static_depth", method="last_n", sparsity=0.25, phase="prefill", batch=1,
                length=512, device="cpu", dtype="float32", metric=metric, value=float(i),
                config_hash=config_hash({"i": i}))


def test_roundtrip_and_schema(tmp_path):
    s = ResultsStore(tmp_path / "r.jsonl")
    assert s.load().empty and list(s.load().columns)[:3] == ["model", "cell", "method"]
    s.append([row(1), row(2, "tpot_s") | {"layers_removed": [1, 2]}])
    df = s.load()
    assert len(df) == 2 and df.value.tolist() == [1.0, 2.0]
    assert df.extra[1] == {"layers_removed": [1, 2]}  # unknown keys kept under extra
    assert df.versions[0]["torch"] and df.timestamp[0]


def test_skip_what_is_stored(tmp_path):
    s = ResultsStore(tmp_path / "r.jsonl")
    s.append(row(1))
    assert s.has(config_hash({"i": 1}), "ttft_s") and not s.has(config_hash({"i": 1}), "tpot_s")
    assert ResultsStore(tmp_path / "r.jsonl").has(config_hash({"i": 1}))
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})


def test_missing_fields_rejected(tmp_path):
    with pytest.raises(ValueError, match="needs metric"):
        make_row(model="m", method="x", value=1.0, config_hash="h")


def test_corrupt_line_named_and_others_load(tmp_path):
    path = tmp_path / "r.jsonl"
    s = ResultsStore(path)
    s.append(row(1))
    with open(path, "a") as f:
        f.write('{"model": "m", "value": \n')
    s.append(row(2))
    with pytest.warns(CorruptRowWarning, match=rf"{path}:2: corrupt result row"):
        df = s.load()
    assert df.value.tolist() == [1.0, 2.0]
    with pytest.raises(CorruptRowError, match=":2:"):
        s.load(strict=True)


def test_partial_last_line_does_not_swallow_next_row(tmp_path):
    path = tmp_path / "r.jsonl"
    s = ResultsStore(path)
    s.append(row(1))
    with open(path, "a") as f:
        f.write(json.dumps(make_row(**row(2)))[:40])  # a writer died mid-line
    s.append(row(3))
    with pytest.warns(CorruptRowWarning, match=":2:"):
        assert s.load().value.tolist() == [1.0, 3.0]


def test_survives_killed_writer(tmp_path):
    path = tmp_path / "r.jsonl"
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {os.getcwd()!r})
        from prunelib.core.store import ResultsStore
        s = ResultsStore({str(path)!r})
        i = 0
        while True:
            s.append(dict(model="m", method="x", metric="v", value=float(i), config_hash=str(i), extra={{"pad": "x" * 5000}}))
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while (not path.exists() or path.stat().st_size < 200_000) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    s = ResultsStore(path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptRowWarning)
        values = s.load().value.tolist()
    assert len(values) > 10
    assert values == [float(i) for i in range(len(values))]  # every stored row intact, in order
    s.append(dict(model="m", method="x", metric="v", value=-1.0, config_hash="after"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptRowWarning)
        assert s.load().value.tolist()[-1] == -1.0


def _measure(store, tasks):
    """A resumable measurement: each task's two metrics land as one unit; stored tasks are skipped."""
    for t in tasks:
        key = config_hash({"task": t})
        if not store.has(key, ["acc", "acc_norm"]):
            store.append([dict(model="m", method="x", metric=m, value=v, config_hash=key)
                          for m, v in (("acc", 0.5), ("acc_norm", 0.6))])


@pytest.mark.parametrize("cut", ["line_boundary", "mid_line"])
def test_writer_killed_between_two_rows_of_a_measurement_resumes_to_the_complete_set(tmp_path, cut):
    path = tmp_path / "r.jsonl"
    s = ResultsStore(path)
    _measure(s, ["arc", "hellaswag"])
    text = path.read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[0] + "\n"  # hellaswag/acc written, hellaswag/acc_norm lost
    path.write_text(last if cut == "line_boundary" else last + text[len(last):len(last) + 30])
    s = ResultsStore(path)
    with pytest.warns(CorruptRowWarning, match="incomplete measurement unit .*1 of 2 rows"):
        df = s.load()
    assert sorted(df.metric) == ["acc", "acc_norm"]  # arc only: the half of hellaswag is not used
    assert not s.has(config_hash({"task": "hellaswag"}), "acc")
    with pytest.raises(CorruptRowError) as err:
        s.load(strict=True)
    assert "skipped" not in str(err.value)
    _measure(s, ["arc", "hellaswag"])  # the resume redoes hellaswag only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptRowWarning)
        df = ResultsStore(path).load()
    assert sorted(zip(df.config_hash, df.metric)) == sorted(
        (config_hash({"task": t}), m) for t in ("arc", "hellaswag") for m in ("acc", "acc_norm"))


def test_a_failed_row_never_replaces_a_good_one(tmp_path):
    s = ResultsStore(tmp_path / "r.jsonl")
    s.append(row(1))
    s.append(row(2) | {"config_hash": config_hash({"i": 1}), "value": float("nan")})  # a later failed re-run
    assert s.load().value.tolist() == [1.0]
    s2 = ResultsStore(tmp_path / "r2.jsonl")
    s2.append(row(3) | {"value": float("nan")})
    assert not s2.has(config_hash({"i": 3}), "ttft_s")  # a failure alone is not "stored": measured again
    assert s2.load().value.isna().tolist() == [True]  # but it is not hidden either


@pytest.mark.parametrize("how", ["unit_cut", "old_row_lost"])
def test_quality_resume_redoes_a_task_that_lost_a_metric(tmp_path, embedded, how):
    """A crash between two rows of one task (or an old store missing the chosen metric) is scored again."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunelib import quality

    tok = embedded[1]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    path = tmp_path / "r.jsonl"
    full = quality.evaluate(model, tok, ["arc_easy"], limit=4, store=ResultsStore(path))
    lines = path.read_text().splitlines(keepends=True)
    keep = [l for l in lines if '"arc_easy/acc"' not in l]  # the chosen metric's row is lost
    if how == "old_row_lost":  # written before rows carried their unit
        keep = [json.dumps({k: v for k, v in json.loads(l).items() if k not in ("unit", "unit_size")}) + "\n"
                for l in keep]
    path.write_text("".join(keep))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptRowWarning)
        again = quality.evaluate(model, tok, ["arc_easy"], limit=4, store=ResultsStore(path))
        got = again.drop_duplicates("metric", keep="last").set_index("metric").value
    assert got.to_dict() == full.set_index("metric").value.to_dict()  # the complete set, same scores
