"""Per-document outcomes of a quality score: a compact sidecar of the results store.

lm-eval's ``log_samples`` gives, for every document, the outcome of each metric. For each
stored score (one ``config_hash``) we keep one small JSON file,
``<store folder>/samples/<config_hash>.json``::

    {"task": "arc_easy", "doc_ids": [0, 1, ...], "doc_hashes": ["b91fe1a8", ...],
     "outcomes": {"acc": [0, 1, ...], "acc_norm": [...]},            # accuracy tasks: 0/1 per document
     "loglikelihood": [...], "words": [...], "bytes": [...]}           # perplexity tasks instead

``doc_hashes`` are the first 8 hex digits of lm-eval's ``doc_hash``, so two models scored on
different documents (a different limit, a different data file) are told apart even when
their ``doc_ids`` agree. The file is written atomically (a temporary file renamed over the
target) *before* the score rows are appended, so a stored score either has its sidecar or
was written without one (older rows) and is then treated as unpaired.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

PERPLEXITY_FIELDS = {"word_perplexity": "words", "byte_perplexity": "bytes"}


def folder(store_path: str | os.PathLike) -> Path:
    """The sidecar folder of the store at ``store_path`` (a ``results.jsonl`` file)."""
    return Path(store_path).parent / "samples"


def compact(task: str, samples: list[dict]) -> dict:
    """The sidecar payload of one task from lm-eval's ``out["samples"][task]``, sorted by doc id."""
    samples = sorted(samples, key=lambda s: s["doc_id"])
    out = {"task": task, "doc_ids": [int(s["doc_id"]) for s in samples],
           "doc_hashes": [str(s.get("doc_hash", ""))[:8] for s in samples], "outcomes": {}}
    metrics = samples[0]["metrics"] if samples else []
    for metric in metrics:
        values = [s[metric] for s in samples]
        if isinstance(values[0], (tuple, list)):  # perplexity: (loglikelihood, words or bytes)
            out["loglikelihood"] = [float(v[0]) for v in values]
            if metric in PERPLEXITY_FIELDS:
                out[PERPLEXITY_FIELDS[metric]] = [int(v[1]) for v in values]
        elif metric != "perplexity":  # lambada's token perplexity is a per-document loglikelihood, kept below
            out["outcomes"][metric] = [float(v) for v in values]
        else:
            out["loglikelihood"] = [float(v) for v in values]
    return out


def write(directory: str | os.PathLike, config_hash: str, payload: dict) -> Path:
    """Write one sidecar atomically (a temporary file renamed over the target): a whole file or none."""
    from prunelib.core.evaltasks import _write_if_changed

    target = Path(directory) / f"{config_hash}.json"
    _write_if_changed(target, json.dumps(payload, separators=(",", ":")))
    return target


def read(directory: str | os.PathLike, config_hash: str) -> dict | None:
    """The sidecar of ``config_hash``, or None where none was written."""
    path = Path(directory) / f"{config_hash}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def pooled(task: str, parts: list[dict]) -> dict:
    """One sidecar from several (BLiMP's paradigms into its group); part i's doc ids become ``i * 10**7 + doc_id``.

    BLiMP's group score is the unweighted mean over paradigms of equal size, which equals
    the mean over the pooled documents; paradigms of unequal size are refused.
    """
    sizes = {len(p["doc_ids"]) for p in parts}
    if len(sizes) != 1:
        raise ValueError(f"cannot pool {task!r}: its parts have different document counts {sorted(sizes)}")
    out = {"task": task, "doc_ids": [], "doc_hashes": [], "outcomes": {}, "parts": [p["task"] for p in parts]}
    for i, p in enumerate(parts):
        out["doc_ids"] += [i * 10**7 + d for d in p["doc_ids"]]
        out["doc_hashes"] += p["doc_hashes"]
        for metric, values in p["outcomes"].items():
            out["outcomes"].setdefault(metric, []).extend(values)
    return out
