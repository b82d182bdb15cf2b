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
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from herd.errors import TokenizerError
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


# --- GPT-2 byte encoding ---------------------------------------------------------------


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


# --- the regexes llama.cpp picks by tokenizer.ggml.pre (src/llama-vocab.cpp) ------------

_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
GPT2 = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
LLAMA3 = (
    _CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
QWEN2 = (
    _CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
QWEN35 = (
    _CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}"
    "\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
NEWLINES = "[^\\n]+|[\\n]+"
_CASED = (
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*"
    "[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+"
    + _CONTRACTIONS
    + "?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+"
    "[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*" + _CONTRACTIONS + "?"
)
_DEEPSEEK3_MAIN = (
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
    "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*"
    "|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
)
_PORO = " ?[^(\\s|.,!?…。，、।۔،)]+"
_GPT4O_SPLIT = (
    "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+"
    + _CONTRACTIONS
    + "?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+"
    "((?=[\\p{L}])([^A-Z]))*" + _CONTRACTIONS + "?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)

REGEXES: dict[str, list[str]] = {
    "default": ["[\\p{P}\\$\\+<=>\\^~\\|]+", GPT2, "\\p{N}+", "[0-9][0-9][0-9]"],
    "llama3": [LLAMA3],
    "jais2": [
        _CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
        "[\\r\\n]*|\\s*[\\r\\n]+|\\s{512}(?!\\S)|\\s{256}(?!\\S)|\\s{128}(?!\\S)"
        "|\\s{64}(?!\\S)|\\s{32}(?!\\S)|\\s{16}(?!\\S)|\\s{8}(?!\\S)|\\s{4}(?!\\S)"
        "|\\s{1,2}(?!\\S)|\\s{1}"
    ],
    "deepseek-llm": [
        "[\r\n]",
        # written with escapes: editors tend to NFC-normalize some of these code points
        "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
        "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
        "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8"
        "-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-"
        "\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-"
        "\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-"
        "\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-"
        "\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149"
        "\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
        "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13"
        "-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
        "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
        "\U0001e900-\U0001e943]+",
        "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
        "\\s+$",
        "[一-龥ࠀ-一가-퟿]+",
        "\\p{N}+",
    ],
    "deepseek3": ["\\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", _DEEPSEEK3_MAIN],
    "spark2_5": [
        "\\p{N}{1,3}",
        "[一-龥぀-ゟ゠-ヿ]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?"
        "[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+|[\r\n]|\\s+(?!\\S)|\\s+",
        "\\p{N}",
    ],
    "youtu": [
        "[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+",
        _CASED + "|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    "deepseek-coder": ["[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[一-龥ࠀ-一가-퟿]+", "\\p{N}"],
    "falcon": ["[\\p{P}\\$\\+<=>\\^~\\|`]+", GPT2, "[0-9][0-9][0-9]"],
    "starcoder": ["\\p{N}", GPT2],
    "gpt2": [GPT2],
    "qwen2": [QWEN2],
    "qwen35": [QWEN35],
    "poro": [_PORO],
    "viking": [_PORO, "\\p{N}"],
    "tekken": [
        "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|[^\\r\\n"
        "\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}| ?[^\\s\\p{L}"
        "\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
    ],
    "chameleon": [
        "<sentinel:[0-9]+>",
        "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
        "([\\t\\n]|    |  )",
        "\\p{N}",
        "[\\p{P}!-/:-@\\[-`{-~]",
        GPT2,
    ],
    "gpt4o": [_GPT4O_SPLIT],
    "granite-emb-multi": [_GPT4O_SPLIT.replace("(?=[\\p{L}])", "(?=[\\p{L}\\p{M}])")],
    "superbpe": ["\\p{N}+", "(?=(\\d{3})+(?!\\d))"],
    "bailingmoe": [
        "'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
        "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+"
    ],
    "seed-coder": [
        _CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}"
        "\\r\\n]+|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
    ],
    "ufakzeka": [
        "[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+"
        "|\\s+(?!\\S)|\\s+"
    ],
    "laguna": [NEWLINES, QWEN2],
    "exaone-moe": [
        _CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?(?:\\p{L}\\p{M}*(?: \\p{L}\\p{M}*)*)+"
        "|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]?|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+"
    ],
    "minicpm5": [
        "\\p{N}{1,3}",
        _CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}+| ?[^\\s"
        "\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
}


@dataclass(frozen=True)
class PreTokenizer:
    """What `tokenizer.ggml.pre` selects in llama.cpp: regexes and detokenizer options."""

    name: str
    regexes: tuple[str, ...]
    clean_spaces: bool = True
    ignore_merges: bool = False
    add_bos: bool | None = None  # default before the GGUF's add_bos_token, when it differs
    no_bos: bool = False  # the BOS id defaults to none (ChatGLM)


def _pre(kind: str, names: str, **opts: bool) -> dict[str, tuple[str, dict[str, bool]]]:
    return {n: (kind, opts) for n in names.split()}


# tokenizer.ggml.pre -> (regex set, options), as llama.cpp's vocabulary loader maps them.
_PRE_NAMES: dict[str, tuple[str, dict[str, bool]]] = {
    **_pre("default", "default"),
    **_pre("minicpm5", "minicpm5", ignore_merges=True),
    **_pre(
        "llama3",
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
        ignore_merges=True,
        add_bos=True,
    ),
    **_pre("deepseek-llm", "deepseek-llm", clean_spaces=False),
    **_pre("deepseek-coder", "deepseek-coder", clean_spaces=False),
    **_pre("deepseek3", "deepseek-v3", clean_spaces=False),
    **_pre("spark2_5", "spark2_5", clean_spaces=False),
    **_pre("youtu", "youtu", clean_spaces=False, ignore_merges=True),
    **_pre("falcon", "falcon"),
    **_pre(
        "gpt2",
        "mpt gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 "
        "mellum modern-bert jina-v1-en jina-v2-code roberta-bpe olmo jais exaone4",
    ),
    **_pre("starcoder", "starcoder refact codeshell exaone minerva-7b mellum2"),
    **_pre("starcoder", "command-r smollm", clean_spaces=False),
    **_pre("jais2", "jais-2"),
    **_pre("qwen2", "qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan solar-open", clean_spaces=False),
    **_pre("qwen2", "stablelm2 megrez"),
    **_pre("qwen35", "qwen35", clean_spaces=False),
    **_pre("llama3", "dbrx smaug-bpe"),
    **_pre("poro", "poro-chat", clean_spaces=False),
    **_pre("poro", "bloom gpt3-finnish"),
    **_pre("llama3", "chatglm-bpe", no_bos=True),
    **_pre("llama3", "glm4 glm5", no_bos=True, ignore_merges=True),
    **_pre("viking", "viking", clean_spaces=False),
    **_pre("tekken", "tekken", clean_spaces=False, ignore_merges=True, add_bos=True),
    **_pre("exaone-moe", "exaone-moe"),
    **_pre("chameleon", "chameleon", add_bos=True, clean_spaces=False),
    **_pre("gpt4o", "gpt-4o llama4 kanana2 talkie minimax-m2", clean_spaces=False),
    **_pre("granite-emb-multi", "granite-embed-multi-97m", clean_spaces=False, ignore_merges=True),
    **_pre("superbpe", "superbpe", clean_spaces=False),
    **_pre("gpt2", "trillion granite-docling", clean_spaces=False),
    **_pre("bailingmoe", "bailingmoe bailingmoe2 llada-moe", clean_spaces=False),
    **_pre("seed-coder", "seed-coder", clean_spaces=False),
    **_pre("deepseek3", "hunyuan-dense hy_v4 joyai-llm", clean_spaces=False),
    **_pre("ufakzeka", "ufakzeka", clean_spaces=False),
    **_pre("qwen2", "grok-2", clean_spaces=False),
    **_pre("laguna", "laguna", clean_spaces=False),
}


def pre_tokenizer(name: str | None) -> PreTokenizer:
    """The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre` (missing -> default)."""
    key = name or "default"
    if key not in _PRE_NAMES:
        raise TokenizerError(
            f"unsupported pre-tokenizer tokenizer.ggml.pre={name!r}; supported: "
            + ", ".join(sorted(_PRE_NAMES))
        )
    kind, opts = _PRE_NAMES[key]
    return PreTokenizer(name=key, regexes=tuple(REGEXES[kind]), **opts)


# --- splitting ---------------------------------------------------------------------------

_Scanner = Callable[[str, bytes, int, int, list[int]], None]


def split(text: str, regexes: tuple[str, ...]) -> list[str]:
    """Words of `text` after applying each regex in turn to the previous pieces."""
    if not text:
        return []
    cats = categories(text)
    bounds = [len(text)]  # piece lengths, in code points
    collapsed: dict[bool, str] = {}
    for expr in regexes:
        scanner = _SCANNERS.get(expr)
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


_SCANNERS: dict[str, _Scanner] = {
    GPT2: _scan_gpt2,
    LLAMA3: _make_llama3_scanner(3, marks=False),
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": _make_llama3_scanner(3, marks=False),
    QWEN2: _make_llama3_scanner(1, marks=False),
    QWEN35: _make_llama3_scanner(1, marks=True),
    NEWLINES: _scan_newlines,
}
