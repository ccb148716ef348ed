import pytest
import torch


def tiny_config(model_type: str = "llama", **kw):
    from transformers import AutoConfig

    fields = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  tie_word_embeddings=False)
    fields.update(kw)
    return AutoConfig.for_model(model_type, **fields)


FAMILIES = ("llama", "qwen2", "mistral", "phi3")


def tiny_family_model(model_type: str, **kw):
    """A seeded 4-layer random model of ``model_type`` (one of :data:`FAMILIES`) with GQA, for family tests.

    Qwen2 carries q/k/v biases, Phi-3 fused ``qkv_proj`` / ``gate_up_proj``; token ids stay in the tiny vocabulary.
    """
    from transformers import AutoModelForCausalLM

    if model_type not in FAMILIES:
        raise ValueError(f"model_type must be one of {FAMILIES}, got {model_type!r}")
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2) if model_type == "phi3" else {}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **ids, **kw)).eval()


@pytest.fixture(autouse=True)
def _isolated_results(tmp_path, monkeypatch):
    """No test may write to the project's own results store."""
    monkeypatch.setenv("PRUNELIB_RESULTS", str(tmp_path / "results"))
    # notebook kernels and CLI subprocesses measure fidelity on 4 windows (1 long one): they check plumbing, not
    # numbers, and 32 + 8 windows of the embedded model made each notebook test minutes long. In-process tests keep
    # the default: prunelib.measure.fidelity read it when the test modules imported it.
    monkeypatch.setenv("PRUNELIB_FIDELITY_WINDOWS", "4")
    from prunelib.model import calibration

    calibration._STATS.clear()  # criterion statistics memoised by another test's model of equal weights: not reused


@pytest.fixture
def tiny_model():
    """A 4-layer random Llama with GQA (4 query heads, 2 KV heads): fast, for shape-level tests."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config()).eval()


def synthetic_calibration(n: int = 6, length: int = 16):
    """Seeded random token windows standing in for calibration text in tiny-model tests."""
    from prunelib.model.calibration import CalibrationSet

    return CalibrationSet(torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(1)), "synthetic",
                          None, 1)


@pytest.fixture
def cal():
    return synthetic_calibration()


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct (cached safetensors copy; made by make setup)."""
    from prunelib.model.models import load_model

    return load_model()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
