"""The pre-tokenizers llama.cpp picks by `tokenizer.ggml.pre`: the regexes of each model
family, their detokenizer options, and the name -> pre-tokenizer lookup."""

from __future__ import annotations

from dataclasses import dataclass

from herd.errors import TokenizerError

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
