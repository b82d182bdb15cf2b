"""ONNX Runtime backend: the ml contract as ONNX graphs run by onnxruntime (see backend.py)."""

from herd.ml.backends.onnx.backend import OnnxBackend, default_devices, open_onnx
from herd.ml.backends.onnx.context import OnnxContext
from herd.ml.backends.onnx.tensor import OnnxTensor

__all__ = ["OnnxBackend", "OnnxContext", "OnnxTensor", "default_devices", "open_onnx"]
