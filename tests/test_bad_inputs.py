"""Bad inputs, tried as a new user would: every one is refused before any work, with a message that names
the parameter, the value given and what is allowed, and nothing lands in the results store.

Covers the Python API (prune, timing.compare / measure, quality.evaluate / quality_loss, experiment.run),
the command lines (experiment, quality, bench: main(argv) in-process) and notebook parameters
(checks.parameters, what a papermill-injected cell calls). No test loads the embedded model.
"""
import math

import pandas as pd
import pytest
import torch

from prunelib import bench, experiment
from prunelib.run import checks
from prunelib import quality
from prunelib.measure import timing
from prunelib import pruning
from prunelib.core.config import results_dir
from prunelib.core.store import ResultsStore
from tests.conftest import tiny_config


@pytest.fixture(autouse=True)
def nothing_stored():
    yield
    folder = results_dir()
    assert not folder.exists() or ResultsStore().load().empty, "a refused input stored rows"


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config()).eval()  # 4 layers, max_position_embeddings 512


# --- prune(): sparsity per method and unit, options per method -------------------------------------
PRUNE = [
    ("bogus", 0.25, {}, r"unknown pruning method 'bogus'; registered: \[.*'last_n'"),
    ("last_n", 1.5, {}, r"sparsity 1.5 is out of range for 'last_n' \(decoder layers.*\): allowed 0 <= s <= 0.75"),
    ("last_n", -0.1, {}, r"sparsity -0.1 is out of range for 'last_n'.*0 <= s <= 0.75"),
    ("last_n", math.nan, {}, r"sparsity nan is out of range for 'last_n'"),
    ("last_n", True, {}, r"sparsity True is out of range"),
    ("last_n", "0.25", {}, r"sparsity '0.25' is out of range"),
    ("shortgpt_mlp", 1.0, {}, r"sparsity 1.0 is out of range for 'shortgpt_mlp'.*0 <= s <= 0.75"),  # every MLP
    ("shortgpt_attn", 1.0, {}, r"sparsity 1.0 is out of range for 'shortgpt_attn'.*0 <= s <= 0.75"),
    ("sparse24_magnitude", 0.75, {}, r"sparsity 0.75 is out of range for 'sparse24_magnitude'.*0 <= s <= 0.5"),
    ("width_magnitude", 0.99, {}, r"sparsity 0.99 is out of range for 'width_magnitude'.*0 <= s <= 0.95"),
    ("dyn_depth_random", 0.5, {}, r"sparsity 0.5 is out of range for 'dyn_depth_random'.*0 <= s <= 0.4999"),
    ("last_n", 0.25, {"round_to": 7}, r"option round_to=7 is not taken by pruning method 'last_n'; its options: none"),
    ("last_n", 0.25, {"bogus": 1}, r"option bogus=1 is not taken by pruning method 'last_n'"),
    ("width_magnitude", 0.25, {"round_to": 7}, r"option round_to=7 of pruning method 'width_magnitude' is not "
                                               r"allowed: expected one of \[8, 64\]"),
    ("sparse24_magnitude", 0.5, {"sparse_kernel": "yes"}, r"option sparse_kernel='yes'.*expected bool"),
    ("dyn_depth_random", 0.25, {"variant": "mlp"}, r"option variant='mlp' is not taken by pruning method "
                                                   r"'dyn_depth_random'; its options: none"),
    ("sparse_attn_block", 0.5, {"block": 8.5}, r"option block=8.5 .*expected an integer"),
    ("token_prune_attn", 0.5, {"keep": 3}, r"option keep=3 is not taken by pruning method 'token_prune_attn'; "
                                           r"its options: layer \(an integer\)"),
    ("shortgpt", 0.25, {}, r"method 'shortgpt' needs calibration data"),
]


@pytest.mark.parametrize("method,sparsity,options,match", PRUNE, ids=[f"prune-{i}" for i in range(len(PRUNE))])
def test_prune_refuses(tiny, method, sparsity, options, match):
    with pytest.raises(ValueError, match=match):
        pruning.prune(tiny, method, sparsity, **options)


# --- timing: reps, batch, length within the positions, phase, vocabularies ------------------------------
def _other_vocab():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(tiny_config(vocab_size=300)).eval()


TIMING = [
    (dict(phase="prefill", batch=1, length=8, reps=1), r"reps=1 is not allowed: expected an integer >= 2"),
    (dict(phase="prefill", batch=1, length=8, reps=0), r"reps=0 is not allowed: expected an integer >= 2"),
    (dict(phase="prefill", batch=0, length=8), r"batch=0 is not allowed: expected an integer >= 1"),
    (dict(phase="prefill", batch=1, length=-5), r"length=-5 is not allowed: expected an integer >= 1"),
    (dict(phase="decode", batch=1, length=512), r"length=512 is not allowed: expected an integer >= 1 and <= 511 "
                                                r"\(max_position_embeddings 512"),
    (dict(phase="prefill", batch=1, length=10**6), r"length=1000000 .*<= 512"),
    (dict(phase="prefil", batch=1, length=8), r"phase='prefil' is not allowed: expected one of \['prefill', 'decode'\]"),
    (dict(phase="prefill", batch=1.5, length=8), r"batch=1.5 is not allowed"),
]


@pytest.mark.parametrize("kw,match", TIMING, ids=[f"compare-{i}" for i in range(len(TIMING))])
def test_compare_refuses(tiny, kw, match):
    with pytest.raises(ValueError, match=match):
        timing.compare(tiny, tiny, **kw)


def test_measure_refuses_one_rep(tiny):
    with pytest.raises(ValueError, match=r"reps=1 is not allowed: expected an integer >= 2"):
        timing.measure(tiny, "prefill", 1, 8, reps=1)


def test_compare_refuses_different_vocabularies(tiny):
    with pytest.raises(ValueError, match=r"vocabulary size=300 is not allowed: expected the base model's "
                                         r"vocabulary size 256"):
        timing.compare(tiny, _other_vocab(), "prefill", 1, 8)


# --- quality: limits, batch size, task names; a missing chosen metric ------------------------------------
EVAL = [
    (dict(limit=math.nan), r"limit must be a positive number.*got limit=nan"),
    (dict(limit=math.inf), r"got limit=inf"),
    (dict(limit=-1), r"got limit=-1"),
    (dict(batch_size=0), r"batch_size=0 is not allowed: expected an integer >= 1"),
    (dict(tasks=["bogus"]), r"unknown offline task\(s\) \['bogus'\]; allowed: \[.*'arc_easy'"),
    (dict(preset="medium", tasks=None), r"unknown quality preset 'medium'; available: \['full', 'quick'\]"),
]


@pytest.mark.parametrize("kw,match", EVAL, ids=[f"evaluate-{i}" for i in range(len(EVAL))])
def test_evaluate_refuses(tiny, kw, match):
    kw = {"tasks": ["arc_easy"], "limit": 2, **kw}
    with pytest.raises(ValueError, match=match):
        quality.evaluate(tiny, None, kw.pop("tasks"), **kw)


def test_quality_loss_refuses_a_missing_chosen_metric():
    def rows(vals):
        return pd.DataFrame([dict(metric=m, value=v, extra={"stderr": 0.01}, config_hash=f"h{m}") for m, v in vals])

    dense = rows([("arc_easy/acc", 0.6), ("hellaswag/acc", 0.4), ("hellaswag/acc_norm", 0.5)])
    pruned = rows([("arc_easy/acc", 0.5), ("hellaswag/acc", 0.3)])  # hellaswag/acc_norm lost in a crash
    with pytest.raises(ValueError, match=r"hellaswag/acc_norm \(pruned\) missing or not finite"):
        quality.quality_loss(dense, pruned)
    pruned = rows([("arc_easy/acc", 0.5), ("hellaswag/acc", 0.3), ("hellaswag/acc_norm", math.nan)])
    with pytest.raises(ValueError, match=r"hellaswag/acc_norm \(pruned\) missing or not finite"):
        quality.quality_loss(dense, pruned)


# --- experiment.run (Python API): refused before the model loads, or right after it ---------------------
RUN = [
    (dict(sparsities=[1.5]), r"sparsities=\[1.5\] is not allowed: expected a list of fractions 0 <= s < 1; 1.5"),
    (dict(reps=1), r"reps=1 is not allowed"),
    (dict(batches=[0]), r"batches=\[0\] is not allowed: expected a non-empty list of integers >= 1; 0 is not"),
    (dict(lengths=[-5]), r"lengths=\[-5\] is not allowed.*-5 is not"),
    (dict(phases=["prefil"]), r"phases='prefil' is not allowed"),
    (dict(preset="medium"), r"preset='medium' is not allowed: expected one of \['full', 'quick'\]"),
    (dict(round_to=7), r"option round_to=7 is not taken by pruning method 'last_n'"),
    (dict(methods=["bogus"]), r"unknown pruning method 'bogus'"),
    (dict(calib_n=0), r"calib_n=0 is not allowed"),
]


@pytest.mark.parametrize("kw,match", RUN, ids=[f"run-{i}" for i in range(len(RUN))])
def test_run_refuses_before_loading(kw, match):
    kw = {"methods": ["last_n"], "sparsities": [0.25], **kw}
    with pytest.raises(ValueError, match=match):  # the model name does not even exist: nothing was loaded
        experiment.run("no-such-model", kw.pop("methods"), kw.pop("sparsities"), **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(methods=["shortgpt_mlp"], sparsities=[0.9]), r"sparsity 0.9 is out of range for 'shortgpt_mlp'"),
    (dict(lengths=[600]), r"lengths=600 is not allowed: expected lengths <= 511 \(max_position_embeddings 512"),
])
def test_run_refuses_what_the_model_rules_out_before_measuring(tmp_path, kw, match):
    from prunelib.model.models import save_pruned
    from transformers import AutoModelForCausalLM

    save_pruned(AutoModelForCausalLM.from_config(tiny_config()), tmp_path / "tiny")
    kw = {"methods": ["last_n"], "sparsities": [0.25], **kw}
    with pytest.raises(ValueError, match=match):
        experiment.run(str(tmp_path / "tiny"), kw.pop("methods"), kw.pop("sparsities"), preset=None, **kw)


# --- command lines: argparse usage errors naming the flag's parameter and value --------------------------
CLI = [
    (experiment, ["--batches", "0"], r"batches=\[0\] is not allowed"),
    (experiment, ["--lengths", "-5"], r"lengths=\[-5\] is not allowed.*-5 is not"),
    (experiment, ["--sparsities", "1.5"], r"sparsities=\[1.5\] is not allowed"),
    (experiment, ["--sparsities", "nan"], r"sparsities=\[nan\] is not allowed"),
    (experiment, ["--reps", "0"], r"reps=0 is not allowed: expected an integer >= 2"),
    (experiment, ["--reps", "1"], r"reps=1 is not allowed"),
    (experiment, ["--methods", "last_n", "--round-to", "7"], r"option round_to=7 is not taken by pruning method "
                                                             r"'last_n'; its options: none"),
    (experiment, ["--methods", "width_flap", "--round-to", "7"], r"round_to=7 .*expected one of \[8, 64\]"),
    (experiment, ["--methods", "bogus"], r"unknown pruning method 'bogus'"),
    (experiment, ["--batches", "x"], r"batches='x' is not allowed: expected comma-separated integers"),
    (experiment, ["--phases", "prefil"], r"phases='prefil' is not allowed"),
    (experiment, ["--preset", "medium"], r"preset='medium' is not allowed"),
    (quality, ["--limit", "nan"], r"got limit=nan"),
    (quality, ["--limit", "inf"], r"got limit=inf"),
    (quality, ["--limit", "0"], r"got limit=0"),
    (quality, ["--batch-size", "0"], r"batch_size=0 is not allowed"),
    (quality, ["--tasks", "bogus"], r"unknown offline task\(s\) \['bogus'\]"),
    (bench, ["--batch", "0"], r"batch=0 is not allowed: expected an integer >= 1"),
    (bench, ["--length", "-5"], r"length=-5 is not allowed"),
    (bench, ["--reps", "1"], r"reps=1 is not allowed: expected an integer >= 2"),
    (bench, ["--threads", "0"], r"threads=0 is not allowed"),
]


@pytest.mark.parametrize("module,argv,match", CLI, ids=[f"{m.__name__.split('.')[-1]}:{' '.join(a)}" for m, a, _ in CLI])
def test_cli_refuses(capsys, module, argv, match):
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert pytest.importorskip("re").search(match, err), err


# --- notebook parameters (papermill) ---------------------------------------------------------------------
PARAMS = [
    (dict(methods=["shortgpt", "bogus"]), r"unknown pruning method 'bogus'"),
    (dict(methods="shortgpt"), r"methods='shortgpt' is not allowed: expected a non-empty list"),
    (dict(sparsities=[0.25, 1.5]), r"sparsities=\[0.25, 1.5\] is not allowed.*1.5 is not"),
    (dict(sparsities=[float("nan")]), r"sparsities=\[nan\]"),
    (dict(batches=[0]), r"batches=\[0\] is not allowed"),
    (dict(lengths=[-5]), r"lengths=\[-5\] is not allowed.*-5 is not"),
    (dict(reps=1), r"reps=1 is not allowed: expected an integer >= 2"),
    (dict(calib_n=0), r"calib_n=0 is not allowed"),
    (dict(limit=float("nan")), r"limit=nan is not allowed"),
    (dict(phases=["prefil"]), r"phases='prefil' is not allowed"),
    (dict(quality_preset="medium"), r"quality_preset='medium' is not allowed"),
    (dict(device="cuda:7"), r"device 'cuda:7'"),
    (dict(dtype="int8"), r"dtype 'int8' is not supported; allowed: \['bfloat16', 'float16', 'float32'\]"),
    (dict(model=3), r"model=3 is not allowed: expected a model name or path"),
    (dict(long_context_docs=-1), r"long_context_docs=-1 is not allowed"),
    (dict(bands=[[5, 1]]), r"bands=\[\[5, 1\]\] is not allowed"),
    (dict(timing_mode="cuda_graph"), r"timing_mode='cuda_graph' is not allowed: expected None \(the device's default\) "
                                     r"or one of \['eager', 'compiled', 'graph'\]"),
]


@pytest.mark.parametrize("kw,match", PARAMS, ids=[f"param-{next(iter(k))}-{i}" for i, (k, _) in enumerate(PARAMS)])
def test_notebook_parameters_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        checks.parameters(**kw)


# --- data files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", ["arc_easy/test.json", "lambada_openai/lambada_test.jsonl",
                                 "hellaswag/data-00000-of-00001.arrow"])
def test_truncated_data_file_is_named_with_its_path(tmp_path, rel):
    from prunelib.core import evaltasks
    from prunelib.core.config import data_dir

    src = data_dir() / rel
    if not src.exists():
        pytest.skip(f"offline data kit has no {rel}")
    target = tmp_path / "data" / rel
    target.parent.mkdir(parents=True)
    data = src.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"malformed data for task '{rel.split('/')[0]}' in {target}"):
        evaltasks.prepare_tasks([rel.split("/")[0]], data_dir=tmp_path / "data")
