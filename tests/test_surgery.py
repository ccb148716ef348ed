import pytest
import torch

from prunelib.model.adapter import ModelAdapter
from prunelib.model.models import parameter_count
from prunelib.pruning.surgery import remove_layers, slice_heads, slice_mlp


def logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def test_no_op_surgery_equals_dense(tiny_model):
    ref = logits(tiny_model, IDS)
    torch.testing.assert_close(logits(remove_layers(tiny_model, []), IDS), ref)
    torch.testing.assert_close(logits(slice_mlp(tiny_model, {0: torch.arange(128)}), IDS), ref)
    torch.testing.assert_close(logits(slice_heads(tiny_model, {0: torch.arange(2)}), IDS), ref)


def test_remove_layers_shapes_and_generate(tiny_model):
    pruned = remove_layers(tiny_model, [1, 3])
    assert len(pruned.model.layers) == 2 and pruned.config.num_hidden_layers == 2
    assert [l.self_attn.layer_idx for l in pruned.model.layers] == [0, 1]
    per_layer = sum(p.numel() for p in tiny_model.model.layers[0].parameters())
    assert parameter_count(pruned) == parameter_count(tiny_model) - 2 * per_layer
    out = pruned.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 16)
    assert len(tiny_model.model.layers) == 4  # the original is untouched


def test_slicing_equals_zeroing(tiny_model):
    keep = torch.tensor([0, 5, 9, 100])
    sliced = slice_mlp(tiny_model, {2: keep})
    zeroed = slice_mlp(tiny_model, {})
    mask = torch.ones(128, dtype=torch.bool)
    mask[keep] = False
    with torch.no_grad():
        zeroed.model.layers[2].mlp.down_proj.weight[:, mask] = 0
    torch.testing.assert_close(logits(sliced, IDS), logits(zeroed, IDS), rtol=1e-5, atol=1e-5)

    sliced = slice_heads(tiny_model, {1: torch.tensor([1])})
    assert ModelAdapter(sliced).layer_shape(1).n_heads == 2
    zeroed = slice_heads(tiny_model, {})
    with torch.no_grad():  # KV head 0 serves query heads 0,1 -> o_proj input columns 0..31
        zeroed.model.layers[1].self_attn.o_proj.weight[:, :32] = 0
    torch.testing.assert_close(logits(sliced, IDS), logits(zeroed, IDS), rtol=1e-5, atol=1e-5)


def test_bad_surgery(tiny_model):
    with pytest.raises(ValueError, match="cannot remove all 4 layers"):
        remove_layers(tiny_model, range(4))
    with pytest.raises(ValueError, match=r"out of range; the model has layers 0..3"):
        remove_layers(tiny_model, [7])
    with pytest.raises(ValueError, match="KV head indices must be in 0..1"):
        slice_heads(tiny_model, {0: [2]})
