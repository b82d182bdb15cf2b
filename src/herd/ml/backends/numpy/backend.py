"""Eager float32 NumPy backend.

Weights are dequantized from their GGUF type once, on first use, with the `gguf`
package's reference dequantizers. Every op computes immediately, so `compute` only
converts results. This is the oracle for the other backends: clarity over speed, but no
needless copies on the decode path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from herd.errors import BackendError, GGUFError, WeightError
from herd.gguf import GGUFFile
from herd.ml.base import (
    BackendOptions,
    CacheConfig,
    DeviceInfo,
    DType,
    RopeOptions,
    Tensor,
    context_of,
    mul_mat_id_shape,
)
from herd.ml.rope import apply_rope

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _erf(x: np.ndarray) -> np.ndarray:
    # NumPy has no erf; this Chebyshev fit (Numerical Recipes' erfc) has relative error
    # below 1.2e-7, under float32 resolution, and avoids a SciPy dependency.
    z = np.abs(x.astype(np.float64))
    t = 1.0 / (1.0 + 0.5 * z)
    poly = (
        -z * z
        - 1.26551223
        + t
        * (
            1.00002368
            + t
            * (
                0.37409196
                + t
                * (
                    0.09678418
                    + t
                    * (
                        -0.18628806
                        + t
                        * (
                            0.27886807
                            + t
                            * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))
                        )
                    )
                )
            )
        )
    )
    return (np.sign(x) * (1.0 - t * np.exp(poly))).astype(np.float32)


Pair = int | tuple[int, int]


def _pair(v: Pair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _windows(
    x: np.ndarray,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pad: tuple[int, int],
    dilation: tuple[int, int],
) -> np.ndarray:
    """Every (KH, KW) window of x (N, C, H, W) zero-padded: a read-only view (N, C, OH,
    OW, KH, KW), no copy beyond the padding."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, pad, dilation
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    n, c, h, w = x.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    assert oh > 0 and ow > 0, f"window ({kh}, {kw}) dilated ({dh}, {dw}) larger than {x.shape}"
    s = x.strides
    return np.lib.stride_tricks.as_strided(
        x,
        (n, c, oh, ow, kh, kw),
        (s[0], s[1], s[2] * sh, s[3] * sw, s[2] * dh, s[3] * dw),
        writeable=False,
    )


class NumpyTensor:
    __slots__ = ("a", "_ctx")

    def __init__(self, a: np.ndarray, ctx: NumpyContext | None) -> None:
        self.a = a
        self._ctx = ctx

    def __repr__(self) -> str:
        return f"NumpyTensor{self.a.shape}"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.a.shape)

    @property
    def dtype(self) -> DType:
        return DType.I32 if self.a.dtype.kind in "iu" else DType.F32

    @property
    def ctx(self) -> NumpyContext | None:
        return self._ctx

    def _new(self, a: np.ndarray, *others: Any) -> NumpyTensor:
        return NumpyTensor(a, context_of(self, *others))

    def _check_bcast(self, other: NumpyTensor) -> None:
        assert np.broadcast_shapes(self.a.shape, other.a.shape) == self.a.shape, (
            f"cannot broadcast {other.a.shape} onto {self.a.shape}"
        )

    # elementwise
    def add(self, other: NumpyTensor) -> NumpyTensor:
        self._check_bcast(other)
        return self._new(self.a + other.a, other)

    def sub(self, other: NumpyTensor) -> NumpyTensor:
        self._check_bcast(other)
        return self._new(self.a - other.a, other)

    def mul(self, other: NumpyTensor) -> NumpyTensor:
        self._check_bcast(other)
        return self._new(self.a * other.a, other)

    def div(self, other: NumpyTensor) -> NumpyTensor:
        self._check_bcast(other)
        return self._new(self.a / other.a, other)

    def scale(self, s: float) -> NumpyTensor:
        return self._new(self.a * np.float32(s))

    def neg(self) -> NumpyTensor:
        return self._new(-self.a)

    def exp(self) -> NumpyTensor:
        return self._new(np.exp(self.a))

    def sqrt(self) -> NumpyTensor:
        return self._new(np.sqrt(self.a))

    def tanh(self) -> NumpyTensor:
        return self._new(np.tanh(self.a))

    def sigmoid(self) -> NumpyTensor:
        return self._new(1.0 / (1.0 + np.exp(-self.a)))

    def silu(self) -> NumpyTensor:
        return self._new(self.a / (1.0 + np.exp(-self.a)))

    def gelu(self) -> NumpyTensor:
        x = self.a
        return self._new(0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))))

    def gelu_erf(self) -> NumpyTensor:
        x = self.a
        return self._new(0.5 * x * (1.0 + _erf(x / np.float32(math.sqrt(2.0)))))

    def relu(self) -> NumpyTensor:
        return self._new(np.maximum(self.a, 0.0))

    def clamp(self, lo: float, hi: float) -> NumpyTensor:
        return self._new(np.clip(self.a, lo, hi))

    def swiglu(self, up: NumpyTensor) -> NumpyTensor:
        return self.silu().mul(up)

    def geglu(self, up: NumpyTensor) -> NumpyTensor:
        return self.gelu().mul(up)

    # reductions
    def softmax(self, mask: NumpyTensor | None = None, scale: float = 1.0) -> NumpyTensor:
        x = self.a * np.float32(scale) if scale != 1.0 else self.a
        if mask is not None:
            x = x + mask.a
        x = x - x.max(axis=-1, keepdims=True)
        e = np.exp(x)
        return self._new(e / e.sum(axis=-1, keepdims=True), mask)

    def sum(self) -> NumpyTensor:
        return self._new(self.a.sum(axis=-1, keepdims=True))

    def mean(self) -> NumpyTensor:
        return self._new(self.a.mean(axis=-1, keepdims=True))

    def rms_norm(self, eps: float) -> NumpyTensor:
        x = self.a
        return self._new(x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)))

    def layer_norm(self, eps: float) -> NumpyTensor:
        x = self.a - self.a.mean(axis=-1, keepdims=True)
        return self._new(x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)))

    def l2_norm(self, eps: float) -> NumpyTensor:
        norm = np.sqrt(np.sum(self.a * self.a, axis=-1, keepdims=True))
        return self._new(self.a / np.maximum(norm, np.float32(eps)))

    # products
    def linear(self, w: NumpyTensor) -> NumpyTensor:
        assert w.a.ndim == 2 and w.a.shape[1] == self.a.shape[-1], (
            f"linear: x {self.a.shape} @ w.T with w {w.a.shape}"
        )
        return self._new(self.a @ w.a.T, w)

    def linear_t(self, wt: NumpyTensor) -> NumpyTensor:
        assert self.a.ndim == 2 and wt.a.ndim == 2 and wt.a.shape[0] == self.a.shape[1], (
            f"linear_t: x {self.a.shape} @ wt {wt.a.shape}"
        )
        return self._new(self.a @ wt.a, wt)

    def matmul_t(self, other: NumpyTensor) -> NumpyTensor:
        a, b = self.a, other.a
        assert a.ndim == 3 and b.ndim == 3 and a.shape[2] == b.shape[2], (
            f"matmul_t: {a.shape} x {b.shape}"
        )
        groups, rem = divmod(a.shape[0], b.shape[0])
        assert rem == 0, f"matmul_t: batch {a.shape[0]} not a multiple of {b.shape[0]}"
        # (Bo, G*T, K) @ (Bo, K, S): one BLAS call per shared `other` batch
        ag = a.reshape(b.shape[0], groups * a.shape[1], a.shape[2])
        out = np.matmul(ag, b.transpose(0, 2, 1))
        return self._new(out.reshape(a.shape[0], a.shape[1], b.shape[1]), other)

    def mul_mat_id(self, w: NumpyTensor, ids: NumpyTensor) -> NumpyTensor:
        x, wa, ia = self.a, w.a, ids.a
        mul_mat_id_shape(x.shape, wa.shape, ia.shape)
        assert ia.size == 0 or 0 <= ia.min() <= ia.max() < wa.shape[0], (
            f"mul_mat_id: ids outside [0, {wa.shape[0]})"
        )
        xs = np.broadcast_to(x, ia.shape + x.shape[2:])  # (T, K, I)
        out = np.empty(ia.shape + wa.shape[1:2], dtype=np.float32)  # (T, K, O)
        # one matmul per expert over the rows routed to it, not a (T, K, O, I) gather
        for e in np.unique(ia):
            t, k = np.nonzero(ia == e)
            out[t, k] = xs[t, k] @ wa[e].T
        return self._new(out, w, ids)

    def get_rows(self, ids: NumpyTensor) -> NumpyTensor:
        rows = self.a[ids.a]  # integers stay integers (positions), as on ggml
        if rows.dtype != np.int32:
            rows = rows.astype(np.float32, copy=False)
        return self._new(rows, ids)

    def top_k(self, k: int) -> NumpyTensor:
        assert 0 < k <= self.a.shape[-1], f"top_k: k={k} of {self.a.shape}"
        # stable sort of the negated values: largest first, equal values by index
        order = np.argsort(-self.a, axis=-1, kind="stable")[..., :k]
        return self._new(order.astype(np.int32))

    def take_along(self, ids: NumpyTensor) -> NumpyTensor:
        assert self.a.shape[:-1] == ids.a.shape[:-1], (
            f"take_along: ids {ids.a.shape} for rows of {self.a.shape}"
        )
        out = np.take_along_axis(self.a, ids.a.astype(np.intp), axis=-1)
        return self._new(out.astype(np.float32, copy=False), ids)

    def set_rows(self, ids: NumpyTensor, src: NumpyTensor) -> NumpyTensor:
        self.a[ids.a] = src.a.reshape((len(ids.a),) + self.a.shape[1:])
        return NumpyTensor(self.a, context_of(ids, src))

    def set_columns(self, ids: NumpyTensor, src: NumpyTensor) -> NumpyTensor:
        self.a[..., ids.a] = src.a.reshape(self.a.shape[:-1] + (len(ids.a),))
        return NumpyTensor(self.a, context_of(ids, src))

    # images (NCHW)
    def conv2d(
        self, w: NumpyTensor, stride: Pair = 1, padding: Pair = 0, dilation: Pair = 1
    ) -> NumpyTensor:
        x, k = self.a, w.a
        assert x.ndim == 4 and k.ndim == 4 and x.shape[1] == k.shape[1], (
            f"conv2d: x {x.shape} with w {k.shape}"
        )
        (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
        cout, _, kh, kw = k.shape
        assert min(sh, sw, dh, dw) >= 1 and min(ph, pw) >= 0, (
            f"conv2d: stride {stride}, padding {padding}, dilation {dilation}"
        )
        win = _windows(x, (kh, kw), (sh, sw), (ph, pw), (dh, dw))  # (N, C, OH, OW, KH, KW)
        n, c, oh, ow = win.shape[:4]
        cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)  # im2col
        y = cols @ k.reshape(cout, c * kh * kw).T  # (N*OH*OW, Cout)
        # a view, as on ggml: (N, OH, OW, Cout) patch rows are its transpose, with no copy
        return self._new(y.reshape(n, oh, ow, cout).transpose(0, 3, 1, 2), w)

    def avg_pool2d(
        self, kernel: Pair, stride: Pair | None = None, padding: Pair = 0
    ) -> NumpyTensor:
        (kh, kw), (ph, pw) = _pair(kernel), _pair(padding)
        sh, sw = _pair(stride) if stride is not None else (kh, kw)
        assert self.a.ndim == 4, f"avg_pool2d of {self.a.shape}: expected (N, C, H, W)"
        assert min(kh, kw, sh, sw) >= 1 and 0 <= ph <= kh // 2 and 0 <= pw <= kw // 2, (
            f"avg_pool2d: kernel {kernel}, stride {stride}, padding {padding}"
        )
        win = _windows(self.a, (kh, kw), (sh, sw), (ph, pw), (1, 1))  # (N, C, OH, OW, KH, KW)
        # summed in float32 row by row, then divided by the whole window, padded zeros
        # included: torch's CPU kernel and ggml's, in their order, hence bit for bit theirs
        acc = np.zeros(win.shape[:4], np.float32)
        for i in range(kh):
            for j in range(kw):
                acc += win[..., i, j]
        return self._new(acc / np.float32(kh * kw))

    # shapes
    def reshape(self, *shape: int) -> NumpyTensor:
        return self._new(self.a.reshape(shape))

    def slice(self, axis: int, start: int, stop: int) -> NumpyTensor:
        index = [slice(None)] * self.a.ndim
        index[axis] = slice(start, stop)
        return self._new(self.a[tuple(index)])

    def permute(self, *axes: int) -> NumpyTensor:
        return self._new(self.a.transpose(axes))

    def contiguous(self) -> NumpyTensor:
        return self._new(np.ascontiguousarray(self.a))

    def concat(self, other: NumpyTensor, axis: int) -> NumpyTensor:
        return self._new(np.concatenate([self.a, other.a], axis=axis), other)

    def concat_rows(self, others: Sequence[NumpyTensor]) -> NumpyTensor:
        return self._new(np.concatenate([self.a, *(o.a for o in others)]), *others)

    def repeat(self, *shape: int) -> NumpyTensor:
        reps = [s // d for s, d in zip(shape, self.a.shape, strict=True)]
        return self._new(np.tile(self.a, reps))

    def cast(self, dtype: DType) -> NumpyTensor:
        target = np.int32 if dtype == DType.I32 else np.float32
        return self._new(self.a.astype(target))

    def rope(
        self, positions: NumpyTensor, opts: RopeOptions, freq_factors: NumpyTensor | None = None
    ) -> NumpyTensor:
        ff = freq_factors.a if freq_factors is not None else None
        return self._new(apply_rope(self.a, positions.a, opts, ff), positions)


class NumpyContext:
    def input(self, array: np.ndarray | Sequence[Any], dtype: DType = DType.F32) -> NumpyTensor:
        target = np.int32 if dtype == DType.I32 else np.float32
        return NumpyTensor(np.asarray(array, dtype=target), self)

    def attach(self, t: NumpyTensor) -> NumpyTensor:
        return NumpyTensor(t.a, self)

    def forward(self, *tensors: NumpyTensor) -> None:
        pass  # eager: side effects already happened

    def compute(self, *outputs: NumpyTensor) -> list[np.ndarray]:
        return [np.asarray(t.a) for t in outputs]

    def close(self) -> None:
        pass

    def __enter__(self) -> NumpyContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_DIRECT = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.I32: np.int32,
}


class NumpyBackend:
    name = "numpy"

    def __init__(self, gguf: GGUFFile, options: BackendOptions | None = None) -> None:
        self.gguf = gguf
        self.options = options or BackendOptions()
        self._weights: dict[str, NumpyTensor] = {}

    def stack(self, names: Sequence[str]) -> None:
        """Not stacked: NumPy's matmul costs the same in one piece or three."""
        return None

    def has_weight(self, name: str) -> bool:
        return name in self.gguf.tensors

    def weight(self, name: str) -> NumpyTensor:
        if name not in self.gguf.tensors:  # a model asking for what the file lacks
            raise WeightError(f"{name}: missing from the model file")
        if name not in self._weights:
            self._weights[name] = NumpyTensor(self._load(name), None)
        return self._weights[name]

    def _load(self, name: str) -> np.ndarray:
        info = self.gguf.tensors[name]
        raw = self.gguf.raw(name)
        if info.type in _DIRECT:
            a = raw.view(_DIRECT[info.type]).reshape(info.shape)
            return a if a.dtype == np.int32 else a.astype(np.float32)
        try:
            rows = raw.reshape(info.n_elements // info.shape[-1], -1)
            return np.asarray(dequantize(rows, info.type), dtype=np.float32).reshape(info.shape)
        except NotImplementedError:
            raise GGUFError(
                f"{self.gguf.path}: tensor {name} has type {info.type.name}, "
                "which the numpy backend cannot dequantize"
            ) from None

    def alloc(self, shape: tuple[int, ...], dtype: DType, layer: int | None = None) -> NumpyTensor:
        # fp32 whatever was asked: this backend is the exact reference
        return NumpyTensor(np.zeros(shape, dtype=np.float32), None)

    def host_view(self, t: Tensor) -> np.ndarray:
        """`HostTensors`: every tensor here is a NumPy array."""
        assert isinstance(t, NumpyTensor)
        return t.a

    def new_context(self) -> NumpyContext:
        return NumpyContext()

    def cache_config(self) -> CacheConfig:
        # ggml's layout and padding: the oracle attends the same cells, in the same order
        return CacheConfig(v_transposed=True, pad=128, mask_dtype=DType.F32, flash_attention=False)

    def devices(self) -> list[DeviceInfo]:
        return default_devices()

    def close(self) -> None:
        self._weights.clear()


def default_devices(options: BackendOptions | None = None) -> list[DeviceInfo]:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return [DeviceInfo("cpu", "cpu", total, free)]


def open_numpy(gguf: GGUFFile, options: BackendOptions | None = None) -> NumpyBackend:
    if not gguf.tensors:
        raise BackendError(f"{gguf.path}: no tensors")
    return NumpyBackend(gguf, options)
