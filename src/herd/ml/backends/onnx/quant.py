"""GGUF tensors as ONNX Runtime's block-quantized contrib ops: `com.microsoft::MatMulNBits`
for weights, `GatherBlockQuantized` for embedding tables, where the GGUF blocks map on
exactly; `dequantize` (gguf's float32) for the rest.

MatMulNBits (onnxruntime 1.32): Y = A @ W^T with W (N, K) dequantized per block of
`block_size` along K as (q - zero_point) * scale; B (N, k_blocks, block * bits / 8) uint8 with
consecutive values packed low bits first (4 bits: value 2i low nibble, 2i+1 high nibble of
byte i); scales (N, k_blocks) float32; zero points packed the same way, default 2^(bits-1).
Checked on the CPU provider by tests/unit/test_onnx_quant.py.

The GGUF types kept so, and how their blocks unpack: blocks.py (Q4_1, Q5_1, Q2_K, Q4_K and
Q5_K have a per-block minimum, an offset here).

An offset is a second term: sum over a block of x times offset = (x's block sums) @ offsets^T,
a small MatMul beside the MatMulNBits (K/block inner size), then an Add. At accuracy level 0
the block sums are x's own (a ReduceSum). At level 4 MatMulNBits rounds x to int8 per block
(scale max|x|/127, round to nearest), and the offset term must see the same x, as llama.cpp's
q8_1 activations carry the sum of their rounded values: taken from x exactly it left the
errors of the two terms uncorrelated (SmolLM2's golden mean |Δ log p| 0.111 against 0.039).
So the weight gets K/block more rows, row n+b one on block b and zero elsewhere (scale 1): its
outputs are the block sums of x as MatMulNBits rounded it, exactly, from the same kernel,
split off after it. Why not MatMulNBits' float zero points (zp = -m/d): (q - zp) * d rounds
twice, so 7.6% of Q4_1's weights come out 1 ulp off gguf's d*q + m (measured), and
onnxruntime 1.32 runs float zero points on a slow path (a decode step's product, calls
interleaved: 2.9 ms against 66 us for 3072x576 with the offset term, 755 against 34 us for
576x1536).

Exact: with float32 scales, d*(q-8), d*x and (d*sc)*q are exact (at most 11+6+8 bits of
significand), so MatMulNBits' weight equals gguf's; an offset's d*q + m is rounded once by
the Add, as gguf rounds it once. With accuracy_level 0 and A = I_K the output is gguf's
dequantization bit for bit. accuracy_level 4 (the default here) quantizes A to int8 in
blocks of `block_size`, as llama.cpp quantizes activations to q8 for these types (to q8_K,
blocks of 256, for the K-quants; ORT's blocks of 16 or 32 round finer): faster on the CPU,
with the error of that rounding of A (the test bounds it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnx
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from onnx import helper

from herd.errors import GGUFError
from herd.ml.backends.onnx.blocks import FORMS, GATHER_TYPES, MAPPED_TYPES, check, unpack

MS = "com.microsoft"
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


def matmul_nbits(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> NBits | None:
    """The 2-D weight of NumPy `shape` (n, k) whose GGUF bytes are `raw`, in MatMulNBits'
    form; None where there is no exact mapping (other types, 1-D or 3-D tensors): then
    `dequantize`. GGUFError for bytes that do not fit the shape (a row must be whole blocks)."""
    raw = check(raw, qtype, shape)
    if qtype not in MAPPED_TYPES or len(shape) != 2:
        return None
    bits, block, _ = FORMS[qtype]
    n, k = shape
    kb = k // block
    b, scales, offsets = unpack(raw, qtype)
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
        check(raw, qtype, shape)
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
    raw = check(raw, qtype, shape)
    if qtype == Q.F32:
        return raw.view(np.float32).reshape(shape).copy()
    rows = raw.reshape(int(np.prod(shape[:-1], dtype=np.int64)), -1) if shape else raw
    try:
        out = gguf_dequantize(rows, qtype)
    except NotImplementedError as e:
        raise GGUFError(f"tensor type {qtype.name} has no dequantizer") from e
    return np.asarray(out, dtype=np.float32).reshape(shape)
