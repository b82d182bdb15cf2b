"""UTF-8-safe incremental detokenization for streaming generated tokens."""

from __future__ import annotations

import codecs

from herd.tokenizer.base import Tokenizer


class StreamDecoder:
    """Turns token ids into text as they arrive, never splitting a UTF-8 character.

    A character may span tokens (byte-fallback tokens in SentencePiece, partial bytes in
    byte-level BPE); its bytes are held back until complete. Invalid bytes become U+FFFD,
    as in `Tokenizer.decode`. The concatenated output equals `decode(ids, special)` except
    for the two whole-text touches llama.cpp's detokenizer makes for some vocabularies:
    dropping the first token's space prefix (`add_space_prefix`) and the
    clean-up-tokenization-spaces pass (Llama 3 style BPE). Streaming, like llama.cpp's
    server, keeps every piece as it is.
    """

    def __init__(self, tok: Tokenizer, special: bool = False) -> None:
        self._tok = tok
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, id: int) -> str:
        """The text that became complete with this token ("" while a character is partial)."""
        return self._utf8.decode(self._tok.piece(id, self._special))

    def flush(self) -> str:
        """Whatever is held back (as U+FFFD if incomplete); the decoder starts afresh."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
