"""One sweep spec, three ways to run it: in-process, on a local process pool, or on a Ray cluster.

A spec (YAML or TOML, see ``sweeps/example.yaml`` and docs/SWEEPS.md) holds models x methods x
sparsities x seeds x phases x batches x lengths x devices x timing mode x quality preset. It is
checked whole before any job starts; every error is listed at once with its line.

A **job** is one (model, method, sparsity, seed, device) unit: :func:`prunelib.experiment.run` of
that one method and sparsity (prune, time every shape against the dense model, score). One dense
job per (model, device) runs first: the dense model's quality and its dense-vs-dense timing (the
noise floor) are measured there once, and every pruned job reads the dense scores from the store.

**One writer.** A job writes to its own shard (``sweep-shard.<job>.<pid>.partial.jsonl`` beside the
store, so that quality's per-document sidecars land in the store's ``samples/``), which it renames
to ``sweep-shard.<job>.jsonl`` when it ends, and returns its rows (and sidecars, for other nodes). The driver alone appends to
the main store: only rows whose ``(config_hash, metric)`` are not stored yet, the job's status row
last, then moves the shard to ``sweeps/merged/``. A killed worker leaves only a ``.partial`` shard, which
is discarded; the job is retried (Ray ``max_retries``, pool resubmission). A job that raises ends
with a ``metric="failure"`` row (value 1, ``extra.error``) instead of its ``"sweep_job"`` row;
re-running the spec skips every job with a ``"sweep_job"`` row and retries failed ones.

**Resources.** On CUDA a job holds a whole GPU (``num_gpus=1``). On CPU a job that times holds
the node's one ``timing_slot``, so timings on one node never overlap; quality-only jobs
(``phases: none``) run in parallel. The local pool applies the same rule on this machine.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import socket
import sys
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from .store import ResultsStore, config_hash, make_row

DONE, FAILURE = "sweep_job", "failure"
EXECUTORS = ("inprocess", "local", "ray")
DEFAULTS = dict(seeds=[0], phases=["prefill", "decode"], batches=[1], lengths=[512], devices=["cpu"],
                dtype="float32", timing_mode="auto", reps=20, quality="quick", fidelity=True,
                calibration={"n": 32, "length": 256}, options={}, threads=None, retries=2, plugins=[])
KEYS = ("models", "methods", "sparsities", *DEFAULTS)
REQUIRED = ("models", "methods", "sparsities")
LOG_TAIL = 200_000  # characters of a job's log sent back to the driver
SHARD = "sweep-shard."  # a job's shard, beside the store: sweep-shard.<job>[.<pid>.partial].jsonl


class SpecError(ValueError):
    """A sweep spec with errors; ``errors`` lists them, each ``file:line: what``."""

    def __init__(self, source, errors):
        self.errors = errors
        super().__init__(f"sweep spec {source} has {len(errors)} error(s); nothing was run:\n  " + "\n  ".join(errors))


@dataclass(frozen=True)
class Spec:
    models: tuple
    methods: tuple
    sparsities: tuple
    seeds: tuple
    phases: tuple
    batches: tuple
    lengths: tuple
    devices: tuple
    dtype: str
    timing_mode: str | None  # None: the device's default (prunelib.timing.choose_mode)
    reps: int
    quality: str | None  # a preset of prunelib.quality.PRESETS (plugins may add one), or None
    fidelity: bool
    calibration: dict
    options: dict
    threads: int
    retries: int
    plugins: tuple


@dataclass(frozen=True)
class Job:
    model: str
    method: str
    sparsity: float
    seed: int
    device: str
    spec: Spec = field(repr=False)

    @property
    def key(self) -> str:
        s = {k: v for k, v in asdict(self.spec).items() if k not in ("models", "methods", "sparsities", "seeds",
                                                                      "devices", "retries", "plugins")}
        return config_hash({"kind": "sweep_job", "model": self.model, "method": self.method,
                            "sparsity": self.sparsity, "seed": self.seed, "device": self.device, **s})

    @property
    def id(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model.rstrip("/").split("/")[-1])
        return f"{slug}__{self.method}__{self.sparsity:g}__seed{self.seed}__{self.device}__{self.key[:8]}"

    @property
    def exclusive(self) -> bool:
        """Needs the node's timing slot (CPU timing) or a whole GPU."""
        return self.device == "cuda" or bool(self.spec.phases)


# --- the spec ------------------------------------------------------------------------------------
def load_spec(path, *, executor: str = "inprocess") -> Spec:
    """Read and check a YAML or TOML spec; a :class:`SpecError` lists every problem with its line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep spec {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        data, lines = _read_yaml(text, path)
    elif path.suffix == ".toml":
        data, lines = _read_toml(text, path)
    else:
        raise ValueError(f"sweep spec {str(path)!r}: unknown format {path.suffix!r}; allowed: .yaml, .yml, .toml")
    return _Checker(data, lines, path, executor).spec()


def _read_yaml(text, path):
    import yaml

    try:
        node, data = yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise SpecError(path, [f"{path}:{mark.line + 1 if mark else '?'}: not valid YAML ({err})"]) from err
    lines = {(): 1}

    def walk(n, at):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                lines[at + (str(k.value),)] = k.start_mark.line + 1
                walk(v, at + (str(k.value),))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[at + (i,)] = v.start_mark.line + 1
                walk(v, at + (i,))

    if node is not None:
        walk(node, ())
    return data, lines


def _read_toml(text, path):
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(path, [f"{path}: not valid TOML ({err})"]) from err
    lines, table = {(): 1}, ()
    for i, line in enumerate(text.splitlines(), 1):  # TOML keeps no positions: a list item is reported at its key
        if m := re.match(r"\s*\[([\w.-]+)\]", line):
            table = tuple(m.group(1).split("."))
            lines.setdefault(table, i)
        elif m := re.match(r"\s*([\w-]+)\s*=", line):
            lines.setdefault(table + (m.group(1),), i)
    return data, lines


class _Checker:
    """Checks a parsed spec, collecting every error with its line before giving up."""

    def __init__(self, data, lines, source, executor):
        self.data, self.lines, self.source, self.executor = data, lines, source, executor
        self.errors: list[tuple[int, str]] = []

    def err(self, at, msg):
        at = tuple(at)
        if at and isinstance(self.data, dict) and at[0] not in self.data:
            msg += f" ({at[0]!r} not given: its default {DEFAULTS.get(at[0])!r})"
        while at not in self.lines:
            at = at[:-1]
        self.errors.append((self.lines[at], msg))

    def items(self, key, kind, check, what):
        """The valid items under ``key`` as (index, item) (a scalar counts as a list of one)."""
        v = self.data.get(key, DEFAULTS.get(key))
        if v is None or v == "none":
            v = []
        v = v if isinstance(v, list) else [v]
        out = []
        for i, x in enumerate(v):
            if not isinstance(x, kind) or isinstance(x, bool) or not check(x):
                self.err((key, i), f"{key}[{i}]: {x!r} is not {what}")
            else:
                out.append((i, x))
        return out

    def spec(self) -> Spec:
        from . import timing
        from .pruning import REGISTRY

        d = self.data
        if not isinstance(d, dict):
            raise SpecError(self.source, [f"{self.source}:1: a spec is a mapping of keys; allowed: {list(KEYS)}"])
        for k in d:
            if k not in KEYS:
                self.err((k,), f"unknown key {k!r}; allowed: {list(KEYS)}")
        for k in REQUIRED:
            if not d.get(k):
                self.err((), f"{k!r} is required (a non-empty list)")
        plugins = self.plugins()
        models = [x for _, x in self.items("models", str, lambda x: True, "a model name")]
        methods = self.items("methods", str, lambda x: x in REGISTRY,
                             f"a registered method; registered: {sorted(REGISTRY)}")
        sparsities = self.items("sparsities", (int, float), lambda x: 0 <= x < 1, "a sparsity in [0, 1)")
        seeds = [x for _, x in self.items("seeds", int, lambda x: x >= 0, "a seed (an integer >= 0)")]
        phases = self.items("phases", str, lambda x: x in ("prefill", "decode"),
                            "a phase: prefill or decode ('none' for quality only)")
        batches = [x for _, x in self.items("batches", int, lambda x: x >= 1, "a batch size (an integer >= 1)")]
        lengths = self.items("lengths", int, lambda x: x >= 1, "a length (an integer >= 1)")
        devices = [x for _, x in self.items("devices", str, self.device_ok, "a device here: cpu or cuda")]
        dtype = self.choice("dtype", ("float32", "bfloat16", "float16"))
        timing_mode = self.choice("timing_mode", ("auto", *timing.MODES))
        fidelity = self.choice("fidelity", (True, False))
        reps = self.number("reps", 2, "an integer >= 2 (a CI needs samples)")
        retries = self.number("retries", 0, "an integer >= 0")
        threads = self.number("threads", 1, "an integer >= 1 (torch threads per job), or null for this machine's")
        calibration = self.calibration()
        options = d.get("options", {}) or {}
        if not isinstance(options, dict):
            self.err(("options",), f"options: {options!r} is not a mapping of method options")
            options = {}
        quality = self.quality()
        phases = [x for _, x in phases]
        for i, name in enumerate(models):
            self.model(i, name, methods, sparsities, lengths, quality, phases)
        methods, sparsities, lengths = ([x for _, x in v] for v in (methods, sparsities, lengths))
        if self.errors:
            raise SpecError(self.source, [f"{self.source}:{line}: {msg}" for line, msg in sorted(self.errors)])
        import torch

        return Spec(tuple(models), tuple(methods), tuple(float(s) for s in sparsities), tuple(seeds), tuple(phases),
                    tuple(batches), tuple(lengths), tuple(devices), dtype,
                    None if timing_mode == "auto" else timing_mode, reps, quality, fidelity, calibration, options, threads or torch.get_num_threads(), retries,
                    tuple(plugins))

    def device_ok(self, x):
        if x not in ("cpu", "cuda"):
            return False
        import torch

        return x == "cpu" or self.executor == "ray" or torch.cuda.is_available()  # a cluster may have GPUs we lack

    def choice(self, key, allowed):
        v = self.data.get(key, DEFAULTS[key])
        if v not in allowed:
            self.err((key,), f"{key}: {v!r} is not allowed; allowed: {list(allowed)}")
        return v

    def number(self, key, low, what):
        v = self.data.get(key, DEFAULTS[key])
        if v is None and key == "threads":
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            self.err((key,), f"{key}: {v!r} is not {what}")
        return v

    def calibration(self):
        c = self.data.get("calibration", DEFAULTS["calibration"])
        if not isinstance(c, dict):
            self.err(("calibration",), f"calibration: {c!r} is not a mapping with n and length")
            return dict(DEFAULTS["calibration"])
        for k in c:
            if k not in ("n", "length"):
                self.err(("calibration", k), f"calibration: unknown key {k!r}; allowed: ['n', 'length']")
        out = dict(DEFAULTS["calibration"], **{k: v for k, v in c.items() if k in ("n", "length")})
        for k, v in out.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                self.err(("calibration", k), f"calibration.{k}: {v!r} is not an integer >= 1")
        return out

    def quality(self):
        from .quality import PRESETS

        q = self.data.get("quality", DEFAULTS["quality"])
        if q in (None, False, "none"):
            return None
        if q not in PRESETS:
            self.err(("quality",), f"quality: {q!r} is not a preset; allowed: {sorted(PRESETS)} or none")
        return q

    def plugins(self):
        out = []
        for i, p in self.items("plugins", str, lambda x: True, "a path"):
            path = (Path(self.source).parent / p).resolve()
            try:
                import_plugins([str(path)])
                out.append(str(path))
            except Exception as e:  # noqa: BLE001 (any import error is a spec error)
                self.err(("plugins", i), f"plugins[{i}]: cannot import {str(path)!r}: {type(e).__name__}: {e}")
        return out

    def model(self, i, name, methods, sparsities, lengths, quality, phases):
        from .pruning import get

        try:
            config, tokenizer = model_config(name)
        except Exception as e:  # noqa: BLE001 (reported with its line)
            self.err(("models", i), f"models[{i}]: {e}")
            return
        if tokenizer is False and quality is not None:
            self.err(("quality",), f"quality: model {name!r} has random weights and no tokenizer; use quality: none")
        max_pos = getattr(config, "max_position_embeddings", None)
        for j, s in lengths:
            if phases and max_pos and s + 1 > max_pos:
                self.err(("lengths", j), f"lengths[{j}]: {s} (+1 decode step) exceeds model {name!r}'s "
                                         f"max_position_embeddings {max_pos}")
        meta = _meta_model(config)
        for k, m in methods:
            method = get(m)
            if tokenizer is False and method.needs_calibration:
                self.err(("methods", k), f"methods[{k}]: {m!r} needs calibration text, but model {name!r} has no "
                                         "tokenizer")
            try:
                hi = method.max_sparsity(meta)
            except Exception:  # noqa: BLE001 (the method checks its own range when it runs)
                continue
            for j, s in sparsities:
                if s > hi:
                    self.err(("sparsities", j), f"sparsities[{j}]: {s} is out of range for method {m!r} on model "
                                                f"{name!r} ({method.cell.unit}): allowed 0 <= s <= {hi:.4g}")


def model_config(name: str):
    """``(config, has_tokenizer)`` of a model name as :func:`prunelib.models.load_model` reads it, without weights."""
    from transformers import AutoConfig

    from .adapter import ModelAdapter
    from .models import EMBEDDED, EMBEDDED_ALIASES, embedded_path, random_config, random_configs

    if name.startswith("random:"):
        config, tokenizer = random_config(name.split(":", 1)[1]), False
    else:
        path = str(embedded_path()) if name in EMBEDDED_ALIASES else name
        if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
            raise ValueError(f"model folder {name!r} does not exist")
        try:
            config, tokenizer = AutoConfig.from_pretrained(path), True
        except (OSError, ValueError) as err:
            known = [EMBEDDED] + ["random:" + c for c in random_configs()]
            raise ValueError(f"unknown model {name!r}: not a local folder with a config.json nor reachable on the "
                             f"Hub (known here: {known})") from err
    ModelAdapter.check_type(config)
    return config, tokenizer


def _meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def import_plugins(paths) -> None:
    """Import method modules named by file path (they register extra methods), once per process."""
    for p in paths:
        name = "prunelib_plugin_" + re.sub(r"\W", "_", str(Path(p).resolve().with_suffix("")))
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, p)
        if spec is None:
            raise ImportError(f"{p!r} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise


def jobs(spec: Spec) -> list[Job]:
    """One dense job per (model, device), then one job per (model, method, sparsity, seed, device)."""
    out = [Job(m, "dense", 0.0, spec.seeds[0], d, spec) for m in spec.models for d in spec.devices]
    return out + [Job(m, method, s, seed, d, spec) for m in spec.models for method in spec.methods
                  for s in spec.sparsities for seed in spec.seeds for d in spec.devices]


# --- one job (runs in a worker) ---------------------------------------------------------------
class _ShardStore(ResultsStore):
    """Writes go to the job's own shard; reads also see the main store's rows sent with the job."""

    def __init__(self, path, base_rows):
        super().__init__(path)
        self._base = base_rows

    def rows(self, strict: bool = False) -> list[dict]:
        return list(self._base) + super().rows(strict)


def _measure(job: Job, store) -> None:
    """One unit through :func:`prunelib.experiment.run` (prune, time every shape, score) into ``store``.

    The dense job scores the dense model (quality cached in the store for every later job) and
    times it against itself: the noise floor of the sweep's speedups.
    """
    from . import experiment, quality
    from .models import load_model

    s = job.spec
    kw = dict(phases=s.phases, batches=s.batches, lengths=s.lengths, reps=s.reps, preset=s.quality,
              calib_n=s.calibration["n"], calib_len=s.calibration["length"], seed=job.seed, device=job.device,
              dtype=s.dtype, store=store, timing_mode=s.timing_mode, fidelity=s.fidelity)
    if job.method != "dense":
        experiment.run(job.model, (job.method,), (job.sparsity,), **kw, **s.options)
        return
    model, tok = load_model(job.model, device=job.device, dtype=s.dtype)
    if s.quality:
        quality.evaluate(model, tok, preset=s.quality, store=store, model_name=job.model)
    if s.phases:
        experiment.speed_rows(store, job.model, model, model, "dense", 0.0, phases=s.phases, batches=s.batches,
                              lengths=s.lengths, reps=s.reps, timing_mode=s.timing_mode,
                              text=experiment.timing_text(tok, s.batches, s.lengths, seed=job.seed + 1))


def status_row(job: Job, error: str | None, seconds: float, **extra) -> dict:
    """The row that closes a job: ``sweep_job`` when it ended, ``failure`` (value 1, with the reason) when not."""
    from .pruning import get

    cell = "dense" if job.method == "dense" else get(job.method).cell.name
    return make_row(model=job.model, cell=cell, method=job.method, sparsity=job.sparsity, phase="job",
                    device=job.device, dtype=job.spec.dtype, metric=FAILURE if error else DONE, value=1.0,
                    config_hash=job.key, extra=dict(extra, job=job.id, seed=job.seed, seconds=seconds, error=error))


@contextlib.contextmanager
def _output_to(path: Path):
    """Send this process's output to ``path``: ``sys.stdout``/``sys.stderr`` and file descriptors 1 and 2
    (C code, loggers bound to the process's streams)."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a", buffering=1, errors="replace") as f, contextlib.redirect_stdout(f), \
            contextlib.redirect_stderr(f):
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            f.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def run_job(job: Job, base_rows, shard_dir) -> dict:
    """Run one job into its own shard in ``shard_dir`` (the store's folder) and return its rows, the
    per-document sidecars of its scores, its status and its log (never raises for a job's error)."""
    import torch

    from . import samples

    shards = Path(shard_dir)
    shards.mkdir(parents=True, exist_ok=True)
    partial, log = (shards / f"{SHARD}{job.id}.{os.getpid()}.{x}" for x in ("partial.jsonl", "log"))
    partial.unlink(missing_ok=True)
    store, error, t0 = _ShardStore(partial, base_rows), None, time.perf_counter()
    with _output_to(log):
        print(f"job {job.id} on {socket.gethostname()} pid {os.getpid()}: {job}", flush=True)
        try:
            import_plugins(job.spec.plugins)
            torch.set_num_threads(job.spec.threads)
            _measure(job, store)
        except Exception as err:  # noqa: BLE001 (a job's error becomes its failure row)
            error = f"{type(err).__name__}: {err}"
            traceback.print_exc()
    ResultsStore(partial).append(status_row(job, error, time.perf_counter() - t0, host=socket.gethostname()))
    shard = shards / f"{SHARD}{job.id}.jsonl"
    os.replace(partial, shard)  # a finished shard; an unfinished one stays .partial and is discarded
    text = log.read_text(errors="replace")
    log.unlink()
    rows = ResultsStore(shard).rows(strict=True)
    sidecars = {h: samples.read(samples.folder(shard), h) for h in {r["config_hash"] for r in rows}}
    return {"id": job.id, "rows": rows, "samples": {h: v for h, v in sidecars.items() if v is not None},
            "error": error, "shard": str(shard), "log": text[-LOG_TAIL:]}


def lost(job: Job, reason: str) -> dict:
    """The result of a job whose worker died more often than it may be retried."""
    return {"id": job.id, "rows": [status_row(job, reason, float("nan"))], "samples": {}, "error": reason,
            "shard": None, "log": reason + "\n"}


# --- executors ---------------------------------------------------------------------------------
class InProcess:
    running = 0

    def __init__(self, workers=1, retries=0, address=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run(self, todo, base, shard_dir):
        for job in todo:
            self.running = 1
            yield run_job(job, base, shard_dir)
        self.running = 0


class LocalPool(InProcess):
    """A process pool (spawned workers); one exclusive (timing or GPU) job in flight at a time."""

    def __init__(self, workers=1, retries=2, address=None):
        self.workers, self.retries, self.pool = workers, retries, None

    def __enter__(self):
        self._new_pool()
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(cancel_futures=True)
        return False

    def _new_pool(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def run(self, todo, base, shard_dir):
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        pending, running, attempts, broken = deque(todo), {}, {}, False
        while pending or running:
            if broken and not running:  # every job of the broken pool is back: a fresh pool
                self.pool.shutdown(cancel_futures=True)
                self._new_pool()
                broken = False
            for job in [] if broken else list(pending):
                if len(running) >= self.workers:
                    break
                if job.exclusive and any(j.exclusive for j in running.values()):
                    continue
                pending.remove(job)
                running[self.pool.submit(run_job, job, base, shard_dir)] = job
            self.running = len(running)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                job, err = running.pop(f), f.exception()
                if isinstance(err, BrokenProcessPool):  # a worker was killed: retry, its shard is discarded
                    broken = True
                    attempts[job.id] = attempts.get(job.id, 0) + 1
                    if attempts[job.id] > self.retries:
                        yield lost(job, f"worker died {attempts[job.id]} times (killed or out of memory)")
                    else:
                        pending.appendleft(job)
                else:
                    yield lost(job, f"{type(err).__name__}: {err}") if err else f.result()


class RayCluster(InProcess):
    """Ray tasks: ``num_gpus=1`` on CUDA, the node's ``timing_slot`` for CPU timing, ``max_retries`` on worker death."""

    def __init__(self, workers=1, retries=2, address=None):
        self.workers, self.retries, self.address, self.started = workers, retries, address, False

    def __enter__(self):
        import ray

        if not ray.is_initialized():
            connect(self.address, self.workers)
            self.started = True
        return self

    def __exit__(self, *exc):
        import ray

        if self.started:
            ray.shutdown()
        return False

    def run(self, todo, base, shard_dir):
        import ray

        have = ray.cluster_resources()
        for need, what, hint in (("timing_slot", lambda j: j.exclusive and j.device == "cpu",
                                  "ray start ... --resources='{\"timing_slot\": 1}' on every node"),
                                 ("GPU", lambda j: j.device == "cuda", "a node with GPUs")):
            if any(what(j) for j in todo) and not have.get(need):
                raise RuntimeError(f"the Ray cluster has no {need!r} resource, which {sum(map(what, todo))} jobs need "
                                   f"(it has {sorted(have)}); start it with {hint}")
        remote, base_ref = ray.remote(run_job), ray.put(base)
        refs = {}
        for job in todo:
            opts = dict(num_cpus=1, max_retries=self.retries)
            if job.device == "cuda":
                opts["num_gpus"] = 1
            elif job.exclusive:
                opts["resources"] = {"timing_slot": 1}
            refs[remote.options(**opts).remote(job, base_ref, str(shard_dir))] = job
        while refs:
            self.running = min(len(refs), int(have.get("CPU", len(refs))))  # in flight, at most what fits
            done, _ = ray.wait(list(refs), num_returns=1)
            job = refs.pop(done[0])
            try:
                yield ray.get(done[0])
            except ray.exceptions.RayError as err:  # retries used up: the worker or node kept dying
                yield lost(job, f"{type(err).__name__} after {self.retries} retries: {str(err)[:500]}")


def connect(address: str | None, workers: int = 1) -> None:
    """Start a local Ray instance (``address`` None) or join a cluster; an unreachable address is named."""
    import ray

    if address is None:
        for attempt in range(3):  # Ray gives its agents 15 s to start (ray#65983): a loaded machine may need more
            try:
                ray.init(num_cpus=workers, resources={"timing_slot": 1}, include_dashboard=False, log_to_driver=False)
                return
            except Exception as err:  # noqa: BLE001 (Ray raises a bare Exception when its node does not start)
                ray.shutdown()
                if attempt == 2 or "timed out during startup" not in str(err):
                    raise
    m = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?:(\d+)", address)
    if m:  # a host:port that does not answer would make ray.init wait for minutes
        try:
            socket.create_connection((m.group(1), int(m.group(2))), timeout=5).close()
        except OSError as err:
            raise ConnectionError(f"cannot reach the Ray cluster at --address {address!r}: {err}. Is `ray start "
                                  "--head` running there, and is the port open?") from err
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConnectionError(f"cannot reach the Ray cluster at --address {address!r}: {err}") from err


# --- the driver --------------------------------------------------------------------------------
def merge(store: ResultsStore, result: dict) -> int:
    """Append a job's rows that the store lacks as one unit (its status row last), after their
    per-document sidecars; file its log and its shard under ``<store folder>/sweeps``."""
    from . import samples

    work, folder = store.path.parent / "sweeps", samples.folder(store.path)
    for h, payload in result["samples"].items():  # a job on another node wrote them there
        if samples.read(folder, h) is None:
            samples.write(folder, h, payload)
    new, seen = [], set()
    for r in result["rows"]:
        k = (r["config_hash"], r["metric"])
        if k not in seen and not store.has(*k):
            seen.add(k)
            new.append(r)
    store.append(new)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    with open(work / "logs" / f"{result['id']}.log", "a") as f:
        f.write(result["log"])
    shard = Path(result["shard"]) if result["shard"] else None
    if shard is not None and shard.exists():
        (work / "merged").mkdir(exist_ok=True)
        os.replace(shard, work / "merged" / shard.name.removeprefix(SHARD))
    return len(new)


def _drop_partial(store: ResultsStore) -> None:
    """Delete the shards of attempts that never finished (killed workers; their jobs ran again), keep their logs."""
    folder, logs = store.path.parent, store.path.parent / "sweeps" / "logs"
    for p in folder.glob(f"{SHARD}*.partial.jsonl"):
        p.unlink()
    logs.mkdir(parents=True, exist_ok=True)
    for p in folder.glob(f"{SHARD}*.log"):
        os.replace(p, logs / f"{p.stem.removeprefix(SHARD)}.unfinished.log")


def _recover(store: ResultsStore) -> None:
    """Merge the finished shards a stopped driver did not; drop unfinished ones (their jobs run again)."""
    _drop_partial(store)
    for p in sorted(store.path.parent.glob(f"{SHARD}*.jsonl")):
        merge(store, {"id": p.name.removeprefix(SHARD).removesuffix(".jsonl"), "rows": ResultsStore(p).rows(),
                      "samples": {}, "shard": str(p), "log": ""})


def run(spec: Spec, executor: str = "inprocess", workers: int = 1, address: str | None = None,
        store: ResultsStore | None = None, progress: bool = True) -> pd.DataFrame:
    """Run every job of ``spec`` not yet in the store; returns the store's rows of the spec's models."""
    from tqdm.auto import tqdm

    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r} is unknown; allowed: {list(EXECUTORS)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers {workers!r} is not an integer >= 1")
    store = ResultsStore() if store is None else store
    store.path.parent.mkdir(parents=True, exist_ok=True)
    _recover(store)
    todo = [j for j in jobs(spec) if not store.has(j.key, DONE)]
    ex = {"inprocess": InProcess, "local": LocalPool, "ray": RayCluster}[executor](workers, spec.retries, address)
    counts = {"done": 0, "failed": 0}
    with tqdm(total=len(todo), desc=f"sweep ({executor})", unit="job", disable=not progress) as bar, ex:
        for stage in ([j for j in todo if j.method == "dense"], [j for j in todo if j.method != "dense"]):
            base = [r for r in store.rows() if r["model"] in spec.models]  # dense rows first: pruned jobs read them
            for result in ex.run(stage, base, store.path.parent):
                merge(store, result)
                counts["failed" if result["error"] else "done"] += 1
                bar.set_postfix(counts, running=ex.running, refresh=False)
                bar.update()
                if result["error"]:
                    bar.write(f"job {result['id']} failed: {result['error'].splitlines()[0][:300]}")
    _drop_partial(store)
    df = store.load()
    return df[df.model.isin(spec.models)].reset_index(drop=True)


def failures(df: pd.DataFrame) -> pd.DataFrame:
    """Jobs whose last attempt failed (no ``sweep_job`` row for their key), with the reason."""
    f = df[(df.metric == FAILURE) & ~df.config_hash.isin(df[df.metric == DONE].config_hash)]
    return pd.DataFrame({"model": f.model, "method": f.method, "sparsity": f.sparsity, "device": f.device,
                         "seed": [e.get("seed") for e in f.extra], "error": [e.get("error") for e in f.extra]})


def print_tables(df: pd.DataFrame, batch: int = 1, length: int = 512) -> None:
    """Per model: the summary table, each criterion against random, and the failed jobs."""
    from .experiment import print_table

    for model, g in df.groupby("model"):
        print(f"\n{model}:")
        print_table(g, batch, length)


def main(argv=None, spec: str | None = None, executor: str = "inprocess", workers: int = 1,
         address: str | None = None) -> pd.DataFrame:
    """``python -m prunelib.sweep SPEC [--executor ...]`` (``python -m prunelib.experiment --spec`` comes here)."""
    if spec is None:
        p = argparse.ArgumentParser(description="run a sweep spec (YAML or TOML) into the results store")
        p.add_argument("spec")
        p.add_argument("--executor", choices=EXECUTORS, default="inprocess")
        p.add_argument("--workers", type=int, default=1, help="local: processes; ray without --address: CPUs")
        p.add_argument("--address", default=None, help="a Ray cluster ('auto', host:port); none starts a local one")
        a = p.parse_args(argv)
        spec, executor, workers, address = a.spec, a.executor, a.workers, a.address
    if executor != "ray" and address is not None:
        raise ValueError(f"--address {address!r} is for --executor ray, not {executor!r}")
    s = load_spec(spec, executor=executor)
    t0 = time.perf_counter()
    df = run(s, executor, workers, address)
    print(f"\nsweep {spec} through {executor} ({workers} worker(s)): {time.perf_counter() - t0:.1f} s")
    print_tables(df, s.batches[0], s.lengths[0])
    return df


if __name__ == "__main__":
    main()
