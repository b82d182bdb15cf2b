"""The facts `list`, `show` and the manifest config report about a GGUF file."""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Any

from gguf import LlamaFileType

from herd.gguf import GGUFFile


@dataclass(frozen=True)
class GGUFFacts:
    architecture: str
    parameter_count: int
    context_length: int | None
    embedding_length: int | None
    file_type: str  # quantization level, e.g. "Q4_1"
    chat_template: str | None  # Jinja `tokenizer.chat_template`, when the file has one
    kv: dict[str, Any]

    @property
    def parameter_size(self) -> str:
        return human_number(self.parameter_count)


def describe(g: GGUFFile) -> GGUFFacts:
    arch = g.architecture
    template = g.kv.get("tokenizer.chat_template")
    return GGUFFacts(
        architecture=arch,
        parameter_count=sum(t.n_elements for t in g.tensors.values()),
        context_length=_int(g.kv.get(f"{arch}.context_length")),
        embedding_length=_int(g.kv.get(f"{arch}.embedding_length")),
        file_type=file_type_name(g),
        chat_template=template if isinstance(template, str) and template else None,
        kv=g.kv,
    )


def _int(value: Any) -> int | None:
    """A number of the metadata as an int; None for anything else (NaN, a string)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return int(value) if number and math.isfinite(value) else None


def file_type_name(g: GGUFFile) -> str:
    """`general.file_type` as Ollama names it ("Q4_K_M", "F16"); else the commonest weight type."""
    value = g.kv.get("general.file_type")
    if isinstance(value, int):
        try:
            return LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return "unknown"
    # files without the key: name them by what most 2-D weights are stored as
    kinds = collections.Counter(t.type.name for t in g.tensors.values() if len(t.shape) >= 2)
    return kinds.most_common(1)[0][0] if kinds else "unknown"


def human_number(n: int) -> str:
    """Ollama's format.HumanNumber: 134515008 -> "134.52M", 8030261248 -> "8.0B"."""
    for unit, scale, digits in (("B", 1_000_000_000, 1), ("M", 1_000_000, 2)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{digits}f}{unit}"
    if n >= 1000:
        return f"{n / 1000:.0f}K"
    return str(n)
