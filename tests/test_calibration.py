import pytest
import torch

from prunelib.model import calibration
from prunelib.core import evaltasks
from prunelib.core.config import data_dir

pytestmark = pytest.mark.skipif(not (data_dir() / "SOURCES.md").is_file(), reason="offline data kit not found")


def test_calibration_never_reads_an_evaluation_file():
    assert not set(calibration.CALIBRATION_FILES.values()) & evaltasks.evaluation_files()
    with pytest.raises(ValueError, match="calibration text only"):
        calibration.calibration_file("wikitext2_test")


def test_deterministic_batches(embedded):
    tok = embedded[1]
    a = calibration.calibration_batch(tok, n=4, length=64, seed=7)
    b = calibration.calibration_batch(tok, n=4, length=64, seed=7)
    c = calibration.calibration_batch(tok, n=4, length=64, seed=8)
    assert a.input_ids.shape == (4, 64) and a.input_ids.dtype == torch.long
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert [x.shape[0] for x in a.batches(3)] == [3, 1]


@pytest.mark.parametrize("source", ["wikitext2", "c4"])
def test_windows_do_not_come_from_the_test_split(embedded, source):
    tok = embedded[1]
    test_text = (data_dir() / "wikitext2/wiki.test.raw").read_text()
    cal = calibration.calibration_batch(tok, n=16, length=128, seed=0, source=source)
    for row in cal.input_ids:
        words = tok.decode(row).split()
        probe = " ".join(words[1:-1])[:200]  # drop the possibly cut first and last words
        assert len(probe) > 40 and probe not in test_text


def test_missing_calibration_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="wiki.valid.raw is missing"):
        calibration.calibration_file("wikitext2", root=tmp_path)


def test_bad_sizes(embedded):
    with pytest.raises(ValueError, match="length must be a positive integer"):
        calibration.calibration_batch(embedded[1], n=2, length=0)


def test_criterion_statistics_are_computed_once_per_model_and_calibration(tiny_model, cal):
    """@per_calibration: a second rung on the same dense model and windows reuses the statistics (no forward); a
    caller's edit of what it got reaches no later call; other weights, other windows or other arguments recompute."""
    import copy

    from prunelib.pruning.depth import layer_statistics

    forwards = []
    hook = tiny_model.register_forward_hook(lambda *a: forwards.append(1))
    first = layer_statistics(tiny_model, cal)
    n = len(forwards)
    assert n > 0
    again = layer_statistics(tiny_model, cal)
    assert len(forwards) == n and all(torch.equal(first[k], again[k]) for k in first)
    again["layer"].zero_()
    assert torch.equal(layer_statistics(tiny_model, cal)["layer"], first["layer"]) and len(forwards) == n
    layer_statistics(tiny_model, cal, block=2)  # other arguments: computed
    assert len(forwards) == 2 * n
    other = calibration.CalibrationSet(cal.input_ids.flip(0), cal.source, cal.file, cal.seed + 1)
    layer_statistics(tiny_model, other)
    assert len(forwards) == 3 * n
    hook.remove()
    changed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in changed.parameters():
            p.mul_(1.5)
    assert not torch.equal(layer_statistics(changed, cal)["layer"], first["layer"])
    assert all(torch.equal(layer_statistics.uncached(tiny_model, cal)[k], first[k]) for k in first)
