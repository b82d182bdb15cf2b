"""Write GGUF files through the `gguf` package, atomically (temp file + rename)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter


def _vtype(value: Any) -> tuple[GGUFValueType, GGUFValueType | None]:
    """GGUF types as llama.cpp expects them: counts uint32, token types int32, floats f32."""
    if isinstance(value, bool):
        return GGUFValueType.BOOL, None
    if isinstance(value, int):
        return (GGUFValueType.UINT32 if value >= 0 else GGUFValueType.INT32), None
    if isinstance(value, float):
        return GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return GGUFValueType.STRING, None
    if isinstance(value, list | tuple):
        first = value[0] if value else ""
        sub = (GGUFValueType.INT32 if isinstance(first, int) and not isinstance(first, bool)
               else _vtype(first)[0])
        return GGUFValueType.ARRAY, sub
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")


def write_gguf(path: str | Path, arch: str, kv: dict[str, Any],
               tensors: Iterable[tuple[str, np.ndarray, GGMLQuantizationType | None]]) -> Path:
    """Write a GGUF; `tensors` yields (name, NumPy-order array, raw type or None).

    Nothing appears at `path` unless the whole file was written.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        writer = GGUFWriter(tmp, arch)
        for key, value in kv.items():
            if key == "general.architecture":
                continue
            vtype, sub = _vtype(value)
            writer.add_key_value(key, list(value) if vtype == GGUFValueType.ARRAY else value,
                                 vtype, sub)
        for name, array, raw_type in tensors:
            if raw_type is None:
                writer.add_tensor(name, array)
            else:
                writer.add_tensor(name, array, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a model file is for everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
