"""Band targeting: per method, find the rungs of its ladder whose quality loss lands in each band, scoring as few
of them with the quick suite as it can (issue 23).

Fidelity (KL from the dense model on held-out text) costs seconds per model; the quick suite about a minute.
So the search bisects over the ladder on a *predicted* loss and confirms with the quick suite only where the
prediction falls in the band:

- the prediction maps a rung's KL to a loss by interpolating, in KL, between the rungs scored so far and dense
  (KL 0, loss 0), extrapolating the last segment beyond them; its prediction interval is that of a straight-line
  fit of loss on KL over the scored rungs (t-based, shown once three are scored); before the method's first
  scoring, other methods' (KL, loss) pairs on the same model (made monotone) place it, else the middle rung;
- loss is taken to grow with the rung (more pruned, more lost), so a confirmed loss below a band moves the
  search up the ladder and one above it moves it down; bands are searched in increasing order and share every
  score: a band that a rung scored earlier already lands in is found there (its largest such rung) at no cost;
- a band is ``found`` (a confirmed rung in it), ``unreachable`` (its smallest rung already loses more, its
  largest loses less, or two adjacent rungs straddle it: the reason names them), ``budget`` (the method's
  scoring budget ran out first), or ``inactive``: a scoring showed that the method's rule barely ran on the quick
  suite (sparse attention leaves prompts shorter than two blocks dense), so its loss there measures the dense
  model, not the method, and no band can be confirmed with it; the search stops and says so, rather than "finding"
  a 0-4% rung at any sparsity.

:func:`find_bands` is the search on two callables (tests give it a known loss curve); :func:`target` runs it on a
real model through :func:`prunelib.run.pipeline.run`, which stores every fidelity and quality row as usual.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from prunelib.results.curves import isotonic
from prunelib.results.pareto import ACTIVE_MIN, PAPER_BANDS, band_edges, inactive


class Inactive(Exception):
    """Raised by a ``score`` callable whose scoring showed the method's rule did not run where it scored."""


@dataclass
class Band:
    band: tuple
    status: str = "budget"  # found | unreachable | budget | inactive
    sparsity: float | None = None
    loss: float | None = None
    reason: str = ""


@dataclass
class Search:
    rungs: list
    kl: callable
    score: callable
    budget: int
    scored: dict = field(default_factory=dict)  # sparsity -> confirmed loss
    kls: dict = field(default_factory=dict)  # sparsity -> KL
    prior: tuple = ()  # (KL, loss) of other methods on the same model: the prediction before this one is scored
    inactive: dict = field(default_factory=dict)  # sparsity -> why its scoring does not measure the rule

    @property
    def scorings(self) -> int:
        """Quick-suite scorings spent: the confirmed losses and the ones that showed an inactive rule."""
        return len(self.scored) + len(self.inactive)

    def kl_of(self, s):
        if s not in self.kls:
            self.kls[s] = float(self.kl(s))
        return self.kls[s]

    def loss_of(self, s):
        if s not in self.scored:
            if self.scorings >= self.budget:
                return None
            try:
                self.scored[s] = float(self.score(s))
            except Inactive as e:
                self.inactive[s] = str(e)
                raise
        return self.scored[s]

    def predict(self, s) -> tuple[float, float]:
        """(predicted loss, prediction-interval half-width) of rung ``s``."""
        x = self.kl_of(s)
        if not self.scored and self.prior:  # nothing of this method scored yet: other methods' KL -> loss, made
            pts = sorted([(0.0, 0.0), *self.prior])  # monotone (loss grows with KL across methods: Spearman 0.93)
            xs = np.array([p[0] for p in pts])
            return float(np.interp(x, xs, isotonic([p[1] for p in pts]))), math.inf
        pts = sorted([(0.0, 0.0)] + [(self.kl_of(r), v) for r, v in self.scored.items()])
        xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
        if len(pts) == 1:
            return math.nan, math.inf
        if x <= xs[-1]:
            pred = float(np.interp(x, xs, ys))
        else:
            (x0, y0), (x1, y1) = pts[-2], pts[-1]
            pred = float(y1 + (y1 - y0) / (x1 - x0) * (x - x1)) if x1 > x0 else float(y1)
        return pred, _interval(xs[1:], ys[1:], x)


def _interval(xs, ys, x, level: float = 0.95) -> float:
    """Half-width of the prediction interval of a least-squares line of ys on xs at x (inf below 3 points)."""
    n = len(xs)
    if n < 3 or np.ptp(xs) == 0:
        return math.inf
    from scipy import stats

    b, a = np.polyfit(xs, ys, 1)
    resid = ys - (a + b * xs)
    s = math.sqrt(float(resid @ resid) / (n - 2))
    sxx = float(((xs - xs.mean()) ** 2).sum())
    return float(stats.t.ppf(0.5 + level / 2, n - 2) * s * math.sqrt(1 + 1 / n + (x - xs.mean()) ** 2 / sxx))


def find_bands(rungs, kl, score, bands=PAPER_BANDS, budget: int = 6, prior=(), known=None) -> tuple[list[Band], Search]:
    """Search ``rungs`` (ascending sparsities) for a rung whose loss ``score(s)`` lies in each band, using ``kl(s)``
    to predict; at most ``budget`` scorings, those in ``known`` (rung -> loss already scored, e.g. by an earlier
    run) included, which the search knows from the start, so a rerun takes the same path and scores nothing new.
    ``prior``: (KL, loss) pairs of other methods on the same model, which place the first scoring (else the middle
    rung). Returns one :class:`Band` per band, and the search."""
    rungs = sorted(rungs)
    if not rungs:
        raise ValueError("find_bands: no rungs to search")
    search = Search(rungs, kl, score, budget, scored={s: float(v) for s, v in (known or {}).items() if s in rungs},
                    prior=tuple(prior))
    out, floor = [], 0
    for band, (start, stop) in zip(map(tuple, bands), band_edges(bands)):
        res = Band(band)
        if search.inactive:  # the quick suite does not measure this method: no band can be confirmed
            res.status, res.reason = "inactive", next(iter(search.inactive.values()))
            out.append(res)
            continue
        lo, hi = floor, len(rungs) - 1
        done = [r for r in rungs[lo:] if r in search.scored and start <= search.scored[r] < stop]
        if done:  # an earlier band's search already scored a rung in this band: the largest such, no new scoring
            res.status, res.sparsity, res.loss = "found", done[-1], search.scored[done[-1]]
            floor = rungs.index(res.sparsity)
            out.append(res)
            continue
        while lo <= hi:
            idx = _bisect(search, lo, hi, start, stop)
            try:
                loss = search.loss_of(rungs[idx])
            except Inactive as e:
                res.status, res.reason = "inactive", str(e)
                break
            if loss is None:
                res.reason = f"scoring budget of {budget} spent"
                break
            if start <= loss < stop:
                res.status, res.sparsity, res.loss = "found", rungs[idx], loss
                break
            if loss < start:
                lo = idx + 1
            else:
                hi = idx - 1
        else:
            res.status = "unreachable"
            res.reason = _why(search, rungs, lo, start, stop)
        if res.status == "found":
            floor = rungs.index(res.sparsity)
        out.append(res)
    return out, search


def _bisect(search: Search, lo: int, hi: int, start: float, stop: float) -> int:
    """The rung in [lo, hi] to score next: one whose predicted loss lies in the band, found by bisection on the
    prediction; else the end of the range the prediction points to (the last rung below, the first above)."""
    a, b = lo, hi
    while a <= b:
        m = (a + b) // 2
        s = search.rungs[m]
        pred = search.scored[s] if s in search.scored else search.predict(s)[0]
        if math.isnan(pred):
            return m
        if pred < start:
            a = m + 1
        elif pred >= stop:
            b = m - 1
        else:
            return m
    return min(max(a, lo), hi) if a <= hi else hi


def _why(search: Search, rungs, lo: int, start: float, stop: float) -> str:
    below = [s for s in rungs[:lo] if s in search.scored]
    above = [s for s in rungs[lo:] if s in search.scored]
    fmt = "{:g} ({:.1f}%)".format
    if not below and above:
        return f"its smallest rung {fmt(above[0], search.scored[above[0]])} already loses more than {stop:g}%"
    if below and not above:
        return f"its largest rung {fmt(below[-1], search.scored[below[-1]])} loses less than {start:g}%"
    if below and above:
        return f"adjacent rungs straddle it: {fmt(below[-1], search.scored[below[-1]])} and " \
               f"{fmt(above[0], search.scored[above[0]])}"
    return "no rung scored"


def target(model_name: str, method: str, bands=PAPER_BANDS, *, budget: int = 6, seed: int = 0,
           store=None, preset: str = "quick", **run_kw) -> tuple[list[Band], Search]:
    """:func:`find_bands` on a real model: KL on PTB from :func:`prunelib.run.pipeline.run` (quality off), the loss
    from the same with the quick suite; every row lands in the store, so a rerun reads instead of measuring."""
    from prunelib.core.store import ResultsStore
    from prunelib.model.models import load_model
    from prunelib.pruning.registry import rungs
    from prunelib.results.summary import fidelity_domain
    from prunelib.run.pipeline import run

    store = ResultsStore() if store is None else store
    model, _ = load_model(model_name)
    ladder = rungs(method, model)
    del model

    def latest(s, metric, domain=None, df=None):
        """The latest stored ``metric`` row of this method at rung ``s`` and ``seed`` (on ``domain``), or None."""
        df = store.load() if df is None else df
        df = df[(df.model == model_name) & (df.method == method) & (df.metric == metric)]
        df = df.loc[np.array([abs(x - s) < 1e-9 for x in df.sparsity], bool)]
        df = df.loc[np.array([(e or {}).get("seed", 0) == seed and (domain is None or (e or {}).get("domain") == domain)
                              for e in df.extra], bool)]
        return df.iloc[-1] if len(df) else None

    def kl(s):
        if latest(s, "fidelity_kl", "ptb") is None:
            run(model_name, [method], [s], phases=(), preset=None, fidelity=True, seed=seed, store=store, **run_kw)
        return float(latest(s, "fidelity_kl", "ptb").value)

    def score(s):
        if latest(s, "quality_loss_pct") is None:
            run(model_name, [method], [s], phases=(), preset=preset, fidelity=True, seed=seed, store=store, **run_kw)
        r = latest(s, "quality_loss_pct")
        if r is None:  # nothing stored, even after scoring: fail loudly rather than searching on nothing
            raise RuntimeError(f"band targeting: no quality_loss_pct row for {method} at {s:g} after scoring it")
        if inactive(r.extra):
            domain = fidelity_domain(method)
            raise Inactive(f"its rule shaped {r.extra['active_share_scoring']:.0%} of the quick suite's scored tokens "
                           f"at {s:g} (fewer than {ACTIVE_MIN:.0%}), so its loss there measures the dense model, not "
                           f"the method; read it by its KL on {domain}: python -m prunelib.pareto --x kl --domain "
                           f"{domain}")
        return float(r.value)

    rows = store.load()  # once for every rung's stored score and the prior
    known = {s: float(r.value) for s in ladder
             if (r := latest(s, "quality_loss_pct", df=rows)) is not None and not inactive(r.extra)}
    return find_bands(ladder, kl, score, bands, budget, prior=_prior(rows, model_name, method, seed), known=known)


def _prior(df, model_name: str, method: str, seed: int) -> list:
    """(KL on PTB, quick-suite loss) of every other method's pruned model of ``model_name`` scored at ``seed``."""
    df = df[(df.model == model_name) & (df.method != method)]

    def table(metric, domain=None):
        d = df[df.metric == metric]
        keep = [(e or {}).get("seed", 0) == seed and (domain is None or (e or {}).get("domain") == domain)
                and not inactive(e) for e in d.extra]  # a loss where the rule did not run measures nothing
        d = d.loc[np.array(keep, bool)] if len(d) else d
        return {(m, round(float(s), 9)): float(v) for m, s, v in zip(d.method, d.sparsity, d.value)}

    kl, loss = table("fidelity_kl", "ptb"), table("quality_loss_pct")
    return [(kl[k], loss[k]) for k in sorted(set(kl) & set(loss)) if np.isfinite(kl[k]) and np.isfinite(loss[k])]

