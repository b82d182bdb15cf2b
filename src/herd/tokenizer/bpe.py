"""Byte-level BPE (`tokenizer.ggml.model = gpt2`), as llama.cpp's llm_tokenizer_bpe.

Hand-written rather than `tokenizers`: that library applies its own pre-tokenizer regexes
with a newer Unicode table and has no notion of llama.cpp's special-token split, so its ids
differ from llama.cpp's on the same GGUF. The merge loop itself is the textbook one
(lowest merge rank first, leftmost on ties), cached per pre-tokenized word.
"""

from __future__ import annotations

import heapq
from typing import Any

from herd.errors import TokenizerError
from herd.tokenizer.base import (
    ATTR_BYTE,
    ATTR_CONTROL,
    ATTR_NORMAL,
    ATTR_UNKNOWN,
    ATTR_USER_DEFINED,
    BaseTokenizer,
    Vocab,
    byte_piece,
    read_vocab,
)
from herd.tokenizer.byte_level import UNICODE_TO_BYTE, byte_encode
from herd.tokenizer.pre_regexes import PreTokenizer, pre_tokenizer
from herd.tokenizer.pretokenize import split as pre_split

_CACHE_LIMIT = 100_000  # words; cleared wholesale when full


class BPETokenizer(BaseTokenizer):
    def __init__(
        self, vocab: Vocab, pre: PreTokenizer, merges: list[str], extra_eog: tuple[int, ...] = ()
    ) -> None:
        super().__init__(vocab, extra_eog)
        self.pre = pre
        self.clean_spaces = pre.clean_spaces
        self._ignore_merges = pre.ignore_merges
        # "left right" -> rank; llama.cpp keeps the first rank of a repeated merge
        self._ranks: dict[str, int] = {}
        for i, m in enumerate(merges):
            self._ranks.setdefault(m, i)
        self._cache: dict[str, list[int]] = {}

    def _encode_text(self, text: str, after_special: bool, out: list[int]) -> None:
        cache = self._cache
        for word in pre_split(text, self.pre.regexes):
            ids = cache.get(word)
            if ids is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                ids = cache[word] = self._bpe(byte_encode(word))
            out.extend(ids)

    def _bpe(self, word: str) -> list[int]:
        t2i = self._t2i
        if self._ignore_merges and word in t2i:
            return [t2i[word]]
        syms = list(word)  # one symbol per byte of the original text
        n = len(syms)
        if n > 1:
            ranks = self._ranks
            prev = list(range(-1, n - 1))
            nxt = list(range(1, n + 1))
            nxt[-1] = -1
            heap: list[tuple[int, int, int, str]] = []

            def push(left: int, right: int) -> None:
                if left < 0 or right < 0:
                    return
                rank = ranks.get(syms[left] + " " + syms[right])
                if rank is not None:
                    heapq.heappush(heap, (rank, left, right, syms[left] + syms[right]))

            for i in range(n - 1):
                push(i, i + 1)
            while heap:
                _, left, right, merged = heapq.heappop(heap)
                a, b = syms[left], syms[right]
                if not a or not b or a + b != merged:  # outdated pair
                    continue
                syms[left], syms[right] = merged, ""
                nxt[left] = nxt[right]
                if nxt[right] >= 0:
                    prev[nxt[right]] = left
                push(prev[left], left)
                push(left, nxt[left])
        ids: list[int] = []
        for s in syms:
            if not s:
                continue
            tid = t2i.get(s)
            if tid is not None:
                ids.append(tid)
                continue
            # Not in the vocabulary: llama.cpp looks up each UTF-8 byte of the symbol as a
            # one-byte token text and drops the bytes it cannot find.
            for byte in s.encode("utf-8"):
                if byte < 0x80 and (tid := t2i.get(chr(byte))) is not None:
                    ids.append(tid)
        return ids

    def _piece_text(self, id: int) -> bytes:
        attr = self._attrs[id]
        text = self.tokens[id]
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
            return text.encode("utf-8")
        if attr & ATTR_NORMAL:
            out = bytearray()
            for c in text:
                b = UNICODE_TO_BYTE.get(c)
                if b is None:  # llama_decode_text's marker for a character outside the map
                    out += b"[UNK_BYTE_0x" + c.encode("utf-8").hex().encode() + text.encode() + b"]"
                else:
                    out.append(b)
            return bytes(out)
        if attr & ATTR_BYTE:
            return byte_piece(text)
        return b""


def from_kv(kv: dict[str, Any], extra_eog: tuple[int, ...] = ()) -> BPETokenizer:
    pre = pre_tokenizer(kv.get("tokenizer.ggml.pre"))
    merges = kv.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise TokenizerError(
            "tokenizer.ggml.model='gpt2' but no tokenizer.ggml.merges in the metadata"
        )
    defaults = {
        "bos": None if pre.no_bos else 11,
        "eos": 11,
        "unk": None,
        "add_bos": bool(pre.add_bos),
        "add_eos": False,
        "add_space_prefix": False,
    }
    return BPETokenizer(read_vocab(kv, defaults), pre, merges, extra_eog)
