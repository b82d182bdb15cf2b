"""Grammar-constrained decoding: structured outputs (`format`) with llguidance.

Ollama's `format` is `"json"` (any JSON object) or a JSON schema. llguidance compiles either
to a grammar and, for one sequence, an `LLMatcher` computes which tokens may come next as a
bitmask over the vocabulary (one bit per token). `Grammar.mask` sets the logits of the
tokens it rules out to -inf before the sampler picks one; the runner then `accept`s the
chosen token, and ends the sequence once the grammar is `done` (the JSON value is closed).

llguidance works with any tokenizer given each token's bytes: herd hands it
`Tokenizer.piece(id, special=True)` for every id (control tokens marked with a 0xFF prefix
byte, llguidance's convention for special tokens) and the end-of-generation ids. Building
that view of a vocabulary takes ~0.1 s for 49k tokens and ~1 s for 262k, so it is made once
per tokenizer.

Two choices keep small models from running on until `num_predict` instead of closing the
JSON value: whitespace between tokens is fixed (`", "` and `": "`), and an object schema
with `properties` but no `additionalProperties` admits no other keys, as in llama.cpp's
json-schema-to-grammar, which Ollama uses.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from typing import Any

import llguidance
import numpy as np

from herd.errors import GrammarError
from herd.sample.transforms import Logits
from herd.tokenizer import Tokenizer

# Overridable per schema with llguidance's "x-guidance" key.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
_NEG_INF = np.float32(-np.inf)


def format_grammar(fmt: Any) -> str | None:
    """The llguidance grammar for an Ollama `format` value: None when unset (null, ""),
    a grammar for `"json"` or a JSON schema (an object, or its JSON text). Raises
    GrammarError, with the reason, for anything else or a schema llguidance rejects."""
    if fmt is None or fmt == "" or fmt == "null":
        return None
    if fmt == "json":
        schema: Any = {"type": "object"}
    elif isinstance(fmt, str) and fmt.lstrip().startswith("{"):
        try:
            schema = json.loads(fmt)
        except json.JSONDecodeError as e:
            raise GrammarError(f"invalid JSON schema: {e}") from None
    else:
        schema = fmt
    if not isinstance(schema, dict):
        raise GrammarError(
            f'invalid format: {json.dumps(fmt)}; expected "json" or a JSON schema object'
        )
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            _closed(schema), defaults=JSON_OPTIONS
        )
    except (ValueError, TypeError) as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(f"invalid JSON schema: {messages[0] if messages else 'rejected'}")
    return grammar


_SUBSCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else")
_SUBSCHEMAS = ("prefixItems", "anyOf", "oneOf", "allOf")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")


def _closed(schema: Any) -> Any:
    """A copy of `schema` where objects with `properties` and no `additionalProperties`
    take no other keys."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    for key in _SUBSCHEMA + ("additionalProperties",):
        if isinstance(out.get(key), dict):
            out[key] = _closed(out[key])
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), list):
            out[key] = [_closed(s) for s in out[key]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: _closed(v) for k, v in out[key].items()}
    return out


class _Vocabulary:
    """A tokenizer as llguidance's TokenizerWrapper expects it."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        n = tok.n_vocab
        eog = [i for i in range(n) if tok.is_eog(i)]
        if not eog:
            raise GrammarError("structured outputs need an end-of-generation token")
        self.eos_token_id = eog[0]
        self.eog_ids = eog
        self.bos_token_id = tok.bos_id
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for i in range(n):
            piece = tok.piece(i, special=True)
            if tok.is_control(i):
                piece = b"\xff" + piece
                self.special_token_ids.append(i)
            self.tokens.append(piece)

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tok.encode(text, add_special=False, parse_special=False)


_TOKENIZERS: weakref.WeakKeyDictionary[Any, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def grammar_tokenizer(tok: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of a herd tokenizer, built once per tokenizer object."""
    with _LOCK:
        found = _TOKENIZERS.get(tok)
        if found is None:
            vocab = _Vocabulary(tok)
            found = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(vocab), eos_token=vocab.eog_ids
            )
            _TOKENIZERS[tok] = found
        return found


class Grammar:
    """One sequence's grammar (a `herd.sample.Constraint`): an llguidance matcher and its
    token bitmask."""

    def __init__(self, tok: Tokenizer, grammar: str) -> None:
        lltok = grammar_tokenizer(tok)
        self.n_vocab = int(lltok.vocab_size)
        self.matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"invalid grammar: {self.matcher.get_error()}")
        self._bits = np.zeros((self.n_vocab + 31) // 32, np.int32)
        # time spent computing and applying masks, and advancing (for benchmarks)
        self.mask_ns = self.accept_ns = 0
        self.masks = 0

    @classmethod
    def from_format(cls, tok: Tokenizer, fmt: Any) -> Grammar | None:
        """The grammar for an Ollama `format` value, or None when it is unset."""
        grammar = format_grammar(fmt)
        return None if grammar is None else cls(tok, grammar)

    def mask(self, logits: Logits, out: Logits) -> Logits:
        t0 = time.perf_counter_ns()
        if self.matcher.is_error():
            raise GrammarError(f"structured output failed: {self.matcher.get_error()}")
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        n = min(self.n_vocab, out.shape[0])
        bits = np.unpackbits(self._bits.view(np.uint8), count=n, bitorder="little")
        if out is logits:
            np.copyto(out[:n], _NEG_INF, where=~bits.view(bool))
        else:  # cheaper than copying the row and masking it
            np.copyto(out, _NEG_INF)
            np.copyto(out[:n], logits[:n], where=bits.view(bool))
        out[n:] = _NEG_INF  # logits rows padded past the vocabulary
        self.mask_ns += time.perf_counter_ns() - t0
        self.masks += 1
        return out

    def accept(self, token: int) -> None:
        t0 = time.perf_counter_ns()
        ok = self.matcher.consume_token(int(token))
        self.accept_ns += time.perf_counter_ns() - t0
        if not ok:
            raise GrammarError(
                f"structured output rejected token {token}: {self.matcher.get_error()}"
            )

    @property
    def done(self) -> bool:
        return bool(self.matcher.is_stopped())
