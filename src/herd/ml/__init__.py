"""Backend contracts and the registry of compute backends."""

from herd.ml.base import (
    KV_CACHE_TYPES,
    Backend,
    BackendOptions,
    CacheConfig,
    Context,
    DeviceInfo,
    DType,
    FusedAttention,
    GraphReuse,
    HostTensors,
    RopeOptions,
    Tensor,
    context_of,
)
from herd.ml.registry import (
    available_backends,
    default_devices,
    open_backend,
    resolve_backend_name,
)

__all__ = [
    "KV_CACHE_TYPES",
    "Backend",
    "BackendOptions",
    "CacheConfig",
    "Context",
    "DType",
    "DeviceInfo",
    "FusedAttention",
    "GraphReuse",
    "HostTensors",
    "RopeOptions",
    "Tensor",
    "available_backends",
    "context_of",
    "default_devices",
    "open_backend",
    "resolve_backend_name",
]
