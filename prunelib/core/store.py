"""A tidy, append-only results store: one JSON object per line, one line per measurement.

Schema (every row has these keys; ``extra`` holds anything else a reader may want)::

    model, cell, method, sparsity, phase, batch, length, device, dtype,
    metric, value, ci_low, ci_high, bound, n, config_hash, versions, timestamp, extra

Durability: the rows of one :meth:`ResultsStore.append` call are one unit (a task's
metrics, a comparison's phases): each line carries the unit's id and size, and the unit
is written with a single ``write`` to a file opened in append mode, then fsync'ed. A
writer killed mid-write can leave a partial unit; the next writer first terminates a
partial line with a newline so it can never swallow a good row, and loading drops an
incomplete unit with a warning, so :meth:`ResultsStore.has` reports it missing and a
resumed sweep measures it again. Loading reports every corrupt line with its file and
line number and loads all the others.

Skipping: every measurement is keyed by ``config_hash`` (a hash of everything that
defines it) plus ``metric``; :meth:`ResultsStore.has` lets a sweep skip what is stored,
and counts only finite values, so a NaN or failed row is measured again. Where a key has
both, loading keeps its finite rows only: a failed re-measurement never hides a good one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
import platform
import time
import warnings
from pathlib import Path

import pandas as pd

from prunelib.core.config import results_dir

COLUMNS = ("model", "cell", "method", "sparsity", "phase", "batch", "length", "device", "dtype",
           "metric", "value", "ci_low", "ci_high", "bound", "n", "config_hash", "versions", "timestamp", "extra")
REQUIRED = ("model", "method", "metric", "value", "config_hash")
UNIT_KEYS = ("unit", "unit_size")  # on every stored line, outside the schema


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
    """Append-only JSONL store (default ``data/results.jsonl``, see prunelib.core.config)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else results_dir() / "results.jsonl"
        self._keys: set[tuple[str, str]] | None = None

    # --- writing -------------------------------------------------------------
    def append(self, rows) -> int:
        """Append rows (dicts passed through :func:`make_row`) as one unit; returns how many were written.

        The rows land together or, if the writer dies part-way, are all dropped by the next load.
        """
        rows = [rows] if isinstance(rows, dict) else list(rows)
        full = [make_row(**dict(r)) for r in rows]
        unit = {"unit": uuid.uuid4().hex[:16], "unit_size": len(full)}
        data = "".join(json.dumps({**r, **unit}, default=_jsonable, allow_nan=True) + "\n" for r in full).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if _ends_without_newline(self.path):
                os.write(fd, b"\n")  # seal a partial line left by a killed writer
            while data:  # one write for the whole unit (a short write continues; a kill leaves a partial unit)
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if self._keys is not None:
            self._keys.update((r["config_hash"], r["metric"]) for r in full if _finite(r["value"]))
        return len(full)

    # --- reading -------------------------------------------------------------
    def rows(self, strict: bool = False) -> list[dict]:
        """All valid rows of complete units, a failed (non-finite) row dropped where its key has a finite one.

        A corrupt line or an incomplete unit raises :class:`CorruptRowError` (strict) or warns, naming the
        file and lines, and is left out (a resume measures it again).
        """
        if not self.path.exists():
            return []
        out, bad, units = [], [], {}
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict) or any(row.get(k) is None for k in REQUIRED):
                        raise ValueError(f"missing one of {REQUIRED}")
                except ValueError as err:
                    bad.append((f"{self.path}:{lineno}: corrupt result row ({err})", err))
                    continue
                if row.get("unit") is not None:
                    units.setdefault(row["unit"], []).append(lineno)
                out.append((lineno, row))
        by_line = dict(out)
        incomplete = {u: lines for u, lines in units.items()
                      if len(lines) != by_line[lines[0]].get("unit_size", len(lines))}
        for u, lines in incomplete.items():
            size = by_line[lines[0]].get("unit_size")
            bad.append((f"{self.path}:{','.join(map(str, lines))}: incomplete measurement unit {u} "
                        f"({len(lines)} of {size} rows, its writer stopped part-way)", None))
        for msg, err in bad:
            if strict:
                raise CorruptRowError(msg) from err
        for msg, _ in bad:
            warnings.warn(f"{msg}; left out (a resumed run measures it again)", CorruptRowWarning, stacklevel=2)
        kept = [{k: v for k, v in row.items() if k not in UNIT_KEYS} for _, row in out
                if row.get("unit") not in incomplete]
        good = {(r["config_hash"], r["metric"]) for r in kept if _finite(r["value"])}
        return [r for r in kept if _finite(r["value"]) or (r["config_hash"], r["metric"]) not in good]

    def load(self, strict: bool = False) -> pd.DataFrame:
        """The store as a DataFrame, one row per measurement (empty frame with the schema's columns if none)."""
        return pd.DataFrame(self.rows(strict), columns=list(COLUMNS))

    def has(self, config_hash_: str, metric=None) -> bool:
        """Is a measurement with this config hash stored, with a finite value for ``metric``?

        ``metric``: one metric name or several (all must be stored); None: any metric of that hash.
        Rows of an incomplete unit and non-finite values do not count, so a resume redoes them.
        """
        if self._keys is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CorruptRowWarning)
                self._keys = {(r["config_hash"], r["metric"]) for r in self.rows() if _finite(r["value"])}
        if metric is None:
            return any(h == config_hash_ for h, _ in self._keys)
        metrics = [metric] if isinstance(metric, str) else list(metric)
        return all((config_hash_, m) in self._keys for m in metrics)

    def __len__(self) -> int:
        return len(self.rows())


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
