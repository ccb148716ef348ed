import json

import pytest

from prunelib.measure import samples


def _lm_eval_samples():
    """Three documents as lm-eval's log_samples gives them (accuracy task), out of order."""
    return [{"doc_id": d, "doc_hash": f"{d}abcdef0123", "metrics": ["acc", "acc_norm"], "acc": float(d % 2),
             "acc_norm": 1.0} for d in (2, 0, 1)]


def test_compact_accuracy_and_perplexity():
    c = samples.compact("arc_easy", _lm_eval_samples())
    assert c == {"task": "arc_easy", "doc_ids": [0, 1, 2], "doc_hashes": ["0abcdef0", "1abcdef0", "2abcdef0"],
                 "outcomes": {"acc": [0.0, 1.0, 0.0], "acc_norm": [1.0, 1.0, 1.0]}}
    ppl = [{"doc_id": 0, "doc_hash": "ff", "metrics": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
            "word_perplexity": (-12.5, 10), "byte_perplexity": (-12.5, 50), "bits_per_byte": (-12.5, 50)}]
    c = samples.compact("wikitext", ppl)
    assert c["loglikelihood"] == [-12.5] and c["words"] == [10] and c["bytes"] == [50] and c["outcomes"] == {}
    lam = [{"doc_id": 0, "doc_hash": "aa", "metrics": ["perplexity", "acc"], "perplexity": -3.0, "acc": 1}]
    c = samples.compact("lambada_openai", lam)
    assert c["loglikelihood"] == [-3.0] and c["outcomes"] == {"acc": [1.0]}


def test_write_is_atomic_and_read_back(tmp_path, monkeypatch):
    payload = samples.compact("arc_easy", _lm_eval_samples())
    path = samples.write(tmp_path, "abc", payload)
    assert samples.read(tmp_path, "abc") == payload and json.loads(path.read_text()) == payload
    assert samples.read(tmp_path, "missing") is None
    assert [p.name for p in tmp_path.iterdir()] == ["abc.json"]  # no temporary file left

    def boom(*a, **k):
        raise OSError("disk full")

    from prunelib.core import evaltasks

    monkeypatch.setattr(evaltasks.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        samples.write(tmp_path, "abc", {"task": "other"})
    assert samples.read(tmp_path, "abc") == payload  # the old file whole, no partial one
    assert [p.name for p in tmp_path.iterdir()] == ["abc.json"]


def test_pooled_groups_and_refuses_unequal_parts():
    a = samples.compact("blimp_a", _lm_eval_samples())
    b = dict(a, task="blimp_b")
    g = samples.pooled("blimp", [a, b])
    assert g["doc_ids"] == [0, 1, 2, 10**7, 10**7 + 1, 10**7 + 2] and g["outcomes"]["acc"] == [0, 1, 0] * 2
    short = dict(b, doc_ids=[0], doc_hashes=["x"], outcomes={"acc": [1.0]})
    with pytest.raises(ValueError, match=r"different document counts \[1, 3\]"):
        samples.pooled("blimp", [a, short])
