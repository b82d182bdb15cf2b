"""MlxTensor: an `mx.array` (or a GGUF weight on MLX) with every op of the contract.

Ops only build MLX's lazy graph; nothing runs before the context's `compute`. Activations
are float32 as on the other backends: a float16/bfloat16 operand (an F16 cache, a dense
weight) is widened where an op reads it, and quantized weights go to MLX's quantized
kernels as they are (`linear`, `mul_mat_id`, `get_rows`). Images, rope and attention are
in `fused.py`. Every op also records itself on its context's tape (`reuse.py`), so that a
computed pass can be rerun with new inputs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import mlx.core as mx
from gguf import GGMLQuantizationType as Q

from herd.ml.backends.mlx import fused, reuse
from herd.ml.backends.mlx.quant import MlxWeight
from herd.ml.base import DType, Tensor, mul_mat_id_shape

if TYPE_CHECKING:
    from collections.abc import Sequence

    from herd.ml.backends.mlx.context import MlxContext

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_SQRT_HALF = math.sqrt(0.5)

# what a weight reports as its dtype: its GGUF type where the contract names it
_WEIGHT_DTYPE = {
    Q.F32: DType.F32,
    Q.F16: DType.F16,
    Q.BF16: DType.BF16,
    Q.I32: DType.I32,
    Q.Q8_0: DType.Q8_0,
    Q.Q4_0: DType.Q4_0,
}
_ARRAY_DTYPE = {mx.float16: DType.F16, mx.bfloat16: DType.BF16, mx.int32: DType.I32}
# what cast makes: MLX has no block types for activations, so a cast to Q8_0/Q4_0 (a
# quantized KV cache's) keeps F16, as the backend's `alloc` does for such caches
_CAST = {
    DType.F32: mx.float32,
    DType.F16: mx.float16,
    DType.BF16: mx.bfloat16,
    DType.I32: mx.int32,
    DType.Q8_0: mx.float16,
    DType.Q4_0: mx.float16,
}


def f32(t: MlxTensor) -> mx.array:
    """t's values as a float32 array (a quantized weight dequantized, lazily)."""
    if t.a is None:
        assert t.w is not None
        return t.w.to_dense(mx.float32)
    return t.a if t.a.dtype == mx.float32 else t.a.astype(mx.float32)


def packed(t: MlxTensor) -> tuple[mx.array, mx.array, mx.array | None, int, int] | None:
    """A quantized weight's (packed, scales, biases, group_size, bits); None otherwise."""
    q = t.w
    if q is None or q.packed is None or q.scales is None:
        return None
    return q.packed, q.scales, q.biases, q.group_size, q.bits


def _linear(x: mx.array, w: MlxWeight, stream: mx.Stream | None) -> mx.array:
    """x @ w.T in float32 on `stream` (None: the default one)."""
    if w.packed is not None:
        # float32 activations against the packed weight: MLX widens the scales itself
        y = mx.quantized_matmul(
            x, w.packed, w.scales, w.biases, True, w.group_size, w.bits, stream=stream
        )
        return y.astype(mx.float32)
    assert w.dense is not None
    return mx.matmul(x, w.dense.astype(mx.float32, stream=stream).T, stream=stream)


def ints(t: MlxTensor) -> mx.array:
    """t's values as an int32 array (indices, positions)."""
    a = t.a if t.a is not None else f32(t)
    return a if a.dtype == mx.int32 else a.astype(mx.int32)


def _ctx(*tensors: MlxTensor | None) -> MlxContext:
    for t in tensors:
        if t is not None and t.ctx is not None:
            return t.ctx
    raise AssertionError("op on tensors that belong to no context (weights only)")


class MlxTensor:
    """An MLX array in NumPy dimension order. A weight holds its `MlxWeight` (`w`), and
    `a` only when it is dense; a persistent tensor (KV cache) has `persistent` set and
    its `a` replaced by each write."""

    __slots__ = ("a", "w", "ctx", "persistent", "slot")

    def __init__(
        self,
        a: mx.array | None,
        ctx: MlxContext | None,
        w: MlxWeight | None = None,
        persistent: bool = False,
    ) -> None:
        self.a = a
        self.ctx = ctx
        self.w = w
        self.persistent = persistent
        self.slot = -1  # where the context's tape (reuse.py) holds it; -1: not on one

    def __repr__(self) -> str:
        return f"MlxTensor{self.shape}:{self.dtype.name}"

    @property
    def shape(self) -> tuple[int, ...]:
        if self.a is not None:
            return tuple(self.a.shape)
        assert self.w is not None
        return tuple(self.w.shape)

    @property
    def dtype(self) -> DType:
        if self.w is not None:
            return _WEIGHT_DTYPE.get(self.w.gguf_type, DType.OTHER)
        assert self.a is not None
        return _ARRAY_DTYPE.get(self.a.dtype, DType.F32)

    def _new(self, a: mx.array, *others: MlxTensor | None) -> MlxTensor:
        return MlxTensor(a, _ctx(self, *others))

    def _f32(self) -> mx.array:
        return f32(self)

    def _ints(self) -> mx.array:
        return ints(self)

    def _bcast(self, other: MlxTensor) -> mx.array:
        s, o = self.shape, other.shape
        n = len(s) - len(o)
        assert n >= 0 and all(b == 1 or b == a for a, b in zip(s[n:], o, strict=True)), (
            f"cannot broadcast {o} onto {s}"
        )
        return f32(other)

    # ---- elementwise ---------------------------------------------------------------
    def add(self, other: MlxTensor) -> MlxTensor:
        return self._new(f32(self) + self._bcast(other), other)

    def sub(self, other: MlxTensor) -> MlxTensor:
        return self._new(f32(self) - self._bcast(other), other)

    def mul(self, other: MlxTensor) -> MlxTensor:
        return self._new(f32(self) * self._bcast(other), other)

    def div(self, other: MlxTensor) -> MlxTensor:
        return self._new(f32(self) / self._bcast(other), other)

    def scale(self, s: float) -> MlxTensor:
        return self._new(f32(self) * s)

    def neg(self) -> MlxTensor:
        return self._new(-f32(self))

    def exp(self) -> MlxTensor:
        return self._new(mx.exp(f32(self)))

    def sqrt(self) -> MlxTensor:
        return self._new(mx.sqrt(f32(self)))

    def tanh(self) -> MlxTensor:
        return self._new(mx.tanh(f32(self)))

    def sigmoid(self) -> MlxTensor:
        return self._new(mx.sigmoid(f32(self)))

    def silu(self) -> MlxTensor:
        x = f32(self)
        return self._new(x * mx.sigmoid(x))

    def gelu(self) -> MlxTensor:
        return self._new(_gelu(f32(self)))

    def gelu_erf(self) -> MlxTensor:
        x = f32(self)
        return self._new(0.5 * x * (1.0 + mx.erf(x * _SQRT_HALF)))

    def relu(self) -> MlxTensor:
        return self._new(mx.maximum(f32(self), 0.0))

    def clamp(self, lo: float, hi: float) -> MlxTensor:
        return self._new(mx.clip(f32(self), lo, hi))

    def swiglu(self, up: MlxTensor) -> MlxTensor:
        assert self.shape == up.shape, f"gated activation: {self.shape} vs up {up.shape}"
        x = f32(self)
        return self._new(x * mx.sigmoid(x) * f32(up), up)

    def geglu(self, up: MlxTensor) -> MlxTensor:
        assert self.shape == up.shape, f"gated activation: {self.shape} vs up {up.shape}"
        return self._new(_gelu(f32(self)) * f32(up), up)

    # ---- reductions and norms over the last axis -------------------------------------
    def softmax(self, mask: MlxTensor | None = None, scale: float = 1.0) -> MlxTensor:
        x = f32(self)
        if scale != 1.0:
            x = x * scale
        if mask is not None:
            x = x + self._bcast(mask)
        return self._new(mx.softmax(x, axis=-1, precise=True), mask)

    def sum(self) -> MlxTensor:
        return self._new(mx.sum(f32(self), axis=-1, keepdims=True))

    def mean(self) -> MlxTensor:
        return self._new(mx.mean(f32(self), axis=-1, keepdims=True))

    def rms_norm(self, eps: float) -> MlxTensor:
        return self._new(mx.fast.rms_norm(f32(self), None, eps))

    def layer_norm(self, eps: float) -> MlxTensor:
        return self._new(mx.fast.layer_norm(f32(self), None, None, eps))

    def l2_norm(self, eps: float) -> MlxTensor:
        x = f32(self)
        norm = mx.sqrt(mx.sum(x * x, axis=-1, keepdims=True))
        return self._new(x / mx.maximum(norm, eps))

    # ---- matrix products -------------------------------------------------------------
    def linear(self, w: MlxTensor) -> MlxTensor:
        ws, xs = w.shape, self.shape
        assert len(ws) == 2 and ws[1] == xs[-1], f"linear: x {xs} @ w.T with w {ws}"
        x = f32(self)
        if w.w is not None and w.w.parts:
            # the weight's row slices on the CPU streams side by side (MLX's CPU kernels
            # are single-threaded): the columns of y in order, the same values
            streams = _ctx(self).backend.streams
            ys = [_linear(x, part, st) for part, st in zip(w.w.parts, streams, strict=True)]
            return self._new(mx.concatenate(ys, axis=-1), w)
        if w.w is not None:
            return self._new(_linear(x, w.w, None), w)
        return self._new(x @ f32(w).T, w)

    def linear_t(self, wt: MlxTensor) -> MlxTensor:
        (k, _), xs = wt.shape, self.shape
        assert len(xs) == 2 and xs[1] == k, f"linear_t: x {xs} @ wt {wt.shape}"
        return self._new(f32(self) @ f32(wt), wt)

    def matmul_t(self, other: MlxTensor) -> MlxTensor:
        a, b = self.shape, other.shape
        assert len(a) == 3 and len(b) == 3 and a[2] == b[2], f"matmul_t: {a} x {b}"
        groups, rem = divmod(a[0], b[0])
        assert rem == 0, f"matmul_t: batch {a[0]} not a multiple of {b[0]}"
        # consecutive groups of B/Bo batches share one `other` batch: (Bo, G*T, K) @ (Bo, K, S)
        x = f32(self).reshape(b[0], groups * a[1], a[2])
        out = x @ f32(other).transpose(0, 2, 1)
        return self._new(out.reshape(a[0], a[1], b[1]), other)

    def mul_mat_id(self, w: MlxTensor, ids: MlxTensor) -> MlxTensor:
        xs, ws, its = self.shape, w.shape, ids.shape
        mul_mat_id_shape(xs, ws, its)
        t, k = its
        # each (token, slot) pair multiplies one row of x by one expert: x as a batch of
        # (T * Kx) matrices of one row, gathered by lhs, experts gathered by rhs (ids)
        x = f32(self).reshape(t, xs[1], 1, xs[2])
        lhs = mx.arange(t, dtype=mx.uint32)[:, None] * xs[1]
        if xs[1] != 1:
            lhs = lhs + mx.arange(k, dtype=mx.uint32)[None, :]
        lhs = mx.broadcast_to(lhs, (t, k))
        rhs = ints(ids).astype(mx.uint32)
        q = packed(w)
        if q is not None:
            wq, scales, biases, group, bits = q
            out = mx.gather_qmm(x, wq, scales, biases, lhs, rhs, True, group, bits)
        else:
            out = mx.gather_mm(x, f32(w).swapaxes(-1, -2), lhs, rhs)
        return self._new(out.reshape(t, k, ws[1]).astype(mx.float32), w, ids)  # (T, K, O)

    # ---- gathers ---------------------------------------------------------------------
    def get_rows(self, ids: MlxTensor) -> MlxTensor:
        s = self.shape
        idx = ints(ids).reshape(-1)
        q = packed(self)
        if q is not None:
            assert len(s) == 2, f"get_rows of a quantized {s}: rows must be 2-D"
            # only the rows asked for are dequantized, not the whole table
            wq, scales, biases, group, bits = q
            bias_rows = None if biases is None else biases[idx]
            rows = mx.dequantize(wq[idx], scales[idx], bias_rows, group, bits)
            rows = rows.astype(mx.float32)
        else:
            table = self.a if self.a is not None else f32(self)
            rows = mx.take(table, idx, axis=0)
            if rows.dtype != mx.int32:  # integers stay integers (positions), as on ggml
                rows = rows.astype(mx.float32)
        return self._new(rows.reshape(*ids.shape, *s[1:]), ids)

    def top_k(self, k: int) -> MlxTensor:
        assert 0 < k <= self.shape[-1], f"top_k: k={k} of {self.shape}"
        # ascending sort of the negated values: largest first
        order = mx.argsort(-f32(self), axis=-1)[..., :k]
        return self._new(order.astype(mx.int32))

    def take_along(self, ids: MlxTensor) -> MlxTensor:
        assert self.shape[:-1] == ids.shape[:-1], (
            f"take_along: ids {ids.shape} for rows of {self.shape}"
        )
        return self._new(mx.take_along_axis(f32(self), ints(ids), axis=-1), ids)

    # ---- writes into persistent tensors (KV cache) -------------------------------------
    def set_rows(self, ids: MlxTensor, src: MlxTensor) -> MlxTensor:
        s = self.shape
        assert self.persistent and self.a is not None, f"set_rows into {self}: not persistent"
        assert len(ids.shape) == 1, f"set_rows: ids must be 1-D, got {ids.shape}"
        n = ids.shape[0]
        assert math.prod(src.shape) == n * math.prod(s[1:]), (
            f"set_rows: src {src.shape} does not fill {n} rows of {s[1:]}"
        )
        values = f32(src).reshape(n, *s[1:]).astype(self.a.dtype)
        # slice assignment replaces the array this tensor holds (MLX updates the buffer in
        # place when nothing else holds it): later reads, in this pass and later ones, see it
        self.a[ints(ids)] = values
        return self._wrote(ids, src)

    def set_columns(self, ids: MlxTensor, src: MlxTensor) -> MlxTensor:
        s = self.shape
        assert self.persistent and self.a is not None, f"set_columns into {self}: not persistent"
        t = ids.shape[0]
        assert len(ids.shape) == 1 and src.shape == s[:-1] + (t,), (
            f"set_columns: src {src.shape}, ids {ids.shape} into {s}"
        )
        self.a[..., ints(ids)] = f32(src).astype(self.a.dtype)
        return self._wrote(ids, src)

    def _wrote(self, ids: MlxTensor, src: MlxTensor) -> MlxTensor:
        c = _ctx(ids, src)
        c.written.append(self)  # evaluated by compute, whether forwarded or not
        return MlxTensor(self.a, c)

    # ---- images (NCHW), rope, attention: fused.py ----------------------------------------
    conv2d, avg_pool2d = fused.conv2d, fused.avg_pool2d
    rope = fused.rope
    scaled_dot_product_attention = fused.scaled_dot_product_attention

    # ---- shapes ----------------------------------------------------------------------
    def _data(self) -> mx.array:
        """The array as it is stored (F16 stays F16) for ops that only move elements."""
        return self.a if self.a is not None else f32(self)

    def reshape(self, *shape: int) -> MlxTensor:
        if -1 in shape:
            known = math.prod(d for d in shape if d != -1)
            shape = tuple(math.prod(self.shape) // known if d == -1 else d for d in shape)
        assert math.prod(shape) == math.prod(self.shape), f"reshape {self.shape} -> {shape}"
        return self._new(self._data().reshape(shape))

    def slice(self, axis: int, start: int, stop: int) -> MlxTensor:
        s = self.shape
        axis = axis % len(s)
        start, stop, _ = slice(start, stop).indices(s[axis])
        index = [slice(None)] * len(s)
        index[axis] = slice(start, max(start, stop))
        return self._new(self._data()[tuple(index)])

    def permute(self, *axes: int) -> MlxTensor:
        assert len(axes) == len(self.shape), f"permute {self.shape} by {axes}"
        return self._new(mx.transpose(self._data(), axes))

    def contiguous(self) -> MlxTensor:
        return self._new(mx.contiguous(self._data()))

    def concat(self, other: MlxTensor, axis: int) -> MlxTensor:
        a, b = self._data(), other._data()
        if a.dtype != b.dtype:
            a, b = f32(self), f32(other)
        return self._new(mx.concatenate([a, b], axis=axis), other)

    def concat_rows(self, others: Sequence[MlxTensor]) -> MlxTensor:
        parts = [self, *others]
        if len({p._data().dtype for p in parts}) == 1:
            return self._new(mx.concatenate([p._data() for p in parts]), *others)
        return self._new(mx.concatenate([f32(p) for p in parts]), *others)

    def repeat(self, *shape: int) -> MlxTensor:
        s = self.shape
        assert len(shape) == len(s) and all(d % e == 0 for d, e in zip(shape, s, strict=True)), (
            f"repeat {s} -> {shape}"
        )
        return self._new(mx.tile(self._data(), [d // e for d, e in zip(shape, s, strict=True)]))

    def cast(self, dtype: DType) -> MlxTensor:
        target = _CAST.get(dtype)
        assert target is not None, f"cast to {dtype.name}: not a type MLX computes with"
        a = self._data()
        return self._new(a if a.dtype == target else a.astype(target))


def _gelu(x: mx.array) -> mx.array:
    """GELU, tanh approximation, composed in float32."""
    return 0.5 * x * (1.0 + mx.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


# every op records itself on its context's tape, so the pass can be replayed (reuse.py)
for _name in [n for n, v in vars(Tensor).items() if callable(v) and not n.startswith("_")] + [
    "scaled_dot_product_attention"
]:
    setattr(MlxTensor, _name, reuse.recorded(_name, getattr(MlxTensor, _name)))
