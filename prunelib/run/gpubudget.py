"""An estimate of ``make gpu-check``'s time on a GPU, made without one (``python -m prunelib.gpucheck --estimate``).

Per cell, three parts, each from something measured here or from the roofline:

- *host*: what stays on the host, measured on this CPU on the **topology** of Llama-3.1-8B (its 32 layers,
  heads and vocabulary-free op count, hidden 64, so the arithmetic is negligible): building the cell's
  pruned copy (Python, module surgery), the host time of one eager step per shape (Python and dispatch:
  the floor of an eager step on any GPU), and dynamo's trace of a compiled step (the probe that runs
  before inductor; an uncapturable step fails there);
- *device set-up*: the work set-up now does on the model's device (defect 7), from its bytes and float64
  FLOPs at 8B shapes on the spec: the pruned copy (read + write the weights), SliceGPT's QRs and
  float64 rotations, the 2:4 random draws, masks and compression;
- *timing*: every comparison :mod:`prunelib.run.gpucells` runs, from the FULL configuration's counts
  (workload builds with their KV prefill, warm-up, 10 pairs, profiled steps, memory), each step the
  dense model's roofline time over :data:`EFFICIENCY` (pruned steps are no slower: an upper bound), an
  eager step never faster than its measured host time; plus :data:`COMPILE_S` for each inductor compile
  whose probe passes and :data:`FLEX_COMPILE_S` for block-sparse attention's flex_attention.

Model creation adds the host time of building the random model's modules (measured, topology) and
:data:`CUDA_INIT_S` (assumed). Nothing here ran on a GPU: the table is an estimate.
"""
from __future__ import annotations

import copy
import time

import pandas as pd
import torch

from prunelib.cost import costmodel, hardware
from prunelib.measure import timing
from prunelib.run import gpucells

EFFICIENCY = 0.55  # GPU step time = roofline / this (issue 22: ~6 ms graph decode of 8B against a 3.3 ms roofline)
FP64_FLOPS = {"h200-sxm": 67e12, "h200-nvl": 60e12, "h100-sxm": 67e12}  # datasheets: FP64 Tensor Core TFLOPS
COMPILE_S = gpucells.COMPILE_S  # one inductor compile of an 8B step (assumed, not measured)
FLEX_COMPILE_S = gpucells.FLEX_COMPILE_S
CUDA_INIT_S = 10.0  # CUDA context, cuBLAS / cuDNN handles, first kernels (assumed)
PROFILE_OVERHEAD_S = 0.5  # torch.profiler start, stop and parse per profiled model (assumed)
TOPOLOGY = dict(hidden_size=64, intermediate_size=256, head_dim=2, vocab_size=512)


def topology_model(key: str = "llama-3.1-8b"):
    """The shipped random config's layers, heads and KV heads at hidden 64 (fp32, CPU): its host costs."""
    from transformers import AutoModelForCausalLM

    from prunelib.model.models import random_config

    cfg = random_config(key)
    for k, v in TOPOLOGY.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return model, time.perf_counter() - t0


def _best(fn, n: int = 3) -> float:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


HOST_LENGTH = {"prefill": 16, "decode": 32}  # the host work of a step does not grow with S (its kernels do)


def host_step(model, phase: str, b: int, static: bool = False) -> float:
    """Host seconds of one eager step of ``model`` (the topology: negligible arithmetic)."""
    work = timing.Workload(model, phase, b, HOST_LENGTH[phase], static_cache=static)

    def step():
        work()
        work.reset()
    step()
    return _best(step)


def device_setup(method: str, shape: costmodel.ModelShape, spec) -> float:
    """Seconds of set-up work on the device at ``shape`` (bf16 weights): bytes over the bandwidth plus
    float64 FLOPs over the FP64 peak. Dense: none; every other cell reads and writes its weights once."""
    e = 2
    lin = [(g.n, g.k) for g in costmodel.gemms(shape, "prefill", 1, 1, "bfloat16") if g.kind in ("linear", "linear_24")
           and not g.name.endswith("lm_head")]
    proj = sum(n * k for n, k in lin)
    weights = proj + 2 * shape.vocab * shape.hidden
    bw, fp64 = spec.bandwidth, FP64_FLOPS.get(spec.name, 60e12)
    n_layers = len(shape.layers)
    if method == "dense":
        return 0.0
    seconds = 2 * e * weights / bw  # the pruned copy
    if method == "slicegpt_random":
        d, dk = shape.hidden, int(0.75 * shape.hidden)
        qr = 2 * n_layers + 1  # one basis per sublayer boundary
        flops = qr * 4 / 3 * d ** 3 + 2 * dk * (proj + 2 * shape.vocab * shape.hidden)  # QRs + every rotation
        seconds += flops / fp64 + 3 * 8 * weights / bw  # float64 copies of every weight, read and written
    elif method == "sparse24_random":
        seconds += 30 * proj / bw  # fp32 draws, top-2 of 4, mask, product, zero count, compression (bytes/weight)
    elif method == "lowrank_shape":
        seconds = e * weights / bw  # fresh random factors (smaller than the weights) and the copy of the rest
    return seconds


def estimate(spec_name: str = "h200-sxm", cfg: dict | None = None, model_key: str = "llama-3.1-8b") -> pd.DataFrame:
    """One row per cell: host set-up, device set-up, timing and compile seconds, the cell's total."""
    from prunelib.model.models import random_config

    cfg = cfg or gpucells.FULL
    spec = hardware.spec(spec_name)
    shape = costmodel.ModelShape.from_config(random_config(model_key))
    topo, create_s = topology_model(model_key)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dense_host = {(p, b, st): host_step(topo, p, b, st) for p, b, s in cfg["shapes"] for st in (False, True)}
        rows = []
        for cell, method, sparsity, options in gpucells.CELLS:
            t0 = time.perf_counter()
            pruned = gpucells.build(copy.deepcopy(topo) if method == "lowrank_shape" else topo, method, sparsity,
                                    options)
            host_build = time.perf_counter() - t0
            modes, _ = gpucells._modes(method, pruned, cfg)
            row = {"cell": cell, "method": method, "host_setup_s": host_build,
                   "device_setup_s": device_setup(method, shape, spec), "timing_s": 0.0, "compile_s": 0.0}
            for phase, b, s in cfg["shapes"]:
                gpu = costmodel.cost(shape, phase, b, s, "bfloat16", spec).seconds / EFFICIENCY
                kv = 0.0 if phase == "prefill" else costmodel.cost(shape, "prefill", b, s, "bfloat16", spec).seconds \
                    / EFFICIENCY
                h_eager = host_step(pruned, phase, b)
                for label, kw in modes:
                    static = bool(kw.get("static_cache"))
                    try:
                        hp = h_eager if not static else host_step(pruned, phase, b, static)
                    except Exception:  # noqa: BLE001 - a mode the method refuses fails fast on the GPU too
                        continue
                    hd = dense_host[(phase, b, static)]
                    if label in ("graph", "compiled"):
                        sd = sp = gpu
                    else:
                        sd, sp = max(gpu, hd), max(gpu, hp)
                    if label == "compiled":
                        t0 = time.perf_counter()
                        try:
                            timing.probe_compile(pruned, phase, b, HOST_LENGTH[phase])
                        except Exception:  # noqa: BLE001 - the probe's failure is all it costs
                            row["compile_s"] += time.perf_counter() - t0
                            continue
                        row["compile_s"] += time.perf_counter() - t0 + 2 * COMPILE_S  # inductor, both models
                    extra = 4 * max(gpu, hd) if label == "graph" else 0.0  # 3 warm-ups and the capture
                    builds = 2 * (kv + max(gpu, hd) + extra)
                    pairs = (cfg["warmup"] + cfg["reps"]) * (sd + sp)
                    prof = cfg.get("profile", 0) * (sd + sp) + 2 * PROFILE_OVERHEAD_S if label == "eager" else 0.0
                    row["timing_s"] += builds + pairs + prof
                row["timing_s"] += kv + max(gpu, h_eager)  # memory: one more build and step
                if method.startswith("sparse_attn") and phase == "prefill":
                    row["compile_s"] += FLEX_COMPILE_S
            row["total_s"] = row["host_setup_s"] + row["device_setup_s"] + row["timing_s"] + row["compile_s"]
            rows.append(row)
            del pruned
    finally:
        torch.set_num_threads(threads)
    df = pd.DataFrame(rows)
    df.attrs.update(spec=spec.name, model_creation_s=create_s + CUDA_INIT_S, total_s=df.total_s.sum() + create_s
                    + CUDA_INIT_S, threads=1)
    return df
