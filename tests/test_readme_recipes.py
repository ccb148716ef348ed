"""The README's "Add a model family" and "Add a method" recipes, run as written."""
import re
from pathlib import Path

import pytest
import torch

from conftest import synthetic_calibration, tiny_config

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(section: str) -> str:
    text = README.read_text()
    body = text[text.index(f"## {section}"):]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_add_a_model_family_recipe():
    from transformers import AutoModelForCausalLM

    from prunelib.model.adapters.base import FAMILIES
    from prunelib.pruning import prune

    assert "granite" not in FAMILIES
    try:
        exec(compile(_block("Add a model family"), "README:add-a-family", "exec"), {})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("granite")).eval()
        pruned, report = prune(model, "shortgpt", 0.25, calibration=synthetic_calibration())
        ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            full = pruned(ids).logits
            out = pruned(ids[:, :8], use_cache=True)
            step = pruned(ids[:, 8:9], past_key_values=out.past_key_values).logits
        assert report.params_pruned < report.params_dense and len(report.removed["layers"]) == 1
        assert torch.allclose(step[:, -1], full[:, 8], atol=1e-4)
    finally:
        FAMILIES.pop("granite", None)


def test_add_a_method_recipe(tiny_model):
    from prunelib.run.checks import InputError
    from prunelib.pruning import REGISTRY, check_contract, methods, prune

    try:
        exec(compile(_block("Add a method"), "README:add-a-method", "exec"), {})
        assert "depth_update_norm" in methods("static_depth")
        check_contract()
        pruned, report = prune(tiny_model, "depth_update_norm", 0.25, calibration=synthetic_calibration())
        assert len(report.removed["layers"]) == 1 and len(report.removed["score"]) == 4
        assert report.params_pruned < report.params_dense
        with pytest.raises(InputError, match="round_to"):
            prune(tiny_model, "depth_update_norm", 0.25, calibration=synthetic_calibration(), round_to=8)
    finally:
        REGISTRY.pop("depth_update_norm", None)
