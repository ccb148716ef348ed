"""A tidy, append-only results store: one JSON object per line, one line per measurement.

Schema (every row has these keys; ``extra`` holds anything else a reader may want)::

    model, cell, method, sparsity, phase, batch, length, device, dtype,
    metric, value, ci_low, ci_high, bound, n, config_hash, versions, timestamp, extra

Durability: each row is written with a single ``write`` of a whole line to a file
opened in append mode, then flushed and fsync'ed. A writer killed mid-write can leave
at most one partial last line; the next writer first terminates it with a newline so it
stays a separate (corrupt) line and can never swallow a good row. Loading reports every
corrupt line with its file and line number and loads all the others.

Skipping: every measurement is keyed by ``config_hash`` (a hash of everything that
defines it) plus ``metric``; :meth:`ResultsStore.has` lets a sweep skip what is stored.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import warnings
from pathlib import Path

import pandas as pd

from .config import results_dir

COLUMNS = ("model", "cell", "method", "sparsity", "phase", "batch", "length", "device", "dtype",
           "metric", "value", "ci_low", "ci_high", "bound", "n", "config_hash", "versions", "timestamp", "extra")
REQUIRED = ("model", "method", "metric", "value", "config_hash")


class CorruptRowError(ValueError):
    """A line of the store that is not a valid row."""


class CorruptRowWarning(UserWarning):
    pass


def config_hash(config: dict) -> str:
    """A stable short hash of a measurement's defining parameters (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def versions() -> dict:
    """Library versions recorded with every row."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("prunelib", "torch", "transformers", "lm_eval"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def make_row(**fields) -> dict:
    """A full row: missing schema keys are None, unknown keys go to ``extra``, versions and time added."""
    missing = [k for k in REQUIRED if fields.get(k) is None]
    if missing:
        raise ValueError(f"a result row needs {', '.join(missing)}; got keys {sorted(fields)}")
    extra = dict(fields.pop("extra", None) or {})
    extra.update({k: fields.pop(k) for k in list(fields) if k not in COLUMNS})
    row = {k: fields.get(k) for k in COLUMNS}
    row["extra"] = extra
    row["versions"] = row["versions"] or versions()
    row["timestamp"] = row["timestamp"] or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return row


class ResultsStore:
    """Append-only JSONL store (default ``data/results.jsonl``, see prunelib.config)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else results_dir() / "results.jsonl"
        self._keys: set[tuple[str, str]] | None = None

    # --- writing -------------------------------------------------------------
    def append(self, rows) -> int:
        """Append rows (dicts passed through :func:`make_row`); returns how many were written."""
        rows = [rows] if isinstance(rows, dict) else list(rows)
        lines = [json.dumps(make_row(**dict(r)), default=_jsonable, allow_nan=True) + "\n" for r in rows]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if _ends_without_newline(self.path):
                os.write(fd, b"\n")  # seal a partial line left by a killed writer
            for line in lines:
                os.write(fd, line.encode())  # one write per row: a row is whole or absent
            os.fsync(fd)
        finally:
            os.close(fd)
        if self._keys is not None:
            for line in lines:
                r = json.loads(line)
                self._keys.add((r["config_hash"], r["metric"]))
        return len(lines)

    # --- reading -------------------------------------------------------------
    def rows(self, strict: bool = False) -> list[dict]:
        """All valid rows. Corrupt lines raise (strict) or warn, naming file and line, and are skipped."""
        if not self.path.exists():
            return []
        out, bad = [], []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict) or any(row.get(k) is None for k in REQUIRED):
                        raise ValueError(f"missing one of {REQUIRED}")
                    out.append(row)
                except ValueError as err:
                    msg = f"{self.path}:{lineno}: corrupt result row ({err}); skipped"
                    if strict:
                        raise CorruptRowError(msg) from err
                    bad.append(msg)
        for msg in bad:
            warnings.warn(msg, CorruptRowWarning, stacklevel=2)
        return out

    def load(self, strict: bool = False) -> pd.DataFrame:
        """The store as a DataFrame, one row per measurement (empty frame with the schema's columns if none)."""
        return pd.DataFrame(self.rows(strict), columns=list(COLUMNS))

    def has(self, config_hash_: str, metric: str | None = None) -> bool:
        """Is a measurement with this config hash (and metric, if given) stored?"""
        if self._keys is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CorruptRowWarning)
                self._keys = {(r["config_hash"], r["metric"]) for r in self.rows()}
        if metric is None:
            return any(h == config_hash_ for h, _ in self._keys)
        return (config_hash_, metric) in self._keys

    def __len__(self) -> int:
        return len(self.rows())


def _ends_without_newline(path: Path) -> bool:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _jsonable(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
    except ImportError:
        pass
    return str(obj)
