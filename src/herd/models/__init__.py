"""Model architectures, registered by GGUF `general.architecture`."""

from herd.models.base import Batch, Cache, Inputs, Model, batch_inputs
from herd.models.registry import load_model, register, supported_architectures

__all__ = [
    "Batch",
    "Cache",
    "Inputs",
    "Model",
    "batch_inputs",
    "load_model",
    "register",
    "supported_architectures",
]
