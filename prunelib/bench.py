"""``make bench``: the embedded model on this machine, against the physical limit.

Prints dense TTFT and TPOT (B=1, S=512), decode bandwidth achieved against the measured
CPU bandwidth, the dense-vs-dense speedup with its CI (should contain 1.0), and the
speedup of the model without its last quarter of layers beside the roofline bound.
Run: ``python -m prunelib.bench [--model M] [--device D] [--reps N]``.
"""
from __future__ import annotations

import argparse
import time

import torch

from . import checks, costmodel, hardware, timing
from .models import EMBEDDED, load_model, parameter_count, resolve_dtype
from .pruning.surgery import remove_layers


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=EMBEDDED)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    try:  # before the model loads (its positions are checked by timing itself)
        checks.integer("batch", args.batch), checks.integer("length", args.length), checks.reps(args.reps)
        if args.threads is not None:
            checks.integer("threads", args.threads)
        resolve_dtype(args.dtype, args.device)
    except ValueError as err:
        p.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    model, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    hw = hardware.for_device(args.device)
    B, S, dtype = args.batch, args.length, args.dtype
    n_layers = len(model.model.layers)
    drop = list(range(n_layers - n_layers // 4, n_layers))
    pruned = remove_layers(model, drop)
    dense_shape, pruned_shape = costmodel.ModelShape.of(model), costmodel.ModelShape.of(pruned)

    print(f"model {args.model}: {parameter_count(model) / 1e6:.1f}M parameters, {n_layers} layers, "
          f"device {args.device}, {dtype}, {torch.get_num_threads()} threads")
    print(f"hardware: {hw.name}: {hw.bandwidth / 1e9:.1f} GB/s, "
          + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in hw.peak_flops.items()))

    print(f"\n== dense, B={B}, S={S} (median [p10, p90] of {args.reps})")
    for phase, label in (("prefill", "TTFT"), ("decode", "TPOT")):
        t = timing.measure(model, phase, B, S, reps=args.reps)
        bound = costmodel.cost(dense_shape, phase, B, S, dtype, hw).seconds
        line = (f"{label}: {t.latency.median * 1e3:8.2f} ms [{t.latency.p10 * 1e3:.2f}, {t.latency.p90 * 1e3:.2f}]"
                f"   roofline {bound * 1e3:.2f} ms")
        if phase == "decode":
            bw = timing.achieved_bandwidth(model, t)
            line += f"\n  decode bandwidth achieved: {bw / 1e9:.1f} GB/s = {bw / hw.bandwidth:.1%} of measured {hw.bandwidth / 1e9:.1f} GB/s"
        print(line)

    print("\n== dense vs dense (interleaved; the CI should contain 1.0)")
    for phase in ("prefill", "decode"):
        print(" ", timing.compare(model, model, phase, B, S, reps=args.reps))

    print(f"\n== last quarter of layers removed ({len(drop)} of {n_layers}: layers {drop[0]}..{drop[-1]}), "
          f"{parameter_count(pruned) / 1e6:.1f}M parameters")
    print(f"  {'phase':8s} {'measured':>9s} {'95% CI':>17s} {'bound':>7s} {'measured/bound':>15s}")
    for phase in ("prefill", "decode"):
        c = timing.compare(model, pruned, phase, B, S, reps=args.reps)
        bound = costmodel.theoretical_speedup(dense_shape, pruned_shape, phase, B, S, dtype, hw)
        print(f"  {phase:8s} {c.speedup:8.3f}x  [{c.ci_low:.3f}, {c.ci_high:.3f}] {bound:6.3f}x {c.speedup / bound:14.1%}")
    print(f"\nbench took {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
