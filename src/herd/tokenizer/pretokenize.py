"""Pre-tokenization for byte-level BPE: llama.cpp's `unicode_regex_split`, reproduced.

llama.cpp splits text into words with a list of regexes chosen by `tokenizer.ggml.pre`,
applied one after another (each splits the pieces the previous one left). It runs them in
one of two ways, and both differ from a plain Unicode regex engine, so herd copies them:

- the common GPT-2, Llama 3 and Qwen 2 regexes run as hand-written scanners over
  llama.cpp's own Unicode category table (`_unicode_data`);
- any other regex runs with C++ `std::regex` on a "collapsed" text in which every
  non-ASCII code point becomes one byte naming its category (`\\p{L}` -> 0xD2, ...) and
  non-ASCII whitespace becomes `\\v`. Python's `re` with ASCII semantics matches those
  strings the same way, once `$` is made to mean end-of-text as in ECMAScript.

Neither `regex` nor `tokenizers` can stand in: their Unicode tables are newer than
llama.cpp's, and the collapsing makes e.g. `[^\\s\\p{L}]` treat all non-ASCII code
points of one category alike, which a real `\\p{..}` engine does not.

This module holds the splitting machinery; the regexes are in `pre_regexes`, the
scanners in `scanners`, the category table in `unicode_cats`.
"""

from __future__ import annotations

import re
from functools import cache

from herd.errors import TokenizerError
from herd.tokenizer.scanners import SCANNERS
from herd.tokenizer.unicode_cats import (
    LETTER,
    MARK,
    NUMBER,
    PUNCT,
    SYMBOL,
    WHITESPACE,
    categories,
)

# --- splitting ---------------------------------------------------------------------------


def split(text: str, regexes: tuple[str, ...]) -> list[str]:
    """Words of `text` after applying each regex in turn to the previous pieces."""
    if not text:
        return []
    cats = categories(text)
    bounds = [len(text)]  # piece lengths, in code points
    collapsed: dict[bool, str] = {}
    for expr in regexes:
        scanner = SCANNERS.get(expr)
        new: list[int] = []
        start = 0
        if scanner is not None:
            for n in bounds:
                scanner(text, cats, start, start + n, new)
                start += n
        else:
            pattern, use_collapsed = _compile(expr)
            if use_collapsed not in collapsed:
                collapsed[use_collapsed] = _collapse(text, cats, use_collapsed)
            subject = collapsed[use_collapsed]
            for n in bounds:
                _split_regex(pattern, subject, start, start + n, new)
                start += n
        bounds = new
    words, start = [], 0
    for n in bounds:
        if n:
            words.append(text[start : start + n])
        start += n
    return words


def _split_regex(
    pattern: re.Pattern[str], subject: str, begin: int, end: int, out: list[int]
) -> None:
    # Matches and the text between them both become pieces (std::regex_iterator loop).
    prev = begin
    for m in pattern.finditer(subject, begin, end):
        if m.start() > prev:
            out.append(m.start() - prev)
        out.append(m.end() - m.start())
        prev = m.end()
    if prev < end:
        out.append(end - prev)


# \p{..} classes llama.cpp collapses, and what each becomes inside a character class:
# the category's stand-in byte plus the ASCII members of the category.
_UCAT = {
    "N": NUMBER,
    "L": LETTER,
    "P": PUNCT,
    "M": MARK,
    "S": SYMBOL,
    "Lu": LETTER,
    "Ll": LETTER,
    "Lt": LETTER,
    "Lm": LETTER,
    "Lo": LETTER,
}
_STAND_IN = {NUMBER: "\xd1", LETTER: "\xd2", PUNCT: "\xd3", MARK: "\xd4", SYMBOL: "\xd5"}
_ASCII_MEMBERS = {
    NUMBER: "0-9",
    LETTER: "A-Za-z",
    PUNCT: "!-#%-*,-/:-;?-@\\[-\\]_\\{\\}",
    MARK: "",
    SYMBOL: "\\$\\+<->\\^`\\|\\~",
}
_UCAT_RE = re.compile(r"\\p\{(\w+)\}")


def _collapse(text: str, cats: bytes, use_collapsed: bool) -> str:
    """The string std::regex sees: collapsed categories, or code points with `\\v` spaces."""
    out = []
    for c, cat in zip(text, cats, strict=True):
        if c < "\x80":
            out.append(c)
        elif c in WHITESPACE:
            out.append("\v")  # std::regex's \s only knows ASCII whitespace
        elif not use_collapsed:
            out.append(c)
        else:
            out.append(_STAND_IN.get(cat, "\xd0"))
    return "".join(out)


@cache
def _compile(expr: str) -> tuple[re.Pattern[str], bool]:
    use_collapsed = any(f"\\p{{{k}}}" in expr for k in _UCAT)
    if use_collapsed:
        if any(c >= "\x80" for c in expr):
            raise TokenizerError(f"pre-tokenizer regex mixes \\p{{..}} and non-ASCII: {expr!r}")
        expr = _collapse_regex(expr)
    try:
        return re.compile(_ecmascript_to_python(expr), re.ASCII), use_collapsed
    except re.error as e:
        raise TokenizerError(f"unsupported pre-tokenizer regex {expr!r}: {e}") from e


def _collapse_regex(expr: str) -> str:
    # Same rewrite as llama.cpp: \p{X} -> [stand-in + ASCII members], inside a class without
    # the brackets. Its notion of "inside a class" (an unescaped '[' or ']') is kept as is.
    out: list[str] = []
    inside = False
    i = 0
    while i < len(expr):
        c = expr[i]
        if c == "[" and (i == 0 or expr[i - 1] != "\\"):
            inside = True
        elif inside and c == "]" and expr[i - 1] != "\\":
            inside = False
        elif c == "\\" and expr.startswith("\\p{", i):
            m = _UCAT_RE.match(expr, i)
            if m and m.group(1) in _UCAT and m.end() - 1 <= i + 10:
                cat = _UCAT[m.group(1)]
                body = _STAND_IN[cat] + _ASCII_MEMBERS[cat]
                out.append(body if inside else f"[{body}]")
                i = m.end()
                continue
        out.append(c)
        i += 1
    return "".join(out)


def _ecmascript_to_python(expr: str) -> str:
    # ECMAScript `$` (no multiline) is end of input only; Python's also matches before a
    # final newline. Everything else these regexes use means the same in both.
    out: list[str] = []
    inside = escaped = False
    for c in expr:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == "[":
            inside = True
        elif c == "]":
            inside = False
        elif c == "$" and not inside:
            out.append("\\Z")
            continue
        out.append(c)
    return "".join(out)
