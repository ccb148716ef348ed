"""Calibration batches for pruning criteria: calibration text only, never an evaluation split.

Sources (files of the offline kit, see ../shared/data/SOURCES.md):

- ``wikitext2``: WikiText-2 raw **validation** (``wikitext2/wiki.valid.raw``), the stand-in
  for the train split the papers use (not in the kit); disjoint from the test split
  that lm-eval's ``wikitext`` task scores. Rows are rebuilt as the HF dataset has them
  and joined with ``"\\n\\n"``, as SparseGPT does.
- ``c4``: 2,000 C4 ``en`` documents (``c4/c4_validation_2k.parquet``), joined with
  ``"\\n\\n"`` since few documents are longer than a window.

``calibration_batch(tokenizer, n, length, seed)`` tokenizes the stream once and cuts
``n`` windows of ``length`` tokens at seeded random offsets (Wanda/SparseGPT style),
so the same arguments always give the same tensor.

``@per_calibration`` keeps a criterion's calibration statistics for the rest of the process, keyed by the model's
fingerprint, its device and the calibration tokens: each rung of a ladder prunes the same dense model on the same
windows, so ShortGPT's layer statistics, FLAP's consumer-input statistics and the layer router's fit are computed
once per notebook instead of once per rung (17-20 s each for the embedded model on 2 cores).
"""
from __future__ import annotations

import copy
import functools
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from prunelib.core.config import data_dir

CALIBRATION_FILES = {
    "wikitext2": "wikitext2/wiki.valid.raw",
    "c4": "c4/c4_validation_2k.parquet",
}


@dataclass(frozen=True)
class CalibrationSet:
    input_ids: torch.Tensor  # [n, length] int64
    source: str
    file: Path
    seed: int

    @property
    def n(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def batches(self, batch_size: int):
        """Yield [batch_size, length] slices (the last may be smaller)."""
        for i in range(0, self.n, batch_size):
            yield self.input_ids[i : i + batch_size]


def calibration_file(source: str, root: str | Path | None = None) -> Path:
    if source not in CALIBRATION_FILES:
        raise ValueError(f"calibration source {source!r} is not allowed; calibration text only: {sorted(CALIBRATION_FILES)}")
    root = Path(root) if root else data_dir()
    path = root / CALIBRATION_FILES[source]
    if not path.exists():
        raise FileNotFoundError(f"calibration file {path} is missing (data dir {root}; set PRUNELIB_DATA)")
    return path


def calibration_text(source: str = "wikitext2", root: str | Path | None = None) -> str:
    path = calibration_file(source, root)
    if source == "wikitext2":
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        rows = ["" if line.strip() == "" else line for line in lines]  # HF rows: blank " \n" lines become ""
        return "\n\n".join(rows)
    import pandas as pd

    return "\n\n".join(pd.read_parquet(path, columns=["text"])["text"].tolist())


_TOKEN_CACHE: dict = {}


def calibration_batch(tokenizer, n: int = 128, length: int = 2048, seed: int = 0, source: str = "wikitext2",
                      root: str | Path | None = None) -> CalibrationSet:
    """``n`` windows of ``length`` tokens from calibration text, at seeded random offsets."""
    for what, v in (("n", n), ("length", length)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{what} must be a positive integer, got {v!r}")
    path = calibration_file(source, root)
    key = (getattr(tokenizer, "name_or_path", id(tokenizer)), len(tokenizer), str(path))
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = torch.tensor(tokenizer(calibration_text(source, root)).input_ids, dtype=torch.long)
    stream = _TOKEN_CACHE[key]
    if stream.numel() <= length:
        raise ValueError(f"{path} has {stream.numel()} tokens, fewer than one window of {length}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - length, (n,), generator=g)
    ids = torch.stack([stream[s : s + length] for s in starts.tolist()])
    return CalibrationSet(ids, source, path, seed)


class _Captured(Exception):
    pass


@torch.no_grad()
def layer0_inputs(model, calibration: CalibrationSet, batch_size: int = 4) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, keyword arguments) the first decoder layer receives, per calibration batch.

    For methods that calibrate layer by layer (SparseGPT, SliceGPT): the forward stops at
    layer 0, so only the embeddings run. The keywords carry the mask and rotary
    embeddings; the cache is switched off.
    """
    from prunelib.model.adapter import ModelAdapter

    layer0, dev, got = ModelAdapter(model).layers[0], next(model.parameters()).device, []

    def catch(mod, args, kwargs):
        kw = dict(kwargs)
        x = args[0] if args else kw.pop("hidden_states")
        kw.update(past_key_values=None, use_cache=False)
        got.append((x.detach(), kw))
        raise _Captured

    hook = layer0.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in calibration.batches(batch_size):
            try:
                model(ids.to(dev), use_cache=False)
            except _Captured:
                pass
    finally:
        hook.remove()
    return got


def _assert_disjoint_from_evaluation() -> None:
    from prunelib.core.evaltasks import evaluation_files

    clash = set(CALIBRATION_FILES.values()) & evaluation_files()
    if clash:  # a guard against a future edit of either table
        raise RuntimeError(f"calibration files {sorted(clash)} are evaluation files")


_assert_disjoint_from_evaluation()


_STATS: OrderedDict = OrderedDict()
STATS_KEPT = 8  # statistics of this many (criterion, model, calibration) triples stay in memory, least recent out


def per_calibration(fn):
    """Memoise ``fn(model, calibration, *args, **kwargs)`` (a criterion's statistics; it must not change the model)
    on the model's fingerprint and device, the calibration tokens and the other arguments; each call gets its own
    deep copy, so a caller that edits what it got changes no later call's. ``fn.uncached`` skips the memo. No
    calibration (``None``, or an object without ``input_ids``) is never memoised."""
    from prunelib.model.models import fingerprint

    @functools.wraps(fn)
    def wrapper(model, calibration, *args, **kwargs):
        ids = getattr(calibration, "input_ids", None)
        if not isinstance(ids, torch.Tensor):
            return fn(model, calibration, *args, **kwargs)
        digest = hashlib.sha256(ids.detach().cpu().numpy().tobytes()).hexdigest() + str(tuple(ids.shape))
        key = (fn.__module__, fn.__qualname__, fingerprint(model), str(next(model.parameters()).device), digest,
               repr(args), repr(sorted(kwargs.items())))
        if key in _STATS:
            _STATS.move_to_end(key)
        else:
            _STATS[key] = fn(model, calibration, *args, **kwargs)
            while len(_STATS) > STATS_KEPT:
                _STATS.popitem(last=False)
        return copy.deepcopy(_STATS[key])

    wrapper.uncached = fn
    return wrapper
