"""ggml's element types against herd's, and shapes at the ctypes boundary.

Shapes are NumPy order everywhere in this backend and ggml order (`ne`, innermost first)
only at the ctypes calls: herd (a, b, c) is ggml ne [c, b, a].
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from herd.ml.backends.ggml import _lib as L
from herd.ml.backends.ggml._lib import TYPE_F16, TYPE_F32, TYPE_I32
from herd.ml.base import DType

GTYPE = {
    DType.F32: TYPE_F32,
    DType.F16: TYPE_F16,
    DType.BF16: L.TYPE_BF16,
    DType.I32: TYPE_I32,
    DType.Q8_0: L.TYPE_Q8_0,
    DType.Q4_0: L.TYPE_Q4_0,
}
DTYPE = {g: d for d, g in GTYPE.items()}
NP_IN = {TYPE_F32: np.float32, TYPE_F16: np.float16, TYPE_I32: np.int32}  # host inputs
NP_OUT = {TYPE_F32: np.float32, TYPE_I32: np.int32}  # what `compute` returns
TYPE_SIZE = {t: L.ggml_type_size(t) for t in range(L.TYPE_COUNT)}
BLOCK = {t: L.ggml_blck_size(t) for t in range(L.TYPE_COUNT)}
FLOAT = (TYPE_F32, TYPE_F16, L.TYPE_BF16)

# layout of a tensor: fully contiguous, contiguous rows only (dim 0), strided
CONT, ROWS, STRIDED = 2, 1, 0
RESHAPE: tuple[Any, ...] = (
    None,
    L.ggml_reshape_1d,
    L.ggml_reshape_2d,
    L.ggml_reshape_3d,
    L.ggml_reshape_4d,
)


def ne(shape: tuple[int, ...]) -> list[int]:
    """herd shape -> ggml ne (4 entries, innermost first)."""
    out = list(reversed(shape))
    return out + [1] * (4 - len(out))


IDENTITY = (0, 1, 2, 3)
PERMS: dict[tuple[int, ...], tuple[int, ...]] = {}


def perm_arg(axes: tuple[int, ...]) -> tuple[int, ...]:
    """ggml_permute's argument for a NumPy-style permutation (cached in PERMS per axes)."""
    n = len(axes)
    assert sorted(axes) == list(range(n)) and n <= 4, f"permute by {axes}"
    # herd axis k is ggml axis n-1-k; ggml_permute sends source axis j to dest perm[j]
    p = [0, 1, 2, 3]
    for i, a in enumerate(axes):
        p[n - 1 - a] = n - 1 - i
    PERMS[axes] = IDENTITY if tuple(p) == IDENTITY else tuple(p)
    return PERMS[axes]


def type_name(gtype: int) -> str:
    try:
        return GGMLQuantizationType(gtype).name
    except ValueError:
        return f"type {gtype}"


def compute_types() -> set[int]:
    """ggml types this build's CPU backend can multiply with (weights it can run)."""
    ok = {TYPE_F32, TYPE_I32}
    for t in range(L.TYPE_COUNT):
        if BLOCK[t] > 0 and L.ggml_get_type_traits_cpu(t).contents.vec_dot:
            ok.add(t)
    return ok
