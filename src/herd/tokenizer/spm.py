"""SentencePiece BPE (`tokenizer.ggml.model = llama`), as llama.cpp's llm_tokenizer_spm.

Not the `sentencepiece` library: the GGUF carries no SentencePiece model proto, and
llama.cpp's algorithm is its own (greedy bigram merges by token score over the whole text,
no normalization, byte fallback through `<0xXX>` tokens), so herd follows llama.cpp.
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

SPACE = "\u2581"  # ▁, SentencePiece's visible space


class SPMTokenizer(BaseTokenizer):
    def __init__(self, vocab: Vocab, extra_eog: tuple[int, ...] = ()) -> None:
        super().__init__(vocab, extra_eog)
        self._scores = vocab.scores
        self._byte_ids: dict[int, int] = {}

    def _encode_text(self, text: str, after_special: bool, out: list[int]) -> None:
        if self.add_space_prefix and after_special:
            text = " " + text
        text = text.replace(" ", SPACE)
        t2i, scores = self._t2i, self._scores
        n = len(text)
        # Symbol i starts at code point i and spans length[i]; merged-away symbols have 0.
        length = [1] * n
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int, int]] = []

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            size = length[left] + length[right]
            tid = t2i.get(text[left : left + size])
            if tid is not None:
                # highest score first, then leftmost (llm_bigram_spm::comparator)
                heapq.heappush(heap, (-scores[tid], left, right, size))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not length[left] or not length[right] or length[left] + length[right] != size:
                continue  # one side has changed since this pair was queued
            length[left] = size
            length[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])

        # Every merged symbol is a token; a single code point may not be, and then falls
        # back to its UTF-8 bytes (llama.cpp's rev_merge path never triggers for valid text).
        i = 0 if n else -1
        while i != -1:
            piece = text[i : i + length[i]]
            tid = t2i.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(self._byte_token(b) for b in piece.encode("utf-8"))
            i = nxt[i]

    def _byte_token(self, b: int) -> int:
        tid = self._byte_ids.get(b)
        if tid is None:
            tid = self._t2i.get(f"<0x{b:02X}>")
            if tid is None and b < 0x80:
                tid = self._t2i.get(chr(b))
            if tid is None:
                raise TokenizerError(
                    f"the vocabulary has no byte token <0x{b:02X}> for byte fallback"
                )
            self._byte_ids[b] = tid
        return tid

    def _piece_text(self, id: int) -> bytes:
        attr = self._attrs[id]
        text = self.tokens[id]
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
            return text.encode("utf-8")
        if attr & ATTR_NORMAL:
            return text.replace(SPACE, " ").encode("utf-8")
        if attr & ATTR_BYTE:
            return byte_piece(text)
        return b""  # unused / undefined tokens render as nothing


def from_kv(kv: dict[str, Any], extra_eog: tuple[int, ...] = ()) -> SPMTokenizer:
    defaults = {
        "bos": 1,
        "eos": 2,
        "unk": 0,
        "add_bos": True,
        "add_eos": False,
        "add_space_prefix": True,
    }
    return SPMTokenizer(read_vocab(kv, defaults), extra_eog)
