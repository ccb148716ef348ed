"""The runtime axis of a sweep: a pruned model exported to GGUF and timed in llama.cpp against the dense one.

Rows (``extra.runtime = "llama.cpp"``; PyTorch's rows say ``"pytorch"``, and rows stored before the field
existed read as PyTorch, see :func:`prunelib.results.runtimes.runtime_of`):

- ``metric="loadable"``: 1 when the pruned model was exported and llama.cpp loaded it, 0 with
  ``extra.reason`` (what GGUF lacks) when it was refused;
- ``metric="speedup"`` per phase and length, batch 1: the median of ABBA-pair ratios with its bootstrap CI
  (:func:`prunelib.runtime.llamacpp.compare`), ``bound`` from the same cost model at the export dtype's bytes
  (2:4 layers dense: llama.cpp has no 2:4 kernel), ``dtype`` the export dtype, ``extra.threads`` the thread
  count both engines ran at, ``extra.kv_type`` the KV cache's.

The roofline's FLOP/s for f16 and q8_0 on a CPU is the measured float32 GEMM peak (llama.cpp multiplies them
with f32 accumulation), labelled ``extra.peak_flops_dtype``; decode bounds are memory-bound either way.
"""
from __future__ import annotations

import dataclasses

import torch

from prunelib.core.config import cache_dir
from prunelib.core.store import ResultsStore, config_hash
from prunelib.core.validate import InputError
from prunelib.cost import costmodel, hardware
from prunelib.measure.timing import BUDGET_S
from prunelib.model.models import EMBEDDED, fingerprint, parameter_count
from prunelib.runtime import gguf_export, llamacpp

RUNTIMES = ("pytorch", "llama.cpp")
DEFAULT_EXPORT_DTYPE = "f16"


def check_runtime(runtime: str, export_dtype: str = DEFAULT_EXPORT_DTYPE, threads=None, batches=(1,),
                  device: str = "cpu") -> None:
    """Refuse, before any work, a runtime, export dtype, thread count or batch the runtime cannot take."""
    if runtime not in RUNTIMES:
        raise InputError(f"runtime={runtime!r} is not allowed: expected one of {RUNTIMES}")
    if runtime == "pytorch":
        return
    if export_dtype not in gguf_export.EXPORT_DTYPES:
        raise InputError(f"export_dtype={export_dtype!r} is not allowed: expected one of {gguf_export.EXPORT_DTYPES}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise InputError(f"threads={threads!r} is not allowed: expected a positive integer (or None: torch's count)")
    if list(batches) != [1]:
        raise InputError(f"batches={list(batches)!r} is not allowed with runtime='llama.cpp': expected [1] (one "
                         "sequence per llama.cpp context)")
    if str(device) != "cpu":
        raise InputError(f"device={device!r} is not allowed with runtime='llama.cpp': expected 'cpu' (the build "
                         "of make setup-engines is CPU-only)")


def engine_hw(threads: int, dtype: str) -> hardware.HardwareSpec:
    """The measured CPU at ``threads`` threads, with the float32 GEMM peak standing in for f16 / q8_0."""
    hw = hardware.local_cpu(threads)
    cost_dtype = gguf_export.COST_DTYPES[dtype]
    if cost_dtype in hw.peak_flops:
        return hw
    return dataclasses.replace(hw, peak_flops={**hw.peak_flops, cost_dtype: hw.peak_flops["float32"]})


def roofline(model_or_shape, phase: str, length: int, dtype: str, hw) -> costmodel.Cost:
    """Cost of one step of a model exported at ``dtype`` (batch 1; 2:4 costed dense)."""
    shape = model_or_shape if isinstance(model_or_shape, costmodel.ModelShape) else costmodel.ModelShape.of(model_or_shape)
    # without flash attention (the binding's default) llama.cpp computes the full S x S scores and masks them
    shape = dataclasses.replace(shape, causal_skip=False)
    return costmodel.cost(shape, phase, 1, length, gguf_export.COST_DTYPES[dtype], hw, sparse_kernels=False)


def gguf_path(model, dtype: str, folder=None, vocab: str = "none"):
    """Where the export of ``model`` at ``dtype`` with vocabulary ``vocab`` (``"hf"`` or ``"none"``) is cached (by the
    model's fingerprint and the export format's version)."""
    folder = folder or cache_dir() / "gguf"
    return folder / f"{fingerprint(model)}-{dtype}-{vocab}-v{gguf_export.FORMAT_VERSION}.gguf"


def exported(model, dtype: str, tokenizer=None, pre=None, folder=None) -> gguf_export.ExportInfo | None:
    """The cached GGUF of ``model`` (exported now if missing); raises :class:`gguf_export.Unrepresentable`."""
    path = gguf_path(model, dtype, folder, "none" if tokenizer is None else "hf")
    plan = gguf_export.plan(model)
    if path.exists():
        return gguf_export.ExportInfo(path, plan.arch, dtype, path.stat().st_size, plan)
    return gguf_export.export(model, path, dtype, tokenizer=tokenizer, pre=pre)


def embedded_pre(model_name: str) -> str | None:
    """llama.cpp's pre-tokenizer name for the embedded model (read from its shipped GGUF), else None."""
    if model_name != EMBEDDED:
        return None
    from prunelib.model.models import embedded_gguf
    from prunelib.runtime.gguf_vocab import pre_tokenizer_of

    return pre_tokenizer_of(embedded_gguf())


def engine_speed_rows(store: ResultsStore, model_name, dense, pruned, method, sparsity, cell, *, ids,
                      phases=("prefill", "decode"), lengths=(512,), reps=20, export_dtype=DEFAULT_EXPORT_DTYPE,
                      threads=None, kv="f16", tokenizer=None, ci_target=None, budget_s=BUDGET_S, extra=None,
                      folder=None) -> None:
    """Store whether llama.cpp loads ``pruned`` and, if it does, its speedup over ``dense`` per phase and length.

    A model GGUF cannot represent gets its ``loadable = 0`` row even where llama_cpp is missing; timing a
    representable one there raises :class:`prunelib.runtime.llamacpp.EngineUnavailable` with the build status.

    ``ids``: token ids of the timed prompt (at least max(lengths) + 1). ``threads``: both engines' thread
    count (None: torch's). Every row is keyed, so a resumed sweep skips what is stored.
    """
    check_runtime("llama.cpp", export_dtype, threads)
    reason = llamacpp.unavailable()
    threads = threads or torch.get_num_threads()
    ids = [int(t) for t in (ids.reshape(-1).tolist() if hasattr(ids, "reshape") else ids)]
    fp_d, fp_p = fingerprint(dense), fingerprint(pruned)
    base = dict(model=model_name, cell=cell, method=method, sparsity=sparsity, device="cpu", dtype=export_dtype)
    info = dict(runtime=llamacpp.RUNTIME, export_dtype=export_dtype, threads=threads, kv_type=kv,
                llama_cpp=None if reason else llamacpp.version())
    load_key = config_hash({"kind": "loadable", "runtime": llamacpp.RUNTIME, "pruned": fp_p, "dtype": export_dtype})
    pre = embedded_pre(model_name)
    try:
        cand_info = exported(pruned, export_dtype, tokenizer, pre, folder)
    except gguf_export.Unrepresentable as err:
        store.append(dict(base, metric="loadable", value=0, config_hash=load_key,
                          extra=dict(extra or {}, **info, reason=str(err))))
        return  # a refusal needs no engine: it is the format's, stored wherever llama.cpp is missing
    if reason:
        raise llamacpp.EngineUnavailable(reason)
    dense_info = exported(dense, export_dtype, tokenizer, pre, folder)
    n_ctx = max(lengths) + 8
    engines = [llamacpp.Engine(x.path, n_ctx=n_ctx, threads=threads, kv=kv, dtype=export_dtype)
               for x in (dense_info, cand_info)]
    try:
        if not store.has(load_key, "loadable"):
            store.append(dict(base, metric="loadable", value=1, config_hash=load_key,
                              extra=dict(extra or {}, **info, arch=cand_info.arch, notes=list(cand_info.notes),
                                         gguf_bytes=cand_info.bytes)))
        hw = engine_hw(threads, export_dtype)
        for phase in phases:
            for s in lengths:
                key = config_hash({"kind": "speed", "runtime": llamacpp.RUNTIME, "dense": fp_d, "pruned": fp_p,
                                   "phase": phase, "length": s, "dtype": export_dtype, "threads": threads, "kv": kv,
                                   "reps": reps, "hw": hw.name, "llama_cpp": info["llama_cpp"],
                                   **({} if ci_target is None else {"ci_target": ci_target, "budget_s": budget_s})})
                if store.has(key, "speedup"):
                    continue
                c = llamacpp.compare(*engines, phase, s, ids, reps=reps, target=ci_target, budget_s=budget_s)
                rd, rp = roofline(dense, phase, s, export_dtype, hw), roofline(pruned, phase, s, export_dtype, hw)
                bound = rd.seconds / rp.seconds
                store.append(dict(
                    base, phase=phase, batch=1, length=s, metric="speedup", value=c.speedup, ci_low=c.ci_low,
                    ci_high=c.ci_high, bound=bound, n=c.base.n, config_hash=key,
                    extra=dict(extra or {}, **info, t_dense=c.base.median, t_pruned=c.cand.median,
                               efficiency=c.speedup / bound, params=parameter_count(pruned),
                               params_dense=parameter_count(dense), flops=rp.flops, bytes=rp.bytes, hw=hw.name,
                               peak_flops_dtype="float32", roofline_dense=rd.seconds, roofline_pruned=rp.seconds,
                               timing_mode=f"{llamacpp.RUNTIME} {export_dtype}", arch=cand_info.arch,
                               gguf_bytes=cand_info.bytes, gguf_bytes_dense=dense_info.bytes, ci_target=c.target, ci_half_width=c.half_width,
                               ci_stop=c.stop, setup_s=list(c.setup_s), note=c.note,
                               samples_dense=c.base.samples, samples_pruned=c.cand.samples)))
    finally:
        for e in engines:
            e.close()
