"""Tokenizer files of a Hugging Face directory -> `tokenizer.ggml.*` metadata.

Follows llama.cpp's `convert_hf_to_gguf.py`, so the GGUF loads in llama.cpp and Ollama and
herd's tokenizers (which match llama.cpp) reproduce the Hugging Face token ids:

- `tokenizer.model` (SentencePiece) -> model `llama`: pieces, scores and types, padded to
  the config's vocab_size; added tokens from `added_tokens.json` and `tokenizer_config.json`.
- `tokenizer.json` with a BPE model -> model `gpt2`: vocabulary plus added tokens, merges,
  and the pre-tokenizer's llama.cpp name (`chkhsh`), found by encoding a fixed text with
  the `tokenizers` library, or (without it, or for a vocabulary llama.cpp does not list)
  by the pre-tokenizer's regexes.
- `tokenizer.json` with a WordPiece model (or `vocab.txt`) -> model `bert`, tokens
  rewritten as llama.cpp's WordPiece expects: `##x` -> `x`, other words -> `▁word`.
- Special ids, add-BOS/EOS/SEP flags and the chat template with `gguf.SpecialVocab` (the
  code llama.cpp's converter uses); list-valued ids in `generation_config.json` go to
  `tokenizer.ggml.<type>_token_ids`, as Ollama writes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf

from herd.convert.chkhsh import BY_REGEX, CHKTXT, HASHES
from herd.errors import ConvertError

log = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType
_K = gguf.Keys.Tokenizer


def vocab_kv(src: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """All `tokenizer.*` metadata for the directory."""
    tok_json = _read_json(src / "tokenizer.json") if (src / "tokenizer.json").is_file() else None
    model_type = (tok_json or {}).get("model", {}).get("type")
    if (src / "tokenizer.model").is_file() and model_type != "WordPiece":
        kv = _sentencepiece(src, cfg)
    elif model_type == "BPE":
        kv = _bpe(src, cfg, tok_json or {})
    elif model_type == "WordPiece" or (src / "vocab.txt").is_file():
        kv = _wordpiece(src, cfg, tok_json)
    elif tok_json is not None:
        raise ConvertError(
            f"tokenizer.json: unsupported tokenizer model {model_type!r} "
            "(supported: BPE, WordPiece, or a SentencePiece tokenizer.model)"
        )
    else:
        raise ConvertError(f"{src}: no tokenizer (tokenizer.json, tokenizer.model or vocab.txt)")
    kv.update(_special(src, len(kv[_K.LIST]), load_merges=kv[_K.MODEL] == "gpt2"))
    return kv


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path.name}: unreadable JSON: {e}") from None


# --- SentencePiece ----------------------------------------------------------------------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """Protocol buffer wire format: (field number, int | bytes) pairs."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield field, value


def read_sentencepiece(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) of a SentencePiece ModelProto, types as SentencePiece numbers."""
    pieces = []
    try:
        for field, value in _fields(path.read_bytes()):
            if field != 1:  # ModelProto.pieces; trainer/normalizer specs are not needed
                continue
            piece, score, typ = "", 0.0, NORMAL
            for f, v in _fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    (score,) = struct.unpack("<f", v)
                elif f == 3:
                    typ = v
            pieces.append((piece, score, typ))
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise ConvertError(f"{path.name}: not a SentencePiece model: {e}") from None
    if not pieces:
        raise ConvertError(f"{path.name}: no pieces in the SentencePiece model")
    return pieces


def _looks_special(token: str) -> bool:
    """llama.cpp's does_token_look_special: added tokens that ought to be control tokens."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _sentencepiece(src: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    pieces = read_sentencepiece(src / "tokenizer.model")
    n_vocab = int(cfg.get("vocab_size") or len(pieces))
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [UNUSED] * n_vocab
    for i, (piece, score, typ) in enumerate(pieces[:n_vocab]):
        tokens[i], scores[i] = piece, score
        # SentencePiece's USER_DEFINED pieces stay NORMAL here, as llama.cpp's converter has it
        types[i] = typ if typ in (UNKNOWN, CONTROL, UNUSED, BYTE) else NORMAL
    if len(pieces) > n_vocab:
        log.warning(
            "tokenizer.model has %d pieces, config vocab_size %d: extra pieces dropped",
            len(pieces),
            n_vocab,
        )
    if (src / "added_tokens.json").is_file():
        for text, tid in _read_json(src / "added_tokens.json").items():
            if 0 <= tid < n_vocab:
                tokens[tid], scores[tid], types[tid] = text, -1000.0, USER_DEFINED
    config = src / "tokenizer_config.json"
    decoder = _read_json(config).get("added_tokens_decoder", {}) if config.is_file() else {}
    for tid_text, data in decoder.items():
        tid, text = int(tid_text), data["content"]
        if not 0 <= tid < n_vocab:
            continue
        if data.get("special") or _looks_special(text):
            types[tid] = CONTROL
        else:
            text = text.replace("\u2581", " ")  # llama.cpp pre-normalizes user-defined spaces
            types[tid] = USER_DEFINED
        tokens[tid], scores[tid] = text, -1000.0
    return {
        _K.MODEL: "llama",
        _K.PRE: "default",
        _K.LIST: tokens,
        _K.SCORES: scores,
        _K.TOKEN_TYPE: types,
    }


# --- BPE and WordPiece from tokenizer.json ----------------------------------------------


def _base_vocab(
    name: str, vocab: dict[str, int], added: list[dict[str, Any]], cfg: dict[str, Any]
) -> tuple[list[str], list[int]]:
    """llama.cpp's get_vocab_base: tokens and types by id, padded to the config's size."""
    by_id = {i: t for t, i in vocab.items()}
    added_ids = {}
    for a in added:
        by_id[a["id"]] = a["content"]
        added_ids[a["content"]] = a
    n_vocab = int(cfg.get("vocab_size") or (max(by_id) + 1))
    if max(by_id) >= n_vocab:
        raise ConvertError(
            f"{name}: token id {max(by_id)} does not fit config.json vocab_size {n_vocab}"
        )
    tokens, types = [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        info = added_ids.get(text)
        if info is None:
            types.append(NORMAL)
        elif info.get("special") or _looks_special(text):
            types.append(CONTROL)
        else:
            text = text.replace("\u2581", " ")
            types.append(USER_DEFINED)
        tokens.append(text)
    return tokens, types


def _bpe(src: Path, cfg: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    tokens, types = _base_vocab(
        "tokenizer.json", doc["model"]["vocab"], doc.get("added_tokens", []), cfg
    )
    return {
        _K.MODEL: "gpt2",
        _K.PRE: bpe_pre(src / "tokenizer.json", doc),
        _K.LIST: tokens,
        _K.TOKEN_TYPE: types,
    }


def bpe_pre(path: Path, doc: dict[str, Any]) -> str:
    """The `tokenizer.ggml.pre` name of a BPE tokenizer.json (see the module docstring)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        chkhsh = None
    else:
        tok = Tokenizer.from_file(str(path))
        tok.no_truncation()
        tok.no_padding()
        chkhsh = hashlib.sha256(str(tok.encode(CHKTXT).ids).encode()).hexdigest()
        if chkhsh in HASHES:
            return HASHES[chkhsh]
    regexes = "".join(_split_regexes(doc.get("pre_tokenizer")))
    if regexes in BY_REGEX:
        return BY_REGEX[regexes]
    if not regexes and _byte_level_regex(doc.get("pre_tokenizer")):
        return "gpt-2"
    raise ConvertError(
        "tokenizer.json: the BPE pre-tokenizer was not recognized "
        + (f"(chkhsh {chkhsh}, " if chkhsh else "(the `tokenizers` package is not installed, ")
        + "and its regexes are not a known set); llama.cpp would not convert it either"
    )


def _split_regexes(pre: Any) -> Iterator[str]:
    if not isinstance(pre, dict):
        return
    if pre.get("type") == "Sequence":
        for p in pre.get("pretokenizers", []):
            yield from _split_regexes(p)
    elif pre.get("type") == "Split":
        pattern = pre.get("pattern", {})
        yield pattern.get("Regex", "") if isinstance(pattern, dict) else ""


def _byte_level_regex(pre: Any) -> bool:
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "Sequence":
        return any(_byte_level_regex(p) for p in pre.get("pretokenizers", []))
    return pre.get("type") == "ByteLevel" and bool(pre.get("use_regex", True))


def _wordpiece(src: Path, cfg: dict[str, Any], doc: dict[str, Any] | None) -> dict[str, Any]:
    if doc is not None:
        vocab, added = doc["model"]["vocab"], doc.get("added_tokens", [])
        normalizer = doc.get("normalizer") or {}
    else:  # a vocab.txt: one token per line; the special tokens are the added ones
        lines = (src / "vocab.txt").read_text(encoding="utf-8").splitlines()
        vocab = {t: i for i, t in enumerate(lines)}
        specials = _special_texts(src) or {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
        added = [{"id": vocab[t], "content": t, "special": True} for t in specials if t in vocab]
        config = src / "tokenizer_config.json"
        lower = _read_json(config).get("do_lower_case", True) if config.is_file() else True
        normalizer = {"type": "BertNormalizer", "lowercase": lower, "strip_accents": None}
    tokens, types = _base_vocab("tokenizer.json", vocab, added, cfg)
    ids: dict[str, Any] = {}
    if doc is None:  # no tokenizer.json for gguf.SpecialVocab: BERT's own names
        for key, text in (
            (_K.BOS_ID, "[CLS]"),
            (_K.EOS_ID, "[SEP]"),
            (_K.UNK_ID, "[UNK]"),
            (_K.SEP_ID, "[SEP]"),
            (_K.PAD_ID, "[PAD]"),
            (_K.MASK_ID, "[MASK]"),
        ):
            if text in vocab:
                ids[key] = vocab[text]
    hf_ids = bert_encode(CHKTXT, vocab, normalizer)
    chkhsh = hashlib.sha256(str(hf_ids).encode()).hexdigest()
    # llama.cpp's WordPiece matches words with a visible-space prefix instead of `##`
    tokens = [
        t if ty == CONTROL else t[2:] if t.startswith("##") else "\u2581" + t
        for t, ty in zip(tokens, types, strict=True)
    ]
    kv: dict[str, Any] = {
        _K.MODEL: "bert",
        _K.PRE: HASHES.get(chkhsh, "default"),
        _K.LIST: tokens,
        _K.TOKEN_TYPE: types,
        _K.TOKEN_TYPE_COUNT: int(cfg.get("type_vocab_size", 1)),
        **ids,
    }
    lower = bool(normalizer.get("lowercase", True))
    strip = normalizer.get("strip_accents")
    strip = lower if strip is None else bool(strip)
    if not lower:  # llama.cpp lowercases and strips accents unless told otherwise
        kv["tokenizer.ggml.normalizer.lowercase"] = False
    if strip != lower:
        kv["tokenizer.ggml.normalizer.strip_accents"] = strip
    return kv


def _special_texts(src: Path) -> set[str]:
    path = src / "special_tokens_map.json"
    if not path.is_file():
        return set()
    out = set()
    for value in _read_json(path).values():
        text = value.get("content") if isinstance(value, dict) else value
        if isinstance(text, str):
            out.add(text)
    return out


_CJK = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def bert_encode(
    text: str,
    vocab: dict[str, int],
    normalizer: dict[str, Any],
    unk: str = "[UNK]",
    cls: str = "[CLS]",
    sep: str = "[SEP]",
) -> list[int]:
    """Hugging Face's BertTokenizer (normalizer, pre-tokenizer, WordPiece, [CLS] x [SEP]).

    Only for the pre-tokenizer hash above, so that a WordPiece conversion needs no
    `tokenizers` package; the tests check it against that package.
    """
    lower = bool(normalizer.get("lowercase", True))
    strip = normalizer.get("strip_accents")
    strip = lower if strip is None else bool(strip)
    chars = []
    for c in text:
        cat = unicodedata.category(c)
        if c in "\x00\ufffd" or (cat.startswith("C") and c not in "\t\n\r"):
            continue
        if c in " \t\n\r" or cat == "Zs":
            chars.append(" ")
        elif normalizer.get("handle_chinese_chars", True) and any(
            a <= ord(c) <= b for a, b in _CJK
        ):
            chars.append(f" {c} ")
        else:
            chars.append(c)
    norm = "".join(chars)
    if strip:
        norm = "".join(
            c for c in unicodedata.normalize("NFD", norm) if unicodedata.category(c) != "Mn"
        )
    if lower:
        norm = norm.lower()
    words: list[str] = []
    for chunk in norm.split():
        word = ""
        for c in chunk:
            if (c.isascii() and not c.isalnum() and c.isprintable()) or unicodedata.category(
                c
            ).startswith("P"):
                if word:
                    words.append(word)
                words.append(c)
                word = ""
            else:
                word += c
        if word:
            words.append(word)
    ids = [vocab[cls]]
    for word in words:
        if len(word) > 100:
            ids.append(vocab[unk])
            continue
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in vocab:
                    pieces.append(vocab[piece])
                    break
                end -= 1
            if end == start:
                pieces = [vocab[unk]]
                break
            start = end
        ids.extend(pieces)
    ids.append(vocab[sep])
    return ids


# --- special tokens, flags, chat template ----------------------------------------------

_ID_KEYS = {
    "bos": _K.BOS_ID,
    "eos": _K.EOS_ID,
    "unk": _K.UNK_ID,
    "sep": _K.SEP_ID,
    "pad": _K.PAD_ID,
    "mask": _K.MASK_ID,
    "eot": _K.EOT_ID,
    "eom": _K.EOM_ID,
}
_ADD_KEYS = {"bos": _K.ADD_BOS, "eos": _K.ADD_EOS, "sep": _K.ADD_SEP}


def _special(src: Path, n_vocab: int, load_merges: bool) -> dict[str, Any]:
    try:
        sv = gguf.SpecialVocab(src, load_merges=load_merges, n_vocab=n_vocab)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{src}: unreadable tokenizer configuration: {e}") from None
    kv: dict[str, Any] = {}
    if load_merges:
        if not sv.merges:
            raise ConvertError("tokenizer.json: a BPE tokenizer without merges")
        kv[_K.MERGES] = list(sv.merges)
    for typ, tid in sv.special_token_ids.items():
        if typ in _ID_KEYS:
            kv[_ID_KEYS[typ]] = int(tid)
    for typ, flag in sv.add_special_token.items():
        if typ in _ADD_KEYS:
            kv[_ADD_KEYS[typ]] = bool(flag)
    kv.update(_chat_template(sv.chat_template))
    gen = src / "generation_config.json"
    if gen.is_file():
        for typ, value in _read_json(gen).items():
            name = typ.removesuffix("_token_id")
            if typ.endswith("_token_id") and isinstance(value, list) and name in _ID_KEYS:
                kv[f"tokenizer.ggml.{name}_token_ids"] = [int(v) for v in value]
    return kv


def _chat_template(value: Any) -> dict[str, Any]:
    """`tokenizer.chat_template` (and named ones), as GGUFWriter.add_chat_template writes."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {_K.CHAT_TEMPLATE: value}
    out: dict[str, Any] = {}
    names = []
    for choice in value:
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in choice.get("name", ""))
        template = choice.get("template")
        if not name or template is None:
            continue
        if name == "default":
            out[_K.CHAT_TEMPLATE] = template
        else:
            names.append(name)
            out[_K.CHAT_TEMPLATE_N.format(name=name)] = template
    if names:
        out[_K.CHAT_TEMPLATES] = sorted(names)
    return out
