"""Read GGUF metadata and map tensor data.

The `gguf` package's GGUFReader builds a NumPy view for every array element; on SmolLM2's
49k-token vocabulary that takes ~4 s, on Gemma 3's 262k far longer. Load time matters to
users (time to first token), so this module parses the header with `struct` in one pass
and maps tensor data lazily. Type constants and sizes still come from `gguf`.

Files are untrusted input. Every count, length, offset and type is checked against the
bytes left in the file and the format's limits (llama.cpp's gguf.cpp rules) before
anything is allocated or iterated, so reading is bounded in time and in memory (a few
times the file's size) on any input, and every failure is a GGUFError naming the byte
offset and the field.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from herd.errors import GGUFError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: a tensor name holds at most 63 bytes

# GGUFValueType ids -> struct format of one scalar
_SCALAR = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_INTS = (0, 1, 2, 3, 4, 5, 10, 11)
# the fewest bytes a metadata entry (key length, type, 1-byte value) and a tensor info
# (name length, n_dims, one dim, type, offset) can take: bounds on the counts up front
_MIN_KV, _MIN_TENSOR = 8 + 4 + 1, 8 + 4 + 8 + 4 + 8


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file. `shape` is in NumPy order (outermost first)."""

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str, problem: str, at: int | None = None) -> GGUFError:
        return GGUFError(f"{self.path}: {what} at byte {self.pos if at is None else at}: {problem}")

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n > self.left():
            raise self.fail(
                what,
                f"needs {n} bytes, the file has {self.left()} left "
                f"(truncated or corrupt; file size {len(self.buf)})",
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size, what))[0]

    def string(self, what: str) -> str:
        at = self.pos
        n = self.unpack("Q", f"{what} length")
        if n > self.left():  # before copying: a corrupt length must not allocate GBs
            raise self.fail(what, f"a string of {n} bytes runs past the end of the file", at)
        return bytes(self.take(n, what)).decode("utf-8", errors="replace")

    def strings(self, n: int, what: str) -> list[str]:
        """n length-prefixed strings; one tight loop, since vocabularies hold 10^5 of them
        (slicing the mapping itself, not a memoryview of it: ~25% faster, ~75 ms for Gemma
        3's 262k tokens). The caller has checked that n strings can fit."""
        raw, pos, end = self.buf.obj, self.pos, len(self.buf)
        length = _U64.unpack_from
        out: list[str] = [""] * n
        i = 0
        try:
            for i in range(n):
                (size,) = length(raw, pos)
                pos += 8
                if size > end - pos:  # before slicing: a corrupt length must not copy GBs
                    raise struct.error
                out[i] = raw[pos : pos + size].decode("utf-8", "replace")
                pos += size
        except struct.error:
            raise self.fail(
                f"{what} item {i}", "a string runs past the end of the file", pos
            ) from None
        self.pos = pos
        return out

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise self.fail(what, f"unknown GGUF value type {vtype}", self.pos - 4)
        at = self.pos
        etype, n = self.unpack("I", f"{what} array type"), self.unpack("Q", f"{what} array count")
        if etype in _NUMPY:
            dt = np.dtype(_NUMPY[etype]).newbyteorder("<")
            if n > self.left() // dt.itemsize:
                raise self.fail(what, f"an array of {n} values runs past the end of the file", at)
            return np.frombuffer(self.take(n * dt.itemsize, what), dtype=dt).tolist()
        if etype == _STRING:
            if n > self.left() // 8:
                raise self.fail(what, f"an array of {n} strings runs past the end of the file", at)
            return self.strings(n, what)
        # arrays of arrays: llama.cpp refuses them too
        raise self.fail(what, f"arrays of GGUF value type {etype} are not supported", at)


@dataclass
class GGUFFile:
    """A parsed GGUF file: metadata `kv`, `tensors` by name, and a lazy map of the data."""

    path: Path
    version: int
    kv: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_offset: int
    file_size: int
    _map: mmap.mmap | None = field(default=None, repr=False)

    @property
    def architecture(self) -> str:
        arch = self.kv.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise GGUFError(f"{self.path}: no general.architecture in the metadata")
        return arch

    def config(self) -> Config:
        return Config(self.kv, self.architecture)

    def buffer(self) -> memoryview:
        """The whole file, memory-mapped read-only (opened on first use)."""
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(self._map)

    def release(self, offset: int, nbytes: int) -> None:
        """Drop this process's pages of a byte range of the mapping (they stay in the page
        cache and come back on the next read): for weights copied elsewhere, so they do
        not count twice in resident memory."""
        page = mmap.PAGESIZE
        start, end = -(-offset // page) * page, (offset + nbytes) // page * page
        if self._map is not None and end > start and hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 array over the mapping (no copy)."""
        info = self.tensors[name]
        return np.frombuffer(self.buffer(), dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())


def raw_kv(g: GGUFFile) -> list[tuple[str, bytes]]:
    """Each metadata entry's exact bytes (key, type and value) in file order, for writing
    into another file with the types kept (`writer.GGUFStream`)."""
    cur = _Cursor(g.buffer(), g.path)
    cur.pos = 16  # magic, version, tensor count
    out = []
    for i in range(cur.unpack("Q", "metadata count")):
        start = cur.pos
        key = cur.string(f"metadata key {i}")
        cur.value(cur.unpack("I", f"{key} type"), key)
        out.append((key, bytes(cur.buf[start : cur.pos])))
    return out


def tensor_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    n = math.prod(shape)
    if shape and shape[-1] % block:
        raise GGUFError(
            f"row length {shape[-1]} is not a multiple of the {qtype.name} block {block}"
        )
    return n // block * type_size


def _alignment(kv: dict[str, Any], path: Path) -> int:
    """`general.alignment`: a positive power of two (llama.cpp's rule), 32 when absent."""
    align = kv.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(align) is not int or align <= 0 or align & (align - 1):
        raise GGUFError(
            f"{path}: general.alignment = {str(align)[:40]!r}: not a positive power of two"
        )
    return align


def _tensor_info(cur: _Cursor, i: int) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
    """The i-th tensor info: name, shape (NumPy order), type and offset in the data."""
    at = cur.pos
    name = cur.string(f"tensor {i} name")
    if len(name.encode("utf-8", "replace")) >= MAX_NAME:
        raise cur.fail(f"tensor {i} name", f"longer than {MAX_NAME - 1} bytes", at)
    what = f"tensor {name!r}"
    n_dims = cur.unpack("I", f"{what} n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"{what} n_dims", f"{n_dims} dims (1 to {MAX_DIMS})", cur.pos - 4)
    ne = [cur.unpack("Q", f"{what} dim {d}") for d in range(n_dims)]
    if min(ne) < 1 or math.prod(ne) >= 1 << 62:
        raise cur.fail(f"{what} dims", f"dims {ne} not positive or too large", cur.pos - 8 * n_dims)
    raw_type = cur.unpack("I", f"{what} type")
    try:
        qtype = GGMLQuantizationType(raw_type)
        block, _ = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise cur.fail(f"{what} type", f"unknown tensor type id {raw_type}", cur.pos - 4) from None
    if ne[0] % block:
        raise cur.fail(
            f"{what} dims", f"row length {ne[0]} is not a multiple of the {qtype.name} block "
            f"{block}", cur.pos - 4 - 8 * n_dims,
        )  # fmt: skip
    return name, tuple(reversed(ne)), qtype, cur.unpack("Q", f"{what} offset")


def _place(
    infos: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]],
    data_offset: int,
    align: int,
    size: int,
    path: Path,
) -> dict[str, TensorInfo]:
    """The tensors, checked as llama.cpp checks them: names unique, data offsets aligned,
    every tensor inside the file and none overlapping another."""
    tensors: dict[str, TensorInfo] = {}
    for name, shape, qtype, rel in infos:
        where = f"{path}: tensor {name!r}"
        if name in tensors:
            raise GGUFError(f"{where}: duplicate tensor name")
        if rel % align:
            raise GGUFError(
                f"{where}: data offset {rel} is not a multiple of the alignment {align}"
            )
        nbytes = tensor_nbytes(shape, qtype)
        offset = data_offset + rel
        if offset + nbytes > size:
            raise GGUFError(
                f"{where} runs past the end of the file (truncated download?): "
                f"needs byte {offset + nbytes}, file has {size}"
            )
        tensors[name] = TensorInfo(name, shape, qtype, offset, nbytes)
    by_offset = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(by_offset, by_offset[1:], strict=False):
        if a.offset + a.nbytes > b.offset:
            raise GGUFError(
                f"{path}: tensors {a.name!r} (bytes {a.offset}-{a.offset + a.nbytes}) and "
                f"{b.name!r} (from byte {b.offset}) overlap"
            )
    return tensors


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header; raises GGUFError with the reason on any inconsistency."""
    path = Path(path)
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if path.is_dir():
        raise GGUFError(f"{path}: is a directory, not a GGUF file")
    size = path.stat().st_size
    if size < 24:
        raise GGUFError(f"{path}: not a GGUF file (only {size} bytes)")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (bad magic)")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return _parse(mm, path, size)  # on an error the mapping goes with the cursor


def _parse(mm: mmap.mmap, path: Path, size: int) -> GGUFFile:
    cur = _Cursor(memoryview(mm), path)
    cur.pos = 4
    version = cur.unpack("I", "version")
    if version not in (2, 3):
        raise cur.fail("version", f"unsupported GGUF version {version}", 4)
    n_tensors, n_kv = cur.unpack("Q", "tensor count"), cur.unpack("Q", "metadata count")
    if n_kv > cur.left() // _MIN_KV:
        raise cur.fail("metadata count", f"{n_kv} entries cannot fit in the file", 16)
    if n_tensors > cur.left() // _MIN_TENSOR:
        raise cur.fail("tensor count", f"{n_tensors} tensors cannot fit in the file", 8)
    kv: dict[str, Any] = {}
    for i in range(n_kv):
        at = cur.pos
        key = cur.string(f"metadata key {i}")
        if key in kv:
            raise cur.fail(f"metadata key {key!r}", "duplicate key", at)
        kv[key] = cur.value(cur.unpack("I", f"{key!r} type"), repr(key))
    infos = [_tensor_info(cur, i) for i in range(n_tensors)]
    align = _alignment(kv, path)
    data_offset = (cur.pos + align - 1) // align * align
    tensors = _place(infos, data_offset, align, size, path)
    return GGUFFile(path, version, kv, tensors, data_offset, size, mm)


_MISSING = object()
# sizes that no model can have 0 (or fewer) of, wherever they are read as one number
_COUNTS = ("block_count", "embedding_length", "context_length", "attention.head_count",
    "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "patch_size", "image_size")  # fmt: skip


def wrong_type(key: str, value: Any, expected: str) -> GGUFError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:60] + "..."
    return GGUFError(f"metadata key {key}: expected {expected}, got {shown}")


def as_int(key: str, value: Any) -> int:
    """A metadata value read as an integer: ints (bools included, llama.cpp reads flags as
    numbers) and finite floats; GGUFError naming the key for anything else."""
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    raise wrong_type(key, value, "an integer")


class Config:
    """Typed access to GGUF metadata; `get("block_count")` reads `<arch>.block_count`.

    Keys starting with `general.` or `tokenizer.` are used as they are. The typed getters
    refuse a value of the wrong type (a string where a number belongs, NaN as a count)
    with a GGUFError naming the key: metadata comes from an untrusted file.
    """

    def __init__(self, kv: dict[str, Any], arch: str) -> None:
        self.kv, self.arch = kv, arch

    def key(self, name: str) -> str:
        if name.startswith(("general.", "tokenizer.", "adapter.")):
            return name
        return f"{self.arch}.{name}"

    def has(self, name: str) -> bool:
        return self.key(name) in self.kv

    def get(self, name: str, default: Any = _MISSING) -> Any:
        key = self.key(name)
        if key in self.kv:
            return self.kv[key]
        if default is _MISSING:
            raise GGUFError(f"missing metadata key {key}")
        return default

    def _bad(self, name: str, value: Any, expected: str) -> GGUFError:
        return wrong_type(self.key(name), value, expected)

    def _int(self, name: str, value: Any) -> int:
        return as_int(self.key(name), value)

    def int(self, name: str, default: Any = _MISSING) -> int:
        value = self._int(name, self.get(name, default))
        if value < 1 and name.endswith(_COUNTS) and self.has(name):  # models divide by them
            raise GGUFError(f"metadata key {self.key(name)}: {value}, expected a positive count")
        return value

    def float(self, name: str, default: Any = _MISSING) -> float:
        value = self.get(name, default)
        if isinstance(value, int | float):
            return float(value)
        raise self._bad(name, value, "a number")

    def bool(self, name: str, default: Any = _MISSING) -> bool:
        value = self.get(name, default)
        if isinstance(value, int | float):
            return bool(value)
        raise self._bad(name, value, "a boolean")

    def str(self, name: str, default: Any = _MISSING) -> str:
        value = self.get(name, default)
        if isinstance(value, str):
            return value
        raise self._bad(name, value, "a string")

    def ints(self, name: str, n: int, default: Any = _MISSING) -> list[int]:
        """A per-layer value stored either as a scalar or as an array of n."""
        value = self.get(name, default)
        if isinstance(value, list):
            if len(value) != n:
                raise GGUFError(f"{self.key(name)}: expected {n} values, got {len(value)}")
            return [self._int(name, v) for v in value]
        return [self._int(name, value)] * n
