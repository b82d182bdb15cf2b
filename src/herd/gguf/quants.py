"""Float rows -> the bytes a GGUF stores for a tensor type: herd's one quantizer.

    quantize(array (..., K) float, qtype) -> (..., K) float32 | float16, or uint8 (..., row bytes)

F32 and F16 are casts (NumPy). Every other type goes through ggml's own quantizers
(`ggml_quantize_chunk`, the code llama-quantize runs, so the bytes are llama.cpp's) when
ggml-python is installed, else through the `gguf` package's, which produce the same bytes
for the types it has (Q4_0..Q8_0, BF16, TQ1_0, TQ2_0, MXFP4) and lack the K- and
I-quants. Used by `herd convert`, `herd create --quantize` and the op tests.
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from herd.errors import HerdError

Q = GGMLQuantizationType

# The types ggml_quantize_chunk has a quantizer for (any other aborts the process).
_GGML_TYPES = frozenset(
    {
        Q.BF16,
        Q.Q4_0,
        Q.Q4_1,
        Q.Q5_0,
        Q.Q5_1,
        Q.Q8_0,
        Q.Q2_K,
        Q.Q3_K,
        Q.Q4_K,
        Q.Q5_K,
        Q.Q6_K,
        Q.IQ2_XXS,
        Q.IQ2_XS,
        Q.IQ3_XXS,
        Q.IQ1_S,
        Q.IQ4_NL,
        Q.IQ3_S,
        Q.IQ2_S,
        Q.IQ4_XS,
        Q.IQ1_M,
        Q.TQ1_0,
        Q.TQ2_0,
        Q.MXFP4,
    }
)
# The types the gguf package (0.19) quantizes, to the same bytes as ggml.
_GGUF_TYPES = frozenset(
    {
        Q.BF16,
        Q.Q4_0,
        Q.Q4_1,
        Q.Q5_0,
        Q.Q5_1,
        Q.Q8_0,
        Q.TQ1_0,
        Q.TQ2_0,
        Q.MXFP4,
    }
)


class _GGML:
    """The three functions of ggml's C API quantizing needs, bound with ctypes."""

    def __init__(self, libs: list[ctypes.CDLL]) -> None:
        self.chunk = self._bind(
            libs,
            "ggml_quantize_chunk",
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        )
        self.row_size = self._bind(
            libs, "ggml_row_size", ctypes.c_size_t, ctypes.c_int, ctypes.c_int64
        )
        self.requires_imatrix = self._bind(
            libs, "ggml_quantize_requires_imatrix", ctypes.c_bool, ctypes.c_int
        )

    @staticmethod
    def _bind(libs: list[ctypes.CDLL], name: str, restype: Any, *argtypes: Any) -> Any:
        for lib in libs:
            try:
                fn = lib[name]  # a new function object: ggml-python's own stay untouched
            except AttributeError:
                continue
            fn.restype, fn.argtypes = restype, argtypes
            return fn
        raise ImportError(f"the installed ggml lacks {name}")


@cache
def _ggml() -> _GGML | None:
    """ggml-python's libraries, or None without it. Its Python module is not imported: it
    binds every symbol at import and fails on builds that lack an optional one."""
    spec = importlib.util.find_spec("ggml")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib_dir = Path(list(spec.submodule_search_locations)[0]) / "lib"
    paths = sorted(lib_dir.glob("libggml*.so")) + sorted(lib_dir.glob("*ggml*.dylib"))
    try:
        return _GGML([ctypes.CDLL(str(p)) for p in paths]) if paths else None
    except (OSError, ImportError):
        return None


def check(qtype: GGMLQuantizationType) -> None:
    """HerdError unless `quantize` can make `qtype` here: callers check before a file is begun."""
    if qtype in (Q.F32, Q.F16):
        return
    ggml = _ggml()
    if ggml is not None and qtype in _GGML_TYPES:
        if ggml.requires_imatrix(int(qtype)):
            raise HerdError(f"quantizing to {qtype.name} needs an importance matrix")
    elif qtype not in _GGUF_TYPES:
        raise HerdError(
            f"quantizing to {qtype.name} needs ggml-python (pip install ggml-python==0.0.45)"
            if qtype in _GGML_TYPES
            else f"herd cannot quantize to {qtype.name}"
        )


def quantize(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """The GGUF data of float rows `array` (..., K) as `qtype`; HerdError if herd can't make it.

    F32, F16: the array cast, same shape. Other types: uint8 (..., bytes of one row).
    """
    if qtype == Q.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == Q.F16:
        # ggml's cast gives the same bits, but for NaN payloads (ggml makes every NaN 0x7e00)
        return np.ascontiguousarray(array, dtype=np.float16)
    check(qtype)
    a = np.ascontiguousarray(array, dtype=np.float32)
    k = a.shape[-1]
    block = GGML_QUANT_SIZES[qtype][0]
    if k % block:
        raise HerdError(f"cannot quantize rows of {k} values to {qtype.name} (blocks of {block})")
    ggml = _ggml()
    if ggml is None or qtype not in _GGML_TYPES:
        return gguf_quantize(a, qtype)
    out = np.empty(a.shape[:-1] + (ggml.row_size(int(qtype), k),), dtype=np.uint8)
    ggml.chunk(int(qtype), a.ctypes.data, out.ctypes.data, 0, a.size // k, k, None)
    return out
