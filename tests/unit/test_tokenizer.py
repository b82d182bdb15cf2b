"""Tokenizers: ids and text exactly as llama.cpp, streaming decode, and bad metadata.

The goldens in tests/testdata come from scripts/make_goldens.py (llama-cpp-python on the
same GGUF files). Real-model tests are marked `slow`; the rest use tiny GGUFs written here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import pytest

from herd.errors import TokenizerError
from herd.gguf import open_gguf
from herd.tokenizer import StreamDecoder, Tokenizer, from_gguf

TESTDATA = Path(__file__).resolve().parent.parent / "testdata"
MODELS = ("smollm2", "gemma3")


def _golden(name: str) -> dict[str, Any]:
    return json.loads((TESTDATA / f"tokenizer_{name}.json").read_text(encoding="utf-8"))


GOLDENS = {name: _golden(name) for name in MODELS}


# --- real models ----------------------------------------------------------------------------


def _model_path(request: pytest.FixtureRequest, name: str) -> Path:
    # The store-backed fixtures from tests/conftest.py when present; else a local file.
    try:
        return Path(request.getfixturevalue(f"{name}_path"))
    except pytest.FixtureLookupError:
        path = Path(os.environ.get(f"HERD_TEST_{name.upper()}", f"/tmp/models/{name}.gguf"))
        if not path.exists():
            pytest.skip(f"no {name} GGUF (set HERD_TEST_{name.upper()})")
        return path


@pytest.fixture(scope="session")
def real_tokenizer(request: pytest.FixtureRequest) -> Callable[[str], Tokenizer]:
    cache: dict[str, Tokenizer] = {}

    def get(name: str) -> Tokenizer:
        if name not in cache:
            cache[name] = from_gguf(open_gguf(_model_path(request, name)))
        return cache[name]

    return get


CASES = [
    pytest.param(
        name, i, v, id=f"{name}-s{i:02d}-add{int(v['add_special'])}-parse{int(v['parse_special'])}"
    )
    for name in MODELS
    for i, case in enumerate(GOLDENS[name]["cases"])
    for v in case["variants"]
]


@pytest.mark.slow
@pytest.mark.parametrize("name, index, variant", CASES)
def test_ids_and_text_match_llama_cpp(
    real_tokenizer: Callable[[str], Tokenizer], name: str, index: int, variant: dict[str, Any]
) -> None:
    tok = real_tokenizer(name)
    text = GOLDENS[name]["cases"][index]["text"]
    assert tok.encode(text, variant["add_special"], variant["parse_special"]) == variant["ids"]
    assert tok.decode(variant["ids"]) == variant["text"]
    assert tok.decode(variant["ids"], special=True) == variant["text_special"]


@pytest.mark.parametrize("name", MODELS)
def test_goldens_cover_the_committed_corpus(name: str) -> None:
    corpus = json.loads((TESTDATA / "tokenizer_corpus.json").read_text(encoding="utf-8"))
    assert [c["text"] for c in GOLDENS[name]["cases"]] == corpus["strings"]
    assert len(corpus["strings"]) >= 40


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_goldens_were_made_from_this_file(request: pytest.FixtureRequest, name: str) -> None:
    h = hashlib.sha256()
    with open(_model_path(request, name), "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    assert h.hexdigest() == GOLDENS[name]["model_sha256"], "rerun scripts/make_goldens.py"


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_vocabulary_facts_match_llama_cpp(
    real_tokenizer: Callable[[str], Tokenizer], name: str
) -> None:
    tok, facts = real_tokenizer(name), GOLDENS[name]["vocab"]
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (
        facts["n_vocab"],
        facts["bos_id"],
        facts["eos_id"],
        facts["add_bos"],
        facts["add_eos"],
    )
    assert [i for i in range(tok.n_vocab) if tok.is_eog(i)] == facts["eog_ids"]
    control = [i for i in range(tok.n_vocab) if tok.is_control(i)]
    assert hashlib.sha256(json.dumps(control).encode()).hexdigest() == facts["control_sha256"]
    for special, key in ((False, "pieces_sha256"), (True, "pieces_special_sha256")):
        h = hashlib.sha256()
        for i in range(tok.n_vocab):
            p = tok.piece(i, special)
            h.update(len(p).to_bytes(4, "little") + p)
        assert h.hexdigest() == facts[key], f"piece(id, special={special}) differs"


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, text",
    [
        ("gemma3", "shaking face 🫨 and flamingo 🦩 and 龘"),  # <0xXX> byte-fallback tokens
        ("gemma3", "moose 🫎, hieroglyph 𓀀, 家族 👨‍👩‍👧‍👦"),
        ("smollm2", "你好世界，中文文本"),  # byte-level pieces split CJK characters
        ("smollm2", "emoji 😀 and ZWJ 👨‍👩‍👧‍👦"),
    ],
    ids=["gemma3-byte-fallback", "gemma3-mixed", "smollm2-cjk", "smollm2-emoji"],
)
def test_stream_decoder_holds_partial_characters(
    real_tokenizer: Callable[[str], Tokenizer], name: str, text: str
) -> None:
    tok = real_tokenizer(name)
    ids = tok.encode(text, add_special=False)
    partial = [i for i in ids if _incomplete_utf8(tok.piece(i))]
    assert partial, "precondition: some token carries part of a character"
    stream = StreamDecoder(tok)
    chunks = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(chunks) == tok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)
    assert "" in chunks  # something was held back


def _incomplete_utf8(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, text, eog",
    [
        ("smollm2", "<|im_end|>", True),
        ("smollm2", "<|endoftext|>", True),
        ("smollm2", "<|im_start|>", False),
        ("gemma3", "<end_of_turn>", True),
        ("gemma3", "<eos>", True),
        ("gemma3", "<start_of_turn>", False),
    ],
)
def test_end_of_generation_tokens(
    real_tokenizer: Callable[[str], Tokenizer], name: str, text: str, eog: bool
) -> None:
    tok = real_tokenizer(name)
    (tid,) = tok.encode(text, add_special=False, parse_special=True)
    assert tok.is_eog(tid) is eog
    assert tok.is_control(tid)
    assert tok.piece(tid) == b"" and tok.piece(tid, special=True) == text.encode()


# --- small fakes ----------------------------------------------------------------------------


class FakePieces:
    """Just enough of a Tokenizer for StreamDecoder: fixed bytes per id."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def piece(self, id: int, special: bool = False) -> bytes:
        return self.pieces[id]


@pytest.mark.parametrize(
    "pieces, expected_chunks",
    [
        ([b"a", b"\xf0\x9f", b"\x98", b"\x80", b"b"], ["a", "", "", "\U0001f600", "b", ""]),
        ([b"\xe4", b"\xb8\xad\xe6", b"\x96\x87"], ["", "中", "文", ""]),
        ([b"x", b"\xff", b"y"], ["x", "\ufffd", "y", ""]),  # invalid byte: replaced at once
        ([b"ok", b"\xe4\xb8"], ["ok", "", "\ufffd"]),  # flush gives up on a partial character
    ],
    ids=["emoji-4-tokens", "cjk-straddling", "invalid-byte", "incomplete-at-end"],
)
def test_stream_decoder_chunks(pieces: list[bytes], expected_chunks: list[str]) -> None:
    stream = StreamDecoder(FakePieces(pieces))  # type: ignore[arg-type]
    chunks = [stream.add(i) for i in range(len(pieces))] + [stream.flush()]
    assert chunks == expected_chunks
    assert "".join(chunks) == b"".join(pieces).decode("utf-8", errors="replace")


def _write_gguf(path: Path, kv: dict[str, Any]) -> Path:
    w = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in kv.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif value and isinstance(value[0], float):
            w.add_array(key, value)
        elif value and isinstance(value[0], int):
            w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
        else:
            w.add_array(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# A toy SentencePiece vocabulary: <unk> <s> </s>, 256 byte tokens, then pieces with scores.
SPM_PIECES = {"▁": -1.0, "a": -2.0, "b": -2.0, "c": -2.0, "ab": -1.5, "▁ab": -0.5, "bc": -0.1}
SPM_KV = {
    "tokenizer.ggml.model": "llama",
    "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"]
    + [f"<0x{b:02X}>" for b in range(256)]
    + list(SPM_PIECES),
    "tokenizer.ggml.scores": [0.0, 0.0, 0.0] + [0.0] * 256 + list(SPM_PIECES.values()),
    "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES),
    "tokenizer.ggml.add_space_prefix": True,
}
SPM_ID = {t: i for i, t in enumerate(SPM_KV["tokenizer.ggml.tokens"])}


@pytest.mark.parametrize(
    "text, pieces",
    [
        ("ab", ["<s>", "▁ab"]),
        ("abc", ["<s>", "▁", "a", "bc"]),  # "bc" outscores "▁ab": merged first, then stuck
        ("é", ["<s>", "▁", "<0xC3>", "<0xA9>"]),  # unknown character -> UTF-8 byte tokens
        ("", ["<s>"]),
    ],
    ids=["best-merge", "score-order", "byte-fallback", "empty"],
)
def test_sentencepiece_merges_by_score(tmp_path: Path, text: str, pieces: list[str]) -> None:
    tok = from_gguf(open_gguf(_write_gguf(tmp_path / "spm.gguf", SPM_KV)))
    assert tok.encode(text) == [SPM_ID[p] for p in pieces]
    # llama.cpp strips the space prefix from the first token only, so decode without <s>
    assert tok.decode(tok.encode(text, add_special=False)) == text


BPE_KV = {
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "gpt-2",
    "tokenizer.ggml.tokens": [
        "<|endoftext|>",
        "h",
        "e",
        "l",
        "o",
        "Ġ",
        "he",
        "ll",
        "hell",
        "hello",
        "Ġh",
        "<x>",
    ],
    "tokenizer.ggml.token_type": [3] + [1] * 10 + [4],
    "tokenizer.ggml.merges": ["l l", "h e", "he ll", "hell o", "Ġ h"],
    "tokenizer.ggml.bos_token_id": 0,
    "tokenizer.ggml.eos_token_id": 0,
}


@pytest.mark.parametrize(
    "text, parse_special, ids",
    [
        ("hello", False, [9]),
        ("hello hello", False, [9, 5, 9]),  # "Ġ h" ranks last: h is inside "hello" by then
        ("hello<x>", False, [9, 11]),  # user-defined tokens split out even without parsing
        ("<|endoftext|>", True, [0]),
        ("he", False, [6]),
    ],
    ids=["word", "two-words", "user-defined", "control-parsed", "partial"],
)
def test_byte_level_bpe_merges_by_rank(
    tmp_path: Path, text: str, parse_special: bool, ids: list[int]
) -> None:
    tok = from_gguf(open_gguf(_write_gguf(tmp_path / "bpe.gguf", BPE_KV)))
    assert tok.encode(text, add_special=True, parse_special=parse_special) == ids
    assert tok.decode(ids, special=True) == text


@pytest.mark.parametrize(
    "kv, message",
    [
        ({"general.name": "no tokenizer"}, "no tokenizer.ggml.model"),
        (
            {"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]},
            "unsupported tokenizer.ggml.model='rwkv' (supported: gpt2",
        ),
        ({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]}, "'t5'"),
        ({"tokenizer.ggml.model": "llama"}, "no tokenizer.ggml.tokens"),
        (
            {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]},
            "no tokenizer.ggml.merges",
        ),
        (
            {
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.pre": "no-such-pre",
                "tokenizer.ggml.tokens": ["a"],
                "tokenizer.ggml.merges": ["a a"],
            },
            "unsupported pre-tokenizer tokenizer.ggml.pre='no-such-pre'",
        ),
        (
            {
                "tokenizer.ggml.model": "llama",
                "tokenizer.ggml.tokens": ["a", "b"],
                "tokenizer.ggml.scores": [0.0],
            },
            "scores has 1 entries for 2 tokens",
        ),
    ],
    ids=["no-metadata", "rwkv", "t5", "no-tokens", "no-merges", "unknown-pre", "short-scores"],
)
def test_bad_metadata_raises_tokenizer_error(
    tmp_path: Path, kv: dict[str, Any], message: str
) -> None:
    g = open_gguf(_write_gguf(tmp_path / "bad.gguf", kv))
    with pytest.raises(TokenizerError) as err:
        from_gguf(g)
    assert message in str(err.value)
