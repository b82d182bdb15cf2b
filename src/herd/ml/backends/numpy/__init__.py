"""Pure NumPy backend: the reference every other backend is tested against."""

from herd.ml.backends.numpy.backend import NumpyBackend, NumpyContext, NumpyTensor

__all__ = ["NumpyBackend", "NumpyContext", "NumpyTensor"]
