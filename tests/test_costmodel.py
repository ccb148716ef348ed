import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from prunelib.cost import costmodel, hardware
from prunelib.measure import timing
from prunelib.cost.costmodel import ModelShape
from prunelib.pruning.surgery import remove_layers, slice_heads, slice_mlp

HW = hardware.HardwareSpec("test", {"float32": 1e12, "bfloat16": 4e12, "float16": 4e12}, 1e11)


def counted_flops(model, phase, batch, length):
    """FLOPs that torch's own counter sees in one prefill / decode step (eager attention: plain matmuls)."""
    work = timing.Workload(model, phase, batch, length)
    with FlopCounterMode(display=False) as fc:
        work()
    return fc.get_total_flops()


def variants(model):
    n = len(model.model.layers)
    depth = remove_layers(model, range(n - n // 4, n))
    width = slice_mlp(model, {i: torch.arange(0, model.config.intermediate_size, 2) for i in range(n)})
    width = slice_heads(width, {i: torch.tensor([0, 2]) for i in range(0, n, 2)})
    return {"dense": model, "depth": depth, "width": width}


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_flops_match_torch_flop_counter_embedded(embedded, phase):
    model = embedded[0]
    old = model.config._attn_implementation
    model.set_attn_implementation("eager")  # SDPA's CPU kernel has no formula in FlopCounterMode
    try:
        for name, m in variants(model).items():
            predicted = sum(g.flops for g in costmodel.gemms(ModelShape.of(m), phase, 2, 48, causal=False))  # eager: S x S
            counted = counted_flops(m, phase, 2, 48)
            assert predicted == pytest.approx(counted, rel=0.01), name
    finally:
        model.set_attn_implementation(old)


def test_shapes_read_from_pruned_model(tiny_model):
    pruned = slice_heads(slice_mlp(tiny_model, {1: torch.arange(32)}), {2: torch.tensor([1])})
    shape = ModelShape.of(pruned)
    assert [ls.intermediate for ls in shape.layers] == [128, 32, 128, 128]
    assert [(ls.n_heads, ls.n_kv_heads) for ls in shape.layers] == [(4, 2), (4, 2), (2, 1), (4, 2)]
    assert len(ModelShape.of(remove_layers(tiny_model, [0])).layers) == 3


def test_gemm_dims_follow_taxonomy(tiny_model):
    shape = ModelShape.of(tiny_model)
    pre = {g.name: g for g in costmodel.gemms(shape, "prefill", 2, 10)}
    dec = {g.name: g for g in costmodel.gemms(shape, "decode", 2, 10)}
    q = pre["layers.0.self_attn.q_proj"]
    assert (q.m, q.n, q.k) == (20, 64, 64)  # M = B*S, N = heads*head_dim, K = hidden
    d = dec["layers.0.mlp.down_proj"]
    assert (d.m, d.n, d.k) == (2, 64, 128)  # M = B in decode
    qk = dec["layers.0.self_attn.qk"]
    assert (qk.m, qk.n, qk.k, qk.count) == (1, 11, 16, 8)  # one query vs S+1 keys, per (sequence, head)
    assert pre["lm_head"].m == 2  # prefill needs last-position logits only


def test_from_config_matches_model(tiny_model):
    assert ModelShape.from_config(tiny_model.config) == ModelShape.of(tiny_model)


def test_shipped_big_configs_cost_as_expected():
    import json

    from transformers import AutoConfig

    from prunelib.model.models import CONFIG_DIR

    fields = json.loads((CONFIG_DIR / "llama-3.1-8b.json").read_text())
    fields.pop("_source")
    shape = ModelShape.from_config(AutoConfig.for_model(**fields))
    # decode at B=1 is weight-bound: bytes ~ 2 bytes x (8.03e9 params - 0.53e9 input embeddings)
    c = costmodel.cost(shape, "decode", 1, 1, "bfloat16", hardware.KNOWN["h100-sxm"])
    assert c.bytes == pytest.approx(2 * 7.5e9, rel=0.01)
    assert c.seconds == pytest.approx(c.bytes / 3.35e12, rel=0.01)  # memory-bound on H100


def test_theoretical_speedup(tiny_model):
    dense = ModelShape.of(tiny_model)
    half = costmodel.drop_layers(dense, [2, 3])
    s = costmodel.theoretical_speedup(dense, half, "decode", 1, 8, "float32", HW)
    assert 1.5 < s < 2.0  # the LM head is not removed, so less than 2x
    assert costmodel.theoretical_speedup(dense, dense, "prefill", 1, 8, "float32", HW) == 1.0
    assert ModelShape.of(remove_layers(tiny_model, [2, 3])) == half


def test_roofline_regimes(tiny_model):
    c = costmodel.cost(ModelShape.of(tiny_model), "prefill", 8, 256, "float32", HW)
    assert set(c.table.bound) <= {"compute", "memory"}
    assert c.seconds == pytest.approx(c.table.seconds.sum())
    full = costmodel.cost(ModelShape.of(tiny_model), "prefill", 8, 256, "float32", HW, causal=False)
    assert c.flops < full.flops  # causal by default: the kernels skip the masked half
    qk = lambda cost: cost.table.set_index("name").flops["layers.0.self_attn.qk"]  # noqa: E731
    assert qk(c) == qk(full) * 257 / 512


@pytest.mark.parametrize("kw,match", [
    (dict(phase="train"), "phase"), (dict(batch=0), "batch"), (dict(length=-3), "length"), (dict(dtype="int4"), "dtype"),
])
def test_bad_input(tiny_model, kw, match):
    args = dict(phase="prefill", batch=1, length=8, dtype="float32") | kw
    with pytest.raises(ValueError, match=match):
        costmodel.gemms(ModelShape.of(tiny_model), **args)


def test_hardware_specs():
    assert hardware.spec("h200").bandwidth == 4.8e12
    with pytest.raises(ValueError, match="unknown hardware"):
        hardware.spec("tpu-v9")
    with pytest.raises(ValueError, match="no peak"):
        hardware.KNOWN["a100-80gb"].flops("int8")


def test_cpu_microbenchmark_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELIB_CACHE", str(tmp_path))
    calls = []
    real = hardware.measure_cpu

    def fake_measure(threads=None):
        calls.append(threads)
        return real(threads, size_mb=8, gemm_n=128)

    monkeypatch.setattr(hardware, "measure_cpu", fake_measure)
    a = hardware.local_cpu()
    b = hardware.local_cpu()
    assert a == b and len(calls) == 1
    assert a.bandwidth > 1e8 and a.flops("float32") > 1e8
    assert (tmp_path / "hardware.json").exists()


# --- the fields of the other cells: low rank, 2:4, shortcuts, dynamic fractions ----------
def _layer(**kw):
    from prunelib.model.adapter import LayerShape

    return LayerShape(hidden=64, n_heads=4, n_kv_heads=2, head_dim=16, intermediate=128, **kw)


def _flops(layer, phase="prefill", B=2, S=32, **kw):
    shape = ModelShape(hidden=64, vocab=256, layers=(layer,))
    return {g.name: g for g in costmodel.gemms(shape, phase, B, S, **kw)}


def test_low_rank_projection_is_two_gemms():
    g = _flops(_layer(ranks=(("down_proj", 8),)))
    assert "layers.0.mlp.down_proj" not in g
    first, second = g["layers.0.mlp.down_proj.first"], g["layers.0.mlp.down_proj.second"]
    assert (first.m, first.n, first.k) == (64, 8, 128) and (second.m, second.n, second.k) == (64, 64, 8)
    assert first.flops + second.flops == 2 * 64 * 8 * (128 + 64)


def test_2to4_halves_flops_only_with_sparse_kernels():
    layer = _layer(sparse24=("up_proj",))
    dense = _flops(layer)["layers.0.mlp.up_proj"]
    sparse = _flops(layer, sparse_kernels=True)["layers.0.mlp.up_proj"]
    assert sparse.flops == dense.flops / 2 and sparse.bytes < dense.bytes
    cpu = hardware.HardwareSpec("cpu", {"float32": 1e12}, 1e11)  # no sparse kernels: no saving claimed
    shape = ModelShape(hidden=64, vocab=256, layers=(layer,))
    assert costmodel.theoretical_speedup(ModelShape(64, 256, (_layer(),)), shape, "prefill", 1, 32, "float32", cpu) == 1
    gpu = hardware.KNOWN["h100-sxm"]
    assert costmodel.theoretical_speedup(ModelShape(64, 256, (_layer(),)), shape, "prefill", 8, 512, "bfloat16", gpu) > 1


def test_dynamic_fractions_scale_m_and_attention():
    full = dict(causal=False)  # proportions of the full S x S product
    dense, routed = _flops(_layer(), **full), _flops(_layer(attn_tokens=0.5, mlp_tokens=0.25, router=1), **full)
    assert routed["layers.0.self_attn.q_proj"].flops == dense["layers.0.self_attn.q_proj"].flops / 2
    assert routed["layers.0.self_attn.k_proj"].flops == dense["layers.0.self_attn.k_proj"].flops  # K/V kept for all
    assert routed["layers.0.self_attn.qk"].flops == dense["layers.0.self_attn.qk"].flops / 2
    assert routed["layers.0.mlp.down_proj"].flops == dense["layers.0.mlp.down_proj"].flops / 4
    assert routed["layers.0.router"].flops == 2 * 64 * 64 * 1
    causal = _flops(_layer(attn_tokens=0.5))["layers.0.self_attn.qk"]  # routed queries: explicit mask, full rows
    assert causal.flops == routed["layers.0.self_attn.qk"].flops
    pruned = _flops(_layer(seq_frac=0.5), **full)
    assert pruned["layers.0.mlp.up_proj"].flops == dense["layers.0.mlp.up_proj"].flops / 2
    assert pruned["layers.0.self_attn.qk"].flops == dense["layers.0.self_attn.qk"].flops / 4  # S/2 x S/2
    sparse = _flops(_layer(attn_density=0.25, attn_block=8, attn_tile=8))  # S = 32: 4 blocks, 10 causal tiles
    assert sparse["layers.0.self_attn.pv"].flops == 0.25 * 10 * 8 * 8 * 2 * 16 * 2 * 4  # tiles x b^2 x 2d x B x heads
    est = sparse["layers.0.self_attn.estimate"]
    assert (est.m, est.n, est.k, est.count) == (4, 4, 16, 2 * 2)  # per sequence and KV head
    assert _flops(_layer(shortcut=2))["layers.0.shortcut1"].flops == 2 * 64 * 64 * 64


def test_shape_overrides_reach_the_cost_model(tiny_model):
    from prunelib.model.adapter import LayoutError, ModelAdapter

    tiny_model.model.layers[1].mlp.shape_overrides = lambda: {"mlp_tokens": 0.5}
    assert ModelAdapter(tiny_model).layer_shape(1).mlp_tokens == 0.5
    tiny_model.model.layers[1].mlp.shape_overrides = lambda: {"bogus": 1}
    with pytest.raises(LayoutError, match="bogus"):
        ModelAdapter(tiny_model).layer_shape(1)


def test_routed_decode_skips_weight_reads_at_batch_one():
    dense = _flops(_layer(), "decode", B=1)["layers.0.mlp.up_proj"]
    routed = _flops(_layer(mlp_tokens=0.25), "decode", B=1)["layers.0.mlp.up_proj"]
    weights = 4 * 64 * 128
    assert dense.bytes - routed.bytes == pytest.approx(0.75 * weights + 4 * 0.75 * 128 + 4 * 0.75 * 64)
    prefill = _flops(_layer(mlp_tokens=0.25), "prefill", B=1, S=64)["layers.0.mlp.up_proj"]
    assert prefill.bytes == pytest.approx(4 * (16 * 64 + 16 * 128) + weights)  # some token always runs it


# --- FLOPs against torch's own counter: dense, block-sparse, token pruning; prefill and decode -----------
def _cpu_sdpa_flops(q, k, v, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs):
    """FLOPs of the CPU SDPA kernel, which FlopCounterMode has no formula for.

    Its full product, as torch counts its CUDA SDPA kernels (``sdpa_flop_count``, which
    ignores causality); with ``is_causal`` the masked upper triangle is removed analytically
    (the kernel skips the key blocks above the diagonal), leaving the causal pairs.
    """
    from torch.utils.flop_counter import sdpa_flop_count

    full = sdpa_flop_count(q, k, v)
    if not is_causal:
        return full
    S, T = q[-2], k[-2]
    return full * sum(min(i + 1, T) for i in range(S)) // (S * T)


def counted_sdpa_flops(model, phase, length, batch=1):
    """FlopCounterMode's total over one prefill (logits of the last position) or one decode step after one."""
    from transformers import DynamicCache

    from prunelib.model.adapter import ModelAdapter

    ids = torch.randint(0, 256, (batch, length + 1), generator=torch.Generator().manual_seed(0))
    ModelAdapter(model).reset_stats()
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops})
    with torch.inference_mode():
        if phase == "prefill":
            with counter:
                model(ids[:, :length], use_cache=True, logits_to_keep=1)
        else:
            cache = DynamicCache(config=model.config)
            model(ids[:, :length], past_key_values=cache, use_cache=True, logits_to_keep=1)
            with counter:
                model(ids[:, length:], past_key_values=cache, use_cache=True)
    return counter.get_total_flops()


@pytest.mark.parametrize("length", [256, 2048])
def test_flops_match_torch_counter_for_dense_and_dynamic_attention(length):
    """Causal dense SDPA, block-sparse tiles (+ estimators) and token pruning within 1% of FlopCounterMode."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from prunelib import pruning

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(num_hidden_layers=2, max_position_embeddings=4096)).eval()
    variants = {"dense": model, "sparse_attn_block": pruning.prune(model, "sparse_attn_block", 0.5)[0],
                "sparse_attn_window": pruning.prune(model, "sparse_attn_window", 0.75)[0],
                "token_prune_attn": pruning.prune(model, "token_prune_attn", 0.5)[0]}
    for name, m in variants.items():
        for phase in ("prefill", "decode"):
            counted = counted_sdpa_flops(m, phase, length)
            predicted = sum(g.flops for g in costmodel.gemms(ModelShape.of(m), phase, 1, length))
            assert predicted == pytest.approx(counted, rel=0.01), (name, phase)
    shape = ModelShape.of(variants["sparse_attn_block"])  # the last run: a decode step, sparse
    assert shape.layers[0].attn_tile == 16 and shape.layers[0].attn_density < 0.6
