import pytest
import torch

from prunelib import pruning
from prunelib.model.adapter import ModelAdapter
from prunelib.model.models import parameter_count
from prunelib.pruning import width

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
WIDTH = ["width_magnitude", "width_wanda_sp", "width_flap", "width_random"]


def logits(model, ids=IDS):
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("method", WIDTH)
def test_zero_sparsity_equals_dense(tiny_model, cal, method):
    pruned, report = pruning.prune(tiny_model, method, 0.0, calibration=cal)
    torch.testing.assert_close(logits(pruned), logits(tiny_model))
    assert report.params_pruned == parameter_count(tiny_model)


@pytest.mark.parametrize("method", WIDTH)
def test_shapes_and_parameter_counts(tiny_model, cal, method):
    pruned, report = pruning.prune(tiny_model, method, 0.5, calibration=cal)
    shapes = ModelAdapter(pruned).layer_shapes()
    assert all((s.n_heads, s.n_kv_heads, s.intermediate) == (2, 1, 64) for s in shapes)  # GQA ratio kept
    h, hd = 64, 16
    per_layer = 2 * h * 32 + 2 * h * hd + 3 * h * 64 + 2 * h  # q,o + k,v + gate,up,down + 2 norms
    if method == "width_flap":
        per_layer += 2 * h  # compensation biases of o_proj and down_proj
    expected = 2 * 256 * h + h + 4 * per_layer
    assert report.params_pruned == parameter_count(pruned) == expected
    assert len(report.removed["mlp_channels"][0]) == 64 and len(report.removed["kv_heads"][0]) == 1
    assert pruned.generate(IDS[:1], max_new_tokens=3, do_sample=False).shape == (1, 15)


def test_criteria_keep_what_matters(tiny_model, cal):
    """Channels whose down_proj columns are zero contribute nothing: every criterion drops them first."""
    dead = torch.arange(0, 128, 2)
    with torch.no_grad():
        for layer in tiny_model.model.layers:
            layer.mlp.down_proj.weight[:, dead] = 0
            layer.mlp.gate_proj.weight[dead] *= 0.01
            layer.mlp.up_proj.weight[dead] *= 0.01
    for method in WIDTH:
        pruned, report = pruning.prune(tiny_model, method, 0.5, calibration=cal)
        found = report.removed["mlp_channels"][0] == dead.tolist()
        assert found != (method == "width_random"), method  # every criterion finds them; chance does not


def test_rounding_to_multiples(tiny_model, cal):
    pruned, _ = pruning.prune(tiny_model, "width_magnitude", 0.3, round_to=64)
    assert ModelAdapter(pruned).layer_shape(0).intermediate == 128  # 128 - 38 = 90 -> rounded up to 128
    pruned, _ = pruning.prune(tiny_model, "width_magnitude", 0.3, round_to=8)
    assert ModelAdapter(pruned).layer_shape(0).intermediate == 96
    with pytest.raises(ValueError, match=r"round_to=7 of pruning method .* expected one of \[8, 64\]"):
        pruning.prune(tiny_model, "width_magnitude", 0.3, round_to=7)


def test_compensation_matches_calibration_mean(tiny_model, cal):
    """FLAP's bias equals W[:, removed] @ mean(X[removed]) over the calibration tokens."""
    stats = width.consumer_input_stats(tiny_model, cal)
    pruned, report = pruning.prune(tiny_model, "width_flap", 0.5, calibration=cal)
    gone = torch.tensor(report.removed["mlp_channels"][2])
    w = tiny_model.model.layers[2].mlp.down_proj.weight.detach()
    torch.testing.assert_close(pruned.model.layers[2].mlp.down_proj.bias.detach(), w[:, gone] @ stats[("mlp", 2)]["mean"][gone])


def test_magnitude_group_score_is_the_l2_norm_of_the_group_weights(tiny_model):
    """A KV-head group's magnitude is ||(its q, k, v rows, its o_proj columns)||_2, and the lowest goes first."""
    from prunelib.model.adapter import ModelAdapter

    a = ModelAdapter(tiny_model)
    attn, shape = a.attn(1), a.layer_shape(1)
    hd, group = shape.head_dim, shape.n_heads // shape.n_kv_heads
    with torch.no_grad():  # make group 1 the largest in total but not in sum of per-feature norms
        attn.o_proj.weight[:, group * hd:] *= 0.2
        attn.k_proj.weight[hd:] *= 4.0
    expected = []
    for g in range(shape.n_kv_heads):
        q = attn.q_proj.weight[g * group * hd:(g + 1) * group * hd]
        o = attn.o_proj.weight[:, g * group * hd:(g + 1) * group * hd]
        k, v = attn.k_proj.weight[g * hd:(g + 1) * hd], attn.v_proj.weight[g * hd:(g + 1) * hd]
        expected.append(torch.cat([q.reshape(-1), k.reshape(-1), v.reshape(-1), o.reshape(-1)]).norm())
    scores = width.group_scores("magnitude", a, 1, None)
    torch.testing.assert_close(scores, torch.stack(expected).detach())
    _, report = pruning.prune(tiny_model, "width_magnitude", 0.5)
    assert report.removed["kv_heads"][1] == [int(torch.stack(expected).argmin())]
