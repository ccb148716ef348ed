import pytest
import torch

from prunelib import timing


def test_latency_summary():
    lat = timing.Latency([3.0, 1.0, 2.0, 4.0, 5.0])
    assert lat.median == 3.0 and lat.n == 5
    assert lat.p10 < lat.median < lat.p90
    assert lat.summary()["std"] == pytest.approx(1.5811, rel=1e-3)


def test_measure_keeps_raw_samples_and_kv_length(tiny_model):
    t = timing.measure(tiny_model, "decode", 2, 16, reps=5, warmup=1)
    assert t.latency.n == 5 and all(s > 0 for s in t.latency.samples)
    work = timing.Workload(tiny_model, "decode", 2, 16)
    for _ in range(3):
        work()
        work.reset()
        assert work.cache.get_seq_length() == 16  # every sample sees KV length S


def test_decode_step_equals_full_forward(tiny_model):
    """The timed decode step computes what a full forward over S+1 tokens computes."""
    work = timing.Workload(tiny_model, "decode", 1, 12, seed=3)
    out = work().logits[:, -1]
    prompt = timing._tokens(tiny_model, 1, 12, 3)
    full = torch.cat([prompt, work.inputs["input_ids"]], dim=1)
    with torch.inference_mode():
        ref = tiny_model(full).logits[:, -1]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_model_against_itself_ci_contains_one(embedded):
    c = timing.compare(embedded[0], embedded[0], "decode", 1, 64, reps=30, warmup=3)
    assert c.ci_low <= 1.0 <= c.ci_high, str(c)
    assert c.base.n == c.cand.n == 30


def test_bootstrap_detects_a_real_difference():
    base = [2.0 + 0.01 * (i % 5) for i in range(30)]
    cand = [1.0 + 0.01 * (i % 5) for i in range(30)]
    lo, hi = timing.bootstrap_ratio_ci(base, cand)
    assert 1.9 < lo <= hi < 2.1


@pytest.mark.parametrize("args,match", [
    (("prefill", 0, 8), "batch"), (("decode", 1, 0), "length"), (("score", 1, 8), "phase"),
])
def test_bad_input(tiny_model, args, match):
    with pytest.raises(ValueError, match=match):
        timing.measure(tiny_model, *args)


def test_cuda_graph_needs_cuda(tiny_model):
    with pytest.raises(ValueError, match="cuda_graph"):
        timing.Workload(tiny_model, "decode", 1, 8, cuda_graph=True)


@pytest.mark.cuda
@pytest.mark.parametrize("graph", [False, True])
def test_cuda_timing(tiny_model, graph):
    m = tiny_model.cuda()
    for phase in ("prefill", "decode"):
        t = timing.measure(m, phase, 2, 64, reps=5, cuda_graph=graph)
        assert t.latency.n == 5 and t.latency.median > 0
    c = timing.compare(m, m, "decode", 1, 64, reps=10, cuda_graph=graph)
    assert c.speedup > 0
