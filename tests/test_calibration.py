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
