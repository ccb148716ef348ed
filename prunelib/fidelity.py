"""``python -m prunelib.fidelity``: the quality/fidelity table of every method (quick-suite loss with its
paired CI, KL and NLL change on held-out text with CIs), and ``--measure`` to score what is missing first.
The measurement itself is :mod:`prunelib.measure.fidelity`."""
from __future__ import annotations

import argparse

import pandas as pd

from prunelib.core.store import ResultsStore
from prunelib.experiment import run
from prunelib.measure.fidelity import DOMAINS  # noqa: F401
from prunelib.model.models import EMBEDDED
from prunelib.pruning import REGISTRY


def table_sparsity(method: str) -> float:
    """The closing table's sparsity of ``method``: 10% for static width methods, 25% for every other."""
    from prunelib.pruning import get

    return 0.1 if get(method).cell.name == "static_width" else 0.25


def closing_table(df: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """One line per method at its :func:`table_sparsity`: quick-suite loss (se, paired CI), KL and ΔNLL per domain.

    Reads the store only (the latest row per method for ``seed``); seconds are as stored:
    the quick suite's scoring time and the fidelity time (both domains) of the pruned model.
    """
    def rows(metric):
        r = df[df.metric == metric]
        keep = [isinstance(e, dict) and e.get("seed", 0) == seed and s == table_sparsity(m)
                for e, m, s in zip(r.extra, r.method, r.sparsity)]
        return r[pd.Series(keep, index=r.index, dtype=bool)]

    out = {}
    for r in rows("quality_loss_pct").itertuples():
        out[r.method] = {"method": r.method, "cell": r.cell, "sparsity": r.sparsity, "loss_pct": r.value,
                         "se_unpaired": r.extra.get("stderr"), "ci_low": r.ci_low, "ci_high": r.ci_high,
                         "ci_method": r.extra.get("ci_method", "unpaired"), "quality_s": r.extra.get("seconds")}
    for metric, short in (("fidelity_kl", "kl"), ("fidelity_dnll", "dnll")):
        for r in rows(metric).itertuples():
            d = r.extra["domain"]
            line = out.setdefault(r.method, {"method": r.method, "cell": r.cell, "sparsity": r.sparsity})
            line.update({f"{short}_{d}": r.value, f"{short}_{d}_low": r.ci_low, f"{short}_{d}_high": r.ci_high})
            if short == "kl":
                line[f"fidelity_s_{d}"] = r.extra.get("seconds")
    t = pd.DataFrame(list(out.values()))
    if len(t):
        t["fidelity_s"] = t.filter(like="fidelity_s_").sum(axis=1, min_count=1)
        t = t.drop(columns=list(t.filter(like="fidelity_s_"))).sort_values(["cell", "method"]).reset_index(drop=True)
    return t


def spearman(t: pd.DataFrame, x: str = "kl_ptb", y: str = "loss_pct") -> tuple[float, int]:
    """Spearman rank correlation of two columns of :func:`closing_table` over the methods having both, and n."""
    both = t[[x, y]].dropna() if x in t and y in t else pd.DataFrame(columns=[x, y])
    if len(both) < 3:
        return float("nan"), len(both)
    return float(both[x].rank().corr(both[y].rank())), len(both)


def _fmt(t: pd.DataFrame) -> pd.DataFrame:
    """The closing table as printed: CIs as [low, high] strings."""
    f = pd.DataFrame({"method": t.method, "s": t.sparsity})
    if "loss_pct" in t:
        f["loss %"] = t.loss_pct.round(1)
        f["se (unpaired)"] = t.se_unpaired.round(1)
        f["paired 95% CI"] = [f"[{a:.1f}, {b:.1f}]" if pd.notna(a) else "" for a, b in zip(t.ci_low, t.ci_high)]
        f["ci"] = t.ci_method
    for col in ("kl_ptb", "dnll_ptb", "kl_wikitext2", "dnll_wikitext2"):
        if col in t:
            f[col] = [f"{v:.3f} [{a:.3f}, {b:.3f}]" if pd.notna(v) else ""
                      for v, a, b in zip(t[col], t[f"{col}_low"], t[f"{col}_high"])]
    for col in ("quality_s", "fidelity_s"):
        if col in t:
            f[col] = t[col].round(1)
    return f


def main(argv=None):
    p = argparse.ArgumentParser(description="the quality/fidelity table: every method at 25%% (width at 10%%): "
                                            "quick-suite loss with its paired CI, KL and NLL change with CIs")
    p.add_argument("--model", default=EMBEDDED)
    p.add_argument("--measure", default=None, metavar="METHODS",
                   help="score what is missing first: 'static', 'dynamic', 'all' or comma-separated names")
    p.add_argument("--preset", default="quick", help="quality preset of --measure; 'none': fidelity only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", action="store_true", help="print the stored table (the default when not measuring)")
    a = p.parse_args(argv)
    if a.measure:
        groups = {"all": sorted(REGISTRY), "static": sorted(m for m in REGISTRY if REGISTRY[m].cell.static),
                  "dynamic": sorted(m for m in REGISTRY if not REGISTRY[m].cell.static)}
        names = groups.get(a.measure) or a.measure.split(",")
        unknown = [m for m in names if m not in REGISTRY]
        if unknown:
            p.error(f"--measure: unknown methods {unknown}; allowed: static, dynamic, all or {sorted(REGISTRY)}")
        for sparsity in (0.1, 0.25):
            chosen = [m for m in names if table_sparsity(m) == sparsity]
            if chosen:
                run(a.model, chosen, [sparsity], phases=(), preset=None if a.preset == "none" else a.preset,
                    seed=a.seed)
    df = ResultsStore().load()
    t = closing_table(df[df.model == a.model], a.seed)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_rows", 200):
        print(_fmt(t).to_string(index=False) if len(t) else "nothing stored yet: run with --measure")
    for x in ("kl_ptb", "dnll_ptb", "kl_wikitext2"):
        rho, n = spearman(t, x)
        print(f"Spearman({x}, quick-suite loss) = {rho:.3f} over {n} methods")


if __name__ == "__main__":
    main()
