"""Tensor sources of a Hugging Face directory: safetensors and PyTorch zip checkpoints.

Nothing is loaded up front. Each tensor is a `TensorRef` (`herd/models/conversion.py`: file,
name, shape, dtype) whose `load()` maps just its bytes and returns float32, so a converter
holds one tensor at a time.

- `*.safetensors`: an 8-byte header length, a JSON header, raw little-endian data. Read with
  `mmap` (no `safetensors` package needed); every offset is checked against the file size,
  so a truncated download fails naming the file and the first tensor it cuts.
- `pytorch_model*.bin`: a zip written by `torch.save`. Its pickle is read by an unpickler
  that only knows the handful of globals a state dict needs (OrderedDict, the typed
  storages, `_rebuild_tensor_v2`); anything else is refused, so no code from the file runs.
  Storages are stored uncompressed in the zip and are mapped like safetensors data.
"""

from __future__ import annotations

import json
import mmap
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from herd.errors import ConvertError
from herd.models.conversion import TensorRef

# safetensors dtype -> NumPy storage dtype; BF16 is stored as uint16 and widened on load.
_ST_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


# --- safetensors -----------------------------------------------------------------------


def read_safetensors(path: Path) -> list[TensorRef]:
    size = path.stat().st_size
    if size < 8:
        raise ConvertError(f"{path.name}: not a safetensors file (only {size} bytes)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise ConvertError(
                f"{path.name}: truncated safetensors file (header of {n} bytes, file {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConvertError(f"{path.name}: unreadable safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path.name}: unreadable safetensors header")
    base = 8 + n
    mm: list[mmap.mmap] = []  # opened on the first load, shared by all tensors of the file

    def buffer() -> mmap.mmap:
        if not mm:
            mm.append(_map(path))
        return mm[0]

    refs = []
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    for name, info in sorted(entries, key=lambda kv: kv[1].get("data_offsets", [0])[0]):
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path.name}: tensor {name} has a malformed header entry") from None
        if base + end > size:
            raise ConvertError(
                f"{path.name}: truncated file: tensor {name} needs bytes up to {base + end}, "
                f"the file has {size}"
            )
        np_dtype = _ST_DTYPES.get(dtype)
        if np_dtype is not None and end - begin != int(np.prod(shape)) * np_dtype.itemsize:
            raise ConvertError(
                f"{path.name}: tensor {name}: {end - begin} bytes for shape {shape} {dtype}"
            )

        def load(
            dt: np.dtype[Any] | None = np_dtype,
            b: int = base + begin,
            count: int = int(np.prod(shape)),
        ) -> np.ndarray:
            assert dt is not None
            return np.frombuffer(buffer(), dtype=dt, count=count, offset=b)

        refs.append(TensorRef(path, name, shape, dtype, load))
    return refs


# --- PyTorch zip checkpoints ------------------------------------------------------------

_TORCH_STORAGES = {
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "DoubleStorage": "F64",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _Storage:
    dtype: str
    key: str


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage: _Storage, offset: int, size: Any, stride: Any, *_: Any) -> _Tensor:
    return _Tensor(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data: _Tensor, *_: Any) -> _Tensor:
    return data


class _SafeUnpickler(pickle.Unpickler):
    """Only the globals of a plain state dict; everything else is refused."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _TORCH_STORAGES:
            return _StorageType(_TORCH_STORAGES[name])
        raise ConvertError(
            f"{self.path.name}: refusing to unpickle {module}.{name} "
            "(only plain state dicts of tensors are read; convert it to safetensors)"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise ConvertError(f"{self.path.name}: unsupported persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise ConvertError(f"{self.path.name}: unsupported storage type {storage_type!r}")
        return _Storage(storage_type.dtype, key)


def read_torch_zip(path: Path) -> list[TensorRef]:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ConvertError(
            f"{path.name}: not a zip-format PyTorch checkpoint (the legacy format is not "
            "supported; re-save it with torch>=1.6 or as safetensors)"
        ) from None
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise ConvertError(f"{path.name}: no data.pkl in the checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        try:
            with zf.open(pkl[0]) as f:
                state = _SafeUnpickler(f, path).load()
        except ConvertError:
            raise
        except Exception as e:  # a damaged pickle: any error the pickle machinery raises
            raise ConvertError(f"{path.name}: unreadable checkpoint: {e}") from None
        infos = {i.filename: i for i in zf.infolist()}
    if not isinstance(state, dict):
        raise ConvertError(f"{path.name}: the checkpoint is not a state dict")
    size = path.stat().st_size
    mm: list[mmap.mmap] = []

    def buffer() -> mmap.mmap:
        if not mm:
            mm.append(_map(path))
        return mm[0]

    refs = []
    for name, t in state.items():
        if not isinstance(t, _Tensor):
            continue  # e.g. a stray int in the dict; not a weight
        member = f"{prefix}data/{t.storage.key}"
        info = infos.get(member)
        if info is None:
            raise ConvertError(f"{path.name}: tensor {name}: storage {member} is missing")
        np_dtype = _ST_DTYPES[t.storage.dtype]
        n = int(np.prod(t.shape))
        span = t.offset + (
            sum((s - 1) * st for s, st in zip(t.shape, t.stride, strict=True)) + 1 if n else 0
        )
        if span * np_dtype.itemsize > info.file_size:
            raise ConvertError(f"{path.name}: tensor {name} runs past its storage")
        refs.append(
            TensorRef(
                path,
                str(name),
                t.shape,
                t.storage.dtype,
                _torch_loader(path, info, t, np_dtype, size, buffer),
            )
        )
    return refs


def _torch_loader(
    path: Path,
    info: zipfile.ZipInfo,
    t: _Tensor,
    dt: np.dtype[Any],
    size: int,
    buffer: Callable[[], mmap.mmap],
) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        count = info.file_size // dt.itemsize
        if info.compress_type == zipfile.ZIP_STORED:
            # local header: 30 fixed bytes, then the name and extra field
            head = bytes(buffer()[info.header_offset : info.header_offset + 30])
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            if start + info.file_size > size:
                raise ConvertError(f"{path.name}: truncated file (storage of {t.storage.key})")
            flat = np.frombuffer(buffer(), dtype=dt, count=count, offset=start)
        else:
            with zipfile.ZipFile(path) as zf:
                flat = np.frombuffer(zf.read(info), dtype=dt, count=count)
        view = np.lib.stride_tricks.as_strided(
            flat[t.offset :], shape=t.shape, strides=[s * dt.itemsize for s in t.stride]
        )
        return np.ascontiguousarray(view)

    return load


# --- a directory ------------------------------------------------------------------------


def weight_files(src: Path) -> list[Path]:
    """The checkpoint files of a directory, in order, as llama.cpp's converter picks them."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise ConvertError(f"{index_name}: no readable weight_map") from None
            missing = [f for f in files if not (src / f).is_file()]
            if missing:
                raise ConvertError(
                    f"{index_name} names files that are missing: " + ", ".join(missing)
                )
            return [src / f for f in files]
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        files = sorted(p for p in src.glob(pattern) if p.is_file())
        if files:
            return files
    raise ConvertError(f"{src}: no model weights (model*.safetensors or pytorch_model*.bin)")


def read_tensors(src: Path) -> dict[str, TensorRef]:
    """Every tensor of the directory's checkpoint by HF name, checked against an index."""
    refs: dict[str, TensorRef] = {}
    for path in weight_files(src):
        found = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_zip(path)
        for ref in found:
            if ref.name in refs:
                raise ConvertError(
                    f"{path.name}: tensor {ref.name} is also in {refs[ref.name].file.name}"
                )
            refs[ref.name] = ref
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            for name, file in weight_map.items():
                if name not in refs:
                    raise ConvertError(f"{file}: tensor {name} (listed in {index_name}) is missing")
            break
    return refs
