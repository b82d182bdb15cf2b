"""OnnxTensor: a value of a context's recorded ONNX graph, with every op of the contract.

Ops only record nodes (`OnnxContext.g`); nothing runs before the context's `compute`.
Activations are float32 as on the other backends: an F16 operand (an F16 cache) is cast
where an op reads it. Weights are float32 graph inputs bound from the backend's memory;
`linear` multiplies by them transposed inside Gemm (transB), so the one array serves
both `get_rows` and `linear` (tied embeddings). Images and rope are in `ops.py`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from herd.ml.backends.onnx import ops, quant
from herd.ml.backends.onnx.dims import Dim
from herd.ml.backends.onnx.fused import attention_in_place
from herd.ml.backends.onnx.graph import ELEM
from herd.ml.base import DType, mul_mat_id_shape

if TYPE_CHECKING:
    from collections.abc import Sequence

    from herd.ml.backends.onnx.context import OnnxContext

# what a cast makes: no block types for activations (a quantized cache's cast keeps F16,
# as the backend's `alloc` does for such caches)
_CAST = {
    DType.F32: DType.F32,
    DType.F16: DType.F16,
    DType.BF16: DType.BF16,
    DType.I32: DType.I32,
    DType.Q8_0: DType.F16,
    DType.Q4_0: DType.F16,
}


def _clamp(i: int, size: int) -> int:
    """A slice bound within [0, size] as `slice.indices` makes it, keeping Dims (dims.py).
    A bound equal to a symbolic size stays the int it is (a `slice_bound` input): a block's
    last cell is then the same input whether or not it is the attended range's last."""
    if i < 0:
        i = max(0, size + i)
    return size if i > size else i


def _ctx(*tensors: OnnxTensor | None) -> OnnxContext:
    for t in tensors:
        if t is not None and t.ctx is not None:
            return t.ctx
    raise AssertionError("op on tensors that belong to no context (weights only)")


class OnnxTensor:
    """A graph value (`name`) in NumPy dimension order, or a backend-owned array with no
    context: a weight (`host`, `kind` "weight") or a persistent tensor (KV cache, `kind`
    "cache"). `seen`: on a context's view of a persistent tensor (`attach`), how many of
    the context's writes precede it (the view reads the tensor as they left it)."""

    __slots__ = (
        "name",
        "_shape",
        "_dtype",
        "ctx",
        "host",
        "kind",
        "seen",
        "gguf_dtype",
        "q",
        "wname",
        "rows_of",
        "normed",
        "rotated",
    )

    def __init__(
        self,
        name: str | None,
        shape: tuple[int, ...],
        dtype: DType,
        ctx: OnnxContext | None,
        host: np.ndarray | None = None,
        kind: str = "",
        seen: int = -1,
    ) -> None:
        self.name, self._shape, self._dtype, self.ctx = name, tuple(shape), dtype, ctx
        self.host, self.kind, self.seen = host, kind, seen
        self.gguf_dtype: DType | None = None  # a weight's type in the file
        # a weight: its name, and its blocks as MatMulNBits reads them (quant.py), if they map
        self.wname: str = ""
        self.q: Any = None
        # read from a cache: (the cache as this context saw it, first cell, end cell) at
        # record time, for attention that uses the cache itself (fused.py)
        self.rows_of: tuple[OnnxTensor, int, int] | None = None
        # an rms_norm's output: (its input's value, eps), so that a scale multiplied in
        # next becomes the norm's own (one node, not two)
        self.normed: tuple[str, float] | None = None
        # a RotaryEmbedding's output: (its input as (1, T, H*D), cos, sin, interleaved), so
        # that in-place attention can rotate inside its own kernel (fused.py)
        self.rotated: tuple[str, str, str, bool] | None = None

    def __repr__(self) -> str:
        return f"OnnxTensor{self._shape}:{self._dtype.name}"

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> DType:
        return self.gguf_dtype or self._dtype

    @property
    def heads_first(self) -> bool:
        """A cache the backend keeps as (1, H, cells, D) behind its (cells, H, D) shape."""
        return (
            self.kind == "cache"
            and self.host is not None
            and self.host.ndim == len(self._shape) + 1
        )

    # ---- helpers ----------------------------------------------------------------------
    def _out(
        self, name: str, shape: tuple[int, ...], *others: Any, dtype: DType = DType.F32
    ) -> OnnxTensor:
        return OnnxTensor(name, shape, dtype, _ctx(self, *others))

    def _unary(self, op: str, **attrs: Any) -> OnnxTensor:
        c = _ctx(self)
        return self._out(c.g.op(op, [c.f32(self)], **attrs), self.shape)

    def _binary(self, op: str, other: OnnxTensor) -> OnnxTensor:
        s, o = self.shape, other.shape
        n = len(s) - len(o)
        assert n >= 0 and all(b == 1 or b == a for a, b in zip(s[n:], o, strict=True)), (
            f"cannot broadcast {o} onto {s}"
        )
        c = _ctx(self, other)
        return self._out(c.g.op(op, [c.f32(self), c.f32(other)]), s, other)

    # ---- elementwise ------------------------------------------------------------------
    def add(self, other: OnnxTensor) -> OnnxTensor:
        return self._binary("Add", other)

    def sub(self, other: OnnxTensor) -> OnnxTensor:
        return self._binary("Sub", other)

    def mul(self, other: OnnxTensor) -> OnnxTensor:
        if self.normed is not None and other.shape == self.shape[-1:]:  # a norm's weight
            c = _ctx(self, other)
            x, eps = self.normed
            y = c.g.op("SimplifiedLayerNormalization", [x, c.f32(other)], axis=-1, epsilon=eps)
            return self._out(y, self.shape, other)
        return self._binary("Mul", other)

    def div(self, other: OnnxTensor) -> OnnxTensor:
        return self._binary("Div", other)

    def scale(self, s: float) -> OnnxTensor:
        c = _ctx(self)
        return self._out(c.g.op("Mul", [c.f32(self), c.g.const(s, np.float32)]), self.shape)

    def neg(self) -> OnnxTensor:
        return self._unary("Neg")

    def exp(self) -> OnnxTensor:
        return self._unary("Exp")

    def sqrt(self) -> OnnxTensor:
        return self._unary("Sqrt")

    def tanh(self) -> OnnxTensor:
        return self._unary("Tanh")

    def sigmoid(self) -> OnnxTensor:
        return self._unary("Sigmoid")

    def silu(self) -> OnnxTensor:
        c = _ctx(self)
        x = c.f32(self)
        return self._out(c.g.op("Mul", [x, c.g.op("Sigmoid", [x])]), self.shape)

    def gelu(self) -> OnnxTensor:
        return self._unary("Gelu", approximate="tanh")

    def gelu_erf(self) -> OnnxTensor:
        return self._unary("Gelu")

    def relu(self) -> OnnxTensor:
        return self._unary("Relu")

    def clamp(self, lo: float, hi: float) -> OnnxTensor:
        c = _ctx(self)
        lo_c, hi_c = c.g.const(lo, np.float32), c.g.const(hi, np.float32)
        return self._out(c.g.op("Clip", [c.f32(self), lo_c, hi_c]), self.shape)

    def _gated(self, act: str, up: OnnxTensor) -> OnnxTensor:
        assert self.shape == up.shape, f"gated activation: {self.shape} vs up {up.shape}"
        c = _ctx(self, up)
        return self._out(c.g.op("Mul", [act, c.f32(up)]), self.shape, up)

    def swiglu(self, up: OnnxTensor) -> OnnxTensor:
        c = _ctx(self, up)
        x = c.f32(self)
        return self._gated(c.g.op("Mul", [x, c.g.op("Sigmoid", [x])]), up)

    def geglu(self, up: OnnxTensor) -> OnnxTensor:
        c = _ctx(self, up)
        return self._gated(c.g.op("Gelu", [c.f32(self)], approximate="tanh"), up)

    # ---- reductions and norms over the last axis ----------------------------------------
    def softmax(self, mask: OnnxTensor | None = None, scale: float = 1.0) -> OnnxTensor:
        c = _ctx(self, mask)
        x = c.f32(self)
        if scale != 1.0:
            x = c.g.op("Mul", [x, c.g.const(scale, np.float32)])
        if mask is not None:
            x = c.g.op("Add", [x, c.f32(mask)])
        return self._out(c.g.op("Softmax", [x], axis=-1), self.shape, mask)

    def _reduce(self, op: str, x: str | None = None) -> str:
        c = _ctx(self)
        return c.g.op(op, [x or c.f32(self), c.g.const([-1])], keepdims=1)

    def sum(self) -> OnnxTensor:
        return self._out(self._reduce("ReduceSum"), self.shape[:-1] + (1,))

    def mean(self) -> OnnxTensor:
        return self._out(self._reduce("ReduceMean"), self.shape[:-1] + (1,))

    def rms_norm(self, eps: float) -> OnnxTensor:
        # ORT's SimplifiedLayerNormalization (registered in the ONNX domain): one kernel
        # where the composed form ran five nodes per norm
        c = _ctx(self)
        ones = c.g.const(np.ones(self.shape[-1]), np.float32)
        x = c.f32(self)
        y = c.g.op("SimplifiedLayerNormalization", [x, ones], axis=-1, epsilon=eps)
        out = self._out(y, self.shape)
        out.normed = (x, eps)
        return out

    def layer_norm(self, eps: float) -> OnnxTensor:
        c = _ctx(self)
        ones = c.g.const(np.ones(self.shape[-1]), np.float32)
        y = c.g.op("LayerNormalization", [c.f32(self), ones], axis=-1, epsilon=eps)
        return self._out(y, self.shape)

    def l2_norm(self, eps: float) -> OnnxTensor:
        c = _ctx(self)
        x = c.f32(self)
        norm = c.g.op("Sqrt", [self._reduce("ReduceSum", c.g.op("Mul", [x, x]))])
        floor = c.g.op("Max", [norm, c.g.const(eps, np.float32)])
        return self._out(c.g.op("Div", [x, floor]), self.shape)

    # ---- matrix products ----------------------------------------------------------------
    def linear(self, w: OnnxTensor) -> OnnxTensor:
        ws, xs = w.shape, self.shape
        assert len(ws) == 2 and ws[1] == xs[-1], f"linear: x {xs} @ w.T with w {ws}"
        c = _ctx(self, w)
        if w.q is not None and w.kind == "weight":  # MatMulNBits takes x of any rank
            return self._out(c.linear2d(c.f32(self), w, len(xs)), (*xs[:-1], ws[0]), w)
        rows = math.prod(xs[:-1])
        x2 = c.g.op("Reshape", [c.f32(self), c.g.const([rows, xs[-1]])])
        y = c.linear2d(x2, w)
        return self._out(c.g.op("Reshape", [y, c.g.const([*xs[:-1], ws[0]])]), (*xs[:-1], ws[0]), w)

    def linear_t(self, wt: OnnxTensor) -> OnnxTensor:
        (k, n), xs = wt.shape, self.shape
        assert len(xs) == 2 and xs[1] == k, f"linear_t: x {xs} @ wt {wt.shape}"
        c = _ctx(self, wt)
        return self._out(c.g.op("MatMul", [c.f32(self), c.f32(wt)]), (xs[0], n), wt)

    def matmul_t(self, other: OnnxTensor) -> OnnxTensor:
        a, b = self.shape, other.shape
        assert len(a) == 3 and len(b) == 3 and a[2] == b[2], f"matmul_t: {a} x {b}"
        groups, rem = divmod(a[0], b[0])
        assert rem == 0, f"matmul_t: batch {a[0]} not a multiple of {b[0]}"
        c = _ctx(self, other)
        # consecutive groups of B/Bo batches share one `other` batch: (Bo, G*T, K) @ (Bo, K, S)
        x = c.f32(self)
        if groups > 1:
            x = c.g.op("Reshape", [x, c.g.const([b[0], groups * a[1], a[2]])])
        bt = c.g.op("Transpose", [c.f32(other)], perm=[0, 2, 1])
        y = c.g.op("MatMul", [x, bt])
        if groups > 1:
            y = c.g.op("Reshape", [y, c.g.const([a[0], a[1], b[1]])])
        return self._out(y, (a[0], a[1], b[1]), other)

    def mul_mat_id(self, w: OnnxTensor, ids: OnnxTensor) -> OnnxTensor:
        xs, ws, its = self.shape, w.shape, ids.shape
        mul_mat_id_shape(xs, ws, its)
        c = _ctx(self, w, ids)
        # each (token, slot) pair's expert gathered whole: (T, K, O, I) @ (T, Kx, I, 1)
        experts = c.g.op("Gather", [c.f32(w), c.i64(ids)], axis=0)
        x = c.g.op("Reshape", [c.f32(self), c.g.const([*xs, 1])])
        y = c.g.op("MatMul", [experts, x])
        t, k = its
        return self._out(c.g.op("Reshape", [y, c.g.const([t, k, ws[1]])]), (t, k, ws[1]), w, ids)

    # ---- gathers ------------------------------------------------------------------------
    def get_rows(self, ids: OnnxTensor) -> OnnxTensor:
        c = _ctx(self, ids)
        if self.q is not None and self.q.qtype in quant.GATHER_TYPES and len(self.shape) == 2:
            rows = c.gather_quantized(self, ids)  # only the rows asked for are dequantized
            return self._out(rows, (*ids.shape, *self.shape[1:]), ids)
        table = c.val(self)
        rows = c.g.op("Gather", [table, c.i64(ids)], axis=0)
        dtype = DType.I32 if self._dtype == DType.I32 else DType.F32
        if self._dtype not in (DType.F32, DType.I32):
            rows = c.g.op("Cast", [rows], to=ELEM[DType.F32])
        return self._out(rows, (*ids.shape, *self.shape[1:]), ids, dtype=dtype)

    def top_k(self, k: int) -> OnnxTensor:
        assert 0 < k <= self.shape[-1], f"top_k: k={k} of {self.shape}"
        c = _ctx(self)
        _, idx = c.g.op("TopK", [c.f32(self), c.g.const([k])], n_out=2, axis=-1, largest=1)
        out = c.g.op("Cast", [idx], to=ELEM[DType.I32])
        return self._out(out, (*self.shape[:-1], k), dtype=DType.I32)

    def take_along(self, ids: OnnxTensor) -> OnnxTensor:
        assert self.shape[:-1] == ids.shape[:-1], (
            f"take_along: ids {ids.shape} for rows of {self.shape}"
        )
        c = _ctx(self, ids)
        y = c.g.op("GatherElements", [c.f32(self), c.i64(ids)], axis=-1)
        return self._out(y, ids.shape, ids)

    # ---- writes into persistent tensors (KV cache): the context keeps them ---------------
    def set_rows(self, ids: OnnxTensor, src: OnnxTensor) -> OnnxTensor:
        s = self.shape
        assert self.kind == "cache", f"set_rows into {self}: not persistent"
        assert len(ids.shape) == 1, f"set_rows: ids must be 1-D, got {ids.shape}"
        n = ids.shape[0]
        assert math.prod(src.shape) == n * math.prod(s[1:]), (
            f"set_rows: src {src.shape} does not fill {n} rows of {s[1:]}"
        )
        return _ctx(ids, src).write(self, ids, src)

    def set_columns(self, ids: OnnxTensor, src: OnnxTensor) -> OnnxTensor:
        s = self.shape
        assert self.kind == "cache", f"set_columns into {self}: not persistent"
        t = ids.shape[0]
        assert len(ids.shape) == 1 and src.shape == s[:-1] + (t,), (
            f"set_columns: src {src.shape}, ids {ids.shape} into {s}"
        )
        return _ctx(ids, src).write(self, ids, src, columns=True)

    # ---- images and rope: ops.py; attention in the cache: fused.py ------------------------
    conv2d, avg_pool2d, rope = ops.conv2d, ops.avg_pool2d, ops.rope

    def scaled_dot_product_attention(
        self,
        k: OnnxTensor,
        v: OnnxTensor,
        mask: OnnxTensor | None,
        scale: float,
        fused: bool | None = None,
        prefix: tuple[OnnxTensor, OnnxTensor] | None = None,
    ) -> OnnxTensor | None:
        """A decoding row over its cache in place (fused.py); None: nn composes it."""
        if prefix is not None or len(k.shape) != 3:
            return None
        return attention_in_place(self, k, v, mask, scale)

    # ---- shapes -------------------------------------------------------------------------
    def reshape(self, *shape: int) -> OnnxTensor:
        if -1 in shape:
            known = math.prod(d for d in shape if d != -1)
            shape = tuple(math.prod(self.shape) // known if d == -1 else d for d in shape)
        assert math.prod(shape) == math.prod(self.shape), f"reshape {self.shape} -> {shape}"
        c = _ctx(self)
        y = c.g.op("Reshape", [c.val(self), c.g.const(list(shape))])
        return self._out(y, tuple(shape), dtype=self._dtype)

    def slice(self, axis: int, start: int, stop: int) -> OnnxTensor:
        s = self.shape
        axis = axis % len(s)
        size = s[axis]
        start, stop = _clamp(start, size), _clamp(stop, size)
        stop = max(start, stop)
        c = _ctx(self)
        # bounds along a symbolic axis or a cache's cells are graph inputs (`slice_bound`): one
        # graph for every batch length and attended range; along others, constants
        where: object = None
        if self.kind == "cache" and axis == 0:
            where = ("cells", size)
        elif isinstance(size, Dim):
            where = size.expr
        if where is not None:
            start, stop = c.slice_bound(where, start), c.slice_bound(where, stop)
        shape = s[:axis] + (stop - start,) + s[axis + 1 :]
        if self.kind == "cache" and axis == 0:  # the attended rows, this pass's writes in
            out = self._out(c.cache_rows(self, start, stop), shape, dtype=self._dtype)
            out.rows_of = (self, int(start), int(stop))
            return out
        y = c.g.op("Slice", [c.val(self), c.g.const([start]), c.g.const([stop]), c.g.const([axis])])
        return self._out(y, shape, dtype=self._dtype)

    def permute(self, *axes: int) -> OnnxTensor:
        assert len(axes) == len(self.shape), f"permute {self.shape} by {axes}"
        c = _ctx(self)
        y = c.g.op("Transpose", [c.val(self)], perm=list(axes))
        return self._out(y, tuple(self.shape[a] for a in axes), dtype=self._dtype)

    def contiguous(self) -> OnnxTensor:
        c = _ctx(self)
        return self._out(c.val(self), self.shape, dtype=self._dtype)

    def concat(self, other: OnnxTensor, axis: int) -> OnnxTensor:
        c = _ctx(self, other)
        same = self._dtype == other._dtype
        a, b = (c.val(self), c.val(other)) if same else (c.f32(self), c.f32(other))
        axis = axis % len(self.shape)
        shape = list(self.shape)
        shape[axis] += other.shape[axis]
        dtype = self._dtype if same else DType.F32
        return self._out(c.g.op("Concat", [a, b], axis=axis), tuple(shape), other, dtype=dtype)

    def concat_rows(self, others: Sequence[OnnxTensor]) -> OnnxTensor:
        parts = [self, *others]
        c = _ctx(*parts)
        same = len({p._dtype for p in parts}) == 1
        names = [c.val(p) if same else c.f32(p) for p in parts]
        shape = (sum(p.shape[0] for p in parts), *self.shape[1:])
        dtype = self._dtype if same else DType.F32
        return self._out(c.g.op("Concat", names, axis=0), shape, *others, dtype=dtype)

    def repeat(self, *shape: int) -> OnnxTensor:
        s = self.shape
        assert len(shape) == len(s) and all(d % e == 0 for d, e in zip(shape, s, strict=True)), (
            f"repeat {s} -> {shape}"
        )
        c = _ctx(self)
        reps = c.g.const([d // e for d, e in zip(shape, s, strict=True)])
        return self._out(c.g.op("Tile", [c.val(self), reps]), tuple(shape), dtype=self._dtype)

    def cast(self, dtype: DType) -> OnnxTensor:
        target = _CAST.get(dtype)
        assert target is not None, f"cast to {dtype.name}: not a type this backend computes with"
        c = _ctx(self)
        v = c.val(self)
        if target != self._dtype:
            v = c.g.op("Cast", [v], to=ELEM[target])
        return self._out(v, self.shape, dtype=target)
