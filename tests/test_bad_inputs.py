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


# --- issue 27's bad-input table: every input the campaign found silent, late, crashing or misleading, plus our own.
# Each is refused before any model loads (load_model fails the test) and before any row is written (the store's
# rows and bytes are unchanged), with a message naming the parameter, the value and what is allowed.
class _FakeTokenizer:  # a tokenizer of 1,000 ids (a model of 256 embeddings), or of the model's own size
    pad_token = "<pad>"

    def __init__(self, size: int = 1000):
        self.size = size

    def __len__(self):
        return self.size


def _cal(ids):
    from prunelib.model.calibration import CalibrationSet

    return CalibrationSet(ids, "synthetic", None, 0)


def _spec(env, **over):
    import yaml

    spec = dict(models=[str(env["plain"])], methods=["last_n"], sparsities=[0.25], lengths=[16], reps=2,
                quality="none", fidelity=False, timing_mode="eager", threads=1)
    spec.update(over)
    path = env["tmp"] / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _spec_text(env, text):
    path = env["tmp"] / "spec.yaml"
    path.write_text(text.format(model=env["plain"]))
    return str(path)


def _dense_zero():
    rows = lambda v: pd.DataFrame([dict(metric="arc_easy/acc", value=v, extra={"stderr": 0.01}, config_hash="h")])
    return quality.quality_loss(rows(0.0), rows(0.1))


def _append(**over):
    row = {**dict(model="m", method="last_n", metric="speedup", phase="prefill", value=1.2, config_hash="k"), **over}
    return ResultsStore().append(row)


def _unwritable(env):
    return ResultsStore(env["blocker"] / "results" / "results.jsonl")  # a folder under a plain file


def _sweep_into_unwritable(env):
    from prunelib import sweep

    return sweep.run(sweep.load_spec(_spec(env)), store=_unwritable(env), progress=False)


def _run(env, model="no-such-model", **kw):
    kw = {"methods": ["last_n"], "sparsities": [0.25], "preset": None, "lengths": [16], **kw}
    return experiment.run(model, kw.pop("methods"), kw.pop("sparsities"), **kw)


_S, _L, _C, _M, _O = "silent", "late", "crash", "misleading", "own"
TABLE = [
    # silent: accepted, and a wrong number (or none) came out
    (_S, "calibration of zero windows",
     lambda e: pruning.prune(e["tiny"], "shortgpt", 0.25, calibration=_cal(torch.zeros(0, 16, dtype=torch.long))),
     r"calibration='input_ids of shape \(0, 16\)' is not allowed: expected None or a CalibrationSet"),
    (_S, "sparse_attn_block block=100000",
     lambda e: pruning.prune(e["tiny"], "sparse_attn_block", 0.25, block=100000),
     r"option block=100000 of pruning method 'sparse_attn_block' is not allowed: expected an integer 1 <= block <= 256"),
    (_S, "slicegpt round_to=1000",
     lambda e: pruning.prune(e["tiny"], "slicegpt_random", 0.25, round_to=1000),
     r"option round_to=1000 .* is not allowed: expected an integer 1 <= round_to <= 32 \(half the hidden size 64"),
    (_S, "--budget -1", lambda e: experiment.main(["--budget", "-1"]),
     r"budget_s=-1.0 is not allowed: expected a finite number of seconds > 0"),
    (_S, "--budget nan", lambda e: experiment.main(["--budget", "nan"]), r"budget_s=nan is not allowed"),
    (_S, "--limit 1.5", lambda e: quality.main(["--limit", "1.5", "--tasks", "arc_easy"]),
     r"limit must be a positive number of documents, a fraction < 1, or None for all; got limit=1.5"),
    (_S, "max_length=0", lambda e: quality.evaluate(e["tiny"], _FakeTokenizer(), ["arc_easy"], limit=2, max_length=0),
     r"max_length=0 is not allowed: expected an integer >= 1"),
    (_S, "a task listed twice", lambda e: quality.evaluate(e["tiny"], _FakeTokenizer(256), ["arc_easy", "arc_easy"], limit=2),
     r"tasks=\['arc_easy', 'arc_easy'\] is not allowed: expected each value once; listed more than once: \['arc_easy'\]"),
    (_S, "quality_loss against a dense accuracy of 0 (-inf, shown with a finite CI)", lambda e: _dense_zero(),
     r"dense arc_easy/acc=0.0 is not allowed: expected a dense accuracy > 0"),
    (_S, "store value '0.5'", lambda e: _append(value="0.5"),
     r"value='0.5' is not allowed: expected a number \(int or float\) or None"),
    (_S, "store value True", lambda e: _append(value=True), r"value=True is not allowed: expected a number"),
    (_S, "store value a tensor", lambda e: _append(value=torch.tensor(0.5)), r"value=tensor\(0.5000\) is not allowed"),
    (_S, "store value a set", lambda e: _append(value={0.5}), r"value=\{0.5\} is not allowed"),
    (_S, "store sparsity '0.25'", lambda e: _append(sparsity="0.25"), r"sparsity='0.25' is not allowed: expected a number"),
    (_S, "fidelity='no'", lambda e: _run(e, fidelity="no"),
     r"fidelity='no' is not allowed: expected True, False, or distinct domains among \['ptb', 'wikitext2'\]"),
    (_S, "--table --model nonexistent", lambda e: experiment.main(["--table", "--model", "nonexistent"]),
     r"model='nonexistent' is not allowed: expected a model with stored rows, and the store is empty"),
    (_S, "--spec S --methods X", lambda e: experiment.main(["--spec", _spec(e), "--methods", "shortgpt"]),
     r"spec='.*spec.yaml' is not allowed with --methods='shortgpt': expected the spec alone"),
    (_S, "--tasks ''", lambda e: quality.main(["--tasks", ""]),
     r"tasks='' is not allowed: expected comma-separated task names, none empty"),
    (_S, "one model under two names in a spec", lambda e: sweep_load(_spec(e, models=[str(e["plain"]),
                                                                                     str(e["plain"]) + "/."])),
     r"models\[1\]: '.*/\.' is the model of models\[0\] \('.*plain'\); list each model once"),
    (_S, "a duplicate YAML key", lambda e: sweep_load(_spec_text(e, "models: [{model}]\nmethods: [last_n]\n"
                                                                   "sparsities: [0.25]\nlengths: [16]\nquality: none\n"
                                                                   "fidelity: false\nsparsities: [0.5]\n")),
     r"spec.yaml:7: key 'sparsities' is given twice \(YAML keeps only the last\)"),
    # late: accepted, and found out only after the model loaded or the first rows were written
    (_L, "spec dtype float16 on CPU", lambda e: sweep_load(_spec(e, dtype="float16")),
     r"dtype: 'float16' is not allowed on devices \['cpu'\]; allowed there: \['float32', 'bfloat16'\]"),
    (_L, "spec timing_mode graph on CPU", lambda e: sweep_load(_spec(e, timing_mode="graph")),
     r"timing_mode: 'graph' \(CUDA graphs\) is not allowed on devices \['cpu'\]"),
    (_L, "spec options a method does not take", lambda e: sweep_load(_spec(e, options={"round_to": 64})),
     r"options: option round_to=64 is not taken by pruning method 'last_n'"),
    (_L, "spec batches: []", lambda e: sweep_load(_spec(e, batches=[])), r"batches: \[\] is not allowed; expected a non-empty"),
    (_L, "spec lengths: []", lambda e: sweep_load(_spec(e, lengths=[])), r"lengths: \[\] is not allowed"),
    (_L, "notebook lengths [100000]", lambda e: checks.parameters(model=str(e["plain"]), lengths=[100000]),
     r"lengths=100000 is not allowed: expected lengths <= 511 \(max_position_embeddings 512"),
    (_L, "notebook timing_mode graph on CPU", lambda e: checks.parameters(device="cpu", timing_mode="graph"),
     r"timing mode 'graph' cannot run on cpu .*CUDA graphs need a CUDA device"),
    (_L, "notebook calib_len 1000000", lambda e: checks.parameters(model=str(e["plain"]), calib_len=1000000),
     r"calib_len=1000000 is not allowed: expected an integer >= 1 and <= 512"),
    (_L, "ci_target=5", lambda e: _run(e, ci_target=5), r"ci_target=5 is not allowed: expected None .*'auto' or a "
                                                        r"relative CI half-width 0 < ci_target < 1"),
    (_L, "ci_target='bogus'", lambda e: _run(e, ci_target="bogus"), r"ci_target='bogus' is not allowed"),
    (_L, "a checkpoint without a tokenizer to quality --model",
     lambda e: quality.main(["--model", str(e["checkpoint"]), "--tasks", "arc_easy"]),
     r"model='.*ckpt' is not allowed: expected a model with a tokenizer"),
    (_L, "a read-only results folder, experiment.run", lambda e: _run(e, model=str(e["plain"]), store=_unwritable(e)),
     r"results store='.*blocker/results/results.jsonl' is not allowed: expected a folder this process can write"),
    (_L, "a read-only results folder, quality CLI", lambda e: quality.main(["--tasks", "arc_easy"]),
     r"results store=.* is not allowed: expected a folder this process can write"),
    (_L, "a read-only results folder, evaluate", lambda e: quality.evaluate(e["tiny"], _FakeTokenizer(256), ["arc_easy"],
                                                                           limit=2, store=_unwritable(e)),
     r"results store=.* is not allowed: expected a folder this process can write"),
    # crash: a raw traceback
    (_C, "calibration='text'", lambda e: pruning.prune(e["tiny"], "shortgpt", 0.25, calibration="text"),
     r"calibration='text' is not allowed: expected None or a CalibrationSet"),
    (_C, "float calibration ids", lambda e: pruning.prune(e["tiny"], "shortgpt", 0.25, calibration=_cal(torch.rand(2, 16))),
     r"calibration='input_ids \(2, 16\) torch.float32' is not allowed: .*an integer tensor \[n, length\]"),
    (_C, "prune seed='x'", lambda e: pruning.prune(e["tiny"], "last_n", 0.25, seed="x"),
     r"seed='x' is not allowed: expected an integer >= 0"),
    (_C, "evaluate seed='x'", lambda e: quality.evaluate(e["tiny"], _FakeTokenizer(), ["arc_easy"], limit=2, seed="x"),
     r"seed='x' is not allowed: expected an integer >= 0"),
    (_C, "hw='h100'", lambda e: pruning.prune(e["tiny"], "last_n", 0.25, hw="h100"),
     r"hw='h100' is not allowed: expected None or a HardwareSpec, e.g. hardware.spec\('h100-sxm'\)"),
    (_C, "calibration ids outside the vocabulary",
     lambda e: pruning.prune(e["tiny"], "shortgpt", 0.25, calibration=_cal(torch.full((2, 16), 300))),
     r"calibration='token ids 300..300' is not allowed: expected token ids 0..255"),
    (_C, "a tokenizer larger than the model's vocabulary",
     lambda e: quality.evaluate(e["tiny"], _FakeTokenizer(), ["arc_easy"], limit=2),
     r"tokenizer vocabulary size=1000 is not allowed: expected <= the model's 256 embeddings"),
    (_C, "compare(None, ...)", lambda e: timing.compare(None, e["tiny"], "prefill", 1, 8),
     r"base_model=None is not allowed: expected a loaded model \(torch.nn.Module\)"),
    (_C, "max_length=-1", lambda e: quality.evaluate(e["tiny"], _FakeTokenizer(), ["arc_easy"], limit=2, max_length=-1),
     r"max_length=-1 is not allowed"),
    (_C, "a plugin calling sys.exit", lambda e: sweep_load(_spec(e, plugins=[str(e["exit_plugin"])])),
     r"plugins\[0\]: cannot import '.*exits.py': SystemExit: 3"),
    (_C, "--what-if on an empty store", lambda e: quality.main(["--what-if", "arc_easy=10"]),
     r"--what-if arc_easy=10: what_if: the store .* holds no scores"),
    # misleading messages
    (_M, "run(phases='prefill') reported phases='p'", lambda e: _run(e, phases="prefill"),
     r"phases='prefill' is not allowed: expected a list of \['prefill', 'decode'\].*e.g. \['prefill'\]"),
    (_M, "'cuda' is not a device here: cpu or cuda", lambda e: sweep_load(_spec(e, devices=["cuda"])),
     r"devices\[0\]: 'cuda' is not a device here: cpu \(no CUDA device here\)"),
    # our own
    (_O, "store extra a string", lambda e: _append(extra="x"), r"extra='x' is not allowed: expected a dict"),
    (_O, "store n a string", lambda e: _append(n="10"), r"n='10' is not allowed: expected a number"),
    (_O, "a phase listed twice", lambda e: _run(e, phases=["prefill", "prefill"]),
     r"phases=\['prefill', 'prefill'\] is not allowed: .*each phase once"),
    (_O, "compare budget_s=nan", lambda e: timing.compare(e["tiny"], e["tiny"], "prefill", 1, 8, budget_s=math.nan),
     r"budget_s=nan is not allowed"),
    (_O, "evaluate limit=2.5", lambda e: quality.evaluate(e["tiny"], _FakeTokenizer(), ["arc_easy"], limit=2.5),
     r"got limit=2.5"),
    (_C, "timing text ids outside the vocabulary",
     lambda e: timing.compare(e["tiny"], e["tiny"], "prefill", 1, 8, text=torch.full((1, 9), 300)),
     r"text='token ids 300..300' is not allowed: expected token ids 0..255"),
    (_O, "--ci-target 5 (exit 1, not a usage error)", lambda e: experiment.main(["--ci-target", "5"]),
     r"ci_target=5.0 is not allowed: expected None \(exactly reps pairs\), 'auto' or a relative CI half-width"),
    (_O, "load_model(3)", lambda e: _load_model(3), r"name=3 is not allowed: expected a model name, hub id or folder"),
    (_O, "sparse_attn_window page=100000", lambda e: pruning.prune(e["tiny"], "sparse_attn_window", 0.25, page=100000),
     r"option page=100000 of pruning method 'sparse_attn_window' is not allowed: expected an integer 1 <= page <= 256"),
    (_O, "evaluate tasks=[] with a preset", lambda e: quality.evaluate(e["tiny"], _FakeTokenizer(256), [], preset="quick"),
     r"tasks=\[\] is not allowed: expected a non-empty list of task names"),
    (_O, "notebook model that does not exist", lambda e: checks.parameters(model="./no-such-model", lengths=[8]),
     r"model folder ../no-such-model. does not exist"),
    (_O, "a sweep into a read-only results folder", _sweep_into_unwritable,
     r"results store=.* is not allowed: expected a folder this process can write"),
    (_O, "prune calibration of one-token ids a list", lambda e: pruning.prune(e["tiny"], "shortgpt", 0.25,
                                                                            calibration=[[1, 2, 3]]),
     r"calibration=\[\[1, 2, 3\]\] is not allowed"),
]


def sweep_load(path):
    from prunelib import sweep

    return sweep.load_spec(path)


def _load_model(name):
    from prunelib.model import models

    return models._real_load_model(name)


@pytest.fixture
def env(tmp_path, tiny, monkeypatch):
    from transformers import AutoModelForCausalLM

    from prunelib.model import models
    from prunelib.model.models import save_pruned
    from prunelib.run import pipeline

    plain = tmp_path / "plain"
    AutoModelForCausalLM.from_config(tiny_config()).save_pretrained(plain)
    save_pruned(AutoModelForCausalLM.from_config(tiny_config()), tmp_path / "ckpt")
    blocker = tmp_path / "blocker"
    blocker.write_text("a plain file where the results folder would go\n")
    exit_plugin = tmp_path / "exits.py"
    exit_plugin.write_text("import sys\nsys.exit(3)\n")
    monkeypatch.setattr(models, "_real_load_model", models.load_model, raising=False)

    def no_load(*a, **k):
        pytest.fail(f"a model was loaded for a refused input: load_model{a}")

    for mod in (models, pipeline, quality):
        monkeypatch.setattr(mod, "load_model", no_load)
    return dict(tiny=tiny, tmp=tmp_path, plain=plain, checkpoint=tmp_path / "ckpt", blocker=blocker,
                exit_plugin=exit_plugin)


@pytest.mark.parametrize("klass,what,call,match", TABLE, ids=[f"{k}:{w}" for k, w, _, _ in TABLE])
def test_issue27_bad_input_refused_before_work(env, monkeypatch, capsys, klass, what, call, match):
    import re

    if "quality CLI" in what:  # the default store under a plain file
        monkeypatch.setenv("PRUNELIB_RESULTS", str(env["blocker"] / "results"))
    store = ResultsStore()
    before = (len(store), store.path.read_bytes() if store.path.exists() else None)
    try:
        call(env)
    except SystemExit as exit_:
        assert exit_.code == 2, f"exit code {exit_.code!r}"
        message = capsys.readouterr().err
    except ValueError as err:
        message = str(err)
    else:
        pytest.fail(f"{klass} input accepted: {what}")
    assert re.search(match, message), message
    after = ResultsStore(store.path)
    assert (len(after), after.path.read_bytes() if after.path.exists() else None) == before, "rows were written"


def test_fidelity_domains_are_checked():
    from prunelib.run import checks

    assert checks.fidelity_domains(True) == ("ptb", "wikitext2") and checks.fidelity_domains(False) == ()
    assert checks.fidelity_domains(["ptb"]) == ("ptb",)
    for bad in (["ptb", "ptb"], ["ptb-long"], ["c4"], "ptb"):
        with pytest.raises(checks.InputError, match=r"fidelity=.* is not allowed: expected True, False, or distinct"):
            checks.fidelity_domains(bad)


def test_issue27_table_counts():
    """The closing note's counts: the campaign's classes, and ours."""
    counts = {k: sum(1 for row in TABLE if row[0] == k) for k in (_S, _L, _C, _M, _O)}
    assert counts == {_S: 20, _L: 14, _C: 12, _M: 2, _O: 12}, counts


# --- the store: numpy scalars count, corrupt rows are named, not fatal ------------------------------------
def test_store_takes_numpy_scalars_and_has_sees_them():
    import numpy as np

    store = ResultsStore()
    base = dict(model="m", method="last_n", metric="speedup", phase="prefill", config_hash="k")
    store.append(dict(base, value=np.float32(1.25), n=np.int64(8), sparsity=np.float64(0.25)))
    assert store.has("k", "speedup") and ResultsStore(store.path).has("k", "speedup")
    row = ResultsStore(store.path).rows()[0]
    assert (row["value"], row["n"], row["sparsity"]) == (1.25, 8, 0.25) and type(row["n"]) is int
    store.path.unlink()  # the table's autouse check wants an empty store


def test_table_over_corrupt_rows_warns_naming_each_line(capsys):
    import json
    import warnings

    from prunelib.core.store import CorruptRowWarning, make_row

    store = ResultsStore()
    good = make_row(model="smollm2-135m", cell="static_depth", method="shortgpt", sparsity=0.25, phase="prefill",
                    batch=1, length=512, metric="speedup", value=1.3, ci_low=1.2, ci_high=1.4, bound=1.36,
                    config_hash="good", extra={"params": 1.0e8, "calibration": {"seed": 0}})
    bad = [dict(good, value="1.3", config_hash="a"), dict(good, sparsity="0.25", config_hash="b"),
           dict(good, extra=None, config_hash="c"), dict(good, phase=None, config_hash="d"),
           dict(good, value=[1.3], config_hash="e")]
    store.path.parent.mkdir(parents=True, exist_ok=True)
    store.path.write_text("".join(json.dumps(r) + "\n" for r in [good, *bad]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        experiment.main(["--table"])
    said = " | ".join(str(w.message) for w in caught if issubclass(w.category, CorruptRowWarning))
    for line, what in [(2, "value='1.3' is not a number"), (3, "sparsity='0.25' is not a number"),
                       (4, "extra=None is not a mapping"), (5, "a speedup row without its phase"),
                       (6, r"value=[1.3] is not a number")]:
        assert f"results.jsonl:{line}: corrupt result row ({what})" in said, said
    assert "shortgpt" in capsys.readouterr().out  # the good row is still in the table
    store.path.unlink()


# --- a sweep that raises part-way lets go of the store ------------------------------------------------------
def test_sweep_that_raises_releases_the_driver_claim(tmp_path, monkeypatch):
    import subprocess
    import sys

    import yaml
    from transformers import AutoModelForCausalLM

    from prunelib import sweep

    AutoModelForCausalLM.from_config(tiny_config()).save_pretrained(tmp_path / "plain")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(dict(models=[str(tmp_path / "plain")], methods=["last_n"], sparsities=[0.25],
                                        lengths=[16], reps=2, quality="none", fidelity=False, threads=1)))

    class Broken:
        def __init__(self, *a):
            raise RuntimeError("the executor failed to start")

    monkeypatch.setattr(sweep, "InProcess", Broken)
    store = ResultsStore(tmp_path / "s" / "results.jsonl")
    with pytest.raises(RuntimeError, match="the executor failed to start"):
        sweep.run(sweep.load_spec(path), store=store, progress=False)
    claim = (f"from prunelib.core.store import ResultsStore\nResultsStore({str(store.path)!r}).claim_driver()\n"
             "print('claimed')")
    out = subprocess.run([sys.executable, "-c", claim], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "claimed" in out.stdout, out.stderr  # another driver may take the store


def test_load_model_takes_a_path(tmp_path):
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from prunelib.model.models import load_model

    AutoModelForCausalLM.from_config(tiny_config()).save_pretrained(tmp_path / "plain")
    model, tok = load_model(Path(tmp_path / "plain"))
    assert model.config.num_hidden_layers == 4 and tok is None


def test_an_unknown_papermill_parameter_is_refused():
    params = "model = 'smollm2-135m'\nsparsities = [0.1, 0.25]\nreps = 20\n"
    with pytest.raises(ValueError, match=r"sparsitys='\[0.3\]' is not allowed: expected a parameter of this notebook: "
                                         r"\['model', 'reps', 'sparsities'\]"):
        checks.unknown_injected(["", "import prunelib", params, "# Parameters\nsparsitys = [0.3]\n", "checks..."])
    checks.unknown_injected(["", params, "# Parameters\nsparsities = [0.3]\nreps = 5\n"])  # known names pass
    checks.unknown_injected(["", params, "checks.parameters(...)"])  # nothing injected: nothing to check


@pytest.mark.slow  # two kernel starts: ~30 s on 2 cores
def test_papermill_run_with_a_misspelt_parameter_fails(tmp_path):
    """The same through papermill itself: a misspelt -p fails the run (papermill alone warned and ran the default)."""
    nbformat = pytest.importorskip("nbformat")
    papermill = pytest.importorskip("papermill")
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}, "language_info": {"name": "python"}})
    params = nbformat.v4.new_code_cell("model = 'smollm2-135m'\nsparsities = [0.1]\nreps = 20")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("from prunelib.run import checks\nchecks.parameters(reps=reps)")]
    nbformat.write(nb, tmp_path / "in.ipynb")
    with pytest.raises(papermill.PapermillExecutionError, match=r"sparsitys=.* is not allowed: expected a parameter"):
        papermill.execute_notebook(str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"sparsitys": [0.3]}, progress_bar=False)
    papermill.execute_notebook(str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"), parameters={"reps": 5},
                               progress_bar=False)  # a known name runs
