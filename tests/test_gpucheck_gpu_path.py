"""Issue 22: the CUDA path of ``make gpu-check`` on the CPU, faking only what needs CUDA (cuSPARSELt's kernels,
CUDA-graph capture and its flag; :mod:`prunelib.run.fakekernels`). One test (or group) per defect."""
import gc
import re
import subprocess
import time
import weakref
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from prunelib import gpucheck, pruning
from prunelib.cost import hardware
from prunelib.measure import timing, workload
from prunelib.model.models import fingerprint, parameter_count, weight_bytes
from prunelib.run import gpucells
from prunelib.run.fakekernels import cslt_compress, cslt_sparse_mm, fake_cuda_graphs, fake_cusparselt

ROOT = Path(__file__).resolve().parents[1]
CPU_HW = hardware.HardwareSpec("test cpu", {"float32": 1e12, "bfloat16": 1e12}, 1e11)


def cfg(**kw):
    return dict(gpucheck.SMOKE, **{"memory": False, **kw})


# --- 1. 2:4 through cuSPARSELt: identity, not ==, on its one packed inner tensor ----------------------
def test_fake_cusparselt_packs_like_cusparselt_and_multiplies_exactly():
    w = torch.randn(32, 64, dtype=torch.bfloat16) * torch.tensor([0, 1, 1, 0], dtype=torch.bfloat16).repeat(16)
    w[3, :4] = torch.tensor([0, 0, 0, 2.0])  # a group with one non-zero
    packed = cslt_compress(w)
    assert packed.shape == (32 * 64 * 9 // 16,) and packed.dtype == torch.bfloat16  # values + 4 bits per group
    x = torch.randn(64, 5, dtype=torch.bfloat16)
    torch.testing.assert_close(cslt_sparse_mm(packed, x), (w.float() @ x.float()).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="not 2:4"):
        cslt_compress(torch.ones(16, 16, dtype=torch.bfloat16))


def test_24_cell_runs_end_to_end_where_cusparselt_engages():
    """Pruning's parameter count and the fingerprint met the single packed tensor of a cuSPARSELt weight with
    ``==`` (NotImplementedError eq.Tensor); with the kernels faked the cell now builds and gives timed rows."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT

    dense = gpucells.tiny_model().to(torch.bfloat16)
    with fake_cusparselt():
        pruned = gpucells.build(dense, "sparse24_random", 0.5, {})
        masked = gpucells.build(dense, "sparse24_random", 0.5, {"sparse_kernel": False})
        w = pruned.model.layers[0].mlp.down_proj.weight
        assert isinstance(w, SparseSemiStructuredTensorCUSPARSELT)
        assert parameter_count(pruned) == parameter_count(dense)  # logical shapes
        assert weight_bytes(pruned) < weight_bytes(dense)  # packed values and metadata
        assert fingerprint(pruned) != fingerprint(masked)
        ids = torch.randint(0, 512, (2, 9))
        with torch.inference_mode():  # the fake kernel computes the masked dense product
            torch.testing.assert_close(pruned(ids).logits.float(), masked(ids).logits.float(), atol=0.1, rtol=0.05)
        c = cfg(modes=("eager",), shapes=(("prefill", 1, 16), ("decode", 2, 16)))
        rows = gpucells.cell_rows(dense, pruned, "2:4", "sparse24_random", 0.5, c, CPU_HW)
    assert len(rows) == 2 and all(r["error"] is None for r in rows), rows
    assert all(r["kernel"] == "cuSPARSELt" and r["eager_speedup"] > 0 for r in rows)


# --- 2. gpu-check needs no install step and says what it found ---------------------------------------------
def test_make_gpu_check_runs_only_the_check():
    out = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines() == ["python3 -m prunelib.gpucheck"], out


def test_gpu_check_names_torch_cuda_and_gpu(capsys):
    with pytest.raises(SystemExit, match=r"needs a CUDA device \(none here: gpu-check found: torch " + re.escape(torch.__version__) +
                                         r", CUDA none.*GPU none"):
        gpucheck.main([])
    assert capsys.readouterr().out.startswith(f"gpu-check found: torch {torch.__version__}, CUDA none")


# --- 3. no reference cycle: a workload and its pruned model die with their last reference -----------------
def test_workloads_and_pruned_models_are_freed_without_a_gc_pass(monkeypatch):
    dense = gpucells.tiny_model()
    made = []

    class Recorded(timing.Workload):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(weakref.ref(self))

    monkeypatch.setattr(timing, "Workload", Recorded)
    was = gc.isenabled()
    gc.collect()
    gc.disable()  # nothing but reference counts may free them
    try:
        assert not gc.isenabled()
        pruned = gpucells.build(dense, "last_n", 0.25, {})
        model_ref = weakref.ref(pruned)
        for phase, static in (("prefill", False), ("decode", True), ("decode", False)):
            timing.compare(dense, pruned, phase, 1, 16, reps=2, warmup=1, static_cache=static, profile=phase == "decode")
        assert len(made) == 6 and all(r() is None for r in made)  # dead once compare() returned
        work = timing.Workload(pruned, "decode", 1, 16)
        compiled = timing.Workload(pruned, "decode", 1, 16, mode="compiled", compile_backend="eager")
        compiled()
        refs = [weakref.ref(work), weakref.ref(compiled)]
        del work, compiled, pruned
        assert all(r() is None for r in refs) and model_ref() is None
        assert not gc.isenabled()
    finally:
        if was:
            gc.enable()


# --- 4. graph prefill captures the kernel eager runs ---------------------------------------------------------
@pytest.fixture
def sdpa_calls(monkeypatch):
    from transformers.utils.import_utils import is_cuda_stream_capturing  # what transformers asks (False on a CPU)

    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append({"capturing": is_cuda_stream_capturing(), "mask": attn_mask is not None,
                      "causal": is_causal, "kv_heads": k.shape[1]})
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def test_graph_prefill_captures_the_causal_kernel_that_eager_runs(monkeypatch, sdpa_calls):
    """Captured over a StaticCache, transformers builds an S x S mask and repeats K/V heads (no flash); the
    graph prefill now captures the eager step over a fresh DynamicCache: is_causal, no mask, 2 KV heads."""
    model = gpucells.tiny_model()
    eager = timing.Workload(model, "prefill", 1, 24)().logits
    assert sdpa_calls and all(c["causal"] and not c["mask"] and c["kv_heads"] == 2 for c in sdpa_calls)
    monkeypatch.setattr(workload, "graphs_on", lambda device: True)
    with fake_cuda_graphs():
        sdpa_calls.clear()
        work = timing.Workload(model, "prefill", 1, 24, mode="graph")
        captured = [c for c in sdpa_calls if c["capturing"]]
        assert len(captured) == 4 and all(c["causal"] and not c["mask"] and c["kv_heads"] == 2 for c in captured)
        torch.testing.assert_close(work().logits, eager, rtol=1e-5, atol=1e-5)
        assert "fresh DynamicCache" in work.note and "is_causal" in work.note
        with pytest.raises(ValueError, match="S x S mask"):
            timing.Workload(model, "prefill", 1, 24, mode="graph", static_cache=True)
        sdpa_calls.clear()  # what capture over a StaticCache would have timed: the fake flag reaches transformers
        static = timing.Workload(model, "prefill", 1, 24, static_cache=True)
        static()  # a warm-up before capture, as Workload._capture does (it initialises the static layers)
        static.reset()
        sdpa_calls.clear()
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            static()
        assert all(c["mask"] and not c["causal"] and c["kv_heads"] == 4 for c in sdpa_calls), sdpa_calls


# --- 5. eager over a StaticCache apart from graph replay -------------------------------------------------------
def test_decode_graph_replays_the_eager_static_step(monkeypatch, sdpa_calls):
    model = gpucells.tiny_model()
    static = timing.Workload(model, "decode", 2, 16, static_cache=True)
    ref = static().logits
    eager_static = [dict(c, capturing=False) for c in sdpa_calls[-4:]]
    monkeypatch.setattr(workload, "graphs_on", lambda device: True)
    with fake_cuda_graphs():
        sdpa_calls.clear()
        work = timing.Workload(model, "decode", 2, 16, mode="graph")
        assert [dict(c, capturing=False) for c in sdpa_calls if c["capturing"]] == eager_static
        torch.testing.assert_close(work().logits, ref, rtol=1e-5, atol=1e-5)


def test_gpu_check_times_eager_over_a_static_cache_too():
    dense = gpucells.tiny_model()
    pruned = gpucells.build(dense, "last_n", 0.25, {})
    c = cfg(modes=("eager", "static"), shapes=(("prefill", 1, 16), ("decode", 2, 16)), profile=0)
    rows = gpucells.cell_rows(dense, pruned, "static depth", "last_n", 0.25, c, CPU_HW)
    for r in rows:
        assert r["eager_speedup"] > 0 and r["static_speedup"] > 0 and r["static_efficiency"] > 0, r
        assert "StaticCache" in r["timing_mode_reason"] and "cache effect" in r["timing_mode_reason"]
    c = timing.compare(dense, pruned, "decode", 1, 16, reps=2, warmup=1, static_cache=True)
    assert "StaticCache" in c.note


# --- 6. dynamic cells: torch.compile where it captures them, else the reason and the host-time share ----------
def test_busy_union_counts_overlaps_once():
    assert timing.busy_union([(0, 2), (1, 3), (5, 6), (5.5, 5.7), (10, 10)]) == pytest.approx(4.0)


class _Step:
    def __init__(self, fn):
        self.model, self.fn = torch.nn.Linear(2, 2), fn

    def __call__(self):
        return self.fn()

    def reset(self):
        pass


def test_host_share_tells_a_host_bound_step_from_a_kernel_bound_one():
    a = torch.randn(384, 384)
    assert timing.host_share(_Step(lambda: time.sleep(0.02)), 2) > 0.9
    assert timing.host_share(_Step(lambda: [a @ a for _ in range(20)]), 2) < 0.3


@pytest.mark.parametrize("cell,method", [("dynamic depth", "dyn_depth_random"), ("token pruning", "token_prune_random")])
def test_dynamic_cells_try_torch_compile_and_report_host_share(cell, method):
    dense = gpucells.tiny_model().to(torch.bfloat16)
    pruned = gpucells.build(dense, method, 0.25, {})
    c = cfg(modes=("graph", "eager"), shapes=(("decode", 1, 16),))
    (row,) = gpucells.cell_rows(dense, pruned, cell, method, 0.25, c, CPU_HW)
    assert "compiled_speedup" in row or "compiled: " in row["error"]  # compiled, or why it could not be
    assert "graph" not in (row["error"] or "") and "torch.compile" in row["timing_mode_reason"]
    assert 0 <= row["host_share"] <= 1 and 0 <= row["dense_host_share"] <= 1 and row["eager_speedup"] > 0


def test_the_compile_probe_fails_in_dynamos_trace_where_a_step_cannot_be_one_graph():
    dense = gpucells.tiny_model()
    assert timing.probe_compile(dense, "decode", 1, 8) > 0
    with pytest.raises(Exception, match="data-dependent"):
        timing.probe_compile(gpucells.build(dense, "dyn_depth_random", 0.25, {}), "decode", 1, 8)


def test_a_compiled_step_is_not_reused_for_a_model_whose_hooks_differ():
    """Every compiled workload compiles the same code; dynamo skips hook guards by default, so a model of the
    same shapes with a hook (as token pruning's taps) would have run the hook-free graph of another model."""
    plain, hooked = gpucells.tiny_model(), gpucells.tiny_model()
    timing.Workload(plain, "decode", 1, 8, mode="compiled", compile_backend="eager")()
    hooked.model.norm.register_forward_hook(lambda mod, args, out: out * 0)
    out = timing.Workload(hooked, "decode", 1, 8, mode="compiled", compile_backend="eager")().logits
    assert torch.equal(out, timing.Workload(hooked, "decode", 1, 8)().logits)


def test_a_step_that_recompiles_every_call_is_refused_before_timing():
    model = gpucells.tiny_model()

    def scale(mod, args, out):  # host state the compiled step guards on (a float), new every call
        mod.scale = getattr(mod, "scale", 1.0) + 1e-9
        return out * mod.scale

    model.model.norm.register_forward_hook(scale)
    with pytest.raises(RuntimeError, match="compiled the step again on its second call"):
        timing.compare(model, model, "decode", 1, 8, reps=2, warmup=1, mode="compiled", compile_backend="eager")


# --- 7. host-side set-up on the model's device -------------------------------------------------------------------
def test_slicegpt_random_draws_and_factorises_on_the_models_device(monkeypatch):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    with torch.device("meta"):  # a device other than the CPU: host-side work would show up as CPU tensors
        model = AutoModelForCausalLM.from_config(tiny_config(hidden_size=512, intermediate_size=1024)).eval()
    seen, qr = [], torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda x, *a, **k: seen.append((x.device.type, x.dtype)) or qr(x, *a, **k))
    t0 = time.perf_counter()
    pruned, _ = pruning.prune(model, "slicegpt_random", 0.25)
    assert seen and set(seen) == {("meta", torch.float64)} and time.perf_counter() - t0 < 5
    assert {p.device.type for p in pruned.parameters()} == {"meta"}


def test_sparse24_random_draws_on_the_models_device(monkeypatch):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config()).eval()
    seen, rand = [], torch.rand

    class Drawn(Exception):
        pass

    def spy(*a, **k):
        seen.append(rand(*a, **k).device.type)
        raise Drawn

    monkeypatch.setattr(torch, "rand", spy)
    with pytest.raises(Drawn):
        pruning.prune(model, "sparse24_random", 0.5)
    assert seen == ["meta"]


# --- 8. compilation per shape is warmed outside the timed region and reported ----------------------------------
def test_a_compile_per_shape_is_set_up_time_never_a_sample():
    """Like flex_attention compiling once per batch shape: a step whose first call per input shape costs 0.3 s."""
    model = gpucells.tiny_model()
    shapes = set()

    def first_call_per_shape(mod, args, kwargs):
        shape = tuple(kwargs["input_ids"].shape)
        if shape not in shapes:
            shapes.add(shape)
            time.sleep(1.0)

    model.register_forward_pre_hook(first_call_per_shape, with_kwargs=True)
    dense = gpucells.tiny_model()
    c = timing.compare(dense, model, "prefill", 2, 16, reps=3, warmup=0)
    assert c.setup_s[1] >= 1.0 and max(c.cand.samples) < 1.0 and c.setup_s[0] < 1.0
    rows = gpucells.cell_rows(dense, model, "dense", "dense", 0.0, cfg(modes=("eager",), shapes=(("prefill", 3, 16),)),
                              CPU_HW)
    assert rows[0]["eager_setup_s"] >= 1.0 and rows[0]["eager_dense_setup_s"] < 1.0 and rows[0]["eager_dense_ms"] < 1e3


# --- the run: a deadline it enforces, cells isolated, the CSV written as rows finish -----------------------------
def test_modes_that_would_not_fit_are_rows_saying_skipped_budget():
    dense = gpucells.tiny_model()
    budget = gpucells.Budget(60.0)
    budget.record(("decode", 1, 16, "eager"), 1e6)  # an earlier cell's cost of this comparison
    c = cfg(modes=("eager", "static"), shapes=(("decode", 1, 16),))
    (row,) = gpucells.cell_rows(dense, dense, "dense", "dense", 0.0, c, CPU_HW, budget)
    assert row["skipped"] == "budget: eager" and "eager: skipped: budget" in row["error"]
    assert "eager_speedup" not in row and row["static_speedup"] > 0


def test_a_spent_budget_skips_every_cell_but_writes_its_rows(tmp_path):
    csv = tmp_path / "check.csv"
    df = gpucheck.main(["--smoke", "--budget", "0.001", "--cells", "dense,2:4", "--csv", str(csv)])
    assert len(df) == len(pd.read_csv(csv)) == 6 and df.skipped.str.startswith("skipped: budget").all()


def test_a_failing_cell_is_a_row_and_a_killed_run_keeps_its_csv(tmp_path, monkeypatch):
    real = gpucells.build

    def build(model, method, *a, **k):
        if method == "last_n":
            raise RuntimeError("CUDA out of memory (simulated)")
        if method == "width_random":
            raise KeyboardInterrupt  # the run is killed here
        return real(model, method, *a, **k)

    monkeypatch.setattr(gpucells, "build", build)
    monkeypatch.setattr(hardware, "for_device", lambda device: CPU_HW)  # no CPU micro-benchmark: not under test
    csv = tmp_path / "check.csv"
    with pytest.raises(KeyboardInterrupt):
        gpucheck.run(True, csv=csv, cells=["dense", "static depth", "static width"], memory=False, profile=0,
                     modes=("eager",))
    df = pd.read_csv(csv)
    assert list(df.cell) == ["dense"] * 3 + ["static depth"] and df.eager_speedup.iloc[:3].notna().all()
    assert df.error.iloc[3] == "prune: RuntimeError: CUDA out of memory (simulated)"
    assert (df.torch == torch.__version__).all()


# --- the budget estimate made without a GPU --------------------------------------------------------------------
def test_device_setup_of_each_cell_at_8b_shapes():
    from prunelib.cost import costmodel
    from prunelib.model.models import random_config
    from prunelib.run import gpubudget

    shape, h200 = costmodel.ModelShape.from_config(random_config("llama-3.1-8b")), hardware.spec("h200-sxm")
    s = {m: gpubudget.device_setup(m, shape, h200) for m in ("dense", "last_n", "sparse24_random", "slicegpt_random")}
    assert s["dense"] == 0 and 0.005 < s["last_n"] < 0.01  # 2 x 16 GB at 4.8 TB/s
    assert s["last_n"] < s["sparse24_random"] < 0.2 and 0.5 < s["slicegpt_random"] < 2  # 65 QRs + fp64 rotations


def test_host_step_of_the_8b_topology_is_its_python_not_its_arithmetic():
    from prunelib.run import gpubudget

    topo, created = gpubudget.topology_model()
    assert len(topo.model.layers) == 32 and topo.config.hidden_size == 64 and created < 10
    assert 0 < gpubudget.host_step(topo, "decode", 1) < 2


@pytest.mark.slow  # every cell built and probed on the topology: minutes
def test_the_estimate_covers_every_cell(tmp_path):
    df = gpucheck.main(["--estimate", "h200-sxm", "--csv", str(tmp_path / "est.csv")])
    assert list(df.cell) == [c[0] for c in gpucells.CELLS] and (df.total_s > 0).all()
    assert df.attrs["total_s"] > df.total_s.sum()  # model creation on top
