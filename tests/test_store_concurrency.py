"""One writer per results store, checked with real processes: has-then-append from two processes stores each
key once, a second sweep driver is refused (naming the first) before it touches the first one's shards, and a
held write lock makes others wait or names its holder."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from prunelib.core.store import ResultsStore, StoreBusy
from prunelib.run import merge
from prunelib.run.executors import SHARD

KEYS = 30


def spawn(script: str, **names) -> subprocess.Popen:
    head = f"import sys, time, os; sys.path.insert(0, {os.getcwd()!r})\n"
    head += "".join(f"{k} = {v!r}\n" for k, v in names.items())
    return subprocess.Popen([sys.executable, "-c", head + textwrap.dedent(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path, deadline=120):
    t0 = time.time()
    while not os.path.exists(path):
        assert time.time() - t0 < deadline, f"{path} never appeared"
        time.sleep(0.02)


MEASURE = """
    from prunelib.core.store import ResultsStore
    s = ResultsStore(store)
    open(ready, "w").close()
    while not os.path.exists(go):  # both start together
        time.sleep(0.005)
    for i in range(n):
        key = f"key{i}"
        if not s.has(key, "m"):
            time.sleep(0.01)  # the measurement: the other process may store the key meanwhile
            s.append(dict(model="m", method="x", metric="m", value=float(os.getpid()), config_hash=key))
"""


def test_two_processes_doing_has_then_append_store_each_key_once(tmp_path):
    store, go = tmp_path / "r.jsonl", tmp_path / "go"
    procs = [spawn(MEASURE, store=str(store), go=str(go), n=KEYS, ready=str(tmp_path / f"ready{i}")) for i in range(2)]
    for i in range(2):
        wait_for(tmp_path / f"ready{i}")
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    rows = [json.loads(line) for line in store.read_text().splitlines()]
    keys = [r["config_hash"] for r in rows]
    assert sorted(keys) == sorted(f"key{i}" for i in range(KEYS)), f"{len(keys) - len(set(keys))} keys stored twice"
    assert len({r["value"] for r in rows}) >= 1


def test_has_sees_what_another_writer_appended(tmp_path):
    mine, theirs = ResultsStore(tmp_path / "r.jsonl"), ResultsStore(tmp_path / "r.jsonl")
    assert not mine.has("k", "m")
    theirs.append(dict(model="m", method="x", metric="m", value=1.0, config_hash="k"))
    assert mine.has("k", "m")
    assert mine.append(dict(model="m", method="x", metric="m", value=2.0, config_hash="k")) == 0  # stored once
    assert len(mine) == 1


DRIVER = """
    from prunelib.core.store import ResultsStore
    s = ResultsStore(store)
    s.claim_driver()  # what merge._recover, the start of a sweep, does first
    open(ready, "w").close()
    while not os.path.exists(stop):
        time.sleep(0.02)
    s.release_driver()
"""


def test_a_second_sweep_driver_is_refused_naming_the_first_and_leaves_its_shards(tmp_path):
    store = tmp_path / "s" / "results.jsonl"
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    first = spawn(DRIVER, store=str(store), ready=str(ready), stop=str(stop))
    try:
        wait_for(ready)
        running = store.parent / f"{SHARD}job1.{first.pid + 1}.partial.jsonl"  # a job of the first driver, running
        running.write_text('{"model": "m"}\n')
        log = store.parent / f"{SHARD}job1.{first.pid + 1}.log"
        log.write_text("job 1 is running\n")
        with pytest.raises(StoreBusy, match=rf"held by process {first.pid} on .*a sweep into .* is running there"):
            merge._recover(ResultsStore(store))
        assert running.exists() and log.exists()  # the first driver's shards are its own
    finally:
        stop.touch()
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    second = ResultsStore(store)
    merge._recover(second)  # the first one ended: this one may drive now
    merge._drop_partial(second)


def test_one_process_may_claim_its_store_twice_and_release_it(tmp_path):
    s = ResultsStore(tmp_path / "r.jsonl")
    s.claim_driver()
    ResultsStore(tmp_path / "r.jsonl").claim_driver()  # the same process: the same claim
    s.release_driver()
    p = spawn("""
        from prunelib.core.store import ResultsStore
        ResultsStore(store).claim_driver()
    """, store=str(tmp_path / "r.jsonl"))
    assert p.wait(timeout=120) == 0


HOLD = """
    from prunelib.core.store import ResultsStore
    with ResultsStore(store).lock():
        open(ready, "w").close()
        time.sleep(hold)
"""


def test_a_held_write_lock_makes_an_append_wait_or_names_its_holder(tmp_path):
    store, ready = tmp_path / "r.jsonl", tmp_path / "ready"
    holder = spawn(HOLD, store=str(store), ready=str(ready), hold=3.0)
    try:
        wait_for(ready)
        s = ResultsStore(store)
        with pytest.raises(StoreBusy, match=rf"held by process {holder.pid}"):
            with s.lock(timeout=0.2):
                pass
        t0 = time.time()
        s.append(dict(model="m", method="x", metric="m", value=1.0, config_hash="k"))  # waits for the holder
        assert time.time() - t0 > 0.5
    finally:
        holder.communicate(timeout=120)
    assert ResultsStore(store).has("k", "m")


def test_a_merge_after_another_drivers_merge_of_the_same_result_adds_nothing(tmp_path):
    """Two drivers' views of one store: the second merges what the first already merged, after it had read the
    store (its view of what is stored is refreshed under the lock, so nothing is stored twice)."""
    from prunelib.core.store import make_row

    path = tmp_path / "s" / "results.jsonl"
    result = {"id": "j", "rows": [make_row(model="m", method="x", metric=f"m{i}", value=1.0, config_hash="k")
                                  for i in range(20)], "samples": {}, "shard": None, "log": ""}
    first, second = ResultsStore(path), ResultsStore(path)
    assert not second.has("k")  # the second driver has read the (empty) store
    assert merge.merge(first, result) == 20
    assert merge.merge(second, result) == 0
    df = ResultsStore(path).load()
    assert len(df) == 20 and not df.duplicated(["config_hash", "metric"]).any()
