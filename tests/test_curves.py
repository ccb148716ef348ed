"""Curves, the staircase envelope and P(best) against hand computations."""
import numpy as np
import pandas as pd
import pytest

from prunelib.results import bands, curves


def test_isotonic_by_hand():
    assert curves.isotonic([1, 3, 2, 4]).tolist() == [1, 2.5, 2.5, 4]
    assert curves.isotonic([3, 2, 1]).tolist() == [2, 2, 2]
    assert curves.isotonic([1, 3, 2], w=[1, 3, 1]).tolist() == pytest.approx([1, 2.75, 2.75])
    assert curves.isotonic([1, 2, 3]).tolist() == [1, 2, 3]


def rung(sparsity, loss, speedup, half=0.05, lhalf=1.0, method="m"):
    return dict(method=method, options="{}", sparsity=sparsity, seed=0, loss=loss, loss_low=loss - lhalf,
                loss_high=loss + lhalf, speedup=speedup, ci_low=speedup - half, ci_high=speedup + half, bound=2.0,
                phase="prefill", batch=1, length=512, device="cpu", timing_mode="eager")


def test_method_curve_starts_at_dense_and_pools_a_dip():
    c = curves.method_curve(pd.DataFrame([rung(0.1, 2.0, 1.10), rung(0.2, 5.0, 1.05), rung(0.3, 9.0, 1.30)]))
    assert c.loss.tolist() == [0.0, 2.0, 5.0, 9.0] and c.measured.tolist() == [False, True, True, True]
    assert c.fit.tolist() == pytest.approx([1.0, 1.075, 1.075, 1.30])  # 1.10 then 1.05: pooled to their mean


def test_method_curve_keeps_dense_at_one_for_a_method_slower_than_dense():
    """A router slower than dense at every rung: its rungs are fitted among themselves, dense stays (0, 1.0). Pooled
    with dense, the old fit read 0.985 at every loss, dense included, for one rung at 0.970."""
    c = curves.method_curve(pd.DataFrame([rung(0.05, 20.0, 0.97)]))
    assert c.fit.tolist() == pytest.approx([1.0, 0.97])
    assert curves.speedup_at(c, 10.0)["speedup"] == pytest.approx(0.985)  # halfway, interpolated
    assert curves.speedup_at(c, 20.0)["speedup"] == pytest.approx(0.97)
    c = curves.method_curve(pd.DataFrame([rung(0.1, 5.0, 0.97), rung(0.2, 10.0, 0.95), rung(0.3, 20.0, 1.05)]))
    assert c.fit.tolist() == pytest.approx([1.0, 0.96, 0.96, 1.05])  # the dip pooled among the rungs only


def test_speedup_at_reads_measured_interpolated_and_beyond():
    c = curves.method_curve(pd.DataFrame([rung(0.1, 2.0, 1.2), rung(0.2, 6.0, 1.6)]))
    at = curves.speedup_at(c, 2.0)
    assert at["speedup"] == pytest.approx(1.2) and not at["interpolated"]
    mid = curves.speedup_at(c, 4.0)  # halfway between the rungs
    assert mid["speedup"] == pytest.approx(1.4) and mid["interpolated"] and mid["sparsity"] == pytest.approx(0.15)
    assert (mid["ci_low"], mid["ci_high"]) == pytest.approx((1.35, 1.45))
    assert curves.speedup_at(c, 1.0)["speedup"] == pytest.approx(1.1)  # between dense (0, 1.0) and the first rung
    far = curves.speedup_at(c, 20.0)
    assert far["speedup"] == pytest.approx(1.6) and far["beyond"] and not far["interpolated"]


def test_envelope_is_the_staircase_of_the_best_reachable():
    pts = pd.DataFrame([rung(0.1, 1.0, 1.1, method="a"), rung(0.2, 3.0, 1.05, method="b"),
                        rung(0.3, 4.0, 1.5, method="b"), rung(0.4, 8.0, 1.4, method="a"), rung(0.5, 12, 2.0)])
    env = curves.envelope(pts)
    assert list(zip(env.method, env.loss, env.speedup)) == [("dense", 0.0, 1.0), ("a", 1.0, 1.1), ("b", 4.0, 1.5),
                                                             ("m", 12.0, 2.0)]
    xs, ys = curves.staircase_xy(env, 20)
    assert xs == [0.0, 1.0, 1.0, 4.0, 4.0, 12.0, 12.0, 20] and ys == [1.0, 1.0, 1.1, 1.1, 1.5, 1.5, 2.0, 2.0]


def test_p_best_names_a_clear_winner():
    rng = np.random.default_rng(0)
    n = 4000
    d = {"fast": ("fast", 1.5 + 0.02 * rng.standard_normal(n), 2 + 0.5 * rng.standard_normal(n)),
         "slow": ("slow", 1.2 + 0.02 * rng.standard_normal(n), 2 + 0.5 * rng.standard_normal(n))}
    r = bands.winners(d, [(0, 4)])[(0, 4)]
    assert r["p"]["fast"] > 0.95
    assert bands.answer(r["p"], r["none"]) == ("fast", False)


def test_p_best_of_two_identical_methods_is_a_tie():
    rng = np.random.default_rng(1)
    n = 4000
    d = {k: (k, 1.3 + 0.05 * rng.standard_normal(n), 10 + rng.standard_normal(n)) for k in ("a", "b")}
    r = bands.winners(d, [(5, 16)])[(5, 16)]
    assert r["p"]["a"] == pytest.approx(0.5, abs=0.03) and r["p"]["b"] == pytest.approx(0.5, abs=0.03)
    ans, tie = bands.answer(r["p"], r["none"])
    assert tie and set(ans.split(", ")) == {"a", "b"}


def test_p_best_when_the_band_is_mostly_empty():
    n = 1000
    d = {"x": ("x", np.full(n, 1.5), np.full(n, 30.0))}  # always past the band
    r = bands.winners(d, [(0, 4)])[(0, 4)]
    assert r["none"] == 1.0 and bands.answer(r["p"], r["none"]) == ("none", False)


def test_speed_draws_come_from_the_timing_pairs():
    rng = np.random.default_rng(0)
    extra = {"samples_dense": [2.0] * 10, "samples_pruned": [1.0] * 10}
    s, approx = bands._speed_draws(extra, 2.0, 1.9, 2.1, rng, 100)
    assert not approx and np.all(s == 2.0)
    s, approx = bands._speed_draws({}, 2.0, 1.8, 2.2, rng, 4000)
    assert approx and np.median(s) == pytest.approx(2.0, rel=0.02)


def test_headline_reads_each_claim_from_the_band_probabilities():
    from prunelib.results import headline

    table = pd.DataFrame([
        dict(phase="prefill", batch=1, length=512, timing_mode="eager", band="0-4%", answer="shortgpt", p_none=0.0,
             p={"shortgpt": 0.7, "angular": 0.2, "width_flap": 0.1}),
        dict(phase="prefill", batch=1, length=512, timing_mode="eager", band="5-16%", answer="width_flap", p_none=0.0,
             p={"width_flap": 0.9, "dyn_depth_router": 0.1}),
        dict(phase="prefill", batch=1, length=512, timing_mode="eager", band="17-26%", answer="x", p_none=0.0,
             p={"width_flap": 0.5, "shortgpt": 0.5}),
    ])
    v = headline.headline(table, pd.DataFrame(columns=["phase", "cell", "speedup", "ci_low", "ci_high", "bound"]))
    got = dict(zip(zip(v.claim.str.slice(0, 13), v.phase), v.verdict))
    assert got[("static depth ", "prefill")] == "agrees"  # shortgpt + angular: static depth holds 0.9
    assert got[("static depth ", "decode")] == "cannot tell"  # no decode shape measured
    assert got[("dynamic depth", "prefill")] == "differs"  # static width holds 0.9
    assert got[("static width ", "prefill")] == "cannot tell"  # 0.5 against 0.5


def test_bound_claim_by_hand():
    from prunelib.results import headline

    pts = pd.DataFrame([dict(phase="decode", cell="static_depth", speedup=1.3, ci_low=1.28, ci_high=1.32, bound=1.35),
                        dict(phase="decode", cell="static_width", speedup=1.05, ci_low=1.03, ci_high=1.07, bound=1.3)])
    assert headline.bound_claim(pts)["verdict"] == "agrees"  # 0.96 against 0.81, half-widths 0.015
    pts.loc[1, "speedup"] = 1.25
    assert headline.bound_claim(pts)["verdict"] == "cannot tell"  # 0.96 against 0.963: within the CIs
    pts.loc[1, ["speedup", "bound"]] = [1.3, 1.3]
    assert headline.bound_claim(pts)["verdict"] == "differs"  # width at 1.00 of its bound
