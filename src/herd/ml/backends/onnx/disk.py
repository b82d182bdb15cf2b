"""The ONNX backend's on-disk cache of optimized sessions: a second load skips ORT's
graph optimization (SmolLM2: ~1.4 s a session, ~0.3 s to load one already optimized).

ORT writes the optimized model (`SessionOptions.optimized_model_filepath`, ORT_ENABLE_ALL)
while it builds a session; the cache keeps it without the weights: the quantized
initializers the backend hands every session (`add_initializer`) are declared
by name again, as graph.py declares them, and only what the optimizer made from them
(a folded constant) is kept inline. A later load reads it with optimizations off.

Key: the GGUF's sha256 (a store blob's name; else hashed once and memoized by path, size
and mtime), herd's and ORT's versions, the providers, the CPU's features (an optimized
graph may use them) and the graph's own key. Location: `BackendOptions.onnx_cache_dir`
(envconfig: HERD_CACHE/onnx), else ~/.cache/herd/onnx; `onnx_cache=False`
(HERD_ONNX_CACHE=0) turns it off. Each entry is written atomically
(temp file, rename) with a sha256 side record; an entry that fails it, cannot be read or
does not load is rebuilt (a log line), never run. A cache directory that cannot be
written is no cache (a log line): sessions are built as without one.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import platform
import shutil
import tempfile
import time
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from herd import __version__
from herd.ml.backends.onnx.graph import EXTERNAL_LOCATION
from herd.ml.base import BackendOptions

log = logging.getLogger(__name__)

MAX_ENTRIES = 256  # entries kept (least recently used dropped): ~0.5 MB each for SmolLM2
_BLOB_PREFIX = "sha256-"  # a store blob's file name: its content's digest
_DATA = "weights.data"  # where ORT writes the optimized model's initializers


def cache_root(options: BackendOptions) -> Path | None:
    """options.onnx_cache_dir (default ~/.cache/herd/onnx); None when onnx_cache is off."""
    if not options.onnx_cache:
        return None
    root = options.onnx_cache_dir or Path.home() / ".cache" / "herd" / "onnx"
    return Path(root).expanduser()


def for_model(path: Path, providers: list[str], root: Path | None) -> DiskCache | None:
    """The disk cache in `root` for a model file on these providers (one per process), or
    None (no root: the cache is off)."""
    if root is None:
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return _cache_for(root, str(Path(path).resolve()), st.st_size, st.st_mtime_ns, tuple(providers))


@cache
def _cache_for(
    root: Path, path: str, size: int, mtime: int, providers: tuple[str, ...]
) -> DiskCache:
    return DiskCache(root, model_digest(Path(path), root), list(providers))


def model_digest(path: Path, root: Path) -> str:
    """The GGUF's sha256: a store blob's name, else hashed once and memoized in root."""
    name = path.name
    if name.startswith(_BLOB_PREFIX) and len(name) == len(_BLOB_PREFIX) + 64:
        return name[len(_BLOB_PREFIX) :]
    st = path.stat()
    memo_key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    memo = root / "digests" / hashlib.sha256(memo_key.encode()).hexdigest()
    try:
        value = memo.read_text().strip()
        if len(value) == 64:
            return value
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        _write_atomic(memo, digest.encode())
    except OSError:
        pass  # unwritable: hashed again next time
    return digest


@cache
def _cpu_features() -> str:
    """What an optimized CPU graph may depend on: the machine and its instruction sets."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}|{platform.processor()}|{flags.strip()}"


class DiskCache:
    """Optimized sessions of one model file on one set of providers.

    `built`: sessions this process optimized from scratch; `loaded`: sessions read back."""

    def __init__(self, root: Path, digest: str, providers: list[str]) -> None:
        self.root, self.digest, self.providers = root, digest, providers
        self.built = self.loaded = 0
        self.writable = True  # until a write fails

    def entry(self, key: str) -> Path:
        parts = [self.digest, __version__, ort.__version__, ",".join(self.providers),
                 _cpu_features(), key]  # fmt: skip
        return self.root / (hashlib.sha256("\n".join(parts).encode()).hexdigest() + ".onnx")

    def session(
        self, key: str, model: bytes, so: ort.SessionOptions, externals: dict[str, np.ndarray]
    ) -> ort.InferenceSession:
        """A session for `model` (graph key `key`): read back optimized, or built and saved.
        `so` carries everything but the optimization level and where to save."""
        path = self.entry(key)
        sess = self._load(path, so)
        if sess is not None:
            return sess
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        work = self._workdir(sum(a.nbytes for a in externals.values()))
        if work is None:
            self.built += 1
            return ort.InferenceSession(model, so, providers=self.providers)
        try:
            so.optimized_model_filepath = str(work / "model.onnx")
            so.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", _DATA
            )
            so.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
            )
            t0 = time.perf_counter()
            sess = ort.InferenceSession(model, so, providers=self.providers)
            self.built += 1
            try:
                t1 = time.perf_counter()
                blob = _without_weights(work / "model.onnx", work / _DATA, externals)
                _write_atomic(path, blob)
                _write_atomic(_side(path), hashlib.sha256(blob).hexdigest().encode())
                self._prune()
                log.info("onnx: graph optimized and saved in %.2f s (%.2f s of it saving): %s",
                         time.perf_counter() - t0, time.perf_counter() - t1, path.name)  # fmt: skip
            except Exception as e:  # saving is best effort: the session is built either way
                log.info("onnx: optimized graph not cached (%s: %s)", type(e).__name__, e)
            return sess
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _load(self, path: Path, so: ort.SessionOptions) -> ort.InferenceSession | None:
        try:
            blob = path.read_bytes()
            want = _side(path).read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("onnx: cached graph %s cannot be read (%s): rebuilding it", path, e)
            return None
        if hashlib.sha256(blob).hexdigest() != want:
            log.warning("onnx: cached graph %s fails its sha256 check: rebuilding it", path)
            return None
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        t0 = time.perf_counter()
        try:
            sess = ort.InferenceSession(blob, so, providers=self.providers)
        except Exception as e:  # ORT's own types: whatever it could not load is rebuilt
            log.warning("onnx: cached graph %s does not load (%s): rebuilding it", path, e)
            return None
        self.loaded += 1
        log.info("onnx: optimized graph loaded from the disk cache in %.2f s: %s",
                 time.perf_counter() - t0, path.name)  # fmt: skip
        try:
            os.utime(path)  # recently used: kept by _prune
        except OSError:
            pass
        return sess

    def _workdir(self, nbytes: int) -> Path | None:
        """Where ORT writes the optimized model and its `nbytes` of weights before they
        are dropped: memory (/dev/shm) when it has room for twice that, else the cache.
        None when the cache cannot be written (found out once, by making a folder there)."""
        if not self.writable:
            return None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tempfile.mkdtemp(prefix=".probe-", dir=self.root))
        except OSError as e:
            self.writable = False
            log.info("onnx: no disk cache of optimized graphs: %s cannot be written (%s)",
                     self.root, e)  # fmt: skip
            return None
        shm = Path("/dev/shm")
        try:
            if shm.is_dir() and shutil.disk_usage(shm).free > 2 * nbytes:
                return Path(tempfile.mkdtemp(prefix="herd-onnx-", dir=shm))
        except OSError:
            pass  # no room or no access there: the cache's own folder
        return Path(tempfile.mkdtemp(prefix=".build-", dir=self.root))

    def _prune(self) -> None:
        entries = sorted(self.root.glob("*.onnx"), key=lambda p: p.stat().st_mtime_ns)
        for old in entries[: max(0, len(entries) - MAX_ENTRIES)]:
            old.unlink(missing_ok=True)
            _side(old).unlink(missing_ok=True)


def _side(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _without_weights(model: Path, data: Path, externals: dict[str, np.ndarray]) -> bytes:
    """The optimized model ORT saved, its initializers that are the backend's external
    ones (same name, bytes and shape) declared again instead of held; any other (made by
    the optimizer) inline."""
    m = onnx.load(str(model), load_external_data=False)
    with open(data, "rb") if data.exists() else open(os.devnull, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        try:
            for t in m.graph.initializer:
                if t.data_location != TensorProto.EXTERNAL:
                    continue
                info = {e.key: e.value for e in t.external_data}
                offset, length = int(info.get("offset", 0)), int(info["length"])
                if mm is None or offset + length > size:
                    raise ValueError(f"initializer {t.name} past the end of {data.name}")
                raw = np.frombuffer(mm, np.uint8, length, offset)  # no copy
                mine = externals.get(t.name)
                if mine is not None and _same(t, raw, mine):
                    declare(t, mine.nbytes)
                else:
                    del t.external_data[:]
                    t.data_location = TensorProto.DEFAULT
                    t.raw_data = raw.tobytes()
                del raw  # the mapping closes below
        finally:
            if mm is not None:
                mm.close()
    return m.SerializeToString()


def _same(t: TensorProto, raw: np.ndarray, mine: np.ndarray) -> bool:
    """Whether a saved initializer is the backend's array: shape and bytes."""
    if list(t.dims) != list(mine.shape) or raw.size != mine.nbytes:
        return False
    return bool(np.array_equal(raw, np.ascontiguousarray(mine).reshape(-1).view(np.uint8)))


def declare(t: TensorProto, nbytes: int) -> None:
    """An initializer the session is given (backend.py): named, not held."""
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", EXTERNAL_LOCATION), ("offset", "0"), ("length", str(nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v


__all__ = ["DiskCache", "cache_root", "for_model", "model_digest"]
