"""WordPiece (`tokenizer.ggml.model = bert`), as llama.cpp's llm_tokenizer_wpm.

The GGUF spells the vocabulary llama.cpp's way: a word-initial piece is `▁piece`, a
continuation is the bare text (Hugging Face's `##piece`). Tokenizing a fragment:

1. normalize and split into words: NFD (first code point of the decomposition) and drop
   accent marks, lowercase, drop control characters; whitespace separates words and every
   punctuation character, ASCII symbol and CJK ideograph is a word of its own;
2. match each `▁word` greedily, longest vocabulary entry first (by UTF-8 bytes); a word
   that cannot be matched to the end becomes the unknown token.

`encode(add_special=True)` wraps the ids in [CLS] ... [SEP], as llama.cpp does whatever the
add-BOS/EOS flags say.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from herd.errors import TokenizerError
from herd.tokenizer._wpm_data import LOWER, NFD
from herd.tokenizer.base import (
    ATTR_BYTE,
    ATTR_CONTROL,
    ATTR_NORMAL,
    ATTR_UNKNOWN,
    ATTR_USER_DEFINED,
    BaseTokenizer,
    Vocab,
    _valid_text,
    byte_piece,
    read_vocab,
)
from herd.tokenizer.unicode_cats import CONTROL, MARK, PUNCT, SYMBOL, WHITESPACE, categories

SPACE = "\u2581"
_CJK = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


@cache
def _tables() -> tuple[dict[int, int], dict[int, int]]:
    """(lowercase map, NFD map) from `_wpm_data`."""
    lower: dict[int, int] = {}
    for m in re.finditer(r"([0-9A-F]+)(?:\*(\d+)(?:/(\d+))?)?([+-][0-9A-F]+)", LOWER):
        cp, n, step, delta = int(m[1], 16), int(m[2] or 1), int(m[3] or 1), int(m[4], 16)
        for k in range(n):
            lower[cp + k * step] = cp + k * step + delta
    nfd: dict[int, int] = {}
    for m in re.finditer(r"([0-9A-F]+)(?:-([0-9A-F]+))?:([0-9A-F]+)", NFD):
        first, target = int(m[1], 16), int(m[3], 16)
        for cp in range(first, int(m[2] or m[1], 16) + 1):
            nfd[cp] = target
    return lower, nfd


def _is_cjk(cp: int) -> bool:
    return any(a <= cp <= b for a, b in _CJK)


def words(text: str, lowercase: bool = True, strip_accents: bool = True) -> list[str]:
    """llm_tokenizer_wpm_session::preprocess."""
    lower, nfd = _tables()
    if strip_accents:
        text = "".join(chr(nfd.get(ord(c), ord(c))) for c in text)
    cats = categories(text)
    out = [""]
    for c, cat in zip(text, cats, strict=True):
        if c in WHITESPACE:
            if out[-1]:
                out.append("")
            continue
        cp = ord(c)
        if cp == 0 or cp == 0xFFFD or cat == CONTROL:
            continue
        if strip_accents and cat == MARK:
            continue
        s = chr(lower.get(cp, cp)) if lowercase else c
        if cat == PUNCT or (cp < 0x7F and cat == SYMBOL) or _is_cjk(cp):
            if out[-1]:
                out.append("")
            out[-1] = s
            out.append("")
        else:
            out[-1] += s
    if not out[-1]:
        out.pop()
    return out


class WPMTokenizer(BaseTokenizer):
    clean_spaces = True

    def __init__(
        self,
        vocab: Vocab,
        sep_id: int | None,
        lowercase: bool,
        strip_accents: bool,
        extra_eog: tuple[int, ...] = (),
    ) -> None:
        super().__init__(vocab, extra_eog)
        self.sep_id = sep_id
        self.lowercase, self.strip_accents = lowercase, strip_accents
        self._bytes_to_id = {t.encode("utf-8"): i for t, i in vocab.token_to_id.items()}
        self._max_len = max(len(t) for t in self._bytes_to_id)

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        text = _valid_text(text)
        out: list[int] = []
        if add_special:
            if self.bos_id is None:
                raise TokenizerError("the WordPiece vocabulary has no [CLS] (BOS) token")
            out.append(self.bos_id)
        for frag in self._partition(text, parse_special) if text else ():
            if isinstance(frag, int):
                out.append(frag)
            else:
                self._encode_text(frag, False, out)
        if add_special:
            if self.sep_id is None:
                raise TokenizerError("the WordPiece vocabulary has no [SEP] token")
            out.append(self.sep_id)
        return out

    def _encode_text(self, text: str, after_special: bool, out: list[int]) -> None:
        t2i, max_len = self._bytes_to_id, self._max_len
        for word in words(text, self.lowercase, self.strip_accents):
            w = (SPACE + word).encode("utf-8")
            n, start, i = len(w), len(out), 0
            while i < n:
                for j in range(min(n, i + max_len + 1), i, -1):
                    tid = t2i.get(w[i:j])
                    if tid is not None:
                        out.append(tid)
                        i = j
                        break
                else:  # no piece starts here: the whole word is unknown
                    del out[start:]
                    break
            if len(out) == start:
                if self.vocab.unk_id is None:
                    raise TokenizerError("the WordPiece vocabulary has no unknown token")
                out.append(self.vocab.unk_id)

    def _piece_text(self, id: int) -> bytes:
        attr = self._attrs[id]
        text = self.tokens[id]
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
            return text.encode("utf-8")
        if attr & ATTR_NORMAL:
            return text.replace(SPACE, " ").encode("utf-8")
        if attr & ATTR_BYTE:
            return byte_piece(text)
        return b""


def from_kv(kv: dict[str, Any], extra_eog: tuple[int, ...] = ()) -> WPMTokenizer:
    defaults = {
        "bos": 101,
        "eos": None,
        "unk": 100,
        "add_bos": True,
        "add_eos": False,
        "add_space_prefix": False,
    }
    vocab = read_vocab(kv, defaults)
    sep = kv.get("tokenizer.ggml.seperator_token_id", 102)
    sep = int(sep) if sep is not None and 0 <= int(sep) < vocab.n_vocab else None
    lowercase = bool(kv.get("tokenizer.ggml.normalizer.lowercase", True))
    strip = bool(kv.get("tokenizer.ggml.normalizer.strip_accents", lowercase))
    return WPMTokenizer(vocab, sep, lowercase, strip, extra_eog)
