"""Where prunelib finds its inputs and keeps its outputs.

Every location can be overridden with an environment variable so that the same
code runs from a clone, from a notebook in another folder, or in CI:

- ``PRUNELIB_DATA``    offline evaluation/calibration kit (default ``../shared/data``
                       next to the repository, see its SOURCES.md)
- ``PRUNELIB_RESULTS`` the results store folder (default ``<repo>/data``)
- ``PRUNELIB_CACHE``   model copies, hardware micro-benchmarks, prepared task files
                       (default ``~/.cache/prunelib``)
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """The offline data kit (WikiText-2, HellaSwag, ..., calibration text)."""
    env = os.environ.get("PRUNELIB_DATA")
    return Path(env).expanduser().resolve() if env else (REPO_ROOT.parent / "shared" / "data").resolve()


def results_dir() -> Path:
    env = os.environ.get("PRUNELIB_RESULTS")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "data"


def cache_dir() -> Path:
    env = os.environ.get("PRUNELIB_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "prunelib"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()
