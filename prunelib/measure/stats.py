"""Timing statistics: a :class:`Latency` keeps its raw samples; a speedup is the median of per-pair
ratios with a bootstrap CI (:func:`paired_ratio_ci`), held in a :class:`Comparison`."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np



@dataclass
class Latency:
    """Raw samples (seconds) and their summary. The median is the headline number."""

    samples: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples, q))

    @property
    def p10(self) -> float:
        return self.percentile(10)

    @property
    def p90(self) -> float:
        return self.percentile(90)

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples))

    @property
    def std(self) -> float:
        return float(np.std(self.samples, ddof=1)) if self.n > 1 else 0.0

    def summary(self) -> dict:
        return {"n": self.n, "median": self.median, "p10": self.p10, "p90": self.p90, "mean": self.mean, "std": self.std}



def bootstrap_ratio_ci(base: list[float], cand: list[float], *, n_boot: int = 2000, level: float = 0.95, seed: int = 0):
    """Bootstrap CI of median(base) / median(cand) for independent samples (the speedup of ``cand``)."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(base), np.asarray(cand)
    ia = rng.integers(0, len(a), (n_boot, len(a)))
    ib = rng.integers(0, len(b), (n_boot, len(b)))
    ratios = np.median(a[ia], axis=1) / np.median(b[ib], axis=1)
    lo, hi = np.percentile(ratios, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def paired_ratio_ci(base: list[float], cand: list[float], *, n_boot: int = 2000, level: float = 0.95, seed: int = 0):
    """``(speedup, lo, hi)``: the median of the per-pair ratios base_i / cand_i and its bootstrap CI over pairs.

    Pair i holds two adjacent runs, so a slow drift of the machine's load cancels in its ratio.
    """
    r = np.asarray(base) / np.asarray(cand)
    idx = np.random.default_rng(seed).integers(0, len(r), (n_boot, len(r)))
    boot = np.median(r[idx], axis=1)
    lo, hi = np.percentile(boot, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(np.median(r)), float(lo), float(hi)


@dataclass
class Comparison:
    phase: str
    batch: int
    length: int
    base: Latency
    cand: Latency
    speedup: float  # median over ABBA pairs of t_base / t_cand
    ci_low: float
    ci_high: float
    mode: str = "eager"
    target: float | None = None  # relative CI half-width asked for (None: a fixed number of pairs)
    stop: str = "fixed repetitions"  # why the repetitions stopped
    seconds: float = 0.0  # wall time of the timed loop
    setup_s: tuple = (0.0, 0.0)  # (base, cand): building each workload and its first call (compile, capture), untimed
    host_share: tuple | None = None  # (base, cand): share of a step's wall time the device was idle (see host_share)
    note: str = ""  # which KV cache and attention path the step took (Workload.note)

    @property
    def half_width(self) -> float:
        """Relative 95% CI half-width: (hi - lo) / 2 / speedup."""
        return (self.ci_high - self.ci_low) / 2 / self.speedup

    def __str__(self) -> str:
        return (f"{self.phase} B={self.batch} S={self.length} [{self.mode}]: {self.speedup:.3f}x "
                f"[95% CI {self.ci_low:.3f}, {self.ci_high:.3f}] (±{self.half_width:.1%}, {self.base.n} pairs, "
                f"{self.stop})")
