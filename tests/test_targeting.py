"""Band targeting on fixtures with a known loss curve: each reachable band is found within the scoring budget,
an unreachable one is reported as such, with the reason."""
import math

import pytest

from prunelib.run.targeting import find_bands

RUNGS = [k / 30 for k in range(1, 30)]  # static depth on a 30-layer model


def curve(scale=1.0):
    kl = lambda s: 4.0 * s**1.6  # noqa: E731  (KL grows with the rung)
    loss = lambda s: 100 * (1 - math.exp(-0.45 * scale * kl(s)))  # noqa: E731  (saturating, as accuracy drops)
    return kl, loss


def counted(f):
    calls = []

    def g(s):
        calls.append(s)
        return f(s)
    g.calls = calls
    return g


def test_every_reachable_band_is_found_within_budget():
    kl, loss = curve()
    score = counted(loss)
    found, search = find_bands(RUNGS, kl, score, budget=8)
    assert [b.status for b in found] == ["found", "found", "found"]
    for b, (lo, hi) in zip(found, [(0, 4), (5, 16), (17, 26)]):
        assert lo <= b.loss < hi + 1 and b.loss == pytest.approx(loss(b.sparsity))
    assert len(score.calls) <= 8 < len(RUNGS)  # far fewer scorings than trying every rung
    assert len(set(score.calls)) == len(score.calls)  # never scores a rung twice


def test_a_band_below_the_smallest_rung_is_unreachable():
    kl, loss = curve(scale=8.0)  # the first rung (1 of 30 layers) already loses ~10%
    assert loss(RUNGS[0]) > 5
    found, _ = find_bands(RUNGS, kl, loss, budget=8)
    assert found[0].status == "unreachable" and "smallest rung" in found[0].reason
    assert found[1].status == "found"


def test_a_band_past_the_largest_rung_is_unreachable():
    kl, loss = curve(scale=0.02)  # mild: even the largest rung loses little
    found, _ = find_bands([0.1, 0.2, 0.3], kl, loss, budget=8)
    assert found[0].status == "found"
    assert found[2].status == "unreachable" and "largest rung" in found[2].reason


def test_adjacent_rungs_straddling_a_band_make_it_unreachable():
    losses = {0.1: 2.0, 0.2: 30.0}
    found, _ = find_bands([0.1, 0.2], lambda s: s, losses.get, budget=8)
    assert [b.status for b in found] == ["found", "unreachable", "unreachable"]
    assert "straddle" in found[1].reason


def test_the_budget_is_respected_and_reported():
    kl, loss = curve()
    score = counted(loss)
    found, _ = find_bands(RUNGS, kl, score, budget=1)
    assert len(score.calls) == 1 and any(b.status == "budget" for b in found)
    assert "budget of 1 spent" in [b for b in found if b.status == "budget"][0].reason


def test_a_band_an_earlier_search_already_scored_a_rung_in_costs_no_scoring():
    """The embedded model's ShortGPT (measured KL on PTB, quick-suite losses): the 0-4% search scores 15, 3 and 1
    layers; 1 layer (11.7%) answers 5-16% and 3 layers (23.6%) 17-26%, so 7 layers is never scored."""
    import numpy as np

    kl = lambda s: float(np.interp(s * 30, [0, 1, 2, 3, 4, 5, 7, 15, 30],  # noqa: E731
                                   [0, .150, .350, .376, .513, .682, 1.001, 6.235, 20.0]))
    loss = lambda s: float(np.interp(s * 30, [0, 1, 3, 7, 15, 30], [0, 11.7, 23.6, 35.0, 54.9, 70.0]))  # noqa: E731
    score = counted(loss)
    found, _ = find_bands(RUNGS, kl, score, budget=6)
    assert [b.status for b in found] == ["unreachable", "found", "found"]
    assert [round(b.sparsity * 30) for b in found[1:]] == [1, 3]
    assert sorted(round(s * 30) for s in score.calls) == [1, 3, 15]


def test_other_methods_scores_place_the_first_scoring_instead_of_the_middle_rung():
    kl, loss = curve()
    blind, informed = counted(loss), counted(loss)
    found_blind, _ = find_bands(RUNGS, kl, blind, budget=8)
    prior = [(kl(s), loss(s) + noise) for s, noise in ((0.2, 1.0), (0.5, -2.0), (0.45, 3.0))]  # not monotone
    found, _ = find_bands(RUNGS, kl, informed, budget=8, prior=prior)
    assert blind.calls[0] == RUNGS[len(RUNGS) // 2]  # no prior: the middle rung first
    assert loss(informed.calls[0]) < 5  # with one: a rung predicted (and found) in the first band
    assert [b.status for b in found] == [b.status for b in found_blind] == ["found"] * 3
    assert len(informed.calls) < len(blind.calls)


def test_the_prior_is_other_methods_kl_and_loss_at_the_same_seed():
    import pandas as pd

    from prunelib.run.targeting import _prior

    def row(method, s, metric, v, **e):
        return dict(model="m", method=method, sparsity=s, metric=metric, value=v, extra=e)

    df = pd.DataFrame([row("a", 0.25, "fidelity_kl", 1.0, domain="ptb"), row("a", 0.25, "quality_loss_pct", 30.0),
                       row("a", 0.25, "fidelity_kl", 0.9, domain="wikitext2"),
                       row("b", 0.1, "fidelity_kl", 0.3, domain="ptb", seed=1), row("b", 0.1, "quality_loss_pct", 9.0),
                       row("me", 0.1, "fidelity_kl", 0.2, domain="ptb"), row("me", 0.1, "quality_loss_pct", 5.0)])
    assert _prior(df, "m", "me", 0) == [(1.0, 30.0)]  # b's KL is of seed 1; my own rows are not a prior


def test_a_rerun_with_the_scores_of_the_first_takes_its_path_and_scores_nothing():
    """A rerun (to time what was found) once scored ShortGPT at 2 of 30 layers: the stored scores were read only
    when the search asked for them, so with fewer known points its predictions, and its path, differed."""
    kl, loss = curve()
    found, search = find_bands(RUNGS, kl, loss, budget=8)

    def never(s):
        raise AssertionError(f"scored {s} again")

    again, search2 = find_bands(RUNGS, kl, never, budget=8, prior=[(kl(0.3), 99.0)], known=dict(search.scored))
    assert [(b.status, b.sparsity) for b in again] == [(b.status, b.sparsity) for b in found]
    assert search2.scored == search.scored


def test_a_scoring_where_the_rule_did_not_run_confirms_no_band():
    """Sparse attention leaves the quick suite's short prompts dense: its loss there is the dense model's, so the
    search must stop and say so, not 'find' a 0-4% rung at its largest sparsity."""
    from prunelib.run.targeting import Inactive

    def score(s):
        raise Inactive(f"its rule shaped 0% of the quick suite's scored tokens at {s:g}")

    score = counted(score)
    found, search = find_bands([0.25, 0.5, 0.75], lambda s: 0.0, score, budget=6)
    assert [b.status for b in found] == ["inactive"] * 3 and len(score.calls) == 1 == search.scorings
    assert all("0% of the quick suite" in b.reason and b.sparsity is None for b in found)


def test_target_reads_the_active_share_of_each_stored_loss(tmp_path, monkeypatch, tiny_model):
    """target() on a store whose loss rows say the rule did not run: no band found, one stored row read as inactive
    (not re-scored), and those rows never enter another method's prior."""
    import pandas as pd

    import prunelib.model.models as models
    import prunelib.run.pipeline as pipeline
    from prunelib.core.store import ResultsStore
    from prunelib.run import targeting

    store = ResultsStore(tmp_path / "results.jsonl")
    monkeypatch.setattr(models, "load_model", lambda name, **kw: (tiny_model, None))
    runs = []

    def fake_run(model_name, methods, sparsities, *, preset=None, **kw):  # what pipeline.run stores, minus the work
        (method,), (s,) = methods, sparsities
        runs.append((method, s, preset))
        base = dict(model="m", cell="sparse_attention", method=method, sparsity=s, phase="quality", device="cpu",
                    dtype="float32", ci_low=None, ci_high=None, n=32)
        rows = [dict(base, metric="fidelity_kl", value=0.01 * s, config_hash=f"kl{s}", extra=dict(domain="ptb"))]
        if preset:
            rows.append(dict(base, metric="quality_loss_pct", value=0.3, config_hash=f"loss{s}",
                             extra=dict(active_share_scoring=0.0)))
        store.append(rows)
    monkeypatch.setattr(pipeline, "run", fake_run)
    found, search = targeting.target("m", "sparse_attn_block", budget=4, store=store)
    assert [b.status for b in found] == ["inactive"] * 3 and search.scorings == 1
    assert "ptb-long" in found[0].reason and not search.scored
    scored = [r for r in runs if r[2]]
    again, search2 = targeting.target("m", "sparse_attn_block", budget=4, store=store)  # the stored row is read
    assert [b.status for b in again] == ["inactive"] * 3 and [r for r in runs if r[2]] == scored
    assert targeting._prior(pd.DataFrame(store.load()), "m", "other", 0) == []
