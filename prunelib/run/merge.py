"""The driver's side of a sweep: a finished job's rows appended to the store (only rows not stored yet, the
status row last), and what a killed run left behind recovered or dropped.

One driver per store: :func:`_recover`, the first step of a sweep, claims the store for this process
(:meth:`ResultsStore.claim_driver`; a second driver is refused, named, before it touches a shard), and
:func:`_drop_partial`, the last, gives it up. Every shard beside the store is therefore this driver's, or
left by a driver that stopped. Each merge holds the store's write lock, so its check of what is stored and
its append see no other writer in between."""
from __future__ import annotations

import os
from pathlib import Path


from prunelib.core.store import ResultsStore
from prunelib.run.executors import SHARD


def merge(store: ResultsStore, result: dict) -> int:
    """Append a job's rows that the store lacks as one unit (its status row last), after their
    per-document sidecars; file its log and its shard under ``<store folder>/sweeps``."""
    from prunelib.measure import samples

    work, folder = store.path.parent / "sweeps", samples.folder(store.path)
    with store.lock():
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
    """The end of a sweep: drop what killed workers left (see :func:`_discard_unfinished`) and stop being the
    store's driver."""
    try:
        _discard_unfinished(store)
    finally:
        store.release_driver()


def _discard_unfinished(store: ResultsStore) -> None:
    """Delete the shards of attempts that never finished (killed workers; their jobs ran again), keep their logs."""
    folder, logs = store.path.parent, store.path.parent / "sweeps" / "logs"
    for p in folder.glob(f"{SHARD}*.partial.jsonl"):
        p.unlink()
    logs.mkdir(parents=True, exist_ok=True)
    for p in folder.glob(f"{SHARD}*.log"):
        os.replace(p, logs / f"{p.stem.removeprefix(SHARD)}.unfinished.log")


def _recover(store: ResultsStore) -> None:
    """The start of a sweep: claim the store for this driver (:class:`~prunelib.core.store.StoreBusy`, naming
    the other, if another driver runs), then merge the finished shards a stopped driver did not and drop its
    unfinished ones (their jobs run again)."""
    store.claim_driver()
    try:
        _discard_unfinished(store)
        for p in sorted(store.path.parent.glob(f"{SHARD}*.jsonl")):
            merge(store, {"id": p.name.removeprefix(SHARD).removesuffix(".jsonl"), "rows": ResultsStore(p).rows(),
                          "samples": {}, "shard": str(p), "log": ""})
    except BaseException:
        store.release_driver()
        raise
