import pytest
import torch

from prunelib.model import models
from prunelib.model.adapter import LayoutError, ModelAdapter


def test_embedded_model_is_smollm2(embedded):
    model, tok = embedded
    a = ModelAdapter(model)
    assert len(a.layers) == 30 and a.hidden_size == 576 and a.head_dim == 64
    s = a.layer_shape(0)
    assert (s.n_heads, s.n_kv_heads, s.intermediate) == (9, 3, 1536)
    assert models.parameter_count(model) == 134_515_008
    assert tok.pad_token is not None
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode(nxt).strip() == "Paris"  # the dequantised weights are the real model


def test_embedded_copy_is_cached_safetensors():
    path = models.embedded_path()
    assert (path / "model.safetensors").exists() and "quantization_config" not in (path / "config.json").read_text()


def test_local_path_round_trip(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(models.embedded_path()).save_pretrained(tmp_path)
    m, tok = models.load_model(str(tmp_path))
    assert models.fingerprint(m) == models.fingerprint(tiny_model)


def test_fingerprint_sees_weight_changes(tiny_model):
    before = models.fingerprint(tiny_model)
    with torch.no_grad():
        tiny_model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert models.fingerprint(tiny_model) != before


def test_unknown_model_name():
    with pytest.raises(ValueError, match="cannot load model 'no/such-model'"):
        models.load_model("no/such-model")
    with pytest.raises(ValueError, match="unknown random config 'gpt-5'.*llama-3.1-8b"):
        models.load_model("random:gpt-5")


def test_unknown_layout_is_named():
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(LayoutError, match="'gpt2' is not supported; supported families: llama, mistral, phi3, qwen2"):
        ModelAdapter(gpt2)


def test_missing_module_is_named(tiny_model):
    del tiny_model.model.layers[1].mlp.up_proj
    with pytest.raises(LayoutError, match=r"model.layers.1.mlp.up_proj"):
        ModelAdapter(tiny_model)


def test_qwen2_and_mistral_layouts():
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    for mt in ("qwen2", "mistral"):
        m = AutoModelForCausalLM.from_config(tiny_config(mt))
        assert ModelAdapter(m).layer_shape(0).n_kv_heads == 2


def test_bad_device_and_dtype():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available; allowed here: \\['cpu'\\]"):
            models.resolve_device("cuda")
    with pytest.raises(ValueError, match="'tpu' is not supported"):
        models.resolve_device("tpu")
    with pytest.raises(ValueError, match="dtype 'int3' is not supported; allowed"):
        models.resolve_dtype("int3")
    with pytest.raises(ValueError, match="float16.*CPU"):
        models.resolve_dtype("float16", "cpu")
    assert models.resolve_dtype("bfloat16") is torch.bfloat16
