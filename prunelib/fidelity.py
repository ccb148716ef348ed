"""Fidelity: how far a pruned model's next-token distribution moves from the dense model's.

Accuracy on a few hundred multiple-choice documents is binary and noisy; fidelity is a
continuous measure on running text, so it reaches a few percent of precision in seconds:

- ``fidelity_kl``: mean per-token KL(dense || pruned) of the next-token distributions, in nats,
  computed exactly over the whole vocabulary (no top-k approximation);
- ``fidelity_dnll``: mean per-token NLL of the pruned model minus the dense model's, in nats
  (``exp`` of it is the perplexity ratio).

Text (:data:`DOMAINS`): PTB test, a domain other than the calibration text (WikiText-2
validation or C4, :mod:`prunelib.calibration`), and WikiText-2 test, the calibration
domain; both are reported, since WikiText favours methods calibrated on WikiText. Each
gives ``windows`` windows of ``length`` tokens at evenly spaced offsets of the tokenised
file (deterministic).

Scored as served: the first half of each window is the prompt, the second half the
continuation; the scored positions predict the continuation's tokens (from the prompt's
last position on). One forward runs inside :func:`prunelib.servinglm.prompt_lengths`, so a
dynamic method applies its prefill rules to the prompt and its decode rules to the
continuation (prompt-token pruning prunes the prompt only, the continuation runs at full
depth; sparse attention uses its decode rule), which equals a prefill followed by
token-by-token cached decode. A static model is untouched: a plain full forward. (A
multi-token forward on a cache is *not* used: sparse attention treats it as a prefill chunk.)

CI: a bootstrap over windows (the unit of independent text; ``iters`` resamples, seeded),
the same windows for both models (paired), percentile 95%. The dense model's log-probs are
kept in memory within a process (one dense model at a time), so each pruned model costs
only its own forwards; they are not cached on disk (full-vocabulary log-probs of 2k tokens
are 400 MB).

Rows (``phase="quality"``, ``metric`` in {``fidelity_kl``, ``fidelity_dnll``}) are keyed by
both fingerprints, the code version of a dynamic method (:func:`prunelib.quality.code_version`),
domain, windows, length, iters and seed; a stored row is not re-measured.

``python -m prunelib.fidelity --table`` prints the closing table of issue 13 from the store
(every method at 25%, width at 10%: quick-suite loss, unpaired se, paired CI, KL and ΔNLL
with CIs, seconds) and the Spearman rank correlation of KL on PTB with the quick-suite loss;
``--measure`` first scores what is missing.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import pandas as pd
import torch

from .config import data_dir
from .models import fingerprint
from .store import ResultsStore, config_hash

DOMAINS = {"ptb": "ptb/ptb.test.txt", "wikitext2": "wikitext2/wiki.test.raw"}
#: 8 windows of 128 tokens per domain: about 2k scored-model tokens per model, within 20 s on 2 cores
WINDOWS, LENGTH, ITERS = 8, 128, 2000

_TOKENS: dict = {}
_DENSE: dict = {}  # (dense fingerprint, domain, windows, length) -> (log-probs, targets); one dense model at a time


def text(domain: str, root=None) -> str:
    """The evaluation text of ``domain``: WikiText-2 test rows joined as the HF dataset has them; PTB sentences."""
    if domain not in DOMAINS:
        raise ValueError(f"fidelity domain {domain!r} is unknown; allowed: {sorted(DOMAINS)}")
    path = (data_dir() if root is None else root) / DOMAINS[domain]
    if not path.is_file():
        raise FileNotFoundError(f"evaluation file {path} is missing (set PRUNELIB_DATA)")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if domain == "wikitext2":
        return "\n\n".join("" if line.strip() == "" else line for line in lines)
    return " ".join(line.strip() for line in lines)


def windows(tokenizer, domain: str, n: int = WINDOWS, length: int = LENGTH, root=None) -> torch.Tensor:
    """``n`` windows of ``length`` tokens at evenly spaced offsets of the tokenised file, ``[n, length]``."""
    for what, v, lo in (("windows", n, 1), ("length", length, 4)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{what} must be an integer >= {lo}, got {v!r}")
    key = (getattr(tokenizer, "name_or_path", id(tokenizer)), len(tokenizer), domain, str(root))
    if key not in _TOKENS:
        _TOKENS[key] = torch.tensor(tokenizer(text(domain, root)).input_ids, dtype=torch.long)
    stream = _TOKENS[key]
    if stream.numel() < n * length:
        raise ValueError(f"{domain} has {stream.numel()} tokens, fewer than {n} windows of {length}")
    starts = np.linspace(0, stream.numel() - length, n).astype(int)
    return torch.stack([stream[s:s + length] for s in starts])


@torch.no_grad()
def served_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """Log-probs ``[n, L - L//2, vocab]`` predicting the second half of each window, as served.

    One forward of ``ids[:, :-1]`` inside :func:`prunelib.servinglm.prompt_lengths` with the
    first half as the prompt: a dynamic method treats that half by its prefill rules and the
    rest as decode steps (equal to a prefill and token-by-token cached decode); a static model
    is untouched. Only the scored positions' logits are computed.
    """
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    n, length = ids.shape
    c = length // 2
    with _serving(model, [c] * n):
        logits = model(ids[:, :-1], logits_to_keep=length - c).logits.float()
    return torch.log_softmax(logits, dim=-1).cpu()


def _serving(model, lengths):
    try:
        from .servinglm import prompt_lengths
    except ImportError:  # no serving wrapper in this checkout: every model scores as a full forward
        return contextlib.nullcontext()
    return prompt_lengths(model, lengths)


def divergence(dense_lp: torch.Tensor, pruned_lp: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per-window mean KL(dense || pruned) and ΔNLL (pruned - dense), and both NLLs, each ``[n]`` numpy."""
    kl = (dense_lp.exp() * (dense_lp - pruned_lp)).sum(-1)  # [n, T]
    t = targets.unsqueeze(-1)
    nll_d, nll_p = -dense_lp.gather(-1, t).squeeze(-1), -pruned_lp.gather(-1, t).squeeze(-1)
    return {"kl": kl.mean(1).double().numpy(), "dnll": (nll_p - nll_d).mean(1).double().numpy(),
            "nll_dense": nll_d.mean(1).double().numpy(), "nll_pruned": nll_p.mean(1).double().numpy()}


def bootstrap_ci(per_window: np.ndarray, iters: int = ITERS, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the mean over windows, resampling windows with replacement (seeded)."""
    x = np.asarray(per_window, float)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(iters, len(x)))
    lo, hi = np.percentile(x[idx].mean(1), [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def _dense_logprobs(dense, fp, domain, ids):
    key = (fp, domain, *ids.shape)
    if key not in _DENSE:
        if _DENSE and next(iter(_DENSE))[0] != fp:
            _DENSE.clear()  # one dense model at a time: its log-probs are ~100 MB per domain
        t0 = time.perf_counter()
        _DENSE[key] = (served_logprobs(dense, ids), time.perf_counter() - t0)
    return _DENSE[key]


def measure(dense, pruned, tokenizer, *, store: ResultsStore | None = None, model_name: str = "",
            method: str = "dense", sparsity: float = 0.0, cell: str = "dense", domains=tuple(DOMAINS),
            n: int = WINDOWS, length: int = LENGTH, iters: int = ITERS, seed: int = 0, extra: dict | None = None,
            root=None) -> pd.DataFrame:
    """KL and ΔNLL of ``pruned`` against ``dense`` on each domain, stored once; returns their rows."""
    from .quality import code_version

    store = ResultsStore() if store is None else store
    for d in domains:
        text(d, root)  # unknown domain or missing file: fail before any forward
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    fp_d, fp_p, code = fingerprint(dense), fingerprint(pruned), code_version(pruned)
    device = str(next(pruned.parameters()).device)
    dtype = str(next(pruned.parameters()).dtype).removeprefix("torch.")
    keys = []
    for domain in domains:
        key = config_hash({"kind": "fidelity", "dense": fp_d, "pruned": fp_p, "code": code, "domain": domain,
                           "windows": n, "length": length, "iters": iters, "seed": seed, "device": device})
        keys.append(key)
        if store.has(key, "fidelity_kl") and store.has(key, "fidelity_dnll"):
            continue
        ids = windows(tokenizer, domain, n, length, root)
        dense_lp, dense_s = _dense_logprobs(dense, fp_d, domain, ids)
        t0 = time.perf_counter()
        pruned_lp = dense_lp if pruned is dense else served_logprobs(pruned, ids)
        r = divergence(dense_lp, pruned_lp, ids[:, length // 2:])
        seconds = time.perf_counter() - t0
        common = dict(extra or {}, domain=domain, windows=n, window_len=length, context=length // 2,
                      scored_tokens=n * (length - length // 2), seconds=seconds, dense_seconds=dense_s, seed=seed,
                      iters=iters, ci_method="paired_bootstrap", bootstrap_unit="window", fingerprint=fp_p, dense_fingerprint=fp_d, code=code,
                      nll_dense=float(r["nll_dense"].mean()), nll_pruned=float(r["nll_pruned"].mean()),
                      ppl_dense=float(np.exp(r["nll_dense"].mean())), ppl_pruned=float(np.exp(r["nll_pruned"].mean())))
        rows = []
        for metric, values in (("fidelity_kl", r["kl"]), ("fidelity_dnll", r["dnll"])):
            lo, hi = bootstrap_ci(values, iters, seed)
            rows.append(dict(model=model_name or getattr(pruned.config, "name_or_path", ""), cell=cell, method=method,
                             sparsity=sparsity, phase="quality", device=device, dtype=dtype, metric=metric,
                             value=float(values.mean()), ci_low=lo, ci_high=hi, n=n * (length - length // 2),
                             config_hash=key, extra=dict(common, per_window=values.tolist())))
        store.append(rows)
    df = store.load()
    return df[df.config_hash.isin(keys) & df.metric.isin(["fidelity_kl", "fidelity_dnll"])].reset_index(drop=True)


def table_sparsity(method: str) -> float:
    """The closing table's sparsity of ``method``: 10% for static width methods, 25% for every other."""
    from .pruning import get

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
    from .models import EMBEDDED
    from .pruning import REGISTRY

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
        from .experiment import run

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
