"""Tokenizers built from GGUF metadata that produce exactly llama.cpp's token ids.

    tok = from_gguf(open_gguf(path))
    ids = tok.encode("Hello", add_special=True, parse_special=False)
    text = tok.decode(ids)

`tokenizer.ggml.model` picks the algorithm: `gpt2` (byte-level BPE with the pre-tokenizer
named by `tokenizer.ggml.pre`), `llama` (SentencePiece) or `bert` (WordPiece).
"""

from __future__ import annotations

import math
from typing import Any

from herd.errors import GGUFError, TokenizerError
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
    _check_types(kv, g)
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


_K = "tokenizer.ggml."
_IDS = ("bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "mask", "cls")
_FIM = ("fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep")
_ID_KEYS = [f"{_K}{k}_token_id" for k in (*_IDS, *_FIM, "prefix", "suffix", "middle")]
_FLAG_KEYS = [_K + k for k in ("add_bos_token", "add_eos_token", "add_space_prefix")]
_FLAG_KEYS += [_K + "normalizer.lowercase", _K + "normalizer.strip_accents"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) or isinstance(v, float) and math.isfinite(v)


def _check_types(kv: dict[str, Any], g: GGUFFile) -> None:
    """Refuse tokenizer metadata of the wrong type (the file is untrusted): a GGUFError
    naming the key, before the tokenizers use the values."""

    def bad(key: str, expected: str) -> GGUFError:
        shown = repr(kv[key])
        shown = shown if len(shown) <= 60 else shown[:60] + "..."
        return GGUFError(f"{g.path}: metadata key {key}: expected {expected}, got {shown}")

    def is_list(key: str, item: type | tuple[type, ...]) -> bool:
        v = kv.get(key)
        return isinstance(v, list) and all(isinstance(x, item) for x in v)

    for key in ("model", "pre"):
        if _K + key in kv and not isinstance(kv[_K + key], str):
            raise bad(_K + key, "a string")
    if _K + "tokens" in kv and not (is_list(_K + "tokens", str) and kv[_K + "tokens"]):
        raise bad(_K + "tokens", "a non-empty array of strings")
    # (their lengths: read_vocab's TokenizerError)
    for key, item, what in (("scores", (int, float), "numbers"), ("token_type", int, "integers")):
        if _K + key in kv and not is_list(_K + key, item):
            raise bad(_K + key, f"an array of {what}, one per token")
    if _K + "merges" in kv and not is_list(_K + "merges", str):
        raise bad(_K + "merges", "an array of strings")
    for key in _ID_KEYS:
        if kv.get(key) is not None and not _is_int(kv[key]):
            raise bad(key, "a token id")
    eos_ids = kv.get(_K + "eos_token_ids")
    if eos_ids is not None and not all(
        map(_is_int, eos_ids if isinstance(eos_ids, list) else [eos_ids])
    ):
        raise bad(_K + "eos_token_ids", "token ids")
    for key in _FLAG_KEYS:
        if key in kv and not isinstance(kv[key], int | float):
            raise bad(key, "a boolean")


__all__ = ["BaseTokenizer", "StreamDecoder", "Tokenizer", "TokenizerError", "from_gguf"]
