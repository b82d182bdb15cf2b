"""Rotary position embedding angles, computed on the host as ggml defines them.

Shared by backends that do not have a native rope kernel (NumPy). Includes linear
scaling, per-frequency factors (Llama 3.1 `rope_freqs`) and YaRN ramping.
"""

from __future__ import annotations

import math

import numpy as np

from herd.ml.base import RopeOptions


def _corr_dim(n_dims: int, n_ctx_orig: int, n_rot: float, base: float) -> float:
    return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))


def rope_cos_sin(
    positions: np.ndarray, opts: RopeOptions, freq_factors: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, each (T, dims/2), for int positions (T,)."""
    half = opts.dims // 2
    i = np.arange(half, dtype=np.float64)
    inv_freq = opts.base ** (-2.0 * i / opts.dims)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.astype(np.float64)[:half]
    extrap = positions.astype(np.float64)[:, None] * inv_freq[None, :]
    interp = extrap * opts.freq_scale
    ramp, mscale = yarn_ramp(opts, i)
    theta = interp if ramp is None else interp * (1.0 - ramp) + extrap * ramp
    return (np.cos(theta) * mscale).astype(np.float32), (np.sin(theta) * mscale).astype(np.float32)


def apply_rope(
    x: np.ndarray, positions: np.ndarray, opts: RopeOptions, freq_factors: np.ndarray | None = None
) -> np.ndarray:
    """x (T, H, D) float32 -> rotated copy; dims beyond opts.dims pass through."""
    cos, sin = rope_cos_sin(positions, opts, freq_factors)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, dims/2)
    out = x.astype(np.float32, copy=True)
    rot = x[..., : opts.dims]
    if opts.neox:
        half = opts.dims // 2
        a, b = rot[..., :half], rot[..., half:]
        out[..., :half] = a * cos - b * sin
        out[..., half : opts.dims] = a * sin + b * cos
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out[..., 0 : opts.dims : 2] = a * cos - b * sin
        out[..., 1 : opts.dims : 2] = a * sin + b * cos
    return out


def yarn_ramp(opts: RopeOptions, i: np.ndarray) -> tuple[np.ndarray | None, float]:
    """YaRN's per-frequency ramp (0: interpolate, 1: extrapolate) for frequency indices i,
    and the factor rotated dims are multiplied by; (None, attn_factor) without YaRN."""
    if opts.ext_factor == 0.0:
        return None, opts.attn_factor
    low = max(0.0, math.floor(_corr_dim(opts.dims, opts.orig_ctx, opts.beta_fast, opts.base)))
    high = min(
        opts.dims - 1.0, math.ceil(_corr_dim(opts.dims, opts.orig_ctx, opts.beta_slow, opts.base))
    )
    y = (i - low) / max(0.001, high - low)
    ramp = (1.0 - np.clip(y, 0.0, 1.0)) * opts.ext_factor
    return ramp, opts.attn_factor * (1.0 + 0.1 * math.log(1.0 / opts.freq_scale))
