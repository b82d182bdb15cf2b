"""Graph reuse's bookkeeping: what a pass's inputs are, recorded without building it.

A graph backend reruns a kept graph with new input values (`GraphReuse`); the runner
records the inputs a pass would make (`cache.start_forward` and `batch_inputs`, which
call nothing but `input`) to tell whether the kept graph fits the next batch.

How the runner uses it (`Runner._compute`): a batch differs from the last one of its kind
(decode step or prompt) only in its inputs (tokens, positions, cache cells, mask) as long
as their shapes and the attended cache range stay the same: for decode steps, the cache's
padding keeps that true for many steps in a row; for prompts, when one of the same length
comes at the same place (llama.cpp reuses its graphs alike). The inputs are recorded by
running only the input-making part of a forward pass, which the runner makes before
`model.forward` (`Runner._forward`); when they match the kept graph, it is rerun and
`model.forward` is skipped. One graph is kept per kind, the last decode graph (in a
compute buffer of its own) and the last prompt graph (in the backend's shared one), and a
kind's old graph is freed before its new one is built: memory peaks as without reuse. A
pass that fails drops both (a graph that failed midway is not rerun).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from herd.ml import Context, DType, GraphReuse, Tensor


class ReusableContext(Context, GraphReuse, Protocol):
    """A context whose graph can run again with new inputs (kept between steps)."""


class InputRecorder:
    """A Context that only records the arrays given to `input`, in order: the inputs of a
    pass, made by `cache.start_forward` and `batch_inputs`, which call nothing else."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []

    def input(self, array: Any, dtype: DType = DType.F32) -> Any:
        kind = np.int32 if dtype == DType.I32 else np.float32
        self.arrays.append(np.ascontiguousarray(array, dtype=kind))

    def attach(self, t: Tensor) -> Tensor:
        raise NotImplementedError("a recorder makes inputs only")

    def forward(self, *tensors: Tensor) -> None:
        raise NotImplementedError("a recorder makes inputs only")

    def compute(self, *outputs: Tensor) -> list[np.ndarray]:
        raise NotImplementedError("a recorder makes inputs only")

    def close(self) -> None:
        pass

    def __enter__(self) -> InputRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
