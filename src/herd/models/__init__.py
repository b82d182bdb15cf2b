"""Model architectures, registered by GGUF `general.architecture`."""

from herd.models.base import Batch, Model
from herd.models.registry import load_model, register, supported_architectures

__all__ = ["Batch", "Model", "load_model", "register", "supported_architectures"]
