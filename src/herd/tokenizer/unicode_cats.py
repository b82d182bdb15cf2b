"""llama.cpp's Unicode categories: one flag per category, its whitespace set, and the
per-code-point category table built from `_unicode_data`."""

from __future__ import annotations

from functools import cache

from herd.tokenizer._unicode_data import RANGES

UNDEFINED, NUMBER, LETTER, SEPARATOR, MARK, PUNCT, SYMBOL, CONTROL = (1 << i for i in range(8))
_CATEGORY = {
    "U": UNDEFINED,
    "N": NUMBER,
    "L": LETTER,
    "Z": SEPARATOR,
    "M": MARK,
    "P": PUNCT,
    "S": SYMBOL,
    "C": CONTROL,
}
# llama.cpp's whitespace set: Python's str.isspace() without the separators 0x1C-0x1F.
WHITESPACE = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


@cache
def _category_table() -> bytes:
    """One category byte per code point (1.1 MB, built once on first use)."""
    table = bytearray(0x110000)
    items = RANGES.split()
    starts = [int(it[:-1], 16) for it in items] + [0x110000]
    for i, it in enumerate(items):
        table[starts[i] : starts[i + 1]] = bytes([_CATEGORY[it[-1]]]) * (starts[i + 1] - starts[i])
    return bytes(table)


def categories(text: str) -> bytes:
    """The category byte of each code point of `text`."""
    table = _category_table()
    return bytes([table[ord(c)] for c in text])
