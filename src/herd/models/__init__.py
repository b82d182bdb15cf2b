"""Model architectures, registered by GGUF `general.architecture`."""

from herd.models.base import Batch, BatchImage, Cache, Inputs, Model, Pixels, Vision, batch_inputs
from herd.models.registry import load_model, register, supported_architectures

__all__ = [
    "Batch",
    "BatchImage",
    "Cache",
    "Inputs",
    "Model",
    "Pixels",
    "Vision",
    "batch_inputs",
    "load_model",
    "register",
    "supported_architectures",
]
