"""GGUF tensors as MLX arrays: quantized blocks kept quantized where MLX's affine
quantization represents them exactly, dequantized once at load otherwise.

MLX affine quantization: per group of `group_size` values along a row, w = scale * q + bias
with q unsigned `bits`-bit. `packed` is the row's q values as one little-endian bit stream
(value i at bits [i*bits, (i+1)*bits)), read as uint32 words: checked against `mx.quantize`
for 2, 3, 4, 5, 6 and 8 bits (tests/unit/test_mlx_quant.py keeps checking it).

Kept quantized (bits, group 32; d, dmin, m are the file's f16 values):
    Q4_0 d*(q-8)  -> scale d, bias -8d      Q4_1 d*q + m -> scale d, bias m        4 bits
    Q5_0 d*(q-16) -> scale d, bias -16d     Q5_1 d*q + m -> scale d, bias m        5 bits
    Q8_0 d*x, x int8 -> q = x+128, scale d, bias -128d                            8 bits
    Q4_K, Q5_K (8 sub-blocks of 32 per 256): (d*sc)*q - dmin*m -> scale d*sc, bias -dmin*m
Everything else quantized is dequantized with `gguf.quants.dequantize` (Q6_K's sub-blocks are
16 values, below MLX's smallest group of 32; Q2_K/Q3_K likewise; the IQ types use grids).

Why float32 scales and biases make `mx.dequantize` equal gguf's float32 result bit for bit:
an f16 d has an 11-bit significand and q at most 8 bits (x+128 <= 255), so d*q needs at most
19 bits and is exact in float32's 24; d*sc (6-bit sc) needs 17, and (d*sc)*q with a 5-bit q
22: exact; -8d, -16d, -128d are power-of-two multiples (exact); dmin*m (6-bit m) needs 17
(exact). Exponents stay far inside f32's range. So MLX's scale*q + bias (fused or not) and
gguf's d*(q-8), d*q + m, (d*sc)*q - dmin*m each round the same exact real number once, or
not at all when it is representable (Q4_0, Q5_0, Q8_0, where d*(q-8) needs <= 19 bits). The
one difference: gguf's d*0 with d < 0 is -0.0 where MLX's 8d + (-8d) is +0.0 (equal values).
f16 scales would store Q4_0/Q4_1/Q5_x/Q8_0's scales and biases exactly (bar |d| >= 65504/128
for Q8_0's bias), but `mx.dequantize` then computes in f16 and rounds d*(q-8): not exact.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from herd.errors import GGUFError


@dataclass
class MlxWeight:
    """One GGUF tensor on MLX. Either `dense` (a float array of `shape`), or MLX affine
    quantization: `packed` (uint32, (..., rows, cols * bits / 32)), `scales` and `biases`
    (..., rows, cols / group_size), so that `mx.dequantize(packed, scales, biases,
    group_size, bits)` is the weight of `shape`."""

    shape: tuple[int, ...]  # NumPy order, as GGUFFile.tensors[name].shape
    gguf_type: Q
    dense: mx.array | None = None
    packed: mx.array | None = None
    scales: mx.array | None = None
    biases: mx.array | None = None
    bits: int = 0
    group_size: int = 0
    # the GGUF type was quantized but MLX holds it dense (no exact mapping): its name
    dequantized_from: str | None = None
    # the tensor's size in the GGUF file, so nbytes - gguf_nbytes is what MLX's form costs
    gguf_nbytes: int = 0
    # a 2-D weight's rows in consecutive slices (views, no copy), one per CPU stream:
    # MLX's CPU kernels run on one thread each, so `linear` computes the slices side by
    # side (the backend sets them; empty: one whole product)
    parts: list[MlxWeight] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return self.packed is not None

    @property
    def nbytes(self) -> int:
        arrays = (self.dense, self.packed, self.scales, self.biases)
        return sum(a.nbytes for a in arrays if a is not None)

    def rows(self, start: int, stop: int) -> MlxWeight:
        """Rows [start, stop) of a 2-D weight: views of its arrays."""
        assert len(self.shape) == 2, "rows of a 2-D weight"

        def cut(a: mx.array | None) -> mx.array | None:
            return None if a is None else a[start:stop]

        return MlxWeight(
            (stop - start, self.shape[1]), self.gguf_type, cut(self.dense), cut(self.packed),
            cut(self.scales), cut(self.biases), self.bits, self.group_size, self.dequantized_from,
        )  # fmt: skip

    def to_dense(self, dtype: mx.Dtype = mx.float32) -> mx.array:
        if self.dense is not None:
            return self.dense.astype(dtype)
        assert self.packed is not None and self.scales is not None
        w = mx.dequantize(
            self.packed, self.scales, self.biases, group_size=self.group_size, bits=self.bits
        )
        return w.astype(dtype)


_DIRECT = {
    Q.F32: np.float32,
    Q.F16: np.float16,
    Q.I8: np.int8,
    Q.I16: np.int16,
    Q.I32: np.int32,
    Q.I64: np.int64,
}
GROUP = 32  # every mapped type's group: its block (Q4_0..Q8_0) or sub-block (Q4_K, Q5_K)
_SLAB = 1 << 18  # values unpacked per step: the temporaries stay in cache, peak memory small

# blocks (n, type_size) uint8 -> packed (n, block * bits / 8) uint8, scales and biases
# (n, block / 32) float32
Unpack = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _f32(b: np.ndarray) -> np.ndarray:
    """Little-endian f16 from 2 bytes a block, (n, 2) uint8 -> (n, 1) float32 (a strided
    view of the blocks: only the last axis must be contiguous)."""
    return b.view("<f2").astype(np.float32)


def _nibbles_to_stream(qs: np.ndarray) -> np.ndarray:
    """GGUF's nibble layout -> MLX's 4-bit stream. qs (n, H, L): byte j holds value j (low
    nibble) and value L+j (high) of a run of 2L; MLX wants value 2i low, 2i+1 high. Returns
    (n, H, L) uint8: per run, the L/2 bytes of the low nibbles' values, then the high's."""
    x = np.ascontiguousarray(qs).view("<u2")  # (n, H, L/2): values 2i, L+2i, 2i+1, L+2i+1
    out = np.empty(qs.shape[:-1] + (2, qs.shape[-1] // 2), dtype=np.uint8)
    x4 = x >> 4
    out[..., 0, :] = (x & 0x000F) | (x4 & 0x00F0)
    out[..., 1, :] = (x4 & 0x000F) | ((x >> 8) & 0x00F0)
    return out.reshape(qs.shape)


def _nibble_values(qs: np.ndarray) -> np.ndarray:
    """qs (n, H, L) in GGUF's nibble layout -> (n, H, 2L) values 0..15 in order."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _stream5(q: np.ndarray) -> np.ndarray:
    """Values 0..31 (n, k), k % 8 == 0 -> MLX's 5-bit stream (n, k * 5 / 8) uint8: each 8
    values (one uint64 of bytes) become 40 bits, the low 5 bytes of the uint64."""
    w = np.ascontiguousarray(q).reshape(q.shape[0], -1, 8).view("<u8")[..., 0]  # (n, k/8)
    acc = w & 0x1F
    for j in range(1, 8):
        acc |= ((w >> np.uint64(8 * j)) & np.uint64(0x1F)) << np.uint64(5 * j)
    return acc[..., None].view(np.uint8)[..., :5].reshape(q.shape[0], -1)


def _unpack_q4_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f32(b[:, :2])  # (n, 1)
    return _nibbles_to_stream(b[:, None, 2:]).reshape(len(b), -1), d, -8 * d


def _unpack_q4_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _nibbles_to_stream(b[:, None, 4:]).reshape(len(b), -1), _f32(b[:, :2]), _f32(b[:, 2:4])


def _q5_values(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: qh (n, 4) the fifth bits (bit i of the little-endian uint32 is value i's),
    qs (n, 16) nibbles -> (n, 32) values 0..31."""
    high = np.unpackbits(qh, axis=-1, bitorder="little")  # (n, 32)
    return _nibble_values(qs) | (high << 4)


def _unpack_q5_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f32(b[:, :2])
    return _stream5(_q5_values(b[:, 2:6], b[:, 6:])), d, -16 * d


def _unpack_q5_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = _q5_values(b[:, 4:8], b[:, 8:])
    return _stream5(q), _f32(b[:, :2]), _f32(b[:, 2:4])


def _unpack_q8_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f32(b[:, :2])
    return b[:, 2:] ^ np.uint8(0x80), d, -128 * d  # int8 x -> x + 128 as uint8


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 6-bit sub-block scales and mins, as float32 (n, 8) scale d*sc and bias
    -dmin*m. The 12 bytes, as 3 little-endian words A, B, C of 4 bytes: sc[0:4] and m[0:4]
    are the low 6 bits of A's and B's bytes; sc[4:8] and m[4:8] have their low 4 bits in
    C's bytes (low, high nibble) and their top 2 bits in the top 2 bits of A's and B's.
    Whole words at a time: 4 values per operation."""
    d, dmin = _f32(b[:, :2]), _f32(b[:, 2:4])
    words = b[:, 4:16].view("<u4")  # (n, 3)
    a, m, c = words[:, 0], words[:, 1], words[:, 2]
    sc = np.empty((len(b), 2), dtype="<u4")
    mins = np.empty_like(sc)
    sc[:, 0] = a & 0x3F3F3F3F
    sc[:, 1] = (c & 0x0F0F0F0F) | ((a >> 2) & 0x30303030)
    mins[:, 0] = m & 0x3F3F3F3F
    mins[:, 1] = ((c >> 4) & 0x0F0F0F0F) | ((m >> 2) & 0x30303030)
    sc8, mins8 = sc.view(np.uint8), mins.view(np.uint8)  # (n, 8)
    return d * sc8.astype(np.float32), -(dmin * mins8.astype(np.float32))


def _unpack_q4_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scales, biases = _k_scales(b)
    # 4 runs of 32 bytes: low nibbles are sub-block 2c, high nibbles sub-block 2c+1
    packed = _nibbles_to_stream(b[:, 16:].reshape(-1, 4, 32)).reshape(len(b), -1)
    return packed, scales, biases


def _unpack_q5_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scales, biases = _k_scales(b)
    # qh (n, 32): bit j of byte l is the fifth bit of value l of sub-block j
    high = np.unpackbits(b[:, 16:48], axis=-1, bitorder="little").reshape(-1, 32, 8)
    q = _nibble_values(b[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    q |= high.transpose(0, 2, 1) << 4
    return _stream5(q.reshape(len(b), -1)), scales, biases


_MAPPED: dict[Q, tuple[int, Unpack]] = {
    Q.Q4_0: (4, _unpack_q4_0),
    Q.Q4_1: (4, _unpack_q4_1),
    Q.Q5_0: (5, _unpack_q5_0),
    Q.Q5_1: (5, _unpack_q5_1),
    Q.Q8_0: (8, _unpack_q8_0),
    Q.Q4_K: (4, _unpack_q4_k),
    Q.Q5_K: (5, _unpack_q5_k),
}
MAPPED_TYPES = frozenset(_MAPPED)


def load(raw: np.ndarray, qtype: Q, shape: tuple[int, ...], dense_dtype: mx.Dtype) -> MlxWeight:
    """The tensor whose GGUF bytes are `raw` (uint8), of `qtype` and NumPy `shape`.
    `dense_dtype`: what a quantized type without an exact mapping is dequantized to.
    GGUFError for a type neither MLX nor gguf's dequantizer handles, or bytes that do not
    fit the shape."""
    raw = raw.reshape(-1).view(np.uint8)
    if qtype not in GGML_QUANT_SIZES:
        raise GGUFError(f"tensor type {qtype.name} has no known block size")
    block, type_size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    if (shape and shape[-1] % block) or raw.size != n // block * type_size:
        raise GGUFError(
            f"{qtype.name} tensor of shape {shape}: {raw.size} bytes do not fit its blocks"
        )
    if qtype in _DIRECT:
        dense = mx.array(raw.view(_DIRECT[qtype]).reshape(shape))
        return MlxWeight(shape, qtype, dense=dense, gguf_nbytes=raw.size)
    if qtype == Q.BF16:
        dense = mx.array(raw.view(np.uint16).reshape(shape)).view(mx.bfloat16)
        return MlxWeight(shape, qtype, dense=dense, gguf_nbytes=raw.size)
    # a 1-D tensor has no rows for mx.dequantize (it wants 2 dims): dense, exactly as mapped
    if qtype in _MAPPED and len(shape) >= 2:
        return _load_mapped(raw, qtype, shape)
    return _load_dequantized(raw, qtype, shape, dense_dtype)


def _each_slab(n_rows: int, cols: int, fn: Callable[[int, int], None]) -> None:
    """fn(start, stop) over slabs of rows, on a few threads (NumPy lets go of the GIL
    in its loops); each call writes its own rows of preallocated outputs."""
    step = max(1, _SLAB // cols)
    spans = [(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]
    if len(spans) == 1:
        fn(*spans[0])
        return
    for f in [_pool().submit(fn, a, b) for a, b in spans]:
        f.result()  # re-raises a slab's error


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="herd-mlx-load")


def _load_mapped(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> MlxWeight:
    bits, unpack = _MAPPED[qtype]
    block, type_size = GGML_QUANT_SIZES[qtype]
    cols, n_rows = shape[-1], int(np.prod(shape[:-1], dtype=np.int64))
    rows = raw.reshape(n_rows, cols // block * type_size)
    packed = np.empty((n_rows, cols * bits // 8), dtype=np.uint8)
    scales = np.empty((n_rows, cols // GROUP), dtype=np.float32)
    biases = np.empty_like(scales)

    def slab(a: int, b: int) -> None:
        p, s, m = unpack(rows[a:b].reshape(-1, type_size))
        packed[a:b] = p.reshape(b - a, -1)
        scales[a:b] = s.reshape(b - a, -1)
        biases[a:b] = m.reshape(b - a, -1)

    _each_slab(n_rows, cols, slab)
    lead = tuple(shape[:-1])
    return MlxWeight(
        shape,
        qtype,
        packed=mx.array(packed.view(np.uint32).reshape(lead + (-1,))),
        scales=mx.array(scales.reshape(lead + (-1,))),
        biases=mx.array(biases.reshape(lead + (-1,))),
        bits=bits,
        group_size=GROUP,
        gguf_nbytes=raw.size,
    )


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16's bits (uint16), rounded to nearest even as MLX's astype does."""
    u = x.view(np.uint32)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), r)


def _load_dequantized(
    raw: np.ndarray, qtype: Q, shape: tuple[int, ...], dense_dtype: mx.Dtype
) -> MlxWeight:
    """gguf's float32 dequantization, a slab of rows at a time into `dense_dtype`, so the
    whole tensor never exists in float32 unless that is the dtype asked for."""
    storage = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16}
    if dense_dtype not in storage:
        raise GGUFError(f"cannot dequantize {qtype.name} to {dense_dtype}")
    cols = shape[-1] if shape else 1
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    rows = raw.reshape(n_rows, -1)
    out = np.empty((n_rows, cols), dtype=storage[dense_dtype])

    def slab(a: int, b: int) -> None:
        w = dequantize(rows[a:b], qtype)  # (b - a, cols) float32
        out[a:b] = _bf16_bits(w) if dense_dtype == mx.bfloat16 else w

    try:
        _each_slab(n_rows, cols, slab)
    except NotImplementedError as e:
        raise GGUFError(f"tensor type {qtype.name} has no MLX mapping or dequantizer") from e
    dense = mx.array(out.reshape(shape))
    if dense_dtype == mx.bfloat16:
        dense = dense.view(mx.bfloat16)
    return MlxWeight(shape, qtype, dense=dense, dequantized_from=qtype.name, gguf_nbytes=raw.size)
