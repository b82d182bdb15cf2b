"""OnnxContext: one forward pass recorded as an ONNX graph, run by an ORT session.

Ops record nodes (graph.py). `compute` turns them into a model whose inputs are the
context's host inputs, the weights it read and the persistent tensors (KV cache) it read
or wrote; the backend's session cache gives an `InferenceSession` for it (one per distinct
graph: the serialized model, which holds no weight, is the key), and the run binds the
weights and caches from the backend's own memory, with no copy (IOBinding).

Cache writes (`set_rows`) are extra outputs, the written rows only, which the context
copies into the cache's NumPy buffer after the run. A read of a cache after writes to it
in the same pass sees them: the attended rows are sliced first and the written rows
scattered into that slice (the indices checked on the host, each run, to lie in it);
any other read after a write scatters into the whole buffer (shifts and moves: rare).
`rerun` (GraphReuse) runs the last compute's session again with new host inputs.

A KV cache the backend keeps heads first (`OnnxTensor.heads_first`: the array
(1, H, cells, D) behind a tensor whose shape is (cells, H, D)) is read through a transpose,
and its written rows are stored transposed. A decoding row's attention may write its cell
itself, in place (fused.py's GroupQueryAttention): that write is then no output of the
graph, and the host stores nothing.

Shapes are symbolic (dims.py): every input's sizes are `Dim`s, and slices along them, or
along a cache's cells, take their bounds as one-element int64 inputs of the context's own
(`slice_bound`: the attended range [lo, hi) of the KV cache, a block's rows), so a graph names
no token or cell count and one session serves every prompt length and context length.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from onnx import TensorProto

from herd.errors import BackendError
from herd.ml.backends.onnx import quant
from herd.ml.backends.onnx.dims import Dim
from herd.ml.backends.onnx.graph import ELEM, NP, Graph
from herd.ml.backends.onnx.tensor import OnnxTensor
from herd.ml.base import DType

if TYPE_CHECKING:
    from herd.ml.backends.onnx.backend import OnnxBackend, Session

EMBED_BYTES = 4096  # quant.py's initializers at least this large stay the backend's
_INPUT = {DType.F32: DType.F32, DType.I32: DType.I32, DType.F16: DType.F16}


@dataclass
class Write:
    """A set_rows: rows `rows` (graph value) into cache buffer `buf` at `ids`."""

    buf: np.ndarray
    ids: OnnxTensor
    ids64: str
    rows: str
    shape: tuple[int, ...]  # of the rows: (T, ...), a column write's moved to the front
    columns: bool = False  # written along the last axis (set_columns)
    in_place: bool = False  # written by the graph into the bound buffer itself (fused.py)
    heads_first: bool = False  # buf is (1, H, cells, D) behind the cache's (cells, H, D)
    rotated: tuple[str, str, str, bool] | None = None  # the rows' OnnxTensor.rotated


@dataclass
class Plan:
    """What `compute` made, for running it (again): the session and the host's side."""

    session: Session
    inputs: list[str]  # host input names, in `input` call order, then `bounds`' names
    outputs: list[tuple[str, tuple[int, ...], Any]]  # name, shape, NumPy type
    n_results: int  # the first outputs are compute's results; the rest, written rows/ids
    # buf (a view in the cache's own order), rows output, ids input or -1, ids output or
    # -1, columns
    writes: list[tuple[np.ndarray, int, int, int, bool]]
    checks: list[tuple[int, int, int]]  # host input, lo, hi: written ids must lie in [lo, hi)
    bounds: list[np.ndarray]  # the context's slice bounds (`slice_bound`), given each run
    # host inputs (mask, written cell) of in-place attention: no cell after the written one
    # may be seen (fused.py), checked each run
    in_place: list[tuple[int, int]] = field(default_factory=list)
    host: list[np.ndarray] = field(default_factory=list)  # output buffers (rerun copy=False)


class OnnxContext:
    """One forward pass (see the module docstring)."""

    def __init__(self, backend: OnnxBackend) -> None:
        self.backend = backend
        self.g = Graph()
        self.inputs: list[tuple[str, np.ndarray]] = []
        self._input_index: dict[str, int] = {}
        self.bound: dict[str, Any] = {}  # graph input name -> the weight or cache array
        self.writes: list[Write] = []
        self.checks: list[tuple[int, int, int]] = []
        self._cast: dict[tuple[str, int], str] = {}
        self._full: dict[tuple[int, int], str] = {}  # (cache, writes seen) -> materialized
        self.memo: dict[tuple[object, ...], tuple[str, str]] = {}  # values ops share (rope)
        self.bounds: dict[tuple[object, int], tuple[str, np.ndarray]] = {}  # `slice_bound`
        self.aliases: dict[str, str] = {}  # graph output -> the bound input it writes into
        self.in_place: list[tuple[int, int]] = []  # Plan.in_place
        self.plan: Plan | None = None

    # ---- values -------------------------------------------------------------------------
    def val(self, t: OnnxTensor) -> str:
        """The graph value of t as it is stored (weights and caches bound as inputs)."""
        if t.kind == "cache":
            seen = t.seen if t.ctx is self and t.seen >= 0 else len(self.writes)
            return self._cache_value(t, seen)
        if t.name is not None and t.ctx is self:
            return t.name
        assert t.kind == "weight", f"{t}: from another context"
        return self._bind(t)

    def _bind(self, t: OnnxTensor) -> str:
        if t.host is None:  # a quantized weight read as floats: dequantized once
            t.host = self.backend.dense(t.wname)
        name = self.backend.input_name(t.host)
        if name not in self.bound:
            self.bound[name] = t.host
            self.g.declare(name, ELEM[t._dtype], t.host.shape if t.kind == "cache" else t.shape)
        return name

    def _logical(self, t: OnnxTensor) -> str:
        """A cache's whole bound array in the tensor's own (cells, ...) order."""
        base = self._bind(t)
        if not t.heads_first:
            return base
        key = ("logical", base)
        if key not in self.memo:
            _, h, c, d = t.host.shape  # (1, H, cells, D) -> (cells, H, D)
            heads = self.g.op("Reshape", [base, self.g.const([h, c, d])])
            self.memo[key] = (self.g.op("Transpose", [heads], perm=[1, 0, 2]), "")
        return self.memo[key][0]

    def _cast_to(self, t: OnnxTensor, elem: int) -> str:
        v = self.val(t)
        if ELEM.get(t._dtype) == elem:
            return v
        key = (v, elem)
        if key not in self._cast:
            self._cast[key] = self.g.op("Cast", [v], to=elem)
        return self._cast[key]

    def f32(self, t: OnnxTensor) -> str:
        return self._cast_to(t, TensorProto.FLOAT)

    def i64(self, t: OnnxTensor) -> str:
        return self._cast_to(t, TensorProto.INT64)

    def linear2d(self, x: str, w: OnnxTensor, rank: int = 2) -> str:
        """x (N, K) @ w.T for w (M, K): MatMulNBits on a weight's blocks where they map
        (quant.py; x of any rank (..., K) then), else Gemm, which reads w transposed in
        place."""
        if w.q is None or w.kind != "weight":
            return self.g.op("Gemm", [x, self.f32(w)], transB=1)
        # int8 activations (accuracy level 4, llama.cpp's q8 dot products); offsets (Q4_1)
        # on the block sums of x as rounded (quant.py); linears of one x merged (linear.py)
        from herd.ml.backends.onnx import linear

        return linear.record(self, x, w, rank)

    def gather_quantized(self, table: OnnxTensor, ids: OnnxTensor) -> str:
        """Rows of a block-quantized table (GatherBlockQuantized), float32."""
        out = self.g.fresh()
        nodes, inits = quant.gather_block_quantized_node("g:" + table.wname, self.i64(ids), out,
                                                         table.q)  # fmt: skip
        self._quantized(nodes, inits)
        return out

    def _quantized(self, nodes: list[Any], inits: list[tuple[str, np.ndarray]]) -> None:
        """Nodes of quant.py and their initializers: the large ones the backend's (external
        initializers, which MatMulNBits prepacks: 11x faster than as graph inputs), the
        small ones embedded."""
        self.g.nodes.extend(nodes)
        for name, a in inits:
            if a.nbytes >= EMBED_BYTES:
                self.g.external(name, a)
            else:
                self.g.named_const(name, a)

    # ---- persistent tensors -----------------------------------------------------------
    def _writes_to(self, buf: np.ndarray, seen: int) -> list[Write]:
        return [w for w in self.writes[:seen] if w.buf is buf]

    def _cache_value(self, t: OnnxTensor, seen: int) -> str:
        assert t.host is not None
        base = self._logical(t)
        writes = self._writes_to(t.host, seen)
        if not writes:
            return base
        key = (id(t.host), seen)
        if key not in self._full:
            v = base
            g, n = self.g, len(t.shape)
            front = [n - 1, *range(n - 1)]  # the last axis first, and back
            back = [*range(1, n), 0]
            for w in writes:
                idx = g.op("Unsqueeze", [w.ids64, g.const([-1])])
                if w.columns:
                    v = g.op("Transpose", [v], perm=front)
                    v = g.op("Transpose", [g.op("ScatterND", [v, idx, w.rows])], perm=back)
                else:
                    v = g.op("ScatterND", [v, idx, w.rows])
            self._full[key] = v
        return self._full[key]

    def slice_bound(self, axis: object, value: int) -> Dim:
        """A slice bound as an input of this context's (a (1,) int64 array), one per axis
        and value: the graph then serves every value. `axis` names what is sliced (a
        cache's cells, or a symbolic axis's expression), so that bounds on different axes
        never share an input by a coincidence of their values."""
        if isinstance(value, Dim):  # computed in the graph already
            return value
        key = (axis, int(value))
        got = self.bounds.get(key)
        if got is None:
            name = self.g.declare(self.g.fresh("at"), TensorProto.INT64, (1,))
            got = self.bounds[key] = (name, np.array([value], np.int64))
        return Dim(value, ("value", got[0]))

    def cache_rows(self, t: OnnxTensor, lo: int, hi: int) -> str:
        """Rows [lo, hi) of a cache as this pass's writes so far left them, the bounds
        graph inputs (`slice_bound`)."""
        assert t.host is not None
        seen = t.seen if t.ctx is self and t.seen >= 0 else len(self.writes)
        writes = self._writes_to(t.host, seen)
        direct = all(w.ids.name in self._input_index and not w.columns for w in writes)
        g = self.g
        cells = ("cells", t.shape[0])
        start, stop = self.slice_bound(cells, lo), self.slice_bound(cells, hi)
        if direct and t.heads_first:  # (1, H, cells, D): the rows, then (rows, H, D)
            v = g.op("Slice", [self._bind(t), g.const([start]), g.const([stop]), g.const([2])])
            v = g.op("Transpose", [g.op("Squeeze", [v, g.const([0])])], perm=[1, 0, 2])
        else:
            src = self._bind(t) if direct else self._cache_value(t, seen)
            v = g.op("Slice", [src, g.const([start]), g.const([stop]), g.const([0])])
        if not direct:
            return v
        for w in writes:
            assert w.ids.name is not None
            self.checks.append((self._input_index[w.ids.name], int(lo), int(hi)))
            idx = g.op("Sub", [w.ids64, g.const([start])])
            v = g.op("ScatterND", [v, g.op("Unsqueeze", [idx, g.const([-1])]), w.rows])
        return v

    def write(
        self, cache: OnnxTensor, ids: OnnxTensor, src: OnnxTensor, columns: bool = False
    ) -> OnnxTensor:
        """Rows (or, `columns`, last-axis entries) `ids` of a cache set to src's values."""
        assert cache.host is not None
        n = ids.shape[0]
        if columns:  # (..., T) -> (T, ...): written like rows of the cache's transpose
            shape = (n, *cache.shape[:-1])
            perm = [len(shape) - 1, *range(len(shape) - 1)]
            rows = self.g.op("Transpose", [self.f32(src)], perm=perm)
        else:
            shape = (n, *cache.shape[1:])
            rows = self.g.op("Reshape", [self.f32(src), self.g.const(list(shape))])
        if cache._dtype != DType.F32:
            rows = self.g.op("Cast", [rows], to=ELEM[cache._dtype])
        self._bind(cache)  # the cache is the session's, written or not
        self.writes.append(Write(cache.host, ids, self.i64(ids), rows, shape, columns,
                                 heads_first=cache.heads_first,
                                 rotated=None if columns else src.rotated))  # fmt: skip
        return OnnxTensor(rows, shape, cache._dtype, self)

    # ---- the Context contract -----------------------------------------------------------
    def input(self, array: np.ndarray | Sequence[Any], dtype: DType = DType.F32) -> OnnxTensor:
        stored = _INPUT.get(dtype, DType.F32)
        host = np.ascontiguousarray(array, dtype=NP[stored])
        name = self.g.fresh("in")
        shape = tuple(Dim(n, ("shape", name, i)) for i, n in enumerate(host.shape))
        self.g.declare(name, ELEM[stored], shape)
        self._input_index[name] = len(self.inputs)
        self.inputs.append((name, host))
        t = OnnxTensor(name, shape, stored, self)
        return t if stored == dtype or dtype not in (DType.BF16,) else t.cast(dtype)

    def attach(self, t: OnnxTensor) -> OnnxTensor:
        if t.kind == "cache":
            return OnnxTensor(None, t.shape, t._dtype, self, t.host, "cache", len(self.writes))
        if t.kind == "weight":  # read through `val` when used (a quantized one may stay so)
            out = OnnxTensor(None, t.shape, t._dtype, self, t.host, t.kind)
            out.gguf_dtype, out.q, out.wname = t.gguf_dtype, t.q, t.wname
            return out
        out = OnnxTensor(self.val(t), t.shape, t._dtype, self, t.host, t.kind)
        return out

    def forward(self, *tensors: OnnxTensor) -> None:
        """Nothing to do: every write is an output of the graph, forwarded or not."""

    def compute(self, *outputs: OnnxTensor) -> list[np.ndarray]:
        g = self.g
        n0 = len(g.nodes)  # the output nodes below are this compute's only
        outs: list[tuple[str, int, tuple[int, ...]]] = []
        for t in outputs:
            v = self._cast_to(t, TensorProto.INT32 if t._dtype == DType.I32 else TensorProto.FLOAT)
            name = g.fresh("out")
            g.nodes.append(_identity(v, name))
            outs.append((name, TensorProto.INT32 if t._dtype == DType.I32 else TensorProto.FLOAT,
                         t.shape))  # fmt: skip
        writes = []
        for w in self.writes:
            if w.in_place:  # the graph stores it (fused.py): nothing for the host to do
                continue
            at = len(outs)
            name = g.fresh("wrote")
            g.nodes.append(_identity(w.rows, name))
            outs.append((name, ELEM[_dtype_of(w.buf)], w.shape))
            ids_in = self._input_index.get(w.ids.name or "", -1)
            ids_out = -1
            if ids_in < 0:  # computed indices: the host needs their values
                ids_out = len(outs)
                name = g.fresh("ids")
                g.nodes.append(_identity(w.ids64, name))
                outs.append((name, TensorProto.INT64, (w.ids.shape[0],)))
            # the host stores into the cache in its (cells, ...) order: a view of the array
            target = w.buf[0].swapaxes(0, 1) if w.heads_first else w.buf
            writes.append((target, at, ids_in, ids_out, w.columns))
        aliased = [(name, ELEM[_dtype_of(self.bound[src])], self.bound[src].shape)
                   for name, src in self.aliases.items()]  # fmt: skip
        model = g.model(outs + aliased).SerializeToString()
        del g.nodes[n0:]
        key = hashlib.sha1(model).hexdigest()
        session = self.backend.session(key, model, self.bound, g.externals, self.aliases)
        np_out = {TensorProto.FLOAT: np.float32, TensorProto.INT32: np.int32,
                  TensorProto.FLOAT16: np.float16, TensorProto.INT64: np.int64}  # fmt: skip
        self.plan = Plan(
            session,
            [n for n, _ in self.inputs] + [n for n, _ in self.bounds.values()],
            [(n, s, np_out[e]) for n, e, s in outs],
            len(outputs),
            writes,
            list(dict.fromkeys(self.checks)),  # each layer's K and V write the same ids
            [a for _, a in self.bounds.values()],
            list(dict.fromkeys(self.in_place)),
        )
        return self._run([a for _, a in self.inputs], copy=True)

    # ---- GraphReuse -----------------------------------------------------------------------
    def keep(self) -> None:
        """Nothing to set aside: each session has its own memory (and output buffers)."""

    def rerun(self, *arrays: np.ndarray | Sequence[Any], copy: bool = True) -> list[np.ndarray]:
        """The outputs of the last compute's session for new host inputs (one array per
        `input` call, in call order, each of the shape it had): no Python per op.
        `copy=False`: read-only views of this context's output buffers, which the next run
        overwrites."""
        assert self.plan is not None, "rerun before compute"
        assert len(arrays) == len(self.inputs), (
            f"rerun: {len(arrays)} arrays for {len(self.inputs)} inputs"
        )
        hosts = []
        for i, (array, (_, old)) in enumerate(zip(arrays, self.inputs, strict=True)):
            a = np.ascontiguousarray(array, dtype=old.dtype)
            assert a.shape == old.shape, f"rerun: input {i} is {a.shape}, was {old.shape}"
            hosts.append(a)
        return self._run(hosts, copy)

    def _run(self, hosts: list[np.ndarray], copy: bool) -> list[np.ndarray]:
        plan = self.plan
        assert plan is not None
        for i, lo, hi in plan.checks:
            ids = hosts[i]
            if ids.size and (int(ids.min()) < lo or int(ids.max()) >= hi):
                raise BackendError(
                    f"onnx: cache rows {ids.tolist()} written outside the rows [{lo}, {hi}) "
                    "read in the same pass"
                )
        for mask_in, cell_in in plan.in_place:
            cell = int(hosts[cell_in][0])
            if np.isfinite(hosts[mask_in][0, cell + 1 :]).any():
                raise BackendError(
                    f"onnx: cell {cell} is written in place while the step sees cells after "
                    "it, which in-place attention cannot attend (HERD_ONNX_KV_IN_PLACE=0 "
                    "turns it off)"
                )
        if not plan.host:
            plan.host = [np.empty(s, dt) for _, s, dt in plan.outputs]
        for h in plan.host:
            h.flags.writeable = True
        plan.session.run(plan.inputs, hosts + plan.bounds, [n for n, _, _ in plan.outputs],
                         plan.host)  # fmt: skip
        where: dict[tuple[int, int], Any] = {}  # every layer's K and V share one index
        for buf, at, ids_in, ids_out, columns in plan.writes:
            at_ids = where.get((ids_in, ids_out))
            if at_ids is None:
                ids = hosts[ids_in] if ids_in >= 0 else plan.host[ids_out]
                at_ids = where[ids_in, ids_out] = _rows(ids)
            if columns:
                buf[..., at_ids] = np.moveaxis(plan.host[at], 0, -1)
            else:
                buf[at_ids] = plan.host[at]
        results = plan.host[: plan.n_results]
        if copy:
            return [h.copy() for h in results]
        for h in results:
            h.flags.writeable = False
        return list(results)

    def close(self) -> None:
        self.plan = None
        self.inputs.clear()
        self.bound.clear()
        self.bounds.clear()
        self.writes.clear()
        self.aliases.clear()
        self.in_place.clear()

    def __enter__(self) -> OnnxContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rows(ids: np.ndarray) -> slice | np.ndarray:
    """Written rows as a slice where they are consecutive (a decode step's one cell, a
    prompt's run): NumPy copies into a slice several times faster than through an index
    array, and a decode step writes 60 times (SmolLM2's K and V)."""
    n = len(ids)
    if n and int(ids[-1]) - int(ids[0]) == n - 1 and (n < 3 or bool(np.all(np.diff(ids) == 1))):
        return slice(int(ids[0]), int(ids[0]) + n)
    return ids


def _identity(src: str, dst: str) -> Any:
    from onnx import helper

    return helper.make_node("Identity", [src], [dst])


def _dtype_of(buf: np.ndarray) -> DType:
    return DType.F16 if buf.dtype == np.float16 else DType.F32
