"""Tokenizers built from GGUF metadata that produce exactly llama.cpp's token ids.

    tok = from_gguf(open_gguf(path))
    ids = tok.encode("Hello", add_special=True, parse_special=False)
    text = tok.decode(ids)

`tokenizer.ggml.model` picks the algorithm: `gpt2` (byte-level BPE with the pre-tokenizer
named by `tokenizer.ggml.pre`), `llama` (SentencePiece) or `bert` (WordPiece).
"""

from __future__ import annotations

from herd.errors import TokenizerError
from herd.gguf import GGUFFile
from herd.tokenizer import bpe, spm, wpm
from herd.tokenizer.base import BaseTokenizer, Tokenizer
from herd.tokenizer.stream import StreamDecoder

SUPPORTED_MODELS = {"gpt2": "byte-level BPE", "llama": "SentencePiece", "bert": "WordPiece"}


def from_gguf(g: GGUFFile) -> Tokenizer:
    """The tokenizer described by the file's `tokenizer.ggml.*` metadata."""
    kv = g.kv
    model = kv.get("tokenizer.ggml.model")
    supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODELS.items())
    if model is None:
        raise TokenizerError(
            f"{g.path}: no tokenizer.ggml.model in the metadata (supported tokenizers: {supported})"
        )
    # Ollama's converter writes every end-of-generation id here; llama.cpp ignores the key.
    extra = kv.get("tokenizer.ggml.eos_token_ids", [])
    extra_eog = tuple(int(i) for i in (extra if isinstance(extra, list) else [extra]))
    try:
        if model == "gpt2":
            return bpe.from_kv(kv, extra_eog)
        if model == "llama":
            return spm.from_kv(kv, extra_eog)
        if model == "bert":
            return wpm.from_kv(kv, extra_eog)
    except TokenizerError as e:
        raise TokenizerError(f"{g.path}: {e}") from e
    raise TokenizerError(
        f"{g.path}: unsupported tokenizer.ggml.model={model!r} (supported: {supported})"
    )


__all__ = ["BaseTokenizer", "StreamDecoder", "Tokenizer", "TokenizerError", "from_gguf"]
