"""Every method declares a ladder in its own unit: rungs are valid sparsities, distinct, and whole units."""
import pytest

from prunelib import pruning
from prunelib.model.models import random_config
from prunelib.pruning import ladders
from prunelib.pruning.registry import REGISTRY, check_sparsity, rungs


class Meta:  # what ladders and ranges read: a config and, for some ranges, the layer list through the adapter
    def __init__(self, config):
        self.config = config


@pytest.fixture(scope="module")
def smol_like(request):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    # the embedded model's proportions (30 layers, MLP 1536, hidden 576) at a tiny width of everything else
    cfg = tiny_config(num_hidden_layers=30, intermediate_size=1536, hidden_size=576, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_rungs_are_valid_distinct_and_ascending(name, smol_like):
    r = rungs(name, smol_like)
    assert r == sorted(set(r)) and len(r) >= 3, r
    for s in r:
        assert check_sparsity(name, s, smol_like) == pytest.approx(s)


def _whole(values, n):
    return all(abs(v * n - round(v * n)) < 1e-9 for v in values)


def test_rungs_are_in_each_methods_unit(smol_like):
    L, I, H = 30, 1536, 576
    for m in ("shortgpt", "angular", "last_n", "depth_random", "shortgpt_attn", "depth_random_mlp"):
        r = rungs(m, smol_like)
        assert _whole(r, L) and r[0] == pytest.approx(1 / L) and r[-1] == pytest.approx((L - 1) / L)  # 1..29 layers
    assert _whole(rungs("sparse24_wanda", smol_like), 2 * L)  # k of 30 layers made 2:4
    width = rungs("width_flap", smol_like)
    assert _whole(width, I / 64) and width[0] == pytest.approx(64 / I)  # multiples of 64 MLP channels
    assert _whole(rungs("slicegpt", smol_like), H / 8)
    assert rungs("dyn_depth_router", smol_like)[:7] == [0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.15]  # target skip rates
    assert rungs("sparse_attn_block", smol_like) == [round(0.1 * k, 10) for k in range(1, 10)]


def test_a_criterion_and_its_baseline_share_a_ladder(smol_like):
    for name, m in REGISTRY.items():
        if m.baseline:
            assert rungs(name, smol_like) == rungs(m.baseline, smol_like), name


def test_depth_rungs_prune_whole_distinct_layers(tiny_model):
    counts = [len(pruning.prune(tiny_model, "last_n", s)[0].model.layers) for s in rungs("last_n", tiny_model)]
    assert counts == [3, 2, 1]  # 1, 2, 3 of 4 layers removed: each rung its own model


def test_ladder_builders_by_hand():
    cfg = random_config("llama-3.1-8b")
    assert ladders.whole(ladders.layers)(cfg)[:2] == [1 / 32, 2 / 32]
    assert ladders.grid(0.25)(cfg) == [0.25, 0.5, 0.75]
    snapped = ladders.snapped(0.05, lambda m: 0.125)(cfg)  # grid of 0.05 rounded to eighths, duplicates merged
    assert snapped == [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
    with pytest.raises(ValueError, match="step=0 is not allowed"):
        ladders.grid(0)
    assert ladders.fine_then_grid(0.1, 0.25)(cfg) == [0.1, 0.2, 0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="fine=0.3 is not allowed"):
        ladders.fine_then_grid(0.3, 0.25)


def test_a_method_without_a_ladder_is_refused():
    from prunelib.core.validate import InputError
    from prunelib.pruning.registry import Method

    REGISTRY["_no_ladder"] = Method("_no_ladder", REGISTRY["last_n"].cell, lambda *a: None, "x", False, lambda m: 0.5)
    try:
        with pytest.raises(InputError, match="declares no ladder"):
            rungs("_no_ladder", None)
        with pytest.raises(ValueError, match="declares no ladder"):
            pruning.check_contract()
    finally:
        del REGISTRY["_no_ladder"]
