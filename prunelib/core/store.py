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

One writer at a time: :meth:`ResultsStore.append` holds an exclusive lock on the store file
(``fcntl.flock``, which other processes and, on a shared file system, other hosts see) while it
re-reads what others stored and writes, and drops rows whose key is stored with a finite value
by then. So two processes that both found a key missing with :meth:`ResultsStore.has` and
measured it store it once, and ``has`` sees what other processes appended since it last read.
:meth:`ResultsStore.lock` holds the same lock around longer steps (a sweep's merge of a job).
A sweep driver also claims the store for its whole run (:meth:`ResultsStore.claim_driver`, a
lock on ``<store>.driver.lock``, which names its holder); a second driver is refused with a
message naming the first (pid, host, since when), before it touches the first one's shards.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import socket
import threading
import uuid
import platform
import time
import warnings
from pathlib import Path

import pandas as pd

from prunelib.core.config import results_dir
from prunelib.core.validate import InputError

COLUMNS = ("model", "cell", "method", "sparsity", "phase", "batch", "length", "device", "dtype",
           "metric", "value", "ci_low", "ci_high", "bound", "n", "config_hash", "versions", "timestamp", "extra")
REQUIRED = ("model", "method", "metric", "value", "config_hash")
NUMERIC = ("sparsity", "batch", "length", "value", "ci_low", "ci_high", "bound", "n")  # a number or None (NaN allowed)
UNIT_KEYS = ("unit", "unit_size")  # on every stored line, outside the schema


class CorruptRowError(ValueError):
    """A line of the store that is not a valid row."""


class CorruptRowWarning(UserWarning):
    pass


class StoreBusy(RuntimeError):
    """Another process holds the store (a sweep driver, or a writer that did not let go); the message names it."""


class _FileLock:
    """An exclusive ``flock`` on one file, re-entrant in the thread that holds it (other threads wait), one per
    file in a process (the lock belongs to an open file, so two in one process would exclude each other)."""

    _all: dict[str, "_FileLock"] = {}
    _guard = threading.Lock()

    def __init__(self, path: Path):
        self.path, self.fd, self.depth, self.mutex = path, None, 0, threading.RLock()

    @classmethod
    def of(cls, path: Path) -> "_FileLock":
        with cls._guard:
            return cls._all.setdefault(os.path.realpath(path), cls(path))

    @contextlib.contextmanager
    def held(self, timeout: float, what: str):
        with self.mutex:
            if self.depth == 0:
                self.fd = _flock(self.path, timeout, what)
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
                if self.depth == 0:
                    os.close(self.fd)  # closing the file releases its lock
                    self.fd = None


def _flock(path: Path, timeout: float, what: str, note: bool = False) -> int:
    """An open descriptor of ``path`` holding its exclusive lock, after waiting up to ``timeout`` s, else
    :class:`StoreBusy` naming the holder (``note``: the holder writes pid, host and time into the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, t0, pause = os.open(path, os.O_RDWR | os.O_CREAT, 0o644), time.monotonic(), 0.01
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() - t0 >= timeout:
                holder = _holder(fd, note)
                os.close(fd)
                raise StoreBusy(f"{path} is held by {holder}: {what}") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.5)
    if note:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
    return fd


def _holder(fd: int, note: bool) -> str:
    """Who holds the lock on ``fd``'s file: its note (pid, host, since), else the pid Linux lists in /proc/locks."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        if note:
            h = json.loads(os.pread(fd, 4096, 0))
            return f"process {h['pid']} on {h['host']} (since {h['since']})"
        inode = os.fstat(fd).st_ino
        with open("/proc/locks") as f:
            for line in f:  # "1: FLOCK  ADVISORY  WRITE 12345 08:02:1234567 0 EOF"
                parts = [p for p in line.split() if p != "->"]  # "->": a waiter's line
                if "FLOCK" in parts and parts[5].rsplit(":", 1)[-1] == str(inode):
                    return f"process {parts[4]} on {socket.gethostname()}"
    return "another process"


_CLAIMS: dict[str, int] = {}  # store driver lock file -> the descriptor holding it (this process drives that store)
_CLAIMS_GUARD = threading.Lock()


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
    for k in NUMERIC:
        fields[k] = _number(k, fields.get(k))
    if fields.get("extra") is not None and not isinstance(fields["extra"], dict):
        raise InputError(f"extra={fields['extra']!r} is not allowed: expected a dict (or None)")
    extra = dict(fields.pop("extra", None) or {})
    extra.update({k: fields.pop(k) for k in list(fields) if k not in COLUMNS})
    row = {k: fields.get(k) for k in COLUMNS}
    row["extra"] = extra
    row["versions"] = row["versions"] or versions()
    row["timestamp"] = row["timestamp"] or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return row


class ResultsStore:
    """Append-only JSONL store (default ``data/results.jsonl``, see prunelib.core.config)."""

    #: how long a writer waits for another's lock (held for one append or one merge) before naming it
    WAIT_S = 600.0

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else results_dir() / "results.jsonl"
        self._keys: set[tuple[str, str]] | None = None
        self._seen = None  # the file's (inode, size, mtime) when _keys was read: another writer changes it

    # --- one writer ----------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, timeout: float | None = None):
        """Hold the store's write lock (re-entrant in this thread): no other process or thread appends meanwhile.

        Waits for another holder up to ``timeout`` s (default :attr:`WAIT_S`), then raises :class:`StoreBusy`.
        """
        with _FileLock.of(self.path).held(self.WAIT_S if timeout is None else timeout,
                                          "its appends and merges take seconds; is that process stuck?"):
            yield self

    @property
    def driver_lock(self) -> Path:
        return self.path.with_name(self.path.name + ".driver.lock")

    def claim_driver(self) -> None:
        """Make this process the store's one sweep driver until :meth:`release_driver` (or the process ends);
        while it is, another process's claim raises :class:`StoreBusy` naming this one (pid, host, since when).
        A second claim by the same process is the same claim."""
        key = os.path.realpath(self.driver_lock)
        with _CLAIMS_GUARD:
            if key not in _CLAIMS:
                _CLAIMS[key] = _flock(self.driver_lock, 0, f"a sweep into {self.path} is running there. Wait for "
                                      "it to end (or stop it) and run again: a sweep skips what is stored", note=True)

    def release_driver(self) -> None:
        with _CLAIMS_GUARD:
            fd = _CLAIMS.pop(os.path.realpath(self.driver_lock), None)
            if fd is not None:
                os.close(fd)

    def check_writable(self) -> None:
        """Refuse, before any work, a store whose folder cannot be written (read-only, full disk): a file is
        created, written, synced and removed there (one of the store's own name, so it never collides)."""
        folder = self.path.parent
        probe = folder / f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.writable"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, b"x" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)
            if self.path.exists() and not os.access(self.path, os.W_OK):
                raise PermissionError(f"{self.path} is not writable")
        except OSError as err:
            raise InputError(f"results store={str(self.path)!r} is not allowed: expected a folder this process can "
                             f"write ({type(err).__name__}: {err}); set PRUNELIB_RESULTS or pass store=") from err

    # --- writing -------------------------------------------------------------
    def append(self, rows) -> int:
        """Append rows (dicts passed through :func:`make_row`) as one unit; returns how many were written.

        The rows land together or, if the writer dies part-way, are all dropped by the next load. Under the
        store's lock, rows whose key is stored with a finite value (by another process since this one checked
        :meth:`has`, say) are left out: a measurement is stored once.
        """
        rows = [rows] if isinstance(rows, dict) else list(rows)
        full = [make_row(**dict(r)) for r in rows]
        with self.lock():
            self._refresh()  # what other processes stored meanwhile
            full = [r for r in full if (r["config_hash"], r["metric"]) not in self._keys]
            if not full:
                return 0
            unit = {"unit": uuid.uuid4().hex[:16], "unit_size": len(full)}
            data = "".join(json.dumps({**r, **unit}, default=_jsonable, allow_nan=True) + "\n" for r in full).encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if _ends_without_newline(self.path):
                    os.write(fd, b"\n")  # seal a partial line left by a killed writer
                while data:  # one write for the whole unit (a short write continues; a kill leaves a partial unit)
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            finally:
                os.close(fd)
            self._keys.update((r["config_hash"], r["metric"]) for r in full if _finite(r["value"]))
            self._seen = _signature(self.path)
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
                    _check_stored(row)
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
        self._refresh()
        if metric is None:
            return any(h == config_hash_ for h, _ in self._keys)
        metrics = [metric] if isinstance(metric, str) else list(metric)
        return all((config_hash_, m) in self._keys for m in metrics)

    def __len__(self) -> int:
        return len(self.rows())

    def _refresh(self) -> None:
        """Read the stored keys again if the file changed since they were read (another process appended)."""
        seen = _signature(self.path)
        if self._keys is None or seen != self._seen:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CorruptRowWarning)
                self._keys = {(r["config_hash"], r["metric"]) for r in self.rows() if _finite(r["value"])}
            self._seen = seen


def _signature(path: Path):
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):  # no store yet (or none can be: check_writable says why)
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns



def _finite(value) -> bool:
    import numpy as np

    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(value)


def _number(column: str, v):
    """A numeric column's value as a plain int / float (numpy scalars converted), None kept; anything else
    (a string, a bool, a tensor, a set) refused naming the column."""
    import numpy as np

    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise InputError(f"{column}={v!r} is not allowed: expected a number (int or float) or None in a result row")
    return int(v) if isinstance(v, (int, np.integer)) else float(v)


def _check_stored(row: dict) -> None:
    """A loaded line's numeric columns hold numbers or null, its extra a mapping, and a timed row names its phase."""
    for k in NUMERIC:
        v = row.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"{k}={v!r} is not a number")
    if not isinstance(row.get("extra"), dict):
        raise ValueError(f"extra={row.get('extra')!r} is not a mapping")
    if row.get("metric") == "speedup" and row.get("phase") is None:
        raise ValueError("a speedup row without its phase")


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
