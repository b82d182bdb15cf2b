"""A model's LoRA adapters at load: files opened and checked against the base model, their
matrices put on the backend, and after binding, a check that each adapted weight was bound.

`Source.adapters` lists (path, scale): the store's adapter layers (scale 1, as Ollama
applies them) or the library's `herd.load(..., adapters=[path or (path, scale)])`.
"""

from __future__ import annotations

import math
from pathlib import Path

from herd.errors import AdapterError
from herd.gguf import GGUFFile
from herd.gguf.lora import check_lora, open_lora
from herd.ml import Backend
from herd.nn.lora import Adapted, Factors


def adapted(backend: Backend, base: GGUFFile, adapters: list[tuple[Path, float]]) -> Adapted:
    """`backend` with the adapters to bind (AdapterError, naming the file and tensor, for
    one that is not a LoRA or does not fit `base`; every file is checked before any is
    put on the backend)."""
    files = []
    for path, scale in adapters:
        if not math.isfinite(scale):
            raise AdapterError(f"{Path(path).name}: adapter scale {scale!r} is not a number")
        lora = open_lora(path)
        check_lora(lora, base)
        files.append((lora, float(scale)))
    factors: dict[str, list[Factors]] = {}
    for lora, scale in files:
        for name, pair in lora.pairs.items():
            a, b = lora.array(pair.a), lora.array(pair.b)
            factors.setdefault(name, []).append((a, b, lora.scale(pair, scale)))
    return Adapted(backend, factors)


def check_bound(backend: Adapted, arch: str) -> None:
    """AdapterError for an adapted weight the architecture did not bind as a `Linear`
    (herd would silently not apply it)."""
    unused = backend.unused()
    if unused:
        raise AdapterError(
            f"herd's {arch} model does not apply adapters to {', '.join(unused[:4])}"
            + (f" and {len(unused) - 4} more" if len(unused) > 4 else "")
            + " (not bound as a linear projection)"
        )
