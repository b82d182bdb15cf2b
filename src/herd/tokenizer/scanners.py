"""Hand-written pre-tokenizer scanners for the GPT-2, Llama 3, Qwen 2/3.5 and newline regexes,
run over llama.cpp's Unicode category table instead of a regex engine."""

from __future__ import annotations

from collections.abc import Callable

from herd.tokenizer.pre_regexes import GPT2, LLAMA3, NEWLINES, QWEN2, QWEN35
from herd.tokenizer.unicode_cats import LETTER, MARK, NUMBER, WHITESPACE

_Scanner = Callable[[str, bytes, int, int, list[int]], None]


# Hand-written scanners: llama.cpp's unicode_regex_split_custom_* for the common regexes.
# They follow the C++ code step by step, quirks included, over code points [begin, end).


def _scan_gpt2(text: str, cats: bytes, begin: int, end: int, out: list[int]) -> None:
    def cat(p: int) -> int:
        return cats[p] if begin <= p < end else 0

    def space(p: int) -> bool:
        return begin <= p < end and text[p] in WHITESPACE

    pos = prev = begin
    while pos < end:
        c = text[pos]
        if c == "'" and pos + 1 < end:
            n1 = text[pos + 1]
            if n1 in "stmd":
                pos += 2
                out.append(pos - prev)
                prev = pos
                continue
            if pos + 2 < end and n1 + text[pos + 2] in ("re", "ve", "ll"):
                pos += 3
                out.append(pos - prev)
                prev = pos
                continue
        p2 = pos + 1 if c == " " else pos  # " ?" prefix: classify the next code point
        f2 = cat(p2)
        if f2 & LETTER:
            pos = p2
            while cat(pos) & LETTER:
                pos += 1
        elif f2 & NUMBER:
            pos = p2
            while cat(pos) & NUMBER:
                pos += 1
        elif f2 and not space(p2):  # [^\s\p{L}\p{N}]+ (f2 == 0: past the end)
            pos = p2
            while cat(pos) and not (cat(pos) & (LETTER | NUMBER)) and not space(pos):
                pos += 1
        else:
            n_ws = 0
            while space(pos + n_ws):
                n_ws += 1
            if n_ws > 1 and pos + n_ws < end:  # \s+(?!\S): leave one space for the next word
                pos += n_ws - 1
            elif n_ws > 0:
                pos += n_ws
            else:
                pos += 1
        out.append(pos - prev)
        prev = pos


def _make_llama3_scanner(max_digits: int, marks: bool) -> _Scanner:
    """Llama 3 (digits in threes), Qwen 2 (single digits), Qwen 3.5 (letters take marks)."""
    word = LETTER | MARK if marks else LETTER
    punct_stop = LETTER | NUMBER | (MARK if marks else 0)

    def scan(text: str, cats: bytes, begin: int, end: int, out: list[int]) -> None:
        def cat(p: int) -> int:
            return cats[p] if begin <= p < end else 0

        def space(p: int) -> bool:
            return begin <= p < end and text[p] in WHITESPACE

        pos = prev = begin
        while pos < end:
            c = text[pos]
            f = cats[pos]
            if c == "'" and pos + 1 < end:  # case-insensitive contractions
                n1 = text[pos + 1].lower() if text[pos + 1] < "\x80" else ""
                if n1 and n1 in "stmd":
                    pos += 2
                    out.append(pos - prev)
                    prev = pos
                    continue
                if n1 and pos + 2 < end and text[pos + 2] < "\x80":
                    if n1 + text[pos + 2].lower() in ("re", "ve", "ll"):
                        pos += 3
                        out.append(pos - prev)
                        prev = pos
                        continue
            if c not in "\r\n" and not f & NUMBER and (f & word or cat(pos + 1) & word):
                # [^\r\n\p{L}\p{N}]?\p{L}+
                pos += 1
                while cat(pos) & word:
                    pos += 1
            elif f & NUMBER:
                if max_digits == 1:
                    pos += 1
                else:
                    ini = pos
                    while cat(pos) & NUMBER:
                        pos += 1
                        if pos - ini >= max_digits:
                            out.append(pos - prev)
                            prev = ini = pos
            else:
                p2 = pos + 1 if c == " " else pos
                f2 = cat(p2)
                if not (f2 & punct_stop) and not space(p2):
                    # ' ?[^\s\p{L}\p{N}]+[\r\n]*'; a lone trailing space lands here too
                    pos = p2
                    while cat(pos) and not (cat(pos) & punct_stop) and not space(pos):
                        pos += 1
                    while pos < end and text[pos] in "\r\n":
                        pos += 1
                else:
                    n_ws = 0
                    last_nl = 0
                    while space(pos + n_ws):
                        if text[pos + n_ws] in "\r\n":
                            last_nl = pos + n_ws + 1
                        n_ws += 1
                    if last_nl:  # \s*[\r\n]+
                        pos = last_nl
                    elif n_ws > 1 and pos + n_ws < end:  # \s+(?!\S)
                        pos += n_ws - 1
                    elif n_ws > 0:
                        pos += n_ws
                    else:
                        pos += 1
            if pos > prev:
                out.append(pos - prev)
            prev = pos

    return scan


def _scan_newlines(text: str, cats: bytes, begin: int, end: int, out: list[int]) -> None:
    pos = begin
    while pos < end:
        nl = text[pos] == "\n"
        run = pos
        while pos < end and (text[pos] == "\n") == nl:
            pos += 1
        out.append(pos - run)


SCANNERS: dict[str, _Scanner] = {
    GPT2: _scan_gpt2,
    LLAMA3: _make_llama3_scanner(3, marks=False),
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": _make_llama3_scanner(3, marks=False),
    QWEN2: _make_llama3_scanner(1, marks=False),
    QWEN35: _make_llama3_scanner(1, marks=True),
    NEWLINES: _scan_newlines,
}
