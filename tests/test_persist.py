"""Pruned models survive save_pretrained / from_pretrained, per-layer shapes included."""
import pytest
import torch

from prunelib import pruning
from prunelib.adapter import ModelAdapter
from prunelib.calibration import CalibrationSet
from prunelib.models import load_pruned, parameter_count, save_pruned

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
STATIC = [m for m in pruning.methods() if pruning.get(m).cell.static]
SPARSITY = {"static_k_24": 0.5}


def logits(model):
    with torch.inference_mode():
        return model(IDS).logits


@pytest.mark.parametrize("method", STATIC)
def test_save_and_reload_give_the_same_logits(tiny_model, tmp_path, method):
    cal = CalibrationSet(torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(1)), "synthetic", None, 1)
    cell = pruning.get(method).cell.name
    pruned, _ = pruning.prune(tiny_model, method, SPARSITY.get(cell, 0.25), calibration=cal)
    save_pruned(pruned, tmp_path / "m")
    loaded = load_pruned(tmp_path / "m")
    assert ModelAdapter(loaded).layer_shapes() == ModelAdapter(pruned).layer_shapes()
    assert parameter_count(loaded) == parameter_count(pruned)
    torch.testing.assert_close(logits(loaded), logits(pruned))


def test_depth_pruned_config_is_updated_for_plain_from_pretrained(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    pruned, _ = pruning.prune(tiny_model, "last_n", 0.5)
    save_pruned(pruned, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()  # no prunelib needed for this one
    assert plain.config.num_hidden_layers == 2
    torch.testing.assert_close(logits(plain), logits(pruned))


def test_weights_that_do_not_fit_the_structure_are_an_error(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    save_pruned(pruning.prune(tiny_model, "last_n", 0.25)[0], tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    state = load_file(f)
    state.pop("model.norm.weight")
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing.*model.norm.weight"):
        load_pruned(tmp_path / "m")
