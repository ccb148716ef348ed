"""``python -m prunelib.pareto``: every shape's frontier and the best method per quality-loss band (ties named),
read from the results store. The frontier logic is :mod:`prunelib.results.pareto`."""
from __future__ import annotations

import argparse

import pandas as pd

from prunelib.core.store import ResultsStore
from prunelib.model.models import EMBEDDED
from prunelib.results.bands import band_table
from prunelib.results.curves import read_at
from prunelib.results.headline import headline
from prunelib.results.pareto import DOMAINS, FINE_BANDS, PAPER_BANDS, X_METRICS, best_per_band, frontier, points


def main(argv=None):
    p = argparse.ArgumentParser(description="the acceleration-quality frontier and the best method per quality band "
                                            "(ties named), read from the results store")
    p.add_argument("--model", default=EMBEDDED)
    p.add_argument("--x", default="loss", choices=sorted(X_METRICS), help="quality axis (bands need 'loss')")
    p.add_argument("--domain", default="ptb", choices=DOMAINS, help="held-out text of the fidelity axes")
    p.add_argument("--fine", action="store_true", help=f"the fine bands {FINE_BANDS} instead of the paper's {PAPER_BANDS}")
    a = p.parse_args(argv)
    df = ResultsStore().load()
    df = df[df.model == a.model]
    pts = points(df, a.x, a.domain)
    if pts.empty:
        print(f"no timed model of {a.model!r} has a quality row yet: run python -m prunelib.experiment first")
        return
    cols = ["phase", "batch", "length", "timing_mode", "method", "sparsity", "speedup", "ci_low", "ci_high", "bound",
            "loss", "loss_low", "loss_high"]
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_rows", 500,
                           "display.max_colwidth", 90):
        print("frontier (points no other point beats on both CIs):")
        print(frontier(pts)[cols].round(3).to_string(index=False))
        if a.x == "loss":
            chosen = FINE_BANDS if a.fine else PAPER_BANDS
            t = best_per_band(pts, chosen)
            print("\nbest per quality-loss band (winners: the fastest and every point whose speedup CI overlaps it):")
            print(t.drop(columns=[c for c in ("device", "label") if c in t]).round(3).to_string(index=False))
            p = band_table(df, pts, chosen)
            print("\neach band with a probability (P(best) over joint draws of timing pairs and documents; the answer "
                  "is the winner at P >= 0.8, else the smallest set holding 0.8, a tie):")
            print(p.drop(columns=["p", "device"]).round(3).to_string(index=False))
            print("\neach method's speedup read off its curve:")
            print(read_at(pts).round(3).to_string(index=False))
            print("\nthe paper's headline, point by point:")
            print(headline(p if chosen == PAPER_BANDS else band_table(df, pts, PAPER_BANDS), pts).to_string(index=False))


if __name__ == "__main__":
    main()
