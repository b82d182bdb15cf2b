"""Linear (and Stack, linears of one x), Embedding and the norms: each holds its weights
and has one `forward`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from herd.ml import Tensor
from herd.nn.lora import Lora, Memo
from herd.nn.weights import Weights


class Linear:
    """`x W^T + b`, plus `B (A x)` where the weight has LoRA adapters (`herd.nn.lora`):
    applied beside the base weight, which stays as stored (possibly quantized)."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None = None, lora: Lora | None = None, name: str = ""
    ) -> None:
        self.weight, self.bias, self.lora, self.name = weight, bias, lora, name
        self.stack: tuple[Stack, int] | None = None  # set by `Stack.bind`

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
        return cls(weight, b, lora, w.prefix + name + ".weight")

    def forward(self, x: Tensor) -> Tensor:
        if self.stack is not None:
            stack, i = self.stack
            y = stack.output(x, i)
        else:
            y = x.linear(self.weight)
        if self.lora is not None:
            y = y.add(self.lora.delta(x))
        return y.add(self.bias) if self.bias is not None else y


class Stack:
    """Linears that read the same x (a layer's q, k and v; gate and up) as one matmul over
    their weights stacked by the backend (`Backend.stack`), each one's output a slice of
    it: each decode-step node costs a thread barrier however small its work, and this is
    one node for three. Only the first call on an x computes (`Memo`, let go at the last
    member: models call them in order); a member called with another x (the last layer's
    q, which reads only the output rows) gets a stack of its own computed for it."""

    def __init__(self, weight: Tensor, linears: Sequence[Linear]) -> None:
        self.weight = weight
        ends = np.cumsum([m.weight.shape[0] for m in linears]).tolist()
        self.rows = [(e - m.weight.shape[0], e) for e, m in zip(ends, linears, strict=True)]
        self.memo = Memo()
        for i, m in enumerate(linears):
            m.stack = (self, i)

    @classmethod
    def bind(cls, w: Weights, *linears: Linear) -> Stack | None:
        """Declare that `linears` always read the same x; None (each on its own) where the
        backend does not stack them."""
        weight = w.backend.stack([m.name for m in linears])
        if weight is None:
            return None
        for m in linears:  # a backend that copied them holds views now: the copies can go
            m.weight = w.backend.weight(m.name)
        return cls(weight, linears)

    def output(self, x: Tensor, i: int) -> Tensor:
        y = self.memo.get(x, lambda: x.linear(self.weight), i == len(self.rows) - 1)
        return y.slice(-1, *self.rows[i])


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
