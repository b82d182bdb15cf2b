"""Graph reuse's bookkeeping: what a pass's inputs are, recorded without building it.

A graph backend reruns a kept graph with new input values (`GraphReuse`); the runner
records the inputs a pass would make (`cache.start_forward` and `batch_inputs`, which
call nothing but `input`) to tell whether the kept graph fits the next batch.

How the runner uses it (`KeptGraphs`, called by `Runner._compute`): a batch differs from
the last one of its kind (decode step or prompt) only in its inputs (tokens, positions,
cache cells, mask) as long as their shapes and the attended cache range stay the same:
for decode steps, the cache's padding keeps that true for many steps in a row; for
prompts, when one of the same length comes at the same place (llama.cpp reuses its graphs
alike). The inputs are recorded by running only the input-making part of a forward pass,
which the runner makes before `model.forward` (`Runner._forward`); when they match the
kept graph, it is rerun and `model.forward` is skipped. One graph is kept per kind, the
last decode graph (in a compute buffer of its own) and the last prompt graph (in the
backend's shared one), and a kind's old graph is freed before its new one is built:
memory peaks as without reuse. A pass that fails drops both (a graph that failed midway
is not rerun).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from herd.ml import Backend, Context, DType, GraphReuse, Tensor
from herd.models import Batch, Cache, batch_inputs


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


class KeptGraphs:
    """A runner's kept graphs, one per kind ("decode", "prompt"), rerun while a batch's
    recorded inputs fit them (the module docstring says how and when). `enabled` only
    where `reuse` and the backend's contexts can rerun a graph."""

    def __init__(self, backend: Backend, reuse: bool) -> None:
        self.backend = backend
        with backend.new_context() as probe:
            self.enabled = reuse and isinstance(probe, GraphReuse)
        self.kept: dict[str, tuple[object, ReusableContext]] = {}  # kind -> (key, context)

    def compute(
        self,
        cache: Cache,
        batch: Batch,
        decode_rows: int,
        forward: Callable[[Context, Batch], Tensor],
    ) -> np.ndarray:
        """Logits of `forward(ctx, batch)`: a batch of at most `decode_rows` tokens is a
        decode step. Rerun, they are a read-only view of the graph's output: read them
        before the next step."""
        if not self.enabled:
            with self.backend.new_context() as ctx:
                (logits,) = ctx.compute(forward(ctx, batch))
            return logits
        recorder = InputRecorder()
        cache.start_forward(recorder, batch)  # what `forward` makes, recorded
        batch_inputs(recorder, batch)
        key = (tuple((a.shape, a.dtype.str) for a in recorder.arrays), cache.view_key())
        kind = "decode" if len(batch.tokens) <= decode_rows else "prompt"
        kept = self.kept.pop(kind, None)
        if kept is not None and kept[0] == key:
            self.kept[kind] = kept
            return kept[1].rerun(*recorder.arrays, copy=False)[0]
        if kept is not None:
            kept[1].close()
        ctx = self.backend.new_context()
        assert isinstance(ctx, GraphReuse)  # as the probe was
        if kind == "decode":  # rerun between prompts: a buffer of its own, never re-placed
            ctx.keep()
        (logits,) = ctx.compute(forward(ctx, batch))
        self.kept[kind] = (key, ctx)
        return logits

    def drop(self) -> None:
        """Free every kept graph (after a failed pass, or before the backend closes)."""
        graphs, self.kept = list(self.kept.values()), {}
        for _, ctx in graphs:
            ctx.close()
