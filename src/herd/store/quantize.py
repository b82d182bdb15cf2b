"""Quantize an F32/F16/BF16 GGUF the way `llama-quantize` does.

Each tensor's target type follows llama.cpp's `llama-quant.cpp` (the "mixes" of Q4_K_M and
friends: more bits for output/token embeddings, attn_v and ffn_down on some layers); the
bytes come from `herd.gguf.quants` (ggml's own quantizers), so they match what llama.cpp
writes. The output is streamed, header first (`herd.gguf.writer`), so it can go straight
into a blob.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType
from gguf.quants import dequantize

from herd.convert.driver import UNQUANTIZED
from herd.errors import HerdError
from herd.gguf import GGUFFile, TensorInfo, quants
from herd.gguf.reader import DEFAULT_ALIGNMENT, raw_kv
from herd.gguf.writer import GGUFStream, kv_entry

T = GGMLQuantizationType
F = LlamaFileType

# Ollama's names (upper case) -> llama.cpp file type and its default tensor type
FILE_TYPES: dict[str, tuple[LlamaFileType, GGMLQuantizationType]] = {
    "F32": (F.ALL_F32, T.F32),
    "F16": (F.MOSTLY_F16, T.F16),
    "BF16": (F.MOSTLY_BF16, T.BF16),
    "Q8_0": (F.MOSTLY_Q8_0, T.Q8_0),
    "Q4_0": (F.MOSTLY_Q4_0, T.Q4_0),
    "Q4_1": (F.MOSTLY_Q4_1, T.Q4_1),
    "Q5_0": (F.MOSTLY_Q5_0, T.Q5_0),
    "Q5_1": (F.MOSTLY_Q5_1, T.Q5_1),
    "Q4_K_S": (F.MOSTLY_Q4_K_S, T.Q4_K),
    "Q4_K_M": (F.MOSTLY_Q4_K_M, T.Q4_K),
    "Q5_K_S": (F.MOSTLY_Q5_K_S, T.Q5_K),
    "Q5_K_M": (F.MOSTLY_Q5_K_M, T.Q5_K),
    "Q6_K": (F.MOSTLY_Q6_K, T.Q6_K),
}
ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # Ollama's ParseFileType takes Q4_K for Q4_K_M
SOURCE_TYPES = ("F32", "F16", "BF16")
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION

# block-size fallbacks when a row length is not a multiple of the type's block
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_NO_QUANTIZE = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)

Progress = Callable[[int, int], None]  # (bytes of source tensors done, total)


def parse_file_type(name: str) -> str:
    """Ollama's spelling of a quantization type ("q4_k_m" -> "Q4_K_M"); HerdError if unknown."""
    key = name.strip().upper()
    key = ALIASES.get(key, key)
    if key not in FILE_TYPES:
        raise HerdError(
            f"unsupported quantization type {name!r}: use one of " + ", ".join(FILE_TYPES)
        )
    return key


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (
        ("attn_qkv.weight", "attn_v"),
        ("attn_kv_b.weight", "attn_v"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return cat  # fused QKV and MLA kv_b count as attn_v, as in llama.cpp
    return "other"


def _n_dims(t: TensorInfo) -> int:
    ne = list(reversed(t.shape))
    return max((i + 1 for i, n in enumerate(ne) if n > 1), default=1)


def allows_quantization(t: TensorInfo) -> bool:
    """llama.cpp's tensor_allows_quantization (2-D and 3-D weights, minus a skip list)."""
    name = t.name
    if _n_dims(t) < 2 or not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    if name.startswith(UNQUANTIZED):  # vision, audio, projector: Ollama keeps them
        return False
    return not any(key in name for key in _NO_QUANTIZE)


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class _State:
    n_attn_v: int = 0
    i_attn_v: int = 0
    n_layer: int = 0
    i_ffn_down: int = 0
    n_expert: int = 1
    tied: bool = True
    arch: str = ""


def _mix(st: _State, t: TensorInfo, new: T, ftype: str, cat: str) -> T:
    """llama_tensor_get_type_impl, for the file types herd offers."""
    ne0 = t.shape[-1]
    if cat == "output" or (st.tied and cat == "token_embd"):
        block = GGML_QUANT_SIZES[new][0]
        if st.arch == "falcon" or ne0 % block:
            return T.Q8_0
        return new if new == T.Q8_0 else T.Q6_K
    if cat == "attn_v":
        if ftype in ("Q4_K_M", "Q5_K_M") and _more_bits(st.i_attn_v, st.n_attn_v):
            new = T.Q6_K
        elif ftype == "Q4_K_S" and st.i_attn_v < 4:
            new = T.Q5_K
        if st.n_expert == 8:
            new = T.Q8_0
        st.i_attn_v += 1
    elif cat == "attn_k":
        if st.n_expert == 8:
            new = T.Q8_0
    elif cat == "ffn_down":
        i = _layer(t.name) if st.n_expert > 1 else st.i_ffn_down
        n = st.n_layer
        if ftype == "Q4_K_M":
            if st.arch == "falcon":
                new = T.Q6_K if i < n // 16 else T.Q5_K if _more_bits(i, n) else T.Q4_K
            elif _more_bits(i, n):
                new = T.Q6_K
        elif ftype == "Q5_K_M" and _more_bits(i, n):
            new = T.Q6_K
        elif ftype == "Q4_K_S" and st.arch != "falcon" and i < n // 8:
            new = T.Q5_K
        st.i_ffn_down += 1
    elif cat == "attn_output":
        if st.arch != "falcon" and st.n_expert == 8 and ftype in ("Q4_K_S", "Q4_K_M"):
            new = T.Q5_K
    return new


def plan(g: GGUFFile, file_type: str) -> dict[str, GGMLQuantizationType]:
    """The type each tensor gets in a `file_type` quantization of `g`."""
    file_type = parse_file_type(file_type)
    default = FILE_TYPES[file_type][1]
    arch = str(g.kv.get("general.architecture", ""))
    names = sorted(g.tensors, key=lambda n: (_layer(n), n))  # llama.cpp's weights_map order
    cats = {n: _category(n) for n in names}
    st = _State(
        n_attn_v=sum(c == "attn_v" for c in cats.values()),
        n_layer=int(g.kv.get(f"{arch}.block_count", 0) or 0),
        n_expert=max(1, int(g.kv.get(f"{arch}.expert_count", 1) or 1)),
        tied="output.weight" not in g.tensors,
        arch=arch,
    )
    out: dict[str, GGMLQuantizationType] = {}
    quantized = default not in (T.F32, T.F16, T.BF16)
    for name in names:
        t = g.tensors[name]
        if not allows_quantization(t):
            out[name] = t.type
            continue
        new = _mix(st, t, default, file_type, cats[name]) if quantized else default
        block = GGML_QUANT_SIZES[new][0]
        if t.shape[-1] % block:
            new = _FALLBACK.get(new, T.F16)
            if t.shape[-1] % GGML_QUANT_SIZES[new][0]:
                new = T.F16
        out[name] = new
    return out


def file_type_of(g: GGUFFile) -> str:
    """The source's file type name as Ollama prints it ("F16", "Q4_K_M")."""
    value = g.kv.get("general.file_type")
    if isinstance(value, int):
        try:
            return LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return "unknown"
    kinds = {t.type.name for t in g.tensors.values() if _n_dims(t) >= 2}
    return kinds.pop() if len(kinds) == 1 else "unknown"


def quantize(
    g: GGUFFile,
    file_type: str,
    write: Callable[[bytes | memoryview], object],
    progress: Progress | None = None,
) -> dict[str, GGMLQuantizationType]:
    """Write `g` quantized to `file_type` as GGUF v3 bytes through `write`; returns the plan."""
    file_type = parse_file_type(file_type)
    source = file_type_of(g)
    if source not in SOURCE_TYPES:
        raise HerdError(
            f"quantization is only supported for F16, BF16 and F32 models (this one is {source})"
        )
    types = plan(g, file_type)
    for qtype in {types[t.name] for t in g.tensors.values() if types[t.name] != t.type}:
        quants.check(qtype)  # before the first byte: K-quants need ggml-python

    # the metadata as it is, bytes and types, but for the quantization and split keys
    kv = {
        k: raw
        for k, raw in raw_kv(g)
        if k not in ("split.no", "split.count", "split.tensors.count")
    }
    kv["general.quantization_version"] = kv_entry(
        "general.quantization_version", QUANTIZATION_VERSION, GGUFValueType.UINT32
    )
    kv["general.file_type"] = kv_entry(
        "general.file_type", int(FILE_TYPES[file_type][0]), GGUFValueType.UINT32
    )
    tensors = list(g.tensors.values())
    out = GGUFStream(
        write,
        list(kv.values()),
        [(t.name, t.shape, types[t.name]) for t in tensors],
        int(g.kv.get("general.alignment", DEFAULT_ALIGNMENT)),
    )
    total, done = sum(t.nbytes for t in tensors), 0
    for t in tensors:
        new = types[t.name]
        if new == t.type:
            out.tensor(g.raw(t.name))
        else:
            src = dequantize(g.raw(t.name), t.type).reshape(t.shape)
            out.tensor(quants.quantize(src, new))
        done += t.nbytes
        if progress:
            progress(done, total)
    out.close()
    return types
