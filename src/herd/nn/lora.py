"""LoRA adapters at run time: `W x + B (A x)`, never merged into the (quantized) base weight.

A model binds its weights through `Weights(backend)`; to adapt it, the runner hands
`load_model` an `Adapted` backend instead: the real one, plus each adapted weight's
`Lora` by base tensor name. `Linear.bind` takes the `Lora` of its weight from there, so
no architecture's code knows about adapters. Several adapters on one weight become one
pair: their A matrices stacked along the rank, their B matrices side by side with each
adapter's scale folded in, so `B (A x)` is the sum of `scale_i * B_i (A_i x)` in two
matmuls. The weights of one group (a layer's q, k and v; gate and up) share one pair
too, computed once per x: a decode step of SmolLM2 with q, k, v and o adapted runs 120
matmul nodes fewer. The matrices are F32 tensors allocated on the backend (on the device of their
layer) and written once, through the backend contract's own ops.
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
    two runners may record graphs at once). Holding x keeps its identity unique."""

    x: Any = None
    y: Any = None

    def get(self, x: Tensor, make: Callable[[], Tensor]) -> Tensor:
        if self.x is not x:
            self.x, self.y = x, make()
        return self.y


@dataclass(frozen=True)
class Lora:
    """One weight's adapters, summed: `delta(x)` is the sum of `scale_i B_i (A_i x)`.

    `a` (R, n_in) and `b` (N, R), the scales in b. The weights of one group (`GROUPS`: a
    layer's q, k and v; its gate and up), which read the same x, share one pair: their A
    stacked along the rank, B block-diagonal over the group's rows (zeros for a member
    without an adapter), so the group costs two matmuls, not two each. `rows` is this
    weight's slice of the group's rows, `names` the group's weights in their order.
    """

    a: Tensor
    b: Tensor
    rows: tuple[int, int] | None = None
    names: tuple[str, ...] = ()
    memo: Memo = field(default_factory=Memo, compare=False)

    @property
    def n_out(self) -> int:
        return self.rows[1] - self.rows[0] if self.rows else self.b.shape[0]

    def group_delta(self, x: Tensor) -> Tensor:
        """B (A x) over all the group's rows (computed once per x)."""
        return self.memo.get(x, lambda: x.linear(self.a).linear(self.b))

    def delta(self, x: Tensor) -> Tensor:
        d = self.group_delta(x)
        return d if self.rows is None else d.slice(-1, *self.rows)


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
    """Each adapted weight's `Lora`, a group's shared, as persistent F32 tensors of
    `backend`, written in one pass (OutOfMemoryError from `alloc` before anything is
    written if they do not fit)."""
    pairs = {name: combine(f) for name, f in factors.items() if f}
    out: dict[str, Lora] = {}
    arrays: list[tuple[Tensor, np.ndarray]] = []
    for name in pairs:
        if name in out:
            continue
        names = group_of(backend, name)
        m = _LAYER.match(name)
        layer = int(m.group(1)) if m else None
        if len(names) == 1:
            a, b = pairs[name]
            rows: list[tuple[int, int] | None] = [None]
        else:  # A stacked, B block-diagonal
            n_outs = [backend.weight(n).shape[0] for n in names]
            ends = np.cumsum(n_outs).tolist()
            rows = [(e - n, e) for e, n in zip(ends, n_outs, strict=True)]
            adapted = [(r, pairs[n]) for r, n in zip(rows, names, strict=True) if n in pairs]
            a = np.concatenate([pa for _, (pa, _) in adapted], axis=0)
            b = np.zeros((ends[-1], a.shape[0]), np.float32)
            rank = 0
            for r, (pa, pb) in adapted:
                assert r is not None
                b[r[0] : r[1], rank : rank + pa.shape[0]] = pb
                rank += pa.shape[0]
        ta = backend.alloc(a.shape, DType.F32, layer)
        tb = backend.alloc(b.shape, DType.F32, layer)
        arrays += [(ta, a), (tb, b)]
        memo = Memo()
        for n, r in zip(names, rows, strict=True):
            if n in pairs:
                out[n] = Lora(ta, tb, r, names if r else (), memo)
    if not out:
        return out
    with backend.new_context() as ctx:
        for dst, src in arrays:
            ids = ctx.input(np.arange(src.shape[0], dtype=np.int32), DType.I32)
            ctx.forward(dst.set_rows(ids, ctx.input(src)))
        ctx.compute()
    return out
