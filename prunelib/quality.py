"""``python -m prunelib.quality``: score a model with lm-eval on the offline suite (resumable), or ``--what-if``.

The quality API in one place: scoring lives in :mod:`prunelib.measure.scoring` (``evaluate``,
``PRESETS``), the loss statistics in :mod:`prunelib.measure.lossstats` (``quality_loss``,
``what_if``); both are re-exported here, so ``from prunelib import quality`` gives all of them.
"""
from __future__ import annotations

import argparse

import pandas as pd

from prunelib.core.store import ResultsStore
from prunelib.core.validate import distinct, fail, integer
from prunelib.core import evaltasks
from prunelib.measure.lossstats import (paired_bootstrap, paired_difference, quality_loss, stored_pair,  # noqa: F401
                                        what_if)
from prunelib.measure.scoring import (CHOSEN_METRIC, PRESETS, Preset, _check_limit, code_version,  # noqa: F401
                                      evaluate, scores)
from prunelib.model.models import EMBEDDED, _is_checkpoint, _tokenizer_files, load_model, resolve_dtype


def _no_tokenizer(name: str) -> bool:
    """A saved checkpoint folder without tokenizer files (random:* models have none either)."""
    return name.startswith("random:") or (_is_checkpoint(name) and not _tokenizer_files(name))


def _limit_arg(text: str):
    """``--limit``: a whole number of documents stays an int (it is part of the cache key), else a fraction."""
    return int(text) if float(text).is_integer() else float(text)


_limit_arg.__name__ = "limit"  # argparse: "invalid limit value: 'x'"


def main(argv=None):
    p = argparse.ArgumentParser(description="score a model with lm-eval on the offline suite (resumable: "
                                            "finished tasks are read from the store)")
    p.add_argument("--model", default=EMBEDDED)
    p.add_argument("--preset", default="full", choices=sorted(PRESETS))
    p.add_argument("--tasks", default=None, help="comma-separated, instead of the preset's tasks")
    p.add_argument("--limit", type=_limit_arg, default=None,
                   help="documents per task, or a fraction < 1 (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--what-if", default=None, metavar="TASK=N,...",
                   help="no scoring: the paired CI every stored pruned model would get on its first N documents")
    a = p.parse_args(argv)
    if a.what_if:
        try:
            pairs = [kv.split("=") for kv in a.what_if.split(",")]
            if any(len(kv) != 2 or not kv[1].strip().isdigit() for kv in pairs):
                raise ValueError("expected TASK=N pairs separated by commas, e.g. arc_easy=160,piqa=170")
            t = what_if({k.strip(): int(n) for k, n in pairs}, model=a.model)
        except ValueError as err:  # a malformed TASK=N, an unknown task, nothing stored
            p.error(f"--what-if {a.what_if}: {err}")
        with pd.option_context("display.width", 200, "display.max_rows", 200):
            print(t.round(2).to_string(index=False))
        print(f"{len(t)} models: paired 95% half-width max {t.half_width.max():.2f}, mean {t.half_width.mean():.2f} "
              f"points; seconds (stored, scaled to the documents kept) median {t.seconds.median():.0f}")
        return
    try:  # bad names, limits, batch sizes or devices fail here, before the model loads
        tasks = list(PRESETS[a.preset].tasks) if a.tasks is None else [t.strip() for t in a.tasks.split(",")]
        if not all(tasks):
            fail("tasks", a.tasks, "comma-separated task names, none empty (leave --tasks out for the preset's)")
        distinct("tasks", tasks)
        if _no_tokenizer(a.model):
            fail("model", a.model, "a model with a tokenizer (this checkpoint was saved without one: "
                 "save_pruned(model, path, tokenizer))")
        ResultsStore().check_writable()
        _check_limit(a.limit)
        integer("batch_size", a.batch_size)
        resolve_dtype(a.dtype, a.device)
        evaltasks._expand(tasks)
    except ValueError as err:
        p.error(str(err))
    model, tok = load_model(a.model, device=a.device, dtype=a.dtype)
    df = evaluate(model, tok, tasks, preset=a.preset, limit=a.limit, batch_size=a.batch_size, model_name=a.model)
    table = scores(df, tasks)
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(table.round(4).to_string(index=False))
    per_task = table.drop_duplicates("task")
    print(f"scoring time (sum over tasks, as stored): {per_task.seconds.sum():.0f} s = {per_task.seconds.sum() / 60:.1f} min")


if __name__ == "__main__":
    main()
