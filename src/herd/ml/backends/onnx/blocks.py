"""GGUF blocks as MatMulNBits' values: each mapped type's bytes unpacked into the values
(packed as the op reads them), one scale per (sub-)block and, for types with a minimum, one
offset per (sub-)block (`unpack`). How those become nodes: quant.py.

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
Every unpacker is proven bit for bit against gguf's dequantization by
tests/unit/test_onnx_quant.py (identity input, accuracy level 0).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from herd.errors import GGUFError

BLOCK = 32  # most mapped types' block or sub-block; Q2_K, Q3_K and Q6_K have 16


def check(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
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


_CRUMBS = np.array([0, 2, 4, 6], np.uint8)[:, None]  # 2-bit fields of a byte, low first


def _apart(qs: np.ndarray) -> np.ndarray:
    """Bytes (..., L) as their 2L nibbles: all the low nibbles in order, then the high
    ones, as GGUF lays runs of 4-bit values out (Q4_0, Q5_0, IQ4_NL, the K-quants' runs)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _five_bits(qs: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 32 values (n, 32) uint8: value j's low 4 bits are byte j's low nibble
    of qs (16 bytes) for j < 16, byte j-16's high nibble after; its 5th bit is bit j of qh
    (4 bytes, little-endian)."""
    return _apart(qs) | (np.unpackbits(qh, axis=-1, bitorder="little") << 4)


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
    low = _apart(blk[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    high = (blk[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    return (low | (high << 4)).reshape(n * 8, BLOCK), scales.reshape(-1), offsets.reshape(-1)


def _q6_k(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """256 values, 16 blocks of 16 (d*sc)*(q - 32), sc int8, q 6 bits: in each half of 128
    values, ql's 64 bytes give values 0-63's low 4 bits in their low nibbles and 64-127's in
    their high ones; qh's 32 bytes give values l, l+32, l+64, l+96 their top 2 bits (bits
    0-1, 2-3, 4-5, 6-7 of byte l)."""
    n = len(blk)
    low = _apart(blk[:, :128].reshape(n, 2, 64)).reshape(n, 8, 32)
    high = ((blk[:, 128:192].reshape(n, 2, 1, 32) >> _CRUMBS) & 3).reshape(n, 8, 32)
    q = (low | (high << 4)) + np.uint8(96)  # q - 32 + 128
    sc = blk[:, 192:208].view(np.int8).astype(np.float32)
    scales = _f32(blk[:, 208:210])[:, None] * sc  # exact: 11 + 8 bits
    return q.reshape(n * 16, 16), scales.reshape(-1), None


def _nibbles(v: np.ndarray) -> np.ndarray:
    """Values below 16 (m, 2L) packed as MatMulNBits reads them (m, L): value 2i in the low
    nibble of byte i, 2i+1 in the high one."""
    return v[:, 0::2] | (v[:, 1::2] << 4)


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
    high = (s[:, 8:12].reshape(n, 1, 4) >> _CRUMBS) & 3
    sc = (_apart(s[:, :8]) | (high.reshape(n, 16) << 4)).astype(np.float32) - 32
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
    return _IQ4_LEVELS[_apart(blk[:, 2:])], _f32(blk[:, :2]), None


def _iq4_xs(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """256 values, 8 sub-blocks of 32 d*(ls-32) * level[q]: ls 6 bits (low 4 in the nibbles
    of bytes 4-7, low nibbles first; top 2 in bit pairs of the 16-bit word at bytes 2-3),
    then 16 bytes a sub-block, nibbles as IQ4_NL's."""
    n = len(blk)
    low = (blk[:, 4:8, None] >> np.array([0, 4], np.uint8)) & 0x0F
    high = (blk[:, 2:4].view("<u2") >> np.arange(0, 16, 2, dtype=np.uint16)) & 3
    ls = low.reshape(n, 8) | (high.astype(np.uint8) << 4)
    scales = _f32(blk[:, :2])[:, None] * (ls.astype(np.float32) - 32)  # exact: 11 + 6 bits
    q = _apart(blk[:, 8:].reshape(n, 8, 16)).reshape(n * 8, 32)
    return _IQ4_LEVELS[q], scales.reshape(-1), None


# qtype -> (bits, block, unpack): 4 bits where the values fit a nibble, else 8 (5- and
# 6-bit values, one byte each: 1.125 bytes a weight against float32's 4)
FORMS: dict[Q, tuple[int, int, Unpack]] = {
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
MAPPED_TYPES = frozenset(FORMS)
# GatherBlockQuantized has no offset term: only the types without one
GATHER_TYPES = frozenset({Q.Q4_0, Q.Q8_0, Q.Q5_0, Q.Q6_K, Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS})


def unpack(raw: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A mapped type's bytes (flat uint8, whole blocks: `check`) as (values packed as
    MatMulNBits reads them, a row per (sub-)block; scales (rows,); offsets (rows,) or None)."""
    return FORMS[qtype][2](raw.reshape(-1, GGML_QUANT_SIZES[qtype][1]))
