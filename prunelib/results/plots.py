"""Figures: interactive plotly (HTML) and static matplotlib/seaborn (PNG) into figures/.

The static figures are built on :class:`matplotlib.figure.Figure` objects, never through
pyplot's global state, so nothing here picks a backend in a user's kernel: a notebook
cell that ends with one of these calls shows the figure once, a script just saves it.

- :func:`pareto_figures`: every Pareto figure of a set of points (from
  :func:`prunelib.results.pareto.points`), one per shape, via :func:`pareto_plotly` and
  :func:`pareto_static`; both uncertainties as error bars.
- :func:`memory_vs_loss`: weights and peak memory relative to dense against quality cost.
- :func:`speedup_vs_bound`, :func:`speed_vs_loss`, :func:`realised_vs_target`: the three
  figures every axis notebook draws from ``experiment.summary``'s table.
"""
from __future__ import annotations

import itertools
import os
import textwrap
from pathlib import Path

import pandas as pd

from prunelib.core.config import REPO_ROOT
from prunelib.cost.taxonomy import CELLS


def figures_dir() -> Path:
    d = Path(os.environ.get("PRUNELIB_FIGURES", REPO_ROOT / "figures"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _figure(*size):
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def _save(fig, path):
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _err(mid: pd.Series, low: pd.Series, high: pd.Series):
    """Asymmetric error-bar lengths (never negative; a missing CI draws no bar)."""
    return [(mid - low).clip(lower=0).fillna(0).to_numpy(), (high - mid).clip(lower=0).fillna(0).to_numpy()]


def _ci(g: pd.DataFrame, phase: str):
    """The (low, high) speedup CI columns of a summary table (stored there as "[low, high]")."""
    ci = g[f"{phase}_ci"].str.strip("[]").str.split(", ", expand=True).astype(float)
    return ci[0], ci[1]


def _sparsity_axis(table: pd.DataFrame) -> str:
    cells = set(table.cell) & set(CELLS)
    unit = CELLS[cells.pop()].unit if len(cells) == 1 else "the cell's unit"
    return "\n".join(textwrap.wrap(f"sparsity: fraction removed of {unit}", 70))


PLOTLY_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                  "#17becf"]
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")
PLOTLY_MARKERS = ("circle", "square", "diamond", "triangle-up", "triangle-down", "cross", "x", "star")


def _styles(pts: pd.DataFrame) -> dict:
    """Per method: (colour index of its cell, marker index among its cell's methods): one colour per cell, one
    marker per criterion."""
    out = {}
    for cell, g in pts.groupby("cell"):
        for k, m in enumerate(sorted(set(g.method))):
            out[m] = (sorted(CELLS).index(cell) if cell in CELLS else 9, k % len(MARKERS))
    return out


def pareto_plotly(pts: pd.DataFrame, title: str):
    """One shape's curves: per method its rungs with both 95% CIs as error bars, joined by the isotonic curve
    (:mod:`prunelib.results.curves`), its roofline bound as a faint dotted curve; dense at (0, 1); the frontier as
    the staircase of the best speedup reachable at loss <= L. Hover: method, what s removes, both CIs."""
    import plotly.graph_objects as go

    from prunelib.results.curves import envelope, method_curve, staircase_xy
    from prunelib.results.pareto import x_label

    fig = go.Figure()
    styles = _styles(pts)
    for method, g in pts.groupby("method"):
        colour, marker = PLOTLY_COLOURS[styles[method][0]], PLOTLY_MARKERS[styles[method][1]]
        c = method_curve(g)
        g = g.sort_values("loss")
        fig.add_trace(go.Scatter(
            x=g.loss, y=g.speedup, mode="markers", name=method, legendgroup=method,
            marker=dict(color=colour, symbol=marker, size=9),
            error_y=dict(type="data", symmetric=False, array=_err(g.speedup, g.ci_low, g.ci_high)[1],
                         arrayminus=_err(g.speedup, g.ci_low, g.ci_high)[0], color=colour),
            error_x=dict(type="data", symmetric=False, array=_err(g.loss, g.loss_low, g.loss_high)[1],
                         arrayminus=_err(g.loss, g.loss_low, g.loss_high)[0], color=colour),
            text=[f"{method} s={s:g} ({lab})<br>speedup {v:.2f}x [{lo:.2f}, {hi:.2f}], bound {b:.2f}x<br>"
                  f"x {x:.3g} [{xl:.3g}, {xh:.3g}] ({ci})"
                  for s, lab, v, lo, hi, b, x, xl, xh, ci in zip(g.sparsity, g.label, g.speedup, g.ci_low, g.ci_high,
                                                                 g.bound, g.loss, g.loss_low, g.loss_high, g.ci_method)],
            hoverinfo="text"))
        fig.add_trace(go.Scatter(x=c.loss, y=c.fit, mode="lines", line=dict(color=colour, width=1.5),
                                 legendgroup=method, showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=c.loss, y=c.bound, mode="lines", line=dict(color=colour, width=1, dash="dot"),
                                 opacity=0.35, legendgroup=method, showlegend=False, hoverinfo="skip"))
    env = envelope(pts)
    xs, ys = staircase_xy(env, float(pts.loss.max()) if len(pts) else 0.0)
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="frontier (best at loss <= L)",
                             line=dict(color="black", dash="dash", shape="linear")))
    fig.add_trace(go.Scatter(x=[0], y=[1], mode="markers", name="dense", marker=dict(color="black", size=10),
                             hovertext=["dense: 1.0x at 0 loss"], hoverinfo="text"))
    fig.update_layout(title=title, xaxis_title=x_label(pts), yaxis_title="measured speedup over dense (x), 95% CI",
                      template="plotly_white")
    return fig


def pareto_static(pts: pd.DataFrame, title: str, path: Path | None = None):
    """The same figure as a PNG: one colour per cell, one marker per criterion, both CIs as error bars, each
    method's isotonic curve, its bound faint, the staircase frontier and dense; 2:4 on a fraction of the layers
    is written beside its point."""
    from prunelib.results.curves import envelope, method_curve, staircase_xy
    from prunelib.results.pareto import x_label

    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    styles = _styles(pts)
    for method, g in pts.groupby("method"):
        colour, marker = f"C{styles[method][0]}", MARKERS[styles[method][1]]
        c = method_curve(g)
        ax.errorbar(g.loss, g.speedup, yerr=_err(g.speedup, g.ci_low, g.ci_high),
                    xerr=_err(g.loss, g.loss_low, g.loss_high), fmt=marker, color=colour, ecolor=colour, alpha=0.85,
                    lw=0.8, capsize=2, label=method)
        ax.plot(c.loss, c.fit, "-", color=colour, lw=1.2)
        ax.plot(c.loss, c.bound, ":", color=colour, lw=0.8, alpha=0.35)
    for r in pts[(pts.cell == "static_k_24") & (pts.sparsity < 0.5)].itertuples():
        ax.annotate(r.label.split(": ", 1)[-1], (r.loss, r.speedup), fontsize=6, xytext=(4, -8),
                    textcoords="offset points")
    xs, ys = staircase_xy(envelope(pts), float(pts.loss.max()) if len(pts) else 0.0)
    ax.plot(xs, ys, "--", color="black", lw=1, label="frontier (best at loss <= L)")
    ax.plot([0], [1], "o", color="black", label="dense")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xlabel=x_label(pts), ylabel="measured speedup (x), 95% CI; dotted: bound", title=title)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def pareto_figures(pts: pd.DataFrame, title: str) -> dict:
    """One Pareto figure per (phase, batch, length, timing mode) of ``pts``, each saved as
    ``figures/pareto_<phase>_B<b>_S<s>[_<mode>][_<x>].html|png``; returns the plotly figures by that key."""
    from prunelib.results.pareto import X_METRICS

    short = {metric: x for x, metric in X_METRICS.items()}
    figs = {}
    for (phase, b, s, mode), g in pts.groupby(["phase", "batch", "length", "timing_mode"]):
        x = short[g.x_metric.iloc[0]]
        name = f"pareto_{phase}_B{b}_S{s}" + ("" if mode == "eager" else f"_{mode}") + ("" if x == "loss" else f"_{x}")
        head = f"{title}: {phase}, B={b}, S={s}, {mode} timing"
        figs[(phase, b, s, mode)] = pareto_plotly(g, head)
        save_plotly(figs[(phase, b, s, mode)], name)
        pareto_static(g, head, figures_dir() / f"{name}.png")
    return figs


def curves_vs_random(df: pd.DataFrame, methods, batch: int, length: int, phase: str = "prefill", title: str = ""):
    """An axis notebook's curves: each of ``methods`` and its random baseline across their rungs at one shape
    (speedup against quality loss, both CIs, isotonic curves, dense and the staircase), as plotly; against KL on
    held-out text where no quality loss was scored; the PNG twin is saved as ``figures/curves_<methods>_<phase>.png``.
    None when nothing is both timed and scored."""
    from prunelib.pruning import REGISTRY
    from prunelib.results.pareto import points

    wanted = set(methods) | {REGISTRY[m].baseline for m in methods if m in REGISTRY and REGISTRY[m].baseline}
    for x in ("loss", "kl"):  # the quick-suite loss where scored, else KL from dense on held-out text
        pts = points(df, x)
        pts = pts[pts.method.isin(wanted) & (pts.phase == phase) & (pts.batch == batch) & (pts.length == length)]
        if len(pts):
            break
    if pts.empty:
        return None
    mode = sorted(set(pts.timing_mode))[0]
    pts = pts[pts.timing_mode == mode]
    head = title or f"{', '.join(sorted(methods))} against random: {phase}, B={batch}, S={length}, {mode} timing"
    pareto_static(pts, head, figures_dir() / f"curves_{'_'.join(sorted(methods))[:60]}_{phase}.png")
    return pareto_plotly(pts, head)


def memory_vs_loss(pts: pd.DataFrame, path: Path | None = None):
    """Memory relative to dense against quality cost (with its CI): weight bytes (o) and the peak
    measured in decode (x, one per batch and length); None when no memory was stored."""
    from prunelib.results.pareto import x_label

    weights = pts.dropna(subset=["weight_ratio"]).drop_duplicates(["method", "sparsity", "seed", "options"])
    peak = pts[pts.phase == "decode"].dropna(subset=["mem_ratio"])
    if weights.empty and peak.empty:
        return None
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    colours = dict(zip(sorted(set(pts.method)), itertools.cycle(f"C{i}" for i in range(10))))
    for data, col, marker, what in ((weights, "weight_ratio", "o", "weights"), (peak, "mem_ratio", "x", "decode peak")):
        for method, g in data.groupby("method"):
            ax.errorbar(g.loss, g[col], xerr=_err(g.loss, g.loss_low, g.loss_high), fmt=marker, color=colours[method],
                        capsize=2, label=f"{method}, {what}")
    ax.axhline(1, color="gray", lw=0.8)
    ax.set(xlabel=x_label(pts), ylabel="memory / dense memory", title="what pruning saves in memory")
    ax.legend(fontsize=7)
    return _save(fig, path)


def speedup_vs_bound(table: pd.DataFrame, batch: int, length: int, path: Path | None = None):
    """Per phase: each method's measured speedup (o, with its CI) and roofline bound (x) against sparsity."""
    phases = [p for p in ("prefill", "decode") if f"{p}_speedup" in table]
    fig = _figure(5 * max(len(phases), 1), 3.9)
    for k, phase in enumerate(phases):
        ax = fig.add_subplot(1, len(phases), k + 1)
        for method, g in table.dropna(subset=[f"{phase}_speedup"]).groupby("method"):
            g = g.sort_values("sparsity")
            line = ax.errorbar(g.sparsity, g[f"{phase}_speedup"], yerr=_err(g[f"{phase}_speedup"], *_ci(g, phase)),
                               fmt="o-", capsize=3, label=method)
            ax.plot(g.sparsity, g[f"{phase}_bound"], "x--", color=line.lines[0].get_color(), alpha=0.6)
        ax.axhline(1, color="gray", lw=0.8)
        ax.set(title=f"{phase}, B={batch}, S={length}: measured (o) and bound (x)", xlabel=_sparsity_axis(table),
               ylabel="speedup over dense (x)")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def speed_vs_loss(table: pd.DataFrame, path: Path | None = None, phase: str = "prefill"):
    """Measured ``phase`` speedup against quality loss, both with their 95% CIs; None when nothing was scored
    or timed."""
    cols = {f"{phase}_speedup", "quality_loss_pct"}
    if not cols <= set(table) or table.dropna(subset=list(cols)).empty:
        return None
    t = table.dropna(subset=list(cols))
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    for method, g in t.groupby("method"):
        ax.errorbar(g.quality_loss_pct, g[f"{phase}_speedup"], yerr=_err(g[f"{phase}_speedup"], *_ci(g, phase)),
                    xerr=_err(g.quality_loss_pct, g.loss_low, g.loss_high), fmt="o", capsize=3, label=method)
        for s, x, y in zip(g.sparsity, g.quality_loss_pct, g[f"{phase}_speedup"]):
            ax.annotate(f"s={s:g}", (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axhline(1, color="gray", lw=0.8)
    ax.set(xlabel="quality loss (%) vs dense, 95% CI", ylabel=f"{phase} speedup (x), 95% CI",
           title=f"{phase} speedup against quality loss")
    ax.legend(fontsize=7)
    return _save(fig, path)


def realised_vs_target(table: pd.DataFrame, path: Path | None = None):
    """A dynamic method's realised sparsity (counted while timing) against its target; None when none is stored."""
    cols = [c for c in table if c.endswith("_realised")]
    if not cols:
        return None
    fig = _figure(5.5, 4)
    ax = fig.add_subplot()
    markers = itertools.cycle("osd^v<>ph8*")
    for method, col in [(m, c) for m in sorted(set(table.method)) for c in cols]:
        g = table[table.method == method].dropna(subset=[col])
        ax.plot(g.sparsity, g[col], next(markers), label=f"{method}, {col.removesuffix('_realised')}")
    ax.axline((0, 0), slope=1, color="gray", lw=0.8)
    ax.set(xlabel="target sparsity", ylabel="realised sparsity, counted while timing", title="realised against target")
    ax.legend(fontsize=7)
    return _save(fig, path)


def save_plotly(fig, name: str) -> Path:
    path = figures_dir() / f"{name}.html"
    fig.write_html(path, include_plotlyjs="directory")  # plotly.min.js beside it: the folder works offline
    return path
