"""ggml backend: quantized CPU kernels (and GPU builds) through ggml-python's libraries.

Weights stay in the memory-mapped GGUF file: one CPU backend buffer wraps the mapping and
every weight tensor points into it, in its own quantization type. A `GGMLContext` is one
no_alloc ggml context; ops only record graph nodes, and `compute` builds the graph, lets
ggml's graph allocator place the intermediates, copies the inputs in, runs the CPU backend
and copies the outputs out.

Devices (GPU builds): `herd.ml.layout` decides which layers go to which GPU (`num_gpu`)
and checks that everything fits before anything is allocated. Offloaded weights are copied
into device buffers (the rest stays mapped), the KV cache of an offloaded layer lives on its
device, and ggml's backend scheduler splits each graph over [GPUs..., CPU].

Shapes are NumPy order here and ggml order (`ne`, innermost first) only at the ctypes
calls: herd (a, b, c) is ggml ne [c, b, a]. ggml aborts the process on a failed
precondition, so every op checks its operands in Python first (assertions with values)
and converts them (cast to F32, make contiguous) where the ggml kernel needs it.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from herd import envconfig
from herd.errors import BackendError, GGUFError, OutOfMemoryError
from herd.gguf import GGUFFile
from herd.ml.backends.ggml import _lib as L
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
    ggml_mul_mat,
    ggml_permute,
    ggml_reshape_1d,
    ggml_reshape_2d,
    ggml_reshape_3d,
    ggml_reshape_4d,
    ggml_sub,
)
from herd.ml.base import BackendOptions, DeviceInfo, DType, RopeOptions
from herd.ml.layout import Plan, plan, size

log = logging.getLogger(__name__)


@L.LOG_CALLBACK
def _ggml_log(level: int, text: bytes | None, _user: int | None) -> None:
    """ggml's messages (it prints them to stderr by default) go to herd's log instead:
    warnings and errors as such, its progress notes (repacking, buffers) at debug."""
    msg = (text or b"").decode(errors="replace").rstrip()
    if msg:
        py_level = logging.DEBUG if level < L.LOG_WARN else logging.WARNING
        log.log(logging.ERROR if level == L.LOG_ERROR else py_level, "ggml: %s", msg)


L.ggml_log_set(_ggml_log, None)

_GTYPE = {
    DType.F32: TYPE_F32,
    DType.F16: TYPE_F16,
    DType.BF16: L.TYPE_BF16,
    DType.I32: TYPE_I32,
    DType.Q8_0: L.TYPE_Q8_0,
    DType.Q4_0: L.TYPE_Q4_0,
}
_DTYPE = {g: d for d, g in _GTYPE.items()}
_NP_IN = {TYPE_F32: np.float32, TYPE_F16: np.float16, TYPE_I32: np.int32}
_NP_OUT = {TYPE_F32: np.float32, TYPE_I32: np.int32}
_TYPE_SIZE = {t: L.ggml_type_size(t) for t in range(L.TYPE_COUNT)}
_BLOCK = {t: L.ggml_blck_size(t) for t in range(L.TYPE_COUNT)}
_FLOAT = (TYPE_F32, TYPE_F16, L.TYPE_BF16)

# layout of a tensor: fully contiguous, contiguous rows only (dim 0), strided
CONT, ROWS, STRIDED = 2, 1, 0
_RESHAPE: tuple[Any, ...] = (
    None,
    ggml_reshape_1d,
    ggml_reshape_2d,
    ggml_reshape_3d,
    ggml_reshape_4d,
)
_NODE_MARGIN = 8  # no op creates more ggml tensors than this between capacity checks


def _ne(shape: tuple[int, ...]) -> list[int]:
    """herd shape -> ggml ne (4 entries, innermost first)."""
    ne = list(reversed(shape))
    return ne + [1] * (4 - len(ne))


_IDENTITY = (0, 1, 2, 3)
_PERMS: dict[tuple[int, ...], tuple[int, ...]] = {}


def _perm(axes: tuple[int, ...]) -> tuple[int, ...]:
    """ggml_permute's argument for a NumPy-style permutation (cached per axes)."""
    n = len(axes)
    assert sorted(axes) == list(range(n)) and n <= 4, f"permute by {axes}"
    # herd axis k is ggml axis n-1-k; ggml_permute sends source axis j to dest perm[j]
    perm = [0, 1, 2, 3]
    for i, a in enumerate(axes):
        perm[n - 1 - a] = n - 1 - i
    _PERMS[axes] = _IDENTITY if tuple(perm) == _IDENTITY else tuple(perm)
    return _PERMS[axes]


def _type_name(gtype: int) -> str:
    try:
        return GGMLQuantizationType(gtype).name
    except ValueError:
        return f"type {gtype}"


def compute_types() -> set[int]:
    """ggml types this build's CPU backend can multiply with (weights it can run)."""
    ok = {TYPE_F32, TYPE_I32}
    for t in range(L.TYPE_COUNT):
        if _BLOCK[t] > 0 and L.ggml_get_type_traits_cpu(t).contents.vec_dot:
            ok.add(t)
    return ok


def quantize(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float rows (..., K) -> the GGUF bytes of `qtype` (uint8, (..., row bytes)), by ggml."""
    gtype = int(qtype)
    a = np.ascontiguousarray(array, dtype=np.float32)
    k = a.shape[-1]
    if (
        gtype >= L.TYPE_COUNT
        or k % _BLOCK[gtype]
        or L.ggml_quantize_requires_imatrix(gtype)
        or not L.ggml_get_type_traits_cpu(gtype).contents.from_float
    ):
        raise BackendError(f"ggml cannot quantize rows of {k} to {qtype.name}")
    rows = a.size // k
    out = np.empty(a.shape[:-1] + (L.ggml_row_size(gtype, k),), dtype=np.uint8)
    L.ggml_quantize_chunk(gtype, a.ctypes.data, out.ctypes.data, 0, rows, k, None)
    return out


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
        return f"GGMLTensor{self.shape}:{_type_name(self.gtype)}"

    @property
    def dtype(self) -> DType:
        return _DTYPE.get(self.gtype, DType.OTHER)

    # --- helpers -------------------------------------------------------------------
    def _c(self, other: GGMLTensor | None = None) -> GGMLContext:
        c = self.ctx
        if c is None:
            c = other.ctx if other is not None else None
            assert c is not None, f"op on {self} and {other}: no context (weights only)"
        return c

    def _f32(self, c: GGMLContext, lay: int = ROWS) -> int:
        """Pointer to an F32 version of self with at least layout `lay`."""
        if self.gtype == TYPE_F32:
            if self.lay >= lay:
                return self.p
            c.n += 1
            return ggml_cont(c.g, self.p)  # type: ignore[no-any-return]
        # quantized blocks must stay whole: permute() dequantizes before moving dim 0
        assert self.lay >= ROWS or self.gtype in _FLOAT or self.gtype == TYPE_I32, (
            f"strided view of a {_type_name(self.gtype)} tensor {self.shape}"
        )
        c.n += 1
        return ggml_cast(c.g, self.p, TYPE_F32)  # type: ignore[no-any-return]

    def _out(
        self, c: GGMLContext, p: int, shape: tuple[int, ...], gtype: int = TYPE_F32
    ) -> GGMLTensor:
        c.n += 1
        if c.n > c.cap:
            raise BackendError(
                f"graph too large: more than {c.cap} tensors in one context "
                "(BackendOptions.extra['max_nodes'])"
            )
        return GGMLTensor(p, shape, gtype, CONT, c)

    def _view(self, c: GGMLContext, p: int, shape: tuple[int, ...]) -> GGMLTensor:
        t = self._out(c, p, shape, self.gtype)
        if not ggml_is_contiguous(p):
            nb0 = L.tensor_nb(p)[0]
            t.lay = ROWS if nb0 == _TYPE_SIZE[self.gtype] else STRIDED
        return t

    def _binary(self, fn: Any, other: GGMLTensor) -> GGMLTensor:
        c = self._c(other)
        ss, os_ = self.shape, other.shape
        if ss != os_:
            n = len(ss) - len(os_)
            assert n >= 0 and all(o == 1 or o == s for s, o in zip(ss[n:], os_, strict=True)), (
                f"cannot broadcast {os_} onto {ss}"
            )
        b = other.p if other.gtype == TYPE_F32 else other._f32(c, STRIDED)
        return self._out(c, fn(c.g, self._f32(c), b), ss)

    def _unary(self, fn: Any, *args: Any) -> GGMLTensor:
        c = self._c()
        return self._out(c, fn(c.g, self._f32(c), *args), self.shape)

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
        return self._out(c, L.ggml_scale(c.g, self._f32(c, CONT), s), self.shape)

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
        return self._out(c, fn(c.g, self._f32(c, CONT), up._f32(c, CONT)), self.shape)

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
                else mask._f32(c, CONT)
            )
        return self._out(c, L.ggml_soft_max_ext(c.g, self._f32(c, CONT), m, scale, 0.0), self.shape)

    def sum(self) -> GGMLTensor:
        c = self._c()
        return self._out(c, L.ggml_sum_rows(c.g, self._f32(c)), self.shape[:-1] + (1,))

    def mean(self) -> GGMLTensor:
        c = self._c()
        return self._out(c, L.ggml_mean(c.g, self._f32(c)), self.shape[:-1] + (1,))

    def rms_norm(self, eps: float) -> GGMLTensor:
        return self._unary(L.ggml_rms_norm, eps)

    def layer_norm(self, eps: float) -> GGMLTensor:
        return self._unary(L.ggml_norm, eps)

    def l2_norm(self, eps: float) -> GGMLTensor:
        return self._unary(L.ggml_l2_norm, eps)

    # --- matrix products -------------------------------------------------------------
    def _src0(self, c: GGMLContext) -> int:
        """self as mul_mat's first operand: any computable type, rows contiguous."""
        if self.lay >= ROWS:
            return self.p
        if self.gtype in _FLOAT:
            c.n += 1
            return ggml_cont(c.g, self.p)  # type: ignore[no-any-return]
        return self._f32(c)

    def linear(self, w: GGMLTensor) -> GGMLTensor:
        c = self._c(w)
        ws, xs = w.shape, self.shape
        assert len(ws) == 2 and ws[1] == xs[-1], f"linear: x {xs} @ w.T with w {ws}"
        w_p = w._src0(c)
        packed = c.backend.packed
        if packed and (q := packed.get(w_p)) is not None:  # repacked copy (option "repack")
            w_p = q or c.backend.repack(w)
            if w_p != w.p:  # the repacked kernels read x as one contiguous matrix
                return self._out(c, ggml_mul_mat(c.g, w_p, self._f32(c, CONT)), xs[:-1] + (ws[0],))
        return self._out(c, ggml_mul_mat(c.g, w_p, self._f32(c)), xs[:-1] + (ws[0],))

    def matmul_t(self, other: GGMLTensor) -> GGMLTensor:
        c = self._c(other)
        a, b = self.shape, other.shape
        assert len(a) == 3 and len(b) == 3 and a[2] == b[2], f"matmul_t: {a} x {b}"
        assert a[0] % b[0] == 0, f"matmul_t: batch {a[0]} not a multiple of {b[0]}"
        # ggml_mul_mat(other, self) broadcasts other's batches over consecutive groups
        return self._out(c, ggml_mul_mat(c.g, other._src0(c), self._f32(c)), (a[0], a[1], b[1]))

    def mul_mat_id(self, w: GGMLTensor, ids: GGMLTensor) -> GGMLTensor:
        c = self._c(ids)
        xs, ws, its = self.shape, w.shape, ids.shape
        assert (
            len(xs) == 3
            and len(ws) == 3
            and len(its) == 2
            and xs[0] == its[0]
            and xs[1] in (1, its[1])
            and xs[2] == ws[2]
        ), f"mul_mat_id: x {xs} with w {ws} and ids {its}"
        # ggml: as [I, O, E] (any weight type) x b [I, K or 1, T] by ids [K, T] -> [O, K, T]
        p = L.ggml_mul_mat_id(c.g, w._src0(c), self._f32(c), ids._i32(c))
        return self._out(c, p, (xs[0], its[1], ws[1]))

    def top_k(self, k: int) -> GGMLTensor:
        c = self._c()
        s = self.shape
        assert 0 < k <= s[-1], f"top_k: k={k} of {s}"
        # argsort reads each row at i * nb1, so it needs the whole tensor contiguous
        p = L.ggml_argsort_top_k(c.g, self._f32(c, CONT), k)
        c.n += 1  # the argsort beneath the view
        t = self._out(c, p, s[:-1] + (k,), TYPE_I32)
        if not ggml_is_contiguous(p):
            t.lay = ROWS  # the first k columns of each sorted row
        return t

    def take_along(self, ids: GGMLTensor) -> GGMLTensor:
        c = self._c(ids)
        s, its = self.shape, ids.shape
        assert len(s) >= 1 and s[:-1] == its[:-1], f"take_along: ids {its} for rows of {s}"
        rows, n, k = math.prod(s[:-1]), s[-1], its[-1]
        # ggml_get_rows picks rows of ne[1] per ne[2]: values as (rows, N, 1), ids (rows, K)
        a = L.ggml_reshape_3d(c.g, self._f32(c, CONT), 1, n, rows)
        b = ids._i32(c)
        c.n += 1
        if len(its) != 2:
            b = ggml_reshape_2d(c.g, b, k, rows)
            c.n += 1
        out = self._out(c, L.ggml_get_rows(c.g, a, b), (rows, k, 1))
        return out.reshape(*its)

    def get_rows(self, ids: GGMLTensor) -> GGMLTensor:
        c = self._c(ids)
        s, n = self.shape, math.prod(ids.shape)
        row = math.prod(s[1:])
        idx = ids._i32(c)
        if len(ids.shape) != 1:
            c.n += 1
            idx = ggml_reshape_1d(c.g, idx, n)
        src = self.p if self.lay >= ROWS else self._f32(c)
        if len(s) != 2:  # ggml gathers along ne[1]: view the table as (N, row)
            if self.lay != CONT:
                src = self.contiguous().p
            c.n += 1
            src = ggml_reshape_2d(c.g, src, row, s[0])
        gtype = TYPE_I32 if self.gtype == TYPE_I32 else TYPE_F32
        out = self._out(c, L.ggml_get_rows(c.g, src, idx), (n, row), gtype)
        shape = ids.shape + s[1:]
        return out if out.shape == shape else out.reshape(*shape)

    def _i32(self, c: GGMLContext) -> int:
        if self.gtype == TYPE_I32 and self.lay == CONT:
            return self.p
        c.n += 1
        if self.gtype == TYPE_I32:
            return ggml_cont(c.g, self.p)  # type: ignore[no-any-return]
        p = self.p if self.gtype == TYPE_F32 else self._f32(c)
        return ggml_cast(c.g, p, TYPE_I32)  # type: ignore[no-any-return]

    def set_rows(self, ids: GGMLTensor, src: GGMLTensor) -> GGMLTensor:
        c = self._c(ids) if ids.ctx is not None else src._c()
        s = self.shape
        assert self.lay == CONT, f"set_rows into a non-contiguous view {s}"
        assert len(ids.shape) == 1, f"set_rows: ids must be 1-D, got {ids.shape}"
        row, n_ids = math.prod(s[1:]), ids.shape[0]
        assert math.prod(src.shape) == n_ids * row, (
            f"set_rows: src {src.shape} does not fill {n_ids} rows of {s[1:]}"
        )
        dst = self.p
        if len(s) != 2:
            c.n += 1
            dst = ggml_reshape_2d(c.g, dst, row, s[0])
        b = src._f32(c, CONT)
        if src.shape != (n_ids, row):
            c.n += 1
            b = ggml_reshape_2d(c.g, b, row, n_ids)
        out = self._out(c, L.ggml_set_rows(c.g, dst, b, ids._i32(c)), (s[0], row), self.gtype)
        if len(s) != 2:
            out = out._out(c, _RESHAPE[len(s)](c.g, out.p, *_ne(s)[: len(s)]), s, self.gtype)
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
        dst = ggml_reshape_3d(c.g, self.p, 1, s[-1], lead)
        ne, nb = _ne(src.shape), L.tensor_nb(src.p)
        if src.gtype == TYPE_F32 and all(
            nb[i + 1] == nb[i] * ne[i] for i in range(1, len(src.shape) - 1)
        ):  # rows of one element need no copy: a view with the values' own strides (a
            # transposed V, the usual case, has its leading axes in one stride)
            b = L.ggml_view_4d(c.g, src.p, 1, t, lead, 1, nb[0], nb[1], nb[1] * lead, 0)
        else:
            b = ggml_reshape_3d(c.g, src._f32(c, CONT), 1, t, lead)
        c.n += 2
        out = self._out(c, L.ggml_set_rows(c.g, dst, b, ids._i32(c)), (lead, s[-1], 1), self.gtype)
        return out._out(c, _RESHAPE[len(s)](c.g, out.p, *_ne(s)[: len(s)]), s, self.gtype)

    def scaled_dot_product_attention(
        self, k: GGMLTensor, v: GGMLTensor, mask: GGMLTensor | None, scale: float
    ) -> GGMLTensor:
        """Fused attention (nn's optional capability): q=self (T, Hq, D), k (S, Hkv, D),
        v (S, Hkv, Dv), mask (T, S) or None -> (T, Hq * Dv), by ggml_flash_attn_ext.

        GQA by broadcasting (Hq a multiple of Hkv). Off by default (BackendOptions.extra
        ["flash_attn"]), as in llama.cpp: then the composed ops nn would use, whose logits
        match llama.cpp's; flash attention accumulates V in F16 for an F16 cache.
        """
        c = self._c(k)
        (t, hq, d), (s, hkv, dk), dv = self.shape, k.shape, v.shape[2]
        assert d == dk and v.shape[:2] == (s, hkv) and hq % hkv == 0, (
            f"attention: q {self.shape}, k {k.shape}, v {v.shape}"
        )
        assert mask is None or mask.shape == (t, s), f"attention: mask {mask} for ({t}, {s})"
        q = self.permute(1, 0, 2)  # (Hq, T, D)
        kh, vh = k.permute(1, 0, 2), v.permute(1, 0, 2)  # (Hkv, S, D), (Hkv, S, Dv)
        if not c.backend.flash_attn:
            probs = q.matmul_t(kh).softmax(mask, scale)  # (Hq, T, S)
            # matmul_t copies V only when its rows are not contiguous (a transposed cache
            # hands them over as they are)
            out = probs.matmul_t(vh.permute(0, 2, 1))  # (Hq, T, Dv)
            return out.permute(1, 0, 2).contiguous().reshape(t, hq * dv)
        m = c.f16(mask) if mask is not None else None
        p = L.ggml_flash_attn_ext(c.g, q._f32(c), kh._src0(c), vh._src0(c), m, scale, 0.0, 0.0)
        L.ggml_flash_attn_ext_set_prec(p, L.PREC_F32)
        return self._out(c, p, (t, hq, dv)).reshape(t, hq * dv)  # ggml gives (T, Hq, Dv)

    # --- shapes ----------------------------------------------------------------------
    def reshape(self, *shape: int) -> GGMLTensor:
        if -1 in shape:
            known = math.prod(d for d in shape if d != -1)
            shape = tuple(math.prod(self.shape) // known if d == -1 else d for d in shape)
        if shape == self.shape:
            return self
        assert math.prod(shape) == math.prod(self.shape) and len(shape) <= 4, (
            f"reshape {self.shape} -> {shape}"
        )
        c = self.ctx or self._c()
        if self.lay == CONT:  # a view
            if shape:
                return self._out(
                    c, _RESHAPE[len(shape)](c.g, self.p, *shape[::-1]), shape, self.gtype
                )
            return self._out(c, ggml_reshape_1d(c.g, self.p, 1), shape, self.gtype)
        src = self.p if self.gtype in _FLOAT else self._f32(c)
        gtype = self.gtype if self.gtype in _FLOAT else TYPE_F32
        return self._out(c, ggml_cont_4d(c.g, src, *_ne(shape)), shape, gtype)

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
            assert start % _BLOCK[self.gtype] == 0 and stop % _BLOCK[self.gtype] == 0, (
                f"slice of a {_type_name(self.gtype)} row must keep whole blocks"
            )
        shape = s[:axis] + (stop - start,) + s[axis + 1 :]
        nb = L.tensor_nb(self.p)
        offset = start * nb[g] // (_BLOCK[self.gtype] if g == 0 else 1)
        p = L.ggml_view_4d(c.g, self.p, *_ne(shape), nb[1], nb[2], nb[3], offset)
        if nb[0] != L.tensor_nb(p)[0]:  # a permuted view: ggml_view_4d has no nb0 argument
            L.set_tensor_nb0(p, nb[0])
        return self._view(c, p, shape)

    def permute(self, *axes: int) -> GGMLTensor:
        perm = _PERMS.get(axes) or _perm(axes)
        n = len(axes)
        assert n == len(self.shape), f"permute {self.shape} by {axes}"
        if perm is _IDENTITY:
            return self
        c = self.ctx or self._c()
        src = self
        keeps_rows = axes[-1] == n - 1
        if not keeps_rows and self.gtype not in _FLOAT and self.gtype != TYPE_I32:
            src = self._out(c, self._f32(c), self.shape)  # quantized rows cannot be transposed
        s = src.shape
        t = src._out(c, ggml_permute(c.g, src.p, *perm), tuple(s[a] for a in axes), src.gtype)
        if not ggml_is_contiguous(t.p):
            # by the strides, not the axes: permuting a permuted view back (a transposed
            # V cache) gives rows that are contiguous again
            t.lay = ROWS if L.tensor_nb(t.p)[0] == _TYPE_SIZE[src.gtype] else STRIDED
        return t

    def contiguous(self) -> GGMLTensor:
        if self.lay == CONT:
            return self
        c = self._c()
        if self.gtype in _FLOAT:
            return self._out(c, ggml_cont(c.g, self.p), self.shape, self.gtype)
        return self._out(c, self._f32(c), self.shape)

    def concat(self, other: GGMLTensor, axis: int) -> GGMLTensor:
        c = self._c(other)
        a, b = self.shape, other.shape
        axis = axis % len(a)
        assert len(a) == len(b) and all(
            x == y for i, (x, y) in enumerate(zip(a, b, strict=True)) if i != axis
        ), f"concat {a} and {b} on axis {axis}"
        shape = a[:axis] + (a[axis] + b[axis],) + a[axis + 1 :]
        p = L.ggml_concat(c.g, self._f32(c, STRIDED), other._f32(c, STRIDED), len(a) - 1 - axis)
        return self._out(c, p, shape)

    def repeat(self, *shape: int) -> GGMLTensor:
        s = self.shape
        assert len(shape) == len(s) and all(d % e == 0 for d, e in zip(shape, s, strict=True)), (
            f"repeat {s} -> {shape}"
        )
        if tuple(shape) == s:
            return self
        c = self._c()
        return self._out(c, L.ggml_repeat_4d(c.g, self._f32(c), *_ne(tuple(shape))), tuple(shape))

    def cast(self, dtype: DType) -> GGMLTensor:
        target = _GTYPE[dtype]
        if target == self.gtype:
            return self
        c = self._c()
        p, src = self.p, self.gtype
        if (
            src not in _FLOAT
            or target == TYPE_I32
            and src != TYPE_F32
            or target not in _FLOAT
            and self.lay != CONT
        ):
            p, src = self._f32(c, CONT), TYPE_F32  # ggml converts those only via F32
            if src == target:
                return self._out(c, p, self.shape)
        if target not in _FLOAT and target != TYPE_I32:
            assert self.shape[-1] % _BLOCK[target] == 0, (
                f"cast {self.shape} to {dtype.name}: last dim not a multiple of {_BLOCK[target]}"
            )
        return self._out(c, ggml_cast(c.g, p, target), self.shape, target)

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
            ff = freq_factors._f32(c, CONT)
        mode = L.ROPE_NEOX if opts.neox else L.ROPE_NORMAL
        p = L.ggml_rope_ext(
            c.g,
            self._f32(c),
            positions._i32(c),
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
        return self._out(c, p, s)


def _host_view(p: int, shape: tuple[int, ...], dtype: Any, writeable: bool = False) -> np.ndarray:
    """An array over a contiguous tensor in host memory (no copy), read-only unless asked."""
    n = math.prod(shape) * np.dtype(dtype).itemsize
    if not n:
        return np.empty(shape, dtype=dtype)
    raw = (ctypes.c_char * n).from_address(L.tensor_data(p))
    a = np.frombuffer(raw, dtype=dtype).reshape(shape)
    a.flags.writeable = writeable
    return a


class GGMLContext:
    """One forward pass: a no_alloc ggml context that records ops, then `compute`."""

    def __init__(self, backend: GGMLBackend) -> None:
        self.backend = backend
        self._buf = backend._take_meta_buffer()
        self.g: int = L.ggml_init(L.InitParams(self._buf.nbytes - 64, _aligned(self._buf), True))
        if not self.g:
            raise BackendError("ggml_init failed")
        self.n = 0
        self.cap = backend.max_nodes - _NODE_MARGIN
        self.inputs: list[tuple[int, np.ndarray]] = []
        self.forwards: list[int] = []
        self._gctx: int | None = None
        self._graph: int | None = None
        self._outs: list[tuple[int, tuple[int, ...], Any]] = []
        self._f16: dict[int, int] = {}
        self._galloc = 0  # a private graph allocator, once `keep` asks for one
        self._placed = False  # the graph's tensors still sit where its allocator put them
        self._srcs: dict[int, bytes] = {}  # each node's sources before any split
        self._epoch = -1  # the shared allocator's epoch when it last placed this graph
        # CPU only: arrays over the placed graph's inputs (None: unused by the graph) and
        # outputs, made once per placement; a rerun then fills and reads them with NumPy,
        # not a ctypes call and a new array each (a decode step runs on caches the
        # compute has just evicted: every call there costs several times its warm time)
        self._host: tuple[list[np.ndarray | None], list[np.ndarray]] | None = None

    def input(self, array: np.ndarray | Sequence[Any], dtype: DType = DType.F32) -> GGMLTensor:
        gtype = _GTYPE[dtype]
        if gtype not in _NP_IN:
            return self.input(array, DType.F32).cast(dtype)
        a = np.ascontiguousarray(array, dtype=_NP_IN[gtype])
        assert a.ndim <= 4, f"input of {a.ndim} dims; ggml has 4"
        p = L.ggml_new_tensor_4d(self.g, gtype, *_ne(a.shape))
        L.ggml_set_input(p)
        self.inputs.append((p, a))
        self.n += 1
        if self.n > self.cap:
            raise BackendError(f"graph too large: more than {self.cap} tensors in one context")
        return GGMLTensor(p, a.shape, gtype, CONT, self)

    def f16(self, t: GGMLTensor) -> int:
        """t as a contiguous F16 tensor, converted once per context (attention masks)."""
        p = self._f16.get(t.p)
        if p is None:
            p = (
                t.p
                if t.gtype == TYPE_F16 and t.lay == CONT
                else ggml_cast(self.g, t.p if t.lay >= ROWS else t._f32(self, CONT), TYPE_F16)
            )
            self.n += 1
            self._f16[t.p] = p
        return p

    def attach(self, t: GGMLTensor) -> GGMLTensor:
        return GGMLTensor(t.p, t.shape, t.gtype, t.lay, self)

    def forward(self, *tensors: GGMLTensor) -> None:
        self.forwards.extend(t.p for t in tensors)

    def compute(self, *outputs: GGMLTensor) -> list[np.ndarray]:
        if self._graph is not None:  # computed before: its tensors hold stale placements
            L.unallocate(self.g)
        self._build(outputs)
        self._epoch = -1  # a new graph: no allocator has placed it yet
        self._placed = False
        return self._run()

    def rerun(self, *arrays: np.ndarray | Sequence[Any], copy: bool = True) -> list[np.ndarray]:
        """Run the graph of the last `compute` again with new input values.

        One array per `input` call, in call order, each of the same shape: the runner's
        path for a decode step or a repeated prompt shape, which skips building the graph in
        Python altogether. `copy=False`: where the
        outputs sit in host memory, return read-only views of them, valid until this
        graph runs again or closes (a decode step reads its logits at once; copying them
        out costs ~0.2 ms a token for a 262k vocabulary).
        """
        assert self._graph is not None, "rerun before compute"
        assert len(arrays) == len(self.inputs), (
            f"rerun: {len(arrays)} arrays for {len(self.inputs)} inputs"
        )
        for i, (array, (p, old)) in enumerate(zip(arrays, self.inputs, strict=True)):
            a = np.ascontiguousarray(array, dtype=old.dtype)
            assert a.shape == old.shape, f"rerun: input {i} is {a.shape}, was {old.shape}"
            self.inputs[i] = (p, a)
        b = self.backend
        if not self._galloc and self._epoch != b.galloc_epoch:
            # another graph went through the shared allocator since (and may have moved its
            # buffer): this one is placed there again, from scratch
            L.unallocate(self.g)
        return self._run(copy or bool(b.gpus))

    def keep(self) -> None:
        """This context's graph will be rerun many times in a row, between other graphs (a
        runner's decode step between prompts): give it a compute buffer of its own, which
        no other graph moves, so that its reruns never place it again. Call before
        `compute`. Graphs split over devices are placed by the scheduler instead."""
        if not self._galloc and not self.backend.gpus:
            self._galloc = L.ggml_gallocr_new(L.ggml_backend_cpu_buffer_type())

    def _build(self, outputs: Sequence[GGMLTensor]) -> None:
        self._free_graph()
        outs = []
        for t in outputs:
            p = t.p
            if t.gtype not in _NP_OUT or t.lay != CONT:
                if t.gtype in _NP_OUT:
                    p = ggml_cont(self.g, p)
                else:
                    p = t._f32(self, CONT)
                self.n += 1
            outs.append((p, t.shape, _NP_OUT.get(t.gtype, np.float32)))
        size = self.n + self.backend.n_static + 16
        self._gctx = L.ggml_init(
            L.InitParams(L.ggml_graph_overhead_custom(size, False), None, True)
        )
        gf = self._graph = L.ggml_new_graph_custom(self._gctx, size, False)
        expand = L.ggml_build_forward_expand
        for p in self.forwards:
            expand(gf, p)
        for p, _, _ in outs:
            L.ggml_set_output(p)
            expand(gf, p)
        self._outs = outs

    def _run(self, copy: bool = True) -> list[np.ndarray]:
        b = self.backend
        if b.gpus:
            self._place_split()
        elif not (self._placed if self._galloc else self._epoch == b.galloc_epoch):
            # placed again only when another graph may have taken its memory since: a
            # rerun of an unchanged placement skips the allocator's walk over every node
            if not L.ggml_gallocr_alloc_graph(self._galloc or b.galloc, self._graph):
                raise BackendError("ggml could not allocate the compute graph (out of memory?)")
            self._placed = True
            self._host = None
            if not self._galloc:
                b.galloc_epoch += 1
                self._epoch = b.galloc_epoch
        if b.gpus:
            tensor_data, tensor_set = L.tensor_data, L.ggml_backend_tensor_set
            for p, a in self.inputs:
                if tensor_data(p) is not None:  # inputs the graph does not use stay unallocated
                    tensor_set(p, a.ctypes.data, 0, a.nbytes)
            status = L.ggml_backend_sched_graph_compute(b.sched, self._graph)
        else:
            host = self._host or self._host_arrays()
            for view, (_, a) in zip(host[0], self.inputs, strict=True):
                if view is not None:
                    view[...] = a
            status = L.ggml_backend_graph_compute(b.cpu, self._graph)
        if status != L.STATUS_SUCCESS:
            raise BackendError(f"ggml compute failed: {L.ggml_status_to_string(status).decode()}")
        if not copy:
            assert self._host is not None  # CPU only: with GPUs, rerun asks for copies
            return list(self._host[1])
        results = []
        for p, shape, dt in self._outs:
            r = np.empty(shape, dtype=dt)
            if r.nbytes:
                L.ggml_backend_tensor_get(p, r.ctypes.data, 0, r.nbytes)
            results.append(r)
        return results

    def _host_arrays(self) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
        """Arrays over this placement's inputs and outputs in the CPU's memory."""
        data = L.tensor_data
        ins = [
            None if data(p) is None else _host_view(p, a.shape, a.dtype, writeable=True)
            for p, a in self.inputs
        ]
        self._host = (ins, [_host_view(p, shape, dt) for p, shape, dt in self._outs])
        return self._host

    def _place_split(self) -> None:
        """Let the scheduler split this graph over the devices and place its tensors,
        unless it still holds this very placement (a rerun with no other graph since)."""
        b = self.backend
        sched = b.scheduler()
        if self._epoch == b.galloc_epoch:
            return
        L.unallocate(self.g)
        L.ggml_backend_sched_reset(sched)
        # ggml's scheduler points the sources of nodes that read another device's tensor
        # at copies it makes in its own context, which its reset frees: a graph split once
        # gets its own sources back before it is split again (also a new graph over nodes
        # of an earlier one in this context)
        g, saved = self._graph, self._srcs
        for i in range(L.ggml_graph_n_nodes(g)):
            p = L.ggml_graph_node(g, i)
            srcs = saved.get(p)
            if srcs is None:
                saved[p] = L.tensor_srcs(p)
            else:
                L.set_tensor_srcs(p, srcs)
        if b.gpu_ops:
            b.pin_to_gpu(self._graph)
        if not L.ggml_backend_sched_alloc_graph(sched, self._graph):
            raise OutOfMemoryError("ggml could not allocate the compute graph on its devices")
        b.galloc_epoch += 1
        self._epoch = b.galloc_epoch

    def _free_graph(self) -> None:
        if self._gctx:
            L.ggml_free(self._gctx)
        self._gctx = self._graph = None

    def close(self) -> None:
        if self._galloc:
            L.ggml_gallocr_free(self._galloc)
            self._galloc = 0
        if self.g:
            self._free_graph()
            L.ggml_free(self.g)
            self.g = 0
            self.backend._give_meta_buffer(self._buf)

    def __enter__(self) -> GGMLContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: ctypes may already be gone
            pass


def _aligned(buf: np.ndarray) -> int:
    addr: int = buf.ctypes.data
    return (addr + 63) // 64 * 64


def physical_cores() -> int:
    """Physical cores this process may run on (ggml's threads gain nothing from SMT)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:
        allowed = os.cpu_count() or 1
    cores = set()
    try:
        with open("/proc/cpuinfo") as f:
            phys = ""
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    cores.add((phys, line.split(":")[1].strip()))
    except OSError:
        pass
    return max(1, min(len(cores) or allowed, allowed))


@dataclass
class Device:
    """A ggml device as the layout sees it: what it reports, and its ggml handle."""

    info: DeviceInfo
    handle: int  # ggml_backend_dev_t


def system_memory() -> tuple[int, int]:
    """(total RAM, what can still be used: available RAM plus free swap), in bytes."""
    try:
        import psutil

        vm, swap = psutil.virtual_memory(), psutil.swap_memory()
        return int(vm.total), int(vm.available + swap.free)
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")


def probe_devices() -> list[Device]:
    """ggml's devices with their memory now; the CPU's free memory is what the system can
    still give (available RAM + free swap), not ggml's MemFree."""
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    out = []
    for i in range(L.ggml_backend_dev_count()):
        dev = L.ggml_backend_dev_get(i)
        kind = L.DEV_TYPE_NAMES.get(L.ggml_backend_dev_type(dev), "other")
        if kind == "cpu":
            total.value, free.value = system_memory()
        else:
            L.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        name = L.ggml_backend_dev_name(dev).decode()
        desc = L.ggml_backend_dev_description(dev).decode()
        out.append(Device(DeviceInfo(f"{name} ({desc})", kind, total.value, free.value), dev))
    return out


@dataclass
class _GPU:
    """A device that holds layers: its ggml backend and the buffer type it allocates."""

    index: int  # in the plan's GPU list
    device: Device
    backend: int
    buft: int


class GGMLBackend:
    """Weights mapped from the GGUF file (or copied to the GPUs that run their layers),
    persistent tensors, the CPU backend and, with GPUs in use, the scheduler.

    `options.extra`: `flash_attn` (default: HERD_FLASH_ATTENTION, else on when layers run
    on a GPU), `max_nodes`, `repack` (CPU weights in ggml's repacked layouts where its
    kernels have one; default on, as llama.cpp's CPU_REPACK buffers: prompts run faster
    and logits match its own),
    `exact_gelu` (tanh GELU composed from F32 ops instead of ggml's kernel, which reads
    an F16 table: ~1e-3 relative, what llama.cpp runs and so the default),
    `gpu_ops` (tests: every weight of no layer, persistent tensor and supported op on the
    first GPU in use), `device_probe` (tests: a callable returning the `Device`s to lay
    the model out on, instead of ggml's).
    """

    name = "ggml"

    def __init__(self, gguf: GGUFFile, options: BackendOptions) -> None:
        self.gguf = gguf
        self.options = options
        self.num_thread = options.num_thread or physical_cores()
        self.max_nodes = int(options.extra.get("max_nodes", 16384))
        self.cpu = self.galloc = self._wctx = self._wbuf = self.sched = 0
        self.galloc_epoch = 0  # counts graphs placed by the shared allocator (or scheduler)
        self._probe: Callable[[], list[Device]] = options.extra.get("device_probe") or (
            probe_devices
        )
        self.gpus: list[_GPU] = []  # the GPUs in use, in the scheduler's order
        self._on_gpus: set[int] = set()  # weights copied to a GPU
        self._sched_size = 0
        # device name -> (when probed, its info then, bytes allocated since)
        self._room: dict[str | None, tuple[float, DeviceInfo, int]] = {}
        self._meta_pool: list[np.ndarray] = []
        self._persistent: list[tuple[int, int]] = []  # (ggml context, backend buffer)
        self._weights: dict[str, GGMLTensor] = {}
        self.dev = next(
            d
            for i in range(L.ggml_backend_dev_count())
            if L.ggml_backend_dev_type(d := L.ggml_backend_dev_get(i)) == 0
        )
        # weight pointer -> its repacked copy for linear (0: not made yet); empty: option off
        self.packed: dict[int, int] = {}
        # AMX tiles need kernel permission a VM may not grant (SIGILL here): never by default
        self._extra_bufts = (
            [
                b
                for b in L.extra_buffer_types(self.dev)
                if L.ggml_backend_buft_name(b) != b"AMX" or options.extra.get("repack") == "amx"
            ]
            if options.extra.get("repack", True)
            else []
        )
        if not L.ggml_cpu_has_llamafile():
            log.warning(
                "ggml-python was built without GGML_LLAMAFILE: prompts and F16 "
                "attention run several times slower; reinstall with `make install` (or "
                'CMAKE_ARGS="-DGGML_LLAMAFILE=ON" pip install --force-reinstall '
                "--no-cache-dir ggml-python==0.0.45)"
            )
        infos = list(gguf.tensors.values())
        self._file = np.frombuffer(gguf.buffer(), dtype=np.uint8)
        _validate(gguf, len(self._file))
        devices = self._probe()
        cpu_info = next(d.info for d in devices if d.info.kind == "cpu")
        gpus = [d for d in devices if d.info.kind in ("gpu", "igpu")]
        self.gpu_ops = bool(options.extra.get("gpu_ops")) and bool(gpus)
        # OutOfMemoryError here, before any allocation
        self.plan: Plan = plan(gguf, options, [d.info for d in gpus], cpu_info, self.gpu_ops)
        # default: on where layers run on a GPU. On the CPU it is opt-in: there prompts ran
        # 6-8% and decode 3-4% faster (SmolLM2, Gemma 3, 2 threads), but ggml's CPU kernel
        # is less exact: SmolLM2's mean |delta log p| against the composed ops was 0.016
        # (llama.cpp's own flash attention differs from its default path by the same)
        fa = options.extra.get("flash_attn", envconfig.flash_attention())
        self.flash_attn = bool(self.plan.gpus) if fa is None else bool(fa)
        self.exact_gelu = bool(options.extra.get("exact_gelu", False))
        try:
            self.cpu = L.ggml_backend_cpu_init()
            if not self.cpu:
                raise BackendError("ggml: no CPU backend")
            L.ggml_backend_cpu_set_n_threads(self.cpu, self.num_thread)
            self.galloc = L.ggml_gallocr_new(L.ggml_backend_cpu_buffer_type())
            for g in self.plan.gpus:
                self.gpus.append(self._start(g, gpus[g]))
            self._wctx = L.ggml_init(
                L.InitParams(L.ggml_tensor_overhead() * (len(infos) + 1), None, True)
            )
            # the whole mapping, page-aligned, as one buffer: CPU weights are never copied
            base = self._file.ctypes.data
            self._wbuf = L.ggml_backend_cpu_buffer_from_ptr(base, len(self._file))
            L.ggml_backend_buffer_set_usage(self._wbuf, L.BUFFER_USAGE_WEIGHTS)
            for info in infos:
                if self.plan.tensors[info.name] is not None:
                    continue  # copied to its GPU below
                gtype = int(info.type)
                p = L.ggml_new_tensor(self._wctx, gtype, len(info.shape), L.NE4(*_ne(info.shape)))
                L.ggml_set_name(p, info.name.encode()[:63])
                if L.ggml_backend_tensor_alloc(self._wbuf, p, base + info.offset) != 0:
                    raise BackendError(f"ggml: cannot place weight {info.name}")
                self._weights[info.name] = GGMLTensor(p, info.shape, gtype, CONT, None)
            for gpu in self.gpus:
                self._copy_weights(gpu, base)
        except BaseException:
            self.close()
            raise
        self.n_static = len(self._weights)
        if self._extra_bufts:
            self.packed = {
                w.p: 0
                for w in self._weights.values()
                if len(w.shape) == 2 and w.gtype not in _FLOAT and w.p not in self._on_gpus
            }
        layers = self.plan.layers
        log.info(
            "ggml: %d/%d layers on %s; flash attention %s",
            sum(d is not None for d in layers),
            len(layers),
            ", ".join(g.device.info.name for g in self.gpus) or "CPU only",
            "on" if self.flash_attn else "off",
        )

    # ---- devices ------------------------------------------------------------------------
    def _start(self, index: int, device: Device) -> _GPU:
        backend = L.ggml_backend_dev_init(device.handle, None)
        if not backend:
            raise BackendError(f"ggml: cannot start {device.info.name}")
        if L.ggml_backend_dev_type(device.handle) == L.DEV_TYPE_CPU:  # a stand-in (tests)
            L.ggml_backend_cpu_set_n_threads(backend, self.num_thread)
        return _GPU(index, device, backend, L.ggml_backend_dev_buffer_type(device.handle))

    def _copy_weights(self, gpu: _GPU, base: int) -> None:
        """Copy the weights the plan puts on this GPU from the mapping into one buffer
        there (and token_embd as output.weight when the output layer is there, tied)."""
        names = [n for n, d in self.plan.tensors.items() if d == gpu.index]
        if self.plan.alias_output and self.plan.layers[self.plan.n_layers] == gpu.index:
            names.append("output.weight")
        tensors = self.gguf.tensors
        ctx = L.ggml_init(L.InitParams(L.ggml_tensor_overhead() * (len(names) + 1), None, True))
        made = []
        for name in names:
            info = tensors.get(name) or tensors["token_embd.weight"]
            gtype = int(info.type)
            p = L.ggml_new_tensor(ctx, gtype, len(info.shape), L.NE4(*_ne(info.shape)))
            L.ggml_set_name(p, name.encode()[:63])
            made.append((name, p, info))
        buf = L.ggml_backend_alloc_ctx_tensors_from_buft(ctx, gpu.buft)
        if not buf:
            L.ggml_free(ctx)
            nbytes = sum(info.nbytes for _, _, info in made)
            raise OutOfMemoryError(
                f"ggml: cannot allocate {size(nbytes)} of weights on {gpu.device.info.name}"
            )
        self._persistent.append((ctx, buf))
        L.ggml_backend_buffer_set_usage(buf, L.BUFFER_USAGE_WEIGHTS)
        for name, p, info in made:
            L.ggml_backend_tensor_set(p, base + info.offset, 0, info.nbytes)
            self._weights[name] = GGMLTensor(p, info.shape, int(info.type), CONT, None)
            self._on_gpus.add(p)

    def _device_for(self, layer: int | None) -> _GPU | None:
        """The GPU that holds `layer` (its KV cache); None: the CPU."""
        index = self.plan.device_of(layer)
        if index is None and self.gpu_ops and layer is None:
            return self.gpus[0]
        return next((g for g in self.gpus if g.index == index), None)

    def scheduler(self) -> int:
        """ggml's scheduler over [GPUs..., CPU], sized for the biggest graph a context can
        hold (made again when persistent tensors outgrow it)."""
        need = self.max_nodes + self.n_static + 256
        if self.sched and self._sched_size >= need:
            return self.sched
        if self.sched:
            L.ggml_backend_sched_free(self.sched)
            self.galloc_epoch += 1  # what the old one placed is gone
        backends = (ctypes.c_void_p * (len(self.gpus) + 1))(
            *[g.backend for g in self.gpus], self.cpu
        )
        self.sched = L.ggml_backend_sched_new(backends, None, len(backends), need, False, True)
        if not self.sched:
            raise BackendError("ggml: cannot create the backend scheduler")
        self._sched_size = need
        return self.sched

    def pin_to_gpu(self, graph: int) -> None:
        """Run every op of `graph` the first GPU supports there (option gpu_ops), except
        views and writes into persistent tensors, which stay with their buffer."""
        gpu = self.gpus[0].backend
        for i in range(L.ggml_graph_n_nodes(graph)):
            node = L.ggml_graph_node(graph, i)
            if L.tensor_is_view(node) or L.tensor_preallocated(node):
                continue
            if L.ggml_backend_supports_op(gpu, node):
                L.ggml_backend_sched_set_tensor_backend(self.sched, node, gpu)

    def repack(self, w: GGMLTensor) -> int:
        """A copy of weight w in the first of ggml's CPU extra buffer types (AMX, repacked
        quantized layouts for its GEMM kernels) whose mul_mat supports it; else w itself.

        ggml asks the buffer type itself, through a mul_mat op whose weight sits in a dummy
        buffer of that type (as llama.cpp does). Made on first use: a tied embedding is
        both gathered (plain) and multiplied (repacked), so only linear sees the copy.
        """
        overhead = L.ggml_tensor_overhead()
        probe = L.ggml_init(L.InitParams(overhead * 4, None, True))
        try:
            ne = L.NE4(*_ne(w.shape))
            t = L.ggml_new_tensor(probe, w.gtype, 2, ne)
            op = ggml_mul_mat(probe, t, L.ggml_new_tensor_2d(probe, TYPE_F32, w.shape[1], 1))
            for buft in self._extra_bufts:
                dummy = L.ggml_backend_buft_alloc_buffer(buft, 0)
                L.set_tensor_buffer(t, dummy)
                ok = L.ggml_backend_dev_supports_op(self.dev, op)
                L.set_tensor_buffer(t, None)
                L.ggml_backend_buffer_free(dummy)
                if not ok:
                    continue
                ctx = L.ggml_init(L.InitParams(overhead, None, True))
                q = L.ggml_new_tensor(ctx, w.gtype, 2, ne)
                buf = L.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft)
                if not buf:
                    L.ggml_free(ctx)
                    break
                L.ggml_backend_tensor_set(q, L.tensor_data(w.p), 0, L.ggml_nbytes(w.p))
                self.gguf.release(L.tensor_data(w.p) - self._file.ctypes.data, L.ggml_nbytes(w.p))
                self._persistent.append((ctx, buf))
                self.packed[w.p] = q
                return q  # type: ignore[no-any-return]
        finally:
            L.ggml_free(probe)
        self.packed[w.p] = w.p
        return w.p

    def has_weight(self, name: str) -> bool:
        return name in self._weights

    def weight(self, name: str) -> GGMLTensor:
        return self._weights[name]

    def alloc(self, shape: tuple[int, ...], dtype: DType, layer: int | None = None) -> GGMLTensor:
        gtype = _GTYPE[dtype]
        assert 1 <= len(shape) <= 4, f"alloc {shape}: ggml tensors have 1 to 4 dims"
        assert shape[-1] % _BLOCK[gtype] == 0, (
            f"alloc {shape} as {dtype.name}: last dim not a multiple of {_BLOCK[gtype]}"
        )
        gpu = self._device_for(layer)
        what = f"{dtype.name} tensor {tuple(shape)}"
        what += "" if layer is None else f" (layer {layer})"
        self._check_room(L.ggml_row_size(gtype, shape[-1]) * math.prod(shape[:-1]), gpu, what)
        ctx = L.ggml_init(L.InitParams(L.ggml_tensor_overhead() * 2, None, True))
        p = L.ggml_new_tensor(ctx, gtype, len(shape), L.NE4(*_ne(shape)))
        buft = gpu.buft if gpu else L.ggml_backend_cpu_buffer_type()
        buf = L.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft)
        if not buf:
            L.ggml_free(ctx)
            raise OutOfMemoryError(f"ggml: cannot allocate {what} (out of memory)")
        L.ggml_backend_buffer_clear(buf, 0)
        self._persistent.append((ctx, buf))
        self.n_static += 1
        return GGMLTensor(p, tuple(shape), gtype, CONT, None)

    def new_context(self) -> GGMLContext:
        return GGMLContext(self)

    def _check_room(self, nbytes: int, gpu: _GPU | None, what: str) -> None:
        """OutOfMemoryError unless the device has nbytes free, keeping the compute buffer
        estimate aside until a first graph has been placed."""
        name = gpu.device.info.name if gpu else None
        # one probe for a burst of allocations (a cache allocates two tensors per layer
        # in its first pass, and a probe reads the system's memory counters: ~0.3 ms)
        now = time.monotonic()
        when, info, used = self._room.get(name) or (-1.0, None, 0)
        if info is None or now - when > 1.0:
            info = next(
                d.info
                for d in self._probe()
                if (d.info.name == name if gpu else d.info.kind == "cpu")
            )
            when, used = now, 0
        free = info.free_memory - used
        keep = self.plan.graph if self.galloc_epoch == 0 else 0
        if nbytes + keep > free:
            raise OutOfMemoryError(
                f"{what} needs {size(nbytes)} on {info.name} (and {size(keep)} for compute), "
                f"but {size(free)} is available; lower num_ctx"
            )
        self._room[name] = (when, info, used + nbytes)

    def devices(self) -> list[DeviceInfo]:
        return [d.info for d in self._probe()]

    def _take_meta_buffer(self) -> np.ndarray:
        if self._meta_pool:
            return self._meta_pool.pop()
        return np.empty(self.max_nodes * L.ggml_tensor_overhead() + 64, dtype=np.uint8)

    def _give_meta_buffer(self, buf: np.ndarray) -> None:
        self._meta_pool.append(buf)

    def close(self) -> None:
        if self.sched:
            L.ggml_backend_sched_free(self.sched)
            self.sched = 0
        for ctx, buf in self._persistent:
            L.ggml_backend_buffer_free(buf)
            L.ggml_free(ctx)
        self._persistent.clear()
        self._weights.clear()
        if self._wbuf:
            L.ggml_backend_buffer_free(self._wbuf)
        if self._wctx:
            L.ggml_free(self._wctx)
        if self.galloc:
            L.ggml_gallocr_free(self.galloc)
        if self.cpu:
            L.ggml_backend_free(self.cpu)
        for gpu in self.gpus:
            L.ggml_backend_free(gpu.backend)
        self.gpus = []
        self.cpu = self.galloc = self._wctx = self._wbuf = 0
        self._meta_pool.clear()
        self.packed.clear()


_COMPUTE_TYPES = compute_types()


def _validate(gguf: GGUFFile, file_size: int) -> None:
    """Refuse, before any ggml call, what would make ggml abort or read past the mapping."""
    for info in gguf.tensors.values():
        where = f"{gguf.path}: tensor {info.name}"
        gtype = int(info.type)
        if gtype not in _COMPUTE_TYPES:
            raise GGUFError(
                f"{where} has type {_type_name(gtype)}, which this ggml build cannot compute with"
            )
        if not 1 <= len(info.shape) <= 4:
            raise GGUFError(f"{where} has {len(info.shape)} dims; ggml supports 1 to 4")
        rows = math.prod(info.shape[:-1])
        if (
            info.shape[-1] % _BLOCK[gtype]
            or L.ggml_row_size(gtype, info.shape[-1]) * rows != info.nbytes
        ):
            raise GGUFError(
                f"{where}: {info.nbytes} bytes do not hold {info.shape} {_type_name(gtype)}"
            )
        if info.offset < 0 or info.offset + info.nbytes > file_size:
            raise GGUFError(
                f"{where} runs past the end of the file (truncated download?): "
                f"needs byte {info.offset + info.nbytes}, file has {file_size}"
            )


def open_ggml(gguf: GGUFFile, options: BackendOptions | None = None) -> GGMLBackend:
    if not gguf.tensors:
        raise BackendError(f"{gguf.path}: no tensors")
    return GGMLBackend(gguf, options or BackendOptions())
