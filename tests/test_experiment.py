import pytest

from prunelib import experiment
from prunelib.store import ResultsStore


def test_speed_rows_stored_once(tiny_model, tmp_path):
    from prunelib.pruning import prune

    store = ResultsStore(tmp_path / "r.jsonl")
    pruned, _ = prune(tiny_model, "last_n", 0.5)
    kw = dict(phases=("prefill", "decode"), batches=(1,), lengths=(16,), reps=5)
    experiment.speed_rows(store, "tiny", tiny_model, pruned, "last_n", 0.5, **kw)
    df = store.load()
    assert len(df) == 2 and set(df.phase) == {"prefill", "decode"}
    r = df.iloc[0]
    assert r.metric == "speedup" and r.ci_low <= r.value <= r.ci_high and r.bound > 1
    assert r.extra["efficiency"] == pytest.approx(r.value / r.bound)
    assert len(r.extra["samples_dense"]) == 5
    experiment.speed_rows(store, "tiny", tiny_model, pruned, "last_n", 0.5, **kw)
    assert len(store.load()) == 2  # re-running skips what is stored
    table = experiment.summary(store.load(), 1, 16)
    assert table.loc[0, "method"] == "last_n" and "decode_bound" in table


def test_unknown_method_fails_before_work(tmp_path):
    with pytest.raises(ValueError, match="unknown pruning method 'nope'"):
        experiment.run(methods=["nope"], store=ResultsStore(tmp_path / "r.jsonl"))
