import pytest
import torch

from prunelib.cost import hardware
from prunelib import pruning
from prunelib.measure import timing
from prunelib.model.adapter import ModelAdapter
from prunelib.model.models import parameter_count
from prunelib.pruning import registry
from prunelib.pruning.surgery import remove_sublayers

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
DEPTH = ["shortgpt", "angular", "last_n", "depth_random", "shortgpt_attn", "shortgpt_mlp"]


def logits(model, ids=IDS):
    with torch.inference_mode():
        return model(ids).logits


def make_identity(model, layer, part="both"):
    """Zero the output projections: the (sub)layer then adds nothing to the residual."""
    with torch.no_grad():
        if part in ("both", "attention"):
            model.model.layers[layer].self_attn.o_proj.weight.zero_()
        if part in ("both", "mlp"):
            model.model.layers[layer].mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("method", DEPTH)
def test_zero_sparsity_equals_dense(tiny_model, cal, method):
    pruned, report = pruning.prune(tiny_model, method, 0.0, calibration=cal)
    torch.testing.assert_close(logits(pruned), logits(tiny_model), rtol=0, atol=0)
    assert report.params_pruned == report.params_dense == parameter_count(tiny_model)


@pytest.mark.parametrize("method", ["shortgpt", "angular"])
def test_criteria_find_the_layer_that_does_nothing(tiny_model, cal, method):
    make_identity(tiny_model, 2)
    pruned, report = pruning.prune(tiny_model, method, 0.25, calibration=cal)
    assert report.removed["layers"] == [2]
    torch.testing.assert_close(logits(pruned), logits(tiny_model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,kind", [("shortgpt_attn", "attention"), ("shortgpt_mlp", "mlp")])
def test_sublayer_criteria(tiny_model, cal, method, kind):
    make_identity(tiny_model, 1, kind)
    pruned, report = pruning.prune(tiny_model, method, 0.25, calibration=cal)
    assert report.removed[kind] == [1]
    torch.testing.assert_close(logits(pruned), logits(tiny_model), rtol=1e-5, atol=1e-5)
    shape = ModelAdapter(pruned).layer_shape(1)
    assert (shape.has_attn, shape.has_mlp) == (kind != "attention", kind != "mlp")


def test_shapes_and_parameter_counts(tiny_model, cal):
    per_layer = sum(p.numel() for p in tiny_model.model.layers[0].parameters())
    attn = sum(p.numel() for p in tiny_model.model.layers[0].self_attn.parameters())
    mlp = sum(p.numel() for p in tiny_model.model.layers[0].mlp.parameters())
    dense = parameter_count(tiny_model)
    for method, expected in [("last_n", dense - 2 * per_layer), ("shortgpt", dense - 2 * per_layer),
                             ("shortgpt_attn", dense - 2 * attn), ("shortgpt_mlp", dense - 2 * mlp)]:
        pruned, report = pruning.prune(tiny_model, method, 0.5, calibration=cal, hw=hardware.KNOWN["h100-sxm"])
        assert report.params_pruned == parameter_count(pruned) == expected, method
        assert report.cost["decode"]["bound_speedup"] > 1.0
    pruned, report = pruning.prune(tiny_model, "last_n", 0.5)
    assert report.removed["layers"] == [2, 3] and len(pruned.model.layers) == 2


def test_sublayer_removed_model_decodes(tiny_model):
    pruned = remove_sublayers(tiny_model, attention=[0, 2], mlp=[1])
    assert [l.self_attn.layer_idx for l in pruned.model.layers if hasattr(l.self_attn, "layer_idx")] == [0, 1]
    work = timing.Workload(pruned, "decode", 1, 10, seed=3)
    out = work().logits[:, -1]
    full = torch.cat([timing._tokens(pruned, 1, 10, 3), work.inputs["input_ids"]], dim=1)
    torch.testing.assert_close(out, logits(pruned, full)[:, -1], rtol=1e-4, atol=1e-4)
    assert pruned.generate(IDS[:1], max_new_tokens=3, do_sample=False).shape == (1, 15)


def test_bad_input(tiny_model, cal):
    with pytest.raises(ValueError, match=r"sparsity 1.0 is out of range for 'shortgpt'.*0 <= s <= 0.75"):
        pruning.prune(tiny_model, "shortgpt", 1.0, calibration=cal)
    with pytest.raises(ValueError, match="sparsity -0.1 is out of range"):
        pruning.prune(tiny_model, "last_n", -0.1)
    with pytest.raises(ValueError, match="unknown pruning method 'magic'; registered: .*shortgpt"):
        pruning.prune(tiny_model, "magic", 0.1)
    with pytest.raises(ValueError, match="needs calibration data"):
        pruning.prune(tiny_model, "shortgpt", 0.25)


def test_registry_refuses_duplicates_and_unknown_cells():
    kw = dict(baseline=None, needs_calibration=False, max_sparsity=lambda m: 1)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("shortgpt", "static_depth", "x", **kw)(lambda *a: a)
    with pytest.raises(ValueError, match="unknown taxonomy cell 'static_magic'"):
        registry.register("x", "static_magic", "x", **kw)
    assert set(DEPTH) <= set(pruning.methods("static_depth"))


def test_every_method_keeps_the_contract():
    """Every criterion names a registered random baseline of its own cell and unit; literal names."""
    import pathlib
    import re

    pruning.check_contract()
    for name, m in registry.REGISTRY.items():
        if m.baseline is not None:
            b = registry.get(m.baseline)
            assert (b.cell, b.unit, b.baseline) == (m.cell, m.unit, None), name
    assert registry.get("shortgpt_attn").baseline == "depth_random_attn"
    assert registry.get("dyn_depth_router_mlp").baseline == "dyn_depth_random_mlp"
    src = "".join(p.read_text() for p in pathlib.Path(pruning.__file__).parent.glob("*.py"))
    for name in registry.REGISTRY:
        if not name.startswith("test_"):
            assert re.search(rf'register\(\s*"{name}"', src), f"{name} is not registered under its literal name"


@pytest.mark.parametrize("fault, message", [
    (dict(baseline="nope"), "names baseline 'nope', which is not registered"),
    (dict(baseline="width_random"), "must be a baseline of the same cell and unit"),
    (dict(baseline="shortgpt"), "must be a baseline of the same cell and unit"),
])
def test_contract_faults_are_named(fault, message):
    registry.register("contract_probe", "static_depth", "x", unit="decoder layers", needs_calibration=False,
                      max_sparsity=lambda m: 1, ladder=lambda m: [0.5], **fault)(lambda *a: a)
    try:
        with pytest.raises(ValueError, match=message):
            pruning.check_contract()
    finally:
        registry.REGISTRY.pop("contract_probe")


def test_random_sublayer_baselines_remove_random_sublayers_of_their_kind(tiny_model):
    for kind, method in (("attention", "depth_random_attn"), ("mlp", "depth_random_mlp")):
        _, report = pruning.prune(tiny_model, method, 0.5, seed=1)
        other = {tuple(pruning.prune(tiny_model, method, 0.5, seed=s)[1].removed[kind]) for s in range(8)}
        assert report.removed[kind] == pruning.prune(tiny_model, method, 0.5, seed=1)[1].removed[kind]  # seeded
        assert len(report.removed[kind]) == 2 and len(other) > 1  # 2 of 4 sublayers; another seed, other ones
        assert report.params_pruned < report.params_dense


def test_random_baseline_is_seeded():
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config(num_hidden_layers=12)).eval()
    picks = [pruning.prune(model, "depth_random", 0.25, seed=s)[1].removed["layers"] for s in (0, 0, 1, 2)]
    assert picks[0] == picks[1] and len(picks[0]) == 3
    assert len({tuple(p) for p in picks}) > 1
