"""The figures every notebook draws, from tables built the way the store and experiment.summary build them."""
import matplotlib
import pandas as pd
import pytest

from prunelib import experiment
from prunelib.results import pareto, plots


def store_rows(cell="static_k_24", method="sparse24_wanda", sparsities=(0.25, 0.5), realised=False):
    rows = []
    for k, s in enumerate(sparsities):
        extra = {"calibration": {"seed": 0}, "options": {}, "params": 1e8 * (1 - s)}
        if realised:
            extra["realised_sparsity"] = 0.8 * s
        base = dict(model="m", method=method, cell=cell, sparsity=s, device="cpu")
        for phase, sp in (("prefill", 1.1 + k * 0.3), ("decode", 1.05 + k * 0.1)):
            rows.append(base | dict(phase=phase, batch=1, length=512, metric="speedup", value=sp, ci_low=sp - 0.05,
                                    ci_high=sp + 0.04, bound=sp + 0.2, extra=extra))
        rows.append(base | dict(phase="quality", metric="quality_loss_pct", value=5.0 + 10 * k, ci_low=1.0 + 10 * k,
                                ci_high=12.0 + 10 * k, extra={"seed": 0, "options": {}, "stderr": 3.0}))
    return pd.DataFrame(rows)


@pytest.fixture(autouse=True)
def _no_backend_switch(monkeypatch):
    """plots must never pick a backend in a user's kernel."""
    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: pytest.fail("plots called matplotlib.use"))


def test_speedup_vs_bound_draws_measured_with_ci_and_bound(tmp_path):
    table = experiment.summary(store_rows())
    fig = plots.speedup_vs_bound(table, 1, 512, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000 and len(fig.axes) == 2
    prefill = fig.axes[0]
    (bars,) = prefill.containers  # one method: measured speedups with their CI
    assert list(bars.lines[0].get_ydata()) == pytest.approx([1.1, 1.4])
    bound = [line for line in prefill.lines if line.get_marker() == "x"][0]
    assert list(bound.get_ydata()) == pytest.approx([1.3, 1.6])
    assert "2:4" in prefill.get_xlabel() and "fraction 2s" in prefill.get_xlabel()


def test_speed_vs_loss_has_both_error_bars_and_none_without_quality(tmp_path):
    table = experiment.summary(store_rows())
    fig = plots.speed_vs_loss(table, tmp_path / "l.png")
    (bars,) = fig.axes[0].containers
    assert bars.has_xerr and bars.has_yerr and list(bars.lines[0].get_xdata()) == [5.0, 15.0]
    xerr = bars.lines[2][0].get_segments()  # the horizontal bars span the loss CI
    assert [tuple(seg[:, 0]) for seg in xerr] == [(1.0, 12.0), (11.0, 22.0)]
    timed_only = experiment.summary(store_rows().query("metric == 'speedup'"))
    assert plots.speed_vs_loss(timed_only) is None


def test_realised_vs_target(tmp_path):
    assert plots.realised_vs_target(experiment.summary(store_rows())) is None
    table = experiment.summary(store_rows("dynamic_depth", "dyn_depth_router", realised=True))
    fig = plots.realised_vs_target(table, tmp_path / "r.png")
    drawn = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].lines}
    assert drawn["dyn_depth_router, prefill"] == drawn["dyn_depth_router, decode"] == pytest.approx([0.2, 0.4])
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_pareto_figures_show_curves_both_uncertainties_and_honest_labels(tmp_path):
    pts = pareto.points(store_rows())
    pts = pts[pts.phase == "prefill"]
    fig = plots.pareto_static(pts, "t", tmp_path / "p.png")
    ax = fig.axes[0]
    bars = [c for c in ax.containers if getattr(c, "has_xerr", False)]
    assert len(bars) == 1 and bars[0].has_yerr
    assert [t.get_text() for t in ax.texts] == ["2:4 on 50% of the layers"]  # s=0.25; s=0.5 is every layer
    assert "quality loss" in ax.get_xlabel()
    labels = [line.get_label() for line in ax.lines]
    assert "frontier (best at loss <= L)" in labels and "dense" in labels
    ply = plots.pareto_plotly(pts, "t")
    trace = ply.data[0]
    assert list(trace.error_x.array) == [7.0, 7.0] and list(trace.error_x.arrayminus) == [4.0, 4.0]
    assert "2:4 on 50% of the layers" in trace.text[0] and "2:4 on every layer" in trace.text[1]
    assert "s=0.25" in trace.text[0] and "[" in trace.text[0]  # method, sparsity and both CIs on hover
    curve = ply.data[1]  # the method's isotonic curve starts at dense
    assert curve.x[0] == 0 and curve.y[0] == 1.0
    names = [d.name for d in ply.data]
    assert "frontier (best at loss <= L)" in names and "dense" in names
    front = [d for d in ply.data if d.name == "frontier (best at loss <= L)"][0]
    assert list(front.y) == sorted(front.y) and front.y[0] == 1.0  # a staircase: never down, from dense


def test_one_colour_per_cell_one_marker_per_criterion():
    pts = pd.DataFrame(dict(method=["shortgpt", "angular", "width_flap"],
                            cell=["static_depth", "static_depth", "static_width"]))
    s = plots._styles(pts)
    assert s["shortgpt"][0] == s["angular"][0] != s["width_flap"][0]
    assert s["shortgpt"][1] != s["angular"][1]


def test_memory_vs_loss_draws_stored_ratios_only(tmp_path):
    rows = store_rows()
    assert plots.memory_vs_loss(pareto.points(rows)) is None  # rows from before memory was measured
    for e, w in zip(rows.extra, (50.0, 50.0, None, 60.0, 60.0, None)):
        if w is not None:
            e.update(weight_bytes=w, weight_bytes_dense=100.0, mem_peak_bytes=2 * w, mem_peak_bytes_dense=400.0)
    pts = pareto.points(rows)
    assert sorted(set(pts.weight_ratio)) == [0.5, 0.6] and sorted(set(pts.mem_ratio)) == [0.25, 0.3]
    fig = plots.memory_vs_loss(pts, tmp_path / "m.png")
    drawn = {c.get_label(): list(c.lines[0].get_ydata()) for c in fig.axes[0].containers}
    assert drawn == {"sparse24_wanda, weights": [0.5, 0.6], "sparse24_wanda, decode peak": [0.25, 0.3]}
