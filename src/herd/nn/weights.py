"""Binding GGUF tensors to modules by name, with declared shapes.

Models name their weights as GGUF does (`blk.3.attn_q.weight`); a wrong or missing tensor
fails at load, naming it, instead of deep inside a forward pass. On an `Adapted` backend
(`herd.nn.lora`) a weight may also have a LoRA adapter, which `Linear.bind` takes.
"""

from __future__ import annotations

from herd.errors import WeightError
from herd.ml import Backend, Tensor
from herd.nn.lora import Adapted, Lora


class Weights:
    """A view of a backend's weights under a name prefix (`blk.3.`)."""

    def __init__(self, backend: Backend, prefix: str = "") -> None:
        self.backend, self.prefix = backend, prefix

    def scope(self, name: str) -> Weights:
        return Weights(self.backend, f"{self.prefix}{name}.")

    def lora(self, name: str, shape: tuple[int, int]) -> Lora | None:
        """The adapter of weight `prefix + name` (n_out, n_in), if the backend has one."""
        backend, full = self.backend, self.prefix + name
        lora = backend.lora(full) if isinstance(backend, Adapted) else None
        if lora is not None:
            n_out, r, n_in = lora.shape
            if (n_out, n_in) != tuple(shape):
                raise WeightError(
                    f"{full}: its adapter's A {(r, n_in)} and B {(n_out, r)} do not fit "
                    f"{tuple(shape)}"
                )
        return lora

    def has(self, name: str) -> bool:
        return self.backend.has_weight(self.prefix + name)

    def get(self, name: str, shape: tuple[int, ...], *, fallback: str | None = None) -> Tensor:
        """The tensor `prefix + name` (or the absolute name `fallback`), checked against shape."""
        full = self.prefix + name
        if not self.backend.has_weight(full):
            if fallback is not None and self.backend.has_weight(fallback):
                full = fallback
            else:
                raise WeightError(f"{full}: missing from the model file")
        t = self.backend.weight(full)
        if tuple(t.shape) != tuple(shape):
            raise WeightError(f"{full}: expected {tuple(shape)}, got {tuple(t.shape)}")
        return t

    def optional(self, name: str, shape: tuple[int, ...]) -> Tensor | None:
        return self.get(name, shape) if self.has(name) else None
