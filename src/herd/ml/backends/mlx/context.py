"""MlxContext: one forward pass as a lazy MLX graph, evaluated once by `compute`.

Ops on tensors only build MLX arrays. `compute` evaluates the outputs, the tensors given
to `forward` and every persistent tensor written in this pass in one `mx.eval`, so that
MLX schedules them together and a cache write is never left as a pending graph that the
next pass would drag along. Each context also records a tape of its ops, so that
`rerun` (GraphReuse) replays the pass for new inputs without the model's Python, under
`mx.compile` on GPUs (reuse.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from herd.errors import BackendError
from herd.ml.backends.mlx.reuse import Tape, replay_fn
from herd.ml.backends.mlx.tensor import MlxTensor, f32
from herd.ml.base import DType

if TYPE_CHECKING:
    from herd.ml.backends.mlx.backend import MlxBackend

_INPUT = {
    DType.F32: (np.float32, None),
    DType.I32: (np.int32, None),
    DType.F16: (np.float16, None),
    DType.BF16: (np.float32, mx.bfloat16),  # NumPy has no bfloat16: converted by MLX
    # MLX keeps block types as F16 (see `MlxBackend.alloc`)
    DType.Q8_0: (np.float16, None),
    DType.Q4_0: (np.float16, None),
}


class MlxContext:
    """One forward pass (see the module docstring)."""

    def __init__(self, backend: MlxBackend, record: bool = True) -> None:
        self.backend = backend
        self.forwards: list[mx.array] = []
        self.written: list[MlxTensor] = []  # persistent tensors written in this pass
        self.tape: Tape | None = Tape() if record else None
        self._inputs: list[tuple[tuple[int, ...], Any, Any]] = []  # shape, NumPy and MLX types
        self._outputs: list[int] | None = None  # the slots of the last compute's outputs
        self._replay: Any = None  # the replay of the last compute's pass, made on rerun
        self._host: list[np.ndarray] = []  # what rerun(copy=False) returns views of
        # MLX builds each op on the default device's stream: this backend's device
        mx.set_default_device(backend.device)

    def input(self, array: np.ndarray | Sequence[Any], dtype: DType = DType.F32) -> MlxTensor:
        np_type, mx_type = _INPUT.get(dtype, (None, None))
        assert np_type is not None, f"input as {dtype.name}: not a type MLX computes with"
        host = np.ascontiguousarray(array, dtype=np_type)
        t = MlxTensor(_device_array(host, mx_type), self)
        if self.tape is not None:
            self._inputs.append((host.shape, np_type, mx_type))
            t.slot = self.tape.slot()
            self.tape.entries.append(("input", None, (), {}, t.slot))
        return t

    def attach(self, t: MlxTensor) -> MlxTensor:
        # the array the tensor holds now: a persistent tensor's, after this pass's writes
        out = MlxTensor(t.a, self, t.w)
        if self.tape is not None:
            out.slot = self.tape.slot()
            self.tape.entries.append(("attach", self.tape.ref(t, self), (), {}, out.slot))
        return out

    def forward(self, *tensors: MlxTensor) -> None:
        self.forwards.extend(t.a for t in tensors if t.a is not None)

    def compute(self, *outputs: MlxTensor) -> list[np.ndarray]:
        outs = [_host(t) for t in outputs]
        mx.eval(*outs, *self.forwards, *(t.a for t in self.written))
        self.forwards.clear()
        self.written.clear()
        if self.tape is not None:
            self._outputs = [t.slot if t.ctx is self else -1 for t in outputs]
            self._replay = None
        return [np.array(a, copy=True) for a in outs]

    # ---- GraphReuse ----------------------------------------------------------------------
    @property
    def _compiled(self) -> bool:
        # mx.compile on GPUs, where it fuses kernels; on the CPU it was no faster here
        # (SmolLM2: ~230 ms a step either way, MLX's CPU kernels dominate) and JIT-compiles
        # C++ kernels through the system compiler on first use
        return self.backend.device != mx.cpu

    def keep(self) -> None:
        """Nothing to set aside: MLX allocates each run's arrays from its own pool."""

    def rerun(self, *arrays: np.ndarray | Sequence[Any], copy: bool = True) -> list[np.ndarray]:
        """The outputs of the last `compute`'s pass for new inputs (one array per `input`
        call, in call order, each of its shape): the pass replayed from its tape (traced
        by `mx.compile` on the first rerun, on GPUs). Its cache writes land in the
        persistent tensors as `compute`'s do. On the CPU, `copy=False` gives read-only
        views of host buffers that the next rerun overwrites (as ggml's); elsewhere
        copies."""
        tape, outputs = self.tape, self._outputs
        assert tape is not None and outputs is not None, "rerun before compute"
        if tape.broken or -1 in outputs:
            raise BackendError(f"mlx: this pass cannot be rerun: {tape.broken or 'an output'}")
        assert len(arrays) == len(self._inputs), (
            f"rerun: {len(arrays)} arrays for {len(self._inputs)} inputs"
        )
        ins = []
        for i, (array, (shape, np_type, mx_type)) in enumerate(
            zip(arrays, self._inputs, strict=True)
        ):
            host = np.ascontiguousarray(array, dtype=np_type)
            assert host.shape == shape, f"rerun: input {i} is {host.shape}, was {shape}"
            ins.append(_device_array(host, mx_type))
        if self._replay is None:
            self._replay = replay_fn(
                tape, outputs, MlxContext(self.backend, record=False), _host, self._compiled
            )
        persistent = list(tape.persistent.values())
        mx.set_default_device(self.backend.device)
        results = self._replay(*ins, *(p.a for p in persistent))
        del ins
        for p, a in zip(persistent, results[len(outputs) :], strict=True):
            p.a = a  # the old arrays are now the graph's only: MLX may update them in place
        mx.eval(*results)
        outs = results[: len(outputs)]
        if self.backend.device != mx.cpu:
            return [np.array(a, copy=True) for a in outs]
        # on the CPU every run lands in the same host buffers, which copy=False hands out
        if [h.shape for h in self._host] != [tuple(a.shape) for a in outs]:
            self._host = [np.empty(a.shape, np.int32 if a.dtype == mx.int32 else np.float32)
                          for a in outs]  # fmt: skip
        for h, a in zip(self._host, outs, strict=True):
            h.flags.writeable = True
            np.copyto(h, np.asarray(a))
            h.flags.writeable = False
        return [h.copy() for h in self._host] if copy else list(self._host)

    def close(self) -> None:
        self.forwards.clear()
        self.written.clear()
        self.tape = None
        self._replay = None

    def __enter__(self) -> MlxContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _device_array(host: np.ndarray, mx_type: Any) -> mx.array:
    a = mx.array(host)
    return a if mx_type is None else a.astype(mx_type)


def _host(t: MlxTensor) -> mx.array:
    """t as the array `compute` returns: int32 for integers, float32 otherwise."""
    if t.a is not None and t.a.dtype in (mx.int32, mx.uint32, mx.int64):
        return t.a if t.a.dtype == mx.int32 else t.a.astype(mx.int32)
    return f32(t)
