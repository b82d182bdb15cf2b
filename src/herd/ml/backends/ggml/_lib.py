"""Direct ctypes bindings to the ggml shared libraries that ggml-python builds and ships.

ggml-python's own wrappers declare tensors as `POINTER(ggml_tensor)`, so every call
allocates a ctypes pointer object. Graph building is the hot path (hundreds of ops per
forward pass), so these bindings declare every pointer as `c_void_p`: pointers travel as
plain Python ints. The libraries are the ones ggml-python loaded; only the function
objects are our own (fresh `CDLL` handles), so ggml-python's declarations are untouched.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path
from typing import Any

# Only ggml-python's libraries are used, not its Python module: that module binds every
# symbol at import and fails on builds without an optional one (CUDA without NCCL).
_spec = importlib.util.find_spec("ggml")
if _spec is None or not _spec.submodule_search_locations:
    raise ImportError("ggml-python is not installed")
_LIB_DIR = Path(list(_spec.submodule_search_locations)[0]) / "lib"
_LIBS = [ctypes.CDLL(str(p)) for p in sorted(_LIB_DIR.glob("libggml*.so"))]
_LIBS += [ctypes.CDLL(str(p)) for p in sorted(_LIB_DIR.glob("*ggml*.dylib"))]
if not _LIBS:
    raise ImportError(f"ggml-python ships no ggml libraries in {_LIB_DIR}")

P = ctypes.c_void_p
I = ctypes.c_int
I64 = ctypes.c_int64
F = ctypes.c_float
Z = ctypes.c_size_t
B = ctypes.c_bool
S = ctypes.c_char_p


def _f(name: str, restype: Any, *argtypes: Any) -> Any:
    for lib in _LIBS:
        try:
            fn = lib[name]  # a new function object each time: ours alone
        except AttributeError:
            continue
        fn.restype = restype
        fn.argtypes = argtypes
        return fn
    raise ImportError(f"the installed ggml lacks {name}; need ggml-python==0.0.45")


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", Z), ("mem_buffer", P), ("no_alloc", B)]


class TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", S),
        ("blck_size", I64),
        ("blck_size_interleave", I64),
        ("type_size", Z),
        ("is_quantized", B),
        ("to_float", P),
        ("from_float_ref", P),
    ]


class TypeTraitsCPU(ctypes.Structure):
    _fields_ = [("from_float", P), ("vec_dot", P), ("vec_dot_type", I), ("nrows", I64)]


# struct ggml_tensor field offsets, the same in the ggml ggml-python 0.0.45 vendors (0.15.3)
# and in llama.cpp's (0.25.3, what scripts/build_ggml.py builds it with): type, buffer,
# ne[4], nb[4], op, op_params[16], flags, src[10], view_src, view_offs, data, name[64], ...
TENSOR_BUFFER_OFFSET = 8
TENSOR_NB_OFFSET = 48
TENSOR_VIEW_SRC_OFFSET = 232
TENSOR_DATA_OFFSET = 248
PTR = ctypes.sizeof(ctypes.c_void_p)
TENSOR_SRC_OFFSET, TENSOR_SRC_BYTES = 152, 10 * PTR  # src[GGML_MAX_SRC]
NB4 = ctypes.c_size_t * 4
NE4 = ctypes.c_int64 * 4

TYPE_F32, TYPE_F16, TYPE_Q4_0, TYPE_Q8_0 = 0, 1, 2, 8
TYPE_I32, TYPE_BF16 = 26, 30
TYPE_COUNT = 42  # types 0..41 exist in both ggml versions (0.25.3 adds Q2_0 as 42)
ROPE_NORMAL, ROPE_NEOX = 0, 2
BUFFER_USAGE_WEIGHTS = 1
PREC_F32 = 10
POOL_AVG = 1  # enum ggml_op_pool
STATUS_SUCCESS = 0

# context, graph, metadata
ggml_init = _f("ggml_init", P, InitParams)
ggml_free = _f("ggml_free", None, P)
ggml_tensor_overhead = _f("ggml_tensor_overhead", Z)
ggml_graph_overhead_custom = _f("ggml_graph_overhead_custom", Z, Z, B)
ggml_new_tensor = _f("ggml_new_tensor", P, P, I, I, ctypes.POINTER(I64))
ggml_new_tensor_1d = _f("ggml_new_tensor_1d", P, P, I, I64)
ggml_new_tensor_2d = _f("ggml_new_tensor_2d", P, P, I, I64, I64)
ggml_new_tensor_3d = _f("ggml_new_tensor_3d", P, P, I, I64, I64, I64)
ggml_new_tensor_4d = _f("ggml_new_tensor_4d", P, P, I, I64, I64, I64, I64)
ggml_get_first_tensor = _f("ggml_get_first_tensor", P, P)
ggml_get_next_tensor = _f("ggml_get_next_tensor", P, P, P)
ggml_set_name = _f("ggml_set_name", P, P, S)
ggml_set_input = _f("ggml_set_input", None, P)
ggml_set_output = _f("ggml_set_output", None, P)
ggml_new_graph_custom = _f("ggml_new_graph_custom", P, P, Z, B)
ggml_build_forward_expand = _f("ggml_build_forward_expand", None, P, P)
ggml_graph_n_nodes = _f("ggml_graph_n_nodes", I, P)
ggml_graph_node = _f("ggml_graph_node", P, P, I)
ggml_is_contiguous = _f("ggml_is_contiguous", B, P)
ggml_nbytes = _f("ggml_nbytes", Z, P)
ggml_row_size = _f("ggml_row_size", Z, I, I64)
ggml_blck_size = _f("ggml_blck_size", I64, I)
ggml_type_size = _f("ggml_type_size", Z, I)
ggml_type_name = _f("ggml_type_name", S, I)
ggml_get_type_traits = _f("ggml_get_type_traits", ctypes.POINTER(TypeTraits), I)
ggml_get_type_traits_cpu = _f("ggml_get_type_traits_cpu", ctypes.POINTER(TypeTraitsCPU), I)
ggml_status_to_string = _f("ggml_status_to_string", S, I)
ggml_version = _f("ggml_version", S)
# void (*)(enum ggml_log_level, const char * text, void * user_data)
LOG_CALLBACK = ctypes.CFUNCTYPE(None, I, S, P)
LOG_WARN, LOG_ERROR = 3, 4
ggml_log_set = _f("ggml_log_set", None, LOG_CALLBACK, P)
ggml_cpu_has_llamafile = _f("ggml_cpu_has_llamafile", I)
ggml_cpu_has_fp16_va = _f("ggml_cpu_has_fp16_va", I)
ggml_quantize_chunk = _f("ggml_quantize_chunk", Z, I, P, P, I64, I64, I64, P)
ggml_quantize_requires_imatrix = _f("ggml_quantize_requires_imatrix", B, I)

# ops: (ctx, tensors..., params...) -> tensor
ggml_add = _f("ggml_add", P, P, P, P)
ggml_sub = _f("ggml_sub", P, P, P, P)
ggml_mul = _f("ggml_mul", P, P, P, P)
ggml_div = _f("ggml_div", P, P, P, P)
ggml_scale = _f("ggml_scale", P, P, P, F)
ggml_neg = _f("ggml_neg", P, P, P)
ggml_exp = _f("ggml_exp", P, P, P)
ggml_sqrt = _f("ggml_sqrt", P, P, P)
ggml_tanh = _f("ggml_tanh", P, P, P)
ggml_sigmoid = _f("ggml_sigmoid", P, P, P)
ggml_silu = _f("ggml_silu", P, P, P)
ggml_gelu = _f("ggml_gelu", P, P, P)
ggml_gelu_erf = _f("ggml_gelu_erf", P, P, P)
ggml_relu = _f("ggml_relu", P, P, P)
ggml_clamp = _f("ggml_clamp", P, P, P, F, F)
ggml_swiglu_split = _f("ggml_swiglu_split", P, P, P, P)
ggml_geglu_split = _f("ggml_geglu_split", P, P, P, P)
ggml_soft_max_ext = _f("ggml_soft_max_ext", P, P, P, P, F, F)
ggml_sum_rows = _f("ggml_sum_rows", P, P, P)
ggml_mean = _f("ggml_mean", P, P, P)
ggml_rms_norm = _f("ggml_rms_norm", P, P, P, F)
ggml_norm = _f("ggml_norm", P, P, P, F)
ggml_l2_norm = _f("ggml_l2_norm", P, P, P, F)
ggml_mul_mat = _f("ggml_mul_mat", P, P, P, P)
ggml_out_prod = _f("ggml_out_prod", P, P, P, P)
ggml_transpose = _f("ggml_transpose", P, P, P)
# (ctx, as: stacked expert weights, b, ids: I32 expert per row) -> result
ggml_mul_mat_id = _f("ggml_mul_mat_id", P, P, P, P, P)
ggml_get_rows = _f("ggml_get_rows", P, P, P, P)
ggml_set_rows = _f("ggml_set_rows", P, P, P, P, P)
# (ctx, a, int k) -> I32 indices of each row's k largest, descending (a view of argsort)
ggml_argsort_top_k = _f("ggml_argsort_top_k", P, P, P, I)
ggml_reshape_1d = _f("ggml_reshape_1d", P, P, P, I64)
ggml_reshape_2d = _f("ggml_reshape_2d", P, P, P, I64, I64)
ggml_reshape_3d = _f("ggml_reshape_3d", P, P, P, I64, I64, I64)
ggml_reshape_4d = _f("ggml_reshape_4d", P, P, P, I64, I64, I64, I64)
ggml_view_4d = _f("ggml_view_4d", P, P, P, I64, I64, I64, I64, Z, Z, Z, Z)
ggml_permute = _f("ggml_permute", P, P, P, I, I, I, I)
ggml_cont = _f("ggml_cont", P, P, P)
ggml_cont_4d = _f("ggml_cont_4d", P, P, P, I64, I64, I64, I64)
ggml_concat = _f("ggml_concat", P, P, P, P, I)
ggml_cpy = _f("ggml_cpy", P, P, P, P)
ggml_set_inplace = _f("ggml_set_inplace", P, P, P, P, Z, Z, Z, Z)
ggml_repeat_4d = _f("ggml_repeat_4d", P, P, P, I64, I64, I64, I64)
ggml_cast = _f("ggml_cast", P, P, P, I)
ggml_flash_attn_ext = _f("ggml_flash_attn_ext", P, P, P, P, P, P, F, F, F)
ggml_flash_attn_ext_set_prec = _f("ggml_flash_attn_ext_set_prec", None, P, I)
ggml_rope_ext = _f("ggml_rope_ext", P, P, P, P, P, I, I, I, F, F, F, F, F, F)
# (ctx, kernel: read for its shape only, image, s0, s1, p0, p1, d0, d1, is_2D, dst type)
ggml_im2col = _f("ggml_im2col", P, P, P, P, I, I, I, I, I, I, B, I)
# (ctx, a, op, k0, k1, s0, s1, p0, p1): averages divide by k0 * k1, padding included
ggml_pool_2d = _f("ggml_pool_2d", P, P, P, I, I, I, I, I, F, F)

# backends, buffers, allocation
ggml_backend_cpu_init = _f("ggml_backend_cpu_init", P)
ggml_backend_cpu_set_n_threads = _f("ggml_backend_cpu_set_n_threads", None, P, I)
ggml_backend_free = _f("ggml_backend_free", None, P)
ggml_backend_name = _f("ggml_backend_name", S, P)
ggml_backend_cpu_buffer_type = _f("ggml_backend_cpu_buffer_type", P)
ggml_backend_cpu_buffer_from_ptr = _f("ggml_backend_cpu_buffer_from_ptr", P, P, Z)
ggml_backend_buffer_free = _f("ggml_backend_buffer_free", None, P)
ggml_backend_buffer_set_usage = _f("ggml_backend_buffer_set_usage", None, P, I)
ggml_backend_buffer_clear = _f("ggml_backend_buffer_clear", None, P, ctypes.c_uint8)
ggml_backend_buffer_get_size = _f("ggml_backend_buffer_get_size", Z, P)
ggml_backend_tensor_alloc = _f("ggml_backend_tensor_alloc", I, P, P, P)
ggml_backend_alloc_ctx_tensors_from_buft = _f("ggml_backend_alloc_ctx_tensors_from_buft", P, P, P)
ggml_backend_tensor_set = _f("ggml_backend_tensor_set", None, P, P, Z, Z)
ggml_backend_tensor_get = _f("ggml_backend_tensor_get", None, P, P, Z, Z)
ggml_backend_graph_compute = _f("ggml_backend_graph_compute", I, P, P)
ggml_gallocr_new = _f("ggml_gallocr_new", P, P)
ggml_gallocr_free = _f("ggml_gallocr_free", None, P)
ggml_gallocr_alloc_graph = _f("ggml_gallocr_alloc_graph", B, P, P)
ggml_gallocr_get_buffer_size = _f("ggml_gallocr_get_buffer_size", Z, P, I)

# devices
ggml_backend_dev_count = _f("ggml_backend_dev_count", Z)
ggml_backend_dev_get = _f("ggml_backend_dev_get", P, Z)
ggml_backend_dev_name = _f("ggml_backend_dev_name", S, P)
ggml_backend_dev_description = _f("ggml_backend_dev_description", S, P)
ggml_backend_dev_type = _f("ggml_backend_dev_type", I, P)
ggml_backend_dev_backend_reg = _f("ggml_backend_dev_backend_reg", P, P)
ggml_backend_dev_supports_op = _f("ggml_backend_dev_supports_op", B, P, P)
ggml_backend_reg_name = _f("ggml_backend_reg_name", S, P)
ggml_backend_reg_get_proc_address = _f("ggml_backend_reg_get_proc_address", P, P, S)
ggml_backend_buft_alloc_buffer = _f("ggml_backend_buft_alloc_buffer", P, P, Z)
ggml_backend_buft_name = _f("ggml_backend_buft_name", S, P)
ggml_backend_dev_memory = _f(
    "ggml_backend_dev_memory", None, P, ctypes.POINTER(Z), ctypes.POINTER(Z)
)
ggml_backend_dev_init = _f("ggml_backend_dev_init", P, P, S)
ggml_backend_dev_buffer_type = _f("ggml_backend_dev_buffer_type", P, P)
ggml_backend_supports_op = _f("ggml_backend_supports_op", B, P, P)
DEV_TYPE_NAMES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}
DEV_TYPE_CPU = 0

# the scheduler: one graph split over several backends (GPUs..., CPU last)
ggml_backend_sched_new = _f(
    "ggml_backend_sched_new", P, ctypes.POINTER(P), ctypes.POINTER(P), I, Z, B, B
)
ggml_backend_sched_free = _f("ggml_backend_sched_free", None, P)
ggml_backend_sched_reset = _f("ggml_backend_sched_reset", None, P)
ggml_backend_sched_alloc_graph = _f("ggml_backend_sched_alloc_graph", B, P, P)
ggml_backend_sched_graph_compute = _f("ggml_backend_sched_graph_compute", I, P, P)
ggml_backend_sched_set_tensor_backend = _f("ggml_backend_sched_set_tensor_backend", None, P, P, P)
ggml_backend_sched_get_n_splits = _f("ggml_backend_sched_get_n_splits", I, P)
ggml_backend_sched_get_buffer_size = _f("ggml_backend_sched_get_buffer_size", Z, P, P)


def tensor_nb(p: int) -> tuple[int, int, int, int]:
    """A tensor's byte strides (ggml order)."""
    nb = NB4.from_address(p + TENSOR_NB_OFFSET)
    return nb[0], nb[1], nb[2], nb[3]


def set_tensor_nb0(p: int, nb0: int) -> None:
    """Set a view's innermost byte stride (ggml_permute sets its strides alike)."""
    NB4.from_address(p + TENSOR_NB_OFFSET)[0] = nb0


def tensor_data(p: int) -> int | None:
    """A tensor's data pointer (None until allocated)."""
    return ctypes.c_void_p.from_address(p + TENSOR_DATA_OFFSET).value


def extra_buffer_types(dev: int) -> list[int]:
    """The device's extra buffer types (CPU: AMX, repacked quantized layouts), best first."""
    reg = ggml_backend_dev_backend_reg(dev)
    addr = (
        ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
    )
    if not addr:
        return []
    array = ctypes.CFUNCTYPE(P, P)(addr)(dev)
    out: list[int] = []
    while array and (buft := ctypes.c_void_p.from_address(array + 8 * len(out)).value):
        out.append(buft)
    return out


def tensor_is_view(p: int) -> bool:
    return bool(ctypes.c_void_p.from_address(p + TENSOR_VIEW_SRC_OFFSET).value)


def tensor_preallocated(p: int) -> bool:
    """Whether a tensor (or the tensor it views) already lives in a backend buffer."""
    src = ctypes.c_void_p.from_address(p + TENSOR_VIEW_SRC_OFFSET).value or p
    return bool(
        ctypes.c_void_p.from_address(src + TENSOR_BUFFER_OFFSET).value
        or ctypes.c_void_p.from_address(p + TENSOR_BUFFER_OFFSET).value
    )


def set_tensor_buffer(p: int, buffer: int | None) -> None:
    ctypes.c_void_p.from_address(p + TENSOR_BUFFER_OFFSET).value = buffer


def unallocate(ctx: int) -> None:
    """Forget where the graph allocator placed every tensor of a context."""
    t = ggml_get_first_tensor(ctx)
    while t:
        ctypes.c_void_p.from_address(t + TENSOR_BUFFER_OFFSET).value = None
        ctypes.c_void_p.from_address(t + TENSOR_DATA_OFFSET).value = None
        t = ggml_get_next_tensor(ctx, t)


def tensor_srcs(t: int) -> bytes:
    """The tensor's src pointers, as raw bytes (to put back with `set_tensor_srcs`)."""
    return ctypes.string_at(t + TENSOR_SRC_OFFSET, TENSOR_SRC_BYTES)


def set_tensor_srcs(t: int, srcs: bytes) -> None:
    ctypes.memmove(t + TENSOR_SRC_OFFSET, srcs, TENSOR_SRC_BYTES)


def set_tensor_src(t: int, i: int, src: int) -> None:
    """Set the tensor's src[i] (one its op does not read: a dependency only)."""
    ctypes.c_void_p.from_address(t + TENSOR_SRC_OFFSET + i * PTR).value = src
