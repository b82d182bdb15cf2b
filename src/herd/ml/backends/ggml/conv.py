"""Convolution and pooling of NCHW images: GGMLTensor's `conv2d` and `avg_pool2d`.

NumPy (N, C, H, W) is ggml ne [W, H, C, N] and a kernel (Cout, C, KH, KW) is ne
[KW, KH, C, Cout]: ggml's own image order, so operands go in as they are, with ggml's
(x, y) arguments given (W, H).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from herd.ml.backends.ggml import _lib as L
from herd.ml.backends.ggml._lib import TYPE_BF16, TYPE_F16, TYPE_F32, ggml_mul_mat
from herd.ml.backends.ggml.dtypes import CONT

if TYPE_CHECKING:
    from herd.ml.backends.ggml.tensor import GGMLTensor

Pair = int | tuple[int, int]


def pair(v: Pair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def out_size(size: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
    """Output length along one axis (torch's and ggml's formula, rounding down)."""
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def conv2d(
    x: GGMLTensor, w: GGMLTensor, stride: Pair = 1, padding: Pair = 0, dilation: Pair = 1
) -> GGMLTensor:
    """x (N, C, H, W) * w (Cout, C, KH, KW) -> (N, Cout, OH, OW), a permuted view of the
    (N, OH, OW, Cout) product of F32 patches (im2col) and the kernel as a (Cout, C*KH*KW)
    matrix."""
    c = x._c(w)
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    xs, ws = x.shape, w.shape
    assert len(xs) == 4 and len(ws) == 4 and xs[1] == ws[1], f"conv2d: x {xs} with w {ws}"
    n, ch, h, wd = xs
    cout, _, kh, kw = ws
    oh, ow = out_size(h, kh, sh, ph, dh), out_size(wd, kw, sw, pw, dw)
    assert min(sh, sw, dh, dw) >= 1 and min(ph, pw) >= 0 and oh > 0 and ow > 0, (
        f"conv2d: x {xs}, w {ws}, stride {stride}, padding {padding}, dilation {dilation}"
    )
    # patches in F32 whatever the kernel's type (ggml_conv_2d makes them in the kernel's:
    # F16 patches cost ~2e-4 relative); im2col reads the kernel for its shape only
    p = L.ggml_im2col(c.g, w.p, c.f32(x, CONT), sw, sh, pw, ph, dw, dh, True, TYPE_F32)
    cols = c.node(p)  # ne [C*KH*KW, OW, OH, N]
    # F16/BF16 kernels widened to F32 (one small copy): an F16 first operand would round
    # the patches to F16 in the product, and F32 x F32 is the CPU's fastest kernel here;
    # quantized kernels go in as they are, as linear's weights
    if w.gtype in (TYPE_F16, TYPE_BF16) or w.lay != CONT:
        km = c.f32(w, CONT)
    else:
        km = w.p
    km = c.node(L.ggml_reshape_2d(c.g, km, ch * kh * kw, cout))
    y = c.out(ggml_mul_mat(c.g, km, cols), (n, oh, ow, cout))  # ne [Cout, OW, OH, N]
    # a view: patch embeddings permute it back to (N, OH, OW, Cout) rows with no copy
    return y.permute(0, 3, 1, 2)


def avg_pool2d(
    x: GGMLTensor, kernel: Pair, stride: Pair | None = None, padding: Pair = 0
) -> GGMLTensor:
    """Average pooling of x (N, C, H, W), padding counted in the average (torch's
    count_include_pad=True), by ggml_pool_2d."""
    c = x._c()
    (kh, kw), (ph, pw) = pair(kernel), pair(padding)
    sh, sw = pair(stride) if stride is not None else (kh, kw)
    assert len(x.shape) == 4, f"avg_pool2d of {x.shape}: expected (N, C, H, W)"
    n, ch, h, wd = x.shape
    oh, ow = out_size(h, kh, sh, ph), out_size(wd, kw, sw, pw)
    assert min(kh, kw, sh, sw) >= 1 and 0 <= ph <= kh // 2 and 0 <= pw <= kw // 2, (
        f"avg_pool2d: kernel {kernel}, stride {stride}, padding {padding}"
    )
    assert oh > 0 and ow > 0, f"avg_pool2d: kernel {kernel} larger than {x.shape}"
    p = L.ggml_pool_2d(c.g, c.f32(x, CONT), L.POOL_AVG, kw, kh, sw, sh, float(pw), float(ph))
    return c.out(p, (n, ch, oh, ow))
