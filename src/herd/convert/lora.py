"""A PEFT LoRA adapter directory -> a LoRA GGUF in llama.cpp's format (`herd convert --lora`).

The directory holds `adapter_config.json` and `adapter_model.safetensors` (or
`adapter_model.bin`) with `base_model.model.<HF module>.lora_A.weight` (rank, n_in) and
`.lora_B.weight` (n_out, rank). Each module's base weight is named in GGUF by the base
architecture's converter (`models/<arch>/convert.py`), as llama.cpp's
`convert_lora_to_gguf.py` reuses its model converters: B goes through the converter's
fix-ups, which are row operations on a linear weight (Llama's rotary permutation of Q and
K rows: `P (B A) = (P B) A`); A is only renamed. The base is an HF folder (its
config.json) or a GGUF (the model the adapter will run on: the config is read back from
its metadata, and every name and shape is checked against its tensors).

The file gets `general.type = adapter`, `adapter.type = lora` and `adapter.lora.alpha`.
Where PEFT's scale is not llama.cpp's `alpha / rank` (rsLoRA's `alpha / sqrt(rank)`, or
`rank_pattern`/`alpha_pattern`), each module's scale is folded into its B and alpha is
written as 0, which llama.cpp and herd read as a scale of 1. DoRA and embedding adapters
are refused: neither llama.cpp nor herd applies them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from herd.convert.driver import converter_for, converters, read_config
from herd.convert.readers import read_safetensors, read_torch_zip
from herd.errors import ConvertError
from herd.gguf import GGUFFile, open_gguf
from herd.gguf.quants import quantize
from herd.gguf.writer import write_gguf
from herd.models.conversion import TensorRef

Q = GGMLQuantizationType
LORA_OUTTYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
_PREFIX = "base_model.model."
_HALF = re.compile(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")  # an adapter name may sit in


def is_peft_dir(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def convert_lora(
    src: str | Path,
    out: str | Path,
    base: str | Path,
    outtype: str = "f32",
    *,
    name: str | None = None,
) -> Path:
    """Convert the PEFT adapter directory `src` for the base model `base` (an HF folder or
    a GGUF) to the LoRA GGUF `out`; nothing appears at `out` unless it is whole."""
    src, out, base = Path(src), Path(out), Path(base)
    if outtype not in LORA_OUTTYPES:
        raise ConvertError(f"unknown outtype {outtype!r}; choose one of {', '.join(LORA_OUTTYPES)}")
    lcfg = _adapter_config(src)
    cfg, shapes = _base(base)
    conv = converter_for(cfg)
    halves: dict[str, dict[str, TensorRef]] = {}
    for ref in _adapter_tensors(src):
        m = _HALF.fullmatch(ref.name.removeprefix(_PREFIX))
        if m is None:
            what = "an embedding adapter" if "lora_embedding" in ref.name else "not a LoRA tensor"
            if "lora_magnitude_vector" in ref.name:
                what = "a DoRA magnitude (DoRA is not supported)"
            raise ConvertError(f"{src.name}: tensor {ref.name} is {what}")
        halves.setdefault(m.group(1), {})[m.group(2)] = ref
    scales = _scales(lcfg, halves)
    # llama.cpp's scale is alpha / rank with one alpha per file: fold PEFT's where it differs
    alpha = float(lcfg["lora_alpha"])
    fold = any(abs(s - alpha / halves[m]["A"].shape[0]) > 1e-6 * abs(s) for m, s in scales.items()
               if "A" in halves[m] and halves[m]["A"].shape[0])  # fmt: skip
    tensors: list[tuple[str, np.ndarray, Q | None]] = []
    for module, h in sorted(halves.items()):
        if len(h) != 2:
            raise ConvertError(f"{src.name}: {module} has lora_{'AB'['A' in h]} but not both")
        hf_name = f"{module}.weight"
        try:
            gguf_name = conv.gguf_name(cfg, hf_name)
        except KeyError:
            raise ConvertError(
                f"{src.name}: {h['A'].name} adapts {hf_name}, which is not part of a "
                f"{cfg['architectures'][0]}"
            ) from None
        if gguf_name is None or gguf_name not in shapes:
            raise ConvertError(
                f"{src.name}: {h['A'].name} adapts {hf_name}, which the base model does not "
                "have (tied to the embeddings, or another model's)"
            )
        a, b = h["A"].load(), h["B"].load()
        n_out, n_in = shapes[gguf_name]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != n_in or b.shape[0] != n_out:
            raise ConvertError(
                f"{src.name}: {h['A'].name} {list(a.shape)} and {h['B'].name} "
                f"{list(b.shape)} do not fit {gguf_name} {[n_out, n_in]}"
            )
        if a.shape[0] != b.shape[1]:
            raise ConvertError(f"{src.name}: {h['A'].name} and {h['B'].name} disagree on rank")
        done = conv.tensor(cfg, hf_name, b)  # the base's row fix-ups, applied to B
        assert done is not None and done[0] == gguf_name and done[1].shape == b.shape
        b = done[1] * np.float32(scales[module]) if fold else done[1]
        for half, array in (("lora_a", a), ("lora_b", b)):
            qtype = _qtype(array, LORA_OUTTYPES[outtype])
            tensors.append((f"{gguf_name}.{half}", quantize(array, qtype), qtype))
    if not tensors:
        raise ConvertError(f"{src.name}: no LoRA tensors")
    kv: dict[str, Any] = {
        "general.type": "adapter",
        "general.name": name or src.resolve().name,
        "adapter.type": "lora",
        "adapter.lora.alpha": 0.0 if fold else alpha,
    }
    if not out.parent.is_dir():
        raise ConvertError(f"{out.parent}: no such directory")
    return write_gguf(out, conv.ARCH, kv, tensors)


def _qtype(array: np.ndarray, main: Q) -> Q:
    """Q8_0 only where rows split into its blocks (a rank-16 B does not): F16 otherwise."""
    if main == Q.Q8_0 and array.shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return main


def _adapter_config(src: Path) -> dict[str, Any]:
    if not src.is_dir():
        raise ConvertError(f"{src}: not a directory")
    path = src / "adapter_config.json"
    if not path.is_file():
        raise ConvertError(f"{src}: no adapter_config.json (not a PEFT adapter directory)")
    try:
        lcfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: unreadable JSON: {e}") from None
    if not isinstance(lcfg, dict):
        raise ConvertError(f"{path}: not a JSON object")
    if lcfg.get("peft_type", "LORA") != "LORA":
        raise ConvertError(f"{path}: peft_type {lcfg.get('peft_type')!r}; herd converts LORA")
    if lcfg.get("use_dora"):
        raise ConvertError(f"{path}: a DoRA adapter (use_dora); herd applies plain LoRA")
    alpha = lcfg.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ConvertError(f"{path}: lora_alpha is {alpha!r}, not a number")
    return lcfg


def _adapter_tensors(src: Path) -> list[TensorRef]:
    for file, read in (("adapter_model.safetensors", read_safetensors),
                       ("adapter_model.bin", read_torch_zip)):  # fmt: skip
        if (src / file).is_file():
            return read(src / file)
    raise ConvertError(f"{src}: no adapter_model.safetensors or adapter_model.bin")


def _scales(lcfg: dict[str, Any], halves: dict[str, dict[str, TensorRef]]) -> dict[str, float]:
    """Each module's PEFT scale: `alpha / rank` (`alpha / sqrt(rank)` with rsLoRA), its
    alpha from `alpha_pattern` where a key matches the module's name, as PEFT matches them."""
    alpha, rslora = float(lcfg["lora_alpha"]), bool(lcfg.get("use_rslora"))
    patterns = lcfg.get("alpha_pattern") or {}
    out: dict[str, float] = {}
    for module, h in halves.items():
        rank = h["A"].shape[0] if "A" in h and len(h["A"].shape) == 2 else 1
        a = next((float(v) for k, v in patterns.items()
                  if re.fullmatch(rf"(.*\.)?{k}", module)), alpha)  # fmt: skip
        out[module] = a / math.sqrt(rank) if rslora else a / rank
    return out


def _base(base: Path) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The base's HF config and its 2-D GGUF tensor shapes by name."""
    if base.is_dir():
        cfg = read_config(base)
        return cfg, {k: tuple(v) for k, v in converter_for(cfg).tensor_shapes(cfg).items()}
    if not base.is_file():
        raise ConvertError(f"{base}: no such base model (an HF folder or a GGUF file)")
    g = open_gguf(base)
    return config_from_gguf(g), {n: t.shape for n, t in g.tensors.items() if len(t.shape) == 2}


def config_from_gguf(g: GGUFFile) -> dict[str, Any]:
    """The config.json fields a converter names and fixes up tensors with, read back from a
    GGUF of its architecture (ConvertError for one herd has no converter for)."""
    arch = g.architecture
    hf = next((h for h, m in converters().items() if m.ARCH == arch), None)
    if hf is None:
        raise ConvertError(f"{g.path.name}: herd converts no {arch!r} models; pass --base DIR")
    c = g.config()
    n_head = c.int("attention.head_count")
    embd = g.tensors.get("token_embd.weight")
    cfg: dict[str, Any] = {
        "architectures": [hf],
        "hidden_size": c.int("embedding_length"),
        "intermediate_size": c.int("feed_forward_length", 0),
        "num_hidden_layers": c.int("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": c.int("attention.head_count_kv", n_head),
        "head_dim": c.int("attention.key_length", c.int("embedding_length") // n_head),
        "vocab_size": embd.shape[0] if embd is not None else 0,
        "tie_word_embeddings": "output.weight" not in g.tensors,
    }
    return cfg
