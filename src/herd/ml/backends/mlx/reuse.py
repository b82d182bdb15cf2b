"""Graph reuse on MLX: a pass's ops recorded as a tape, replayed under `mx.compile`.

MLX drops a graph once it is evaluated, and cannot swap the inputs of one it holds, so a
context records what built it instead: every op called on its tensors (the outermost call
only: ops made of other ops replay as one), with operands by slot, and its `input` and
`attach` calls. `rerun` replays the tape as a function of the new inputs and of the
current arrays of the persistent tensors it touches (the KV cache), returning the outputs
and those tensors' new arrays: the model's Python is skipped. On a GPU the function goes
through `mx.compile`, which traces it once and then runs the traced graph for each new
set of inputs of the same shapes, with no Python per op; weights are captured as
constants.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx

if TYPE_CHECKING:
    from herd.ml.backends.mlx.context import MlxContext
    from herd.ml.backends.mlx.tensor import MlxTensor

_depth = threading.local()  # ops called from inside another op are not recorded
_PLAIN: dict[str, Callable[..., MlxTensor]] = {}  # op name -> the op, not recording


@dataclass
class Ref:
    """An operand on the tape: a slot of this pass, or a tensor of no context (a weight,
    which replays as itself; a persistent tensor, which replays as its current array)."""

    slot: int = -1
    tensor: MlxTensor | None = None


@dataclass
class Tape:
    # (op name or "input"/"attach", self Ref, args, kwargs, output slot)
    entries: list[tuple[str, Any, tuple[Any, ...], dict[str, Any], int]] = field(
        default_factory=list
    )
    n_slots: int = 0
    persistent: dict[int, MlxTensor] = field(default_factory=dict)  # id -> tensor, in order
    broken: str = ""  # why the tape cannot replay this pass (an operand it did not see)

    def slot(self) -> int:
        self.n_slots += 1
        return self.n_slots - 1

    def ref(self, t: MlxTensor, owner: MlxContext) -> Ref:
        if t.ctx is None:
            if t.persistent:
                self.persistent.setdefault(id(t), t)
            return Ref(tensor=t)
        if t.ctx is not owner or t.slot < 0:
            self.broken = self.broken or f"an operand {t} made outside this context's ops"
        return Ref(slot=t.slot)


def recorded(name: str, fn: Callable[..., MlxTensor]) -> Callable[..., MlxTensor]:
    """`fn` (an op of MlxTensor), recording itself on its context's tape when called from
    outside any other op."""

    @functools.wraps(fn)
    def op(self: MlxTensor, *args: Any, **kwargs: Any) -> MlxTensor:
        depth = getattr(_depth, "n", 0)
        _depth.n = depth + 1
        try:
            out = fn(self, *args, **kwargs)
        finally:
            _depth.n = depth
        c = out.ctx
        if depth or c is None or c.tape is None:
            return out
        tape: Tape = c.tape
        from herd.ml.backends.mlx.tensor import MlxTensor as T

        def encode(a: Any) -> Any:  # a tensor, or a list of them (`concat_rows`)
            if isinstance(a, list | tuple):
                return type(a)(encode(x) for x in a)
            return tape.ref(a, c) if isinstance(a, T) else a

        enc = tuple(encode(a) for a in args)
        kw = {k: encode(v) for k, v in kwargs.items()}
        out.slot = tape.slot()
        tape.entries.append((name, tape.ref(self, c), enc, kw, out.slot))
        return out

    _PLAIN[name] = fn
    return op


def replay_fn(
    tape: Tape,
    outputs: list[int],
    ctx: MlxContext,
    host: Callable[[MlxTensor], mx.array],
    compiled: bool,
) -> Callable[..., list[mx.array]]:
    """The pass as a function: (inputs..., persistent arrays...) -> [outputs..., the
    persistent tensors' arrays after the pass's writes...]."""
    from herd.ml.backends.mlx.tensor import MlxTensor as T

    persistent = list(tape.persistent)
    entries = list(tape.entries)
    outs = list(outputs)

    def run(*arrays: mx.array) -> list[mx.array]:
        n_in = len(arrays) - len(persistent)
        stand = {
            key: T(a, None, persistent=True)
            for key, a in zip(persistent, arrays[n_in:], strict=True)
        }
        vals: list[Any] = [None] * tape.n_slots

        def get(r: Any) -> Any:
            if isinstance(r, list | tuple):
                return type(r)(get(x) for x in r)
            if not isinstance(r, Ref):
                return r
            if r.tensor is None:
                return vals[r.slot]
            return stand.get(id(r.tensor), r.tensor)

        inputs = iter(arrays[:n_in])
        for name, this, args, kwargs, slot in entries:
            if name == "input":
                vals[slot] = T(next(inputs), ctx)
            elif name == "attach":
                src = get(this)
                vals[slot] = T(src.a, ctx, src.w)
            else:
                kw = {k: get(v) for k, v in kwargs.items()}
                vals[slot] = _PLAIN[name](get(this), *(get(a) for a in args), **kw)
        results = [host(vals[s]) for s in outs]
        return results + [stand[key].a for key in persistent]

    return mx.compile(run) if compiled else run
