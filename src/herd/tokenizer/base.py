"""The vocabulary and the behaviour llama.cpp shares across tokenizer kinds.

`Vocab` reads `tokenizer.ggml.*` the way llama.cpp's `llama_vocab::impl::load` does:
special ids and their defaults, token attributes (with llama.cpp's fix-ups by token text),
the end-of-generation set and the special tokens that are split out before tokenizing.
`BaseTokenizer` holds what does not depend on the algorithm: that split, adding BOS/EOS,
pieces and detokenization.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from herd.errors import TokenizerError

# llama_token_attr bits
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

# tokenizer.ggml.token_type values -> attributes
_TYPE_ATTR = {
    0: ATTR_UNDEFINED,
    1: ATTR_NORMAL,
    2: ATTR_UNKNOWN,
    3: ATTR_CONTROL,
    4: ATTR_USER_DEFINED,
    5: ATTR_UNUSED,
    6: ATTR_BYTE,
}

# Token texts llama.cpp recognizes when the GGUF does not name the id (llama-vocab.cpp).
_EOT_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
)
_FIM_TEXTS = {
    "pre": (
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<｜fim▁begin｜>",
        "<PRE>",
        "▁<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
    ),
    "suf": (
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<｜fim▁hole｜>",
        "<SUF>",
        "▁<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
    ),
    "mid": (
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<｜fim▁end｜>",
        "<MID>",
        "▁<MID>",
        "<|code_middle|>",
        "<|middle|>",
    ),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}
_EOG_TEXTS = frozenset(
    (
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<｜end▁of▁sentence｜>",
        "[e~[",
    )
)
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss

_KEY = "tokenizer.ggml."
_C_SPACE = " \t\n\v\f\r"  # C isspace(): what llama.cpp strips around lstrip/rstrip tokens


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids, exactly as llama.cpp does it for the same GGUF."""

    n_vocab: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """llama_tokenize(text, add_special, parse_special)."""
        ...

    def decode(self, ids: Sequence[int], special: bool = False) -> str:
        """llama_detokenize(ids, remove_special=False, unparse_special=special)."""
        ...

    def piece(self, id: int, special: bool = False) -> bytes:
        """llama_token_to_piece: control tokens give b"" unless `special`."""
        ...

    def is_eog(self, id: int) -> bool:
        """Whether generation ends at this token (EOS, EOT, EOM, <|im_end|>, ...)."""
        ...

    def is_control(self, id: int) -> bool: ...


@dataclass
class Vocab:
    """Token texts, scores, attributes and special ids, as llama.cpp derives them."""

    model: str
    tokens: list[str]
    scores: list[float]
    attrs: list[int]
    token_to_id: dict[str, int]
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    eog_ids: frozenset[int]
    special_ids: list[int]  # split out before tokenizing, longest text first

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)


def read_vocab(kv: dict[str, Any], defaults: dict[str, Any]) -> Vocab:
    """Build the vocabulary from GGUF metadata.

    `defaults` holds what llama.cpp presets per tokenizer kind before reading the file:
    `bos`, `eos`, `unk` ids and the `add_bos`, `add_eos`, `add_space_prefix` flags.
    """
    model = kv[_KEY + "model"]
    tokens = kv.get(_KEY + "tokens")
    if not isinstance(tokens, list) or not tokens:
        raise TokenizerError(
            f"tokenizer.ggml.model={model!r} but no {_KEY}tokens list in the metadata"
        )
    n = len(tokens)
    # llama.cpp renames empty tokens so that every text maps to one id. (Here and below,
    # loops over the vocabulary run in C where they can: Gemma 3 has 262k tokens.)
    if "" in tokens:
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    scores = kv.get(_KEY + "scores")
    if scores is None:
        scores = [0.0] * n
    elif len(scores) < n:
        raise TokenizerError(f"{_KEY}scores has {len(scores)} entries for {n} tokens")
    types = kv.get(_KEY + "token_type")
    if types is None:
        attrs = [ATTR_NORMAL] * n
    elif len(types) < n:
        raise TokenizerError(f"{_KEY}token_type has {len(types)} entries for {n} tokens")
    else:
        attrs = list(map(_TYPE_ATTR.get, types[:n], itertools.repeat(ATTR_UNDEFINED)))
    token_to_id = dict(zip(tokens, range(n), strict=True))  # a repeated text: its last id

    def special(key: str, default: int | None) -> int | None:
        if default is not None and default >= n:
            default = None
        value = kv.get(_KEY + key)
        if value is None or not 0 <= int(value) < n:
            return default
        return int(value)

    bos = special("bos_token_id", defaults.get("bos"))
    eos = special("eos_token_id", defaults.get("eos"))
    eot = special("eot_token_id", None)
    eom = special("eom_token_id", None)
    unk = special("unknown_token_id", defaults.get("unk"))
    fim = {k: special(f"fim_{k}_token_id", None) for k in _FIM_TEXTS}
    for old, new in (("prefix", "pre"), ("suffix", "suf"), ("middle", "mid")):
        fim[new] = special(f"{old}_token_id", fim[new])

    add_bos = bool(kv.get(_KEY + "add_bos_token", defaults["add_bos"]))
    add_eos = bool(kv.get(_KEY + "add_eos_token", defaults["add_eos"]))
    add_space_prefix = bool(kv.get(_KEY + "add_space_prefix", defaults["add_space_prefix"]))

    def first_of(texts: Sequence[str]) -> int | None:
        # llama.cpp takes whichever its hash map yields first; herd takes the lowest id.
        ids = [token_to_id[t] for t in texts if t in token_to_id]
        return min(ids) if ids else None

    def force_control(i: int) -> None:
        attrs[i] |= ATTR_CONTROL

    if eot is None and (eot := first_of(_EOT_TEXTS)) is not None:
        force_control(eot)
    if eom is None and (eom := first_of(("<|eom_id|>",))) is not None:
        force_control(eom)
    for k, texts in _FIM_TEXTS.items():
        if fim[k] is None and (found := first_of(texts)) is not None:
            fim[k] = found
            force_control(found)

    for i, t in enumerate(tokens):  # control tokens named "unused" are unused
        if attrs[i] & ATTR_CONTROL and "unused" in t:
            attrs[i] |= ATTR_UNUSED

    eog = {i for i in (fim["pad"], fim["rep"], fim["sep"]) if i is not None}
    for t in _EOG_TEXTS:
        if (i := token_to_id.get(t)) is not None:
            eog.add(i)
            force_control(i)
    for t in _ALWAYS_RENDERED:
        if (i := token_to_id.get(t)) is not None:
            attrs[i] = ATTR_USER_DEFINED
    eog.update(i for i in (eos, eot, eom) if i is not None)
    texts = {tokens[i]: i for i in eog}
    # o200k_harmony / solar-open: <|end|> ends a message, not the generation
    has_call = "<|call|>" in texts or "<|calls|>" in texts
    if "<|end|>" in texts and has_call and ("<|return|>" in texts or "<|flush|>" in texts):
        end = texts["<|end|>"]
        eog.discard(end)
        attrs[end] = ATTR_USER_DEFINED
    # gemma4 / plamo: </s> is an ordinary token there
    if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
        eog.discard(texts["</s>"])
        attrs[texts["</s>"]] = ATTR_NORMAL

    special_mask = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN
    special_ids = [i for i in range(n) if attrs[i] & special_mask]
    # llama.cpp sorts by UTF-8 length with an unstable sort; ties keep id order here
    special_ids.sort(key=lambda i: -len(tokens[i].encode("utf-8")))

    _per_model_attrs(kv, tokens, token_to_id, attrs, special_ids)
    return Vocab(
        model=model,
        tokens=tokens,
        scores=list(scores[:n]),
        attrs=attrs,
        token_to_id=token_to_id,
        bos_id=bos,
        eos_id=eos,
        eot_id=eot,
        eom_id=eom,
        unk_id=unk,
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=add_space_prefix,
        eog_ids=frozenset(eog),
        special_ids=special_ids,
    )


def _per_model_attrs(
    kv: dict[str, Any],
    tokens: list[str],
    token_to_id: dict[str, int],
    attrs: list[int],
    special_ids: list[int],
) -> None:
    # llama.cpp sets lstrip/rstrip by model name, since GGUF files do not carry them.
    name = str(kv.get("general.name", "")).lower()
    pre = str(kv.get(_KEY + "pre", ""))
    arch = str(kv.get("general.architecture", ""))

    def set_attr(text: str, bit: int, on: bool) -> None:
        if (i := token_to_id.get(text)) is not None:
            attrs[i] = attrs[i] | bit if on else attrs[i] & ~bit

    if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
        s in arch for s in ("nomic-bert-moe", "jina-bert-v3")
    ):
        set_attr("<mask>", ATTR_LSTRIP, True)
    elif "phi-3" in name or "phi3" in name:
        for i in special_ids:
            attrs[i] |= ATTR_RSTRIP
        set_attr("</s>", ATTR_RSTRIP, True)
        for t in ("<unk>", "<s>", "<|endoftext|>"):
            set_attr(t, ATTR_RSTRIP, False)
    elif "modern-bert" in name:
        set_attr("[MASK]", ATTR_LSTRIP, True)


class BaseTokenizer:
    """Special-token split, BOS/EOS, pieces and detokenization; subclasses tokenize text."""

    clean_spaces = False

    def __init__(self, vocab: Vocab, extra_eog: Sequence[int] = ()) -> None:
        self.vocab = vocab
        self.n_vocab = vocab.n_vocab
        self.bos_id = vocab.bos_id
        self.eos_id = vocab.eos_id
        self.add_bos = vocab.add_bos
        self.add_eos = vocab.add_eos
        self.add_space_prefix = vocab.add_space_prefix
        self.tokens = vocab.tokens
        self._attrs = vocab.attrs
        self._t2i = vocab.token_to_id
        self._eog = vocab.eog_ids | {i for i in extra_eog if 0 <= i < vocab.n_vocab}
        self._pieces: dict[int, bytes] = {}

    # --- encoding ---

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        text = _valid_text(text)
        out: list[int] = []
        if add_special and self.add_bos:
            if self.bos_id is None:
                raise TokenizerError("the vocabulary asks for a BOS token but has none")
            out.append(self.bos_id)
        prev_special = True  # SentencePiece adds its space prefix after specials
        for frag in self._partition(text, parse_special) if text else ():
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
            else:
                self._encode_text(frag, prev_special, out)
                prev_special = False
        if add_special and self.add_eos:
            if self.eos_id is None:
                raise TokenizerError("the vocabulary asks for an EOS token but has none")
            out.append(self.eos_id)
        return out

    def _encode_text(self, text: str, after_special: bool, out: list[int]) -> None:
        raise NotImplementedError

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """llama.cpp's tokenizer_st_partition: split out special-token texts, longest first.

        User-defined tokens are always split out; control and unknown ones only with
        `parse_special`. Each token is looked for in what earlier (longer) ones left.
        """
        frags: list[str | int] = [text]
        skip = 0 if parse_special else ATTR_CONTROL | ATTR_UNKNOWN
        for tid in self.vocab.special_ids:
            attr = self._attrs[tid]
            if attr & skip:
                continue
            needle = self.tokens[tid]
            if needle not in text:  # fragments are pieces of `text`: a cheap filter
                continue
            new: list[str | int] = []
            for frag in frags:
                if isinstance(frag, int) or needle not in frag:
                    new.append(frag)
                    continue
                rest = frag
                while True:
                    at = rest.find(needle)
                    if at < 0:
                        new.append(rest)
                        break
                    left = rest[:at]
                    if attr & ATTR_LSTRIP:
                        left = left.rstrip(_C_SPACE)
                    if left:
                        new.append(left)
                    new.append(tid)
                    rest = rest[at + len(needle) :]
                    if attr & ATTR_RSTRIP:
                        rest = rest.lstrip(_C_SPACE)
                    if not rest:
                        break
            frags = new
        return frags

    # --- decoding ---

    def piece(self, id: int, special: bool = False) -> bytes:
        if not 0 <= id < self.n_vocab:
            raise TokenizerError(f"token id {id} is outside the vocabulary (0..{self.n_vocab - 1})")
        if not special and self._attrs[id] & (ATTR_UNKNOWN | ATTR_CONTROL):
            return b""
        p = self._pieces.get(id)
        if p is None:
            p = self._pieces[id] = self._piece_text(id)
        return p

    def _piece_text(self, id: int) -> bytes:
        """The token's bytes as llama.cpp caches them (special=True)."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int], special: bool = False) -> str:
        parts = []
        strip_space = self.add_space_prefix  # only the first token's leading space
        for i in ids:
            p = self.piece(int(i), special)
            if strip_space and p[:1] == b" ":
                p = p[1:]
            strip_space = False
            parts.append(p)
        data = b"".join(parts)
        if self.clean_spaces:
            data = _clean_spaces(data)
        return data.decode("utf-8", errors="replace")

    def is_eog(self, id: int) -> bool:
        return id in self._eog

    def is_control(self, id: int) -> bool:
        return 0 <= id < self.n_vocab and bool(self._attrs[id] & ATTR_CONTROL)


def byte_piece(text: str) -> bytes:
    """The byte of a `<0xXX>` token (strtol semantics: a bad number gives 0)."""
    try:
        return bytes([int(text[3:5], 16) & 0xFF])
    except ValueError:
        return b"\x00"


def _valid_text(text: str) -> str:
    # Lone surrogates cannot be UTF-8 encoded; llama.cpp would see U+FFFD for bad bytes.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def _clean_spaces(text: bytes) -> bytes:
    """llama.cpp's clean_up_tokenization_spaces passes, in place over the bytes as it does."""
    b = bytearray(text)
    sp, ap = ord(" "), ord("'")
    # 1: " ?", " !", " .", " ," lose the space
    n, total = len(b), 1 if b else 0
    for i in range(1, n):
        x = b[i]
        if b[i - 1] == sp and x in b"?!.,":
            total -= 1
        b[total] = x
        total += 1
    # 2: a lone apostrophe between spaces loses both spaces
    n, total = total, 1 if total else 0
    i = 1
    while i < n:
        x = b[i]
        if x == ap and i + 1 < n and b[i - 1] == sp and b[i + 1] == sp:
            total -= 1
            i += 1
            b[i] = 0
        b[total] = x
        total += 1
        i += 1
    # 3: " 's", " 'm", " 're", " 've" lose the space
    n, total = total, 1 if total else 0
    for i in range(1, n):
        x = b[i]
        if b[i - 1] == sp and x == ap and i + 1 < n:
            x1 = b[i + 1]
            if x1 in b"sm":
                total -= 1
            elif i + 2 < n and (x1, b[i + 2]) in ((ord("r"), ord("e")), (ord("v"), ord("e"))):
                total -= 1
        b[total] = x
        total += 1
    return bytes(b[:total])
