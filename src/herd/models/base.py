"""What every architecture provides, and the batch it is given."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from herd.gguf import Config
from herd.ml import Backend, Context, DType, Tensor


@dataclass
class Batch:
    """One forward pass worth of tokens, possibly from several sequences.

    `outputs`: indices into the batch of the tokens whose logits are wanted, increasing (a
    sequence's last prompt token, every decode token, or every token for teacher forcing).
    """

    tokens: np.ndarray  # (T,) int32
    positions: np.ndarray  # (T,) int32
    sequences: np.ndarray  # (T,) int32
    outputs: np.ndarray  # (N,) int32
    multimodal: list[Any] = field(default_factory=list)

    @classmethod
    def single(
        cls, tokens: list[int], start: int = 0, seq: int = 0, outputs: str = "last"
    ) -> Batch:
        n = len(tokens)
        outs = np.arange(n) if outputs == "all" else np.array([n - 1])
        return cls(
            np.asarray(tokens, np.int32),
            np.arange(start, start + n, dtype=np.int32),
            np.full(n, seq, np.int32),
            outs.astype(np.int32),
        )


class Model(Protocol):
    """An architecture bound to a backend's weights.

    `forward` returns logits (N, n_vocab) for `batch.outputs`; it calls
    `cache.start_forward` itself so the cache and the batch always agree.
    """

    config: Config
    backend: Backend
    cache: Any
    n_vocab: int
    context_length: int

    @classmethod
    def from_gguf(cls, config: Config, backend: Backend) -> Model: ...

    def forward(self, ctx: Context, batch: Batch) -> Tensor: ...

    def shift(self, ctx: Context, layer: int, key: Tensor, delta: Tensor) -> Tensor: ...


def batch_inputs(ctx: Context, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """The batch's token ids, positions and output rows as inputs, always in this order.

    Every model creates its inputs through `cache.start_forward` and then this, so the
    runner can refill a reused graph without running `forward` (see runner).
    """
    return (
        ctx.input(batch.tokens, DType.I32),
        ctx.input(batch.positions, DType.I32),
        ctx.input(batch.outputs, DType.I32),
    )


def last_layer_rows(batch: Batch, outputs: Tensor) -> Tensor | None:
    """The rows the last layer keeps: `outputs`, or None where they are every row of the
    batch (a decode step, teacher forcing) and there is nothing to select."""
    return None if len(batch.outputs) == len(batch.tokens) else outputs
