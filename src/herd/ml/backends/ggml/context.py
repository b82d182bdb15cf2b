"""GGMLContext: one forward pass, recorded as a ggml graph, then computed (and rerun).

A context is one no_alloc ggml context: ops only record nodes in it, every one made
through `node` (which counts it against the context's capacity), with the operand
conversions ggml's kernels need (`f32`, `i32`, `src0`, `f16`). `compute` builds the graph,
has the backend's Placer place its intermediates, copies the inputs in, runs it and copies
the outputs out. `rerun` runs the same graph again with new input values (GraphReuse).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from herd.errors import BackendError
from herd.ml.backends.ggml import _lib as L
from herd.ml.backends.ggml import one_thread
from herd.ml.backends.ggml._lib import TYPE_F16, TYPE_F32, TYPE_I32, ggml_cast, ggml_cont
from herd.ml.backends.ggml.dtypes import (
    CONT,
    FLOAT,
    GTYPE,
    NP_IN,
    NP_OUT,
    ROWS,
    STRIDED,
    TYPE_SIZE,
    ne,
    type_name,
)
from herd.ml.backends.ggml.tensor import GGMLTensor
from herd.ml.base import DType

if TYPE_CHECKING:
    from herd.ml.backends.ggml.backend import GGMLBackend

# a node is counted once ggml has made it (two for some ops): the metadata buffer keeps
# room for a few past the capacity
NODE_MARGIN = 8


class GGMLContext:
    """One forward pass: a no_alloc ggml context that records ops, then `compute`."""

    def __init__(self, backend: GGMLBackend) -> None:
        self.backend = backend
        self.placer = backend.placer
        self._buf = backend._take_meta_buffer()
        self.g: int = L.ggml_init(L.InitParams(self._buf.nbytes - 64, _aligned(self._buf), True))
        if not self.g:
            raise BackendError("ggml_init failed")
        self.n = 0  # nodes made so far
        self.cap = backend.max_nodes - NODE_MARGIN
        self.inputs: list[tuple[int, np.ndarray]] = []
        self.forwards: list[int] = []
        self._gctx: int | None = None
        self.graph: int | None = None
        self._outs: list[tuple[int, tuple[int, ...], Any]] = []
        self._f16: dict[int, int] = {}
        # where the graph sits, written by the Placer (placement.py):
        self.galloc = 0  # a private graph allocator, once `keep` asks for one
        self.placed = False  # the graph's tensors still sit where its allocator put them
        self.srcs: dict[int, bytes] = {}  # each node's sources before any split
        self.epoch = -1  # the shared memory's epoch when it last placed this graph
        # CPU only: arrays over the placed graph's inputs (None: unused by the graph) and
        # outputs, made once per placement; a rerun then fills and reads them with NumPy,
        # not a ctypes call and a new array each (a decode step runs on caches the
        # compute has just evicted: every call there costs several times its warm time)
        self.host: tuple[list[np.ndarray | None], list[np.ndarray]] | None = None

    # ---- nodes -----------------------------------------------------------------------
    def node(self, p: int) -> int:
        """Count a tensor ggml has just made in this context. Every node goes through here:
        past the capacity ggml would abort the process, so this raises first."""
        self.n += 1
        if self.n > self.cap:
            raise BackendError(
                f"graph too large: more than {self.cap} tensors in one context "
                "(BackendOptions.max_nodes)"
            )
        return p

    def out(self, p: int, shape: tuple[int, ...], gtype: int = TYPE_F32) -> GGMLTensor:
        """The tensor of a new contiguous node."""
        return GGMLTensor(self.node(p), shape, gtype, CONT, self)

    def view(self, p: int, shape: tuple[int, ...], gtype: int) -> GGMLTensor:
        """The tensor of a new view node, with the layout its strides give it."""
        t = GGMLTensor(self.node(p), shape, gtype, CONT, self)
        if not L.ggml_is_contiguous(p):
            t.lay = ROWS if L.tensor_nb(p)[0] == TYPE_SIZE[gtype] else STRIDED
        return t

    def f32(self, t: GGMLTensor, lay: int = ROWS) -> int:
        """Pointer to an F32 version of t with at least layout `lay`."""
        if t.gtype == TYPE_F32:
            if t.lay >= lay:
                return t.p
            return self.node(ggml_cont(self.g, t.p))
        # quantized blocks must stay whole: permute() dequantizes before moving dim 0
        assert t.lay >= ROWS or t.gtype in FLOAT or t.gtype == TYPE_I32, (
            f"strided view of a {type_name(t.gtype)} tensor {t.shape}"
        )
        return self.node(ggml_cast(self.g, t.p, TYPE_F32))

    def i32(self, t: GGMLTensor) -> int:
        """Pointer to a contiguous I32 version of t (indices)."""
        if t.gtype == TYPE_I32 and t.lay == CONT:
            return t.p
        if t.gtype == TYPE_I32:
            return self.node(ggml_cont(self.g, t.p))
        p = t.p if t.gtype == TYPE_F32 else self.f32(t)
        return self.node(ggml_cast(self.g, p, TYPE_I32))

    def src0(self, t: GGMLTensor) -> int:
        """t as mul_mat's first operand: any computable type, rows contiguous."""
        if t.lay >= ROWS:
            return t.p
        if t.gtype in FLOAT:
            return self.node(ggml_cont(self.g, t.p))
        return self.f32(t)

    def f16(self, t: GGMLTensor) -> int:
        """t as a contiguous F16 tensor, converted once per context (attention masks)."""
        p = self._f16.get(t.p)
        if p is None:
            if t.gtype == TYPE_F16 and t.lay == CONT:
                p = t.p
            else:
                src = t.p if t.lay >= ROWS else self.f32(t, CONT)
                p = self.node(ggml_cast(self.g, src, TYPE_F16))
            self._f16[t.p] = p
        return p

    # ---- the Context contract ----------------------------------------------------------
    def input(self, array: np.ndarray | Sequence[Any], dtype: DType = DType.F32) -> GGMLTensor:
        gtype = GTYPE[dtype]
        if gtype not in NP_IN:
            return self.input(array, DType.F32).cast(dtype)
        a = np.ascontiguousarray(array, dtype=NP_IN[gtype])
        assert a.ndim <= 4, f"input of {a.ndim} dims; ggml has 4"
        p = self.node(L.ggml_new_tensor_4d(self.g, gtype, *ne(a.shape)))
        L.ggml_set_input(p)
        self.inputs.append((p, a))
        return GGMLTensor(p, a.shape, gtype, CONT, self)

    def attach(self, t: GGMLTensor) -> GGMLTensor:
        return GGMLTensor(t.p, t.shape, t.gtype, t.lay, self)

    def forward(self, *tensors: GGMLTensor) -> None:
        self.forwards.extend(t.p for t in tensors)

    def forward_node(self, p: int) -> None:
        """Run node p before every node made after it (as `forward`'s tensors are)."""
        self.forwards.append(p)

    def compute(self, *outputs: GGMLTensor) -> list[np.ndarray]:
        if self.graph is not None:  # computed before: its tensors hold stale placements
            L.unallocate(self.g)
        self._build(outputs)
        self.epoch = -1  # a new graph: nothing has placed it yet
        self.placed = False
        return self._run()

    # ---- GraphReuse ------------------------------------------------------------------
    def rerun(self, *arrays: np.ndarray | Sequence[Any], copy: bool = True) -> list[np.ndarray]:
        """Run the graph of the last `compute` again with new input values.

        One array per `input` call, in call order, each of the same shape: the runner's
        path for a decode step or a repeated prompt shape, which skips building the graph in
        Python altogether. `copy=False`: where the
        outputs sit in host memory, return read-only views of them, valid until this
        graph runs again or closes (a decode step reads its logits at once; copying them
        out costs ~0.2 ms a token for a 262k vocabulary).
        """
        assert self.graph is not None, "rerun before compute"
        assert len(arrays) == len(self.inputs), (
            f"rerun: {len(arrays)} arrays for {len(self.inputs)} inputs"
        )
        for i, (array, (p, old)) in enumerate(zip(arrays, self.inputs, strict=True)):
            a = np.ascontiguousarray(array, dtype=old.dtype)
            assert a.shape == old.shape, f"rerun: input {i} is {a.shape}, was {old.shape}"
            self.inputs[i] = (p, a)
        pl = self.placer
        if not self.galloc and self.epoch != pl.epoch:
            # another graph went through the shared memory since (and may have moved its
            # buffer): this one is placed there again, from scratch
            L.unallocate(self.g)
        return self._run(copy or pl.split)

    def keep(self) -> None:
        """This context's graph will be rerun many times in a row, between other graphs (a
        runner's decode step between prompts): give it a compute buffer of its own, which
        no other graph moves, so that its reruns never place it again. Call before
        `compute`. Graphs split over devices are placed by the scheduler instead."""
        self.placer.keep(self)

    # ---- building and running ------------------------------------------------------------
    def _build(self, outputs: Sequence[GGMLTensor]) -> None:
        self._free_graph()
        outs = []
        for t in outputs:
            p = t.p
            if t.gtype not in NP_OUT or t.lay != CONT:
                p = self.node(ggml_cont(self.g, p)) if t.gtype in NP_OUT else self.f32(t, CONT)
            outs.append((p, t.shape, NP_OUT.get(t.gtype, np.float32)))
        size = self.n + self.backend.n_static + 16
        self._gctx = L.ggml_init(
            L.InitParams(L.ggml_graph_overhead_custom(size, False), None, True)
        )
        gf = self.graph = L.ggml_new_graph_custom(self._gctx, size, False)
        expand = L.ggml_build_forward_expand
        for p in self.forwards:
            expand(gf, p)
        for p, _, _ in outs:
            L.ggml_set_output(p)
            expand(gf, p)
        self._outs = outs

    def _run(self, copy: bool = True) -> list[np.ndarray]:
        b, pl = self.backend, self.placer
        if pl.split:
            pl.place_split(self, b.max_nodes + b.n_static + 256)
        elif not (self.placed if self.galloc else self.epoch == pl.epoch):
            # placed again only when another graph may have taken its memory since: a
            # rerun of an unchanged placement skips the allocator's walk over every node
            pl.place(self)
        if pl.split:
            tensor_data, tensor_set = L.tensor_data, L.ggml_backend_tensor_set
            for p, a in self.inputs:
                if tensor_data(p) is not None:  # inputs the graph does not use stay unallocated
                    tensor_set(p, a.ctypes.data, 0, a.nbytes)
            graph, sched = self.graph, pl.sched
            status = one_thread.run(lambda: L.ggml_backend_sched_graph_compute(sched, graph))
        else:
            host = self.host or self._host_arrays()
            for view, (_, a) in zip(host[0], self.inputs, strict=True):
                if view is not None:
                    view[...] = a
            graph, cpu = self.graph, b.cpu
            status = one_thread.run(lambda: L.ggml_backend_graph_compute(cpu, graph))
        if status != L.STATUS_SUCCESS:
            raise BackendError(f"ggml compute failed: {L.ggml_status_to_string(status).decode()}")
        if not copy:
            assert self.host is not None  # CPU only: with GPUs, rerun asks for copies
            return list(self.host[1])
        results = []
        for p, shape, dt in self._outs:
            r = np.empty(shape, dtype=dt)
            if r.nbytes:
                L.ggml_backend_tensor_get(p, r.ctypes.data, 0, r.nbytes)
            results.append(r)
        return results

    def _host_arrays(self) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
        """Arrays over this placement's inputs and outputs in the CPU's memory."""
        data = L.tensor_data
        ins = [
            None if data(p) is None else _host_view(p, a.shape, a.dtype, writeable=True)
            for p, a in self.inputs
        ]
        self.host = (ins, [_host_view(p, shape, dt) for p, shape, dt in self._outs])
        return self.host

    def _free_graph(self) -> None:
        if self._gctx:
            L.ggml_free(self._gctx)
        self._gctx = self.graph = None

    def close(self) -> None:
        if self.galloc:
            L.ggml_gallocr_free(self.galloc)
            self.galloc = 0
        if self.g:
            self._free_graph()
            L.ggml_free(self.g)
            self.g = 0
            self.backend._give_meta_buffer(self._buf)

    def __enter__(self) -> GGMLContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: ctypes may already be gone
            pass


def _host_view(p: int, shape: tuple[int, ...], dtype: Any, writeable: bool = False) -> np.ndarray:
    """An array over a contiguous tensor in host memory (no copy), read-only unless asked."""
    n = math.prod(shape) * np.dtype(dtype).itemsize
    if not n:
        return np.empty(shape, dtype=dtype)
    raw = (ctypes.c_char * n).from_address(L.tensor_data(p))
    a = np.frombuffer(raw, dtype=dtype).reshape(shape)
    a.flags.writeable = writeable
    return a


def _aligned(buf: np.ndarray) -> int:
    addr: int = buf.ctypes.data
    return (addr + 63) // 64 * 64
