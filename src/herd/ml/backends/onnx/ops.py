"""Images (NCHW) and rotary embeddings as ONNX nodes, for `OnnxTensor`.

Rope builds cos and sin inside the graph from the positions input, so a decode step's
graph takes only the new positions: each rotated pair's angle is position x a constant
per-pair factor, computed on the host in float64 exactly as `herd.ml.rope` does (base,
linear scaling, `rope_freqs` and YaRN's ramp folded into it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from herd.ml.base import DType, RopeOptions
from herd.ml.rope import yarn_ramp

if TYPE_CHECKING:
    from herd.ml.backends.onnx.tensor import OnnxTensor

Pair = int | tuple[int, int]


def _pair(v: Pair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv2d(
    self: OnnxTensor, w: OnnxTensor, stride: Pair = 1, padding: Pair = 0, dilation: Pair = 1
) -> OnnxTensor:
    xs, ks = self.shape, w.shape
    assert len(xs) == 4 and len(ks) == 4 and xs[1] == ks[1], f"conv2d: x {xs} with w {ks}"
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    assert min(sh, sw, dh, dw) >= 1 and min(ph, pw) >= 0, (
        f"conv2d: stride {stride}, padding {padding}, dilation {dilation}"
    )
    cout, _, kh, kw = ks
    oh = (xs[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (xs[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    c = _ctx(self, w)
    y = c.g.op(
        "Conv",
        [c.f32(self), c.f32(w)],
        strides=[sh, sw],
        pads=[ph, pw, ph, pw],
        dilations=[dh, dw],
        kernel_shape=[kh, kw],
    )
    return self._out(y, (xs[0], cout, oh, ow), w)


def avg_pool2d(
    self: OnnxTensor, kernel: Pair, stride: Pair | None = None, padding: Pair = 0
) -> OnnxTensor:
    (kh, kw), (ph, pw) = _pair(kernel), _pair(padding)
    sh, sw = _pair(stride) if stride is not None else (kh, kw)
    xs = self.shape
    assert len(xs) == 4, f"avg_pool2d of {xs}: expected (N, C, H, W)"
    assert min(kh, kw, sh, sw) >= 1 and 0 <= ph <= kh // 2 and 0 <= pw <= kw // 2, (
        f"avg_pool2d: kernel {kernel}, stride {stride}, padding {padding}"
    )
    c = _ctx(self)
    y = c.g.op(
        "AveragePool",
        [c.f32(self)],
        kernel_shape=[kh, kw],
        strides=[sh, sw],
        pads=[ph, pw, ph, pw],
        count_include_pad=1,
    )
    oh, ow = (xs[2] + 2 * ph - kh) // sh + 1, (xs[3] + 2 * pw - kw) // sw + 1
    return self._out(y, (xs[0], xs[1], oh, ow))


def angle_factors(opts: RopeOptions, freq_factors: np.ndarray | None) -> tuple[np.ndarray, float]:
    """Per rotated pair, what its angle is the position times; and YaRN's magnitude."""
    half = opts.dims // 2
    i = np.arange(half, dtype=np.float64)
    inv_freq = opts.base ** (-2.0 * i / opts.dims)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.astype(np.float64)[:half]
    ramp, mscale = yarn_ramp(opts, i)
    f = (
        inv_freq * opts.freq_scale
        if ramp is None
        else inv_freq * (opts.freq_scale * (1 - ramp) + ramp)
    )
    return f.astype(np.float32), float(mscale)


def rope(
    self: OnnxTensor,
    positions: OnnxTensor,
    opts: RopeOptions,
    freq_factors: OnnxTensor | None = None,
) -> OnnxTensor:
    xs = self.shape
    assert len(xs) == 3 and opts.dims <= xs[2] and opts.dims % 2 == 0, f"rope of {xs}: {opts}"
    from herd.ml.backends.onnx import fused  # one RotaryEmbedding kernel where it fits

    if (fast := fused.rope(self, positions, opts, freq_factors)) is not None:
        return fast
    t, h, d = xs
    half, dims = opts.dims // 2, opts.dims
    c = _ctx(self, positions)
    g = c.g
    ff_host = None
    if freq_factors is not None:
        assert freq_factors.host is not None, "rope: freq_factors must be a weight"
        ff_host = np.asarray(freq_factors.host, np.float32).reshape(-1)
    factors, mscale = angle_factors(opts, ff_host)
    # every layer rotates by the same angles: cos and sin made once per pass
    key = ("rope", c.val(positions), factors.tobytes(), mscale)
    if key not in c.memo:
        pos = g.op("Cast", [c.val(positions)], to=1)
        theta = g.op("Reshape", [pos, g.const([t, 1, 1])])
        theta = g.op("Mul", [theta, g.const(factors, np.float32)])
        cos, sin = g.op("Cos", [theta]), g.op("Sin", [theta])  # (T, 1, half)
        if mscale != 1.0:
            m = g.const(mscale, np.float32)
            cos, sin = g.op("Mul", [cos, m]), g.op("Mul", [sin, m])
        c.memo[key] = (cos, sin)
    cos, sin = c.memo[key]
    x = c.f32(self)
    rot = x if dims == d else g.op("Slice", [x, g.const([0]), g.const([dims]), g.const([2])])
    if opts.neox:
        a = g.op("Slice", [rot, g.const([0]), g.const([half]), g.const([2])])
        b = g.op("Slice", [rot, g.const([half]), g.const([dims]), g.const([2])])
    else:  # adjacent pairs: (T, H, half, 2)
        cos = g.op("Unsqueeze", [cos, g.const([-1])])
        sin = g.op("Unsqueeze", [sin, g.const([-1])])
        pairs = g.op("Reshape", [rot, g.const([t, h, half, 2])])
        a = g.op("Slice", [pairs, g.const([0]), g.const([1]), g.const([3])])
        b = g.op("Slice", [pairs, g.const([1]), g.const([2]), g.const([3])])
    ra = g.op("Sub", [g.op("Mul", [a, cos]), g.op("Mul", [b, sin])])
    rb = g.op("Add", [g.op("Mul", [a, sin]), g.op("Mul", [b, cos])])
    if opts.neox:
        out = g.op("Concat", [ra, rb], axis=-1)
    else:
        out = g.op("Reshape", [g.op("Concat", [ra, rb], axis=-1), g.const([t, h, dims])])
    if dims < d:
        rest = g.op("Slice", [x, g.const([dims]), g.const([d]), g.const([2])])
        out = g.op("Concat", [out, rest], axis=-1)
    return self._out(out, xs, positions)


def _ctx(*tensors: OnnxTensor | None):  # type: ignore[no-untyped-def]
    for t in tensors:
        if t is not None and t.ctx is not None:
            return t.ctx
    raise AssertionError("op on tensors that belong to no context (weights only)")


__all__ = ["DType", "avg_pool2d", "conv2d", "rope"]
