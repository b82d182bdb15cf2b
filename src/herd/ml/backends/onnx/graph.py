"""The ONNX graph a context records: nodes, small constants, and how it becomes a model.

Names are made from a counter, so two passes that record the same ops make
byte-identical models: the serialized model (without any weight, which are graph inputs)
is the session cache's key. Sizes that come from the inputs (`Dim`, dims.py) are declared
as symbolic dims and computed in the graph, so passes over different token and cell
counts make the same model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from herd.ml.backends.onnx.dims import Dim, DimValues, symbolic
from herd.ml.base import DType

OPSET = 20  # Gelu(approximate="tanh") and ReduceMean with axes as an input
MS_DOMAIN = "com.microsoft"
EXTERNAL_LOCATION = "herd-weights"  # the file external initializers name (never read)

# element types of graph values
ELEM = {
    DType.F32: TensorProto.FLOAT,
    DType.F16: TensorProto.FLOAT16,
    DType.BF16: TensorProto.BFLOAT16,
    DType.I32: TensorProto.INT32,
}
NP = {DType.F32: np.float32, DType.F16: np.float16, DType.I32: np.int32}


class Graph:
    """Nodes in record order, embedded constants, and the graph's inputs."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.consts: list[onnx.TensorProto] = []
        self._const_names: dict[tuple[str, bytes, tuple[int, ...]], str] = {}
        # graph inputs in declaration order: name -> (elem type, shape)
        self.inputs: dict[str, tuple[int, tuple[int, ...]]] = {}
        # initializers the model names but does not hold (the session is given them)
        self.externals: dict[str, np.ndarray] = {}
        self._declared: list[onnx.TensorProto] = []
        self.n = 0
        self.dims = DimValues(self.op, self._const)

    def fresh(self, prefix: str = "v") -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "",
           **attrs: Any) -> Any:  # fmt: skip
        """Record a node; its output name (a list of them when n_out > 1)."""
        outs = [self.fresh() for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        """A small constant (shapes, axes, rope frequencies), embedded once per value; an
        int64 list (or size) holding a Dim is computed in the graph instead."""
        if dtype is np.int64 and symbolic(value):
            if isinstance(value, Dim):  # a scalar
                return self.op("Squeeze", [self.dims.one(value.expr), self._const([0])])
            return self.dims.shape(list(value))
        return self._const(value, dtype)

    def _const(self, value: Any, dtype: Any = np.int64) -> str:
        a = np.ascontiguousarray(value, dtype=dtype)
        key = (a.dtype.str, a.tobytes(), a.shape)
        name = self._const_names.get(key)
        if name is None:
            name = self._const_names[key] = self.fresh("c")
            self.consts.append(numpy_helper.from_array(a, name))
        return name

    def named_const(self, name: str, a: np.ndarray) -> None:
        """A small constant under a given name (once)."""
        if name not in self._const_names.values():
            self._const_names[("named", name.encode(), ())] = name
            self.consts.append(numpy_helper.from_array(np.ascontiguousarray(a), name))

    def external(self, name: str, a: np.ndarray) -> None:
        """An initializer whose data the session gets from `a` (add_external_initializers),
        declared in the model with its type and shape only."""
        if name in self.externals:
            return
        self.externals[name] = a
        t = TensorProto()
        t.name, t.data_type = name, helper.np_dtype_to_tensor_dtype(a.dtype)
        t.dims.extend(a.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", EXTERNAL_LOCATION), ("offset", "0"), ("length", str(a.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self._declared.append(t)

    def declare(self, name: str, elem: int, shape: tuple[int, ...]) -> str:
        self.inputs[name] = (elem, tuple(shape))
        return name

    def model(self, outputs: list[tuple[str, int, tuple[int, ...]]]) -> onnx.ModelProto:
        """The recorded graph with these (name, elem type, shape) outputs, chains of
        Reshapes folded and the nodes none of them needs left out: ORT runs every node it
        is given, at a cost per node that a decode step of a small model notices (SmolLM2:
        953 nodes a step, 738 folded, decode 1.10x; a decoding row's attention in place
        leaves the cache reads made for the composed one unused)."""
        g = helper.make_graph(
            _needed(
                _pack_qkv(_fold_reshapes(self.nodes, self.consts), self._const),
                [n for n, _, _ in outputs],
            ),
            "herd",
            [helper.make_tensor_value_info(n, e, _dims(s)) for n, (e, s) in self.inputs.items()],
            [helper.make_tensor_value_info(n, e, _dims(s)) for n, e, s in outputs],
            initializer=self.consts + self._declared,
        )
        m = helper.make_model(
            g, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        )
        m.ir_version = 10
        return m


def _fold_reshapes(
    nodes: list[onnx.NodeProto], consts: list[onnx.TensorProto]
) -> list[onnx.NodeProto]:
    """Each Reshape to a constant shape reads the value before a chain of Reshapes, not the
    chain's end: Reshape(Reshape(x, a), b) is Reshape(x, b) where b holds no 0 (ONNX's
    "copy this dim", which would copy the intermediate's). The chain's Reshapes that
    nothing else reads are then left out (`_needed`)."""
    fixed = {  # constant shapes without a 0
        t.name
        for t in consts
        if t.data_type == TensorProto.INT64 and len(t.dims) == 1
        and (numpy_helper.to_array(t) != 0).all()
    }  # fmt: skip
    source: dict[str, str] = {}  # a Reshape's output -> the value its chain starts from
    out = []
    for node in nodes:
        if node.op_type == "Reshape" and not node.domain and not node.attribute:
            src = source.get(node.input[0], node.input[0])
            if node.input[1] in fixed and src != node.input[0]:
                node = helper.make_node("Reshape", [src, node.input[1]], list(node.output))
            source[node.output[0]] = src
        out.append(node)
    return out


def _pack_qkv(nodes: list[onnx.NodeProto], const: Any) -> list[onnx.NodeProto]:
    """A GroupQueryAttention whose query, key and value are Reshapes of one Split's three
    outputs, in that order, along the last axis (the merged q/k/v product, linear.py)
    reads that product itself, packed, as its kernel allows: the Split and the three
    Reshapes are then left out (`_needed`). In-place attention is a decoding row's, so the
    product is (1, N) and its packed form (1, 1, N)."""
    made = {o: n for n in nodes for o in n.output}
    out = []
    for node in nodes:
        split = _split_of(node, made) if node.op_type == "GroupQueryAttention" else None
        if split is not None:
            packed = node.output[0] + ".qkv"
            out.append(helper.make_node("Reshape", [split.input[0], const([1, 1, -1])], [packed]))
            gqa = helper.make_node(node.op_type, [packed, "", "", *node.input[3:]],
                                   list(node.output), domain=node.domain)  # fmt: skip
            gqa.attribute.extend(node.attribute)
            node = gqa
        out.append(node)
    return out


def _split_of(gqa: onnx.NodeProto, made: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    """The Split along the last axis whose outputs 0, 1, 2 reach gqa's query, key and
    value through one Reshape each; None where they do not."""
    qkv = gqa.input[:3]
    if len(qkv) < 3 or not all(qkv):
        return None  # packed already
    shaped = [made.get(v) for v in qkv]
    if not all(r is not None and r.op_type == "Reshape" for r in shaped):
        return None
    parts = [r.input[0] for r in shaped if r is not None]
    split = made.get(parts[0])
    if split is None or split.op_type != "Split" or list(split.output) != parts:
        return None
    return split if [a.i for a in split.attribute if a.name == "axis"] == [-1] else None


def _needed(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """The nodes the outputs depend on, in record order."""
    want = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(o in want for o in node.output):
            keep.append(node)
            want.update(node.input)
    return keep[::-1]


def _dims(shape: tuple[int, ...]) -> list[int | str | None]:
    """A declared shape: an input's own Dims by a name of their own (dim_param), other
    Dims unnamed, plain sizes as they are."""
    out: list[int | str | None] = []
    for d in shape:
        if not isinstance(d, Dim):
            out.append(int(d))
        elif d.expr[0] == "shape":
            out.append(f"{d.expr[1]}_{d.expr[2]}")
        else:
            out.append(None)
    return out
