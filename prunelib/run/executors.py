"""Where a sweep's jobs run: in this process, on a local process pool, or on a Ray cluster. Each job writes
its own shard and returns its rows; the driver merges them (:mod:`prunelib.run.merge`)."""
from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import time
import traceback
from collections import deque
from pathlib import Path


from prunelib.core.store import ResultsStore, make_row
from prunelib.results.summary import DONE, FAILURE
from prunelib.run.spec import Job, import_plugins

LOG_TAIL = 200_000  # characters of a job's log sent back to the driver
SHARD = "sweep-shard."  # a job's shard, beside the store: sweep-shard.<job>[.<pid>.partial].jsonl


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
    from prunelib.measure import scoring
    from prunelib.run import pipeline
    from prunelib.model.models import load_model

    s = job.spec
    kw = dict(phases=s.phases, batches=s.batches, lengths=s.lengths, reps=s.reps, preset=s.quality,
              calib_n=s.calibration["n"], calib_len=s.calibration["length"], seed=job.seed, device=job.device,
              dtype=s.dtype, store=store, timing_mode=s.timing_mode, fidelity=s.fidelity)
    if s.runtime != "pytorch":
        kw.update(runtime=s.runtime, export_dtype=s.export_dtype, threads=s.threads)
    if job.method != "dense":
        pipeline.run(job.model, (job.method,), (job.sparsity,), **kw, **s.options)
        return
    model, tok = load_model(job.model, device=job.device, dtype=s.dtype)
    if s.quality:
        scoring.evaluate(model, tok, preset=s.quality, store=store, model_name=job.model)
    if s.phases and s.runtime != "pytorch":  # dense against itself in llama.cpp: the noise floor there
        from prunelib.run import engine_rows

        text = pipeline.timing_text(tok, (1,), s.lengths, seed=job.seed + 1)
        engine_rows.engine_speed_rows(store, job.model, model, model, "dense", 0.0, "dense", ids=text[0],
                                      phases=s.phases, lengths=s.lengths, reps=s.reps, export_dtype=s.export_dtype,
                                      threads=s.threads, tokenizer=tok)
    elif s.phases:
        pipeline.speed_rows(store, job.model, model, model, "dense", 0.0, phases=s.phases, batches=s.batches,
                            lengths=s.lengths, reps=s.reps, timing_mode=s.timing_mode,
                              text=pipeline.timing_text(tok, s.batches, s.lengths, seed=job.seed + 1))


def status_row(job: Job, error: str | None, seconds: float, **extra) -> dict:
    """The row that closes a job: ``sweep_job`` when it ended, ``failure`` (value 1, with the reason) when not."""
    from prunelib.pruning import get

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

    from prunelib.measure import samples

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


START_ATTEMPTS = 5  # Ray waits 30 s for its node (hard-coded); a loaded 2-core machine has needed more than one try


class RayStartError(ConnectionError):
    """Ray could not start or reach a cluster; the message says what to try."""


def connect(address: str | None, workers: int = 1) -> None:
    """Start a private local Ray instance (``address`` None: ``address="local"``, so a cluster file left by an
    earlier ``ray start`` is never joined by accident) or join a running cluster ('auto' or host:port, without
    ``num_cpus``: the cluster has its own). An address where nothing answers fails within seconds, named."""
    import ray

    if address is None:
        for attempt in range(START_ATTEMPTS):
            try:
                ray.init(address="local", num_cpus=workers, resources={"timing_slot": 1}, include_dashboard=False,
                         log_to_driver=False)
                return
            except Exception as err:  # noqa: BLE001 (Ray raises a bare Exception when its node does not start)
                ray.shutdown()
                if "timed out during startup" not in str(err):
                    raise
        raise RayStartError(f"Ray could not start a private node on this machine ({START_ATTEMPTS} tries of 30 s: "
                            "'node timed out during startup', as on a loaded machine). Try: ray start --head "
                            f"--num-cpus {workers} --resources '{{\"timing_slot\": 1}}', then rerun with --address auto")
    target = address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        target = canonicalize_bootstrap_address("auto")
        if target is None:
            raise RayStartError("--address auto: no Ray cluster is recorded on this machine; start one with "
                                "ray start --head --resources '{\"timing_slot\": 1}', or leave out --address for a "
                                "private one")
    m = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?:(\d+)", target)
    if m:  # a host:port that does not answer would make ray.init wait for minutes
        try:
            socket.create_connection((m.group(1), int(m.group(2))), timeout=5).close()
        except OSError as err:
            raise RayStartError(f"cannot reach the Ray cluster at --address {address!r}"
                                + (f" (recorded as {target})" if target != address else "")
                                + f": {err}. Is `ray start --head` running there, and is the port open?") from err
    try:
        ray.init(address=target if address == "auto" else address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise RayStartError(f"cannot reach the Ray cluster at --address {address!r}: {err}") from err


# --- the driver --------------------------------------------------------------------------------
