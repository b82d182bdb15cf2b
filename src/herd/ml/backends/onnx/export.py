"""A recorded pass as a standalone ONNX model: what `herd export onnx` writes.

The backend's graphs read their weights from the backend (float ones bound as graph
inputs, quantized ones handed to each session as external initializers). An exported
model holds them all as initializers, their bytes in one external data file beside it,
so plain `onnxruntime` runs it. The KV cache stays a set of graph inputs, and each cache
write stays an output (the rows written this step), which the caller stores back into
its own buffers at the written cells, as the backend does after each run.

`capture` runs the pass once through the backend (the model as herd runs it) and keeps
the serialized graph; `write` turns it into the standalone files under new names.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from herd.errors import HerdError, UnsupportedModelError
from herd.ml.backends.onnx.backend import OnnxBackend
from herd.ml.backends.onnx.context import OnnxContext
from herd.ml.backends.onnx.tensor import OnnxTensor

ALIGN = 64  # each weight's offset in the data file (ORT maps it; aligned reads)
MODEL_FILE, DATA_FILE, IO_FILE = "model.onnx", "model.onnx.data", "io.json"
_NP_NAME = {np.float32: "float32", np.float16: "float16", np.int32: "int32", np.int64: "int64"}


@dataclass
class Captured:
    """One compute's graph and what the backend gave its session."""

    model: bytes
    bound: dict[str, np.ndarray]  # graph input -> the weight or cache array it reads
    externals: dict[str, np.ndarray]  # initializer -> its data
    plan: Any  # the context's Plan: input order, outputs, written rows
    results: list[np.ndarray] = field(default_factory=list)  # what the pass computed


def capture(backend: OnnxBackend, ctx: OnnxContext, *outputs: OnnxTensor) -> Captured:
    """Compute `outputs` in `ctx` as usual, keeping the graph the session was made from."""
    seen: list[tuple[bytes, dict[str, np.ndarray], dict[str, np.ndarray]]] = []
    real = backend.session

    def keep(key: str, model: bytes, bound: dict[str, np.ndarray],
             externals: dict[str, np.ndarray],
             aliases: dict[str, str] | None = None) -> Any:  # fmt: skip
        assert not aliases, "an exported step writes no cache in place"
        seen.append((model, dict(bound), dict(externals)))
        return real(key, model, bound, externals, aliases)

    backend.session = keep  # type: ignore[method-assign]
    try:
        results = ctx.compute(*outputs)
    finally:
        del backend.session  # the class's method again
    assert len(seen) == 1 and ctx.plan is not None, "one compute, one graph"
    model, bound, externals = seen[0]
    return Captured(model, bound, externals, ctx.plan, results)


def fixed_inputs(plan: Any) -> dict[str, np.ndarray]:
    """Inputs the context feeds itself (slice bounds, where a graph serves every cache
    range: `Plan.bounds`, after the host inputs): the export fixes them to the values of
    the captured step, as constants."""
    bounds = list(getattr(plan, "bounds", None) or [])
    if not bounds:
        return {}
    names = plan.inputs[len(plan.inputs) - len(bounds) :]
    return dict(zip(names, bounds, strict=True))


@dataclass
class Names:
    """What the exporter calls each graph value, and what the JSON says of it."""

    inputs: dict[str, dict[str, Any]]  # graph input -> {"name", "role", ...}
    outputs: dict[str, dict[str, Any]]  # graph output -> {"name", "role", ...}


def check(cap: Captured) -> None:
    """Refuse what a caller could not run step by step: cache rows written at indices
    the graph computes (the caller must know where to store them), or along a cache's
    last axis; ops outside ONNX and ORT's contrib domain."""
    for _buf, _at, ids_in, ids_out, columns in cap.plan.writes:
        if ids_in < 0 or ids_out >= 0:
            raise UnsupportedModelError(
                "onnx export: this architecture writes its cache at cells the graph "
                "computes, which the exported model's caller cannot know"
            )
        if columns:
            raise UnsupportedModelError(
                "onnx export: this architecture writes its cache by columns (a transposed "
                "V), which the exported model cannot express as rows to store"
            )
    m = onnx.load_from_string(cap.model)
    for node in m.graph.node:
        if node.domain not in ("", "ai.onnx", "com.microsoft"):
            raise UnsupportedModelError(
                f"onnx export: op {node.domain}.{node.op_type} has no ONNX Runtime kernel"
            )


def write(cap: Captured, names: Names, out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The standalone model, its weights and io.json into folder `out` (which exists and
    is empty: the caller renames it into place when whole); `check` first. Returns
    io.json's content."""
    m = onnx.load_from_string(cap.model)
    g = m.graph
    rename = {old: v["name"] for old, v in {**names.inputs, **names.outputs}.items()}
    weights = {n: a for n, a in cap.bound.items() if n not in names.inputs}
    fixed = fixed_inputs(cap.plan)
    kept = [i for i in g.input if i.name not in weights and i.name not in fixed]
    del g.input[:]
    g.input.extend(kept)
    data = out / DATA_FILE
    # (address, bytes) -> (offset, the array, kept alive so no other takes its address):
    # initializers viewing the same memory point at one copy of it in the file, e.g. a tied
    # embedding table, gathered and multiplied by as the output head (Gemma 3: 189 MB)
    written: dict[tuple[int, int], tuple[int, np.ndarray]] = {}
    with open(data, "wb") as f:

        def put(name: str, a: np.ndarray) -> TensorProto:
            a = np.ascontiguousarray(a)
            key = (a.__array_interface__["data"][0], a.nbytes)
            if key not in written:
                f.write(b"\0" * (-f.tell() % ALIGN))
                written[key] = (f.tell(), a)
                f.write(memoryview(a.reshape(-1)).cast("B"))
            offset = written[key][0]
            t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(a.dtype))
            t.dims.extend(a.shape)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", DATA_FILE), ("offset", str(offset)),
                         ("length", str(a.nbytes))):  # fmt: skip
                e = t.external_data.add()
                e.key, e.value = k, v
            return t

        inits = []
        for t in g.initializer:
            if t.data_location == TensorProto.EXTERNAL and t.name in cap.externals:
                inits.append(put(t.name, cap.externals[t.name]))
            else:
                inits.append(t)
        inits += [put(n, a) for n, a in weights.items()]
        inits += [numpy_helper.from_array(np.asarray(a), n) for n, a in fixed.items()]
        del g.initializer[:]
        g.initializer.extend(inits)
    _rename(g, rename)
    m.producer_name, m.producer_version = "herd", str(meta.get("herd_version", ""))
    for k, v in (("herd", json.dumps(meta, sort_keys=True)),):
        p = m.metadata_props.add()
        p.key, p.value = k, v
    (out / MODEL_FILE).write_bytes(m.SerializeToString())
    io = {**meta, "model": MODEL_FILE, "weights": DATA_FILE,
          "inputs": _described(g.input, names.inputs, rename),
          "outputs": _described(g.output, names.outputs, rename)}  # fmt: skip
    (out / IO_FILE).write_text(json.dumps(io, indent=2) + "\n")
    return io


def _rename(g: onnx.GraphProto, rename: dict[str, str]) -> None:
    """Graph values under the exporter's names (inputs, outputs and every use of them)."""

    def new(name: str) -> str:
        return rename.get(name, name)

    for v in (*g.input, *g.output):
        v.name = new(v.name)
    for node in g.node:
        node.input[:] = [new(n) for n in node.input]
        node.output[:] = [new(n) for n in node.output]


def _described(values: Any, by_old: dict[str, dict[str, Any]],
               rename: dict[str, str]) -> list[dict[str, Any]]:  # fmt: skip
    by_new = {rename[old]: v for old, v in by_old.items()}
    rows = []
    for v in values:
        t = v.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        info = {k: x for k, x in by_new.get(v.name, {}).items() if k != "name"}
        rows.append({"name": v.name, "dtype": str(np.dtype(dtype)), "shape": shape, **info})
    return rows


def replace_dir(build: Callable[[Path], None], out: Path) -> None:
    """Make folder `out` with `build(tmp)`: built beside it and renamed into place (an
    existing `out` replaced only then), so it is never half-written."""
    if out.exists() and not out.is_dir():
        raise HerdError(f"{out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700: the export is for other programs
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["Captured", "Names", "capture", "check", "replace_dir", "write"]
