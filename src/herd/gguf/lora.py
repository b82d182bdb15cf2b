"""LoRA adapter GGUFs in llama.cpp's format (`convert_lora_to_gguf.py`), read and checked.

An adapter file has `general.type = "adapter"`, `adapter.type = "lora"`, the base model's
`general.architecture`, `adapter.lora.alpha`, and per adapted weight two tensors named
after the base tensor: `blk.0.attn_q.weight.lora_a` (A, NumPy shape (rank, n_in)) and
`.lora_b` (B, (n_out, rank)), so that the adapted projection is `W x + scale * B (A x)`
with `scale = user_scale * alpha / rank` (alpha 0: `user_scale`), as llama.cpp computes it.
Norm vectors that mergekit adds (`*_norm.weight`) are ignored, as llama.cpp ignores them.

Both `herd create` (before anything is written to the store) and the runner (at load) call
`check_lora`, so a mismatch is refused in the same words at either end, naming the tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from herd.errors import AdapterError, GGUFError
from herd.gguf.reader import GGUFFile, TensorInfo, open_gguf

# what an adapter's tensors may be stored as (llama.cpp's converter writes these)
_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0)


@dataclass(frozen=True)
class LoraPair:
    """One adapted weight: `base` (the base model's tensor name) and its A and B."""

    base: str
    a: TensorInfo
    b: TensorInfo

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoraFile:
    path: Path
    gguf: GGUFFile
    arch: str
    alpha: float
    pairs: dict[str, LoraPair]  # by base tensor name

    def scale(self, pair: LoraPair, user_scale: float = 1.0) -> float:
        """llama.cpp's: `user_scale * alpha / rank`, or `user_scale` when alpha is 0."""
        return user_scale * self.alpha / pair.rank if self.alpha else user_scale

    def array(self, info: TensorInfo) -> np.ndarray:
        """A tensor as float32, NumPy order."""
        raw = self.gguf.raw(info.name)
        if info.type == Q.F32:
            return raw.view(np.float32).reshape(info.shape).copy()
        if info.type == Q.F16:
            return raw.view(np.float16).reshape(info.shape).astype(np.float32)
        return np.asarray(dequantize(raw, info.type), np.float32).reshape(info.shape)


def open_lora(path: str | Path) -> LoraFile:
    """An adapter file, checked to be a LoRA in llama.cpp's format: AdapterError (naming
    the file, and the tensor where one is wrong) for anything else."""
    path = Path(path)
    try:
        g = open_gguf(path)
    except GGUFError as e:
        raise AdapterError(f"{e} (an adapter must be a GGUF LoRA file)") from None
    kind, adapter = g.kv.get("general.type"), g.kv.get("adapter.type")
    if kind != "adapter":
        raise AdapterError(
            f"{path.name}: not an adapter: its general.type is {kind!r}, an adapter has 'adapter'"
        )
    if adapter != "lora":
        raise AdapterError(f"{path.name}: adapter.type is {adapter!r}; herd applies 'lora'")
    alpha = g.kv.get("adapter.lora.alpha", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise AdapterError(f"{path.name}: adapter.lora.alpha is {alpha!r}, not a number")
    halves: dict[str, dict[str, TensorInfo]] = {}
    for info in g.tensors.values():
        base, dot, half = info.name.rpartition(".")
        if info.name.endswith("_norm.weight"):
            continue  # as llama.cpp: mergekit's norm vectors are not applied
        if not dot or half not in ("lora_a", "lora_b"):
            raise AdapterError(
                f"{path.name}: tensor {info.name} is neither a .lora_a nor a .lora_b tensor"
            )
        if len(info.shape) != 2:
            raise AdapterError(f"{path.name}: tensor {info.name} has {len(info.shape)} dims, not 2")
        if info.type not in _TYPES:
            raise AdapterError(
                f"{path.name}: tensor {info.name} is {info.type.name}; adapters are read as "
                + ", ".join(t.name for t in _TYPES)
            )
        halves.setdefault(base, {})[half] = info
    pairs: dict[str, LoraPair] = {}
    for base, h in halves.items():
        if len(h) != 2:
            missing = "lora_b" if "lora_a" in h else "lora_a"
            raise AdapterError(f"{path.name}: {base} has no {base}.{missing} tensor")
        a, b = h["lora_a"], h["lora_b"]
        if a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{path.name}: {a.name} {list(a.shape)} and {b.name} {list(b.shape)} disagree "
                "on the rank (A is (rank, n_in), B is (n_out, rank))"
            )
        pairs[base] = LoraPair(base, a, b)
    if not pairs:
        raise AdapterError(f"{path.name}: an adapter without any LoRA tensors")
    arch = g.kv.get("general.architecture")
    return LoraFile(path, g, arch if isinstance(arch, str) else "", float(alpha), pairs)


def check_lora(lora: LoraFile, base: GGUFFile) -> None:
    """AdapterError unless every pair fits `base`: the same architecture, a 2-D base tensor
    of that name (not the token embeddings, which herd does not adapt) and A's input and B's
    output dimensions equal to the base weight's."""
    name = lora.path.name
    if lora.arch != base.kv.get("general.architecture"):
        raise AdapterError(
            f"{name}: an adapter for {lora.arch!r} models, but the base model is "
            f"{base.kv.get('general.architecture')!r}"
        )
    for pair in lora.pairs.values():
        w = base.tensors.get(pair.base)
        if w is None:
            raise AdapterError(
                f"{name}: {pair.a.name} adapts {pair.base}, which the base model does not have "
                "(an adapter for another model?)"
            )
        if pair.base == "token_embd.weight" or len(w.shape) != 2:
            raise AdapterError(
                f"{name}: {pair.a.name}: herd applies adapters to linear projections, and "
                f"{pair.base} is not one"
            )
        n_out, n_in = w.shape
        if pair.a.shape[1] != n_in or pair.b.shape[0] != n_out:
            raise AdapterError(
                f"{name}: {pair.a.name} {list(pair.a.shape)} and {pair.b.name} "
                f"{list(pair.b.shape)} do not fit {pair.base} {list(w.shape)} (A is "
                f"(rank, {n_in}), B is ({n_out}, rank))"
            )
