"""save_pruned never deletes what it did not write: a folder of other files is refused unless overwrite=True
(then its files are kept), a file at the target is always refused, and a replaced checkpoint loses only the
files its own save wrote."""
import json
import os

import pytest
import torch

from prunelib import pruning
from prunelib.model import checkpoint_folder
from prunelib.model.adapter import ModelAdapter
from prunelib.model.checkpoint import STRUCTURE_FILE, CheckpointError
from prunelib.model.models import load_pruned, save_pruned


@pytest.fixture
def pruned(tiny_model):
    return pruning.prune(tiny_model, "last_n", 0.25)[0]


def layers(path) -> int:
    return len(ModelAdapter(load_pruned(path)).layers)


def siblings(tmp_path) -> list:
    return sorted(p.name for p in tmp_path.iterdir())


def test_a_folder_of_other_files_is_refused_and_left_as_it_was(pruned, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointError, match=r"thesis.tex.*nothing saved.*overwrite=True"):
        save_pruned(pruned, tmp_path / "m")
    assert siblings(tmp_path / "m") == ["thesis.tex"] and (tmp_path / "m" / "thesis.tex").read_text() == "years of work"
    assert siblings(tmp_path) == ["m"]  # no temporary folder left


def test_overwrite_saves_beside_the_other_files_and_keeps_them(pruned, tmp_path):
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "thesis.tex").write_text("years of work")
    (tmp_path / "m" / "sub" / "data.csv").write_text("1,2")
    save_pruned(pruned, tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "thesis.tex").read_text() == "years of work"
    assert (tmp_path / "m" / "sub" / "data.csv").read_text() == "1,2"
    assert layers(tmp_path / "m") == 3 and siblings(tmp_path) == ["m"]


def test_overwrite_keeps_a_file_whose_name_the_checkpoint_needs_beside_it(pruned, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"mine": true}')
    with pytest.warns(UserWarning, match=r"config.json.*kept in .*m\.replaced-"):
        save_pruned(pruned, tmp_path / "m", overwrite=True)
    backup = [p for p in tmp_path.iterdir() if p.name.startswith("m.replaced-")]
    assert len(backup) == 1 and json.loads((backup[0] / "config.json").read_text()) == {"mine": True}
    assert layers(tmp_path / "m") == 3


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_at_the_target_is_always_refused(pruned, tmp_path, overwrite):
    (tmp_path / "m").write_text("not a folder")
    with pytest.raises(CheckpointError, match="is a file"):
        save_pruned(pruned, tmp_path / "m", overwrite=overwrite)
    assert (tmp_path / "m").read_text() == "not a folder" and siblings(tmp_path) == ["m"]


def test_a_symlink_at_the_target_is_refused(pruned, tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "m")
    with pytest.raises(CheckpointError, match="symbolic link"):
        save_pruned(pruned, tmp_path / "m", overwrite=True)
    assert (tmp_path / "m").is_symlink() and siblings(tmp_path / "real") == []


@pytest.mark.parametrize("swap", ["exchange", "two_renames"])
def test_replacing_a_checkpoint_deletes_only_what_its_save_wrote(tiny_model, pruned, tmp_path, embedded, monkeypatch,
                                                                 swap):
    if swap == "two_renames":  # where renameat2 is missing
        monkeypatch.setattr(checkpoint_folder, "_exchange", lambda a, b: False)
    _, tok = embedded
    save_pruned(pruning.prune(tiny_model, "last_n", 0.5)[0], tmp_path / "m", tok)  # with a tokenizer
    assert (tmp_path / "m" / "tokenizer.json").exists()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    save_pruned(pruned, tmp_path / "m")  # without one: the old tokenizer's files were the old save's
    assert not (tmp_path / "m" / "tokenizer.json").exists()
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"
    assert layers(tmp_path / "m") == 3 and siblings(tmp_path) == ["m"]


def test_a_file_the_old_save_wrote_but_someone_changed_is_kept(pruned, tmp_path):
    save_pruned(pruned, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"edited by hand": "and longer than before, so not the saved file"}')
    with pytest.warns(UserWarning, match="config.json"):
        save_pruned(pruned, tmp_path / "m")
    backup = next(p for p in tmp_path.iterdir() if p.name.startswith("m.replaced-"))
    assert "edited by hand" in (backup / "config.json").read_text()


def test_a_failed_save_leaves_the_old_checkpoint(pruned, tmp_path):
    save_pruned(pruned, tmp_path / "m")
    bad = pruning.prune(pruned, "last_n", 0.34)[0]
    bad.model.layers[0].mlp.scale_fn = lambda x: 2 * x  # refused: a closure is not data
    with pytest.raises(CheckpointError, match="scale_fn"):
        save_pruned(bad, tmp_path / "m")
    assert layers(tmp_path / "m") == 3 and siblings(tmp_path) == ["m"]


def test_the_structure_lists_the_files_its_save_wrote(pruned, tmp_path):
    save_pruned(pruned, tmp_path / "m")
    files = json.loads((tmp_path / "m" / STRUCTURE_FILE).read_text())["files"]
    assert sorted(files) == ["config.json", "model.safetensors", "prunelib_state.safetensors"]
    assert all(files[n] == (tmp_path / "m" / n).stat().st_size for n in files)


def test_an_empty_folder_is_used(pruned, tmp_path):
    (tmp_path / "m").mkdir()
    save_pruned(pruned, tmp_path / "m")
    assert layers(tmp_path / "m") == 3 and siblings(tmp_path) == ["m"]
    assert torch.equal(load_pruned(tmp_path / "m").lm_head.weight, pruned.lm_head.weight)
