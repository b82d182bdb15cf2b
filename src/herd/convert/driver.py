"""The conversion driver: a Hugging Face directory -> one GGUF file.

The driver knows files, dtypes and the GGUF layout; everything about an architecture lives
in its `herd/models/<arch>/convert.py`, which provides:

    HF_ARCHITECTURES: tuple[str, ...]         config.json `architectures[0]` values it takes
    ARCH: str                                 the GGUF `general.architecture`
    kv(cfg) -> dict                           `<arch>.*` metadata from config.json
    tensor_shapes(cfg) -> dict[str, shape]    every GGUF tensor the file must hold (NumPy order)
    gguf_name(cfg, hf_name) -> str | None     the GGUF name, None to drop, KeyError if unknown
    tensor(cfg, hf_name, array) -> (name, array) | None   renaming plus fix-ups (permutations,
                                              folded norms); fix-ups never change the shape
    tensor_refs(cfg, refs) -> refs            optional: regroup the checkpoint's tensors before
                                              naming (stack per-expert matrices, split fused ones)
    extra_tensors(cfg) -> [(name, array)]     optional: tensors made from the config
    dir_kv(cfg, src) -> dict                  optional: metadata from other files of the dir
    tokenizer_kv(cfg, kv) -> dict             optional: adjust the `tokenizer.*` metadata
    vocab_config(cfg) -> dict                 optional: the config the vocabulary is read with
                                              (a multimodal model's text_config: vocab_size)
    tensor_qtype(name, shape, main) -> type | None   optional: a tensor type other than
                                              `tensor_type`'s rule (None: the rule)
    mmproj(cfg) -> (text, projector) | None   optional: llama.cpp's two-file layout
                                              (`convert(..., mmproj=path)`): two objects with
                                              this same contract, the projector's without a
                                              vocabulary (`has_vocab = False`)

Every name and shape is checked against the config before a byte is written, so a missing,
extra or misshapen tensor fails early, naming the file and tensor. Tensors then stream one
at a time from the memory-mapped checkpoint into a temp file that is renamed into place
only when complete.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType, LlamaFileType

from herd.convert.readers import read_tensors
from herd.convert.vocab import vocab_kv
from herd.errors import ConvertError, UnsupportedModelError
from herd.gguf.quants import quantize
from herd.gguf.writer import GGUFStream, metadata
from herd.models.conversion import FLOAT_DTYPES, TensorRef

Q = GGMLQuantizationType
# --outtype -> (general.file_type, tensor type of the large weights)
OUTTYPES: dict[str, tuple[LlamaFileType, GGMLQuantizationType]] = {
    "f32": (LlamaFileType.ALL_F32, Q.F32),
    "f16": (LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}
# These stay F32 whatever the outtype, as in llama.cpp's converter (the MoE router too).
_F32_PREFIXES = ("position_embd.", "token_types.", "rope_freqs.")
_F32_SUFFIXES = (".ffn_gate_inp.weight",)

# progress(index from 1, total, gguf name, tensor type name, shape)
Progress = Callable[[int, int, str, str, tuple[int, ...]], None]


@cache
def converters() -> dict[str, ModuleType]:
    """HF architecture name -> the `herd.models.<arch>.convert` module that takes it."""
    import herd.models

    out: dict[str, ModuleType] = {}
    for m in sorted(pkgutil.iter_modules(herd.models.__path__), key=lambda m: m.name):
        if not m.ispkg:
            continue
        try:
            mod = importlib.import_module(f"herd.models.{m.name}.convert")
        except ModuleNotFoundError as e:
            if e.name == f"herd.models.{m.name}.convert":
                continue  # an architecture herd runs but does not convert
            raise
        for hf_arch in getattr(mod, "HF_ARCHITECTURES", ()):
            out[hf_arch] = mod
    return out


def supported_architectures() -> list[str]:
    return sorted(converters())


def read_config(src: Path) -> dict[str, Any]:
    if not src.is_dir():
        raise ConvertError(f"{src}: not a directory")
    path = src / "config.json"
    if not path.is_file():
        raise ConvertError(f"{src}: no config.json (not a Hugging Face model directory)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: unreadable JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"{path}: not a JSON object")
    return cfg


def converter_for(cfg: dict[str, Any]) -> ModuleType:
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    conv = converters().get(arch) if isinstance(arch, str) else None
    if conv is None:
        raise UnsupportedModelError(
            f"config.json: unsupported architecture {arch!r}; herd converts "
            + ", ".join(supported_architectures())
        )
    return conv


@dataclass
class _Item:
    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    ref: TensorRef | None  # None: `array` holds a tensor made from the config
    array: np.ndarray | None = None


# Ollama's quantizer leaves the vision (`v.`), audio (`a.`) and projector (`mm.`) tensors
UNQUANTIZED = ("v.", "a.", "mm.")


def tensor_type(name: str, shape: tuple[int, ...], main: GGMLQuantizationType) -> Q:
    """llama.cpp's rule: vectors, norms, biases and position tables stay F32."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    if name.startswith(_F32_PREFIXES) or name.endswith(_F32_SUFFIXES):
        return Q.F32
    if main == Q.Q8_0 and shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16  # rows that do not split into Q8_0 blocks (llama.cpp falls back too)
    if name.startswith(UNQUANTIZED) and main == Q.Q8_0:
        return Q.F16  # vision towers and projectors stay unquantized, as Ollama keeps them
    return main


def _plan(conv: Any, cfg: dict[str, Any], refs: dict[str, TensorRef], main: Q) -> list[_Item]:
    expected = {k: tuple(v) for k, v in conv.tensor_shapes(cfg).items()}
    items: list[_Item] = []
    seen: dict[str, str] = {}
    for name, array in getattr(conv, "extra_tensors", lambda c: [])(cfg):
        array = np.ascontiguousarray(array, dtype=np.float32)
        items.append(
            _Item(name, tuple(array.shape), tensor_type(name, array.shape, main), None, array)
        )
        seen[name] = "config.json"
    for ref in refs.values():
        where = f"{ref.file.name}: tensor {ref.name}"
        try:
            name = conv.gguf_name(cfg, ref.name)
        except KeyError:
            raise ConvertError(f"{where} is not part of a {cfg['architectures'][0]}") from None
        if name is None:
            continue
        if name not in expected:
            raise ConvertError(f"{where} (GGUF {name}) is not part of this model's config")
        if name in seen:
            raise ConvertError(f"{where} (GGUF {name}) duplicates one in {seen[name]}")
        if ref.dtype not in FLOAT_DTYPES:
            raise ConvertError(
                f"{where} has dtype {ref.dtype}; only "
                f"{', '.join(FLOAT_DTYPES)} weights can be converted"
            )
        if ref.shape != expected[name]:
            raise ConvertError(
                f"{where} has shape {list(ref.shape)}, but config.json implies "
                f"{list(expected[name])} (GGUF {name})"
            )
        seen[name] = ref.file.name
        qtype = getattr(conv, "tensor_qtype", lambda *a: None)(name, ref.shape, main)
        qtype = tensor_type(name, ref.shape, main) if qtype is None else qtype
        items.append(_Item(name, ref.shape, qtype, ref))
    missing = [n for n in expected if n not in seen]
    if missing:
        files = sorted({r.file.name for r in refs.values()})
        raise ConvertError(
            f"missing tensors {', '.join(missing[:8])}"
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            + f" (looked in {', '.join(files)})"
        )
    return items


def convert(
    src: str | Path,
    out: str | Path,
    outtype: str = "f16",
    *,
    name: str | None = None,
    progress: Progress | None = None,
    mmproj: str | Path | None = None,
) -> Path:
    """Convert the Hugging Face directory `src` to the GGUF file `out`; returns `out`.

    With `mmproj`, a model with a vision encoder goes into llama.cpp's two files: the text
    model to `out`, the encoder and projector to `mmproj`.

    Nothing appears at `out` (or `mmproj`) unless both files were written.
    """
    src, out = Path(src), Path(out)
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    cfg = read_config(src)
    conv = converter_for(cfg)
    refs = read_tensors(src)
    if hasattr(conv, "tensor_refs"):
        refs = conv.tensor_refs(cfg, refs)
    name = name or src.resolve().name
    if mmproj is None:
        _convert_part(conv, cfg, src, refs, out, outtype, name, progress)
        return out
    mmproj = Path(mmproj)
    parts = getattr(conv, "mmproj", lambda c: None)(cfg)
    if parts is None:
        raise ConvertError(
            f"{cfg['architectures'][0]}: no vision encoder to write a projector file for"
        )
    if mmproj.resolve() == out.resolve():
        raise ConvertError(f"{out}: the text model and the projector need two files")
    # both planned (every name and shape checked) before either is written
    text, projector = ((part, _plan(part, cfg, refs, OUTTYPES[outtype][1])) for part in parts)
    _convert_part(text[0], cfg, src, refs, out, outtype, name, progress, text[1])
    try:
        _convert_part(projector[0], cfg, src, refs, mmproj, outtype, name, progress, projector[1])
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out


def _convert_part(
    conv: Any,
    cfg: dict[str, Any],
    src: Path,
    refs: dict[str, TensorRef],
    out: Path,
    outtype: str,
    name: str,
    progress: Progress | None,
    items: list[_Item] | None = None,
) -> None:
    """One GGUF file: a converter module's (or one part's of `mmproj`)."""
    file_type, main = OUTTYPES[outtype]
    items = _plan(conv, cfg, refs, main) if items is None else items
    kv: dict[str, Any] = {
        "general.type": "model",
        "general.name": name,
        "general.file_type": int(file_type),
        "general.quantization_version": GGML_QUANT_VERSION,
    }
    kv.update(conv.kv(cfg))
    if hasattr(conv, "dir_kv"):
        kv.update(conv.dir_kv(cfg, src))
    if getattr(conv, "has_vocab", True):
        tok = vocab_kv(src, getattr(conv, "vocab_config", lambda c: c)(cfg))
        hook = getattr(conv, "tokenizer_kv", None)
        kv.update(hook(cfg, tok) if hook is not None else tok)
    _write(out, conv.ARCH, kv, items, cfg, conv, progress)


def _write(
    out: Path,
    arch: str,
    kv: dict[str, Any],
    items: list[_Item],
    cfg: dict[str, Any],
    conv: Any,
    progress: Progress | None,
) -> None:
    if not out.parent.is_dir():
        raise ConvertError(f"{out.parent}: no such directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = GGUFStream(
                f.write, metadata(arch, kv), [(it.name, it.shape, it.qtype) for it in items]
            )
            for i, it in enumerate(items, 1):
                if it.ref is None:
                    array = it.array
                else:
                    done = conv.tensor(cfg, it.ref.name, it.ref.load())
                    assert done is not None and done[0] == it.name, (it.ref.name, done and done[0])
                    array = done[1]
                assert array is not None and tuple(array.shape) == it.shape, (it.name, it.shape)
                writer.tensor(quantize(array, it.qtype))
                if progress is not None:
                    progress(i, len(items), it.name, it.qtype.name, it.shape)
            writer.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
