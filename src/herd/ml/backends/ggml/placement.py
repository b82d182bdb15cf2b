"""Where graphs put their intermediate tensors: all of a backend's placement in one place.

CPU only, ggml's graph allocator places each graph in one compute buffer that every graph
shares, except a graph kept for reruns (`GGMLContext.keep`), which gets an allocator and a
buffer of its own. With GPUs, ggml's scheduler splits each graph over [GPUs..., CPU] and
places the pieces. Either way the shared memory holds one graph's placement at a time:
`Placer.epoch` counts the placements made there, and a graph placed at the current epoch
still holds its memory, so running it again skips placing it (the decode step's rerun).

Each context records where its own graph sits (`galloc`, `placed`, `epoch`, `srcs`, and
`host`, the arrays over its inputs and outputs); only the Placer writes that record.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from herd.errors import BackendError, OutOfMemoryError
from herd.ml.backends.ggml import _lib as L

if TYPE_CHECKING:
    from herd.ml.backends.ggml.context import GGMLContext


class Placer:
    """The shared compute memory of one backend: the CPU graph allocator, the scheduler
    over the GPUs in use (`split`), and the epoch of what they placed last."""

    def __init__(self, cpu: int, gpus: list[int], gpu_ops: bool) -> None:
        """`cpu`, `gpus`: ggml backends, the GPUs in the scheduler's order. `gpu_ops`: run
        every op the first GPU supports there (tests)."""
        self.cpu, self.gpus, self.gpu_ops = cpu, gpus, gpu_ops
        self.split = bool(gpus)  # graphs go through the scheduler
        self.galloc = L.ggml_gallocr_new(L.ggml_backend_cpu_buffer_type())
        if not self.galloc:
            raise BackendError("ggml: cannot create the graph allocator")
        self.epoch = 0
        self.sched = 0
        self._sched_size = 0

    def keep(self, ctx: GGMLContext) -> None:
        """Give a graph that will be rerun between others a CPU buffer of its own, which no
        other graph moves. Graphs split over devices stay with the scheduler."""
        if not ctx.galloc and not self.split:
            ctx.galloc = L.ggml_gallocr_new(L.ggml_backend_cpu_buffer_type())

    def place(self, ctx: GGMLContext) -> None:
        """Place a graph in CPU memory: its own buffer when kept, else the shared one
        (where it takes the place of whatever graph was placed there before)."""
        if not L.ggml_gallocr_alloc_graph(ctx.galloc or self.galloc, ctx.graph):
            raise BackendError("ggml could not allocate the compute graph (out of memory?)")
        ctx.placed = True
        ctx.host = None
        if not ctx.galloc:
            self.epoch += 1
            ctx.epoch = self.epoch

    def place_split(self, ctx: GGMLContext, nodes: int) -> None:
        """Let the scheduler split a graph over the devices and place its tensors, unless
        it still holds this very placement (a rerun with no other graph since). `nodes`:
        the most a graph of this backend may have (the scheduler is sized for it)."""
        sched = self.scheduler(nodes)
        if ctx.epoch == self.epoch:
            return
        L.unallocate(ctx.g)
        L.ggml_backend_sched_reset(sched)
        # ggml's scheduler points the sources of nodes that read another device's tensor
        # at copies it makes in its own context, which its reset frees: a graph split once
        # gets its own sources back before it is split again (also a new graph over nodes
        # of an earlier one in this context)
        g, saved = ctx.graph, ctx.srcs
        for i in range(L.ggml_graph_n_nodes(g)):
            p = L.ggml_graph_node(g, i)
            srcs = saved.get(p)
            if srcs is None:
                saved[p] = L.tensor_srcs(p)
            else:
                L.set_tensor_srcs(p, srcs)
        if self.gpu_ops:
            self._pin_to_gpu(g)
        if not L.ggml_backend_sched_alloc_graph(sched, g):
            raise OutOfMemoryError("ggml could not allocate the compute graph on its devices")
        self.epoch += 1
        ctx.epoch = self.epoch

    def scheduler(self, nodes: int) -> int:
        """ggml's scheduler over [GPUs..., CPU], sized for graphs of `nodes` nodes (made
        again when persistent tensors make them outgrow it)."""
        if self.sched and self._sched_size >= nodes:
            return self.sched
        if self.sched:
            L.ggml_backend_sched_free(self.sched)
            self.epoch += 1  # what the old one placed is gone
        backends = (ctypes.c_void_p * (len(self.gpus) + 1))(*self.gpus, self.cpu)
        self.sched = L.ggml_backend_sched_new(backends, None, len(backends), nodes, False, True)
        if not self.sched:
            raise BackendError("ggml: cannot create the backend scheduler")
        self._sched_size = nodes
        return self.sched

    def _pin_to_gpu(self, graph: int) -> None:
        """Run every op of `graph` the first GPU supports there (option gpu_ops), except
        views and writes into persistent tensors, which stay with their buffer."""
        gpu = self.gpus[0]
        for i in range(L.ggml_graph_n_nodes(graph)):
            node = L.ggml_graph_node(graph, i)
            if L.tensor_is_view(node) or L.tensor_preallocated(node):
                continue
            if L.ggml_backend_supports_op(gpu, node):
                L.ggml_backend_sched_set_tensor_backend(self.sched, node, gpu)

    def close(self) -> None:
        if self.sched:
            L.ggml_backend_sched_free(self.sched)
            self.sched = 0
        if self.galloc:
            L.ggml_gallocr_free(self.galloc)
            self.galloc = 0
