"""ONNX Runtime's fused contrib kernels in place of composed nodes, for `OnnxTensor`.

A decode step of a small model is mostly per-node overhead (SmolLM2 135M: ~2000 nodes a
token), so a few ops that were many nodes each become one kernel:

- rope: `com.microsoft::RotaryEmbedding` over (1, T, H*D), its cos/sin tables the pass's
  own angles (one row per token, made once per pass from the positions as ops.rope makes
  them) read from position 0: 3 nodes per rotated tensor instead of 9 (NeoX) or 14
  (adjacent pairs). Whole-head rotation only; a partial one (dims < head size) stays
  composed.
- a decoding row's attention: `com.microsoft::GroupQueryAttention` with the layer's K/V
  cache as both its past and its present, one buffer (the backend keeps the cache heads
  first, (1, H, cells, D), its layout), so ORT writes the row's keys and values into
  their cell and attends cells [0, cell] where they lie: no slice, scatter or cast of the
  attended cells, and nothing for the host to store after the step. herd's mask is its
  attention bias (a sliding window, a cell of another sequence). It applies where the
  row's sequence starts at cell 0 and sees no cell after the one it writes (the cache
  places a sequence's tokens after its own cells), checked by the host each run. Where q
  and k come from rope by the same angles, the kernel rotates them itself (`do_rotary`):
  its cos/sin caches are the pass's one row repeated cell + 1 times, as it indexes them by
  the cell, so the angle stays the row's position whatever its cell (head sizes in
  multiples of 16, its rotary's rule). graph.py then hands it the merged q/k/v product
  packed (no Split). SmolLM2's decode graph: 677 -> 470 nodes, decode 1.04x (Q4_0 file,
  8 pairs).

Measured and not kept: ONNX's opset-23 `Attention` (grouped K/V heads, additive mask) runs
on onnxruntime 1.32's CPU provider, but SmolLM2's decode fell from 51.7 to 47.6 tok/s and
its prefill from 504 to 464 tok/s against the composed attention (one process, turns
alternating; alone, 1 query over 512 cells: 135 us against 107 us a layer).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto, helper

from herd.ml.backends.onnx import ops
from herd.ml.base import RopeOptions

if TYPE_CHECKING:
    from herd.ml.backends.onnx.context import OnnxContext, Write
    from herd.ml.backends.onnx.tensor import OnnxTensor

MS = "com.microsoft"
ROTARY_INSIDE = True  # a decoding row's rotary embedding inside GroupQueryAttention
log = logging.getLogger(__name__)


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
    out = x._out(y, x.shape, positions)
    out.rotated = (x3, cos, sin, not opts.neox)
    return out


def attention_in_place(
    q: OnnxTensor, k: OnnxTensor, v: OnnxTensor, mask: OnnxTensor | None, scale: float
) -> OnnxTensor | None:
    """q (1, Hq, D) over k, v read from heads-first caches from cell 0 (`rows_of`), this
    step's row written into each at a host-given cell: GroupQueryAttention in place (the
    module docstring), -> (1, Hq * D). None where that does not fit: nn composes it."""
    if q.shape[0] != 1 or mask is None or k.rows_of is None or v.rows_of is None:
        return None
    (kc, k_lo, _), (vc, v_lo, _) = k.rows_of, v.rows_of
    _, hq, d = q.shape
    _, hkv, dv = v.shape
    if k_lo or v_lo or not (kc.heads_first and vc.heads_first) or dv != d or hq % hkv or d % 8:
        return None  # (ORT's kernel takes head sizes in multiples of 8)
    c = ops._ctx(q, k, v, mask)
    wk, wv = _step_write(c, kc), _step_write(c, vc)
    mask_in = c._input_index.get(mask.name or "")
    if wk is None or wv is None or wk.ids is not wv.ids or mask_in is None:
        return None
    g = c.g
    cell_in = c._input_index[wk.ids.name or ""]
    lens = ("in-place cell", wk.ids.name)
    if lens not in c.memo:  # every layer of the pass writes the same cell: [0, cell] seen
        seqlens = g.op("Cast", [c.val(wk.ids)], to=TensorProto.INT32)
        total = g.op("Squeeze", [g.op("Add", [seqlens, g.const([1], np.int32)]), g.const([0])])
        c.memo[lens] = (seqlens, total)
    seqlens, total = c.memo[lens]
    end_key = ("in-place end", wk.ids.name)
    if end_key not in c.memo:
        c.memo[end_key] = (g.op("Add", [wk.ids64, g.const([1])]), "")
    end = c.memo[end_key][0]  # cell + 1, int64 (1,)
    seen = ("in-place bias", wk.ids.name, mask.name)
    if seen not in c.memo:  # the mask's columns [0, cell], one per cache of the pass
        cols = g.op("Slice", [c.f32(mask), g.const([0]), end, g.const([1])])
        c.memo[seen] = (g.op("Reshape", [cols, g.const([1, 1, 1, -1])]), "")
    bias = c.memo[seen][0]
    row = g.const([1, 1, -1])
    # (its rotary takes head sizes in multiples of 16)
    rotation = _one_rotation(q, wk) if ROTARY_INSIDE and d % 16 == 0 else None
    if rotation is None:
        query, key = g.op("Reshape", [c.f32(q), row]), g.op("Reshape", [wk.rows, row])
        cos = sin = ""
        rotary: dict[str, int] = {}
    else:
        query, key, cos, sin, interleaved = rotation
        cos, sin = _rotary_tables(c, cos, sin, end, d)
        rotary = {"do_rotary": 1, "rotary_interleaved": int(interleaved)}
    past_k, past_v = c._bind(kc), c._bind(vc)
    out, present_k, present_v = g.op(
        "GroupQueryAttention",
        [query, key, g.op("Reshape", [wv.rows, row]), past_k, past_v, seqlens, total, cos, sin,
         "", bias],
        n_out=3, domain=MS, num_heads=hq, kv_num_heads=hkv, scale=float(scale), **rotary,
    )  # fmt: skip
    c.aliases[present_k], c.aliases[present_v] = past_k, past_v
    wk.in_place = wv.in_place = True
    c.in_place.append((mask_in, cell_in))
    y = g.op("Reshape", [out, g.const([1, hq * d])])
    return q._out(y, (1, hq * d), k, v, mask)


def _one_rotation(q: OnnxTensor, wk: Write) -> tuple[str, str, str, str, bool] | None:
    """Where q and the written key are RotaryEmbedding's outputs by the same angles: their
    inputs, as (1, 1, H*D), the tables and the pairing, for the attention to rotate them
    itself (its kernel writes the key rotated). The rope nodes are then left unread."""
    if q.rotated is None or wk.rotated is None:
        return None
    (qx, qcos, qsin, q_inter), (kx, kcos, ksin, k_inter) = q.rotated, wk.rotated
    if (qcos, qsin, q_inter) != (kcos, ksin, k_inter):
        return None
    return qx, kx, qcos, qsin, q_inter


def _rotary_tables(c: OnnxContext, cos: str, sin: str, end: str, d: int) -> tuple[str, str]:
    """The step's one row of cos and sin (1, D/2) as GroupQueryAttention's caches, which it
    indexes by the written cell and checks to hold at least cell + 1 (`end`) rows: the row
    repeated that many times, once per pass and table."""
    key = ("rotary caches", cos, sin)
    if key not in c.memo:
        g = c.g
        shape = g.op("Concat", [end, g.const([d // 2])], axis=0)
        c.memo[key] = (g.op("Expand", [cos, shape]), g.op("Expand", [sin, shape]))
    return c.memo[key]


def _step_write(c: OnnxContext, cache: OnnxTensor) -> Write | None:
    """The one write this pass made to `cache` (heads first, so F32) before it was read:
    one row, at a cell the host gives (the row is then GroupQueryAttention's new key)."""
    assert cache.host is not None
    seen = cache.seen if cache.ctx is c and cache.seen >= 0 else len(c.writes)
    writes = c._writes_to(cache.host, seen)
    if len(writes) != 1:
        return None
    w = writes[0]
    if w.columns or w.in_place or w.ids.shape[0] != 1 or w.ids.name not in c._input_index:
        return None
    return w


@functools.cache
def runs_in_place(providers: tuple[str, ...]) -> bool:
    """Whether this onnxruntime and these providers run `attention_in_place`'s node as it
    is used: past and present one buffer, a row written at a cell given by seqlens_k, an
    attention bias over cells [0, cell]. Tried once per process on a node of two heads
    over four cells against NumPy (an older onnxruntime may lack the bias input, another
    provider the shared buffer); where it does not, the cache stays cells first."""
    import onnxruntime as ort

    h, d, cells, cell = 2, 8, 4, 2
    f32 = TensorProto.FLOAT
    row, past = (1, 1, h * d), (1, h, cells, d)
    shapes = {"q": row, "k": row, "v": row, "pk": past, "pv": past, "seqlens": (1,),
              "total": (), "bias": (1, 1, 1, cell + 1)}  # fmt: skip
    types = {"seqlens": TensorProto.INT32, "total": TensorProto.INT32}
    node = helper.make_node(
        "GroupQueryAttention",
        ["q", "k", "v", "pk", "pv", "seqlens", "total", "", "", "", "bias"],
        ["out", "present_k", "present_v"],
        domain=MS, num_heads=h, kv_num_heads=h, scale=0.5,
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "probe",
        [helper.make_tensor_value_info(n, types.get(n, f32), s) for n, s in shapes.items()],
        [helper.make_tensor_value_info("out", f32, shapes["q"]),
         helper.make_tensor_value_info("present_k", f32, shapes["pk"]),
         helper.make_tensor_value_info("present_v", f32, shapes["pv"])],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(MS, 1)]
    )
    model.ir_version = 10
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shapes["q"]).astype(np.float32) for _ in range(3))
    keys, values = (rng.standard_normal(shapes["pk"]).astype(np.float32) for _ in range(2))
    bias = np.array([0, -np.inf, 0], np.float32).reshape(shapes["bias"])  # cell 1 hidden
    want_k, want_v = keys.copy(), values.copy()
    want_k[0, :, cell], want_v[0, :, cell] = k.reshape(h, d), v.reshape(h, d)
    s = np.einsum("hd,hcd->hc", q.reshape(h, d), want_k[0, :, : cell + 1]) * 0.5 + bias[0, 0]
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("hc,hcd->hd", p / p.sum(-1, keepdims=True), want_v[0, :, : cell + 1])
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 4  # a failure is this function's answer, not an error to print
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=list(providers))
        io = sess.io_binding()
        past_k, past_v = (ort.OrtValue.ortvalue_from_numpy(a) for a in (keys, values))
        feed = {"q": q, "k": k, "v": v, "seqlens": np.array([cell], np.int32),
                "total": np.array(cell + 1, np.int32), "bias": bias}  # fmt: skip
        for name, a in feed.items():
            io.bind_cpu_input(name, a)
        io.bind_ortvalue_input("pk", past_k)
        io.bind_ortvalue_input("pv", past_v)
        io.bind_ortvalue_output("present_k", past_k)
        io.bind_ortvalue_output("present_v", past_v)
        io.bind_output("out", "cpu")
        sess.run_with_iobinding(io)
        (out,) = [o.numpy() for o in io.get_outputs()[-1:]]
        ok = (np.allclose(out.reshape(h, d), want, atol=1e-5)
              and np.allclose(keys, want_k) and np.allclose(values, want_v))  # fmt: skip
        why = "" if ok else "its result differs from NumPy's"
    except Exception as e:  # ORT raises its own types: an op or input it does not have
        ok, why = False, str(e).splitlines()[0][:200]
    if not ok:
        log.info("onnx: GroupQueryAttention does not run in place here (%s); the KV cache "
                 "stays cells first, F16", why)  # fmt: skip
    return ok
