"""LoRA adapters at run time: `W x + B (A x)`, never merged into the (quantized) base weight.

A model binds its weights through `Weights(backend)`; to adapt it, the runner hands
`load_model` an `Adapted` backend instead: the real one, plus each adapted weight's
`Lora` by base tensor name. `Linear.bind` takes the `Lora` of its weight from there, so
no architecture's code knows about adapters. Several adapters on one weight become one
pair: their A matrices stacked along the rank, their B matrices side by side with each
adapter's scale folded in, so `B (A x)` is the sum of `scale_i * B_i (A_i x)` in two
matmuls. The weights of one group (a layer's q, k and v; gate and up) share one A, theirs
stacked, computed once per x, and each B is kept transposed for `linear_t` (`Lora`): a
rank-16 adapter on SmolLM2's q, k, v and o went from 0.82x-0.85x of plain decoding to
0.90x-0.92x (2 threads). The matrices are F32 tensors allocated on the backend (on the
device of their layer) and written once, through the backend contract's own ops.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from herd.ml import Backend, CacheConfig, Context, DeviceInfo, DType, Tensor

_LAYER = re.compile(r"blk\.(\d+)\.")


class Memo(threading.local):
    """The last x a shared computation ran on, and its result: the linears of one group
    are called one after another on the same x, and only the first computes (per thread:
    two runners may record graphs at once). Holding x keeps its identity unique; the
    group's last member lets go (`last`), so no pass's arrays outlive it."""

    x: Any = None
    y: Any = None

    def get(self, x: Tensor, make: Callable[[], Tensor], last: bool = False) -> Tensor:
        y = self.y if self.x is x else make()
        self.x, self.y = (None, None) if last else (x, y)
        return y


@dataclass(frozen=True)
class Lora:
    """One weight's adapters, summed: `delta(x)` is the sum of `scale_i B_i (A_i x)`.

    `a` (R, n_in); `bt` (r, n_out), B transposed with the scales in it, multiplied by
    `linear_t`: on ggml an outer product, r axpys of whole rows, where B's many rows of
    r elements cost a dot product each (a 960x48 B took 14 us, its transpose 3). The
    weights of one group (`GROUPS`: a layer's q, k and v; its gate and up) read the same
    x and share `a`, their A matrices stacked, computed once per x: `ranks` are this
    weight's rows of it.
    """

    a: Tensor
    bt: Tensor
    ranks: tuple[int, int] | None = None
    memo: Memo = field(default_factory=Memo, compare=False)
    last: bool = True  # the group's last adapted weight (models call them in order)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_out, rank, n_in)"""
        return self.bt.shape[1], self.bt.shape[0], self.a.shape[1]

    def delta(self, x: Tensor) -> Tensor:
        ax = self.memo.get(x, lambda: x.linear(self.a), self.last)
        return (ax if self.ranks is None else ax.slice(-1, *self.ranks)).linear_t(self.bt)


# Weights that read the same x in every architecture that has them (llama.cpp's names)
GROUPS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))
_MEMBER = re.compile(r"(.*\.)(\w+)\.weight$")


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

    def stack(self, names: Sequence[str]) -> Tensor | None:
        return self.inner.stack(names)

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


def group_of(backend: Backend, name: str) -> tuple[str, ...]:
    """The weights of name's group that the model file has, of one width (name alone
    when it is in no group)."""
    m = _MEMBER.match(name)
    group = next((g for g in GROUPS if m and m.group(2) in g), None)
    if m is None or group is None:
        return (name,)
    names = tuple(f"{m.group(1)}{g}.weight" for g in group)
    names = tuple(n for n in names if backend.has_weight(n))
    widths = {backend.weight(n).shape[-1] for n in names}
    return names if len(names) > 1 and len(widths) == 1 else (name,)


def upload(backend: Backend, factors: dict[str, list[Factors]]) -> dict[str, Lora]:
    """Each adapted weight's `Lora` (a group's sharing A) as persistent F32 tensors of
    `backend`, written in one pass (OutOfMemoryError from `alloc` before anything is
    written if they do not fit)."""
    pairs = {name: combine(f) for name, f in factors.items() if f}
    out: dict[str, Lora] = {}
    arrays: list[tuple[Tensor, np.ndarray]] = []

    def put(array: np.ndarray, layer: int | None) -> Tensor:
        t = backend.alloc(array.shape, DType.F32, layer)
        arrays.append((t, np.ascontiguousarray(array)))
        return t

    for name in pairs:
        if name in out:
            continue
        m = _LAYER.match(name)
        layer = int(m.group(1)) if m else None
        names = [n for n in group_of(backend, name) if n in pairs]
        a = put(np.concatenate([pairs[n][0] for n in names], axis=0), layer)
        memo, rank = Memo(), 0
        for n in names:
            r = pairs[n][0].shape[0]
            ranks = (rank, rank + r) if len(names) > 1 else None
            out[n] = Lora(a, put(pairs[n][1].T, layer), ranks, memo, n == names[-1])
            rank += r
    if not out:
        return out
    with backend.new_context() as ctx:
        for dst, src in arrays:
            ids = ctx.input(np.arange(src.shape[0], dtype=np.int32), DType.I32)
            ctx.forward(dst.set_rows(ids, ctx.input(src)))
        ctx.compute()
    return out
