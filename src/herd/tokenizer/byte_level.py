"""GPT-2's byte-level encoding: every UTF-8 byte as one printable character."""

from __future__ import annotations


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's table: printable latin-1 bytes map to themselves, the rest to U+0100 onwards.
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}
_BYTE_ENCODE = str.maketrans({chr(b): c for b, c in BYTE_TO_UNICODE.items()})


def byte_encode(word: str) -> str:
    """The word's UTF-8 bytes, one GPT-2 character per byte."""
    return word.encode("utf-8").decode("latin-1").translate(_BYTE_ENCODE)
