"""Structured outputs: formats to grammars, the token mask, the sampler hook, and the
runner ending a sequence when the JSON value closes (a tiny random model, so only the
grammar can make its output valid JSON)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from herd.errors import GrammarError
from herd.gguf import open_gguf
from herd.ml import open_backend
from herd.models import load_model
from herd.options import Options
from herd.runner import Runner
from herd.sample import Sampler
from herd.sample.grammar import Grammar, format_grammar

# 64 tokens, like the tiny random Llama's vocabulary: characters, a few longer JSON
# pieces (so that one token can span grammar states), and an end-of-generation token.
PIECES = (
    ["<eos>"]
    + list('{}[]":, -.')
    + list("0123456789")
    + list("abcdefghijklmnopqrstuvwxyz")
    + ['{"', '": ', ', "', '"}', "true", "false", "null", "ab", "\n", "xy", "a\n", "}}"]
    + ['"a', " 1", "12", "yes", "no"]
)
assert len(PIECES) == 64
EOS = 0


class JsonTokenizer:
    n_vocab = len(PIECES)
    bos_id = None
    eos_id = EOS

    def piece(self, id: int, special: bool = False) -> bytes:
        return PIECES[id].encode() if id != EOS or special else b""

    def is_eog(self, id: int) -> bool:
        return id == EOS

    def is_control(self, id: int) -> bool:
        return id == EOS

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return [PIECES.index(c) for c in text]


SCHEMA = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"enum": ["x", "y"]},
        "c": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    },
    "required": ["a", "b", "c"],
}


def feed(g: Grammar, text: str) -> None:
    """Accept `text` one character token at a time, each one allowed by the mask."""
    for c in text:
        assert c in allowed(g) and not g.done, c
        g.accept(PIECES.index(c))


def allowed(g: Grammar) -> set[str]:
    row = g.mask(np.zeros(len(PIECES), np.float32), np.empty(len(PIECES), np.float32))
    return {PIECES[i] for i in np.flatnonzero(np.isfinite(row))}


@pytest.mark.parametrize("fmt", [None, "", "null"], ids=["none", "empty", "null"])
def test_unset_format_has_no_grammar(fmt: Any) -> None:
    assert format_grammar(fmt) is None
    assert Grammar.from_format(JsonTokenizer(), fmt) is None


@pytest.mark.parametrize(
    "fmt, reason",
    [
        ("xml", 'invalid format: "xml"'),
        (5, "invalid format: 5"),
        ([{"type": "object"}], "invalid format"),
        ("{not json", "invalid JSON schema"),
        ({"type": "nope"}, "Invalid type: nope"),
        ({"type": "array", "uniqueItems": True}, 'Unimplemented keys: ["uniqueItems"]'),
        ({"$ref": "http://example.com/s.json"}, "http://example.com/s.json"),
        ({"type": "string", "pattern": "(?=a)"}, "look-around"),
    ],
    ids=["string", "number", "list", "bad-json-text", "type", "keyword", "remote-ref", "regex"],
)
def test_invalid_or_unsupported_formats(fmt: Any, reason: str) -> None:
    with pytest.raises(GrammarError, match="invalid") as e:
        format_grammar(fmt)
    assert reason in str(e.value)


def test_mask_follows_the_schema_and_ends_when_closed() -> None:
    g = Grammar.from_format(JsonTokenizer(), SCHEMA)
    assert g is not None
    first = allowed(g)  # fixed whitespace: the object starts at once
    assert "{" in first and all(p.startswith("{") for p in first)
    feed(g, '{"a": 12, "b": "y", "c": [')
    assert {"true", "false", "t", "f", "]"} <= allowed(g)  # a token may span characters
    g.accept(PIECES.index("true"))
    feed(g, "]")
    assert allowed(g) == {"}"}  # one brace closes it ("}}" would not parse)
    g.accept(PIECES.index("}"))
    assert g.done and allowed(g) == {"<eos>"}


def test_bounds_enums_and_closed_objects() -> None:
    g = Grammar.from_format(JsonTokenizer(), SCHEMA)
    assert g is not None
    feed(g, '{"a": 12')
    assert not set("0123456789") & allowed(g)  # 120 > maximum 99
    feed(g, ', "b": "')
    assert allowed(g) == {"x", "y"}  # only the enum's values ("xy" is none)
    with pytest.raises(GrammarError, match="rejected token"):
        g.accept(PIECES.index("z"))


def test_json_format_is_any_object() -> None:
    g = Grammar.from_format(JsonTokenizer(), "json")
    assert g is not None
    feed(g, '{"q": ')
    g.accept(PIECES.index("null"))
    feed(g, "}")
    assert g.done


def test_sampler_never_picks_a_masked_token() -> None:
    logits = np.zeros(len(PIECES), np.float32)
    logits[PIECES.index("z")] = 50.0  # the model wants "z"; JSON must start with "{"
    original = logits.copy()
    for temperature in (0.0, 1.5):
        for seed in range(20):
            g = Grammar.from_format(JsonTokenizer(), SCHEMA)
            s = Sampler(temperature=temperature, top_k=0, top_p=1.0, seed=seed, grammar=g)
            assert PIECES[s.sample(logits)] in ("{", '{"')
    np.testing.assert_array_equal(logits, original)  # the caller's row is left alone


def test_mask_pads_rows_wider_than_the_vocabulary() -> None:
    g = Grammar.from_format(JsonTokenizer(), "json")
    assert g is not None
    row = g.mask(np.zeros(70, np.float32), np.empty(70, np.float32))
    assert np.isneginf(row[len(PIECES) :]).all()


def test_runner_output_always_validates(tiny_llama_path: Any) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    g = open_gguf(tiny_llama_path)
    backend = open_backend("numpy", g)
    model = load_model(g.config(), backend)
    tok = JsonTokenizer()
    runner = Runner(model, backend, tok, Options(num_ctx=256), model.context_length)
    for seed, temperature in [(0, 0.0), (1, 1.0), (2, 1.0), (3, 2.0)]:
        options = Options(temperature=temperature, seed=seed, top_k=0, num_predict=64)
        grammar = Grammar.from_format(tok, SCHEMA)
        events = list(runner.generate([5, 9, 13], options, grammar=grammar))
        text = "".join(e.text for e in events)
        assert events[-1].done_reason == "stop", text  # the closed object ended it
        jsonschema.validate(json.loads(text), SCHEMA)
