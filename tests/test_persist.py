"""Pruned models survive a save and reload (JSON structure + safetensors, no pickle), for every method;
outside prunelib they load exactly or are refused, never initialised at random."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from prunelib import pruning
from prunelib.model.adapter import ModelAdapter
from prunelib.model.checkpoint import STRUCTURE_FILE, CheckpointError
from prunelib.model.models import load_model, load_pruned, parameter_count, save_pruned

IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
SPARSITY = {"static_k_24": 0.5}
OPTIONS = {"dynamic_nk_attention": {"block": 8, "page": 4}}  # blocks small enough to engage on 40 tokens
#: plain transformers can represent these (same classes and shapes as a model built from the config)
REPRESENTABLE = {"last_n", "shortgpt", "angular", "depth_random", "width_magnitude", "width_random", "width_wanda_sp",
                 "sparse24_magnitude", "sparse24_wanda", "sparse24_sparsegpt", "sparse24_random"}


def logits(model):
    with torch.inference_mode():
        return model(IDS).logits


def pruned_model(model, method, cal):
    cell = pruning.get(method).cell.name
    pruned, _ = pruning.prune(model, method, SPARSITY.get(cell, 0.25), calibration=cal, **OPTIONS.get(cell, {}))
    if not pruning.get(method).cell.static:  # run a prefill and a decode step: caches and counters hold state
        with torch.inference_mode():
            cache = DynamicCache(config=pruned.config)
            pruned(IDS[:1], past_key_values=cache, use_cache=True)
            pruned(IDS[:1, :1], past_key_values=cache, use_cache=True)
    return pruned


@pytest.mark.parametrize("method", pruning.methods())
def test_every_method_reloads_exactly_and_plain_transformers_loads_exactly_or_refuses(tiny_model, cal, tmp_path, method):
    pruned = pruned_model(tiny_model, method, cal)
    save_pruned(pruned, tmp_path / "m")
    assert not list(tmp_path.glob(".m.*")), "no temporary folder left behind"
    loaded = load_pruned(tmp_path / "m")
    assert type(loaded) is type(pruned)
    assert ModelAdapter(loaded).layer_shapes() == ModelAdapter(pruned).layer_shapes()
    assert parameter_count(loaded) == parameter_count(pruned)
    for _ in range(2):  # dynamic state (router RNG, counters) advances identically
        torch.testing.assert_close(logits(loaded), logits(pruned), rtol=0, atol=0)
    try:
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    except ValueError as err:
        assert method not in REPRESENTABLE
        assert "prunelib.model.models.load_pruned" in str(err)
    else:
        assert method in REPRESENTABLE
        torch.testing.assert_close(logits(plain), logits(pruned), rtol=0, atol=0)


def test_dynamic_state_is_stored_as_tensors_and_json(tiny_model, cal, tmp_path):
    pruned = pruned_model(tiny_model, "dyn_depth_router", cal)
    save_pruned(pruned, tmp_path / "m")
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "m" / "model.safetensors")
    assert any(k.endswith("router.weight") for k in weights)
    tree = json.loads((tmp_path / "m" / STRUCTURE_FILE).read_text())
    text = json.dumps(tree)
    assert "RoutedDecoderLayer" in text and '"threshold"' in text


def test_uniform_width_pruning_gets_a_plain_config(tiny_model, tmp_path):
    pruned, _ = pruning.prune(tiny_model, "width_magnitude", 0.5)
    save_pruned(pruned, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    shape = ModelAdapter(pruned).layer_shape(0)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == \
        (shape.n_heads, shape.n_kv_heads, shape.intermediate)


def test_a_model_without_tokenizer_reloads_with_load_model(tiny_model, tmp_path):
    save_pruned(pruning.prune(tiny_model, "last_n", 0.25)[0], tmp_path / "m")
    model, tok = load_model(str(tmp_path / "m"))
    assert tok is None and len(ModelAdapter(model).layers) == 3


def test_unstorable_model_is_refused_before_anything_is_written(tiny_model, tmp_path):
    pruned = pruning.prune(tiny_model, "last_n", 0.25)[0]
    pruned.model.layers[0].mlp.scale_fn = lambda x: 2 * x  # a closure cannot be stored as data
    with pytest.raises(CheckpointError, match="scale_fn"):
        save_pruned(pruned, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_saving_over_a_folder_replaces_it_whole(tiny_model, tmp_path):
    save_pruned(pruning.prune(tiny_model, "lowrank_svd", 0.25)[0], tmp_path / "m")
    save_pruned(pruning.prune(tiny_model, "last_n", 0.5)[0], tmp_path / "m")
    assert len(ModelAdapter(load_pruned(tmp_path / "m")).layers) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_weights_that_do_not_fit_the_structure_are_an_error(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    save_pruned(pruning.prune(tiny_model, "last_n", 0.25)[0], tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    state = load_file(f)
    state.pop("model.norm.weight")
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing.*model.norm.weight"):
        load_pruned(tmp_path / "m")


def test_a_kind_outside_the_registry_is_refused(tiny_model, tmp_path):
    """A structure names kinds, keys of the registry: a module path (the old allow-list's test) is just unknown."""
    save_pruned(pruning.prune(tiny_model, "lowrank_svd", 0.25)[0], tmp_path / "m")
    f = tmp_path / "m" / STRUCTURE_FILE
    f.write_text(f.read_text().replace('"prunelib.pruning.lowrank.LowRankLinear"', '"os.system"'))
    with pytest.raises(CheckpointError, match="kind 'os.system' is not one prunelib can rebuild"):
        load_pruned(tmp_path / "m")


def test_an_old_pickled_checkpoint_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "prunelib_structure.pt").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(str(tmp_path / "m"))


def test_no_pickle_in_prunelib():
    root = Path(__file__).resolve().parents[1] / "prunelib"
    bad = []
    for f in root.rglob("*.py"):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"weights_only\s*=\s*False|^\s*(import|from)\s+(c?pickle|dill|cloudpickle)\b|torch\.load\(",
                         line):
                bad.append(f"{f.name}:{n}: {line.strip()}")
    assert not bad, bad


@pytest.mark.slow
def test_lm_eval_cli_refuses_a_checkpoint_it_cannot_represent(tmp_path, embedded):
    """The CLI scores a representable checkpoint and refuses a low-rank one, naming prunelib's loader."""
    from prunelib.core import evaltasks
    from tests.conftest import tiny_config

    _, tok = embedded
    torch.manual_seed(0)
    tiny = AutoModelForCausalLM.from_config(tiny_config(vocab_size=len(tok))).eval()
    folder = evaltasks.prepare_tasks(["arc_easy"])

    def cli(model_dir):
        return subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                               f"pretrained={model_dir}", "--tasks", "arc_easy", "--include_path", str(folder),
                               "--limit", "2", "--device", "cpu", "--batch_size", "1"],
                              capture_output=True, text=True, timeout=600)

    save_pruned(pruning.prune(tiny, "last_n", 0.25)[0], tmp_path / "plain", tok)
    save_pruned(pruning.prune(tiny, "lowrank_svd", 0.25)[0], tmp_path / "lowrank", tok)
    ok = cli(tmp_path / "plain")
    assert ok.returncode == 0, ok.stderr[-2000:]
    refused = cli(tmp_path / "lowrank")
    assert refused.returncode != 0
    assert "prunelib.model.models.load_pruned" in refused.stderr
    assert "MISSING" not in refused.stderr + refused.stdout
