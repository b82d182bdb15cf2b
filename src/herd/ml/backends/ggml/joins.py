"""Tensors put together from parts in one new tensor (`GGMLTensor.concat`, `concat_rows`):
each part copied into its place, by rows, where ggml_concat would copy element by element
(and cast to F32)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from herd.ml.backends.ggml import _lib as L
from herd.ml.backends.ggml._lib import TYPE_F32, ggml_permute
from herd.ml.backends.ggml.dtypes import FLOAT, IDENTITY, ne

if TYPE_CHECKING:
    from herd.ml.backends.ggml.context import GGMLContext
    from herd.ml.backends.ggml.tensor import GGMLTensor


def assembled(
    c: GGMLContext, shape: tuple[int, ...], parts: list[tuple[GGMLTensor, int]]
) -> GGMLTensor:
    """A new F32 tensor of `shape` with each part set into it at its byte offset, with the
    new tensor's strides: a chain of in-place sets, each a view of the last."""
    dims = ne(shape)
    out = c.node(L.ggml_new_tensor_4d(c.g, TYPE_F32, *dims))
    nb = L.tensor_nb(out)
    for part, at in parts:
        out = c.node(L.ggml_set_inplace(c.g, out, c.f32(part), nb[1], nb[2], nb[3], at))
    return c.out(L.ggml_reshape_4d(c.g, out, *dims) if len(shape) != 4 else out, shape)


def copied(
    c: GGMLContext, shape: tuple[int, ...], axis: int, parts: list[GGMLTensor]
) -> GGMLTensor | None:
    """Parts of one type (an F16 cache's keys, or its transposed values) concatenated by
    copying each one's rows into its place in a new tensor of that type, laid out in
    memory as the parts are (a transposed cache's values stay transposed): ggml_concat
    would cast them to F32 and copy element by element. The copies are forwards of the
    context: run before any node made later, which is every reader of the result, as the
    cache's writes are (ggml_cpy gives a view of its destination only). None where the
    parts' layouts differ."""
    g = len(shape) - 1 - axis  # the ggml dim of the concatenation
    orders = []
    for part in parts:  # each part's dims from the smallest stride: its layout in memory
        nb, pne = L.tensor_nb(part.p), ne(part.shape)  # (a dim of 1 has any stride: last)
        orders.append(sorted(range(4), key=lambda d, nb=nb, n=pne: (n[d] == 1, nb[d], d)))
    order = orders[0]
    if any(o != order for o in orders[1:]) or (parts[0].gtype not in FLOAT and order[0] != 0):
        return None
    dims = ne(shape)
    out = c.node(L.ggml_new_tensor_4d(c.g, parts[0].gtype, *(dims[d] for d in order)))
    nb = L.tensor_nb(out)
    step = nb[order.index(g)]  # bytes between two consecutive entries along the axis
    back = [order.index(d) for d in range(4)]  # physical dim of each logical one
    at = 0
    for part in parts:
        src = part.p if order == list(IDENTITY) else c.node(ggml_permute(c.g, part.p, *back))
        pne = ne(part.shape)
        dst = c.node(
            L.ggml_view_4d(c.g, out, *(pne[d] for d in order), nb[1], nb[2], nb[3], at * step)
        )
        copy = c.node(L.ggml_cpy(c.g, src, dst))
        # the new tensor is the copy's source too (ggml_cpy reads two): ggml's scheduler
        # places a tensor no op makes where a node reading it runs, and views of it run
        # where it lies; else it stays unplaced (an abort when a graph is split)
        L.set_tensor_src(copy, 2, out)
        c.forward_node(copy)
        at += pne[g]
    if order == list(IDENTITY):
        return c.out(out, shape, parts[0].gtype)
    return c.view(ggml_permute(c.g, out, *order), shape, parts[0].gtype)
