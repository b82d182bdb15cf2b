"""GGUF tensors onto MLX (herd/ml/backends/mlx/quant.py): the block types kept quantized
must dequantize, through MLX's own `mx.dequantize`, to exactly what gguf's dequantizer
gives; the rest are dequantized once and say so.

Blocks come two ways: from herd's quantizer (the bytes a real GGUF holds), and as random
bytes with finite f16 scale fields, which reach every 6-bit scale and min, every q, and
scales far from a quantizer's (large, subnormal, negative).
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install -e '.[mlx]')")

from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from herd.errors import GGUFError, HerdError  # noqa: E402
from herd.gguf.quants import quantize  # noqa: E402
from herd.ml.backends.mlx import quant  # noqa: E402
from herd.ml.backends.mlx.quant import MAPPED_TYPES, load  # noqa: E402

# each mapped type: its bits, and the byte offsets of its f16 fields (d, and m or dmin)
MAPPED = {
    Q.Q4_0: (4, [0]),
    Q.Q4_1: (4, [0, 2]),
    Q.Q5_0: (5, [0]),
    Q.Q5_1: (5, [0, 2]),
    Q.Q8_0: (8, [0]),
    Q.Q4_K: (4, [0, 2]),
    Q.Q5_K: (5, [0, 2]),
}
DEQUANTIZED = [Q.Q6_K, Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.TQ2_0, Q.MXFP4]
SHAPES = {"2d": (6, 512), "3d": (3, 4, 256)}  # (rows, cols), (experts, rows, cols)


def real_blocks(qtype: Q, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    try:
        return quantize(w, qtype).reshape(-1)
    except HerdError as e:  # K- and I-quants need ggml-python's quantizers
        pytest.skip(f"herd cannot quantize to {qtype.name} here: {e}")


def random_blocks(qtype: Q, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bytes for every block, with its f16 fields set to finite values of every
    magnitude (subnormal to 2^10) and both signs."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (int(np.prod(shape)) // block, size), dtype=np.uint8)
    for at in MAPPED[qtype][1]:
        mag = 2.0 ** rng.uniform(-24, 10, len(blocks)) * rng.choice([-1, 1], len(blocks))
        blocks[:, at : at + 2] = mag.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(-1)


def gguf_dense(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    rows = raw.reshape(int(np.prod(shape[:-1])), -1)
    return np.asarray(dequantize(rows, qtype), dtype=np.float32).reshape(shape)


def assert_bits_equal(got: np.ndarray, want: np.ndarray) -> None:
    """Equal values, and equal bits but for the sign of a zero: gguf's d * 0 with d < 0 is
    -0.0 where MLX's 8d + (-8d) is +0.0."""
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want), f"max |diff| {np.abs(got - want).max()}"
    differ = got.view(np.uint32) != want.view(np.uint32)
    assert not np.any(differ & (want != 0))


def mlx_stream(q: np.ndarray, bits: int) -> np.ndarray:
    """The layout herd assumes MLX packs: each row's values as one little-endian bit stream
    (value i at bits i*bits...), read as uint32 words. q (rows, cols) -> (rows, cols*bits/32)."""
    planes = (q[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # (rows, cols, bits)
    packed = np.packbits(planes.reshape(len(q), -1), axis=-1, bitorder="little")
    return packed.view(np.uint32)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_mlx_packs_values_as_a_little_endian_bit_stream(bits):
    w = mx.array(np.random.default_rng(bits).standard_normal((4, 128)).astype(np.float32))
    packed, scales, biases = mx.quantize(w, group_size=32, bits=bits)
    # values with scale 1 and bias 0 come back as themselves
    q = np.random.default_rng(1).integers(0, 1 << bits, (4, 128), dtype=np.uint8)
    ones, zeros = mx.ones(scales.shape), mx.zeros(biases.shape)
    back = mx.dequantize(mx.array(mlx_stream(q, bits)), ones, zeros, group_size=32, bits=bits)
    assert np.array_equal(np.array(back), q.astype(np.float32))
    # and MLX's own quantize packs its values the same way
    deq = np.array(mx.dequantize(packed, scales, biases, group_size=32, bits=bits))
    s, b = (np.repeat(np.array(a), 32, axis=-1) for a in (scales, biases))
    q_mlx = np.rint((deq - b) / s).astype(np.uint8)
    assert np.array_equal(mlx_stream(q_mlx, bits), np.array(packed))


@pytest.mark.parametrize("bits", [4, 5])
def test_herd_streams_equal_the_mlx_layout(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, (5, 64), dtype=np.uint8)
    if bits == 5:
        got = quant._stream5(q)
    else:  # GGUF nibbles: byte j holds value j (low) and value 32 + j (high) of 64
        got = quant._nibbles_to_stream(q[:, None, :32] | (q[:, None, 32:] << 4)).reshape(5, -1)
    assert np.array_equal(got.view(np.uint32), mlx_stream(q, bits))


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("blocks", [real_blocks, random_blocks], ids=["quantized", "random"])
@pytest.mark.parametrize("qtype", MAPPED, ids=lambda q: q.name)
def test_mapped_types_stay_quantized_and_dequantize_exactly(qtype, blocks, shape):
    raw = blocks(qtype, shape)
    wt = load(raw, qtype, shape, mx.float16)
    bits = MAPPED[qtype][0]
    assert wt.quantized and wt.dense is None and wt.dequantized_from is None
    assert (wt.bits, wt.group_size, wt.gguf_type) == (bits, 32, qtype)
    lead, cols = shape[:-1], shape[-1]
    assert wt.packed.dtype == mx.uint32 and wt.packed.shape == (*lead, cols * bits // 32)
    assert wt.scales.shape == wt.biases.shape == (*lead, cols // 32)
    assert wt.scales.dtype == wt.biases.dtype == mx.float32
    assert wt.gguf_nbytes == raw.size
    assert wt.nbytes == cols * np.prod(lead) * (bits / 8 + 8 / 32)
    assert_bits_equal(np.array(wt.to_dense()), gguf_dense(raw, qtype, shape))


@pytest.mark.parametrize("qtype", MAPPED, ids=lambda q: q.name)
def test_quantized_matmul_is_x_times_the_dequantized_weight(qtype):
    shape = (24, 512)
    raw = real_blocks(qtype, shape)
    wt, w = load(raw, qtype, shape, mx.float32), gguf_dense(raw, qtype, shape)
    x = np.random.default_rng(1).standard_normal((3, shape[1])).astype(np.float32)
    y = mx.quantized_matmul(
        mx.array(x), wt.packed, wt.scales, wt.biases, transpose=True, group_size=32, bits=wt.bits
    )
    want = x.astype(np.float64) @ w.T.astype(np.float64)  # (3, 24)
    # float32 summation of 512 products: error at most 512 eps of sum |x w|
    bound = shape[1] * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(w).T)
    assert np.all(np.abs(np.array(y) - want) <= bound)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_K, Q.Q8_0], ids=lambda q: q.name)
def test_stacked_experts_multiply_through_gather_qmm(qtype):
    shape = (3, 16, 256)  # (E, rows, cols)
    raw = real_blocks(qtype, shape)
    wt, w = load(raw, qtype, shape, mx.float32), gguf_dense(raw, qtype, shape)
    x = np.random.default_rng(2).standard_normal((2, 1, shape[2])).astype(np.float32)
    experts = np.array([2, 0], dtype=np.uint32)  # token t -> expert experts[t]
    y = mx.gather_qmm(
        mx.array(x), wt.packed, wt.scales, wt.biases, rhs_indices=mx.array(experts),
        transpose=True, group_size=32, bits=wt.bits,
    )  # fmt: skip
    assert y.shape == (2, 1, shape[1])
    for t, e in enumerate(experts):
        want = x[t, 0].astype(np.float64) @ w[e].T.astype(np.float64)  # (rows,)
        bound = shape[2] * np.finfo(np.float32).eps * (np.abs(x[t, 0]) @ np.abs(w[e]).T)
        assert np.all(np.abs(np.array(y)[t].reshape(-1) - want) <= bound)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_many_slabs_on_threads_give_the_same_weight(monkeypatch, qtype):
    shape = (37, 256)  # slabs of 4 rows, the last one ragged
    raw = real_blocks(qtype, shape)
    monkeypatch.setattr(quant, "_SLAB", 1024)
    wt = load(raw, qtype, shape, mx.float32)
    assert wt.quantized == (qtype in MAPPED_TYPES)
    assert_bits_equal(np.array(wt.to_dense()), gguf_dense(raw, qtype, shape))


DENSE_DTYPES = {"f32": (mx.float32, 4), "f16": (mx.float16, 2), "bf16": (mx.bfloat16, 2)}


@pytest.mark.parametrize("dtype", DENSE_DTYPES, ids=DENSE_DTYPES.keys())
@pytest.mark.parametrize("qtype", DEQUANTIZED, ids=lambda q: q.name)
def test_other_types_are_dequantized_to_the_dense_dtype_and_say_so(qtype, dtype):
    mx_dtype, size = DENSE_DTYPES[dtype]
    shape = (2, 3, 256)
    raw = real_blocks(qtype, shape)
    wt = load(raw, qtype, shape, mx_dtype)
    assert not wt.quantized and wt.dequantized_from == qtype.name
    assert wt.dense.dtype == mx_dtype and wt.dense.shape == shape
    assert wt.nbytes == 2 * 3 * 256 * size and wt.gguf_nbytes == raw.size
    # gguf's float32 values, rounded as MLX rounds float32 to the dense dtype
    want = mx.array(gguf_dense(raw, qtype, shape)).astype(mx_dtype)
    assert mx.array_equal(wt.dense, want).item()


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q8_0], ids=lambda q: q.name)
def test_a_one_dimensional_mapped_tensor_is_dense_and_exact(qtype):
    raw = real_blocks(qtype, (128,))
    wt = load(raw, qtype, (128,), mx.float32)
    assert not wt.quantized and wt.dense.shape == (128,)
    assert_bits_equal(np.array(wt.to_dense()), gguf_dense(raw, qtype, (128,)))


PLAIN = {Q.F32: np.float32, Q.F16: np.float16, Q.I32: np.int32, Q.I8: np.int8}


@pytest.mark.parametrize("qtype", PLAIN, ids=lambda q: q.name)
def test_plain_types_stay_as_they_are(qtype):
    a = (np.random.default_rng(3).standard_normal((4, 8)) * 50).astype(PLAIN[qtype])
    wt = load(a.view(np.uint8).reshape(-1), qtype, (4, 8), mx.float16)
    assert wt.dequantized_from is None and not wt.quantized
    assert np.array_equal(np.array(wt.dense), a) and wt.nbytes == a.nbytes


def test_bf16_stays_bf16():
    a = np.random.default_rng(4).standard_normal((4, 8)).astype(np.float32)
    bits = (a.view(np.uint32) >> 16).astype(np.uint16)  # truncated to bf16
    wt = load(bits.view(np.uint8).reshape(-1), Q.BF16, (4, 8), mx.float16)
    assert wt.dense.dtype == mx.bfloat16 and wt.dequantized_from is None
    want = (bits.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(np.array(wt.to_dense()), want)


@pytest.mark.parametrize("qtype", [Q.Q8_1, Q.Q8_K, Q.F64], ids=lambda q: q.name)
def test_a_type_neither_mlx_nor_gguf_handles_is_a_gguf_error(qtype):
    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.zeros(4 * 256 // block * size, dtype=np.uint8)
    with pytest.raises(GGUFError, match=qtype.name):
        load(raw, qtype, (4, 256), mx.float16)


def test_bytes_that_do_not_fit_the_shape_are_a_gguf_error():
    raw = real_blocks(Q.Q4_0, (4, 64))
    with pytest.raises(GGUFError, match="Q4_0"):
        load(raw[:-18], Q.Q4_0, (4, 64), mx.float16)
    with pytest.raises(GGUFError, match="Q4_0"):
        load(raw, Q.Q4_0, (4, 48), mx.float16)


def test_every_mapped_type_is_tested():
    assert set(MAPPED) == MAPPED_TYPES
