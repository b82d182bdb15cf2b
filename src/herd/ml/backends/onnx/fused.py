"""ONNX Runtime's fused contrib kernels in place of composed nodes, for `OnnxTensor`.

A decode step of a small model is mostly per-node overhead (SmolLM2 135M: ~2000 nodes a
token), so a few ops that were many nodes each become one kernel:

- rope: `com.microsoft::RotaryEmbedding` over (1, T, H*D), its cos/sin tables the pass's
  own angles (one row per token, made once per pass from the positions as ops.rope makes
  them) read from position 0: 3 nodes per rotated tensor instead of 9 (NeoX) or 14
  (adjacent pairs). Whole-head rotation only; a partial one (dims < head size) stays
  composed.

Measured and not kept: ONNX's opset-23 `Attention` (grouped K/V heads, additive mask) runs
on onnxruntime 1.32's CPU provider, but SmolLM2's decode fell from 51.7 to 47.6 tok/s and
its prefill from 504 to 464 tok/s against the composed attention (one process, turns
alternating; alone, 1 query over 512 cells: 135 us against 107 us a layer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto

from herd.ml.backends.onnx import ops
from herd.ml.base import RopeOptions

if TYPE_CHECKING:
    from herd.ml.backends.onnx.tensor import OnnxTensor

MS = "com.microsoft"


def rope(
    x: OnnxTensor, positions: OnnxTensor, opts: RopeOptions, freq_factors: OnnxTensor | None
) -> OnnxTensor | None:
    """x (T, H, D) rotated by RotaryEmbedding; None where it does not fit (partial rotation)."""
    t, h, d = x.shape
    if opts.dims != d or len(positions.shape) != 1:
        return None
    c = ops._ctx(x, positions)
    g = c.g
    ff = None
    if freq_factors is not None:
        assert freq_factors.host is not None, "rope: freq_factors must be a weight"
        ff = np.asarray(freq_factors.host, np.float32).reshape(-1)
    factors, mscale = ops.angle_factors(opts, ff)
    key = ("rope-tables", c.val(positions), factors.tobytes(), mscale)
    if key not in c.memo:  # every layer rotates by the same angles: made once per pass
        pos = g.op("Cast", [c.val(positions)], to=TensorProto.FLOAT)
        theta = g.op("Mul", [g.op("Unsqueeze", [pos, g.const([-1])]), g.const(factors, np.float32)])
        cos, sin = g.op("Cos", [theta]), g.op("Sin", [theta])  # (T, D/2)
        if mscale != 1.0:
            m = g.const(mscale, np.float32)
            cos, sin = g.op("Mul", [cos, m]), g.op("Mul", [sin, m])
        c.memo[key] = (cos, sin)
    cos, sin = c.memo[key]
    x3 = g.op("Reshape", [c.f32(x), g.const([1, -1, h * d])])
    y = g.op("RotaryEmbedding", [x3, g.const([0]), cos, sin], domain=MS,
             interleaved=0 if opts.neox else 1, num_heads=h, rotary_embedding_dim=d)  # fmt: skip
    y = g.op("Reshape", [y, g.const([-1, h, d])])
    return x._out(y, x.shape, positions)
