"""LoRA adapters at run time: `W x + B (A x)`, never merged into the (quantized) base weight.

A model binds its weights through `Weights(backend)`; to adapt it, the runner hands
`load_model` an `Adapted` backend instead: the real one, plus each adapted weight's
`Lora` by base tensor name. `Linear.bind` takes the `Lora` of its weight from there, so
no architecture's code knows about adapters. Several adapters on one weight become one
pair: their A matrices stacked along the rank, their B matrices side by side with each
adapter's scale folded in, so `B (A x)` is the sum of `scale_i * B_i (A_i x)` in two
matmuls. The matrices are F32 tensors allocated on the backend (on the device of their
layer) and written once, through the backend contract's own ops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from herd.ml import Backend, CacheConfig, Context, DeviceInfo, DType, Tensor

_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class Lora:
    """One weight's adapters, summed: `a` (R, n_in), `b` (n_out, R), scales in `b`."""

    a: Tensor
    b: Tensor


# (A (rank, n_in), B (n_out, rank), scale) of one adapter for one weight
Factors = tuple[np.ndarray, np.ndarray, float]


class Adapted:
    """A backend with LoRA adapters to bind: `Weights` hands each `Linear` its `Lora`.

    Everything else is the wrapped backend's. `unused()` lists the adapted weights no
    `Linear` bound (a weight the architecture does not bind as a linear projection).
    """

    def __init__(self, backend: Backend, factors: dict[str, list[Factors]]) -> None:
        self.inner, self.name = backend, backend.name
        self.loras = upload(backend, factors)
        self.bound: set[str] = set()

    def lora(self, name: str) -> Lora | None:
        lora = self.loras.get(name)
        if lora is not None:
            self.bound.add(name)
        return lora

    def unused(self) -> list[str]:
        return sorted(set(self.loras) - self.bound)

    # the Backend contract, the wrapped backend's
    def weight(self, name: str) -> Tensor:
        return self.inner.weight(name)

    def has_weight(self, name: str) -> bool:
        return self.inner.has_weight(name)

    def alloc(self, shape: tuple[int, ...], dtype: DType, layer: int | None = None) -> Tensor:
        return self.inner.alloc(shape, dtype, layer)

    def new_context(self) -> Context:
        return self.inner.new_context()

    def devices(self) -> list[DeviceInfo]:
        return self.inner.devices()

    def cache_config(self) -> CacheConfig:
        return self.inner.cache_config()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # a backend's own extras (ggml's `gpus`)
        return getattr(self.inner, name)


def combine(factors: list[Factors]) -> tuple[np.ndarray, np.ndarray]:
    """Several adapters of one weight as one pair: A stacked, scale * B side by side."""
    a = np.concatenate([f[0] for f in factors], axis=0)
    b = np.concatenate([f[1] * np.float32(f[2]) for f in factors], axis=1)
    return np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)


def upload(backend: Backend, factors: dict[str, list[Factors]]) -> dict[str, Lora]:
    """Each weight's combined pair as persistent F32 tensors of `backend`, written in one
    pass (OutOfMemoryError from `alloc` before anything is written if they do not fit)."""
    pairs = {name: combine(f) for name, f in factors.items() if f}
    out: dict[str, Lora] = {}
    for name, (a, b) in pairs.items():
        m = _LAYER.match(name)
        layer = int(m.group(1)) if m else None
        out[name] = Lora(backend.alloc(a.shape, DType.F32, layer),
                         backend.alloc(b.shape, DType.F32, layer))  # fmt: skip
    if not out:
        return out
    with backend.new_context() as ctx:
        for name, (a, b) in pairs.items():
            for dst, src in ((out[name].a, a), (out[name].b, b)):
                rows = ctx.input(np.arange(src.shape[0], dtype=np.int32), DType.I32)
                ctx.forward(dst.set_rows(rows, ctx.input(src)))
        ctx.compute()
    return out
