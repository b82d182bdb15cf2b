"""Backends by name. Each is imported only when asked for, so a missing optional
dependency (ggml-python) never breaks the others.

`auto` picks the fastest backend that imports: MLX on Apple silicon (Metal), else ggml,
else numpy. Elsewhere MLX runs only when named (`HERD_BACKEND=mlx`): its CPU and CUDA
builds work, but ggml is the faster CPU engine.
"""

from __future__ import annotations

import importlib
import logging
import platform
import sys
from collections.abc import Callable

from herd.errors import BackendError
from herd.gguf import GGUFFile
from herd.ml.base import Backend, BackendOptions, DeviceInfo

log = logging.getLogger(__name__)

# name -> (module, factory attribute); preference order for "auto"
_BACKENDS: dict[str, tuple[str, str]] = {
    "mlx": ("herd.ml.backends.mlx", "open_mlx"),
    "ggml": ("herd.ml.backends.ggml", "open_ggml"),
    "onnx": ("herd.ml.backends.onnx", "open_onnx"),
    "numpy": ("herd.ml.backends.numpy.backend", "open_numpy"),
}


# what each backend module provides: open_<name>(gguf, options) -> its Backend
Factory = Callable[[GGUFFile, BackendOptions], Backend]


def _factory(name: str) -> Factory | None:
    module, attr = _BACKENDS[name]
    try:
        factory: Factory = getattr(importlib.import_module(module), attr)
        return factory
    except ImportError as e:
        log.debug("backend %s unavailable: %s", name, e)
        return None


def _auto_candidates() -> list[str]:
    apple_silicon = sys.platform == "darwin" and platform.machine() == "arm64"
    # onnx runs only when named: ggml is the faster CPU engine
    return [n for n in _BACKENDS if (n != "mlx" or apple_silicon) and n != "onnx"]


def available_backends() -> list[str]:
    return [name for name in _BACKENDS if _factory(name) is not None]


def resolve_backend_name(name: str | None) -> str:
    """Map a requested name (None/"auto" included) to an importable backend name."""
    requested = (name or "auto").lower()
    if requested == "auto":
        for candidate in _auto_candidates():
            if _factory(candidate) is not None:
                return candidate
        raise BackendError("no compute backend could be imported")
    if requested not in _BACKENDS:
        raise BackendError(
            f"unknown backend {name!r}; choose one of: auto, " + ", ".join(_BACKENDS)
        )
    if _factory(requested) is None:
        raise BackendError(f"backend {requested!r} is not installed")
    return requested


def default_devices(name: str, options: BackendOptions | None = None) -> list[DeviceInfo]:
    """The devices backend `name` computes on by default on this machine, without opening
    a model (`herd show`): each backend module's `default_devices(options)`."""
    module = importlib.import_module(_BACKENDS[resolve_backend_name(name)][0])
    devices: list[DeviceInfo] = module.default_devices(options)
    return devices


def open_backend(
    name: str | None, gguf: GGUFFile, options: BackendOptions | None = None
) -> Backend:
    resolved = resolve_backend_name(name)
    factory = _factory(resolved)
    assert factory is not None
    backend = factory(gguf, options or BackendOptions())
    log.info("backend: %s", resolved)
    return backend


def serve_rpc(host: str, port: int, num_thread: int, cache_dir: str | None = None) -> None:
    """Serve this machine's CPU to other herds' (and llama.cpp's) ggml RPC clients until
    the process ends (`herd rpc-server`); BackendError without ggml or its RPC backend."""
    try:
        rpc = importlib.import_module("herd.ml.backends.ggml.rpc")
    except ImportError as e:
        raise BackendError(f"herd rpc-server needs the ggml backend: {e}") from None
    rpc.serve(host, port, num_thread, cache_dir)
