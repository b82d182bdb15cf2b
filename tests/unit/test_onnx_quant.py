"""GGUF blocks onto ONNX Runtime's MatMulNBits and GatherBlockQuantized
(herd/ml/backends/onnx/blocks.py, quant.py), run by onnxruntime itself on the CPU provider.

The proof of each exact mapping: a graph of the nodes herd emits, fed the identity I_K at
accuracy_level 0, outputs W^T, which must be gguf's own dequantization bit for bit (the
sign of a zero aside). Then real products X @ W^T against float64 NumPy within a bound
stated in the test: float32 accumulation at accuracy_level 0; at 4, also the error of
ONNX Runtime quantizing X to int8 per block of 32 (as llama.cpp does to its activations).
Blocks come two ways: herd's quantizer (the bytes a real GGUF holds), and random bytes
with finite f16 scale fields of every magnitude and sign.
"""

from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (.[onnx])")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (.[onnx])")

from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from herd.errors import GGUFError, HerdError  # noqa: E402
from herd.gguf.quants import quantize  # noqa: E402
from herd.ml.backends.onnx import quant  # noqa: E402

# each mapped type: the byte offsets of its f16 fields (d, and m or dmin)
F16_FIELDS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q8_0: [0], Q.Q4_K: [0, 2],
              Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
              Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.IQ4_NL: [0], Q.IQ4_XS: [0]}  # fmt: skip
# each type's MatMulNBits form: (bits, block); 5- and 6-bit values take a byte each
FORM = {Q.Q4_0: (4, 32), Q.Q4_1: (4, 32), Q.Q8_0: (8, 32), Q.Q4_K: (4, 32),
        Q.Q5_0: (8, 32), Q.Q5_1: (8, 32), Q.Q5_K: (8, 32), Q.Q6_K: (8, 16),
        Q.Q2_K: (4, 16), Q.Q3_K: (4, 16), Q.IQ4_NL: (8, 32), Q.IQ4_XS: (8, 32)}  # fmt: skip
OFFSET_TYPES = (Q.Q4_1, Q.Q4_K, Q.Q5_1, Q.Q5_K, Q.Q2_K)
EPS = float(np.finfo(np.float32).eps)


def real_blocks(qtype: Q, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    try:
        return quantize(w, qtype).reshape(-1)
    except HerdError as e:  # K-quants need ggml-python's quantizer
        pytest.skip(f"herd cannot quantize to {qtype.name} here: {e}")


def random_blocks(qtype: Q, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bytes for every block, its f16 fields finite, subnormal to 2^10, both signs."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (int(np.prod(shape)) // block, size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        mag = 2.0 ** rng.uniform(-24, 10, len(blocks)) * rng.choice([-1, 1], len(blocks))
        blocks[:, at : at + 2] = mag.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(-1)


def gguf_dense(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    rows = raw.reshape(int(np.prod(shape[:-1])), -1)
    return np.asarray(gguf_dequantize(rows, qtype), dtype=np.float32).reshape(shape)


def session(nodes, inits, x_name: str, x_type: int, x_rank: int, out_name: str, out_rank: int):
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info(x_name, x_type, [None] * x_rank)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [None] * out_rank)],
        [numpy_helper.from_array(a, n) for n, a in inits],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(quant.MS, 1)]
    )
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_matmul(nb: quant.NBits, x: np.ndarray, accuracy_level: int) -> np.ndarray:
    nodes, inits = quant.matmul_nbits_node("w", "x", "y", nb, accuracy_level=accuracy_level)
    s = session(nodes, inits, "x", TensorProto.FLOAT, x.ndim, "y", x.ndim)
    return s.run(None, {"x": x})[0]


def assert_bits_equal(got: np.ndarray, want: np.ndarray) -> None:
    """Equal values, and equal bits but for the sign of a zero (gguf's d * 0 with d < 0 is
    -0.0)."""
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want), f"max |diff| {np.abs(got - want).max()}"
    differ = got.view(np.uint32) != want.view(np.uint32)
    assert not np.any(differ & (want != 0))


def offsets_dense(nb: quant.NBits) -> np.ndarray:
    """|offset| of each weight's block, (n, k) float64 (zeros without offsets)."""
    if nb.offsets is None:
        return np.zeros((nb.n, nb.k))
    return np.repeat(np.abs(nb.offsets.astype(np.float64)), nb.block_size, axis=1)


def test_matmul_nbits_packs_consecutive_values_low_nibble_first():
    """The layout herd assumes, apart from gguf: scale 1 and the default zero point 8 give
    back q - 8 for q packed as value 2i in the low nibble of byte i, 2i+1 in the high."""
    n, k = 3, 64
    q = np.random.default_rng(0).integers(0, 16, (n, k), dtype=np.uint8)
    b = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, k // 32, 16)
    nb = quant.NBits(b, np.ones((n, 2), np.float32), None, None, 4, 32, k, n, Q.Q4_0)
    y = run_matmul(nb, np.eye(k, dtype=np.float32), accuracy_level=0)
    assert np.array_equal(y.T, q.astype(np.float32) - 8)


# (6, 512) for every type; (5, 96) too where rows may be 3 blocks (odd: the packed zero
# points end in half a byte), which the K-quants' 256-value blocks rule out
CASES = [(q, (6, 512)) for q in F16_FIELDS] + [
    (q, (5, 96)) for q in (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.IQ4_NL)
]


@pytest.mark.parametrize("blocks", [real_blocks, random_blocks], ids=["quantized", "random"])
@pytest.mark.parametrize("qtype, shape", CASES, ids=[f"{q.name}-{s[1]}" for q, s in CASES])
def test_identity_input_gives_gguf_dequantization_bit_for_bit(qtype, shape, blocks):
    raw = blocks(qtype, shape)
    nb = quant.matmul_nbits(raw, qtype, shape)
    bits, block = FORM[qtype]
    assert nb is not None and (nb.n, nb.k, nb.block_size, nb.qtype) == (*shape, block, qtype)
    assert nb.bits == bits
    blocks_a_row = shape[1] // block
    assert nb.b.dtype == np.uint8 and nb.b.shape == (shape[0], blocks_a_row, block * bits // 8)
    assert nb.scales.dtype == np.float32 and nb.scales.shape == (shape[0], blocks_a_row)
    assert (nb.offsets is not None) == (qtype in OFFSET_TYPES)
    y = run_matmul(nb, np.eye(shape[1], dtype=np.float32), accuracy_level=0)
    assert_bits_equal(np.ascontiguousarray(y.T), gguf_dense(raw, qtype, shape))


@pytest.mark.parametrize("qtype", F16_FIELDS, ids=lambda q: q.name)
def test_product_within_float32_accumulation_at_accuracy_level_0(qtype):
    shape = (24, 512)
    raw = real_blocks(qtype, shape, seed=1)
    nb = quant.matmul_nbits(raw, qtype, shape)
    w = gguf_dense(raw, qtype, shape).astype(np.float64)
    x = np.random.default_rng(2).standard_normal((7, shape[1])).astype(np.float32)
    y = run_matmul(nb, x, accuracy_level=0)
    want = x.astype(np.float64) @ w.T
    # each term and each partial sum rounds once: |err| <= K eps sum |x||w| (an offset's
    # block sums round too, so its |offset| counts twice beside |d q + m|)
    mag = np.abs(x.astype(np.float64)) @ (np.abs(w) + 2 * offsets_dense(nb)).T
    err = np.abs(y - want)
    assert np.all(err <= shape[1] * EPS * mag), f"max err/bound {(err / mag).max() / EPS}"


@pytest.mark.parametrize("qtype", F16_FIELDS, ids=lambda q: q.name)
def test_product_at_accuracy_level_4_within_int8_activation_rounding(qtype):
    """accuracy_level 4: ONNX Runtime rounds x to int8 per block of 32 (scale max|x|/127),
    so each x moves by at most half a step: |err| <= sum_blocks step/2 * sum |w| over the
    block, plus float32 accumulation. A wrong mapping is off by whole weights, far above."""
    shape = (24, 512)
    raw = real_blocks(qtype, shape, seed=3)
    nb = quant.matmul_nbits(raw, qtype, shape)
    w = gguf_dense(raw, qtype, shape).astype(np.float64)
    x = np.random.default_rng(4).standard_normal((7, shape[1])).astype(np.float32)
    y = run_matmul(nb, x, accuracy_level=4)
    want = x.astype(np.float64) @ w.T
    xb = np.abs(x.astype(np.float64)).reshape(7, -1, nb.block_size)
    half_step = np.repeat(xb.max(axis=-1) / 127 / 2, nb.block_size, axis=-1)  # (7, k)
    w_q = np.abs(w) + offsets_dense(nb)  # >= |d q|, the part MatMulNBits multiplies
    bound = half_step @ w_q.T * (1 + 1e-3)
    bound += shape[1] * EPS * (np.abs(x.astype(np.float64)) @ (w_q + offsets_dense(nb)).T)
    err = np.abs(y - want)
    assert np.all(err <= bound), f"max err/bound {(err / bound).max()}"
    assert err.max() > 0  # level 4 did round x: a bound test that could not fail would pass


def test_offsets_work_for_any_rank_of_x():
    shape = (8, 96)
    raw = real_blocks(Q.Q4_1, shape, seed=5)
    nb = quant.matmul_nbits(raw, Q.Q4_1, shape)
    x = np.random.default_rng(6).standard_normal((2, 3, shape[1])).astype(np.float32)
    y3 = run_matmul(nb, x, accuracy_level=0)
    y2 = run_matmul(nb, x.reshape(6, -1), accuracy_level=0)
    assert y3.shape == (2, 3, 8)
    assert np.array_equal(y3.reshape(6, -1), y2)


@pytest.mark.parametrize("qtype", sorted(quant.GATHER_TYPES), ids=lambda q: q.name)
@pytest.mark.parametrize("blocks", [real_blocks, random_blocks], ids=["quantized", "random"])
def test_gather_block_quantized_rows_equal_gguf_bit_for_bit(qtype, blocks):
    shape = (40, 256)  # whole blocks of every gathered type (Q6_K: 256 values)
    raw = blocks(qtype, shape)
    nb = quant.gather_block_quantized(raw, qtype, shape)
    assert nb is not None
    nodes, inits = quant.gather_block_quantized_node("emb", "ids", "out", nb)
    s = session(nodes, inits, "ids", TensorProto.INT64, 2, "out", 3)
    ids = np.array([[0, 39, 7], [7, 1, 20]], dtype=np.int64)
    out = s.run(None, {"ids": ids})[0]
    assert_bits_equal(out, gguf_dense(raw, qtype, shape)[ids])


def test_types_without_an_exact_form_are_none_and_dequantize_as_gguf():
    shape = (4, 256)
    raw = real_blocks(Q.Q4_1, shape)
    assert quant.gather_block_quantized(raw, Q.Q4_1, shape) is None  # no float term
    for qtype in (Q.TQ1_0, Q.TQ2_0, Q.IQ3_S):
        raw = real_blocks(qtype, shape)
        assert quant.matmul_nbits(raw, qtype, shape) is None
        assert_bits_equal(quant.dequantize(raw, qtype, shape), gguf_dense(raw, qtype, shape))
    f16 = np.random.default_rng(0).standard_normal(shape).astype(np.float16)
    raw = f16.view(np.uint8).reshape(-1)
    assert quant.matmul_nbits(raw, Q.F16, shape) is None
    assert np.array_equal(quant.dequantize(raw, Q.F16, shape), f16.astype(np.float32))


def test_tensors_that_are_not_2d_are_left_to_dequantize():
    raw = real_blocks(Q.Q4_0, (2, 3, 64))
    assert quant.matmul_nbits(raw, Q.Q4_0, (2, 3, 64)) is None  # experts: one op per 2-D
    assert quant.matmul_nbits(raw[:36], Q.Q4_0, (64,)) is None
    assert quant.dequantize(raw, Q.Q4_0, (2, 3, 64)).shape == (2, 3, 64)


@pytest.mark.parametrize(
    "shape, nbytes",
    [((4, 40), 4 * 2 * 18), ((4, 64), 4 * 2 * 18 - 1), ((4, 64), 4 * 2 * 18 + 18)],
    ids=["row_not_whole_blocks", "short", "long"],
)
def test_bytes_that_do_not_fit_the_shape_are_a_gguf_error(shape, nbytes):
    raw = np.zeros(nbytes, dtype=np.uint8)
    for fn in (quant.matmul_nbits, quant.gather_block_quantized, quant.dequantize):
        with pytest.raises(GGUFError, match="do not fit"):
            fn(raw, Q.Q4_0, shape)
