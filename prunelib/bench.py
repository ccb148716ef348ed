"""``make bench``: the embedded model on this machine, against the physical limit.

Prints, at B=1, S=512: dense TTFT and TPOT in eager mode and TPOT compiled
(``torch.compile`` over a static KV cache), each beside its roofline, with the decode
bandwidth achieved against the measured bandwidth; the dense model's memory (peak of a
decode step, weights and KV cache per token, each beside the cost model's prediction);
the dense-vs-dense speedup with its CI (should contain 1.0) and the speedup of ShortGPT
at 25% beside the roofline bound, each with adaptive ABBA pairs until the CI half-width
reaches its target (3% decode, 5% prefill) or the time budget runs out. With llama.cpp built
(``make setup-engines``; else the section says why it is skipped): dense TTFT and TPOT of the GGUF export
in f16 and q8_0 (``--engine-dtypes``) at the same threads, each beside its roofline at that dtype's bytes,
and decode bandwidth as a share of the measured bandwidth.
Run: ``python -m prunelib.bench [--model M] [--device D] [--budget S] [--modes eager,compiled]``.
"""
from __future__ import annotations

import argparse
import time

import torch

from prunelib.run import checks
from prunelib.cost import costmodel, hardware
from prunelib.measure import timing
from prunelib.model.models import EMBEDDED, load_model, parameter_count, resolve_dtype


def _spec_line(hw) -> str:
    line = (f"hardware: {hw.name}: {hw.bandwidth / 1e9:.1f} GB/s, "
            + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in hw.peak_flops.items()))
    if hw.measured:
        age = (time.time() - hw.extra.get("timestamp", time.time())) / 60
        line += (f"\n  measured {age:.0f} min ago (best of runs, {hw.extra.get('seconds_per_test', 0):.1f} s per test), "
                 f"load average then {hw.extra.get('loadavg', float('nan')):.2f} on {hw.extra.get('cores')} cores"
                 f"{' (under load)' if hw.extra.get('under_load') else ''}")
    return line


def _pruned(model, tok, seed: int = 0):
    """ShortGPT at 25% (calibration text when there is a tokenizer), else the last quarter of the layers."""
    from prunelib.pruning import prune

    if tok is None:
        return prune(model, "last_n", 0.25)[0], "last_n 25%"
    from prunelib.model.calibration import calibration_batch

    cal = calibration_batch(tok, n=16, length=256, seed=seed)
    pruned, report = prune(model, "shortgpt", 0.25, calibration=cal)
    return pruned, f"ShortGPT 25% (layers {report.removed.get('layers', report.removed)})"


def engine_lines(model, tok, model_name: str, S: int, reps: int, threads: int, dtypes=("f16", "q8_0")) -> list[dict]:
    """Dense TTFT and TPOT in llama.cpp per GGUF dtype, beside the roofline at that dtype's bytes, with decode
    bandwidth as a share of the measured bandwidth; prints them (or why llama.cpp is skipped) and returns them."""
    from prunelib.run import engine_rows
    from prunelib.runtime import llamacpp

    print(f"\n== dense in llama.cpp, B=1, S={S}, {threads} threads (median [p10, p90] of {reps})")
    reason = llamacpp.unavailable()
    if reason:
        print(f"  skipped: {reason}")
        return []
    ids = (timing_text_ids(tok, S) if tok is not None else
           torch.randint(0, model.config.vocab_size, (S + 1,), generator=torch.Generator().manual_seed(1)).tolist())
    out = []
    for dtype in dtypes:
        hw = engine_rows.engine_hw(threads, dtype)
        info = engine_rows.exported(model, dtype, tok, engine_rows.embedded_pre(model_name))
        eng = llamacpp.Engine(info.path, n_ctx=S + 8, threads=threads, dtype=dtype)
        try:
            for phase, label in (("prefill", "TTFT"), ("decode", "TPOT")):
                lat = llamacpp.measure(eng, phase, S, ids, reps=reps)
                c = engine_rows.roofline(model, phase, S, dtype, hw)
                row = dict(dtype=dtype, phase=phase, median_s=lat.median, roofline_s=c.seconds,
                           share_of_roofline=c.seconds / lat.median, bandwidth=c.bytes / lat.median,
                           bandwidth_share=c.bytes / lat.median / hw.bandwidth, gguf_bytes=info.bytes)
                out.append(row)
                line = (f"{label} [llama.cpp {dtype}]: {lat.median * 1e3:8.2f} ms [{lat.p10 * 1e3:.2f}, "
                        f"{lat.p90 * 1e3:.2f}]   roofline {c.seconds * 1e3:.2f} ms ({row['share_of_roofline']:.1%})")
                if phase == "decode":
                    line += (f"\n  decode bandwidth achieved [llama.cpp {dtype}]: {row['bandwidth'] / 1e9:.1f} GB/s = "
                             f"{row['bandwidth_share']:.1%} of measured {hw.bandwidth / 1e9:.1f} GB/s")
                print(line)
        finally:
            eng.close()
    return out


def timing_text_ids(tok, S: int) -> list[int]:
    from prunelib.run.pipeline import timing_text

    return timing_text(tok, (1,), (S,), seed=1)[0].tolist()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=EMBEDDED)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--reps", type=int, default=20, help="timed runs of a single model; minimum pairs of a comparison")
    p.add_argument("--budget", type=float, default=timing.BUDGET_S, help="seconds of timing per comparison at most")
    p.add_argument("--modes", default="eager,compiled", help=f"timing modes of the dense decode, of {list(timing.MODES)}")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--engine-dtypes", default="f16,q8_0",
                   help="GGUF dtypes of the dense decode in llama.cpp (make setup-engines), or 'none'")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    try:  # before the model loads (its positions are checked by timing itself)
        checks.integer("batch", args.batch), checks.integer("length", args.length), checks.reps(args.reps)
        checks.number("budget", args.budget, 0)
        if args.threads is not None:
            checks.integer("threads", args.threads)
        resolve_dtype(args.dtype, args.device)
    except ValueError as err:
        p.error(str(err))
    for m in modes:
        timing.choose_mode(args.device, m)  # a mode this device cannot run fails here, naming the allowed ones
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    hw = hardware.for_device(args.device)
    B, S, dtype = args.batch, args.length, args.dtype
    shape = costmodel.ModelShape.of(model)
    print(f"model {args.model}: {parameter_count(model) / 1e6:.1f}M parameters, {len(shape.layers)} layers, "
          f"device {args.device}, {dtype}, {torch.get_num_threads()} threads")
    print(_spec_line(hw))

    print(f"\n== dense, B={B}, S={S} (median [p10, p90] of {args.reps})")
    for mode in modes:
        for phase, label in (("prefill", "TTFT"), ("decode", "TPOT")):
            if phase == "prefill" and mode == "compiled":
                continue  # one compilation (minutes on a small CPU) for what the paper compiles: decode
            t0 = time.perf_counter()
            t = timing.measure(model, phase, B, S, reps=args.reps, mode=mode)
            before = hw
            hw, flag = hardware.check_roofline(hw, lambda spec: {label: costmodel.cost(shape, phase, B, S, dtype,
                                                                                       spec).seconds},
                                               {label: t.latency.median})
            bound = costmodel.cost(shape, phase, B, S, dtype, hw).seconds
            line = (f"{label} [{mode}]: {t.latency.median * 1e3:8.2f} ms [{t.latency.p10 * 1e3:.2f}, "
                    f"{t.latency.p90 * 1e3:.2f}]   roofline {bound * 1e3:.2f} ms"
                    + (f"   FLAGGED: {flag}" if flag else ""))
            if hw is not before:  # the roofline was slower than the measurement: the spec was measured again
                line = "the roofline was slower than the measurement: spec measured again\n" + _spec_line(hw) + "\n" + line
            if mode == "compiled":
                line += f"   (compile and warm-up included: {time.perf_counter() - t0:.0f} s in all)"
            if phase == "decode":
                bw = timing.achieved_bandwidth(model, t)
                line += (f"\n  decode bandwidth achieved [{mode}]: {bw / 1e9:.1f} GB/s = {bw / hw.bandwidth:.1%} "
                         f"of measured {hw.bandwidth / 1e9:.1f} GB/s")
            print(line)

    engine_dtypes = [] if args.engine_dtypes == "none" else args.engine_dtypes.split(",")
    if engine_dtypes and args.device == "cpu" and B == 1:
        engine_lines(model, tok, args.model, S, args.reps, torch.get_num_threads(), engine_dtypes)

    print("\n== memory of a dense decode step (measured | cost model)")
    f = timing.footprint(model, "decode", B, S)
    pred = timing.predicted_memory(model, dtype, hw)
    peak = "n/a" if f.peak_bytes is None else f"{f.peak_bytes / 2**20:.1f} MiB"
    print(f"  weights: {f.weight_bytes / 2**20:.1f} MiB | {pred['weight_bytes'] / 2**20:.1f} MiB\n"
          f"  KV cache per token: {f.kv_bytes_per_token / 2**10:.2f} KiB | {pred['kv_bytes_per_token'] / 2**10:.2f} KiB"
          f"  (x {B * S} tokens = {f.kv_bytes_per_token * B * S / 2**20:.1f} MiB)\n"
          f"  peak beyond the resident weights: {peak} ({f.peak_method})")

    pruned, label = _pruned(model, tok)
    print(f"\n== comparisons, eager, adaptive ABBA pairs: CI target ±{timing.CI_TARGETS['decode']:.0%} decode, "
          f"±{timing.CI_TARGETS['prefill']:.0%} prefill, budget {args.budget:.0f} s each")
    print("  dense vs dense (the CI should contain 1.0)")
    for phase in ("prefill", "decode"):
        print("   ", timing.compare(model, model, phase, B, S, reps=args.reps, target="auto", budget_s=args.budget))
    pshape = costmodel.ModelShape.of(pruned)
    print(f"  dense vs {label}, {parameter_count(pruned) / 1e6:.1f}M parameters")
    print(f"    {'phase':8s} {'measured':>9s} {'95% CI':>17s} {'±':>6s} {'pairs':>6s} {'bound':>7s} {'measured/bound':>15s}")
    for phase in ("prefill", "decode"):
        c = timing.compare(model, pruned, phase, B, S, reps=args.reps, target="auto", budget_s=args.budget)
        bound = costmodel.theoretical_speedup(shape, pshape, phase, B, S, dtype, hw)
        print(f"    {phase:8s} {c.speedup:8.3f}x  [{c.ci_low:.3f}, {c.ci_high:.3f}] {c.half_width:6.1%} {c.base.n:6d} "
              f"{bound:6.3f}x {c.speedup / bound:14.1%}   ({c.stop})")
    print(f"\nbench took {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
