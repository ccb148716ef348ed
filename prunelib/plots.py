"""Figures: interactive plotly (HTML) and static matplotlib/seaborn (PNG) into figures/."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .config import REPO_ROOT


def figures_dir() -> Path:
    import os

    d = Path(os.environ.get("PRUNELIB_FIGURES", REPO_ROOT / "figures"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def pareto_plotly(pts: pd.DataFrame, front: pd.DataFrame, title: str):
    """Measured speedup (95% CI bars) against quality loss; frontier as a line; roofline bound as open markers."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for method, g in pts.groupby("method"):
        fig.add_trace(go.Scatter(
            x=g.loss, y=g.speedup, mode="markers", name=method,
            error_y=dict(type="data", symmetric=False, array=g.ci_high - g.speedup, arrayminus=g.speedup - g.ci_low),
            error_x=dict(type="data", symmetric=False, array=g.loss_high - g.loss, arrayminus=g.loss - g.loss_low),
            text=[f"{method} s={s:.2f}<br>bound {b:.2f}x" for s, b in zip(g.sparsity, g.bound)]))
        fig.add_trace(go.Scatter(x=g.loss, y=g.bound, mode="markers", marker_symbol="circle-open",
                                 name=f"{method} (bound)", legendgroup=method, showlegend=False, opacity=0.5))
    fig.add_trace(go.Scatter(x=front.loss, y=front.speedup, mode="lines", name="frontier", line=dict(dash="dash")))
    fig.add_hline(y=1.0, line_dotted=True) if hasattr(fig, "line_dotted") else fig.add_hline(y=1.0, line_dash="dot")
    fig.update_layout(title=title, xaxis_title="quality loss (%), mean relative drop of chosen accuracies",
                      yaxis_title="measured speedup over dense (x)", template="plotly_white")
    return fig


def pareto_static(pts: pd.DataFrame, front: pd.DataFrame, title: str, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.scatterplot(data=pts, x="loss", y="speedup", hue="method", style="cell", s=70, ax=ax)
    ax.errorbar(pts.loss, pts.speedup, yerr=[pts.speedup - pts.ci_low, pts.ci_high - pts.speedup], fmt="none",
                ecolor="gray", alpha=0.6)
    ax.scatter(pts.loss, pts.bound, marker="x", color="black", alpha=0.4, label="roofline bound")
    ax.plot(front.loss, front.speedup, "--", color="black", label="frontier")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xlabel="quality loss (%) vs dense", ylabel="measured speedup (x)", title=title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_plotly(fig, name: str) -> Path:
    path = figures_dir() / f"{name}.html"
    fig.write_html(path, include_plotlyjs="directory")  # plotly.min.js beside it: the folder works offline
    return path
