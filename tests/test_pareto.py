import math

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunelib import experiment
from prunelib import pareto as pareto_cli
from prunelib.results import pareto


def pts(rows):
    """Points as pareto.points gives them; ``half`` is the loss CI's half-width (default 0.5)."""
    base = dict(model="m", cell="c", phase="prefill", batch=1, length=512, device="cpu", timing_mode="eager", bound=2.0)
    out = []
    for r in rows:
        r = dict(r)
        half = r.pop("half", 0.5)
        out.append(base | dict(loss_low=r["loss"] - half, loss_high=r["loss"] + half) | r)
    return pd.DataFrame(out)


def test_frontier_respects_both_uncertainties():
    df = pts([
        dict(method="a", sparsity=0.1, speedup=1.2, ci_low=1.1, ci_high=1.3, loss=2.0),
        dict(method="b", sparsity=0.1, speedup=1.25, ci_low=1.2, ci_high=1.35, loss=1.0),  # overlaps a: a survives
        dict(method="c", sparsity=0.1, speedup=1.0, ci_low=0.95, ci_high=1.05, loss=3.0),  # b is faster: beaten
        dict(method="d", sparsity=0.3, speedup=1.4, ci_low=1.3, ci_high=1.5, loss=20.0, half=2),
        dict(method="e", sparsity=0.3, speedup=1.45, ci_low=1.3, ci_high=1.6, loss=10.0, half=2),  # less loss: beats d
        dict(method="f", sparsity=0.3, speedup=1.9, ci_low=1.8, ci_high=2.0, loss=12.0, half=10),  # faster, not d-worse
    ])
    assert set(pareto.frontier(df).method) == {"a", "b", "e", "f", "dense"}
    rec = df.set_index("method").to_dict("index")
    assert pareto.beats(rec["e"], rec["d"])  # same speed (overlapping CIs), significantly less loss
    assert not pareto.beats(rec["f"], rec["e"])  # much faster but more loss (point estimate): never a beat
    assert not pareto.beats(rec["b"], rec["a"]) and pareto.beats(rec["b"], rec["c"])


def test_points_slower_than_dense_leave_the_frontier():
    df = pts([
        dict(method="slow", sparsity=0.25, speedup=0.6, ci_low=0.55, ci_high=0.65, loss=0.5, half=3),
        dict(method="even", sparsity=0.25, speedup=0.98, ci_low=0.9, ci_high=1.1, loss=2.0, half=3),
        dict(method="fast", sparsity=0.25, speedup=1.3, ci_low=1.2, ci_high=1.4, loss=10.0),
    ])
    assert set(pareto.frontier(df).method) == {"even", "fast", "dense"}  # dense (1.0x, no loss) beats 'slow'
    assert pareto.best_per_band(df, [(0, 4), (5, 16)]).vs_dense.tolist() == ["tie", "faster"]


def test_dense_is_a_frontier_row_of_every_shape():
    df = pd.concat([pts([dict(method="a", sparsity=0.1, speedup=1.2, ci_low=1.1, ci_high=1.3, loss=2.0)]),
                    pts([dict(method="a", sparsity=0.1, speedup=1.1, ci_low=1.0, ci_high=1.2, loss=2.0, length=2048)])],
                   ignore_index=True)
    f = pareto.frontier(df)
    d = f[f.method == "dense"]
    assert sorted(d.length) == [512, 2048] and (d.speedup == 1.0).all() and (d.loss == 0.0).all()


def test_significantly_slower_than_dense_leaves_even_at_a_negative_loss():
    df = pts([dict(method="neg", sparsity=0.1, speedup=0.8, ci_low=0.75, ci_high=0.85, loss=-1.0, half=2)])
    assert set(pareto.frontier(df).method) == {"dense"}
    # unless its quality is significantly better than dense's: then it is a trade-off, not beaten
    df = pts([dict(method="better", sparsity=0.1, speedup=0.8, ci_low=0.75, ci_high=0.85, loss=-5.0, half=2)])
    assert set(pareto.frontier(df).method) == {"better", "dense"}


def test_the_ci_decides_against_dense_not_the_point_estimate():
    # the same CI around 1.0 and the same significant loss: both leave (neither buys anything provable)
    df = pts([dict(method="below", sparsity=0.1, speedup=0.99, ci_low=0.9, ci_high=1.08, loss=5.0, half=2),
              dict(method="above", sparsity=0.1, speedup=1.01, ci_low=0.92, ci_high=1.1, loss=5.0, half=2)])
    assert set(pareto.frontier(df).method) == {"dense"}
    # and with a loss CI that holds 0 both stay
    df = pts([dict(method="below", sparsity=0.1, speedup=0.99, ci_low=0.9, ci_high=1.08, loss=1.0, half=2),
              dict(method="above", sparsity=0.1, speedup=1.01, ci_low=0.92, ci_high=1.1, loss=1.0, half=2)])
    assert set(pareto.frontier(df).method) == {"below", "above", "dense"}


def test_best_per_band_names_every_tied_method():
    df = pts([
        dict(method="a", sparsity=0.1, speedup=1.2, ci_low=1.1, ci_high=1.3, loss=2.0),
        dict(method="a2", sparsity=0.1, speedup=1.25, ci_low=1.15, ci_high=1.35, loss=3.0),  # CI overlaps a: tie
        dict(method="a3", sparsity=0.1, speedup=1.0, ci_low=0.9, ci_high=1.05, loss=1.0),  # clearly slower
        dict(method="b", sparsity=0.2, speedup=1.5, ci_low=1.4, ci_high=1.6, loss=10.0),
    ])
    t = pareto.best_per_band(df)
    assert t.winners.tolist() == ["a2 s=0.1, a s=0.1", "b s=0.2", "(none measured)"]
    assert t.tie.tolist() == [True, False, False]
    assert t.fastest[0] == "a2 s=0.1" and t.ci[0] == "[1.15, 1.35]"


def rows_for(method="x", seed=0, options=None, loss=4.0, **speed):
    extra = {"calibration": {"seed": seed}, "options": options or {}, "params": 1e8}
    base = dict(model="m", method=method, cell="static_depth", sparsity=0.25, device="cpu")
    return [
        base | dict(phase="prefill", batch=1, length=512, metric="speedup", value=1.3, ci_low=1.2, ci_high=1.4,
                    bound=1.36, extra=extra) | speed,
        base | dict(phase="quality", metric="quality_loss_pct", value=loss, ci_low=loss - 3, ci_high=loss + 3,
                    extra={"seed": seed, "options": options or {}, "stderr": 1.5, "ci_method": "paired_bootstrap"}),
    ]


def test_points_join_speed_and_loss_of_the_same_seed_and_options():
    df = pd.DataFrame(rows_for(loss=20.0)
                      + rows_for(seed=1, loss=35.0)[1:]  # a quality-only rerun at seed 1 lands later
                      + rows_for(options={"round_to": 64}, loss=50.0)[:1])  # timed with other options, never scored
    p = pareto.points(df)
    assert len(p) == 1 and p.loc[0, "loss"] == 20.0 and p.loc[0, "seed"] == 0 and p.loc[0, "speedup"] == 1.3
    assert (p.loc[0, "loss_low"], p.loc[0, "loss_high"]) == (17.0, 23.0) and p.loc[0, "ci_method"] == "paired_bootstrap"
    assert p.loc[0, "label"] == "s=0.25: 25% of decoder layers"
    assert pareto.points(pd.DataFrame()).empty


def test_labels_name_the_methods_own_unit():
    df = pd.DataFrame(rows_for("shortgpt_attn") + rows_for("dyn_depth_router_mlp"))
    labels = dict(zip(*pareto.points(df)[["method", "label"]].values.T))
    assert labels == {"shortgpt_attn": "s=0.25: 25% of attention sublayers",
                      "dyn_depth_router_mlp": "s=0.25: 25% of token-MLP pairs"}


def test_summary_and_points_agree_after_a_seed_rerun():
    df = pd.DataFrame(rows_for(loss=20.0) + rows_for(seed=1, loss=35.0, value=1.1, ci_low=1.0, ci_high=1.2))
    p = pareto.points(df).set_index("seed")
    t = experiment.summary(df).set_index("seed")
    for seed in (0, 1):
        assert t.loc[seed, "quality_loss_pct"] == p.loc[seed, "loss"]
        assert t.loc[seed, "prefill_speedup"] == p.loc[seed, "speedup"]
    assert t.loc[1, "quality_loss_pct"] == 35.0 and t.loc[1, "prefill_speedup"] == 1.1


def test_fidelity_on_the_x_axis_picks_its_domain():
    speed, _ = rows_for()
    fid = [dict(model="m", method="x", cell="static_depth", sparsity=0.25, phase="quality", metric=metric, value=v,
                ci_low=v - 0.01, ci_high=v + 0.01, extra={"seed": 0, "options": {}, "domain": dom})
           for metric, dom, v in (("fidelity_kl", "ptb", 0.3), ("fidelity_kl", "wikitext2", 0.2),
                                  ("fidelity_dnll", "ptb", 0.25))]
    df = pd.DataFrame([speed] + fid)
    assert pareto.points(df, x="kl").loss.tolist() == [0.3]
    assert pareto.points(df, x="kl", domain="wikitext2").loss.tolist() == [0.2]
    dnll = pareto.points(df, x="dnll")
    assert dnll.loss.tolist() == [0.25] and "ptb" in pareto.x_label(dnll[dnll.phase == "prefill"])
    assert pareto.points(df, x="loss").empty  # no accuracy loss stored
    with pytest.raises(ValueError, match=r"x='ppl' is not a quality axis; allowed: \['dnll', 'kl', 'loss'\]"):
        pareto.points(df, x="ppl")
    with pytest.raises(ValueError, match=r"domain='c4' is not a fidelity domain; allowed: \['ptb', 'wikitext2', 'ptb-long'\]"):
        pareto.points(df, x="kl", domain="c4")


point = st.fixed_dictionaries(dict(
    method=st.sampled_from("abcdef"), sparsity=st.floats(0, 0.9), speedup=st.floats(0.5, 3),
    spread=st.floats(0, 0.3), loss=st.floats(0, 60), half=st.floats(0, 15)))


@settings(max_examples=60, deadline=None)
@given(st.lists(point, min_size=1, max_size=12))
def test_frontier_properties(raw):
    df = pts([dict(r, ci_low=r["speedup"] - r["spread"], ci_high=r["speedup"] + r["spread"]) for r in raw])
    f = pareto.frontier(df, dense=False)
    assert len(pareto.frontier(df)) == len(f) + 1  # one shape: its dense point is on the frontier too
    recs = df.to_dict("records")
    for idx in df.index.difference(f.index):  # every dropped point is beaten by someone, or by dense
        assert any(pareto.beats(q, recs[idx]) for q in recs + [pareto.DENSE])
    for idx in f.index:  # no kept point is beaten, and no beat goes against a point estimate
        assert not any(pareto.beats(q, recs[idx]) for q in recs + [pareto.DENSE])
    for q in recs:
        for p in recs:
            if pareto.beats(q, p):
                assert q["speedup"] >= p["speedup"] and q["loss"] <= p["loss"]


def test_cli_prints_the_frontier_and_the_band_table(capsys):
    from prunelib.core.store import ResultsStore

    store = ResultsStore()
    for i, r in enumerate(rows_for("shortgpt", loss=3.0) + rows_for("angular", loss=10.0)):
        store.append(r | {"config_hash": f"h{i}"})
    pareto_cli.main(["--model", "m"])
    out = capsys.readouterr().out
    assert "frontier" in out and "shortgpt" in out and "angular" in out
    assert "0-4%" in out and "shortgpt s=0.25" in out and "angular s=0.25" in out  # each wins its band
    assert "each band with a probability" in out and "the paper's headline, point by point" in out
    assert "static depth is the best at 0-4% loss" in out
    pareto_cli.main(["--model", "nobody"])
    assert "no timed model of 'nobody'" in capsys.readouterr().out


def test_bands_leave_no_gap_between_whole_percents():
    """Band 5-16 holds 16.3% (the paper names bands in whole percents); a loss below zero is in the first band;
    one above the last band's top is in none; a band never takes a point its neighbour holds."""
    assert pareto.band_edges(pareto.PAPER_BANDS) == [(-math.inf, 5.0), (5.0, 17.0), (17.0, 27.0)]
    assert pareto.band_edges(pareto.FINE_BANDS)[:2] == [(-math.inf, 2.0), (2.0, 5.0)]
    df = pts([dict(method=m, sparsity=0.1, speedup=1.2, ci_low=1.1, ci_high=1.3, loss=loss)
              for m, loss in [("neg", -1.5), ("gap", 16.3), ("edge", 17.0), ("far", 27.0)]])
    assert pareto.best_per_band(df).winners.tolist() == ["neg s=0.1", "gap s=0.1", "edge s=0.1"]
    with pytest.raises(ValueError, match=r"bands must be \[low, high\] pairs"):
        pareto.band_edges([(5, 16), (0, 4)])


def test_where_active_puts_long_prefill_kl_beside_the_quick_suite_s_active_share():
    speed, loss = rows_for("sparse_attn_block", loss=1.3)
    loss["extra"] = dict(loss["extra"], active_share_scoring=0.05)  # the prefill rule ran on 5% of scored tokens
    long = dict(model="m", method="sparse_attn_block", cell="static_depth", sparsity=0.25, phase="quality",
                metric="fidelity_kl", value=0.4, ci_low=0.3, ci_high=0.5, extra={"seed": 0, "options": {},
                                                                                  "domain": "ptb-long"})
    short = dict(long, value=0.05, extra=dict(long["extra"], domain="ptb"))
    t = pareto.where_active(pd.DataFrame([speed, loss, long, short]))
    assert len(t) == 1 and t.kl[0] == 0.4 and (t.kl_low[0], t.kl_high[0]) == (0.3, 0.5)
    assert t.quick_loss[0] == 1.3 and t.quick_active_share[0] == 0.05 and bool(t.quick_inactive[0])
    assert t.speedup[0] == 1.3 and pareto.where_active(pd.DataFrame([speed, loss]), ["sparse_attn_block"]).empty
