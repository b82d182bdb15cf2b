"""ONNX Runtime backend: herd's models recorded as ONNX graphs and run by `onnxruntime`.

A graph backend: a context records the pass as ONNX nodes, and `compute` runs it in an
`InferenceSession` from this backend's session cache, one per distinct graph. Graphs are
shape-polymorphic (dims.py): token and cell counts are symbolic dims, the attended cache
range a graph input, so one session serves every prompt length and context length, one
per structurally different pass (a prompt, whose last layer keeps its output rows only; a
decode step; a prompt over 128 tokens, attended in blocks). The KV cache and float
weights are graph inputs bound from this backend's NumPy memory through IOBinding, never
copied into a session.

GGUF weights whose blocks map exactly (Q4_0/1, Q5_0/1, Q8_0, Q2_K-Q6_K, IQ4_NL/XS) stay in
them: `MatMulNBits` for `linear`, `GatherBlockQuantized` for embedding rows (quant.py).
Those are initializers, not inputs: MatMulNBits prepacks only initializers, and ran 11x
slower on graph inputs (30 decode matmuls of 1536x576: 194 ms vs 17 ms). Every session reads
the backend's own arrays (`SessionOptions.add_initializer`, ORT's way to share an
initializer between sessions); `add_external_initializers` copied them into each (+197 MB a
session for 200 MB of weights), and is what an onnxruntime that refuses the shared form gets
(a log line). Each session still holds its own prepacked copy: ORT's Python API has no
shared prepacked-weights container; `MAX_SESSIONS` bounds them. Other types are dequantized
to float32 at load (`load_weight`).

The K/V cache is kept heads first in F32, (1, H, cells, D) for each layer's (cells, H, D),
so that a decoding row's attention reads and writes it in place (fused.py; ONNX has no
block types, so q8_0 and q4_0 are F32 too). `BackendOptions.onnx_kv_in_place=False`
(HERD_ONNX_KV_IN_PLACE=0) keeps it cells first in F16 (F32 when asked), every step's rows
copied in by the host, the layout `herd export onnx` writes.

Execution providers: `BackendOptions.onnx_providers` (HERD_ONNX_PROVIDERS, read by
envconfig), full names or short ones (cuda, dml, coreml, openvino, cpu); by default the
best one installed.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from herd.errors import BackendError, GGUFError, OutOfMemoryError, WeightError
from herd.gguf import GGUFFile
from herd.ml.backends.onnx import disk, fused, quant
from herd.ml.backends.onnx.context import OnnxContext
from herd.ml.backends.onnx.graph import EXTERNAL_LOCATION
from herd.ml.backends.onnx.tensor import OnnxTensor
from herd.ml.base import BackendOptions, CacheConfig, DeviceInfo, DType
from herd.ml.layout import size

log = logging.getLogger(__name__)

# attended cache cells are rounded to this: the runner reruns a decode graph as it is for
# up to 256 steps, then records it again (the same session: shapes are symbolic)
CACHE_PAD = 256
MAX_SESSIONS = 4  # sessions kept (least recently used dropped): each holds the weights
# the providers tried by default, best first
PREFERRED = (
    "CUDAExecutionProvider",
    "DmlExecutionProvider",
    "CoreMLExecutionProvider",
    "OpenVINOExecutionProvider",
    "CPUExecutionProvider",
)
_SHORT = {p.removesuffix("ExecutionProvider").lower(): p for p in PREFERRED} | {
    "directml": "DmlExecutionProvider"
}
_WEIGHT_DTYPE = {
    Q.F32: DType.F32,
    Q.F16: DType.F16,
    Q.BF16: DType.BF16,
    Q.I32: DType.I32,
    Q.Q8_0: DType.Q8_0,
    Q.Q4_0: DType.Q4_0,
}
_DIRECT = {Q.F32: np.float32, Q.F16: np.float16, Q.I32: np.int32}
_CACHE_AS_F16 = (DType.F16, DType.Q8_0, DType.Q4_0)
# GGUF types kept in their blocks (MatMulNBits, with int8 activations as llama.cpp's q8 dot
# products; offsets (Q4_1, Q5_1, Q4_K, Q5_K) on the block sums of x as rounded, quant.py)
KEPT_QUANTIZED = quant.MAPPED_TYPES


def providers(asked: Sequence[str] = ()) -> list[str]:
    """The execution providers to run on: those asked for (full or short names), else the
    best installed."""
    available = ort.get_available_providers()
    if not asked:
        return [next(p for p in PREFERRED if p in available or p == "CPUExecutionProvider")]
    chosen = []
    for item in asked:
        name = _SHORT.get(item.lower(), item)
        if name not in available:
            raise BackendError(
                f"onnx: execution provider {item!r} is not installed; available: "
                + ", ".join(available)
            )
        chosen.append(name)
    return chosen


def _placeholder() -> str:
    """A folder holding an empty file by the name graph.py gives external initializers
    (made once per process, removed at its exit; made again if something removed it)."""
    global _PLACEHOLDER
    if _PLACEHOLDER is None or not os.path.isdir(_PLACEHOLDER):
        _PLACEHOLDER = tempfile.mkdtemp(prefix="herd-onnx-")
        atexit.register(shutil.rmtree, _PLACEHOLDER, True)
    Path(_PLACEHOLDER, EXTERNAL_LOCATION).touch()
    return _PLACEHOLDER


_PLACEHOLDER: str | None = None


def load_weight(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    """A GGUF tensor as the array a graph reads: float32 (int32 for I32)."""
    if qtype in _DIRECT:
        a = raw.view(_DIRECT[qtype]).reshape(shape)
        return a.copy() if a.dtype == np.int32 else a.astype(np.float32)
    rows = raw.reshape(math.prod(shape) // shape[-1], -1)
    return np.asarray(dequantize(rows, qtype), dtype=np.float32).reshape(shape)


class Session:
    """An InferenceSession with the weights and caches it reads bound once."""

    def __init__(
        self,
        sess: ort.InferenceSession,
        bound: dict[str, np.ndarray],
        externals: list[Any],
        aliases: dict[str, str],
    ) -> None:
        self.sess, self.externals = sess, externals  # what the session may still point at
        self.io = sess.io_binding()
        self._outputs: list[np.ndarray] | None = None  # the buffers its outputs are bound to
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in bound.values()]
        by_name = dict(zip(bound, self.values, strict=True))
        for name, v in by_name.items():
            self.io.bind_ortvalue_input(name, v)  # the backend's memory, no copy
        for out, src in aliases.items():  # written in place: the output is the input's memory
            self.io.bind_ortvalue_output(out, by_name[src])

    def run(self, names: list[str], arrays: list[np.ndarray], outs: list[str],
            buffers: list[np.ndarray]) -> None:  # fmt: skip
        io = self.io
        for name, a in zip(names, arrays, strict=True):
            io.bind_cpu_input(name, a)
        if buffers is not self._outputs:  # bindings persist: a rerun into the same buffers
            for name, b in zip(outs, buffers, strict=True):  # binds none (60 a decode step)
                io.bind_output(name, "cpu", 0, b.dtype, list(b.shape), b.ctypes.data)
            self._outputs = buffers
        self.sess.run_with_iobinding(io)


class OnnxBackend:
    """Weights as float32 NumPy arrays, persistent tensors, and the sessions made so far.

    `sessions_created`: how many InferenceSessions this backend has built."""

    name = "onnx"

    def __init__(self, gguf: GGUFFile, options: BackendOptions) -> None:
        self.gguf, self.options = gguf, options
        self.providers = providers(options.onnx_providers)
        self.threads = options.num_thread or psutil.cpu_count(logical=False) or 1
        self.gpus: list[DeviceInfo] = []  # outputs always land in host memory
        self._weights: dict[str, OnnxTensor] = {}
        self._names: dict[int, str] = {}  # id of a weight/cache array -> its graph input name
        self._keep: list[np.ndarray] = []  # arrays named above, so their ids stay theirs
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._dense: dict[str, np.ndarray] = {}
        self._said: set[Q] = set()  # types logged as dequantized
        self._values: dict[int, Any] = {}  # id of an external initializer -> its OrtValue
        # GGUF blocks that map exactly stay quantized (quant.py); onnx_dequantize: every
        # weight float32 (a reference for the mapping, and what runs without it)
        self.quantized = not options.onnx_dequantize
        # K/V caches heads first, F32: decoding rows attend and write them in place (fused.py),
        # where this onnxruntime and provider run that as fused.py asks
        self.in_place = options.onnx_kv_in_place and fused.runs_in_place(tuple(self.providers))
        self.sessions_created = 0
        self.share = True  # sessions read the quantized initializers from our arrays
        self._converting: dict[str, Future[quant.NBits | None]] | None = None  # _blocks
        self._warned_cache = False
        _validate(gguf)
        self._cache_config = CacheConfig(
            v_transposed=False, pad=CACHE_PAD, mask_dtype=DType.F32, flash_attention=False
        )
        log.info("onnx: onnxruntime %s on %s, %d threads", ort.__version__,
                 ", ".join(self.providers), self.threads)  # fmt: skip

    # ---- weights, caches and sessions ------------------------------------------------
    def input_name(self, a: np.ndarray) -> str:
        name = self._names.get(id(a))
        if name is None:
            name = self._names[id(a)] = f"kv{len(self._names)}"
            self._keep.append(a)
        return name

    def session(
        self,
        key: str,
        model: bytes,
        bound: dict[str, np.ndarray],
        externals: dict[str, np.ndarray],
        aliases: dict[str, str] | None = None,
    ) -> Session:
        s = self._sessions.get(key)
        if s is not None:
            self._sessions.move_to_end(key)
            return s
        values = [self._ortvalue(a) for a in externals.values()]
        try:
            sess = self._build(key, model, externals, values, self.share)
        except Exception as e:  # ORT raises its own types: a graph it cannot run, or
            if not (externals and self.share):  # shared initializers it does not take
                raise BackendError(f"onnx: cannot build a session for this graph: {e}") from None
            try:
                sess = self._build(key, model, externals, values, False)
            except Exception:
                raise BackendError(f"onnx: cannot build a session for this graph: {e}") from None
            self.share = False  # the copies built: they are what this onnxruntime takes
            log.info("onnx: this onnxruntime does not share initializers between sessions "
                     "(%s); each copies the weights", str(e)[:200])  # fmt: skip
        s = self._sessions[key] = Session(sess, dict(bound), values, dict(aliases or {}))
        self.sessions_created += 1
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return s

    def _build(self, key: str, model: bytes, externals: dict[str, np.ndarray],
               values: list[Any], share: bool) -> ort.InferenceSession:  # fmt: skip
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if externals and share:
            for name, v in zip(externals, values, strict=True):
                so.add_initializer(name, v)  # the session reads our memory: no copy
            # the model declares them as external data in a file (graph.py), which ORT
            # checks is there before it sees they are given: an empty one is
            so.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", _placeholder()
            )
        elif externals:
            so.add_external_initializers(list(externals), values)
        cached = self.disk_cache()  # disk.py: optimized once
        if cached is None:
            return ort.InferenceSession(model, so, providers=self.providers)
        return cached.session(key, model, so, externals)

    def disk_cache(self) -> disk.DiskCache | None:
        """Where this backend's optimized sessions are kept (one per model file, providers
        and folder in a process); None when options.onnx_cache is off."""
        return disk.for_model(self.gguf.path, self.providers, disk.cache_root(self.options))

    def _ortvalue(self, a: np.ndarray) -> Any:
        v = self._values.get(id(a))
        if v is None:
            v = self._values[id(a)] = ort.OrtValue.ortvalue_from_numpy(a)
            self._keep.append(a)
        return v

    def dense(self, name: str) -> np.ndarray:
        """A weight as float32 (int32 for I32), dequantized once."""
        a = self._dense.get(name)
        if a is None:
            info = self.gguf.tensors[name]
            try:
                a = load_weight(self.gguf.raw(name), info.type, tuple(info.shape))
            except (NotImplementedError, KeyError, ValueError, GGUFError) as e:
                raise GGUFError(
                    f"{self.gguf.path}: tensor {name} has type {info.type.name}, which the "
                    f"onnx backend cannot load ({e or type(e).__name__})"
                ) from None
            self._dense[name] = a
            self._names[id(a)] = "w:" + name
            self._keep.append(a)
        return a

    # ---- the Backend contract ----------------------------------------------------------
    def stack(self, names: Sequence[str]) -> None:
        """Not stacked here: `linear.py` merges linears of one x while recording."""
        return None

    def has_weight(self, name: str) -> bool:
        return name in self.gguf.tensors

    def weight(self, name: str) -> OnnxTensor:
        if name not in self.gguf.tensors:  # a model asking for what the file lacks
            raise WeightError(f"{name}: missing from the model file")
        t = self._weights.get(name)
        if t is None:
            info = self.gguf.tensors[name]
            shape = tuple(info.shape)
            q = None
            if self.quantized and info.type in KEPT_QUANTIZED:
                q = self._blocks(name)
            elif info.type not in _DIRECT and info.type not in self._said:
                self._said.add(info.type)
                log.info("onnx: %s weights dequantized to float32 at load", info.type.name)
            # quantized: dense only if an op needs floats (`dense`, on first use)
            a = None if q is not None else self.dense(name)
            self.gguf.release(info.offset, info.nbytes)  # copied: the mapping's pages can go
            dtype = DType.I32 if a is not None and a.dtype == np.int32 else DType.F32
            t = OnnxTensor(None, shape, dtype, None, a, "weight")
            t.gguf_dtype = _WEIGHT_DTYPE.get(info.type, DType.OTHER)
            t.q, t.wname = q, name
            self._weights[name] = t
        return t

    def _blocks(self, name: str) -> quant.NBits | None:
        """Weight `name` in MatMulNBits' form. The first weight asked for starts every 2-D
        tensor that stays quantized on `threads` threads (NumPy lets go of the GIL): the
        model asks for them one by one, and the conversion is most of a load (SmolLM2: 0.2 s
        on one thread, 0.11 s on two). GGUFError for bytes that do not fit, when asked."""
        if self._converting is None:
            self.gguf.buffer()  # mapped here, once, not by two threads at once
            todo = [n for n, i in self.gguf.tensors.items()
                    if i.type in KEPT_QUANTIZED and len(i.shape) == 2]  # fmt: skip
            pool = ThreadPoolExecutor(self.threads, thread_name_prefix="herd-onnx-load")
            self._converting = {n: pool.submit(self._convert, n) for n in todo}
            pool.shutdown(wait=False)  # its threads end with the queue
        job = self._converting.pop(name, None)
        return self._convert(name) if job is None else job.result()

    def _convert(self, name: str) -> quant.NBits | None:
        info = self.gguf.tensors[name]
        return quant.matmul_nbits(self.gguf.raw(name), info.type, tuple(info.shape))

    def keep_blocks(self, name: str, q: quant.NBits) -> None:
        """Weight `name`'s blocks are now `q` (a view of stacked ones, linear.py): its own
        arrays go, unless a session holds them."""
        self._weights[name].q = q

    def alloc(self, shape: tuple[int, ...], dtype: DType, layer: int | None = None) -> OnnxTensor:
        # a K/V cache's (cells, H, D) kept as (1, H, cells, D), GroupQueryAttention's past,
        # in F32: its CPU kernel took 2.8x as long on F16 (30 layers over 300 cells)
        kv = self.in_place and len(shape) == 3 and dtype != DType.I32
        store = (DType.F32 if kv else DType.F16 if dtype in _CACHE_AS_F16 else
                 DType.I32 if dtype == DType.I32 else DType.F32)  # fmt: skip
        if dtype in _CACHE_AS_F16 and store != dtype and not self._warned_cache:
            log.info("onnx: the %s KV cache is kept as %s", dtype.name, store.name)
            self._warned_cache = True
        np_type = {DType.F16: np.float16, DType.I32: np.int32}.get(store, np.float32)
        nbytes = math.prod(shape) * np.dtype(np_type).itemsize
        free = _cpu_info().free_memory
        if nbytes > free:
            where = "" if layer is None else f" (layer {layer})"
            raise OutOfMemoryError(
                f"{dtype.name} tensor {tuple(shape)}{where} needs {size(nbytes)}, but "
                f"{size(free)} is available; lower num_ctx"
            )
        a = np.zeros((1, shape[1], shape[0], shape[2]) if kv else shape, np_type)
        return OnnxTensor(None, tuple(shape), store, None, a, "cache")

    def new_context(self) -> OnnxContext:
        # by its first pass a model has asked for its weights: what the file holds beyond
        # them (converted by `_blocks` all the same) is not kept
        self._drop_conversions()
        return OnnxContext(self)

    def _drop_conversions(self) -> None:
        for job in (self._converting or {}).values():
            job.cancel()  # those not started; the rest end on their own, unread
        if self._converting is not None:
            self._converting = {}

    def cache_config(self) -> CacheConfig:
        return self._cache_config

    def devices(self) -> list[DeviceInfo]:
        return _devices(self.providers)

    def close(self) -> None:
        self._drop_conversions()
        self._sessions.clear()
        self._weights.clear()
        self._names.clear()
        self._dense.clear()
        self._values.clear()
        self._keep.clear()


def default_devices(options: BackendOptions | None = None) -> list[DeviceInfo]:
    """The device a model runs on by default: the first of the providers asked for
    (`BackendOptions.onnx_providers`), else the best installed."""
    return _devices(providers(options.onnx_providers if options else ()))


def _devices(provs: list[str]) -> list[DeviceInfo]:
    cpu = _cpu_info()
    first = provs[0] if provs else "CPUExecutionProvider"
    if first == "CPUExecutionProvider":
        return [cpu]
    short = first.removesuffix("ExecutionProvider")
    # ORT reports no device memory: the system's, as for unified memory
    return [DeviceInfo(f"{short} (onnxruntime)", "gpu", cpu.total_memory, cpu.free_memory), cpu]


def _cpu_info() -> DeviceInfo:
    vm = psutil.virtual_memory()
    return DeviceInfo("cpu (onnxruntime)", "cpu", int(vm.total), int(vm.available))


def _validate(gguf: GGUFFile) -> None:
    """Refuse, before any weight is read, a tensor past the end of the file."""
    for info in gguf.tensors.values():
        if info.offset < 0 or info.offset + info.nbytes > gguf.file_size:
            raise GGUFError(
                f"{gguf.path}: tensor {info.name} runs past the end of the file (truncated "
                f"download?): needs byte {info.offset + info.nbytes}, file has {gguf.file_size}"
            )


def open_onnx(gguf: GGUFFile, options: BackendOptions | None = None) -> OnnxBackend:
    if not gguf.tensors:
        raise BackendError(f"{gguf.path}: no tensors")
    return OnnxBackend(gguf, options or BackendOptions())
