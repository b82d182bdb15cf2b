"""Backend contracts and the registry of compute backends."""

from herd.ml.base import (
    Backend,
    BackendOptions,
    Context,
    DeviceInfo,
    DType,
    RopeOptions,
    Tensor,
    context_of,
)
from herd.ml.registry import available_backends, open_backend, resolve_backend_name

__all__ = [
    "Backend",
    "BackendOptions",
    "Context",
    "DType",
    "DeviceInfo",
    "RopeOptions",
    "Tensor",
    "available_backends",
    "context_of",
    "open_backend",
    "resolve_backend_name",
]
