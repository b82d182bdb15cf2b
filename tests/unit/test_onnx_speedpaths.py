"""The ONNX backend's faster paths (herd/ml/backends/onnx/quant.py, linear.py), each held
to what it replaces or to a reference nobody here wrote:

- Q4_1 and Q4_K at accuracy level 4: MatMulNBits rounds x to int8 per block of 32, and the
  offset term must take the block sums of that rounded x, as llama.cpp's q8_1 activations
  do: checked against NumPy's float64 product of x rounded that way (round to nearest even
  of x / (max|x| / 127)), the bound tight enough that the offset on x's own sums fails it.
- Linears reading the same x (q, k, v; gate, up) recorded as one MatMulNBits: the outputs
  equal those of one linear per context, and the graph holds one MatMulNBits for them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (.[onnx])")
pytest.importorskip("onnx", reason="onnx is not installed (.[onnx])")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from test_onnx_quant import gguf_dense, real_blocks, run_matmul  # noqa: E402

from herd.gguf import open_gguf  # noqa: E402
from herd.ml import open_backend  # noqa: E402
from herd.ml.backends.onnx import quant  # noqa: E402
from herd.ml.base import RopeOptions  # noqa: E402


def rounded_like_q8(x: np.ndarray, block: int = 32) -> np.ndarray:
    """x as llama.cpp's q8_1 (and MatMulNBits at level 4) rounds it, in float64, per block
    of `block` (MatMulNBits': its weight's block size)."""
    xb = x.astype(np.float64).reshape(*x.shape[:-1], -1, block)
    step = np.abs(xb).max(axis=-1, keepdims=True) / 127
    q = np.round(xb / np.where(step == 0, 1, step))
    return (q * step).reshape(x.shape)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_K, Q.Q5_1, Q.Q5_K, Q.Q2_K], ids=lambda q: q.name)
def test_offsets_at_level_4_read_x_as_rounded(qtype):
    shape = (40, 512)
    raw = real_blocks(qtype, shape, seed=7)
    nb = quant.matmul_nbits(raw, qtype, shape)
    assert nb is not None and nb.offsets is not None
    w = gguf_dense(raw, qtype, shape).astype(np.float64)
    x = np.random.default_rng(8).standard_normal((5, shape[1])).astype(np.float32)
    x[1, :32] = 0  # a block of zeros: step 0, its sum 0 (no 0/0)
    y = run_matmul(nb, x, accuracy_level=4)
    xq = rounded_like_q8(x, nb.block_size)
    want = xq @ w.T
    offsets = np.repeat(nb.offsets.astype(np.float64), nb.block_size, axis=1)  # (n, k)

    def nmse(a: np.ndarray) -> float:
        return float(np.mean((a - want) ** 2) / np.mean(want**2))

    # float32 accumulation (nmse ~1e-13) and, rarely, a value at a rounding tie that
    # x * (127 / max) sends the other way than x / step: far below int8's own error
    assert nmse(y) < 1e-9, nmse(y)
    # the offset term on x's own block sums (the mistake this replaces) is far outside it
    assert nmse(want + (x.astype(np.float64) - xq) @ offsets.T) > 1e-7


@pytest.mark.parametrize(
    "qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q6_K], ids=lambda q: q.name
)
@pytest.mark.parametrize("level", [0, 4])
def test_stacked_weights_give_each_weights_product(qtype, level):
    """quant.concat: one MatMulNBits over weights stacked along N, split after, gives
    every weight's own product (the same int8 x for all at level 4: equal bits)."""
    shapes = [(24, 256), (8, 256), (8, 256)]
    nbs = [
        quant.matmul_nbits(real_blocks(qtype, s, seed=i), qtype, s) for i, s in enumerate(shapes)
    ]
    x = np.random.default_rng(9).standard_normal((3, 256)).astype(np.float32)
    both = run_matmul(quant.concat(nbs), x, accuracy_level=level)
    at = 0
    for nb in nbs:
        one = run_matmul(nb, x, accuracy_level=level)
        np.testing.assert_allclose(both[:, at : at + nb.n], one, rtol=1e-6, atol=1e-6)
        at += nb.n
    assert at == both.shape[1]


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_K], ids=lambda q: q.name)
def test_offset_as_one_gemm_for_2d_x_equals_any_rank(qtype):
    """two_d: the offset term as one Gemm (x known to be (n, k)) gives the MatMul + Add
    form's values (float32 rounding aside), with one node fewer."""
    shape = (24, 256)
    nb = quant.matmul_nbits(real_blocks(qtype, shape, seed=11), qtype, shape)
    x = np.random.default_rng(12).standard_normal((6, 256)).astype(np.float32)
    nodes2, _ = quant.matmul_nbits_node("w", "x", "y", nb, 4, two_d=True)
    nodes_any, _ = quant.matmul_nbits_node("w", "x", "y", nb, 4)
    assert len(nodes2) == len(nodes_any) - 1 and nodes2[-1].op_type == "Gemm"
    from test_onnx_quant import session

    def run(two_d: bool) -> np.ndarray:
        nodes, inits = quant.matmul_nbits_node("w", "x", "y", nb, 4, two_d=two_d)
        return session(nodes, inits, "x", 1, 2, "y", 2).run(None, {"x": x})[0]

    np.testing.assert_allclose(run(True), run(False), rtol=1e-6, atol=1e-6)


def _qkv_file(path: Path, qtype: Q) -> Path:
    from herd.gguf.quants import quantize
    from herd.gguf.writer import write_gguf

    rng = np.random.default_rng(3)
    tensors = [
        (name, quantize(rng.standard_normal((n, 64)).astype(np.float32), qtype), qtype)
        for name, n in (("q", 64), ("k", 32), ("v", 32), ("o", 64))
    ]
    return write_gguf(path, "test", {}, tensors)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_linears_of_one_x_run_as_one_matmulnbits(tmp_path, qtype):
    g = open_gguf(_qkv_file(tmp_path / "qkv.gguf", qtype))
    backend = open_backend("onnx", g)
    x = np.random.default_rng(4).standard_normal((3, 64)).astype(np.float32)
    alone = {}
    for name in ("q", "k", "v"):
        with backend.new_context() as ctx:
            (alone[name],) = ctx.compute(ctx.input(x).linear(backend.weight(name)))
    with backend.new_context() as ctx:
        xt = ctx.input(x)
        ys = [xt.linear(backend.weight(n)) for n in ("q", "k", "v")]
        # another x (a linear's output) gets its own node
        o = ys[0].linear(backend.weight("o"))
        kinds = [n.op_type for n in ctx.g.nodes]
        got = ctx.compute(*ys, o)
    assert kinds.count("MatMulNBits") == 2, kinds
    for name, y in zip(("q", "k", "v"), got, strict=False):
        np.testing.assert_array_equal(y, alone[name])
    with backend.new_context() as ctx:
        (want_o,) = ctx.compute(ctx.input(alone["q"]).linear(backend.weight("o")))
    np.testing.assert_array_equal(got[3], want_o)
    # stacked, each weight's own blocks are views of the stack (held once, not twice), and
    # used alone again (Q4_1: its block-sum rows made anew) they give the same products
    bases = [backend.weight(n).q.b.base for n in ("q", "k", "v")]
    assert bases[0] is not None and all(b is bases[0] for b in bases), bases
    for name in ("q", "k", "v"):
        with backend.new_context() as ctx:
            (again,) = ctx.compute(ctx.input(x).linear(backend.weight(name)))
        np.testing.assert_array_equal(again, alone[name])


ROPES = {
    "adjacent": RopeOptions(dims=64),
    "neox": RopeOptions(dims=64, neox=True, base=5e5),
    "yarn": RopeOptions(
        dims=64, neox=True, freq_scale=0.25, ext_factor=1.0, attn_factor=1.0, orig_ctx=64
    ),  # fmt: skip
    "partial": RopeOptions(dims=32, neox=True),  # composed: RotaryEmbedding rotates whole heads
}


@pytest.mark.parametrize("name", list(ROPES))
def test_rope_is_one_rotary_embedding_and_matches_numpy(tmp_path, name):
    from herd.ml import DType
    from herd.ml.backends.numpy import NumpyBackend

    opts = ROPES[name]
    g = open_gguf(_qkv_file(tmp_path / "w.gguf", Q.Q8_0))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 3, 64)).astype(np.float32)
    pos = np.array([0, 1, 2, 700, 4095], np.int32)
    oracle = NumpyBackend(g)
    with oracle.new_context() as ctx:
        (want,) = ctx.compute(ctx.input(x).rope(ctx.input(pos, DType.I32), opts))
    backend = open_backend("onnx", g)
    with backend.new_context() as ctx:
        y = ctx.input(x).rope(ctx.input(pos, DType.I32), opts)
        kinds = [n.op_type for n in ctx.g.nodes]
        (got,) = ctx.compute(y)
    assert ("RotaryEmbedding" in kinds) == (opts.dims == 64), kinds
    # float32 angles (position x factor, as the composed graph makes them): at position
    # 4095 an angle is off by up to 4095 * 2^-24 ~ 2.4e-4 rad against NumPy's float64 ones
    scale = np.abs(x).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * scale)
    np.testing.assert_allclose(got[:3], want[:3], rtol=0, atol=1e-6 * scale)


# ---- a decoding row's attention in place (fused.attention_in_place) ------------------------
CELLS, HQ, HKV, D = 32, 4, 2, 64


def _decode_step(backend, cell: int, seen: np.ndarray, seed: int = 9):
    """Cells [0, cell) filled by one pass, then a decoding row written at `cell` attending
    the cells `seen` marks (its mask), as the cache hands them over: the step's output,
    the K/V caches, the row's (q, k, v), the step graph's node kinds and its writes left
    to the host."""
    from herd.ml import DType

    rng = np.random.default_rng(seed)
    past_k, past_v = rng.standard_normal((2, cell, HKV, D)).astype(np.float32)
    q, k, v = (rng.standard_normal((1, h, D)).astype(np.float32) for h in (HQ, HKV, HKV))
    keys, values = (backend.alloc((CELLS, HKV, D), DType.F16) for _ in range(2))
    with backend.new_context() as ctx:
        ids = ctx.input(np.arange(cell), DType.I32)
        ctx.compute(keys.set_rows(ids, ctx.input(past_k)), values.set_rows(ids, ctx.input(past_v)))
    with backend.new_context() as ctx:
        ids = ctx.input([cell], DType.I32)
        ctx.forward(keys.set_rows(ids, ctx.input(k)), values.set_rows(ids, ctx.input(v)))
        mask = ctx.input(np.where(seen, 0, -np.inf).astype(np.float32)[None, :])
        kt, vt = (ctx.attach(c).slice(0, 0, CELLS) for c in (keys, values))
        out = ctx.input(q).scaled_dot_product_attention(kt, vt, mask, 0.125)
        if out is None:  # not in place: as nn composes it
            probs = ctx.input(q).permute(1, 0, 2).matmul_t(kt.permute(1, 0, 2))
            out = probs.softmax(mask, 0.125).matmul_t(vt.permute(1, 2, 0))
            out = out.permute(1, 0, 2).contiguous().reshape(1, HQ * D)
        kinds = [n.op_type for n in ctx.g.nodes]
        (got,) = ctx.compute(out)
        writes = len(ctx.plan.writes)
    return got, keys, values, (q, k, v), kinds, writes


def _attention64(q, keys, values, seen) -> np.ndarray:
    """Float64 attention of q (1, Hq, D) over cells `seen` of keys/values (cells, Hkv, D)."""
    out = []
    for h in range(HQ):
        kh, vh = keys[seen, h // (HQ // HKV)], values[seen, h // (HQ // HKV)]
        s = kh.astype(np.float64) @ q[0, h] * 0.125
        p = np.exp(s - s.max())
        out.append((p / p.sum()) @ vh)
    return np.concatenate(out)[None, :]


def test_a_decoding_row_attends_and_writes_its_cache_in_place(tmp_path):
    """One GroupQueryAttention reads and writes the heads-first cache itself: the row's
    keys and values land in their cell with no output for the host to store, the output is
    float64 attention's over the cells the mask shows (a hole in them included), and the
    cells-first F16 layout (HERD_ONNX_KV_IN_PLACE=0) composes it from the attended slice."""
    from herd.ml import BackendOptions

    g = open_gguf(_qkv_file(tmp_path / "w.gguf", Q.Q8_0))
    cell = 9
    seen = np.arange(CELLS) <= cell
    seen[3] = False  # another sequence's cell among this one's
    got, keys, values, (q, k, v), kinds, writes = _decode_step(open_backend("onnx", g), cell, seen)
    assert kinds.count("GroupQueryAttention") == 1 and writes == 0, (kinds, writes)
    assert keys.host.shape == (1, HKV, CELLS, D) and keys.host.dtype == np.float32
    np.testing.assert_array_equal(keys.host[0, :, cell], k[0])
    np.testing.assert_array_equal(values.host[0, :, cell], v[0])
    want = _attention64(q, keys.host[0].swapaxes(0, 1), values.host[0].swapaxes(0, 1), seen)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

    off = open_backend("onnx", g, BackendOptions(onnx_kv_in_place=False))
    composed, keys16, _, _, kinds, writes = _decode_step(off, cell, seen)
    assert "GroupQueryAttention" not in kinds and writes == 2
    assert keys16.host.shape == (CELLS, HKV, D) and keys16.host.dtype == np.float16
    np.testing.assert_allclose(composed, got, rtol=0, atol=2e-2)  # its F16 rounding


def test_a_cell_seen_after_the_written_one_is_an_error_not_a_wrong_answer(tmp_path):
    """In-place attention sees cells [0, written cell] only: a step that would see one after
    it (the cache never places a row so) is refused by the host's check, not computed."""
    from herd.errors import BackendError

    g = open_gguf(_qkv_file(tmp_path / "w.gguf", Q.Q8_0))
    seen = np.arange(CELLS) <= 12
    with pytest.raises(BackendError, match="cell 9 is written in place while the step sees"):
        _decode_step(open_backend("onnx", g), 9, seen)


# ---- fewer nodes a step: Reshape chains folded, a norm's weight as its scale ---------------
def _run_graph(g, outputs, feed):
    model = g.model(outputs)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [n.op_type for n in model.graph.node], sess.run(None, feed)


@pytest.mark.parametrize(("last", "want"), [([-1], (24,)), ([0, -1], (4, 6))])
def test_a_chain_of_reshapes_is_one_reshape_of_its_start(last, want):
    """x (3, 2, 4) -> (6, 4) -> (4, 6) -> `last` becomes one Reshape of x (the others, read
    by nothing else, left out), but not where `last` holds a 0 (ONNX's copy-this-dim, which
    copies the intermediate's dim, not x's): then its input stays the (4, 6)."""
    from onnx import TensorProto

    from herd.ml.backends.onnx.graph import Graph

    g = Graph()
    g.declare("x", TensorProto.FLOAT, (3, 2, 4))
    x = np.arange(24, dtype=np.float32).reshape(3, 2, 4)
    a = g.op("Reshape", ["x", g.const([6, 4])])
    b = g.op("Reshape", [a, g.const([4, 6])])
    c = g.op("Reshape", [b, g.const(last)])
    kinds, (got,) = _run_graph(g, [(c, TensorProto.FLOAT, want)], {"x": x})
    assert kinds == ["Reshape"] * (1 if 0 not in last else 2), kinds
    np.testing.assert_array_equal(got, x.reshape(want))


def test_a_norms_weight_becomes_its_scale(tmp_path):
    """rms_norm then mul(weight): one SimplifiedLayerNormalization scaled by the weight,
    no Mul, and NumPy's values."""
    from herd.ml import DType
    from herd.ml.backends.numpy import NumpyBackend

    g = open_gguf(_qkv_file(tmp_path / "w.gguf", Q.Q8_0))
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    outs, kinds = [], []
    for backend in (NumpyBackend(g), open_backend("onnx", g)):
        with backend.new_context() as ctx:
            y = ctx.input(x).rms_norm(1e-5).mul(ctx.input(w, DType.F32))
            kinds = [n.op_type for n in ctx.g.nodes] if hasattr(ctx, "g") else kinds
            outs.append(ctx.compute(y)[0])
    assert kinds.count("SimplifiedLayerNormalization") == 2 and "Mul" not in kinds, kinds
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-6)


def test_where_the_op_does_not_run_in_place_the_cache_stays_cells_first(tmp_path, monkeypatch):
    """The backend tries the in-place node once (fused.runs_in_place, against NumPy): here
    it runs; where onnxruntime cannot build it (an older version, another provider), the
    backend keeps the cells-first F16 cache and composes attention, with a log line."""
    from herd.ml import DType
    from herd.ml.backends.onnx import fused

    assert fused.runs_in_place(("CPUExecutionProvider",))

    def refuse(*args, **kwargs):
        raise RuntimeError("GroupQueryAttention: no input named attention_bias")

    fused.runs_in_place.cache_clear()
    monkeypatch.setattr(ort, "InferenceSession", refuse)
    try:
        assert not fused.runs_in_place(("CPUExecutionProvider",))
    finally:
        monkeypatch.undo()
        fused.runs_in_place.cache_clear()
    monkeypatch.setattr(fused, "runs_in_place", lambda providers: False)
    backend = open_backend("onnx", open_gguf(_qkv_file(tmp_path / "w.gguf", Q.Q8_0)))
    cache = backend.alloc((CELLS, HKV, D), DType.F16)
    assert not backend.in_place and cache.host.shape == (CELLS, HKV, D)
    assert cache.host.dtype == np.float16


@pytest.mark.parametrize("neox", [False, True], ids=["adjacent", "neox"])
def test_a_decoding_rows_rotation_and_qkv_split_go_inside_its_attention(
    tmp_path, monkeypatch, neox
):
    """A decoding row's q and k rotated by rope, then attended in place: the attention
    rotates them itself (do_rotary, the pass's cos/sin row repeated up to the written cell)
    and reads the merged q/k/v product packed, so the step's graph has no RotaryEmbedding,
    no Split and no Reshape of q, k or v. Its output and the key it stores equal the
    graph with rope and split as nodes; the position (700) is not the cell (5)."""
    from herd.ml import DType
    from herd.ml.backends.onnx import fused

    g = open_gguf(_qkv_file(tmp_path / "w.gguf", Q.Q8_0))
    hq, hkv, d, cell = 4, 2, 16, 5  # the file's q (64 x 64), k and v (32 x 64)
    opts = RopeOptions(dims=d, neox=neox)
    rng = np.random.default_rng(21)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    past_k, past_v = rng.standard_normal((2, cell, hkv, d)).astype(np.float32)

    def step(inside: bool):
        monkeypatch.setattr(fused, "ROTARY_INSIDE", inside)
        backend = open_backend("onnx", g)
        models: list[bytes] = []
        session = backend.session
        monkeypatch.setattr(backend, "session", lambda key, model, *a: models.append(model)
                            or session(key, model, *a))  # fmt: skip
        keys, values = (backend.alloc((CELLS, hkv, d), DType.F16) for _ in range(2))
        with backend.new_context() as ctx:
            ids = ctx.input(np.arange(cell), DType.I32)
            ctx.compute(keys.set_rows(ids, ctx.input(past_k)),
                        values.set_rows(ids, ctx.input(past_v)))  # fmt: skip
        with backend.new_context() as ctx:
            xt, pos, ids = ctx.input(x), ctx.input([700], DType.I32), ctx.input([cell], DType.I32)
            q, k, v = (xt.linear(backend.weight(n)).reshape(1, h, d)
                       for n, h in (("q", hq), ("k", hkv), ("v", hkv)))  # fmt: skip
            q, k = q.rope(pos, opts), k.rope(pos, opts)
            ctx.forward(keys.set_rows(ids, k), values.set_rows(ids, v))
            mask = ctx.input(np.where(np.arange(CELLS) <= cell, 0, -np.inf)[None, :])
            kt, vt = (ctx.attach(c).slice(0, 0, CELLS) for c in (keys, values))
            (got,) = ctx.compute(q.scaled_dot_product_attention(kt, vt, mask, 0.25))
        import onnx

        nodes = onnx.load_from_string(models[-1]).graph.node
        return got, keys.host[0, :, cell].copy(), nodes

    got, key, nodes = step(True)
    kinds = [n.op_type for n in nodes]
    (gqa,) = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    attrs = {a.name: a.i for a in gqa.attribute if a.name in ("do_rotary", "rotary_interleaved")}
    assert attrs == {"do_rotary": 1, "rotary_interleaved": int(not neox)}, attrs
    assert list(gqa.input[1:3]) == ["", ""], gqa.input  # q, k and v packed in its query
    assert "RotaryEmbedding" not in kinds and "Split" not in kinds, kinds
    assert kinds.count("MatMulNBits") == 1 and kinds.count("Reshape") == 3, kinds

    apart, key_apart, nodes = step(False)
    kinds = [n.op_type for n in nodes]
    assert kinds.count("RotaryEmbedding") == 2 and "Split" in kinds, kinds
    np.testing.assert_allclose(key, key_apart, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, apart, rtol=0, atol=1e-5)
