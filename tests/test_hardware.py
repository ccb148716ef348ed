import time

import pytest

from prunelib.cost import hardware
from prunelib.cost.hardware import HardwareSpec, match_gpu


@pytest.mark.parametrize("name,key", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200-sxm"),
    ("NVIDIA H200 NVL", "h200-nvl"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb-sxm"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb-sxm"),
    ("NVIDIA A100-PCIE-40GB", "a100-40gb-pcie"),
    ("NVIDIA A100 80GB PCIe", "a100-80gb-pcie"),
    ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", "rtx-pro-6000"),
    ("NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition", "rtx-pro-6000-maxq"),
    ("nvidia  h200   nvl", "h200-nvl"),  # case and spacing are normalised
])
def test_gpu_names_match_exactly(name, key):
    assert match_gpu(name) == key


@pytest.mark.parametrize("name", [
    "NVIDIA H100", "NVIDIA H100 80GB HBM3e", "NVIDIA H800", "NVIDIA H200 NVL 2", "NVIDIA A100", "NVIDIA A10",
    "NVIDIA RTX PRO 6000 Blackwell Server Edition", "NVIDIA GeForce RTX 5090", "Tesla V100-SXM2-16GB",
])
def test_unknown_or_ambiguous_gpu_names_match_nothing(name):
    """Substring matching gave H100 PCIe/NVL the SXM figures and A100-40GB the 80GB ones."""
    assert match_gpu(name) is None


def test_an_unknown_gpu_gets_a_measured_spec(monkeypatch):
    import torch

    measured = HardwareSpec("gpu (NVIDIA H800, measured)", {"bfloat16": 1e15}, 3e12, measured=True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "NVIDIA H800")
    monkeypatch.setattr(hardware, "measured_gpu", lambda dev, refresh=False: measured)
    assert hardware.for_device("cuda") is measured
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "NVIDIA H100 NVL")
    assert hardware.for_device("cuda") is hardware.KNOWN["h100-nvl"]


def test_datasheet_specs_are_dense_and_cited():
    k = hardware.KNOWN
    for key in hardware.GPU_NAMES.values():
        s = k[key]
        assert "datasheet" in s.source and "https://" in s.source and s.sparse24 and not s.measured
        assert s.peak_flops["bfloat16"] == s.peak_flops["float16"] < 1.0e15  # no SKU reaches 1 PFLOPS dense
    assert k["h100-sxm"].peak_flops["bfloat16"] == 989.5e12 and k["h100-pcie"].peak_flops["bfloat16"] == 756.5e12
    assert k["h100-nvl"].bandwidth == 3.9e12 and k["h200-nvl"].peak_flops["bfloat16"] < k["h200-sxm"].peak_flops["bfloat16"]
    assert k["a100-40gb-sxm"].bandwidth < k["a100-80gb-pcie"].bandwidth < k["a100-80gb-sxm"].bandwidth
    assert hardware.spec("h200") is k["h200-sxm"] and hardware.spec("a100-80gb") is k["a100-80gb-sxm"]


def _spec(age_s=0.0, load=0.1, under=False, bw=1e10):
    return HardwareSpec("cpu (test)", {"float32": 1e11}, bw, extra={"timestamp": time.time() - age_s, "loadavg": load,
                                                                    "under_load": under, "cores": 2, "device": "cpu",
                                                                    "threads": 2}, measured=True)


def test_when_a_measured_spec_is_measured_again():
    assert hardware.needs_remeasure(_spec(60)) is None
    assert "stale" in hardware.needs_remeasure(_spec(2 * 86400))
    assert hardware.needs_remeasure(_spec(60, load=3.0, under=True)) is None  # just measured: not in a loop
    assert "under load" in hardware.needs_remeasure(_spec(hardware.RETRY_S + 1, load=3.0, under=True))
    assert "no timestamp" in hardware.needs_remeasure(HardwareSpec("old", {}, 1.0, measured=True))


def test_local_cpu_remeasures_stale_and_loaded_specs_keeping_the_best(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELIB_CACHE", str(tmp_path))
    runs = iter([_spec(2 * 86400, bw=5e9), _spec(hardware.RETRY_S + 5, load=9, under=True, bw=2e9), _spec(bw=3e9)])
    monkeypatch.setattr(hardware, "measure_cpu", lambda threads=None: next(runs))
    assert hardware.local_cpu().bandwidth == 5e9  # first measurement (stale already: its age is faked)
    a = hardware.local_cpu()  # stale -> measured again; the stale figure is not kept
    assert a.bandwidth == 2e9 and a.extra["under_load"]
    b = hardware.local_cpu()  # taken under load and older than RETRY_S -> measured again, best of the two fresh
    assert b.bandwidth == 3e9 and b.extra["best_of_runs"] == 2
    assert hardware.local_cpu() == b  # fresh and quiet: from the cache


def test_measure_cpu_records_when_and_under_what_load():
    s = hardware.measure_cpu(1, size_mb=4, gemm_n=64, seconds=0.05)
    assert s.measured and s.bandwidth > 1e8 and s.flops("float32") > 1e7
    assert abs(s.extra["timestamp"] - time.time()) < 60 and s.extra["loadavg"] >= 0 and s.extra["cores"] >= 1
    assert {"copy_bandwidth", "read_bandwidth", "under_load", "threads"} <= set(s.extra)


def test_a_roofline_slower_than_a_measurement_remeasures_then_flags(monkeypatch):
    hardware._REMEASURED.clear()
    slow, fast = _spec(bw=1e9), _spec(bw=1e12)
    remeasured = []

    def fake_local_cpu(threads=None, refresh=False):
        remeasured.append(refresh)
        return fast

    monkeypatch.setattr(hardware, "local_cpu", fake_local_cpu)
    roof = lambda hw: {"dense": 1e9 / hw.bandwidth}  # noqa: E731  1 s on the slow spec, 1 ms on the fast one
    assert hardware.check_roofline(slow, roof, {"dense": 0.5}) == (fast, None)  # re-measured: now sane
    assert remeasured == [True]
    hw, flag = hardware.check_roofline(fast, roof, {"dense": 1e-4})  # still slower after re-measuring: flagged
    assert hw is fast and "roofline 1 ms > measured 0.1 ms" in flag and "after re-measuring" in flag
    sheet = hardware.KNOWN["h100-sxm"]
    hw, flag = hardware.check_roofline(sheet, lambda hw: {"decode": 2.0}, {"decode": 1.0})
    assert hw is sheet and "datasheet spec h100-sxm" in flag  # a datasheet is not re-measured
    assert hardware.check_roofline(sheet, lambda hw: {"decode": 0.5}, {"decode": 1.0}) == (sheet, None)
