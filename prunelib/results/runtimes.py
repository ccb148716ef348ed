"""The runtime axis over stored rows: which runtime timed a row, and the "method x runtime" table.

A speed row names its runtime in ``extra.runtime`` (``"pytorch"`` or ``"llama.cpp"``); rows stored before the
field existed are PyTorch's. llama.cpp rows carry ``timing_mode = "llama.cpp <export dtype>"``, so every table
and figure keyed by timing mode (the Pareto figures, the band tables) draws one frontier per runtime.
"""
from __future__ import annotations

import pandas as pd

from prunelib.results.pareto import options_key

DEFAULT = "pytorch"


def runtime_of(extra) -> str:
    """The runtime of a stored row from its ``extra`` (PyTorch when it names none)."""
    return (extra or {}).get("runtime", DEFAULT) if isinstance(extra, dict) else DEFAULT


def with_runtime(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a ``runtime`` column read from each row's extra."""
    return df.assign(runtime=[runtime_of(e) for e in df.extra]) if len(df) else df.assign(runtime=[])


def for_runtime(df: pd.DataFrame, runtime: str = DEFAULT) -> pd.DataFrame:
    """The rows a table of one runtime reads: that runtime's speed and loadability rows, every other row
    (quality, fidelity: measured on the PyTorch model, the same for every runtime)."""
    timed = df.metric.isin(["speedup", "loadable"])
    keep = ~timed | pd.Series([runtime_of(e) == runtime for e in df.extra], index=df.index, dtype=bool)
    return df[keep]


def method_runtime_table(df: pd.DataFrame, length: int = 512, batch: int = 1) -> pd.DataFrame:
    """One line per (method, sparsity, runtime, timing mode): ``loadable`` (yes / no, and why not), the prefill
    and decode speedups over dense with their 95% CIs, the roofline bound and efficiency = measured / bound,
    at prompt / KV length ``length``. A method llama.cpp cannot load has a line with its reason and no speeds."""
    df = with_runtime(df)
    sp = df[(df.metric == "speedup") & (df.length == length) & (df.batch == batch)]
    load = df[df.metric == "loadable"]
    rows = {}

    def line(r, mode):
        # keyed by the prune options too: width at 10% unrounded (1382 MLP channels) and rounded to 64 (1408) are
        # two models, and llama.cpp's prefill was 0.54x on the first, 1.04x on the second (docs/RESULTS.md)
        options = options_key(r.extra)
        return rows.setdefault((r.method, float(r.sparsity), options, r.runtime, mode),
                               {"method": r.method, "sparsity": float(r.sparsity), "options": options,
                                "runtime": r.runtime, "timing_mode": mode, "loadable": "yes"})

    for r in sp.itertuples():
        row = line(r, r.extra.get("timing_mode", "eager"))
        row[f"{r.phase}_speedup"] = r.value
        row[f"{r.phase}_ci_low"], row[f"{r.phase}_ci_high"] = r.ci_low, r.ci_high
        row[f"{r.phase}_bound"] = r.bound
        row[f"{r.phase}_efficiency"] = r.value / r.bound if r.bound else float("nan")
        row["threads"] = r.extra.get("threads")  # older PyTorch rows did not record it: none shown
    for r in load.itertuples():
        mode = f"{r.runtime} {r.dtype}"
        row = line(r, mode)
        if not r.value:
            row["loadable"] = "no: " + r.extra.get("reason", "")
    cols = ["method", "sparsity", "options", "runtime", "timing_mode", "loadable", "threads"] + [
        f"{p}_{k}" for p in ("prefill", "decode") for k in ("speedup", "ci_low", "ci_high", "bound", "efficiency")]
    out = pd.DataFrame(list(rows.values()))
    if out.empty:
        return pd.DataFrame(columns=cols)
    out = out[[c for c in cols if c in out]].sort_values(["method", "sparsity", "options", "runtime"])
    if (out.options == "{}").all():  # no prune options anywhere: the column says nothing
        out = out.drop(columns="options")
    return out.reset_index(drop=True)


def agreement(table: pd.DataFrame, base: str = DEFAULT) -> pd.DataFrame:
    """Where the runtimes agree: per (method, sparsity, phase) and each other runtime's timing mode, both
    speedups with their 95% CIs, their ratio, and ``verdict``: ``agree`` when the two CIs overlap, ``differ``
    when they do not, ``not loadable`` when the other runtime cannot load the model (from
    :func:`method_runtime_table`)."""
    out = []
    table = table if "options" in table else table.assign(options="{}")
    for (method, sparsity, options), g in table.groupby(["method", "sparsity", "options"], sort=True):
        ref = g[g.runtime == base]
        a = ref.iloc[0] if len(ref) else {}
        for r in g[g.runtime != base].to_dict("records"):
            for phase in ("prefill", "decode"):
                row = {"method": method, "sparsity": sparsity, **({} if options == "{}" else {"options": options}),
                       "phase": phase, "runtime": r["timing_mode"]}
                row.update({f"{base}_{k}": a.get(f"{phase}_{k}") for k in ("speedup", "ci_low", "ci_high")})
                if not str(r["loadable"]).startswith("yes"):
                    out.append(dict(row, verdict="not loadable", why=r["loadable"]))
                    continue
                other = {k: r.get(f"{phase}_{k}") for k in ("speedup", "ci_low", "ci_high", "bound")}
                if any(v is None or pd.isna(v) for v in (other["speedup"], row[f"{base}_speedup"])):
                    continue
                overlap = row[f"{base}_ci_low"] <= other["ci_high"] and other["ci_low"] <= row[f"{base}_ci_high"]
                out.append(dict(row, other_speedup=other["speedup"], other_ci_low=other["ci_low"],
                                other_ci_high=other["ci_high"], ratio=other["speedup"] / row[f"{base}_speedup"],
                                bound=other["bound"], verdict="agree" if overlap else "differ"))
    return pd.DataFrame(out)


def plot_agreement(agree: pd.DataFrame, path=None):
    """Each runtime's speedup (with its CI) against PyTorch's, one point per (method, sparsity) and a panel per
    phase; the diagonal is where they agree. Saved to ``path`` when given; returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    pts = agree[agree.verdict.isin(["agree", "differ"])] if len(agree) else agree
    for ax, phase in zip(axes, ("prefill", "decode")):
        g = pts[pts.phase == phase] if len(pts) else pts
        for r in g.to_dict("records"):
            x, y = r[f"{DEFAULT}_speedup"], r["other_speedup"]
            ax.errorbar(x, y, xerr=[[max(0.0, x - r[f"{DEFAULT}_ci_low"])], [max(0.0, r[f"{DEFAULT}_ci_high"] - x)]],
                        yerr=[[max(0.0, y - r["other_ci_low"])], [max(0.0, r["other_ci_high"] - y)]], fmt="o",
                        color="tab:green" if r["verdict"] == "agree" else "tab:red", capsize=2)
            ax.annotate(f"{r['method']} {r['sparsity']:g}", (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        lim = [0.8, max([1.6] + [v for v in (list(g.other_speedup) + list(g[f"{DEFAULT}_speedup"]) if len(g) else [])])]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set(title=f"{phase}: green = CIs overlap, red = differ", xlabel="speedup in PyTorch (eager)",
               ylabel="speedup in the other runtime")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig
