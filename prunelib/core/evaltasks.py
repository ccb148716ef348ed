"""Offline versions of the lm-evaluation-harness (0.4.13) zero-shot tasks prunelib reports.

The Hugging Face Hub is not reachable where prunelib runs, so the stock lm-eval
tasks (which call ``datasets.load_dataset("allenai/ai2_arc", ...)`` and friends)
cannot load. This module turns the offline data kit (``prunelib.core.config.data_dir()``,
described in its ``SOURCES.md``) into lm-eval task YAMLs that keep the stock
task names, prompts, targets, metrics and aggregation, and change only where
the documents come from.

How the task files are built
----------------------------
For each task, :func:`prepare_tasks` writes one YAML of this shape::

    include: <site-packages>/lm_eval/tasks/arc/arc_easy.yaml   # the stock task, verbatim
    dataset_path: json                                       # HF packaged loader, no Hub
    dataset_name: null
    dataset_kwargs: {data_files: {test: /abs/path/test.json}}
    training_split: null                                     # only the evaluated split exists
    validation_split: null
    test_split: test

so ``doc_to_text``/``doc_to_target``/``doc_to_choice``/``process_docs``/
``process_results``/``metric_list`` (and ``!function`` helpers such as
hellaswag's ``utils.process_docs`` or wikitext's detokenizer) all come from
the installed stock YAML. Files that lm-eval can read as they are (HellaSwag
Arrow, ARC-Easy JSON, WinoGrande, LAMBADA, BLiMP) are referenced in the data
kit directly; the others are converted once into JSONL under
``cache_dir()/tasks/<key>/data/`` (``<key>`` hashes the data-dir path, this
module's ``FORMAT_VERSION`` and the lm-eval version and location):

==============  ===========================================================
wikitext        ``wiki.test.raw`` split into its 62 articles → ``{"page"}``,
                with the algorithm of lm-eval's former ``wikitext.py``
                builder behind ``EleutherAI/wikitext_document_level``
piqa            ``valid.jsonl`` + ``valid-labels.lst`` → ``label`` (int)
arc_challenge   AI2 nested JSONL → ``question`` / ``choices{text,label}``
boolq           ``label = int(answer)``
openbookqa      ``question_stem`` / ``choices{text,label}``
==============  ===========================================================

Conversions and YAMLs are written atomically (temp file + ``os.replace``) and
only when their content changes, so re-running is cheap and an interrupted run
never leaves a half file.

Zero-shot only: the local tasks carry only the evaluated split. With
``num_fewshot > 0`` lm-eval would fall back to drawing examples from that same
split, which is not what the stock tasks do (they use ``train``).

Name collisions with the stock tasks
------------------------------------
The generated tasks deliberately have the stock names (``arc_easy``,
``wikitext``, ``blimp``, ...). In lm-eval 0.4.13 ``TaskManager`` indexes the
built-in ``lm_eval/tasks`` folder first and each ``include_path`` afterwards,
and a later path *replaces* an earlier entry of the same name
(``lm_eval.tasks._index.TaskIndex.build``; it logs "Task 'arc_easy' from ...
overrides existing task from ..."). Hence:

* in Python, :func:`task_manager` returns
  ``TaskManager(include_path=folder, include_defaults=False)``: only the local
  tasks exist, so a name can never fall back to a Hub-loading stock task, and
  it checks that every requested name resolves to a YAML inside ``folder``;
* on the command line, ``lm_eval ... --tasks arc_easy --include_path <folder>``
  (the CLI keeps the defaults) gets the local task through that override rule;
  the group ``blimp`` is overridden too, and its 67 members resolve to the local
  ``blimp_*`` tasks. Both routes load the same YAML, hence the same numbers
  (checked by ``tests/test_evaltasks.py``). lm-eval releases other than 0.4.13
  may order paths differently: re-run that test after upgrading.

Run with ``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1``.

Public API: :data:`OFFLINE_TASKS`, :func:`prepare_tasks`, :func:`task_manager`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from prunelib.core.config import cache_dir
from prunelib.core.config import data_dir as default_data_dir

__all__ = ["OFFLINE_TASKS", "BLIMP_TASKS", "prepare_tasks", "task_manager"]

#: Bump when the converted files or the YAML layout change (part of the cache key).
FORMAT_VERSION = "1"

#: The 67 BLiMP paradigms (file ``blimp/<paradigm>.jsonl``, task ``blimp_<paradigm>``),
#: in the order of lm-eval's ``blimp/_blimp.yaml`` group.
BLIMP_PARADIGMS: tuple[str, ...] = (
    "adjunct_island", "anaphor_gender_agreement", "anaphor_number_agreement",
    "animate_subject_passive", "animate_subject_trans", "causative", "complex_NP_island",
    "coordinate_structure_constraint_complex_left_branch",
    "coordinate_structure_constraint_object_extraction",
    "determiner_noun_agreement_1", "determiner_noun_agreement_2",
    "determiner_noun_agreement_irregular_1", "determiner_noun_agreement_irregular_2",
    "determiner_noun_agreement_with_adj_2", "determiner_noun_agreement_with_adj_irregular_1",
    "determiner_noun_agreement_with_adj_irregular_2", "determiner_noun_agreement_with_adjective_1",
    "distractor_agreement_relational_noun", "distractor_agreement_relative_clause",
    "drop_argument", "ellipsis_n_bar_1", "ellipsis_n_bar_2",
    "existential_there_object_raising", "existential_there_quantifiers_1",
    "existential_there_quantifiers_2", "existential_there_subject_raising",
    "expletive_it_object_raising", "inchoative", "intransitive",
    "irregular_past_participle_adjectives", "irregular_past_participle_verbs",
    "irregular_plural_subject_verb_agreement_1", "irregular_plural_subject_verb_agreement_2",
    "left_branch_island_echo_question", "left_branch_island_simple_question",
    "matrix_question_npi_licensor_present", "npi_present_1", "npi_present_2",
    "only_npi_licensor_present", "only_npi_scope", "passive_1", "passive_2",
    "principle_A_c_command", "principle_A_case_1", "principle_A_case_2",
    "principle_A_domain_1", "principle_A_domain_2", "principle_A_domain_3",
    "principle_A_reconstruction", "regular_plural_subject_verb_agreement_1",
    "regular_plural_subject_verb_agreement_2", "sentential_negation_npi_licensor_present",
    "sentential_negation_npi_scope", "sentential_subject_island",
    "superlative_quantifiers_1", "superlative_quantifiers_2", "tough_vs_raising_1",
    "tough_vs_raising_2", "transitive", "wh_island", "wh_questions_object_gap",
    "wh_questions_subject_gap", "wh_questions_subject_gap_long_distance",
    "wh_vs_that_no_gap", "wh_vs_that_no_gap_long_distance", "wh_vs_that_with_gap",
    "wh_vs_that_with_gap_long_distance",
)
#: Individual BLiMP task names (also accepted by the functions below).
BLIMP_TASKS: tuple[str, ...] = tuple(f"blimp_{p}" for p in BLIMP_PARADIGMS)

#: Task names this module supports; ``blimp`` is the group (mean ``acc`` of its 67
#: tasks); any ``blimp_<paradigm>`` from :data:`BLIMP_TASKS` is accepted as well.
OFFLINE_TASKS: tuple[str, ...] = (
    "wikitext", "lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge",
    "winogrande", "boolq", "openbookqa", "blimp",
)


# ------------------------------------------------------------------ conversions
def _read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from None
    return out


def _wikitext_pages(files: list[Path]) -> list[dict]:
    """One ``{"page": ...}`` per article of the line-level raw file.

    Same algorithm as the ``wikitext.py`` builder lm-eval shipped (the source of
    ``EleutherAI/wikitext_document_level``): split the file on ``"\\n"``, start a
    new page at every top-level heading `` = Title = `` and join its lines with
    ``"\\n"``; blank pages are skipped except the last one.
    """
    with open(files[0], encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    pages: list[dict] = []
    current: list[str] = []
    for line in lines:
        rline = line.replace("= = =", "===").replace("= =", "==").strip()
        if rline.startswith("= ") and rline.endswith(" ="):
            page = "\n".join(current)
            if page.strip():
                pages.append({"page": page})
            current = []
        current.append(line)
    pages.append({"page": "\n".join(current)})
    return pages


def _piqa(files: list[Path]) -> list[dict]:
    records = _read_jsonl(files[0])
    with open(files[1], encoding="utf-8") as fh:
        labels = [int(line) for line in fh if line.strip()]
    if len(labels) != len(records):
        raise ValueError(f"{files[1]} has {len(labels)} labels for {len(records)} records in {files[0]}")
    return [{**rec, "label": lab} for rec, lab in zip(records, labels)]


def _flatten_ai2(rec: dict, question_key: str) -> dict:
    q = rec["question"]
    return {
        "id": rec["id"],
        question_key: q["stem"],
        "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]},
        "answerKey": rec["answerKey"],
    }


def _arc_challenge(files: list[Path]) -> list[dict]:
    return [_flatten_ai2(rec, "question") for rec in _read_jsonl(files[0])]


def _openbookqa(files: list[Path]) -> list[dict]:
    return [_flatten_ai2(rec, "question_stem") for rec in _read_jsonl(files[0])]


def _boolq(files: list[Path]) -> list[dict]:
    return [
        {"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
        for i, r in enumerate(_read_jsonl(files[0]))
    ]


# ------------------------------------------------------------------ task table
@dataclass(frozen=True)
class _Spec:
    stock_yaml: str                 # relative to lm_eval/tasks/
    split_key: str                  # "training_split" / "validation_split" / "test_split" evaluated
    split: str                      # split name (data_files key)
    files: tuple[str, ...]          # raw files, relative to the data dir
    convert: Callable[[list[Path]], list[dict]] | None = None
    loader: str = "json"            # HF packaged builder for the (converted) file


_SPECS: dict[str, _Spec] = {
    "wikitext": _Spec("wikitext/wikitext.yaml", "test_split", "test", ("wikitext2/wiki.test.raw",), _wikitext_pages),
    "lambada_openai": _Spec("lambada/lambada_openai.yaml", "test_split", "test", ("lambada_openai/lambada_test.jsonl",)),
    "hellaswag": _Spec("hellaswag/hellaswag.yaml", "validation_split", "validation",
                       ("hellaswag/data-00000-of-00001.arrow",), loader="arrow"),
    "piqa": _Spec("piqa/piqa.yaml", "validation_split", "validation", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa),
    "arc_easy": _Spec("arc/arc_easy.yaml", "test_split", "test", ("arc_easy/test.json",)),
    "arc_challenge": _Spec("arc/arc_challenge.yaml", "test_split", "test",
                           ("arc_challenge/ARC-Challenge-Test.jsonl",), _arc_challenge),
    "winogrande": _Spec("winogrande/default.yaml", "validation_split", "validation", ("winogrande/dev.jsonl",)),
    "boolq": _Spec("super_glue/boolq/default.yaml", "validation_split", "validation", ("boolq/dev.jsonl",), _boolq),
    "openbookqa": _Spec("openbookqa/openbookqa.yaml", "test_split", "test", ("openbookqa/test.jsonl",), _openbookqa),
}
for _p in BLIMP_PARADIGMS:
    _SPECS[f"blimp_{_p}"] = _Spec(f"blimp/{_p}.yaml", "validation_split", "train", (f"blimp/{_p}.jsonl",))
_BLIMP_GROUP_YAML = "blimp/_blimp.yaml"


# ------------------------------------------------------------------ helpers
def _stock_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def _expand(tasks: str | Iterable[str]) -> tuple[list[str], bool]:
    """Validate names; return (leaf task names in order, whether the blimp group is wanted)."""
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    unknown = [n for n in names if n not in OFFLINE_TASKS and n not in BLIMP_TASKS]
    if unknown:
        raise ValueError(
            f"unknown offline task(s) {unknown}; allowed: {list(OFFLINE_TASKS)} "
            f"or one of the 67 blimp_<paradigm> names (prunelib.core.evaltasks.BLIMP_TASKS)"
        )
    leaves: list[str] = []
    for n in names:
        for leaf in BLIMP_TASKS if n == "blimp" else (n,):
            if leaf not in leaves:
                leaves.append(leaf)
    return leaves, "blimp" in names


def _write_if_changed(path: Path, text: str) -> None:
    """Atomically write ``text`` to ``path`` unless it already holds exactly that."""
    data = text.encode("utf-8")
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _folder(ddir: Path) -> Path:
    import lm_eval

    key = "\n".join([str(ddir), FORMAT_VERSION, getattr(lm_eval, "__version__", "?"), str(_stock_dir())])
    return cache_dir() / "tasks" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _yaml_text(include: Path, body: dict) -> str:
    head = "# Written by prunelib.core.evaltasks: the stock lm-eval task, read from local files.\n"
    return head + yaml.safe_dump({"include": str(include), **body}, sort_keys=False, allow_unicode=True)


_CHECKED: set[tuple] = set()  # (path, size, mtime) of the raw files already read whole


def _check_readable(task: str, path: Path, loader: str) -> None:
    """Read a file the HF loader will read, so a truncated or malformed one fails here, named with its
    path (inside lm-eval it becomes a DatasetGenerationError that names no file)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _CHECKED:
        return
    try:
        if st.st_size == 0:
            raise ValueError("the file is empty")
        if loader == "arrow":
            import pyarrow as pa

            with pa.memory_map(str(path)) as src:
                n = pa.ipc.open_stream(src).read_all().num_rows
            if n == 0:
                raise ValueError("the table has no rows")
        else:
            text = path.read_text(encoding="utf-8")
            # one JSON document (an array of records), else JSON Lines (the error names the first bad line)
            records = json.loads(text) if text.lstrip().startswith("[") else _read_jsonl(path)
            if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
                raise ValueError("expected a JSON array of records or one JSON record per line")
    except Exception as err:  # ValueError, OSError, UnicodeDecodeError, pyarrow.ArrowInvalid and friends
        raise ValueError(f"malformed data for task {task!r} in {path}: {type(err).__name__}: {err} "
                         f"(truncated or not the expected format; see SOURCES.md)") from err
    _CHECKED.add(key)


# ------------------------------------------------------------------ public API
def prepare_tasks(tasks: str | Iterable[str], data_dir: str | Path | None = None) -> Path:
    """Write local-file lm-eval task YAMLs for ``tasks``; return the folder to include.

    Args:
        tasks: names from :data:`OFFLINE_TASKS` (``"blimp"`` = the group and its 67
            tasks) or individual ``blimp_<paradigm>`` names.
        data_dir: the offline data kit; default ``prunelib.core.config.data_dir()``
            (env ``PRUNELIB_DATA``).

    Returns:
        ``cache_dir()/tasks/<key>``: pass it as ``--include_path`` to the lm-eval CLI
        or use :func:`task_manager`. The folder accumulates the tasks prepared so far.

    Raises:
        ValueError: an unknown task name (the message lists the allowed ones).
        FileNotFoundError: one error listing every missing data file.
    """
    leaves, want_group = _expand(tasks)
    ddir = Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir()

    missing = [f for leaf in leaves for f in _SPECS[leaf].files if not (ddir / f).is_file()]
    if missing:
        listing = "\n".join(f"  - {ddir / f}" for f in dict.fromkeys(missing))
        raise FileNotFoundError(
            f"offline evaluation data missing for {len(missing)} file(s) in data dir {ddir}:\n{listing}\n"
            f"Point PRUNELIB_DATA (or data_dir=) at the offline data kit; see its SOURCES.md."
        )

    folder = _folder(ddir)
    stock = _stock_dir()
    for leaf in leaves:
        spec = _SPECS[leaf]
        raw = [ddir / f for f in spec.files]
        if spec.convert is None:
            data_file = raw[0]
            _check_readable(leaf, data_file, spec.loader)
        else:
            data_file = folder / "data" / f"{leaf}.jsonl"
            try:
                records = spec.convert(raw)
            except (ValueError, KeyError, TypeError) as err:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"malformed data for task {leaf!r} in {', '.join(map(str, raw))}: "
                                 f"{type(err).__name__}: {err} (see SOURCES.md for the expected format)") from err
            _write_if_changed(data_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        splits = {k: None for k in ("training_split", "validation_split", "test_split")}
        splits[spec.split_key] = spec.split
        body = {
            "dataset_path": spec.loader,
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {spec.split: str(data_file)}},
            **splits,
        }
        sub = "blimp/" if leaf.startswith("blimp_") else ""
        _write_if_changed(folder / f"{sub}{leaf}.yaml", _yaml_text(stock / spec.stock_yaml, body))
    if want_group:
        _write_if_changed(folder / "blimp" / "_blimp.yaml", _yaml_text(stock / _BLIMP_GROUP_YAML, {}))
    return folder


def task_manager(tasks: str | Iterable[str], offline: bool = True, data_dir: str | Path | None = None):
    """An ``lm_eval.tasks.TaskManager`` under which ``tasks`` have their standard names.

    ``offline=True``: runs :func:`prepare_tasks` and returns
    ``TaskManager(include_path=folder, include_defaults=False)``, which knows only
    the local-file tasks (no stock task can be picked by mistake); checks that every
    requested name resolves to a YAML in that folder.
    ``offline=False``: the stock ``TaskManager()`` (tasks load from the Hub); names
    are still validated against :data:`OFFLINE_TASKS`.
    """
    from lm_eval.tasks import TaskManager

    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not offline:
        _expand(names)
        return TaskManager()
    folder = prepare_tasks(names, data_dir=data_dir)
    tm = TaskManager(include_path=str(folder), include_defaults=False)
    for name in names:
        entry = tm.task_index.get(name)
        path = getattr(entry, "yaml_path", None)
        if path is None or folder not in Path(path).resolve().parents:
            raise RuntimeError(f"task {name!r} does not resolve to a local YAML in {folder} (got {path})")
    return tm


def evaluation_files() -> set[str]:
    """Every data-kit file (relative to the data dir) that some evaluation task reads.

    Calibration must never read one of these (see :mod:`prunelib.model.calibration`).
    """
    return {f for spec in _SPECS.values() for f in spec.files}
