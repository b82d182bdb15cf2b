"""GGUF tensors as ONNX Runtime's block-quantized contrib ops: `com.microsoft::MatMulNBits`
for weights, `GatherBlockQuantized` for embedding tables, where the GGUF blocks map on
exactly; `dequantize` (gguf's float32) for the rest.

MatMulNBits (onnxruntime 1.32): Y = A @ W^T with W (N, K) dequantized per block of
`block_size` along K as (q - zero_point) * scale; B (N, k_blocks, block * bits / 8) uint8 with
consecutive values packed low bits first (4 bits: value 2i low nibble, 2i+1 high nibble of
byte i); scales (N, k_blocks) float32; zero points packed the same way, default 2^(bits-1).
Checked on the CPU provider by tests/unit/test_onnx_quant.py.

Kept quantized (block 32 unless said; d, m, dmin the file's f16 values, sc and m the
K-quants' small integer scales and mins):
    Q4_0  d*(q-8)              -> 4 bits, scale d, default zero point 8
    Q8_0  d*x, x int8          -> 8 bits, q = x+128, scale d, default zero point 128
    Q5_0  d*(q-16)             -> 8 bits, q-16+128, scale d, default zero point 128
    Q4_1  d*q + m              -> 4 bits, scale d, zero point 0, plus an offset m per block
    Q5_1  d*q + m              -> 8 bits, scale d, zero point 0, offset m
    Q4_K  (d*sc)*q - dmin*m    -> 4 bits per sub-block of 32, scale d*sc, offset -dmin*m
    Q5_K  (d*sc)*q - dmin*m    -> 8 bits per sub-block of 32, the same
    Q6_K  (d*sc)*(q-32)        -> 8 bits per block of 16, q-32+128, scale d*sc (sc int8)
    Q3_K  (d*(sc-32))*q, q>=-4 -> 4 bits per block of 16, q+8, scale d*(sc-32)
    Q2_K  (d*sc)*q - dmin*m    -> 4 bits per block of 16, zero point 0, offset -dmin*m
    IQ4_NL d*level[q]          -> 8 bits, level+128 (int8 levels), scale d
    IQ4_XS (d*(ls-32))*level[q] -> 8 bits per sub-block of 32, scale d*(ls-32)
5- and 6-bit values take a byte each (1.125 bytes a weight, float32 takes 4); every scale
and offset is a product float32 holds exactly (at most 11 + 8 bits of significand).
An offset is a second term: sum over a block of x times offset = (x's block sums) @ offsets^T,
a small MatMul beside the MatMulNBits (K/block inner size), then an Add. At accuracy level 0
the block sums are x's own (a ReduceSum). At level 4 MatMulNBits rounds x to int8 per block
(scale max|x|/127, round to nearest), and the offset term must see the same x, as llama.cpp's
q8_1 activations carry the sum of their rounded values: taken from x exactly it left the
errors of the two terms uncorrelated (SmolLM2's golden mean |Δ log p| 0.111 against 0.039).
So the weight gets K/block more rows, row n+b one on block b and zero elsewhere (scale 1): its
outputs are the block sums of x as MatMulNBits rounded it, exactly, from the same kernel,
split off after it. Why
not MatMulNBits' float zero points (zp = -m/d): (q - zp) * d rounds twice, so 7.6% of
Q4_1's weights come out 1 ulp off gguf's d*q + m (measured), and onnxruntime 1.32 runs float
zero points on a slow path (a decode step's product, calls interleaved: 2.9 ms against
66 us for 3072x576 with the offset term, 755 against 34 us for 576x1536).

Exact: with float32 scales, d*(q-8), d*x and (d*sc)*q are exact (at most 11+6+8 bits of
significand), so MatMulNBits' weight equals gguf's; an offset's d*q + m is rounded once by
the Add, as gguf rounds it once. With accuracy_level 0 and A = I_K the output is gguf's
dequantization bit for bit. accuracy_level 4 (the default here) quantizes A to int8 in
blocks of `block_size`, as llama.cpp quantizes activations to q8 for these types (to q8_K,
blocks of 256, for the K-quants; ORT's blocks of 16 or 32 round finer): faster on the CPU,
with the error of that rounding of A (the test bounds it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnx
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from onnx import helper

from herd.errors import GGUFError

MS = "com.microsoft"
BLOCK = 32  # most mapped types' block or sub-block; Q2_K, Q3_K and Q6_K have 16
ACCURACY_LEVEL = 4  # A quantized to int8 per block, as llama.cpp does for these types


@dataclass(frozen=True)
class NBits:
    """One 2-D GGUF weight (n, k) in MatMulNBits' form: W[r, c] = (q - zero point) * scale
    (+ offset) for the block of row r holding column c."""

    b: np.ndarray  # uint8 (n, k_blocks, block_size * bits / 8), values packed low bits first
    scales: np.ndarray  # float32 (n, k_blocks)
    zero_points: np.ndarray | None  # uint8 (n, ceil(k_blocks * bits / 8)); None: 2^(bits-1)
    offsets: np.ndarray | None  # float32 (n, k_blocks) added per block (Q4_1's m); or None
    bits: int
    block_size: int
    k: int
    n: int
    qtype: Q
    # with offsets: b, scales, zero_points with k_blocks more rows (the block-sum rows, see
    # the module docstring); b, scales and zero_points are views of their first n rows
    summed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @cached_property
    def sum_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`summed`, made here for a part of stacked weights (`part`), which has none."""
        return self.summed or _with_sum_rows(self.b, self.scales, self.bits)

    @cached_property
    def offsets_t(self) -> np.ndarray | None:
        """offsets^T (k_blocks, n), as the nodes read it: one array for every pass (the
        backend holds initializers by identity), sharing offsets' memory."""
        return None if self.offsets is None else np.ascontiguousarray(self.offsets.T)

    @property
    def k_blocks(self) -> int:
        return self.k // self.block_size

    @property
    def nbytes(self) -> int:
        arrays = (self.b, self.scales, self.zero_points, self.offsets)
        return sum(a.nbytes for a in arrays if a is not None)


def _f32(b: np.ndarray) -> np.ndarray:
    """Little-endian f16 fields (n, 2) uint8 -> (n,) float32."""
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float32)


def _repacked(qs: np.ndarray) -> np.ndarray:
    """GGUF's nibble runs (..., L) uint8, byte j holding value j (low) and L+j (high), as
    MatMulNBits packs the same 2L values: byte i holds value 2i (low) and 2i+1 (high). So
    its first L/2 bytes pair the low nibbles of bytes 2i and 2i+1, the rest their high
    ones, taken from the pair as one 16-bit word: a few word ops, no unpacked values
    (2.5x faster; it was a third of the load time)."""
    w = qs.view("<u2")  # byte 2i | byte 2i+1 << 8
    out = np.empty(qs.shape, np.uint8)
    half = qs.shape[-1] // 2
    out[..., :half] = (w & 0x0F) | ((w >> 4) & 0xF0)
    out[..., half:] = ((w >> 4) & 0x0F) | ((w >> 8) & 0xF0)
    return out


# blocks (n, type_size) uint8 -> (b (n * sub, blob), scales (n * sub,), offsets or None)
# where sub is the number of 32-value (sub-)blocks in one GGUF block
Unpack = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray | None]]


def _q4_0(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    return _repacked(blk[:, 2:]), _f32(blk[:, :2]), None


def _q4_1(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    return _repacked(blk[:, 4:]), _f32(blk[:, :2]), _f32(blk[:, 2:4])


def _q8_0(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    return blk[:, 2:] ^ np.uint8(0x80), _f32(blk[:, :2]), None  # int8 x -> x + 128


def _k_scales(d: np.ndarray, dmin: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 8 sub-block scales d*sc and offsets -dmin*m (n, 8) from their 12 bytes
    (bytes 0-3: sc[0:4] low 6 bits, 4-7: m[0:4]; 8-11: sc[4:8] low nibble, m[4:8] high
    nibble, their top 2 bits in the top 2 bits of bytes 0-3 and 4-7). Both products exact."""
    lo, hi, mix = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], axis=-1)
    return d[:, None] * sc.astype(np.float32), -(dmin[:, None] * mn.astype(np.float32))


def _q4_k(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """256 values: 8 sub-blocks of 32 (d*sc)*q - dmin*m (`_k_scales`), then 4 runs of 32
    nibble bytes: run c's low nibbles are sub-block 2c, its high nibbles sub-block 2c+1."""
    n = len(blk)
    scales, offsets = _k_scales(_f32(blk[:, :2]), _f32(blk[:, 2:4]), blk[:, 4:16])
    packed = _repacked(blk[:, 16:].reshape(n, 4, 32)).reshape(n * 8, BLOCK // 2)
    return packed, scales.reshape(-1), offsets.reshape(-1)


def _five_bits(qs: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 32 values (n, 32) uint8: value j's low 4 bits are byte j's low nibble
    of qs (16 bytes) for j < 16, byte j-16's high nibble after; its 5th bit is bit j of qh
    (4 bytes, little-endian)."""
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    high = np.unpackbits(qh, axis=-1, bitorder="little")
    return low | (high << 4)


def _q5_0(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    return _five_bits(blk[:, 6:], blk[:, 2:6]) + np.uint8(112), _f32(blk[:, :2]), None  # q-16+128


def _q5_1(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    return _five_bits(blk[:, 8:], blk[:, 4:8]), _f32(blk[:, :2]), _f32(blk[:, 2:4])


def _q5_k(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """256 values, 8 sub-blocks of 32 (d*sc)*q - dmin*m, q 5 bits: run c of 32 bytes of qs
    holds sub-block 2c's low 4 bits in its low nibbles, 2c+1's in its high ones; bit j of
    qh's byte l is the 5th bit of sub-block j's value l."""
    n = len(blk)
    scales, offsets = _k_scales(_f32(blk[:, :2]), _f32(blk[:, 2:4]), blk[:, 4:16])
    qh, qs = blk[:, 16:48], blk[:, 48:].reshape(n, 4, 1, 32)
    low = ((qs >> np.array([0, 4], np.uint8)[:, None]) & 0x0F).reshape(n, 8, 32)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    return (low | (high << 4)).reshape(n * 8, BLOCK), scales.reshape(-1), offsets.reshape(-1)


def _q6_k(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """256 values, 16 blocks of 16 (d*sc)*(q - 32), sc int8, q 6 bits: in each half of 128
    values, ql's 64 bytes give values 0-63's low 4 bits in their low nibbles and 64-127's in
    their high ones; qh's 32 bytes give values l, l+32, l+64, l+96 their top 2 bits (bits
    0-1, 2-3, 4-5, 6-7 of byte l)."""
    n = len(blk)
    ql, qh = blk[:, :128].reshape(n, 2, 1, 64), blk[:, 128:192].reshape(n, 2, 1, 32)
    low = ((ql >> np.array([0, 4], np.uint8)[:, None]) & 0x0F).reshape(n, 8, 32)
    high = ((qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3).reshape(n, 8, 32)
    q = (low | (high << 4)) + np.uint8(96)  # q - 32 + 128
    sc = blk[:, 192:208].view(np.int8).astype(np.float32)
    scales = _f32(blk[:, 208:210])[:, None] * sc  # exact: 11 + 8 bits
    return q.reshape(n * 16, 16), scales.reshape(-1), None


def _nibbles(v: np.ndarray) -> np.ndarray:
    """Values below 16 (m, 2L) packed as MatMulNBits reads them (m, L): value 2i in the low
    nibble of byte i, 2i+1 in the high one."""
    return v[:, 0::2] | (v[:, 1::2] << 4)


_CRUMBS = np.array([0, 2, 4, 6], np.uint8)[:, None]  # 2-bit fields of a byte, low first


def _q2_k(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """256 values, 16 blocks of 16 (d*sc)*q - dmin*m, sc and m 4 bits (byte j of the first
    16: sc low, m high), q 2 bits: each half of 128 values has 32 bytes of qs whose bit
    pairs 0-1, 2-3, 4-5, 6-7 are its values l, l+32, l+64, l+96. 4 bits, zero point 0."""
    n = len(blk)
    sc, qs = blk[:, :16], blk[:, 16:80].reshape(n, 2, 1, 32)
    q = ((qs >> _CRUMBS) & 3).reshape(n * 16, 16)
    scales = _f32(blk[:, 80:82])[:, None] * (sc & 0x0F).astype(np.float32)
    offsets = -(_f32(blk[:, 82:84])[:, None] * (sc >> 4).astype(np.float32))
    return _nibbles(q), scales.reshape(-1), offsets.reshape(-1)


def _q3_k(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """256 values, 16 blocks of 16 d*(sc-32)*q, sc 6 bits (low 4 in the nibbles of bytes
    96-103, low nibbles first; top 2 in the bit pairs of bytes 104-107), q = low 2 bits
    (as Q2_K's) - 4 where bit j of hmask byte l (value l + 32j) is clear: q + 8 in 4 bits,
    the default zero point 8."""
    n = len(blk)
    qs, s = blk[:, 32:96].reshape(n, 2, 1, 32), blk[:, 96:108]
    low = (s[:, :8].reshape(n, 1, 8) >> np.array([0, 4], np.uint8)[:, None]) & 0x0F
    high = (s[:, 8:12].reshape(n, 1, 4) >> _CRUMBS) & 3
    sc = (low.reshape(n, 16) | (high.reshape(n, 16) << 4)).astype(np.float32) - 32
    ql = ((qs >> _CRUMBS) & 3).reshape(n, 16, 16)
    qh = (blk[:, :32].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    q = ql + 4 + (qh.reshape(n, 16, 16) << 2)  # ql - 4 (1 - bit) + 8
    return _nibbles(q.reshape(n * 16, 16)), (_f32(blk[:, 108:110])[:, None] * sc).reshape(-1), None


# IQ4_NL's 16 levels (llama.cpp's kvalues_iq4nl), + 128: 8-bit values on zero point 128
_IQ4_LEVELS = (np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113])
               + 128).astype(np.uint8)  # fmt: skip


def _iq4_nl(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """d * level[q], q 4 bits packed as Q4_0's (16 bytes: values 0-15 low nibbles, 16-31
    high): not linear in q, so one byte a value, the level itself."""
    qs = blk[:, 2:]
    return _IQ4_LEVELS[np.concatenate([qs & 0x0F, qs >> 4], axis=-1)], _f32(blk[:, :2]), None


def _iq4_xs(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """256 values, 8 sub-blocks of 32 d*(ls-32) * level[q]: ls 6 bits (low 4 in the nibbles
    of bytes 4-7, low nibbles first; top 2 in bit pairs of the 16-bit word at bytes 2-3),
    then 16 bytes a sub-block, nibbles as IQ4_NL's."""
    n = len(blk)
    low = (blk[:, 4:8, None] >> np.array([0, 4], np.uint8)) & 0x0F
    high = (blk[:, 2:4].view("<u2") >> np.arange(0, 16, 2, dtype=np.uint16)) & 3
    ls = low.reshape(n, 8) | (high.astype(np.uint8) << 4)
    scales = _f32(blk[:, :2])[:, None] * (ls.astype(np.float32) - 32)  # exact: 11 + 6 bits
    qs = blk[:, 8:].reshape(n, 8, 1, 16)
    q = ((qs >> np.array([0, 4], np.uint8)[:, None]) & 0x0F).reshape(n * 8, 32)
    return _IQ4_LEVELS[q], scales.reshape(-1), None


# qtype -> (bits, block, unpack): 4 bits where the values fit a nibble, else 8 (5- and
# 6-bit values, one byte each: 1.125 bytes a weight against float32's 4)
_MAPPED: dict[Q, tuple[int, int, Unpack]] = {
    Q.Q4_0: (4, BLOCK, _q4_0),
    Q.Q4_1: (4, BLOCK, _q4_1),
    Q.Q8_0: (8, BLOCK, _q8_0),
    Q.Q4_K: (4, BLOCK, _q4_k),
    Q.Q5_0: (8, BLOCK, _q5_0),
    Q.Q5_1: (8, BLOCK, _q5_1),
    Q.Q5_K: (8, BLOCK, _q5_k),
    Q.Q6_K: (8, 16, _q6_k),
    Q.Q2_K: (4, 16, _q2_k),
    Q.Q3_K: (4, 16, _q3_k),
    Q.IQ4_NL: (8, BLOCK, _iq4_nl),
    Q.IQ4_XS: (8, BLOCK, _iq4_xs),
}
MAPPED_TYPES = frozenset(_MAPPED)
# GatherBlockQuantized has no offset term: only the types without one
GATHER_TYPES = frozenset({Q.Q4_0, Q.Q8_0, Q.Q5_0, Q.Q6_K, Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS})


def _check(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    """raw as flat uint8, or GGUFError if the bytes do not fit `shape` in `qtype`'s blocks."""
    if qtype not in GGML_QUANT_SIZES:
        raise GGUFError(f"tensor type {qtype.name} has no known block size")
    raw = np.asarray(raw).reshape(-1).view(np.uint8)
    block, type_size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    if (shape and shape[-1] % block) or raw.size != n // block * type_size:
        raise GGUFError(
            f"{qtype.name} tensor of shape {shape}: {raw.size} bytes do not fit its blocks "
            f"of {block} values"
        )
    return raw


def matmul_nbits(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> NBits | None:
    """The 2-D weight of NumPy `shape` (n, k) whose GGUF bytes are `raw`, in MatMulNBits'
    form; None where there is no exact mapping (other types, 1-D or 3-D tensors): then
    `dequantize`. GGUFError for bytes that do not fit the shape (a row must be whole blocks)."""
    raw = _check(raw, qtype, shape)
    if qtype not in _MAPPED or len(shape) != 2:
        return None
    bits, block, unpack = _MAPPED[qtype]
    n, k = shape
    kb = k // block
    b, scales, offsets = unpack(raw.reshape(-1, GGML_QUANT_SIZES[qtype][1]))
    b = np.ascontiguousarray(b.reshape(n, kb, block * bits // 8))
    scales = np.ascontiguousarray(scales.reshape(n, kb), dtype=np.float32)
    zero_points = summed = None
    if offsets is not None:  # q * scale + offset: zero point 0, packed as B is
        offsets = _transposed(offsets.reshape(n, kb))
        summed = _with_sum_rows(b, scales, bits)
        b, scales, zero_points = (a[:n] for a in summed)  # views: no second copy
    return NBits(b, scales, zero_points, offsets, bits, block, k, n, qtype, summed)


def concat(nbs: list[NBits]) -> NBits:
    """Weights of the same K, bits and form stacked along N: one MatMulNBits for several
    linears that read the same x (q, k and v; gate and up), its output split after."""
    first = nbs[0]
    assert all(
        (nb.k, nb.bits, nb.block_size, nb.offsets is None)
        == (first.k, first.bits, first.block_size, first.offsets is None)
        for nb in nbs
    ), "concat: weights of different forms"
    n = sum(nb.n for nb in nbs)
    b = np.concatenate([nb.b for nb in nbs])
    scales = np.concatenate([nb.scales for nb in nbs])
    zero_points = summed = offsets = None
    if first.offsets is not None:
        offsets = _transposed(np.concatenate([nb.offsets for nb in nbs if nb.offsets is not None]))
        summed = _with_sum_rows(b, scales, first.bits)
        b, scales, zero_points = (a[:n] for a in summed)
    elif first.zero_points is not None:
        zero_points = np.concatenate([nb.zero_points for nb in nbs if nb.zero_points is not None])
    return NBits(b, scales, zero_points, offsets, first.bits, first.block_size, first.k, n,
                 first.qtype, summed)  # fmt: skip


def part(nb: NBits, start: int, n: int) -> NBits:
    """Rows [start, start + n) of stacked weights as a weight of its own, viewing their
    memory: a linear's own blocks once they are stacked, so a model's q, k, v, gate and up
    are held once, not twice. Its block-sum rows (`sum_rows`) are made if it is used alone."""
    rows = slice(start, start + n)
    zero_points = None if nb.zero_points is None else nb.zero_points[rows]
    offsets = None if nb.offsets is None else nb.offsets[rows]
    return NBits(nb.b[rows], nb.scales[rows], zero_points, offsets, nb.bits, nb.block_size,
                 nb.k, n, nb.qtype)  # fmt: skip


def _transposed(offsets: np.ndarray) -> np.ndarray:
    """(n, k_blocks) offsets as the view of a contiguous (k_blocks, n) array: `offsets_t`
    is then that array, with no copy."""
    return np.ascontiguousarray(offsets.T, dtype=np.float32).T


def _with_sum_rows(
    b: np.ndarray, scales: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """b, scales and (zero) zero points with k_blocks rows appended, row n+j one on block j
    and zero elsewhere, scale 1: MatMulNBits' outputs n.. are then x's block sums."""
    n, kb, blob = b.shape
    ones = np.zeros((kb, kb, blob), np.uint8)
    ones[np.arange(kb), np.arange(kb)] = 0x11 if bits == 4 else 1  # every value 1
    b_all = np.concatenate([b, ones])
    scales_all = np.concatenate([scales, np.ones((kb, kb), np.float32)])
    zero_points = np.zeros((n + kb, (kb * bits + 7) // 8), dtype=np.uint8)
    return b_all, scales_all, zero_points


def matmul_nbits_node(
    name_prefix: str,
    x_name: str,
    out_name: str,
    nb: NBits,
    accuracy_level: int = ACCURACY_LEVEL,
    two_d: bool = False,
) -> tuple[list[onnx.NodeProto], list[tuple[str, np.ndarray]]]:
    """The nodes computing out = x @ W^T (x (..., k) float32 of any rank; `two_d`: x is
    known to be (n, k)) and their initializers (name, array); every name they add starts
    with `name_prefix`. One MatMulNBits node; with offsets also x's block sums, a MatMul by
    offsets^T and an Add (one Gemm for a 2-D x): at accuracy level 0 the sums of x (Shape,
    Slice, Concat, Reshape, ReduceSum), else those of x as MatMulNBits rounded it (its extra
    rows, then a Split)."""
    p = name_prefix
    if nb.offsets is not None and accuracy_level != 0:
        return _rounded_offset_nodes(p, x_name, out_name, nb, accuracy_level, two_d)
    inits: list[tuple[str, np.ndarray]] = [(f"{p}.qweight", nb.b), (f"{p}.scales", nb.scales)]
    inputs = [x_name, f"{p}.qweight", f"{p}.scales"]
    if nb.zero_points is not None:
        inits.append((f"{p}.zero_points", nb.zero_points))
        inputs.append(f"{p}.zero_points")
    q_out = out_name if nb.offsets is None else f"{p}.q_out"
    attrs = {"K": nb.k, "N": nb.n, "bits": nb.bits, "block_size": nb.block_size}
    nodes = [
        helper.make_node(
            "MatMulNBits",
            inputs,
            [q_out],
            name=f"{p}.MatMulNBits",
            domain=MS,
            accuracy_level=accuracy_level,
            **attrs,
        )  # fmt: skip
    ]
    if nb.offsets is None:
        return nodes, inits
    inits += [
        (f"{p}.offsets_t", nb.offsets_t),  # (k_blocks, n)
        (f"{p}.blocks", np.array([nb.k_blocks, nb.block_size], dtype=np.int64)),
        (f"{p}.zero", np.array([0], dtype=np.int64)),
        (f"{p}.minus1", np.array([-1], dtype=np.int64)),
    ]

    def node(op: str, ins: list[str], out: str, **kw: object) -> None:
        nodes.append(helper.make_node(op, ins, [out], name=f"{p}.{out}", **kw))

    # x (..., k) -> (..., k_blocks, block) whatever x's rank: its leading dims, then blocks
    node("Shape", [x_name], f"{p}.x_shape")
    node("Slice", [f"{p}.x_shape", f"{p}.zero", f"{p}.minus1"], f"{p}.x_lead")
    node("Concat", [f"{p}.x_lead", f"{p}.blocks"], f"{p}.x_blocked_shape", axis=0)
    node("Reshape", [x_name, f"{p}.x_blocked_shape"], f"{p}.x_blocked")
    node("ReduceSum", [f"{p}.x_blocked", f"{p}.minus1"], f"{p}.x_block_sums", keepdims=0)
    node("MatMul", [f"{p}.x_block_sums", f"{p}.offsets_t"], f"{p}.offset_out")
    nodes.append(helper.make_node("Add", [q_out, f"{p}.offset_out"], [out_name], name=f"{p}.add"))
    return nodes, inits


def _rounded_offset_nodes(
    p: str, x_name: str, out_name: str, nb: NBits, accuracy_level: int, two_d: bool
) -> tuple[list[onnx.NodeProto], list[tuple[str, np.ndarray]]]:
    """W x + offsets' term on the block sums of x as MatMulNBits rounded it: one
    MatMulNBits with the block-sum rows, a Split, a MatMul by offsets^T and an Add (2-D:
    one Gemm, which ORT does not fuse them into itself when the token count is symbolic)."""
    assert nb.offsets is not None
    b, scales, zero_points = nb.sum_rows
    inits = [(f"{p}.qweight_s", b), (f"{p}.scales_s", scales), (f"{p}.zero_points_s", zero_points),
             (f"{p}.offsets_t", nb.offsets_t),
             (f"{p}.split", np.array([nb.n, nb.k_blocks], dtype=np.int64))]  # fmt: skip
    both, main, sums, off = (f"{p}.{s}" for s in ("both", "main", "sums", "offset_out"))
    nodes = [
        helper.make_node(
            "MatMulNBits",
            [x_name, *(n for n, _ in inits[:3])],
            [both],
            name=f"{p}.MatMulNBits",
            domain=MS,
            accuracy_level=accuracy_level,
            K=nb.k,
            N=nb.n + nb.k_blocks,
            bits=nb.bits,
            block_size=nb.block_size,
        ),  # fmt: skip
        helper.make_node("Split", [both, f"{p}.split"], [main, sums], name=f"{p}.split", axis=-1),
    ]
    if two_d:
        nodes.append(helper.make_node("Gemm", [sums, f"{p}.offsets_t", main], [out_name],
                                      name=f"{p}.offset"))  # fmt: skip
        return nodes, inits
    nodes += [
        helper.make_node("MatMul", [sums, f"{p}.offsets_t"], [off], name=f"{p}.offset"),
        helper.make_node("Add", [main, off], [out_name], name=f"{p}.add"),
    ]
    return nodes, inits


def gather_block_quantized(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> NBits | None:
    """An embedding table (vocab, dim) for GatherBlockQuantized (rows gathered, blocks along
    dim); None where it has no exact form (types with an offset, such as Q4_1: the op has no
    float term). GGUFError for bytes that do not fit the shape."""
    if qtype not in GATHER_TYPES:
        _check(raw, qtype, shape)
        return None
    return matmul_nbits(raw, qtype, shape)


def gather_block_quantized_node(
    name_prefix: str, ids_name: str, out_name: str, nb: NBits
) -> tuple[list[onnx.NodeProto], list[tuple[str, np.ndarray]]]:
    """out = table[ids] (ids int64 of any shape -> (*ids.shape, dim) float32). Note the op
    gives zeros for an out-of-range id, where Gather fails: check ids before."""
    if nb.offsets is not None:
        raise ValueError(f"{nb.qtype.name} has offsets: no GatherBlockQuantized form")
    p = name_prefix
    data = nb.b.reshape(nb.n, -1)  # (vocab, dim * bits / 8): packed along the last axis
    inits = [(f"{p}.qdata", data), (f"{p}.scales", nb.scales)]
    node = helper.make_node(
        "GatherBlockQuantized", [inits[0][0], ids_name, inits[1][0]], [out_name],
        name=f"{p}.GatherBlockQuantized", domain=MS,
        bits=nb.bits, block_size=nb.block_size, gather_axis=0, quantize_axis=1,
    )  # fmt: skip
    return [node], inits


def dequantize(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    """gguf's float32 dequantization of the tensor, of NumPy `shape`; GGUFError for bytes
    that do not fit or a type gguf cannot dequantize."""
    raw = _check(raw, qtype, shape)
    if qtype == Q.F32:
        return raw.view(np.float32).reshape(shape).copy()
    rows = raw.reshape(int(np.prod(shape[:-1], dtype=np.int64)), -1) if shape else raw
    try:
        out = gguf_dequantize(rows, qtype)
    except NotImplementedError as e:
        raise GGUFError(f"tensor type {qtype.name} has no dequantizer") from e
    return np.asarray(out, dtype=np.float32).reshape(shape)
