"""Hardware specs for the roofline: peak FLOP/s per dtype and memory bandwidth.

GPUs come from their datasheets (dense tensor-core figures for 16-bit types, i.e. half the
"with sparsity" number the datasheets print; plain FP32 for float32), matched by the exact
device name torch reports, normalised (case, "NVIDIA " prefix, hyphens), never by substring.
A GPU not in :data:`GPU_NAMES` gets a measured spec (a GEMM and a copy micro-benchmark on
it), never another GPU's figures. The local CPU is measured the same way.

A measured spec can be wrong when the machine is busy: the micro-benchmark runs several
seconds, keeps the best of repeated runs (and of earlier measurements of the same machine
that are still fresh), and records a timestamp and the load average. It is measured again
when it is older than :data:`STALE_S` or was taken under load (1-minute load average above
half the cores) and is older than :data:`RETRY_S`. :func:`check_roofline` enforces that a
roofline is never slower than a measured time: it re-measures the spec once and otherwise
returns a flag for the row.
"""
from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from prunelib.core.config import cache_dir

T = 1e12
STALE_S = 24 * 3600.0  # a measured spec older than this is measured again
RETRY_S = 600.0  # a spec taken under load is measured again once it is older than this
LOAD_FRACTION = 0.5  # "under load": 1-minute load average above this fraction of the cores


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    peak_flops: dict  # dtype name -> FLOP/s
    bandwidth: float  # bytes/s
    source: str = ""
    extra: dict = field(default_factory=dict)
    sparse24: bool = False  # has semi-structured (2:4) sparse GEMM kernels: 2x dense 16-bit tensor throughput
    measured: bool = False  # from a micro-benchmark (extra: timestamp, load average, ...), not a datasheet

    def flops(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise ValueError(f"{self.name} has no peak FLOP/s for dtype {dtype!r}; known: {sorted(self.peak_flops)}")
        return self.peak_flops[dtype]


def _gpu(name, fp32, bf16_sparse, bw_gbs, source):
    """A datasheet spec: ``bf16_sparse`` is the printed "with sparsity" BF16/FP16 tensor figure (TFLOPS),
    halved to the dense peak."""
    dense = bf16_sparse / 2 * T
    return HardwareSpec(name, {"float32": fp32 * T, "bfloat16": dense, "float16": dense}, bw_gbs * 1e9, source,
                        sparse24=True)


H100_SHEET = "NVIDIA H100 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h100/"
H200_SHEET = "NVIDIA H200 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h200/"
A100_SHEET = ("NVIDIA A100 Tensor Core GPU datasheet, https://www.nvidia.com/content/dam/en-zz/Solutions/"
              "Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf")
RTX6000_SHEET = ("NVIDIA RTX PRO 6000 Blackwell datasheet, https://www.nvidia.com/en-us/products/workstations/"
                 "professional-desktop-gpus/rtx-pro-6000/ (16-bit dense derived from the FP4 sparse AI TOPS: "
                 "FP4 sparse / 2 dense / 2 FP8 / 2 FP16)")

KNOWN = {
    # H100 datasheet columns: SXM FP32 67 TFLOPS, BF16 1,979* TFLOPS, HBM3 3.35 TB/s;
    # PCIe FP32 51, BF16 1,513*, HBM2e 2.0 TB/s; NVL FP32 60, BF16 1,671*, HBM3 3.9 TB/s (* with sparsity)
    "h100-sxm": _gpu("h100-sxm", 67, 1979, 3350, H100_SHEET + ", H100 SXM column"),
    "h100-pcie": _gpu("h100-pcie", 51, 1513, 2000, H100_SHEET + ", H100 PCIe column"),
    "h100-nvl": _gpu("h100-nvl", 60, 1671, 3900, H100_SHEET + ", H100 NVL column"),
    # H200 datasheet: SXM FP32 67, BF16 1,979*, HBM3e 4.8 TB/s; NVL FP32 60, BF16 1,671*, 4.8 TB/s
    "h200-sxm": _gpu("h200-sxm", 67, 1979, 4800, H200_SHEET + ", H200 SXM column"),
    "h200-nvl": _gpu("h200-nvl", 60, 1671, 4800, H200_SHEET + ", H200 NVL column"),
    # A100 datasheet: FP32 19.5, BF16 624* (312 dense) for every variant; bandwidth 40GB PCIe 1,555 GB/s,
    # 40GB SXM 1,555 GB/s, 80GB PCIe 1,935 GB/s, 80GB SXM 2,039 GB/s
    "a100-40gb-pcie": _gpu("a100-40gb-pcie", 19.5, 624, 1555, A100_SHEET + ", A100 40GB PCIe column"),
    "a100-40gb-sxm": _gpu("a100-40gb-sxm", 19.5, 624, 1555, A100_SHEET + ", A100 40GB SXM column"),
    "a100-80gb-pcie": _gpu("a100-80gb-pcie", 19.5, 624, 1935, A100_SHEET + ", A100 80GB PCIe column"),
    "a100-80gb-sxm": _gpu("a100-80gb-sxm", 19.5, 624, 2039, A100_SHEET + ", A100 80GB SXM column"),
    # RTX PRO 6000 Blackwell datasheet: Workstation Edition FP32 125 TFLOPS, 4,000 AI TOPS (FP4, sparse) ->
    # 500 TFLOPS dense FP16/BF16, GDDR7 1,792 GB/s; Max-Q Workstation Edition FP32 110, 3,511 AI TOPS, 1,792 GB/s
    "rtx-pro-6000": _gpu("rtx-pro-6000", 125, 1000, 1792, RTX6000_SHEET + ", Workstation Edition"),
    "rtx-pro-6000-maxq": _gpu("rtx-pro-6000-maxq", 110, 3511 / 4, 1792, RTX6000_SHEET + ", Max-Q Workstation Edition"),
}
ALIASES = {"h200": "h200-sxm", "a100-80gb": "a100-80gb-sxm"}
KNOWN.update({alias: KNOWN[key] for alias, key in ALIASES.items()})  # names of earlier versions still resolve

# torch.cuda.get_device_name(), normalised by normalise_gpu_name, -> KNOWN key. Exact matches only.
GPU_NAMES = {
    "h100 80gb hbm3": "h100-sxm",
    "h100 sxm5 80gb": "h100-sxm",
    "h100 pcie": "h100-pcie",
    "h100 nvl": "h100-nvl",
    "h200": "h200-sxm",
    "h200 nvl": "h200-nvl",
    "a100 pcie 40gb": "a100-40gb-pcie",
    "a100 sxm4 40gb": "a100-40gb-sxm",
    "a100 80gb pcie": "a100-80gb-pcie",
    "a100 sxm4 80gb": "a100-80gb-sxm",
    "rtx pro 6000 blackwell workstation edition": "rtx-pro-6000",
    "rtx pro 6000 blackwell max q workstation edition": "rtx-pro-6000-maxq",
}


def normalise_gpu_name(name: str) -> str:
    """Lower case, without the vendor prefix, runs of spaces, hyphens and underscores as one space."""
    s = re.sub(r"[\s_\-]+", " ", name.lower()).strip()
    return re.sub(r"^nvidia ", "", s)


def match_gpu(name: str) -> str | None:
    """The :data:`KNOWN` key of a GPU by its exact (normalised) device name, else None."""
    return GPU_NAMES.get(normalise_gpu_name(name))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _best_seconds(fn, seconds: float, min_reps: int = 3, sync=None) -> float:
    """Best time of ``fn`` over repeated runs, for at least ``seconds`` and ``min_reps`` runs (after one warm-up)."""
    sync = sync or (lambda: None)
    fn()
    sync()
    best, start, n = float("inf"), time.perf_counter(), 0
    while n < min_reps or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best


def _microbench(device, size_mb: int, gemm_n: int, seconds: float, dtypes) -> tuple[float, dict, dict]:
    """Copy and read bandwidth (best of runs) and square-matmul FLOP/s per dtype on ``device``."""
    sync = (lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda" else None
    src = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_bw = 2 * src.nbytes / _best_seconds(lambda: dst.copy_(src), seconds, sync=sync)
    read_bw = src.nbytes / _best_seconds(lambda: src.sum(), seconds, sync=sync)
    del src, dst
    peaks = {}
    for name, dt in dtypes:
        a = torch.randn(gemm_n, gemm_n, device=device).to(dt)
        b = torch.randn(gemm_n, gemm_n, device=device).to(dt)
        peaks[name] = 2 * gemm_n**3 / _best_seconds(lambda: a @ b, seconds, sync=sync)
    return max(copy_bw, read_bw), peaks, {"copy_bandwidth": copy_bw, "read_bandwidth": read_bw}


def _stamp(extra: dict, seconds: float) -> dict:
    load = _loadavg()
    return dict(extra, timestamp=time.time(), loadavg=load, cores=os.cpu_count(), seconds_per_test=seconds,
                under_load=load > LOAD_FRACTION * (os.cpu_count() or 1), torch=torch.__version__)


def measure_cpu(threads: int | None = None, size_mb: int = 256, gemm_n: int = 1024, seconds: float = 1.0) -> HardwareSpec:
    """Micro-benchmark this CPU: the better of copy (read + write) and read bandwidth, and matmul FLOP/s per
    dtype, each the best of repeated runs over ``seconds`` (about 4 x ``seconds`` in all)."""
    threads = threads or torch.get_num_threads()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:  # float16: no fast CPU kernels
        bw, peaks, extra = _microbench("cpu", size_mb, gemm_n, seconds,
                                       (("float32", torch.float32), ("bfloat16", torch.bfloat16)))
    finally:
        torch.set_num_threads(old)
    return HardwareSpec(f"cpu ({cpu_name()}, {threads} threads)", peaks, bw, "measured by prunelib.cost.hardware.measure_cpu",
                        _stamp(dict(extra, threads=threads, device="cpu"), seconds), measured=True)


def measure_gpu(device="cuda", size_mb: int = 1024, gemm_n: int = 8192, seconds: float = 1.0) -> HardwareSpec:
    """Micro-benchmark a GPU that has no datasheet entry: copy/read bandwidth and matmul FLOP/s per dtype."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev)
    bw, peaks, extra = _microbench(dev, size_mb, gemm_n, seconds, (("float32", torch.float32),
                                   ("bfloat16", torch.bfloat16), ("float16", torch.float16)))
    sparse = torch.cuda.get_device_capability(dev) >= (8, 0)
    return HardwareSpec(f"gpu ({name}, measured)", peaks, bw, "measured by prunelib.cost.hardware.measure_gpu (no datasheet "
                        f"entry for {name!r}; known: {sorted(GPU_NAMES)})",
                        _stamp(dict(extra, device=str(dev), gpu=name), seconds), sparse24=sparse, measured=True)


def needs_remeasure(spec: HardwareSpec, now: float | None = None) -> str | None:
    """Why a cached measured spec must be measured again (stale, or taken under load), else None."""
    now = time.time() if now is None else now
    ts = spec.extra.get("timestamp")
    if ts is None:
        return "no timestamp (measured by an older prunelib)"
    if now - ts > STALE_S:
        return f"stale: measured {(now - ts) / 3600:.1f} h ago"
    if spec.extra.get("under_load") and now - ts > RETRY_S:
        return f"taken under load (load average {spec.extra.get('loadavg', 0):.2f} on {spec.extra.get('cores')} cores)"
    return None


def _best_of(new: HardwareSpec, old: HardwareSpec | None) -> HardwareSpec:
    """Peaks are maxima: keep, per figure, the better of a new measurement and a fresh earlier one."""
    ts = None if old is None or not old.measured else old.extra.get("timestamp")
    if ts is None or time.time() - ts > STALE_S:
        return new
    peaks = {k: max(v, old.peak_flops.get(k, 0.0)) for k, v in new.peak_flops.items()}
    return replace(new, peak_flops=peaks, bandwidth=max(new.bandwidth, old.bandwidth),
                   extra=dict(new.extra, best_of_runs=old.extra.get("best_of_runs", 1) + 1))


def _cached(key: str, measure, refresh: bool) -> HardwareSpec:
    path = cache_dir() / "hardware.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    old = HardwareSpec(**table[key]) if key in table else None
    if old is not None and not refresh and needs_remeasure(old) is None:
        return old
    spec = _best_of(measure(), old)
    table[key] = asdict(spec)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(table, indent=1))
    os.replace(tmp, path)
    return spec


def local_cpu(threads: int | None = None, refresh: bool = False) -> HardwareSpec:
    """The measured spec of this CPU, from the on-disk cache unless stale, taken under load, or ``refresh``."""
    threads = threads or torch.get_num_threads()
    key = f"{cpu_name()}|{threads}|{torch.__version__}|{os.cpu_count()}"
    return _cached(key, lambda: measure_cpu(threads), refresh)


def measured_gpu(device="cuda", refresh: bool = False) -> HardwareSpec:
    """The measured spec of a GPU without a datasheet entry (cached like the CPU's)."""
    dev = torch.device(device)
    key = f"gpu|{torch.cuda.get_device_name(dev)}|{torch.__version__}"
    return _cached(key, lambda: measure_gpu(dev), refresh)


def spec(name: str) -> HardwareSpec:
    """A spec by name: one of :data:`KNOWN`, or ``"cpu"`` for the measured local CPU."""
    if name == "cpu":
        return local_cpu()
    if name not in KNOWN:
        raise ValueError(f"unknown hardware {name!r}; known: {['cpu', *KNOWN]}")
    return KNOWN[name]


def for_device(device) -> HardwareSpec:
    """The spec of a torch device: the measured CPU, a GPU's datasheet by its exact name, else a measured GPU."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return local_cpu()
    key = match_gpu(torch.cuda.get_device_name(dev))
    return KNOWN[key] if key else measured_gpu(dev)


_REMEASURED: dict = {}  # spec name -> (time, spec): at most one re-measurement per RETRY_S in a process


def remeasure(hw: HardwareSpec) -> HardwareSpec:
    """A fresh measurement of a measured spec (a datasheet spec is returned as it is); a spec
    re-measured in this process less than :data:`RETRY_S` ago is not measured again."""
    if not hw.measured:
        return hw
    t, done = _REMEASURED.get(hw.name, (0.0, None))
    if done is not None and time.time() - t < RETRY_S:
        return done
    dev = hw.extra.get("device", "cpu")
    new = local_cpu(hw.extra.get("threads"), refresh=True) if dev == "cpu" else measured_gpu(dev, refresh=True)
    _REMEASURED[hw.name] = (time.time(), new)
    return new


def roofline_violations(roofline: dict, measured: dict, tol: float = 0.0) -> list[str]:
    """Each named roofline time that is slower than its measured time (a bound can never be slower)."""
    return [f"{k}: roofline {roofline[k] * 1e3:.3g} ms > measured {measured[k] * 1e3:.3g} ms"
            for k in roofline if roofline[k] > measured[k] * (1 + tol)]


def check_roofline(hw: HardwareSpec, rooflines, measured: dict) -> tuple[HardwareSpec, str | None]:
    """Enforce that no roofline is slower than its measured time.

    ``rooflines(hw)`` gives the roofline seconds, by name, under a spec; ``measured`` the
    measured seconds by the same names. On a violation a measured spec is measured again
    (once) and the rooflines recomputed; returns ``(spec, flag)`` where ``flag`` (for the
    row's ``extra.bound_flag``) says what still contradicts the measurement, else None.
    """
    bad = roofline_violations(rooflines(hw), measured)
    if not bad:
        return hw, None
    if hw.measured:
        hw2 = remeasure(hw)
        bad2 = roofline_violations(rooflines(hw2), measured)
        if not bad2:
            return hw2, None
        return hw2, "; ".join(bad2) + f" (after re-measuring {hw2.name})"
    return hw, "; ".join(bad) + f" (datasheet spec {hw.name}: the cost model overcounts this step)"
