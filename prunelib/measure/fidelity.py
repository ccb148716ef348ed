"""Fidelity: how far a pruned model's next-token distribution moves from the dense model's.

Accuracy on a few hundred multiple-choice documents is binary and noisy; fidelity is a
continuous measure on running text, so it reaches a few percent of precision in seconds:

- ``fidelity_kl``: mean per-token KL(dense || pruned) of the next-token distributions, in nats,
  computed exactly over the whole vocabulary (no top-k approximation);
- ``fidelity_dnll``: mean per-token NLL of the pruned model minus the dense model's, in nats
  (``exp`` of it is the perplexity ratio).

Text (:data:`DOMAINS`): PTB test, a domain other than the calibration text (WikiText-2
validation or C4, :mod:`prunelib.model.calibration`), and WikiText-2 test, the calibration
domain; both are reported, since WikiText favours methods calibrated on WikiText. Each
gives ``windows`` windows of ``length`` tokens at evenly spaced offsets of the tokenised
file (deterministic).

Scored as served: the first half of each window is the prompt, the second half the
continuation; the scored positions predict the continuation's tokens (from the prompt's
last position on). One forward runs inside :func:`prunelib.measure.servinglm.prompt_lengths`, so a
dynamic method applies its prefill rules to the prompt and its decode rules to the
continuation (prompt-token pruning prunes the prompt only, the continuation runs at full
depth; sparse attention uses its decode rule), which equals a prefill followed by
token-by-token cached decode. A static model is untouched: a plain full forward. (A
multi-token forward on a cache is *not* used: sparse attention treats it as a prefill chunk.)

CI: a Student-t interval over windows (the unit of independent text; :func:`t_interval`), the
same windows for both models (paired), 95%. With few windows a percentile bootstrap under-covers
(its spread is the plug-in standard deviation, and the percentiles of a skewed mean fall short);
the t quantile corrects for the estimated spread. The dense model's log-probs are
kept in memory within a process (one dense model at a time), so each pruned model costs
only its own forwards. Across processes (each notebook of ``make demo`` is a kernel of its own) the dense
model's *head inputs* at the scored positions are cached on disk (:func:`dense_head_inputs`: 5 MB for PTB's
windows, where full-vocabulary log-probs would be 400 MB), and its log-probs are always its output head applied
to them, cached or not, so a KL does not depend on whether the dense forward ran in this process.

Rows (``phase="quality"``, ``metric`` in {``fidelity_kl``, ``fidelity_dnll``}) are keyed by
both fingerprints, the code version of a dynamic method (:func:`prunelib.measure.scoring.code_version`),
domain, windows, length, iters and seed; a stored row is not re-measured.

``python -m prunelib.fidelity --table`` prints the closing table of issue 13 from the store
(every method at 25%, width at 10%: quick-suite loss, unpaired se, paired CI, KL and ΔNLL
with CIs, seconds) and the Spearman rank correlation of KL on PTB with the quick-suite loss;
``--measure`` first scores what is missing.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import time

import numpy as np
import pandas as pd
import torch

from prunelib.core.config import cache_dir, data_dir
from prunelib.model.models import fingerprint
from prunelib.core.store import ResultsStore, config_hash

DOMAINS = {"ptb": "ptb/ptb.test.txt", "wikitext2": "wikitext2/wiki.test.raw", "ptb-long": "ptb/ptb.test.txt"}
#: domains scored at another window shape (windows, length, prompt): "ptb-long" prefills 1536 tokens and scores 512,
#: the timing shape, so a rule that acts on long prompts (sparse attention, token pruning) runs where it is scored
def _windows_from_env(default: int = 32) -> int:
    """``PRUNELIB_FIDELITY_WINDOWS``: fewer windows for a plumbing check (the test suite's notebook kernels); rows
    are keyed by their window count, so such rows never stand in for the default's."""
    raw = os.environ.get("PRUNELIB_FIDELITY_WINDOWS")
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"PRUNELIB_FIDELITY_WINDOWS={raw!r}: expected a positive integer (default {default})")
    return int(raw)


#: 32 windows of 128 tokens per domain (2k scored tokens per model, seconds on 2 cores): with 8, even a t-interval
#: covered the many-window mean only 91% of the time, the percentile bootstrap 78-85% (tests/test_fidelity.py)
DEFAULT_WINDOWS = 32
WINDOWS, LENGTH, ITERS = _windows_from_env(DEFAULT_WINDOWS), 128, 2000
SHAPES = {"ptb-long": (max(1, WINDOWS // 4), 2048, 1536)}
#: what a plain measure scores: the short windows (long ones are asked for by name, e.g. for prompt-aware methods)
DEFAULT_DOMAINS = ("ptb", "wikitext2")

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
    if domain.startswith("wikitext2"):
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
def served_logprobs(model, ids: torch.Tensor, context: int | None = None) -> torch.Tensor:
    """Log-probs ``[n, L - c, vocab]`` predicting the tokens after the first ``c = context`` (default: half) of each
    window, as served.

    One forward of ``ids[:, :-1]`` inside :func:`prunelib.measure.servinglm.prompt_lengths` with the
    first ``c`` tokens as the prompt: a dynamic method treats them by its prefill rules and the
    rest as decode steps (equal to a prefill and token-by-token cached decode); a static model
    is untouched. Only the scored positions' logits are computed.
    """
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    n, length = ids.shape
    c = length // 2 if context is None else context
    with _serving(model, [c] * n):
        logits = model(ids[:, :-1], logits_to_keep=length - c).logits.float()
    return torch.log_softmax(logits, dim=-1).cpu()


def _serving(model, lengths):
    try:
        from prunelib.measure.servinglm import prompt_lengths
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


def t_interval(per_window: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t CI of the mean over windows: mean ± t(level, n - 1) · sd / sqrt(n); one window gives (mean, mean)."""
    from scipy import stats

    x = np.asarray(per_window, float)
    if len(x) < 2:
        return float(x.mean()), float(x.mean())
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def bootstrap_ci(per_window: np.ndarray, iters: int = ITERS, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the mean over windows, resampling windows with replacement (seeded); kept for comparison:
    it under-covers with few windows (:func:`t_interval` is what rows store)."""
    x = np.asarray(per_window, float)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(iters, len(x)))
    lo, hi = np.percentile(x[idx].mean(1), [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def _reset(model) -> None:
    for m in model.modules():
        if m is not model and hasattr(m, "reset_stats"):
            m.reset_stats()


def long_prompt_rule(method: str) -> bool:
    """Whether ``method``'s rule acts on long prompts (it reports an ``active_share``: sparse attention, token
    pruning), so that its fidelity is read on "ptb-long", where the rule runs, not on the short windows."""
    from prunelib.pruning import REGISTRY

    return method in REGISTRY and REGISTRY[method].hook("active_share") is not None


def _while_scoring(model, method: str) -> dict:
    """What the pruned model's rule did on the windows just scored: its realised sparsity per phase and the share of
    scored positions it shaped (hooks of the method's module; nothing for static methods)."""
    from prunelib.pruning import REGISTRY

    m = REGISTRY.get(method)
    if m is None or m.static:
        return {}
    out = {}
    realised, active = m.hook("realised_sparsity"), m.hook("active_share")
    if "phase" in inspect.signature(realised).parameters:
        out.update({f"realised_{phase}": float(realised(model, phase)) for phase in ("prefill", "decode")})
    else:  # the hook counts what the whole forward skipped
        out["realised"] = float(realised(model))
    if active is not None:
        out["active_share"] = active(model)
    return out


def _head_inputs(model, ids: torch.Tensor, context: int | None = None) -> torch.Tensor:
    """What :func:`served_logprobs` feeds the output head, ``[n, L - c, hidden]`` on the CPU (a forward hook)."""
    got = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: got.append(args[0]))
    try:
        served_logprobs(model, ids, context)
    finally:
        handle.remove()
    return got[-1].detach().float().cpu().contiguous()


@torch.no_grad()
def head_logprobs(model, hidden: torch.Tensor) -> torch.Tensor:
    """Log-probs of ``model``'s output head applied to ``hidden`` (float32, on the CPU)."""
    head = model.get_output_embeddings()
    w = head.weight
    return torch.log_softmax(head(hidden.to(w.device, w.dtype)).float(), dim=-1).cpu()


def dense_head_inputs(dense, fp: str, domain: str, ids: torch.Tensor, context: int | None = None) -> torch.Tensor:
    """The dense model's head inputs on ``ids``, from the disk cache (``<cache>/fidelity/*.safetensors``) or one
    forward.

    Keyed by the dense fingerprint, the windows' tokens, the prompt length and the torch and transformers versions
    (another kernel library may round differently); an unreadable file is measured again and overwritten."""
    import transformers
    from safetensors.torch import load_file, save_file

    h = hashlib.sha256(ids.numpy().tobytes())
    h.update(f"{fp}|{domain}|{tuple(ids.shape)}|{context}|{torch.__version__}|{transformers.__version__}|"
             f"{next(dense.parameters()).device.type}".encode())
    path = cache_dir() / "fidelity" / f"{domain}-{h.hexdigest()[:20]}.safetensors"  # tensors only: no pickle
    if path.is_file():
        try:
            return load_file(path)["hidden"]
        except Exception:  # a torn or foreign file: measured again below
            pass
    hidden = _head_inputs(dense, ids, context)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"hidden": hidden}, str(tmp))
    os.replace(tmp, path)
    return hidden


def _dense_logprobs(dense, fp, domain, ids, context=None):
    key = (fp, domain, *ids.shape)
    if key not in _DENSE:
        if _DENSE and next(iter(_DENSE))[0] != fp:
            _DENSE.clear()  # one dense model at a time: its log-probs are ~100 MB per domain
        t0 = time.perf_counter()
        _DENSE[key] = (head_logprobs(dense, dense_head_inputs(dense, fp, domain, ids, context)),
                       time.perf_counter() - t0)
    return _DENSE[key]


def measure(dense, pruned, tokenizer, *, store: ResultsStore | None = None, model_name: str = "",
            method: str = "dense", sparsity: float = 0.0, cell: str = "dense", domains=DEFAULT_DOMAINS,
            n: int = WINDOWS, length: int = LENGTH, iters: int = ITERS, seed: int = 0, extra: dict | None = None,
            root=None) -> pd.DataFrame:
    """KL and ΔNLL of ``pruned`` against ``dense`` on each domain, stored once; returns their rows. A domain of
    :data:`SHAPES` has its own window shape; each row keeps the realised sparsity of the pruned model's rule per phase
    while scoring, and the share of scored positions its rule shaped (prompt-aware methods)."""
    from prunelib.measure.scoring import code_version

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
        nd, ld, cd = SHAPES.get(domain, (n, length, length // 2))
        key = config_hash({"kind": "fidelity", "dense": fp_d, "pruned": fp_p, "code": code, "domain": domain,
                           "windows": nd, "length": ld, "iters": iters, "seed": seed, "device": device}
                          | ({"context": cd} if cd != ld // 2 else {}))
        keys.append(key)
        if store.has(key, "fidelity_kl") and store.has(key, "fidelity_dnll"):
            continue
        ids = windows(tokenizer, domain, nd, ld, root)
        dense_lp, dense_s = _dense_logprobs(dense, fp_d, domain, ids, cd)
        t0 = time.perf_counter()
        _reset(pruned)
        pruned_lp = dense_lp if pruned is dense else served_logprobs(pruned, ids, cd)
        r = divergence(dense_lp, pruned_lp, ids[:, cd:])
        seconds = time.perf_counter() - t0
        common = dict(extra or {}, domain=domain, windows=nd, window_len=ld, context=cd,
                      scored_tokens=nd * (ld - cd), seconds=seconds, dense_seconds=dense_s, seed=seed,
                      iters=iters, ci_method="t_interval", ci_unit="window", fingerprint=fp_p, dense_fingerprint=fp_d,
                      code=code, nll_dense=float(r["nll_dense"].mean()), nll_pruned=float(r["nll_pruned"].mean()),
                      ppl_dense=float(np.exp(r["nll_dense"].mean())), ppl_pruned=float(np.exp(r["nll_pruned"].mean())),
                      **_while_scoring(pruned, method))
        rows = []
        for metric, values in (("fidelity_kl", r["kl"]), ("fidelity_dnll", r["dnll"])):
            lo, hi = t_interval(values)
            rows.append(dict(model=model_name or getattr(pruned.config, "name_or_path", ""), cell=cell, method=method,
                             sparsity=sparsity, phase="quality", device=device, dtype=dtype, metric=metric,
                             value=float(values.mean()), ci_low=lo, ci_high=hi, n=nd * (ld - cd),
                             config_hash=key, extra=dict(common, per_window=values.tolist())))
        store.append(rows)
    df = store.load()
    return df[df.config_hash.isin(keys) & df.metric.isin(["fidelity_kl", "fidelity_dnll"])].reset_index(drop=True)
