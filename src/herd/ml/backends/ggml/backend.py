"""ggml backend: quantized CPU kernels (and GPU builds) through ggml-python's libraries.

Weights stay in the memory-mapped GGUF file: one CPU backend buffer wraps the mapping and
every weight tensor points into it, in its own quantization type. Ops on tensors
(`tensor.py`) record nodes in a context (`context.py`), one no_alloc ggml context per
forward pass; `compute` builds the graph, lets the Placer (`placement.py`) place the
intermediates, copies the inputs in, runs it and copies the outputs out.

Devices (GPU builds, `devices.py`): `herd.ml.layout` decides which layers go to which GPU
(`num_gpu`) and checks that everything fits before anything is allocated. Offloaded weights
are copied into device buffers (the rest stays mapped), the KV cache of an offloaded layer
lives on its device, and ggml's backend scheduler splits each graph over [GPUs..., CPU].
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from herd.errors import BackendError, GGUFError, OutOfMemoryError, WeightError
from herd.gguf import GGUFFile
from herd.ml.backends.ggml import _lib as L
from herd.ml.backends.ggml._lib import TYPE_F32, ggml_mul_mat
from herd.ml.backends.ggml.context import GGMLContext, _host_view
from herd.ml.backends.ggml.devices import (
    GPU,
    Device,
    cpu_device,
    physical_cores,
    probe_devices,
    start_gpu,
)
from herd.ml.backends.ggml.dtypes import BLOCK, CONT, FLOAT, GTYPE, compute_types, ne, type_name
from herd.ml.backends.ggml.placement import Placer
from herd.ml.backends.ggml.rpc import add_servers
from herd.ml.backends.ggml.tensor import GGMLTensor
from herd.ml.base import BackendOptions, CacheConfig, DeviceInfo, DType, Tensor
from herd.ml.layout import Plan, plan, size

# what `host_view` shows a float tensor's elements as (BF16: its raw 16 bits)
HOST_DTYPE = {TYPE_F32: np.float32, L.TYPE_F16: np.float16, L.TYPE_BF16: np.uint16}

log = logging.getLogger(__name__)


@L.LOG_CALLBACK
def _ggml_log(level: int, text: bytes | None, _user: int | None) -> None:
    """ggml's messages (it prints them to stderr by default) go to herd's log instead:
    warnings and errors as such, its progress notes (repacking, buffers) at debug."""
    msg = (text or b"").decode(errors="replace").rstrip()
    if msg:
        py_level = logging.DEBUG if level < L.LOG_WARN else logging.WARNING
        log.log(logging.ERROR if level == L.LOG_ERROR else py_level, "ggml: %s", msg)


L.ggml_log_set(_ggml_log, None)

# The attended cache range is rounded to this many cells, so a decode graph keeps its
# shapes (and is rerun) for many steps in a row: a rebuilt decode graph costs ~10 ms of
# Python, so 32 spent ~0.3 ms a token on rebuilds (SmolLM2 decode 85-87 tok/s at 32, 92
# at 128, 83-88 at 256 where masked cells start to cost).
CACHE_PAD = 128


class GGMLBackend:
    """Weights mapped from the GGUF file (or copied to the GPUs that run their layers),
    persistent tensors, the CPU backend and the Placer of every graph.

    Options (`BackendOptions`): `flash_attention` (None: on where layers run on a GPU),
    `max_nodes`, `repack`, `exact_gelu`, `exact_attention`, `gpu_ops` and `device_probe` (a callable
    returning the `Device`s to lay the model out on, instead of ggml's).
    """

    name = "ggml"

    def __init__(self, gguf: GGUFFile, options: BackendOptions) -> None:
        self.gguf = gguf
        self.options = options
        self.num_thread = options.num_thread or physical_cores()
        self.max_nodes = options.max_nodes
        self.cpu = self._wctx = self._wbuf = 0
        self.placer: Placer | None = None
        self._probe: Callable[[], Sequence[Device]] = options.device_probe or (
            lambda: probe_devices(options.rpc_servers)
        )
        self.gpus: list[GPU] = []  # the GPUs in use, in the scheduler's order
        self._on_gpus: set[int] = set()  # weights copied to a GPU
        # device name -> (when probed, its info then, bytes allocated since)
        self._room: dict[str | None, tuple[float, DeviceInfo, int]] = {}
        self._meta_pool: list[np.ndarray] = []
        self._persistent: list[tuple[int, int]] = []  # (ggml context, backend buffer)
        self._in_host: set[int] = set()  # `alloc`ed tensors in the CPU's buffer
        self._weights: dict[str, GGMLTensor] = {}
        self.dev = cpu_device()
        # weight pointer -> its repacked copy for linear (0: not made yet); empty: option off
        self.packed: dict[int, int] = {}
        # AMX tiles need kernel permission a VM may not grant (SIGILL here): never by default
        self._extra_bufts = (
            [
                b
                for b in L.extra_buffer_types(self.dev)
                if L.ggml_backend_buft_name(b) != b"AMX" or options.repack == "amx"
            ]
            if options.repack
            else []
        )
        if not L.ggml_cpu_has_llamafile():
            log.warning(
                "ggml-python was built without GGML_LLAMAFILE: prompts and F16 "
                "attention run several times slower; reinstall with `make install` (or "
                'CMAKE_ARGS="-DGGML_LLAMAFILE=ON" pip install --force-reinstall '
                "--no-cache-dir ggml-python==0.0.45)"
            )
        infos = list(gguf.tensors.values())
        self._file = np.frombuffer(gguf.buffer(), dtype=np.uint8)
        _validate(gguf, len(self._file))
        if options.rpc_servers:  # BackendError naming a server that cannot serve
            add_servers(options.rpc_servers)
        devices = self._probe()
        cpu_info = next(d.info for d in devices if d.info.kind == "cpu")
        gpus = [d for d in devices if d.info.kind in ("gpu", "igpu", "rpc")]
        self.gpu_ops = options.gpu_ops and bool(gpus)
        # OutOfMemoryError here, before any allocation
        self.plan: Plan = plan(gguf, options, [d.info for d in gpus], cpu_info, self.gpu_ops)
        # default: on where layers run on a GPU. On the CPU it is opt-in: there prompts ran
        # 6-8% and decode 3-4% faster (SmolLM2, Gemma 3, 2 threads), but ggml's CPU kernel
        # is less exact: SmolLM2's mean |delta log p| against the composed ops was 0.016
        # (llama.cpp's own flash attention differs from its default path by the same)
        # (not for RPC servers: ggml cannot tell what device a server computes on)
        fa, local = options.flash_attention, [gpus[g] for g in self.plan.gpus]
        self.flash_attention = any(g.info.kind != "rpc" for g in local) if fa is None else fa
        self.exact_gelu, self.exact_attention = options.exact_gelu, options.exact_attention
        # F16 weights multiply many rows as F32 where the CPU has no F16 arithmetic (matmul.py)
        self.widen_f16 = not L.ggml_cpu_has_fp16_va()
        try:
            self.cpu = L.ggml_backend_cpu_init()
            if not self.cpu:
                raise BackendError("ggml: no CPU backend")
            L.ggml_backend_cpu_set_n_threads(self.cpu, self.num_thread)
            for g in self.plan.gpus:
                self.gpus.append(start_gpu(g, gpus[g], self.num_thread))
            self.placer = Placer(self.cpu, [g.backend for g in self.gpus], self.gpu_ops)
            self._wctx = L.ggml_init(
                L.InitParams(L.ggml_tensor_overhead() * (len(infos) + 1), None, True)
            )
            # the whole mapping, page-aligned, as one buffer: CPU weights are never copied
            base = self._file.ctypes.data
            self._wbuf = L.ggml_backend_cpu_buffer_from_ptr(base, len(self._file))
            L.ggml_backend_buffer_set_usage(self._wbuf, L.BUFFER_USAGE_WEIGHTS)
            for info in infos:
                if self.plan.tensors[info.name] is not None:
                    continue  # copied to its GPU below
                gtype = int(info.type)
                p = L.ggml_new_tensor(self._wctx, gtype, len(info.shape), L.NE4(*ne(info.shape)))
                L.ggml_set_name(p, info.name.encode()[:63])
                if L.ggml_backend_tensor_alloc(self._wbuf, p, base + info.offset) != 0:
                    raise BackendError(f"ggml: cannot place weight {info.name}")
                self._weights[info.name] = GGMLTensor(p, info.shape, gtype, CONT, None)
            for gpu in self.gpus:
                self._copy_weights(gpu, base)
        except BaseException:
            self.close()
            raise
        self.n_static = len(self._weights)
        if self._extra_bufts:
            self.packed = {
                w.p: 0
                for w in self._weights.values()
                if len(w.shape) == 2 and w.gtype not in FLOAT and w.p not in self._on_gpus
            }
        self._cache_config = CacheConfig(
            # composed attention reads a transposed V as a view; flash attention reads rows
            v_transposed=not self.flash_attention,
            pad=CACHE_PAD,
            mask_dtype=DType.F16 if self.flash_attention else DType.F32,  # what each reads
            flash_attention=self.flash_attention,
            streams=True,  # GGMLTensor._stream_attention
        )
        layers = self.plan.layers
        log.info(
            "ggml: %d/%d layers on %s; flash attention %s",
            sum(d is not None for d in layers),
            len(layers),
            ", ".join(g.device.info.name for g in self.gpus) or "CPU only",
            "on" if self.flash_attention else "off",
        )

    # ---- weights and persistent tensors ------------------------------------------------
    def on_gpu(self, w: GGMLTensor) -> bool:
        """Whether a weight was copied to a GPU (or RPC server)."""
        return w.p in self._on_gpus

    def _copy_weights(self, gpu: GPU, base: int) -> None:
        """Copy the weights the plan puts on this GPU from the mapping into one buffer
        there (and token_embd as output.weight when the output layer is there, tied)."""
        names = [n for n, d in self.plan.tensors.items() if d == gpu.index]
        if self.plan.alias_output and self.plan.layers[self.plan.n_layers] == gpu.index:
            names.append("output.weight")
        tensors = self.gguf.tensors
        ctx = L.ggml_init(L.InitParams(L.ggml_tensor_overhead() * (len(names) + 1), None, True))
        made = []
        for name in names:
            info = tensors.get(name) or tensors["token_embd.weight"]
            gtype = int(info.type)
            p = L.ggml_new_tensor(ctx, gtype, len(info.shape), L.NE4(*ne(info.shape)))
            L.ggml_set_name(p, name.encode()[:63])
            made.append((name, p, info))
        buf = L.ggml_backend_alloc_ctx_tensors_from_buft(ctx, gpu.buft)
        if not buf:
            L.ggml_free(ctx)
            nbytes = sum(info.nbytes for _, _, info in made)
            raise OutOfMemoryError(
                f"ggml: cannot allocate {size(nbytes)} of weights on {gpu.device.info.name}"
            )
        self._persistent.append((ctx, buf))
        L.ggml_backend_buffer_set_usage(buf, L.BUFFER_USAGE_WEIGHTS)
        for name, p, info in made:
            L.ggml_backend_tensor_set(p, base + info.offset, 0, info.nbytes)
            self._weights[name] = GGMLTensor(p, info.shape, int(info.type), CONT, None)
            self._on_gpus.add(p)

    def _device_for(self, layer: int | None) -> GPU | None:
        """The GPU that holds `layer` (its KV cache); None: the CPU."""
        index = self.plan.device_of(layer)
        if index is None and self.gpu_ops and layer is None:
            return self.gpus[0]
        return next((g for g in self.gpus if g.index == index), None)

    def repack(self, w: GGMLTensor) -> int:
        """A copy of weight w in the first of ggml's CPU extra buffer types (AMX, repacked
        quantized layouts for its GEMM kernels) whose mul_mat supports it; else w itself.

        ggml asks the buffer type itself, through a mul_mat op whose weight sits in a dummy
        buffer of that type (as llama.cpp does). Made on first use: a tied embedding is
        both gathered (plain) and multiplied (repacked), so only linear sees the copy.
        """
        overhead = L.ggml_tensor_overhead()
        probe = L.ggml_init(L.InitParams(overhead * 4, None, True))
        try:
            shape = L.NE4(*ne(w.shape))
            t = L.ggml_new_tensor(probe, w.gtype, 2, shape)
            op = ggml_mul_mat(probe, t, L.ggml_new_tensor_2d(probe, TYPE_F32, w.shape[1], 1))
            for buft in self._extra_bufts:
                dummy = L.ggml_backend_buft_alloc_buffer(buft, 0)
                L.set_tensor_buffer(t, dummy)
                ok = L.ggml_backend_dev_supports_op(self.dev, op)
                L.set_tensor_buffer(t, None)
                L.ggml_backend_buffer_free(dummy)
                if not ok:
                    continue
                ctx = L.ggml_init(L.InitParams(overhead, None, True))
                q: int = L.ggml_new_tensor(ctx, w.gtype, 2, shape)
                buf = L.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft)
                if not buf:
                    L.ggml_free(ctx)
                    break
                L.ggml_backend_tensor_set(q, L.tensor_data(w.p), 0, L.ggml_nbytes(w.p))
                self.gguf.release(L.tensor_data(w.p) - self._file.ctypes.data, L.ggml_nbytes(w.p))
                self._persistent.append((ctx, buf))
                self.packed[w.p] = q
                return q
        finally:
            L.ggml_free(probe)
        self.packed[w.p] = w.p
        return w.p

    # ---- the Backend contract ------------------------------------------------------------
    def has_weight(self, name: str) -> bool:
        return name in self._weights

    def weight(self, name: str) -> GGMLTensor:
        if name not in self._weights:  # a model asking for what the file lacks
            raise WeightError(f"{name}: missing from the model file")
        return self._weights[name]

    def stack(self, names: Sequence[str]) -> None:
        """Not stacked: measured on SmolLM2 (2 threads, 6 alternating pairs), q/k/v and
        gate/up copied row after row into one weight each made prompts 0.90x as fast
        (their outputs then feed rope and swiglu as strided views) and decode 0.98x."""
        return None

    def alloc(self, shape: tuple[int, ...], dtype: DType, layer: int | None = None) -> GGMLTensor:
        gtype = GTYPE[dtype]
        assert 1 <= len(shape) <= 4, f"alloc {shape}: ggml tensors have 1 to 4 dims"
        assert shape[-1] % BLOCK[gtype] == 0, (
            f"alloc {shape} as {dtype.name}: last dim not a multiple of {BLOCK[gtype]}"
        )
        gpu = self._device_for(layer)
        what = f"{dtype.name} tensor {tuple(shape)}"
        what += "" if layer is None else f" (layer {layer})"
        self._check_room(L.ggml_row_size(gtype, shape[-1]) * math.prod(shape[:-1]), gpu, what)
        ctx = L.ggml_init(L.InitParams(L.ggml_tensor_overhead() * 2, None, True))
        p = L.ggml_new_tensor(ctx, gtype, len(shape), L.NE4(*ne(shape)))
        buft = gpu.buft if gpu else L.ggml_backend_cpu_buffer_type()
        buf = L.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft)
        if not buf:
            L.ggml_free(ctx)
            raise OutOfMemoryError(f"ggml: cannot allocate {what} (out of memory)")
        L.ggml_backend_buffer_clear(buf, 0)
        self._persistent.append((ctx, buf))
        self.n_static += 1
        if gpu is None:
            self._in_host.add(p)
        return GGMLTensor(p, tuple(shape), gtype, CONT, None)

    def host_view(self, t: Tensor) -> np.ndarray | None:
        """`HostTensors`: an array over an `alloc`ed tensor in the CPU's buffer."""
        assert isinstance(t, GGMLTensor)
        if t.p not in self._in_host:
            return None
        shape, gtype = t.shape, t.gtype
        if gtype in HOST_DTYPE:
            return _host_view(t.p, shape, HOST_DTYPE[gtype], writeable=True)
        row = L.ggml_row_size(gtype, shape[-1])  # block-quantized: each row's bytes
        return _host_view(t.p, (*shape[:-1], row), np.uint8, writeable=True)

    def new_context(self) -> GGMLContext:
        return GGMLContext(self)

    def cache_config(self) -> CacheConfig:
        return self._cache_config

    def devices(self) -> list[DeviceInfo]:
        return [d.info for d in self._probe()]

    def _check_room(self, nbytes: int, gpu: GPU | None, what: str) -> None:
        """OutOfMemoryError unless the device has nbytes free, keeping the compute buffer
        estimate aside until a first graph has been placed."""
        name = gpu.device.info.name if gpu else None
        # one probe for a burst of allocations (a cache allocates two tensors per layer
        # in its first pass, and a probe reads the system's memory counters: ~0.3 ms)
        now = time.monotonic()
        when, info, used = self._room.get(name) or (-1.0, None, 0)
        if info is None or now - when > 1.0:
            info = next(
                d.info
                for d in self._probe()
                if (d.info.name == name if gpu else d.info.kind == "cpu")
            )
            when, used = now, 0
        free = info.free_memory - used
        assert self.placer is not None
        keep = self.plan.graph if self.placer.epoch == 0 else 0
        if nbytes + keep > free:
            raise OutOfMemoryError(
                f"{what} needs {size(nbytes)} on {info.name} (and {size(keep)} for compute), "
                f"but {size(free)} is available; lower num_ctx"
            )
        self._room[name] = (when, info, used + nbytes)

    def _take_meta_buffer(self) -> np.ndarray:
        if self._meta_pool:
            return self._meta_pool.pop()
        return np.empty(self.max_nodes * L.ggml_tensor_overhead() + 64, dtype=np.uint8)

    def _give_meta_buffer(self, buf: np.ndarray) -> None:
        self._meta_pool.append(buf)

    def close(self) -> None:
        if self.placer is not None:
            self.placer.close()
        for ctx, buf in self._persistent:
            L.ggml_backend_buffer_free(buf)
            L.ggml_free(ctx)
        self._persistent.clear()
        self._in_host.clear()
        self._weights.clear()
        if self._wbuf:
            L.ggml_backend_buffer_free(self._wbuf)
        if self._wctx:
            L.ggml_free(self._wctx)
        if self.cpu:
            L.ggml_backend_free(self.cpu)
        for gpu in self.gpus:
            L.ggml_backend_free(gpu.backend)
        self.gpus = []
        self.cpu = self._wctx = self._wbuf = 0
        self._meta_pool.clear()
        self.packed.clear()


_COMPUTE_TYPES = compute_types()


def _validate(gguf: GGUFFile, file_size: int) -> None:
    """Refuse, before any ggml call, what would make ggml abort or read past the mapping."""
    for info in gguf.tensors.values():
        where = f"{gguf.path}: tensor {info.name}"
        gtype = int(info.type)
        if gtype not in _COMPUTE_TYPES:
            raise GGUFError(
                f"{where} has type {type_name(gtype)}, which this ggml build cannot compute with"
            )
        if not 1 <= len(info.shape) <= 4:
            raise GGUFError(f"{where} has {len(info.shape)} dims; ggml supports 1 to 4")
        rows = math.prod(info.shape[:-1])
        if (
            info.shape[-1] % BLOCK[gtype]
            or L.ggml_row_size(gtype, info.shape[-1]) * rows != info.nbytes
        ):
            raise GGUFError(
                f"{where}: {info.nbytes} bytes do not hold {info.shape} {type_name(gtype)}"
            )
        if info.offset < 0 or info.offset + info.nbytes > file_size:
            raise GGUFError(
                f"{where} runs past the end of the file (truncated download?): "
                f"needs byte {info.offset + info.nbytes}, file has {file_size}"
            )


def open_ggml(gguf: GGUFFile, options: BackendOptions | None = None) -> GGMLBackend:
    if not gguf.tensors:
        raise BackendError(f"{gguf.path}: no tensors")
    return GGMLBackend(gguf, options or BackendOptions())
