"""Matrix products of GGMLTensor: `linear` (weights as stored, or their repacked copy),
`linear_t` (a weight stored transposed: LoRA's B), `matmul_t` (attention) and
`mul_mat_id` (experts)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from herd.ml.backends.ggml import _lib as L
from herd.ml.backends.ggml._lib import TYPE_F16, ggml_mul_mat, ggml_reshape_2d
from herd.ml.backends.ggml.dtypes import CONT
from herd.ml.base import mul_mat_id_shape

if TYPE_CHECKING:
    from herd.ml.backends.ggml.backend import GGMLBackend
    from herd.ml.backends.ggml.tensor import GGMLTensor


def linear(self: GGMLTensor, w: GGMLTensor) -> GGMLTensor:
    c = self._c(w)
    ws, xs = w.shape, self.shape
    assert len(ws) == 2 and ws[1] == xs[-1], f"linear: x {xs} @ w.T with w {ws}"
    w_p = c.src0(w)
    packed = c.backend.packed
    if packed and (q := packed.get(w_p)) is not None:  # repacked copy (option "repack")
        w_p = q or c.backend.repack(w)
        if w_p != w.p:  # the repacked kernels read x as one contiguous matrix
            return c.out(ggml_mul_mat(c.g, w_p, c.f32(self, CONT)), xs[:-1] + (ws[0],))
    if w.gtype == TYPE_F16 and _widens(c.backend, w, xs):
        w_p = c.f32(w)
    return c.out(ggml_mul_mat(c.g, w_p, c.f32(self)), xs[:-1] + (ws[0],))


# An F16 weight times many rows on a CPU without F16 vector arithmetic (x86): ggml's F16
# GEMM converts both operands tile by tile and ran ~1.5x slower than its F32 one (SigLIP's
# q/k/v/o 567 vs 375 ms a layer, its MLP 1070 vs 753; a Gemma 3 image encoded 1.27x
# transformers' time, then 1.00x). Widened once per graph, the weight costs one pass over
# it. At most WIDEN_MAX elements: the compute buffer grows by 64 MB at most.
WIDEN_ROWS, WIDEN_MAX = 64, 1 << 24


def _widens(b: GGMLBackend, w: GGMLTensor, xs: tuple[int, ...]) -> bool:
    if not b.widen_f16 or math.prod(xs[:-1]) < WIDEN_ROWS or math.prod(w.shape) > WIDEN_MAX:
        return False
    return not b.on_gpu(w)


def linear_t(self: GGMLTensor, wt: GGMLTensor) -> GGMLTensor:
    c = self._c(wt)
    (k, n), xs = wt.shape, self.shape
    assert len(xs) == 2 and xs[1] == k, f"linear_t: x {xs} @ wt {wt.shape}"
    # out_prod: dst[t] = sum_k x[t, k] wt[k], axpys of whole rows (mul_mat's short
    # rows cost one dot product call each: a 960x48 B took 14 us, its transpose 3)
    x = c.f32(self, CONT)
    xt = L.ggml_transpose(c.g, x) if xs[0] > 1 else ggml_reshape_2d(c.g, x, 1, k)
    return c.out(L.ggml_out_prod(c.g, c.f32(wt, CONT), c.node(xt)), (xs[0], n))


def matmul_t(self: GGMLTensor, other: GGMLTensor) -> GGMLTensor:
    c = self._c(other)
    a, b = self.shape, other.shape
    assert len(a) == 3 and len(b) == 3 and a[2] == b[2], f"matmul_t: {a} x {b}"
    assert a[0] % b[0] == 0, f"matmul_t: batch {a[0]} not a multiple of {b[0]}"
    # ggml_mul_mat(other, self) broadcasts other's batches over consecutive groups
    return c.out(ggml_mul_mat(c.g, c.src0(other), c.f32(self)), (a[0], a[1], b[1]))


def mul_mat_id(self: GGMLTensor, w: GGMLTensor, ids: GGMLTensor) -> GGMLTensor:
    c = self._c(ids)
    shape = mul_mat_id_shape(self.shape, w.shape, ids.shape)
    # ggml: as [I, O, E] (any weight type) x b [I, K or 1, T] by ids [K, T] -> [O, K, T]
    p = L.ggml_mul_mat_id(c.g, c.src0(w), c.f32(self), c.i32(ids))
    return c.out(p, shape)
