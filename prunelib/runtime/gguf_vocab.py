"""A model's tokenizer as GGUF metadata, the way llama.cpp's ``convert_hf_to_gguf.py`` writes a byte-level BPE
("gpt2") vocabulary: every token in id order, its type, the merges, and the special token ids.

- a Hugging Face fast tokenizer whose model is byte-level BPE (SmolLM2, Llama 3, Qwen2): its vocabulary,
  added tokens (special ones as CONTROL, others USER_DEFINED) and merges; ids the model's embedding has beyond
  the tokenizer's are ``[PAD<id>]`` tokens of type UNUSED, as the converter writes them;
- no tokenizer (a random-weight model): llama.cpp's own convention for a model without a vocabulary,
  ``tokenizer.ggml.model = "none"`` and ``<arch>.vocab_size`` ids (llama.cpp makes that many placeholder
  tokens). It runs token ids, as prunelib feeds it; it cannot tokenize text.

A SentencePiece-style vocabulary (BPE with byte fallback, Unigram) is refused naming its model type.
prunelib feeds llama.cpp token ids tokenized by the Hugging Face tokenizer, so the pre-tokenizer name only
matters to someone who later tokenizes text with llama.cpp itself.
"""
from __future__ import annotations

import json

import gguf

from prunelib.core.validate import InputError


def no_vocab(n_vocab: int) -> dict:
    """The vocabulary of a model without a tokenizer: ``n_vocab`` placeholder ids (llama.cpp's ``none`` model)."""
    return {"model": "none", "n_vocab": int(n_vocab), "source": "none (no tokenizer: token ids only)"}


def hf_vocab(tokenizer, n_vocab: int) -> dict:
    """The vocabulary of a Hugging Face fast tokenizer (byte-level BPE), padded to the model's ``n_vocab`` ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError(f"tokenizer={type(tokenizer).__name__} is not allowed: expected a fast (tokenizers) "
                         "tokenizer, whose tokenizer.json holds the vocabulary and merges")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = model.get("type") if not model.get("byte_fallback") else "BPE with byte_fallback (SentencePiece)"
        raise InputError(f"tokenizer model {kind!r} is not allowed: the GGUF export writes byte-level BPE ('gpt2') "
                         "vocabularies only")
    by_id = {int(i): t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in spec.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if by_id and max(by_id) >= n_vocab:
        raise InputError(f"tokenizer ids up to {max(by_id)} are not allowed: the model's embedding has {n_vocab} rows")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    token_types = [types.get(i, gguf.TokenType.UNUSED) for i in range(n_vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    special = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")}
    return {"model": "gpt2", "pre": "default", "tokens": tokens, "types": token_types, "merges": merges,
            "special": {k: int(v) for k, v in special.items() if v is not None},
            "add_bos": bool(getattr(tokenizer, "add_bos_token", False)),
            "chat_template": getattr(tokenizer, "chat_template", None), "source": type(tokenizer).__name__}


def write_vocab(writer: gguf.GGUFWriter, vocab: dict) -> None:
    """Put ``vocab`` (from :func:`hf_vocab` or :func:`no_vocab`) into a GGUF writer's metadata."""
    writer.add_tokenizer_model(vocab["model"])
    if vocab["model"] == "none":
        return  # the placeholder count is <arch>.vocab_size
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types([int(t) for t in vocab["types"]])
    # llama.cpp requires the merges key of a gpt2 vocabulary; gguf-py's add_array drops an empty list
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, list(vocab["merges"]), gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.STRING)
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
               "pad": writer.add_pad_token_id}
    for k, v in vocab["special"].items():
        setters[k](v)
    if "add_bos" in vocab:
        writer.add_add_bos_token(vocab["add_bos"])
    if vocab.get("chat_template"):
        writer.add_chat_template(vocab["chat_template"])


def pre_tokenizer_of(gguf_path) -> str | None:
    """``tokenizer.ggml.pre`` of an existing GGUF file (the embedded model's, written by llama.cpp's converter)."""
    reader = gguf.GGUFReader(str(gguf_path))
    field = reader.fields.get(gguf.Keys.Tokenizer.PRE)
    return None if field is None else bytes(field.parts[field.data[0]]).decode()
