"""Write GGUF files, front to back, without seeking: herd's one GGUF writer.

`GGUFStream` writes through any `write(bytes)` callable (a file, a store blob being hashed):
the header (metadata entries, then each tensor's name, shape, type and data offset, all
known before a byte of data), then each tensor's data in header order. Data is aligned to
`general.alignment` (32 when absent). The bytes are those of the `gguf` package's
GGUFWriter, little-endian GGUF v3. Metadata entries are encoded by `kv_entry`, or copied
byte for byte from another file with `reader.raw_kv` (so their types survive).

`write_gguf` writes a whole file from arrays at once, atomically (temp file + rename).
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from herd.gguf.reader import DEFAULT_ALIGNMENT, GGUF_MAGIC, tensor_nbytes

V = GGUFValueType
# name, shape in NumPy order (outermost first), type
TensorSpec = tuple[str, tuple[int, ...], GGMLQuantizationType]

_SCALAR = {
    V.UINT8: "B",
    V.INT8: "b",
    V.UINT16: "H",
    V.INT16: "h",
    V.UINT32: "I",
    V.INT32: "i",
    V.FLOAT32: "f",
    V.UINT64: "Q",
    V.INT64: "q",
    V.FLOAT64: "d",
    V.BOOL: "?",
}
_DTYPES = {
    np.dtype(np.float32): GGMLQuantizationType.F32,
    np.dtype(np.float16): GGMLQuantizationType.F16,
    np.dtype(np.float64): GGMLQuantizationType.F64,
    np.dtype(np.int8): GGMLQuantizationType.I8,
    np.dtype(np.int16): GGMLQuantizationType.I16,
    np.dtype(np.int32): GGMLQuantizationType.I32,
    np.dtype(np.int64): GGMLQuantizationType.I64,
}


def _vtype(value: Any) -> tuple[GGUFValueType, GGUFValueType | None]:
    """GGUF types as llama.cpp expects them: counts uint32, token types int32, floats f32."""
    if isinstance(value, bool):
        return V.BOOL, None
    if isinstance(value, int):
        return (V.UINT32 if value >= 0 else V.INT32), None
    if isinstance(value, float):
        return V.FLOAT32, None
    if isinstance(value, str):
        return V.STRING, None
    if isinstance(value, list | tuple):
        first = value[0] if value else ""
        sub = (
            V.INT32 if isinstance(first, int) and not isinstance(first, bool) else _vtype(first)[0]
        )
        return V.ARRAY, sub
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(value: Any, vtype: GGUFValueType, sub: GGUFValueType | None = None) -> bytes:
    if vtype == V.STRING:
        return _string(value)
    if vtype == V.ARRAY:
        etype = sub if sub is not None else _vtype(value)[1]
        assert etype is not None
        return struct.pack("<IQ", etype, len(value)) + b"".join(_value(v, etype) for v in value)
    return struct.pack("<" + _SCALAR[vtype], value)


def kv_entry(key: str, value: Any, vtype: GGUFValueType | None = None) -> bytes:
    """One metadata entry (key, type, value); the type follows `_vtype` unless given."""
    sub = None
    if vtype is None:
        vtype, sub = _vtype(value)
    return _string(key) + struct.pack("<I", vtype) + _value(value, vtype, sub)


def metadata(arch: str, kv: dict[str, Any]) -> list[bytes]:
    """`general.architecture` first (where llama.cpp's writers put it), then `kv` in order."""
    return [kv_entry("general.architecture", arch)] + [
        kv_entry(key, value) for key, value in kv.items() if key != "general.architecture"
    ]


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align - n


class GGUFStream:
    """A GGUF file written through `write`: the header now, then `tensor()` once per tensor,
    in the order of `tensors`."""

    def __init__(
        self,
        write: Callable[[bytes | memoryview], object],
        kv: Sequence[bytes],
        tensors: Sequence[TensorSpec],
        alignment: int = DEFAULT_ALIGNMENT,
    ) -> None:
        self._write, self._align = write, alignment
        self._sizes = [tensor_nbytes(shape, qtype) for _, shape, qtype in tensors]
        header = [GGUF_MAGIC, struct.pack("<IQQ", 3, len(tensors), len(kv)), *kv]
        offset = 0
        for (name, shape, qtype), size in zip(tensors, self._sizes, strict=True):
            ne = shape[::-1]  # GGUF lists dimensions innermost first
            header.append(
                _string(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, int(qtype), offset)
            )
            offset += size + _pad(size, alignment)
        head = b"".join(header)
        write(head + bytes(_pad(len(head), alignment)))
        self._next = 0

    def tensor(self, data: np.ndarray | bytes) -> None:
        """The next tensor's data: its GGUF bytes, exactly the size its type and shape take."""
        if isinstance(data, np.ndarray):
            data = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        size = self._sizes[self._next]
        assert len(data) == size, (self._next, len(data), size)
        self._write(data)
        if _pad(size, self._align):
            self._write(bytes(_pad(size, self._align)))
        self._next += 1

    def close(self) -> None:
        """Check that every tensor of the header was written."""
        assert self._next == len(self._sizes), (self._next, len(self._sizes))


def _spec(name: str, array: np.ndarray, raw_type: GGMLQuantizationType | None) -> TensorSpec:
    """The gguf package's add_tensor rules: the type from the dtype unless given; a uint8
    array of a given type holds its bytes, (..., bytes per row)."""
    if raw_type is None:
        return name, tuple(array.shape), _DTYPES[array.dtype]
    shape = tuple(array.shape)
    if array.dtype == np.uint8:
        block, size = GGML_QUANT_SIZES[raw_type]
        shape = (*shape[:-1], shape[-1] // size * block)
    return name, shape, raw_type


def write_gguf(
    path: str | Path,
    arch: str,
    kv: dict[str, Any],
    tensors: Iterable[tuple[str, np.ndarray, GGMLQuantizationType | None]],
) -> Path:
    """Write a GGUF; `tensors` yields (name, NumPy-order array, raw type or None).

    Nothing appears at `path` unless the whole file was written.
    """
    path = Path(path)
    items = list(tensors)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            out = GGUFStream(
                f.write,
                metadata(arch, kv),
                [_spec(*t) for t in items],
                int(kv.get("general.alignment", DEFAULT_ALIGNMENT)),
            )
            for _, array, _ in items:
                out.tensor(array)
            out.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a model file is for everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
