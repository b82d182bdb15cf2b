"""MlxTensor's ops that map onto MLX's own kernels: rope (`mx.fast.rope`), attention
(`mx.fast.scaled_dot_product_attention`), and images (`mx.conv2d`, NHWC on MLX, so
transposed at the boundary; average pooling composed so that it sums as torch does)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from herd.ml.base import RopeOptions
from herd.ml.rope import yarn_ramp

if TYPE_CHECKING:
    from herd.ml.backends.mlx.tensor import MlxTensor

Pair = int | tuple[int, int]


def _pair(v: Pair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def rope_freqs(opts: RopeOptions) -> tuple[np.ndarray, float]:
    """MLX's `freqs` (positions are divided by them) for ggml's rope, and the factor the
    rotated dims are multiplied by (YaRN's mscale, `attn_factor`).

    ggml's angle is interp * (1 - ramp) + extrap * ramp with interp = extrap * freq_scale,
    i.e. the position times inv_freq * (freq_scale (1 - ramp) + ramp): one divisor per
    frequency, so linear scaling and YaRN both fit `mx.fast.rope` (in float64 here)."""
    half = opts.dims // 2
    i = np.arange(half, dtype=np.float64)
    inv_freq = opts.base ** (-2.0 * i / opts.dims)
    ramp, mscale = yarn_ramp(opts, i)
    mult = np.full(half, opts.freq_scale) if ramp is None else opts.freq_scale * (1 - ramp) + ramp
    return (1.0 / (inv_freq * mult)).astype(np.float32), mscale


def rope(
    self: MlxTensor, positions: MlxTensor, opts: RopeOptions, freq_factors: MlxTensor | None = None
) -> MlxTensor:
    """Rotary embedding of x (T, H, D) at int positions (T,), by `mx.fast.rope`: each
    token is a batch of its own (T, H, 1, D) so that its position is that batch's offset."""
    s = self.shape
    assert len(s) == 3 and positions.shape == (s[0],), (
        f"rope: x {s} must be (T, H, D) with positions (T,), got {positions.shape}"
    )
    assert opts.dims % 2 == 0 and opts.dims <= s[2], f"rope: dims {opts.dims} of {s[2]}"
    freqs_np, mscale = rope_freqs(opts)
    freqs = mx.array(freqs_np)
    if freq_factors is not None:
        assert freq_factors.shape[-1] >= opts.dims // 2, (
            f"rope: {freq_factors.shape} frequency factors for {opts.dims} dims"
        )
        freqs = freqs * freq_factors._f32().reshape(-1)[: opts.dims // 2]  # divide each frequency
    t, h, d = s
    x = self._f32().reshape(t, h, 1, d)
    out = mx.fast.rope(
        x,
        opts.dims,
        traditional=not opts.neox,
        base=None,
        scale=1.0,
        offset=positions._ints(),
        freqs=freqs,
    ).reshape(t, h, d)
    if mscale != 1.0:  # cos and sin both scaled: the rotated dims, not the rest
        out = mx.concatenate([out[..., : opts.dims] * mscale, out[..., opts.dims :]], axis=-1)
    return self._new(out, positions, freq_factors)


def scaled_dot_product_attention(
    self: MlxTensor,
    k: MlxTensor,
    v: MlxTensor,
    mask: MlxTensor | None,
    scale: float,
    fused: bool | None = None,
    prefix: tuple[MlxTensor, MlxTensor] | None = None,
) -> MlxTensor:
    """q=self (T, Hq, D), k (S, Hkv, D), v (S, Hkv, Dv), mask (T, S) or None -> (T, Hq * Dv).
    (No sequences' axis here, so never a prefix: `prefix` is for streams' backends.)

    `mx.fast.scaled_dot_product_attention` on (1, H, T, D) operands: MLX shares K/V heads
    over consecutive query heads itself (Hq a multiple of Hkv), and takes the additive
    mask as it is (-inf cells). Computed in float32 like every op here (an F16 cache is
    widened). Opened with `flash_attention=False` (and `fused` not True): composed from
    matmul_t and softmax, as nn would."""
    assert prefix is None, "a prefix is attended with streams only"
    (t, hq, d), (s, hkv, dk), dv = self.shape, k.shape, v.shape[2]
    assert d == dk and v.shape[:2] == (s, hkv) and hq % hkv == 0, (
        f"attention: q {self.shape}, k {k.shape}, v {v.shape}"
    )
    assert mask is None or mask.shape == (t, s), f"attention: mask {mask} for ({t}, {s})"
    c = self.ctx or k.ctx or v.ctx
    assert c is not None, "attention on tensors that belong to no context"
    if not (c.backend.flash_attention if fused is None else fused):
        probs = self.permute(1, 0, 2).matmul_t(k.permute(1, 0, 2)).softmax(mask, scale)
        out_h = probs.matmul_t(v.permute(1, 2, 0))  # (Hq, T, Dv)
        return out_h.permute(1, 0, 2).reshape(t, hq * dv)
    q = self._f32().transpose(1, 0, 2)[None]  # (1, Hq, T, D)
    kh = k._f32().transpose(1, 0, 2)[None]  # (1, Hkv, S, D)
    vh = v._f32().transpose(1, 0, 2)[None]  # (1, Hkv, S, Dv)
    m = mask._f32() if mask is not None else None
    out = mx.fast.scaled_dot_product_attention(q, kh, vh, scale=scale, mask=m)  # (1, Hq, T, Dv)
    return self._new(out[0].transpose(1, 0, 2).reshape(t, hq * dv), k, v, mask)


def conv2d(
    self: MlxTensor, w: MlxTensor, stride: Pair = 1, padding: Pair = 0, dilation: Pair = 1
) -> MlxTensor:
    """x (N, C, H, W) by kernel (Cout, C, KH, KW) -> (N, Cout, OH, OW): `mx.conv2d` on
    NHWC, the result a transposed view of (N, OH, OW, Cout) as on the other backends."""
    xs, ws = self.shape, w.shape
    assert len(xs) == 4 and len(ws) == 4 and xs[1] == ws[1], f"conv2d: x {xs} with w {ws}"
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    assert min(sh, sw, dh, dw) >= 1 and min(ph, pw) >= 0, (
        f"conv2d: stride {stride}, padding {padding}, dilation {dilation}"
    )
    x = self._f32().transpose(0, 2, 3, 1)  # (N, H, W, C)
    kernel = w._f32().transpose(0, 2, 3, 1)  # (Cout, KH, KW, C)
    y = mx.conv2d(x, kernel, stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw))
    return self._new(y.transpose(0, 3, 1, 2), w)  # (N, Cout, OH, OW)


def avg_pool2d(
    self: MlxTensor, kernel: Pair, stride: Pair | None = None, padding: Pair = 0
) -> MlxTensor:
    """torch's avg_pool2d (count_include_pad): each window summed in float32 row by row,
    then divided by the whole window, as torch's CPU kernel and the NumPy oracle do, so
    that the results are theirs bit for bit."""
    (kh, kw), (ph, pw) = _pair(kernel), _pair(padding)
    sh, sw = _pair(stride) if stride is not None else (kh, kw)
    assert len(self.shape) == 4, f"avg_pool2d of {self.shape}: expected (N, C, H, W)"
    assert min(kh, kw, sh, sw) >= 1 and 0 <= ph <= kh // 2 and 0 <= pw <= kw // 2, (
        f"avg_pool2d: kernel {kernel}, stride {stride}, padding {padding}"
    )
    x = self._f32()
    if ph or pw:
        x = mx.pad(x, [(0, 0), (0, 0), (ph, ph), (pw, pw)])
    _, _, h, wd = x.shape
    oh, ow = (h - kh) // sh + 1, (wd - kw) // sw + 1
    acc = None
    for i in range(kh):
        for j in range(kw):
            win = x[:, :, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
            acc = win if acc is None else acc + win
    assert acc is not None
    return self._new(acc / float(kh * kw))
