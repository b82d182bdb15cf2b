"""MLX backend: herd's models on `mlx.core` (Metal on Apple silicon, CUDA with `mlx[cuda]`,
the CPU elsewhere).

Every weight is loaded at open, through `quant.load`: GGUF block types that MLX's affine
quantization represents exactly stay quantized (and go to `mx.quantized_matmul`,
`mx.gather_qmm`), the others are dequantized once to float16; which ones, and the memory
it cost, is logged and kept in `dequantized` and `weight_bytes`. Loading everything up
front means a file MLX cannot read fails at open, never in the middle of an answer.

The device is MLX's default (a GPU where MLX has one) unless `num_gpu` is 0, which forces
the CPU. MLX runs a model on one device: a positive `num_gpu` means "the GPU", not a layer
count, and without a GPU the model runs on the CPU, as ggml does. MLX's CPU kernels are
single-threaded (each stream runs on one thread, and the Linux wheel's dense matmul is
the reference BLAS); on the CPU this backend splits each large weight's rows over
`num_thread` streams (default: the physical cores) and runs the slices side by side.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
from collections.abc import Sequence

import mlx.core as mx
import psutil
from gguf import GGMLQuantizationType as Q

from herd.errors import BackendError, GGUFError, OutOfMemoryError, WeightError
from herd.gguf import GGUFFile
from herd.gguf.reader import tensor_nbytes
from herd.ml.backends.mlx import quant
from herd.ml.backends.mlx.context import MlxContext
from herd.ml.backends.mlx.tensor import MlxTensor
from herd.ml.base import BackendOptions, CacheConfig, DeviceInfo, DType
from herd.ml.layout import size

log = logging.getLogger(__name__)

# what GGUF block types without an exact MLX mapping are dequantized to at load
DENSE_DTYPE = mx.float16
# The attended cache range is rounded to this many cells, so the decode step keeps its
# shapes for many steps in a row: on a GPU, where `mx.compile` compiles each shape anew,
# 256; on the CPU, where each masked cell costs what a used one does (MLX's CPU attention
# is composed, single-threaded), 64, recording the step again 4x as often: SmolLM2 decodes
# 256 -> 384 at 7.75-8.07 tok/s instead of 6.68-6.78 (one process, turns alternating)
CACHE_PAD = 256
CACHE_PAD_CPU = 64
_ALLOC = {
    DType.F32: mx.float32,
    DType.F16: mx.float16,
    DType.BF16: mx.bfloat16,
    DType.I32: mx.int32,
}
# weights with fewer rows are not split over CPU streams (a slice's product is then too
# small to pay for the streams' synchronization)
MIN_SPLIT_ROWS = 512
# KV cache block types: MLX has no such arrays; the cache is kept in F16 instead
_CACHE_AS_F16 = (DType.Q8_0, DType.Q4_0)


class MlxBackend:
    """The weights as MLX arrays, persistent tensors (KV cache), and the device in use.

    `dequantized`: tensor name -> GGUF type of each weight MLX holds dequantized (no
    exact mapping onto its quantization); `weight_bytes`: the memory all weights take."""

    name = "mlx"

    def __init__(self, gguf: GGUFFile, options: BackendOptions) -> None:
        self.gguf = gguf
        self.options = options
        self.device = _pick_device(options)
        # the GPUs in use, as ggml's backend names them (rerun's outputs are host views
        # only without one)
        self.gpus = [] if self.device == mx.cpu else [_gpu_info()]
        fa = options.flash_attention
        self.flash_attention = True if fa is None else fa
        self._warned_cache_type = False
        self._weights: dict[str, MlxTensor] = {}
        self.dequantized: dict[str, str] = {}
        self.weight_bytes = 0
        _validate(gguf)
        need, info = sum(t.nbytes for t in gguf.tensors.values()), self.devices()[0]
        if need > info.free_memory:  # before reading any (dequantized ones take more)
            raise OutOfMemoryError(
                f"mlx: the weights need {size(need)} on {info.name}, but "
                f"{size(info.free_memory)} is available"
            )
        mx.set_default_device(self.device)
        threads = options.num_thread or psutil.cpu_count(logical=False) or 1
        # the CPU streams a large weight's row slices run on (none on a GPU: one kernel
        # already uses the whole device)
        self.streams = (
            [mx.new_stream(mx.cpu) for _ in range(threads)]
            if self.device == mx.cpu and threads > 1
            else []
        )
        self._load()
        self._cache_config = CacheConfig(
            v_transposed=False,  # SDPA reads values as rows (S, Hkv, Dv)
            pad=CACHE_PAD_CPU if self.device == mx.cpu else CACHE_PAD,
            mask_dtype=DType.F32,
            flash_attention=self.flash_attention,
        )
        log.info(
            "mlx: %s weights on %s; flash attention %s",
            size(self.weight_bytes),
            self.devices()[0].name,
            "on" if self.flash_attention else "off",
        )

    def _load(self) -> None:
        extra = 0
        for info in self.gguf.tensors.values():
            try:
                w = quant.load(self.gguf.raw(info.name), info.type, info.shape, DENSE_DTYPE)
            except GGUFError as e:  # quant's own, which knows the type but not the tensor
                raise GGUFError(f"{self.gguf.path}: tensor {info.name}: {e}") from None
            except (NotImplementedError, KeyError, ValueError) as e:
                raise GGUFError(
                    f"{self.gguf.path}: tensor {info.name} has type {info.type.name}, "
                    f"which the mlx backend cannot load ({e or type(e).__name__})"
                ) from None
            arrays = [a for a in (w.dense, w.packed, w.scales, w.biases) if a is not None]
            mx.eval(*arrays)  # copied out of the mapping now: its pages can go
            self.gguf.release(info.offset, info.nbytes)
            self._split(w)
            self._weights[info.name] = MlxTensor(w.dense, None, w)
            self.weight_bytes += w.nbytes
            if w.dequantized_from is not None:
                self.dequantized[info.name] = w.dequantized_from
                extra += w.nbytes - info.nbytes
        if self.dequantized:
            # tensors named once per pattern (blk.*.ffn_down.weight), not once per layer
            kinds: dict[str, set[str]] = {}
            for name, kind in self.dequantized.items():
                kinds.setdefault(kind, set()).add(re.sub(r"\.\d+\.", ".*.", name))
            log.info(
                "mlx: %d tensors dequantized to %s at load (no exact MLX mapping): %s; "
                "+%s over their GGUF size",
                len(self.dequantized),
                DENSE_DTYPE,
                "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in sorted(kinds.items())),
                size(extra),
            )

    # ---- the Backend contract ------------------------------------------------------------
    def stack(self, names: Sequence[str]) -> MlxTensor | None:
        """2-D weights of one form (the same bits and group size, or dense) as one, their
        packed rows, scales and biases concatenated (exact); each name then holds a view
        of it, so memory stays the same once the models' old references go (`Stack.bind`
        rebinds them). On the CPU a decode step is mostly per-op cost. None otherwise."""
        mx.clear_cache()  # the weights the last call replaced, which MLX would keep cached
        ws = [self._weights[n].w if n in self._weights else None for n in names]
        parts = [w for w in ws if w is not None and len(w.shape) == 2]
        forms = {(w.bits, w.group_size, w.shape[1], None if w.dense is None else w.dense.dtype)
                 for w in parts}  # fmt: skip
        if len(parts) != len(names) or len(forms) != 1:
            return None

        def cat(attr: str) -> mx.array | None:
            arrays = [getattr(w, attr) for w in parts]
            return None if arrays[0] is None else mx.concatenate(arrays, axis=0)

        first = parts[0]
        w = quant.MlxWeight(
            (sum(p.shape[0] for p in parts), first.shape[1]), first.gguf_type, cat("dense"),
            cat("packed"), cat("scales"), cat("biases"), first.bits, first.group_size,
            first.dequantized_from, sum(p.gguf_nbytes for p in parts),
        )  # fmt: skip
        mx.eval(*(a for a in (w.dense, w.packed, w.scales, w.biases) if a is not None))
        self._split(w)
        start = 0
        for name, p in zip(names, parts, strict=True):
            view = w.rows(start, start + p.shape[0])
            self._split(view)
            self._weights[name] = MlxTensor(view.dense, None, view)
            start += p.shape[0]
        return MlxTensor(w.dense, None, w)

    def _split(self, w: quant.MlxWeight) -> None:
        """A large 2-D weight's row slices, one per CPU stream (`MlxWeight.parts`)."""
        if self.streams and len(w.shape) == 2 and w.shape[0] >= MIN_SPLIT_ROWS:
            n, cuts = w.shape[0], len(self.streams)
            bounds = [n * i // cuts for i in range(cuts + 1)]
            w.parts = [w.rows(a, b) for a, b in itertools.pairwise(bounds)]

    def has_weight(self, name: str) -> bool:
        return name in self._weights

    def weight(self, name: str) -> MlxTensor:
        if name not in self._weights:  # a model asking for what the file lacks
            raise WeightError(f"{name}: missing from the model file")
        return self._weights[name]

    def alloc(self, shape: tuple[int, ...], dtype: DType, layer: int | None = None) -> MlxTensor:
        if dtype in _CACHE_AS_F16:
            if not self._warned_cache_type:
                log.info(
                    "mlx: no %s arrays; the KV cache is kept as F16 (MLX caches: f32, f16, bf16)",
                    dtype.name,
                )
                self._warned_cache_type = True
            dtype = DType.F16
        if dtype not in _ALLOC:
            raise BackendError(
                f"mlx: cannot allocate a {dtype.name} tensor; supported: f32, f16, bf16, i32"
            )
        mtype = _ALLOC[dtype]
        nbytes = math.prod(shape) * mtype.size
        info = self.devices()[0]
        if nbytes > info.free_memory:
            where = "" if layer is None else f" (layer {layer})"
            raise OutOfMemoryError(
                f"{dtype.name} tensor {tuple(shape)}{where} needs {size(nbytes)} on "
                f"{info.name}, but {size(info.free_memory)} is available; lower num_ctx"
            )
        with mx.stream(self.device):
            a = mx.zeros(shape, dtype=mtype)
            mx.eval(a)
        return MlxTensor(a, None, persistent=True)

    def new_context(self) -> MlxContext:
        return MlxContext(self)

    def cache_config(self) -> CacheConfig:
        return self._cache_config

    def devices(self) -> list[DeviceInfo]:
        """The device in use first (then the CPU, when that is a GPU)."""
        cpu = _cpu_info()
        if self.device == mx.cpu:
            return [cpu]
        return [_gpu_info(), cpu]

    def close(self) -> None:
        self._weights.clear()


def default_devices(options: BackendOptions | None = None) -> list[DeviceInfo]:
    """The device a model runs on by default (num_gpu -1): the GPU where MLX has one."""
    return [_cpu_info() if _pick_device(BackendOptions()) == mx.cpu else _gpu_info()]


def _pick_device(options: BackendOptions) -> mx.Device:
    has_gpu = mx.metal.is_available() or mx.cuda.is_available()
    if options.num_gpu == 0:
        return mx.cpu
    if not has_gpu:
        if options.num_gpu > 0:
            log.info("mlx: no GPU (num_gpu=%d asked): running on the CPU", options.num_gpu)
        return mx.cpu
    return mx.gpu


def _cpu_info() -> DeviceInfo:
    page = os.sysconf("SC_PAGE_SIZE")
    total = page * os.sysconf("SC_PHYS_PAGES")
    try:
        free = page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):  # macOS has no SC_AVPHYS_PAGES
        free = max(0, total - mx.get_active_memory())
    return DeviceInfo(f"cpu ({mx.device_info().get('device_name', 'cpu')})", "cpu", total, free)


def _gpu_info() -> DeviceInfo:
    info = mx.device_info()
    name = str(info.get("device_name", "gpu"))
    total = int(info.get("memory_size", 0) or info.get("total_memory", 0) or 0)
    if not total:  # unified memory (Metal) or unreported: the system's
        total = _cpu_info().total_memory
    free = max(0, total - mx.get_active_memory())
    return DeviceInfo(name, "gpu", total, free)


def _validate(gguf: GGUFFile) -> None:
    """Refuse, before any weight is read, a tensor past the end of the file or one whose
    bytes do not hold its shape (MLX would read past the mapping or garble it)."""
    for info in gguf.tensors.values():
        where = f"{gguf.path}: tensor {info.name}"
        if info.offset < 0 or info.offset + info.nbytes > gguf.file_size:
            raise GGUFError(
                f"{where} runs past the end of the file (truncated download?): "
                f"needs byte {info.offset + info.nbytes}, file has {gguf.file_size}"
            )
        if info.type in (Q.I8, Q.I16, Q.I64, Q.F64):
            raise GGUFError(f"{where} has type {info.type.name}, which the mlx backend cannot load")
        try:
            expected = tensor_nbytes(info.shape, info.type)
        except (GGUFError, KeyError):
            expected = info.nbytes  # quant.load names the problem
        if expected != info.nbytes:
            raise GGUFError(
                f"{where}: {info.nbytes} bytes do not hold {info.shape} {info.type.name}"
            )


def open_mlx(gguf: GGUFFile, options: BackendOptions | None = None) -> MlxBackend:
    if not gguf.tensors:
        raise BackendError(f"{gguf.path}: no tensors")
    return MlxBackend(gguf, options or BackendOptions())
