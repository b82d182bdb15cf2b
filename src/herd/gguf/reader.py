"""Read GGUF metadata and map tensor data.

The `gguf` package's GGUFReader builds a NumPy view for every array element; on SmolLM2's
49k-token vocabulary that takes ~4 s, on Gemma 3's 262k far longer. Load time matters to
users (time to first token), so this module parses the header with `struct` in one pass
and maps tensor data lazily. Type constants and sizes still come from `gguf`.
"""

from __future__ import annotations

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
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise GGUFError(
                f"{self.path}: truncated GGUF header (needs byte {self.pos + n}, "
                f"file has {len(self.buf)})"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self) -> str:
        n = self.unpack("Q")
        raw = bytes(self.take(n))
        return raw.decode("utf-8", errors="replace")

    def strings(self, n: int) -> list[str]:
        """n length-prefixed strings; one tight loop, since vocabularies hold 10^5 of them
        (slicing the mapping itself, not a memoryview of it: ~25% faster, ~75 ms for Gemma
        3's 262k tokens)."""
        raw, pos, end = self.buf.obj, self.pos, len(self.buf)
        length = _U64.unpack_from
        out: list[str] = [""] * n
        try:
            for i in range(n):
                (size,) = length(raw, pos)
                pos += 8
                if pos + size > end:  # before slicing: a corrupt length must not copy GBs
                    raise struct.error
                out[i] = raw[pos : pos + size].decode("utf-8", "replace")
                pos += size
        except struct.error:
            raise GGUFError(
                f"{self.path}: truncated GGUF header (a string array runs past "
                f"the end of the file at byte {pos})"
            ) from None
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.unpack("I"), self.unpack("Q")
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype]).newbyteorder("<")
                return np.frombuffer(self.take(n * dt.itemsize), dtype=dt).tolist()
            if etype == _STRING:
                return self.strings(n)
            return [self.value(etype) for _ in range(n)]
        raise GGUFError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")


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
    for _ in range(cur.unpack("Q")):
        start = cur.pos
        key = cur.string()
        cur.value(cur.unpack("I"))
        out.append((key, bytes(cur.buf[start : cur.pos])))
    return out


def tensor_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    if shape and shape[-1] % block:
        raise GGUFError(
            f"row length {shape[-1]} is not a multiple of the {qtype.name} block {block}"
        )
    return n // block * type_size


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
    cur = _Cursor(memoryview(mm), path)
    cur.pos = 4
    version = cur.unpack("I")
    if version not in (2, 3):
        raise GGUFError(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        kv[key] = cur.value(cur.unpack("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("I")
        ne = [cur.unpack("Q") for _ in range(n_dims)]
        raw_type = cur.unpack("I")
        rel = cur.unpack("Q")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFError(f"{path}: tensor {name} has unknown type id {raw_type}") from None
        infos.append((name, tuple(reversed(ne)), qtype, rel))
    align = int(kv.get("general.alignment", DEFAULT_ALIGNMENT))
    data_offset = (cur.pos + align - 1) // align * align
    tensors: dict[str, TensorInfo] = {}
    for name, shape, qtype, rel in infos:
        nbytes = tensor_nbytes(shape, qtype)
        offset = data_offset + rel
        if offset + nbytes > size:
            raise GGUFError(
                f"{path}: tensor {name} runs past the end of the file "
                f"(truncated download?): needs byte {offset + nbytes}, file has {size}"
            )
        tensors[name] = TensorInfo(name, shape, qtype, offset, nbytes)
    return GGUFFile(path, version, kv, tensors, data_offset, size, mm)


_MISSING = object()


class Config:
    """Typed access to GGUF metadata; `get("block_count")` reads `<arch>.block_count`.

    Keys starting with `general.` or `tokenizer.` are used as they are.
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

    def int(self, name: str, default: Any = _MISSING) -> int:
        return int(self.get(name, default))

    def float(self, name: str, default: Any = _MISSING) -> float:
        return float(self.get(name, default))

    def bool(self, name: str, default: Any = _MISSING) -> bool:
        return bool(self.get(name, default))

    def str(self, name: str, default: Any = _MISSING) -> str:
        return str(self.get(name, default))

    def ints(self, name: str, n: int, default: Any = _MISSING) -> list[int]:
        """A per-layer value stored either as a scalar or as an array of n."""
        value = self.get(name, default)
        if isinstance(value, list):
            if len(value) != n:
                raise GGUFError(f"{self.key(name)}: expected {n} values, got {len(value)}")
            return [int(v) for v in value]
        return [int(value)] * n
