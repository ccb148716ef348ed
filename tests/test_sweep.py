"""Sweeps from a spec: validation, the three executors, failures, killed workers, resume."""
import contextlib
import os
import textwrap

import pandas as pd
import pytest
import torch

from prunelib import sweep
from prunelib.run import executors
from prunelib.core.store import ResultsStore

#: a plugin (imported by the driver and by every worker) with a tiny quality preset and two test methods:
#: one that raises, one that kills its worker during the decode timing, once (a marker file beside it)
PLUGIN = '''
import os, signal
from pathlib import Path
from prunelib import quality
from prunelib.pruning.registry import register
from prunelib.pruning.surgery import remove_layers

quality.PRESETS.setdefault("sweep_test", quality.Preset(("piqa",), 4, "sweep tests: 4 PIQA documents"))
MARK = Path(__file__).with_name("killed.marker")


@register("test_raise", "static_depth", "raises (sweep tests)", baseline="depth_random", unit="decoder layers",
          needs_calibration=False, max_sparsity=lambda m: 0.9)
def _raise(model, sparsity, ctx):
    raise RuntimeError("this method does not support this model (sweep test)")


@register("test_kill_once", "static_depth", "kills its worker once, in the decode timing (sweep tests)",
          baseline="depth_random", unit="decoder layers", needs_calibration=False, max_sparsity=lambda m: 0.9)
def _kill_once(model, sparsity, ctx):
    pruned = remove_layers(model, [0])

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1 and not MARK.exists():
            MARK.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    pruned.register_forward_pre_hook(hook, with_kwargs=True)
    return pruned, {"layers": [0]}
'''
TEST_METHODS = ("test_raise", "test_kill_once")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 4-layer random Llama saved with the embedded model's tokenizer: quality can be scored, in seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import tiny_config
    from prunelib.model.models import embedded_path

    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(embedded_path())
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(vocab_size=len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ray_tmp():
    """Ray's temp folder for this module (RAY_TMPDIR), holding a *stale* ``ray_current_cluster`` file: the address of
    a cluster that is gone, as an earlier ``ray start`` + ``ray stop`` leaves it. Short, for Ray's socket paths."""
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    (folder / "ray").mkdir()
    with socket_free_port() as port:
        (folder / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_TMPDIR", str(folder))
    yield folder
    mp.undo()


@contextlib.contextmanager
def socket_free_port():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


@pytest.fixture(scope="module")
def local_ray(ray_tmp):
    """A private local Ray instance with 2 CPUs and one timing slot, shared by this module's Ray tests; started
    while a stale cluster file is present, which it must not try to join."""
    import ray

    try:
        sweep.connect(None, workers=2)
    except executors.RayStartError as err:
        pytest.skip(f"Ray could not start its node on this loaded machine: {err}")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "sweep_methods.py"
    path.write_text(PLUGIN)
    yield path
    from prunelib.pruning.registry import REGISTRY

    for name in TEST_METHODS:  # other tests iterate over every registered method
        REGISTRY.pop(name, None)


def write_spec(tmp_path, tiny_dir, plugin, **over):
    spec = dict(models=[str(tiny_dir)], methods=["shortgpt", "width_magnitude"], sparsities=[0.25, 0.5],
                phases=["prefill", "decode"], lengths=[16], reps=2, quality="sweep_test", fidelity=False,
                calibration={"n": 4, "length": 32}, timing_mode="eager", threads=1, retries=1, plugins=[str(plugin)])
    spec.update(over)
    import yaml

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def store_of(tmp_path, name):
    return ResultsStore(tmp_path / name / "results.jsonl")


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    """Rows without what legitimately differs between executors (timing values, timestamps, job seconds)."""
    timed = df.metric == "speedup"
    out = pd.DataFrame({"method": df.method, "sparsity": df.sparsity, "phase": df.phase.fillna(""),
                        "batch": df.batch.fillna(0), "length": df.length.fillna(0), "metric": df.metric,
                        "value": df.value.where(~timed & (df.phase != "job")).round(9).fillna(-1)})
    return out.sort_values(list(out.columns)).reset_index(drop=True)


# --- the spec ----------------------------------------------------------------------------------
def test_bad_spec_lists_every_error_with_its_line(tmp_path, tiny_dir):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(f"""\
        models: [{tiny_dir}, /no/such/model]
        methods:
          - shortgpt
          - bogus_method
        sparsities: [0.25, 1.5, 0.99]
        lenghts: [16]
        lengths: [16]
        reps: 1
        quality: quickest
        phases: [prefill, warmup]
        calibration: {{n: 0}}
        """))
    with pytest.raises(sweep.SpecError) as e:
        sweep.load_spec(path)
    errors = e.value.errors
    expected = [(1, "/no/such/model"), (4, "bogus_method"), (5, "sparsities[1]: 1.5"),
                (5, "sparsities[2]: 0.99 is out of range for method 'shortgpt'"), (6, "unknown key 'lenghts'"),
                (8, "reps: 1"), (9, "'quickest' is not a preset"), (10, "'warmup'"), (11, "calibration.n: 0")]
    assert len(errors) == len(expected), errors
    for (line, what), err in zip(expected, errors):
        assert err.startswith(f"{path}:{line}: ") and what in err, (line, what, err)
    assert "nothing was run" in str(e.value) and not (tmp_path / "results").exists()


def test_toml_spec_and_its_errors(tmp_path, tiny_dir):
    path = tmp_path / "s.toml"
    path.write_text(f'models = ["{tiny_dir}", "random:llama-3.1-8b"]\nmethods = ["last_n", "shortgpt"]\n'
                    'sparsities = [0.25]\nquality = "none"\nphases = "none"\n')
    with pytest.raises(sweep.SpecError) as e:  # a random-weight model has no tokenizer for calibration
        sweep.load_spec(path)
    assert e.value.errors == [f"{path}:2: methods[1]: 'shortgpt' needs calibration text, but model "
                              "'random:llama-3.1-8b' has no tokenizer"]
    path.write_text(path.read_text().replace(', "shortgpt"', ""))
    s = sweep.load_spec(path)
    assert s.phases == () and s.quality is None and s.methods == ("last_n",)
    assert [(j.model, j.method) for j in sweep.jobs(s)] == [(str(tiny_dir), "dense"), ("random:llama-3.1-8b", "dense"),
                                                            (str(tiny_dir), "last_n"), ("random:llama-3.1-8b", "last_n")]


def test_unreachable_ray_address_is_named(ray_tmp):
    with socket_free_port() as port:
        with pytest.raises(ConnectionError, match=f"cannot reach the Ray cluster at --address '127.0.0.1:{port}'"):
            sweep.connect(f"127.0.0.1:{port}")
    # 'auto' follows the stale cluster file to a port where nothing answers: named, within seconds
    with pytest.raises(ConnectionError, match=r"--address 'auto' \(recorded as [\d.]+:\d+\)"):
        sweep.connect("auto")


@pytest.mark.slow
def test_a_stale_cluster_file_starts_a_private_instance(local_ray, ray_tmp):
    """Without --address the sweep starts its own Ray whatever the machine saw before (it joined the stale
    cluster and failed with 'num_cpus and num_gpus must not be provided')."""
    assert local_ray.is_initialized()
    assert local_ray.cluster_resources().get("timing_slot") == 1 and local_ray.cluster_resources()["CPU"] == 2


@pytest.mark.slow
def test_address_auto_joins_a_running_cluster(tmp_path, tiny_dir, plugin, inprocess_rows):
    """A real `ray start --head` cluster: --address auto joins it (no num_cpus passed) and the rows equal the
    in-process executor's."""
    import subprocess
    import tempfile

    import ray

    if ray.is_initialized():
        ray.shutdown()
    folder = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=folder)
    start = subprocess.run(["ray", "start", "--head", "--num-cpus", "2", "--resources", '{"timing_slot": 1}',
                            "--include-dashboard=false", "--disable-usage-stats"], env=env, capture_output=True,
                           text=True, timeout=300)
    if start.returncode != 0:
        pytest.skip(f"ray start --head failed on this machine: {start.stderr[-500:]}")
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_TMPDIR", folder)
    try:
        spec = sweep.load_spec(write_spec(tmp_path, tiny_dir, plugin), executor="ray")
        df = sweep.run(spec, "ray", workers=2, address="auto", store=store_of(tmp_path, "auto"), progress=False)
        pd.testing.assert_frame_equal(comparable(df), inprocess_rows, obj="ray --address auto")
    finally:
        mp.undo()
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


# --- running -----------------------------------------------------------------------------------
def test_failing_job_becomes_a_failure_row_and_a_rerun_skips_what_is_stored(tmp_path, tiny_dir, plugin, capsys):
    path = write_spec(tmp_path, tiny_dir, plugin, methods=["last_n", "test_raise"], sparsities=[0.25],
                      phases="none", quality="none")
    store = store_of(tmp_path, "s")
    df = sweep.run(sweep.load_spec(path), store=store, progress=False)
    f = sweep.failures(df)
    assert f.method.tolist() == ["test_raise"]
    assert "RuntimeError: this method does not support this model" in f.error.iloc[0]
    row = df[df.metric == sweep.FAILURE].iloc[0]
    assert row.value == 1.0 and "Traceback" in (tmp_path / "s" / "sweeps" / "logs" / f"{row.extra['job']}.log").read_text()
    assert sorted(df[df.metric == sweep.DONE].method) == ["dense", "last_n"]
    n = len(store)
    sweep.run(sweep.load_spec(path), store=store, progress=False)  # done jobs skipped, the failed one retried
    again = store.load()
    assert len(again) == n and (again.metric == sweep.FAILURE).sum() == 1  # the same failure is not stored twice
    from prunelib.experiment import print_table

    print_table(again, 1, 16)
    assert "failed jobs (1" in capsys.readouterr().out


def test_a_stopped_driver_merges_finished_shards_and_drops_partial_ones(tmp_path, tiny_dir, plugin):
    path = write_spec(tmp_path, tiny_dir, plugin, methods=["last_n"], sparsities=[0.25], phases="none",
                      quality="none")
    spec, store = sweep.load_spec(path), store_of(tmp_path, "s")
    folder = store.path.parent
    job = sweep.jobs(spec)[1]
    result = sweep.run_job(job, [], folder)  # finished, never merged (the driver stopped)
    (folder / f"{executors.SHARD}{job.id}.999.partial.jsonl").write_text('{"model": "x", "metric": "half')
    assert len(store) == 0
    sweep.run(spec, store=store, progress=False)
    df = store.load()
    assert sorted(p.name for p in folder.glob("*.jsonl")) == ["results.jsonl"]
    assert (df.metric == sweep.DONE).sum() == 2 and len(df) == len(result["rows"]) + 1  # + the dense job's


@pytest.fixture(scope="module")
def inprocess_rows(tmp_path_factory, tiny_dir, plugin):
    """The tiny spec (2 methods x 2 sparsities) run in this process: what the other executors must match."""
    tmp = tmp_path_factory.mktemp("inprocess")
    df = sweep.run(sweep.load_spec(write_spec(tmp, tiny_dir, plugin)), store=store_of(tmp, "s"), progress=False)
    assert len(sweep.failures(df)) == 0
    return comparable(df)


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_executors_give_the_same_rows(tmp_path, tiny_dir, plugin, inprocess_rows, executor, request):
    if executor == "ray":
        request.getfixturevalue("local_ray")
    base = inprocess_rows
    # 5 jobs; dense: 2 PIQA metrics, 2 dense-vs-dense timings; each pruned: 2 timings, 2 PIQA metrics, 1 loss
    assert (base.metric == sweep.DONE).sum() == 5 and (base.metric == "speedup").sum() == 2 + 4 * 2
    assert (base.metric == "quality_loss_pct").sum() == 4 and (base.metric == "piqa/acc").sum() == 5
    spec = sweep.load_spec(write_spec(tmp_path, tiny_dir, plugin), executor=executor)
    df = sweep.run(spec, executor, workers=2, store=store_of(tmp_path, executor), progress=False)
    pd.testing.assert_frame_equal(comparable(df), base, obj=executor)
    from prunelib.measure import samples  # each score's per-document outcomes sit beside the store (paired statistics)

    folder = samples.folder(store_of(tmp_path, executor).path)
    assert all(samples.read(folder, h) for h in df[df.metric == "piqa/acc"].config_hash)


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_killed_worker_is_retried_without_duplicate_rows(tmp_path, tiny_dir, plugin, executor, request):
    if executor == "ray":
        request.getfixturevalue("local_ray")
    path = write_spec(tmp_path, tiny_dir, plugin, methods=["test_kill_once", "test_raise"], sparsities=[0.25],
                      quality="none")
    (plugin.parent / "killed.marker").unlink(missing_ok=True)
    df = sweep.run(sweep.load_spec(path, executor=executor), executor, workers=2, store=store_of(tmp_path, "s"),
                   progress=False)
    assert (plugin.parent / "killed.marker").exists()  # the first attempt was killed in its decode timing
    killed = df[df.method == "test_kill_once"]
    assert sorted(killed.metric) == ["speedup", "speedup", sweep.DONE]  # prefill once (the partial shard dropped)
    assert not df.duplicated(["config_hash", "metric"]).any()
    assert sweep.failures(df).method.tolist() == ["test_raise"]
    assert sorted(p.name for p in store_of(tmp_path, "s").path.parent.glob("*.jsonl")) == ["results.jsonl"]


def test_shipped_specs_are_valid():
    from pathlib import Path

    specs = sorted((Path(__file__).parent.parent / "sweeps").glob("*.yaml"))
    assert specs
    for path in specs:
        assert sweep.jobs(sweep.load_spec(path))


def test_ladder_spec_expands_each_methods_rungs_and_random_baselines_get_five_seeds(tmp_path, tiny_dir, plugin):
    path = write_spec(tmp_path, tiny_dir, plugin, methods=["last_n", "depth_random"], sparsities="ladder")
    spec = sweep.load_spec(path)
    js = [j for j in sweep.jobs(spec) if j.method != "dense"]
    crit = sorted((j.sparsity, j.seed) for j in js if j.method == "last_n")
    rand = sorted((j.sparsity, j.seed) for j in js if j.method == "depth_random")
    assert crit == [(0.25, 0), (0.5, 0), (0.75, 0)]  # 1, 2, 3 of the tiny model's 4 layers
    assert rand == [(s, seed) for s in (0.25, 0.5, 0.75) for seed in range(5)]  # one draw decides nothing
    assert len({j.key for j in js}) == len(js)
    path = write_spec(tmp_path, tiny_dir, plugin, methods=["depth_random"], sparsities=[0.25], baseline_seeds=2,
                      seeds=[7])
    assert sorted(j.seed for j in sweep.jobs(sweep.load_spec(path)) if j.method != "dense") == [0, 1, 7]
