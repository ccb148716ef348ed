import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from prunelib import pareto


def pts(rows):
    base = dict(model="m", cell="c", phase="prefill", batch=1, length=512, device="cpu", bound=2.0,
                loss_low=0, loss_high=0)
    return pd.DataFrame([base | r for r in rows])


def test_frontier_respects_uncertainty():
    df = pts([
        dict(method="a", sparsity=0.1, speedup=1.2, ci_low=1.1, ci_high=1.3, loss=2.0),
        dict(method="b", sparsity=0.1, speedup=1.25, ci_low=1.2, ci_high=1.35, loss=1.0),  # overlaps a: a survives
        dict(method="c", sparsity=0.1, speedup=1.0, ci_low=0.95, ci_high=1.05, loss=3.0),  # beaten by b
    ])
    assert set(pareto.frontier(df).method) == {"a", "b"}


def test_best_per_band():
    df = pts([
        dict(method="a", sparsity=0.1, speedup=1.2, ci_low=1.1, ci_high=1.3, loss=2.0),
        dict(method="b", sparsity=0.2, speedup=1.5, ci_low=1.4, ci_high=1.6, loss=10.0),
    ])
    t = pareto.best_per_band(df)
    assert t.method.tolist() == ["a", "b", "(none measured)"]


def test_points_join_speed_and_loss():
    rows = pd.DataFrame([
        dict(model="m", method="x", cell="c", sparsity=0.1, phase="decode", batch=1, length=8, device="cpu",
             metric="speedup", value=1.1, ci_low=1.0, ci_high=1.2, bound=1.3),
        dict(model="m", method="x", cell="c", sparsity=0.1, phase="quality", batch=None, length=None, device="cpu",
             metric="quality_loss_pct", value=4.0, ci_low=2.0, ci_high=6.0, bound=None),
    ])
    p = pareto.points(rows)
    assert len(p) == 1 and p.loc[0, "loss"] == 4.0 and p.loc[0, "speedup"] == 1.1
    assert pareto.points(pd.DataFrame()).empty


point = st.fixed_dictionaries(dict(
    method=st.sampled_from("abcdef"), sparsity=st.floats(0, 0.9), speedup=st.floats(0.5, 3),
    half=st.floats(0, 0.3), loss=st.floats(0, 60)))


@settings(max_examples=60, deadline=None)
@given(st.lists(point, min_size=1, max_size=12))
def test_frontier_properties(raw):
    df = pts([dict(r, ci_low=r["speedup"] - r["half"], ci_high=r["speedup"] + r["half"]) for r in raw])
    f = pareto.frontier(df)
    assert len(f) >= 1  # the least-loss, fastest point is never beaten
    for _, p in df.drop(f.index).iterrows():  # every dropped point is beaten by someone
        assert any(pareto.beats(q, p) for _, q in df.iterrows())
    for _, p in f.iterrows():  # no kept point is beaten
        assert not any(pareto.beats(q, p) for _, q in df.iterrows())
