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
import sys
import time

import pandas as pd

from prunelib.core.store import ResultsStore
from prunelib.results.summary import DONE, FAILURE, failures, print_table  # noqa: F401
from prunelib.run.executors import (InProcess, LocalPool, RayCluster, RayStartError, connect, lost, run_job,  # noqa: F401
                                     status_row)
from prunelib.run.merge import _drop_partial, _recover, merge
from prunelib.run.spec import EXECUTORS, Job, Spec, SpecError, jobs, load_spec  # noqa: F401


def run(spec: Spec, executor: str = "inprocess", workers: int = 1, address: str | None = None,
        store: ResultsStore | None = None, progress: bool = True) -> pd.DataFrame:
    """Run every job of ``spec`` not yet in the store; returns the store's rows of the spec's models."""
    from tqdm.auto import tqdm

    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r} is unknown; allowed: {list(EXECUTORS)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers {workers!r} is not an integer >= 1")
    store = ResultsStore() if store is None else store
    store.check_writable()  # a read-only folder or a full disk is refused before any job runs
    _recover(store)
    try:  # the driver claim is released however the sweep ends (an executor that fails to start, an interrupt)
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
        _drop_partial(store)  # what killed workers left; releases the claim
    finally:
        store.release_driver()  # a sweep that raised part-way (a second release is a no-op)
    df = store.load()
    return df[df.model.isin(spec.models)].reset_index(drop=True)


def print_tables(df: pd.DataFrame, batch: int = 1, length: int = 512) -> None:
    """Per model: the summary table, each criterion against random, and the failed jobs."""
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
    try:
        df = run(s, executor, workers, address)
    except RayStartError as err:  # Ray did not start or answer: what to try, and a non-zero exit
        print(f"sweep {spec}: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    print(f"\nsweep {spec} through {executor} ({workers} worker(s)): {time.perf_counter() - t0:.1f} s")
    print_tables(df, s.batches[0], s.lengths[0])
    return df


if __name__ == "__main__":
    main()
