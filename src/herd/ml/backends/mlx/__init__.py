"""MLX backend: the ml contract on `mlx.core` (see backend.py)."""

from herd.ml.backends.mlx.backend import MlxBackend, default_devices, open_mlx
from herd.ml.backends.mlx.context import MlxContext
from herd.ml.backends.mlx.tensor import MlxTensor

__all__ = ["MlxBackend", "MlxContext", "MlxTensor", "default_devices", "open_mlx"]
