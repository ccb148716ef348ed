"""Hardware specs for the roofline: peak FLOP/s per dtype and memory bandwidth.

GPUs come from their datasheets (dense, i.e. without 2:4 sparsity, tensor-core
figures for 16-bit types; plain FP32 for float32). The local CPU is measured by a
short micro-benchmark (a large copy for bandwidth, square matmuls for FLOP/s per
dtype) and cached on disk, keyed by CPU model, thread count and torch version.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch

from .config import cache_dir

T = 1e12


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    peak_flops: dict  # dtype name -> FLOP/s
    bandwidth: float  # bytes/s
    source: str = ""
    extra: dict = field(default_factory=dict)
    sparse24: bool = False  # has semi-structured (2:4) sparse GEMM kernels: 2x dense 16-bit tensor throughput

    def flops(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise ValueError(f"{self.name} has no peak FLOP/s for dtype {dtype!r}; known: {sorted(self.peak_flops)}")
        return self.peak_flops[dtype]


KNOWN = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): FP32 67 TFLOPS, BF16/FP16 tensor 1,979 TFLOPS
    # "with sparsity" -> 989.5 dense; HBM3 3.35 TB/s.
    "h100-sxm": HardwareSpec("h100-sxm", {"float32": 67 * T, "bfloat16": 989.5 * T, "float16": 989.5 * T}, 3.35e12,
                             "NVIDIA H100 datasheet, SXM5 column", sparse24=True),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): same compute as H100 SXM; HBM3e 4.8 TB/s.
    "h200": HardwareSpec("h200", {"float32": 67 * T, "bfloat16": 989.5 * T, "float16": 989.5 * T}, 4.8e12,
                         "NVIDIA H200 datasheet, SXM column", sparse24=True),
    # NVIDIA A100 datasheet (80GB SXM): FP32 19.5 TFLOPS, BF16/FP16 tensor 312 TFLOPS dense; HBM2e 2,039 GB/s.
    "a100-80gb": HardwareSpec("a100-80gb", {"float32": 19.5 * T, "bfloat16": 312 * T, "float16": 312 * T}, 2.039e12,
                              "NVIDIA A100 datasheet, 80GB SXM column", sparse24=True),
    # NVIDIA RTX PRO 6000 Blackwell Workstation Edition datasheet: FP32 125 TFLOPS; 4,000 AI TOPS is FP4
    # with sparsity, i.e. ~500 TFLOPS dense FP16/BF16 tensor (FP4 dense 2,000 -> FP8 1,000 -> FP16 500);
    # GDDR7 1,792 GB/s.
    "rtx-pro-6000": HardwareSpec("rtx-pro-6000", {"float32": 125 * T, "bfloat16": 500 * T, "float16": 500 * T}, 1.792e12,
                                 "NVIDIA RTX PRO 6000 Blackwell datasheet (16-bit dense derived from FP4 sparse TOPS)", sparse24=True),
}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _best_seconds(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cpu(threads: int | None = None, size_mb: int = 256, gemm_n: int = 1024) -> HardwareSpec:
    """Micro-benchmark this CPU: copy bandwidth (read + write) and matmul FLOP/s per dtype."""
    threads = threads or torch.get_num_threads()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        bw = 2 * src.numel() * 4 / _best_seconds(lambda: dst.copy_(src), 5)
        del src, dst
        peaks = {}
        for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):  # float16: no fast CPU kernels
            a = torch.randn(gemm_n, gemm_n).to(dt)
            b = torch.randn(gemm_n, gemm_n).to(dt)
            peaks[name] = 2 * gemm_n**3 / _best_seconds(lambda: a @ b, 3)
    finally:
        torch.set_num_threads(old)
    return HardwareSpec(f"cpu ({cpu_name()}, {threads} threads)", peaks, bw,
                        "measured by prunelib.hardware.measure_cpu", {"threads": threads, "torch": torch.__version__})


def local_cpu(threads: int | None = None, refresh: bool = False) -> HardwareSpec:
    """The measured spec of this CPU, from the on-disk cache when there is one."""
    threads = threads or torch.get_num_threads()
    key = f"{cpu_name()}|{threads}|{torch.__version__}|{os.cpu_count()}"
    path = cache_dir() / "hardware.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    if refresh or key not in table:
        table[key] = asdict(measure_cpu(threads))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)
    return HardwareSpec(**table[key])


def spec(name: str) -> HardwareSpec:
    """A spec by name: one of :data:`KNOWN`, or ``"cpu"`` for the measured local CPU."""
    if name == "cpu":
        return local_cpu()
    if name not in KNOWN:
        raise ValueError(f"unknown hardware {name!r}; known: {['cpu', *KNOWN]}")
    return KNOWN[name]


def for_device(device) -> HardwareSpec:
    """The spec that matches a torch device: the measured CPU, or a GPU recognised by name."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return local_cpu()
    name = torch.cuda.get_device_name(dev).lower()
    for key, needle in (("h200", "h200"), ("h100-sxm", "h100"), ("a100-80gb", "a100"), ("rtx-pro-6000", "rtx pro 6000")):
        if needle in name:
            return KNOWN[key]
    raise ValueError(f"no datasheet spec for GPU {name!r}; known: {list(KNOWN)} (pass one explicitly)")
