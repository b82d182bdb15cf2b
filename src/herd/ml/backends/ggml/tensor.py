"""GGMLTensor: a ggml tensor pointer with its herd shape, and every op of the contract.

An op only records a graph node: it checks its operands in Python first (ggml aborts the
process on a failed precondition, so assertions with values come before any ctypes call),
converts them where the ggml kernel needs it (cast to F32, make contiguous: the context's
`f32`, `i32`, `src0`), and makes its node through the context (`out`, `view`, `node`),
which counts every node against the context's capacity.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from herd.ml.backends.ggml import _lib as L
from herd.ml.backends.ggml import attention, conv, joins, matmul
from herd.ml.backends.ggml._lib import (
    TYPE_F16,
    TYPE_F32,
    TYPE_I32,
    ggml_add,
    ggml_cast,
    ggml_cont,
    ggml_cont_4d,
    ggml_div,
    ggml_is_contiguous,
    ggml_mul,
    ggml_permute,
    ggml_reshape_1d,
    ggml_reshape_2d,
    ggml_reshape_3d,
    ggml_sub,
)
from herd.ml.backends.ggml.dtypes import (
    BLOCK,
    CONT,
    DTYPE,
    FLOAT,
    GTYPE,
    IDENTITY,
    PERMS,
    RESHAPE,
    ROWS,
    STRIDED,
    TYPE_SIZE,
    ne,
    perm_arg,
    type_name,
)
from herd.ml.base import DType, RopeOptions

if TYPE_CHECKING:
    from collections.abc import Sequence

    from herd.ml.backends.ggml.context import GGMLContext


class GGMLTensor:
    """A ggml tensor pointer with its herd (NumPy-order) shape."""

    __slots__ = ("p", "shape", "gtype", "lay", "ctx")

    def __init__(
        self, p: int, shape: tuple[int, ...], gtype: int, lay: int, ctx: GGMLContext | None
    ) -> None:
        self.p = p
        self.shape = shape
        self.gtype = gtype
        self.lay = lay
        self.ctx = ctx

    def __repr__(self) -> str:
        return f"GGMLTensor{self.shape}:{type_name(self.gtype)}"

    @property
    def dtype(self) -> DType:
        return DTYPE.get(self.gtype, DType.OTHER)

    # --- helpers -------------------------------------------------------------------
    def _c(self, other: GGMLTensor | None = None) -> GGMLContext:
        c = self.ctx
        if c is None:
            c = other.ctx if other is not None else None
            assert c is not None, f"op on {self} and {other}: no context (weights only)"
        return c

    def _binary(self, fn: Any, other: GGMLTensor) -> GGMLTensor:
        c = self._c(other)
        ss, os_ = self.shape, other.shape
        if ss != os_:
            n = len(ss) - len(os_)
            assert n >= 0 and all(o == 1 or o == s for s, o in zip(ss[n:], os_, strict=True)), (
                f"cannot broadcast {os_} onto {ss}"
            )
        b = other.p if other.gtype == TYPE_F32 else c.f32(other, STRIDED)
        return c.out(fn(c.g, c.f32(self), b), ss)

    def _unary(self, fn: Any, *args: Any) -> GGMLTensor:
        c = self._c()
        return c.out(fn(c.g, c.f32(self), *args), self.shape)

    # --- elementwise ---------------------------------------------------------------
    def add(self, other: GGMLTensor) -> GGMLTensor:
        return self._binary(ggml_add, other)

    def sub(self, other: GGMLTensor) -> GGMLTensor:
        return self._binary(ggml_sub, other)

    def mul(self, other: GGMLTensor) -> GGMLTensor:
        return self._binary(ggml_mul, other)

    def div(self, other: GGMLTensor) -> GGMLTensor:
        return self._binary(ggml_div, other)

    def scale(self, s: float) -> GGMLTensor:
        c = self._c()
        return c.out(L.ggml_scale(c.g, c.f32(self, CONT), s), self.shape)

    def neg(self) -> GGMLTensor:
        return self._unary(L.ggml_neg)

    def exp(self) -> GGMLTensor:
        return self._unary(L.ggml_exp)

    def sqrt(self) -> GGMLTensor:
        return self._unary(L.ggml_sqrt)

    def tanh(self) -> GGMLTensor:
        return self._unary(L.ggml_tanh)

    def sigmoid(self) -> GGMLTensor:
        return self._unary(L.ggml_sigmoid)

    def silu(self) -> GGMLTensor:
        return self._unary(L.ggml_silu)

    def gelu(self) -> GGMLTensor:
        c = self._c()
        if not c.backend.exact_gelu:
            return self._unary(L.ggml_gelu)
        # tanh GELU from F32 ops: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = self.mul(self).mul(self).scale(0.044715)
        inner = self.add(cube).scale(math.sqrt(2.0 / math.pi)).tanh()
        return self.mul(inner).add(self).scale(0.5)

    def gelu_erf(self) -> GGMLTensor:
        return self._unary(L.ggml_gelu_erf)

    def relu(self) -> GGMLTensor:
        return self._unary(L.ggml_relu)

    def clamp(self, lo: float, hi: float) -> GGMLTensor:
        return self._unary(L.ggml_clamp, lo, hi)

    def _glu(self, fn: Any, up: GGMLTensor) -> GGMLTensor:
        c = self._c(up)
        assert self.shape == up.shape, f"gated activation: {self.shape} vs up {up.shape}"
        return c.out(fn(c.g, c.f32(self, CONT), c.f32(up, CONT)), self.shape)

    def swiglu(self, up: GGMLTensor) -> GGMLTensor:
        return self._glu(L.ggml_swiglu_split, up)

    def geglu(self, up: GGMLTensor) -> GGMLTensor:
        if self._c(up).backend.exact_gelu:
            return self.gelu().mul(up)
        return self._glu(L.ggml_geglu_split, up)

    # --- reductions and norms over the last axis ------------------------------------
    def softmax(self, mask: GGMLTensor | None = None, scale: float = 1.0) -> GGMLTensor:
        c = self._c(mask)
        m = None
        if mask is not None:
            ms, ss = mask.shape, self.shape
            n = len(ss) - len(ms)
            assert n >= 0 and all(o == 1 or o == s for s, o in zip(ss[n:], ms, strict=True)), (
                f"softmax: mask {ms} does not broadcast onto {ss}"
            )
            if len(ms) < 2 or ms[-2:] != ss[-2:]:
                # ggml broadcasts a mask over heads only: tile rows and columns explicitly
                full = (ms[:-2] if len(ms) >= 2 else ()) + ss[-2:]
                mask = mask.reshape(*(1,) * (len(full) - len(ms)), *ms).repeat(*full)
            m = (
                mask.p
                if mask.gtype in (TYPE_F32, TYPE_F16) and mask.lay == CONT
                else c.f32(mask, CONT)
            )
        return c.out(L.ggml_soft_max_ext(c.g, c.f32(self, CONT), m, scale, 0.0), self.shape)

    def sum(self) -> GGMLTensor:
        c = self._c()
        return c.out(L.ggml_sum_rows(c.g, c.f32(self)), self.shape[:-1] + (1,))

    def mean(self) -> GGMLTensor:
        c = self._c()
        return c.out(L.ggml_mean(c.g, c.f32(self)), self.shape[:-1] + (1,))

    def rms_norm(self, eps: float) -> GGMLTensor:
        return self._unary(L.ggml_rms_norm, eps)

    def layer_norm(self, eps: float) -> GGMLTensor:
        return self._unary(L.ggml_norm, eps)

    def l2_norm(self, eps: float) -> GGMLTensor:
        return self._unary(L.ggml_l2_norm, eps)

    # --- matrix products: matmul.py ---------------------------------------------------
    linear, linear_t, matmul_t, mul_mat_id = (
        matmul.linear, matmul.linear_t, matmul.matmul_t, matmul.mul_mat_id
    )  # fmt: skip

    def top_k(self, k: int) -> GGMLTensor:
        c = self._c()
        s = self.shape
        assert 0 < k <= s[-1], f"top_k: k={k} of {s}"
        # argsort reads each row at i * nb1, so it needs the whole tensor contiguous
        # two nodes: the argsort, and the view of its first k columns
        p = c.node(L.ggml_argsort_top_k(c.g, c.f32(self, CONT), k))
        t = c.out(p, s[:-1] + (k,), TYPE_I32)
        if not ggml_is_contiguous(p):
            t.lay = ROWS  # the first k columns of each sorted row
        return t

    def take_along(self, ids: GGMLTensor) -> GGMLTensor:
        c = self._c(ids)
        s, its = self.shape, ids.shape
        assert len(s) >= 1 and s[:-1] == its[:-1], f"take_along: ids {its} for rows of {s}"
        rows, n, k = math.prod(s[:-1]), s[-1], its[-1]
        # ggml_get_rows picks rows of ne[1] per ne[2]: values as (rows, N, 1), ids (rows, K)
        a = c.node(L.ggml_reshape_3d(c.g, c.f32(self, CONT), 1, n, rows))
        b = c.i32(ids)
        if len(its) != 2:
            b = c.node(ggml_reshape_2d(c.g, b, k, rows))
        out = c.out(L.ggml_get_rows(c.g, a, b), (rows, k, 1))
        return out.reshape(*its)

    def get_rows(self, ids: GGMLTensor) -> GGMLTensor:
        c = self._c(ids)
        s, n = self.shape, math.prod(ids.shape)
        row = math.prod(s[1:])
        idx = c.i32(ids)
        if len(ids.shape) != 1:
            idx = c.node(ggml_reshape_1d(c.g, idx, n))
        src = self.p if self.lay >= ROWS else c.f32(self)
        if len(s) != 2:  # ggml gathers along ne[1]: view the table as (N, row)
            if self.lay != CONT:
                src = self.contiguous().p
            src = c.node(ggml_reshape_2d(c.g, src, row, s[0]))
        gtype = TYPE_I32 if self.gtype == TYPE_I32 else TYPE_F32
        out = c.out(L.ggml_get_rows(c.g, src, idx), (n, row), gtype)
        shape = ids.shape + s[1:]
        return out if out.shape == shape else out.reshape(*shape)

    def set_rows(self, ids: GGMLTensor, src: GGMLTensor) -> GGMLTensor:
        c = self._c(ids) if ids.ctx is not None else src._c()
        s = self.shape
        assert self.lay == CONT, f"set_rows into a non-contiguous view {s}"
        assert len(ids.shape) == 1, f"set_rows: ids must be 1-D, got {ids.shape}"
        row, n_ids = math.prod(s[1:]), ids.shape[0]
        assert math.prod(src.shape) == n_ids * row, f"set_rows: {src.shape} in {n_ids} of {s}"
        dst = self.p
        if len(s) != 2:
            dst = c.node(ggml_reshape_2d(c.g, dst, row, s[0]))
        b = c.f32(src, CONT)
        if src.shape != (n_ids, row):
            b = c.node(ggml_reshape_2d(c.g, b, row, n_ids))
        out = c.out(L.ggml_set_rows(c.g, dst, b, c.i32(ids)), (s[0], row), self.gtype)
        if len(s) != 2:
            out = c.out(RESHAPE[len(s)](c.g, out.p, *ne(s)[: len(s)]), s, self.gtype)
        return out

    def set_columns(self, ids: GGMLTensor, src: GGMLTensor) -> GGMLTensor:
        c = self._c(ids) if ids.ctx is not None else src._c()
        s, t = self.shape, ids.shape[0]
        assert self.lay == CONT, f"set_columns into a non-contiguous view {s}"
        assert len(ids.shape) == 1 and src.shape == s[:-1] + (t,), (
            f"set_columns: src {src.shape}, ids {ids.shape} into {s}"
        )
        # every element its own row of one (ne0 = 1): rows are the N cells, ids broadcast
        # over ne2 (the leading axes), as llama.cpp writes its transposed V cache
        lead = math.prod(s[:-1])
        dst = c.node(ggml_reshape_3d(c.g, self.p, 1, s[-1], lead))
        sne, nb = ne(src.shape), L.tensor_nb(src.p)
        if src.gtype == TYPE_F32 and all(
            nb[i + 1] == nb[i] * sne[i] for i in range(1, len(src.shape) - 1)
        ):  # rows of one element need no copy: a view with the values' own strides (a
            # transposed V, the usual case, has its leading axes in one stride)
            b = c.node(L.ggml_view_4d(c.g, src.p, 1, t, lead, 1, nb[0], nb[1], nb[1] * lead, 0))
        else:
            b = c.node(ggml_reshape_3d(c.g, c.f32(src, CONT), 1, t, lead))
        out = c.out(L.ggml_set_rows(c.g, dst, b, c.i32(ids)), (lead, s[-1], 1), self.gtype)
        return c.out(RESHAPE[len(s)](c.g, out.p, *ne(s)[: len(s)]), s, self.gtype)

    # --- attention: attention.py -------------------------------------------------------
    scaled_dot_product_attention = attention.scaled_dot_product_attention

    # --- images (NCHW): conv.py ---------------------------------------------------------
    conv2d, avg_pool2d = conv.conv2d, conv.avg_pool2d

    # --- shapes ----------------------------------------------------------------------
    def reshape(self, *shape: int) -> GGMLTensor:
        if -1 in shape:
            known = math.prod(d for d in shape if d != -1)
            shape = tuple(math.prod(self.shape) // known if d == -1 else d for d in shape)
        if shape == self.shape:
            return self
        n = math.prod(self.shape)
        assert math.prod(shape) == n and len(shape) <= 4, f"reshape {self.shape} -> {shape}"
        c = self.ctx or self._c()
        if self.lay == CONT:  # a view
            if shape:
                return c.out(RESHAPE[len(shape)](c.g, self.p, *shape[::-1]), shape, self.gtype)
            return c.out(ggml_reshape_1d(c.g, self.p, 1), shape, self.gtype)
        src = self.p if self.gtype in FLOAT else c.f32(self)
        gtype = self.gtype if self.gtype in FLOAT else TYPE_F32
        return c.out(ggml_cont_4d(c.g, src, *ne(shape)), shape, gtype)

    def slice(self, axis: int, start: int, stop: int) -> GGMLTensor:
        s = self.shape
        axis = axis % len(s)
        start, stop, _ = slice(start, stop).indices(s[axis])
        stop = max(start, stop)
        if start == 0 and stop == s[axis]:
            return self
        c = self._c()
        g = len(s) - 1 - axis
        if g == 0:
            assert start % BLOCK[self.gtype] == 0 and stop % BLOCK[self.gtype] == 0, (
                f"slice of a {type_name(self.gtype)} row must keep whole blocks"
            )
        shape = s[:axis] + (stop - start,) + s[axis + 1 :]
        nb = list(L.tensor_nb(self.p))
        offset = start * nb[g] // (BLOCK[self.gtype] if g == 0 else 1)
        dims = ne(shape)
        # a dim of 1 takes the stride a packed tensor would have there: never used to
        # address, but ggml_scale asserts it (a row slice of a matrix aborted the process)
        for i in (1, 2, 3):
            if dims[i] == 1:
                nb[i] = nb[i - 1] * dims[i - 1] // (BLOCK[self.gtype] if i == 1 else 1)
        p = L.ggml_view_4d(c.g, self.p, *dims, nb[1], nb[2], nb[3], offset)
        if nb[0] != L.tensor_nb(p)[0]:  # a permuted view: ggml_view_4d has no nb0 argument
            L.set_tensor_nb0(p, nb[0])
        return c.view(p, shape, self.gtype)

    def permute(self, *axes: int) -> GGMLTensor:
        perm = PERMS.get(axes) or perm_arg(axes)
        n = len(axes)
        assert n == len(self.shape), f"permute {self.shape} by {axes}"
        if perm is IDENTITY:
            return self
        c = self.ctx or self._c()
        src = self
        keeps_rows = axes[-1] == n - 1
        if not keeps_rows and self.gtype not in FLOAT and self.gtype != TYPE_I32:
            src = c.out(c.f32(self), self.shape)  # quantized rows cannot be transposed
        s = src.shape
        t = c.out(ggml_permute(c.g, src.p, *perm), tuple(s[a] for a in axes), src.gtype)
        if not ggml_is_contiguous(t.p):
            # by the strides, not the axes: permuting a permuted view back (a transposed
            # V cache) gives rows that are contiguous again
            t.lay = ROWS if L.tensor_nb(t.p)[0] == TYPE_SIZE[src.gtype] else STRIDED
        return t

    def contiguous(self) -> GGMLTensor:
        if self.lay == CONT:
            return self
        c = self._c()
        if self.gtype in FLOAT:
            return c.out(ggml_cont(c.g, self.p), self.shape, self.gtype)
        return c.out(c.f32(self), self.shape)

    def concat(self, other: GGMLTensor, axis: int) -> GGMLTensor:
        c = self._c(other)
        a, b = self.shape, other.shape
        axis = axis % len(a)
        assert len(a) == len(b) and all(
            x == y for i, (x, y) in enumerate(zip(a, b, strict=True)) if i != axis
        ), f"concat {a} and {b} on axis {axis}"
        shape = a[:axis] + (a[axis] + b[axis],) + a[axis + 1 :]
        if axis == len(a) - 1:
            # along rows: each part's rows set into their place (ggml_concat copies element
            # by element, with a branch for each: attention over a shared prefix
            # concatenated 8 prompts' scores, ~1M floats a layer, in ~1 ms a layer)
            return joins.assembled(c, shape, [(self, 0), (other, a[-1] * TYPE_SIZE[TYPE_F32])])
        if self.gtype == other.gtype:
            copied = joins.copied(c, shape, axis, [self, other])
            if copied is not None:
                return copied
        p = L.ggml_concat(c.g, c.f32(self, STRIDED), c.f32(other, STRIDED), len(a) - 1 - axis)
        return c.out(p, shape)

    def concat_rows(self, others: Sequence[GGMLTensor]) -> GGMLTensor:
        # ggml_concat is binary (a chain copies the first part once per later one) and
        # copies element by element; here each part is written once, by rows, into its
        # place in one new tensor
        c = self._c()
        parts = [self, *others]
        rest = self.shape[1:]
        assert all(p.shape[1:] == rest for p in parts), f"concat_rows {[p.shape for p in parts]}"
        shape = (sum(p.shape[0] for p in parts), *rest)
        row = TYPE_SIZE[TYPE_F32] * math.prod(rest)  # bytes of one row of axis 0
        placed, at = [], 0
        for p in parts:
            placed.append((p, at * row))
            at += p.shape[0]
        return joins.assembled(c, shape, placed)

    def repeat(self, *shape: int) -> GGMLTensor:
        s = self.shape
        assert len(shape) == len(s) and all(d % e == 0 for d, e in zip(shape, s, strict=True)), (
            f"repeat {s} -> {shape}"
        )
        if tuple(shape) == s:
            return self
        c = self._c()
        return c.out(L.ggml_repeat_4d(c.g, c.f32(self), *ne(tuple(shape))), tuple(shape))

    def cast(self, dtype: DType) -> GGMLTensor:
        target = GTYPE[dtype]
        if target == self.gtype:
            return self
        c = self._c()
        p, src = self.p, self.gtype
        if (
            src not in FLOAT
            or target == TYPE_I32
            and src != TYPE_F32
            or target not in FLOAT
            and self.lay != CONT
        ):
            p, src = c.f32(self, CONT), TYPE_F32  # ggml converts those only via F32
            if src == target:
                return c.out(p, self.shape)
        if target not in FLOAT and target != TYPE_I32:
            assert self.shape[-1] % BLOCK[target] == 0, (
                f"cast {self.shape} to {dtype.name}: last dim not a multiple of {BLOCK[target]}"
            )
        return c.out(ggml_cast(c.g, p, target), self.shape, target)

    def rope(
        self, positions: GGMLTensor, opts: RopeOptions, freq_factors: GGMLTensor | None = None
    ) -> GGMLTensor:
        c = self._c(positions)
        s = self.shape
        assert len(s) == 3 and positions.shape == (s[0],), (
            f"rope: x {s} must be (T, H, D) with positions (T,), got {positions.shape}"
        )
        assert opts.dims % 2 == 0 and opts.dims <= s[2], f"rope: dims {opts.dims} of {s[2]}"
        ff = None
        if freq_factors is not None:
            assert freq_factors.shape[-1] >= opts.dims // 2, (
                f"rope: {freq_factors.shape} frequency factors for {opts.dims} dims"
            )
            ff = c.f32(freq_factors, CONT)
        mode = L.ROPE_NEOX if opts.neox else L.ROPE_NORMAL
        p = L.ggml_rope_ext(
            c.g,
            c.f32(self),
            c.i32(positions),
            ff,
            opts.dims,
            mode,
            opts.orig_ctx,
            opts.base,
            opts.freq_scale,
            opts.ext_factor,
            opts.attn_factor,
            opts.beta_fast,
            opts.beta_slow,
        )
        return c.out(p, s)
