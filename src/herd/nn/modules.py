"""Linear, Embedding and the norms: each holds its weights and has one `forward`."""

from __future__ import annotations

from herd.ml import Tensor
from herd.nn.lora import Lora
from herd.nn.weights import Weights


class Linear:
    """`x W^T + b`, plus `B (A x)` where the weight has LoRA adapters (`herd.nn.lora`):
    applied beside the base weight, which stays as stored (possibly quantized)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, lora: Lora | None = None):
        self.weight, self.bias, self.lora = weight, bias, lora

    @classmethod
    def bind(
        cls,
        w: Weights,
        name: str,
        n_out: int,
        n_in: int,
        *,
        bias: bool | None = False,
        fallback: str | None = None,
    ) -> Linear:
        """`bias=None`: use the bias when the file has one."""
        weight = w.get(f"{name}.weight", (n_out, n_in), fallback=fallback)
        lora = w.lora(f"{name}.weight", (n_out, n_in))
        b = None
        if bias is None:
            b = w.optional(f"{name}.bias", (n_out,))
        elif bias:
            b = w.get(f"{name}.bias", (n_out,))
        return cls(weight, b, lora)

    def forward(self, x: Tensor) -> Tensor:
        y = x.linear(self.weight)
        if self.lora is not None:
            y = y.add(x.linear(self.lora.a).linear(self.lora.b))
        return y.add(self.bias) if self.bias is not None else y


class Embedding:
    def __init__(self, weight: Tensor) -> None:
        self.weight = weight

    @classmethod
    def bind(cls, w: Weights, name: str, n_vocab: int, dim: int) -> Embedding:
        return cls(w.get(f"{name}.weight", (n_vocab, dim)))

    def forward(self, ids: Tensor) -> Tensor:
        return self.weight.get_rows(ids)


class RMSNorm:
    def __init__(self, weight: Tensor | None, eps: float) -> None:
        self.weight, self.eps = weight, eps

    @classmethod
    def bind(cls, w: Weights, name: str, dim: int, eps: float) -> RMSNorm:
        return cls(w.get(f"{name}.weight", (dim,)), eps)

    def forward(self, x: Tensor) -> Tensor:
        y = x.rms_norm(self.eps)
        return y.mul(self.weight) if self.weight is not None else y


class LayerNorm:
    def __init__(self, weight: Tensor, bias: Tensor | None, eps: float) -> None:
        self.weight, self.bias, self.eps = weight, bias, eps

    @classmethod
    def bind(cls, w: Weights, name: str, dim: int, eps: float) -> LayerNorm:
        return cls(w.get(f"{name}.weight", (dim,)), w.optional(f"{name}.bias", (dim,)), eps)

    def forward(self, x: Tensor) -> Tensor:
        y = x.layer_norm(self.eps).mul(self.weight)
        return y.add(self.bias) if self.bias is not None else y
