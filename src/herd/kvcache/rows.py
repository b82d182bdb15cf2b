"""The KV rows of cells, moved within the cache or copied to host memory and back.

`Causal` decides which cells (`causal.py`); this moves their keys and values in every
layer. Where the backend shows the cache's tensors as host arrays (`HostTensors`), rows
are copied as the cache's own bytes; elsewhere (a GPU's cache) a pass gathers or scatters
them. A transposed V cache (`CacheConfig.v_transposed`) holds a cell as a column.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from herd.ml import Backend, Context, DType, HostTensors, Tensor

Layers = dict[int, Tensor]  # layer -> the cache's keys (or values) of that layer


@dataclass
class Snapshot:
    """Host copies of one sequence's K/V rows, (positions, Hkv, D) per layer: D in bytes
    for a block-quantized cache's raw rows, and a transposed cache's raw values as it
    holds them, (Hkv, Dv, positions)."""

    keys: dict[int, np.ndarray]
    values: dict[int, np.ndarray]
    raw: bool  # the cache's own bytes (`HostTensors`), else float rows from a pass
    # the rows of positions start.. only: those before are base's (a kept prompt this one
    # extends, e.g. a shared system prompt), not copied again
    start: int = 0
    base: Snapshot | None = None

    @property
    def nbytes(self) -> int:
        """The bytes of its own rows (its base's are counted there)."""
        return sum(a.nbytes for a in (*self.keys.values(), *self.values.values()))

    @property
    def length(self) -> int:
        """How many positions it holds, its base's included."""
        first = next(iter(self.keys.values()), None)
        return self.start + (0 if first is None else len(first))

    def pieces(self) -> list[Snapshot]:
        """Itself and the snapshots it builds on, each holding rows of its own."""
        return [self] + (self.base.pieces() if self.base is not None else [])

    def on(self, start: int) -> Snapshot | None:
        """The snapshot holding this one's positions < start as rows of its own (itself, or
        one it builds on): what another may build on, never a chain of bases."""
        snap: Snapshot | None = self
        while snap is not None and snap.start >= start > 0:
            snap = snap.base
        return snap if start > 0 else None


def as_slice(cells: np.ndarray) -> np.ndarray | slice:
    """A run of consecutive cells as a slice (a sequence's cells usually are one): NumPy
    copies a slice along the cells' axis at memory speed, an index array element by
    element."""
    if len(cells) and (np.diff(cells) == 1).all():
        return slice(int(cells[0]), int(cells[-1]) + 1)
    return cells


def write_values(values: Tensor, idx: Tensor, rows: Tensor, v_trans: bool) -> Tensor:
    """rows (N, Hkv, Dv) written to cells idx of a layer's values."""
    return values.set_columns(idx, rows.permute(1, 2, 0)) if v_trans else values.set_rows(idx, rows)


def _read_values(
    ctx: Context, values: Tensor, cells: np.ndarray, idx: Tensor, v_trans: bool
) -> Tensor:
    """The values of cells (N, Hkv, Dv); a transposed V's are read as rows from the range
    the cells span only."""
    if not v_trans:
        return ctx.attach(values).get_rows(idx)
    lo, hi = int(cells.min()), int(cells.max()) + 1
    near = ctx.input((cells - lo).astype(np.int32), DType.I32)
    rows = ctx.attach(values).slice(2, lo, hi).permute(2, 0, 1).contiguous()
    return rows.get_rows(near)


def move(
    backend: Backend, keys: Layers, values: Layers, src: np.ndarray, dst: np.ndarray, v_trans: bool
) -> None:
    """Rows of cells src to cells dst in every layer, all read before any is written (one
    pass: the moves may overlap)."""
    with backend.new_context() as ctx:
        i_src = ctx.input(src.astype(np.int32), DType.I32)
        i_dst = ctx.input(dst.astype(np.int32), DType.I32)
        for layer, k in keys.items():
            ctx.forward(k.set_rows(i_dst, ctx.attach(k).get_rows(i_src)))
            rows = _read_values(ctx, values[layer], src, i_src, v_trans)
            ctx.forward(write_values(values[layer], i_dst, rows, v_trans))
        ctx.compute()


def _host_views(
    backend: Backend, keys: Layers, values: Layers
) -> Sequence[tuple[int, np.ndarray, np.ndarray]] | None:
    """(layer, keys, values) as arrays over host memory, for every layer; None unless the
    backend shows them all."""
    if not isinstance(backend, HostTensors):
        return None
    out = []
    for layer in sorted(keys):
        k, v = backend.host_view(keys[layer]), backend.host_view(values[layer])
        if k is None or v is None:
            return None
        out.append((layer, k, v))
    return out


def read(
    backend: Backend, keys: Layers, values: Layers, cells: np.ndarray, v_trans: bool, dtype: DType
) -> Snapshot:
    """A host copy of the rows of cells, in their order (the caller sets `start` and
    `base` when they are a sequence's later positions)."""
    views = _host_views(backend, keys, values)
    if views is not None:  # the bytes themselves, whatever the type
        at = as_slice(cells)
        # a transposed V is kept as (Hkv, Dv, n): no transposing copy either way
        parts = [(layer, k[at], v[..., at] if v_trans else v[at]) for layer, k, v in views]
        copies = _copies([a for _, k, v in parts for a in (k, v)])
        return Snapshot({layer: copies[2 * i] for i, (layer, _, _) in enumerate(parts)},
                        {layer: copies[2 * i + 1] for i, (layer, _, _) in enumerate(parts)},
                        raw=True)  # fmt: skip
    layers = sorted(keys)
    with backend.new_context() as ctx:
        idx = ctx.input(cells.astype(np.int32), DType.I32)
        outs = []
        for layer in layers:
            outs.append(ctx.attach(keys[layer]).get_rows(idx))
            outs.append(_read_values(ctx, values[layer], cells, idx, v_trans))
        arrays = ctx.compute(*outs)
    # F16 rows are kept as F16 (exact, half the memory); other types as they come back
    host = np.float16 if dtype == DType.F16 else np.float32
    rows = [np.ascontiguousarray(a, dtype=host) for a in arrays]
    return Snapshot(dict(zip(layers, rows[0::2], strict=True)),
                    dict(zip(layers, rows[1::2], strict=True)), raw=False)  # fmt: skip


def _copies(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Copies of arrays, in one block of new host memory whose pages the OS maps at once
    where it can (Linux's MAP_POPULATE): copied into arrays of their own, one by one,
    300 SmolLM2 cells (6.9 MB) took 4.6-5 ms, most of it in page faults, under the
    runner's lock as a new chat took a slot; 2.8 ms so."""
    align = 64
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.nbytes // align) * align
    block = _mapped(total)
    if block is None:  # no MAP_POPULATE here, or the map refused: NumPy's allocator
        block = np.empty(total, np.uint8)
    out = []
    for a, at in zip(arrays, offsets, strict=True):
        copy = block[at : at + a.nbytes].view(a.dtype).reshape(a.shape)
        np.copyto(copy, a)
        out.append(copy)
    return out


def _mapped(nbytes: int) -> np.ndarray | None:
    """nbytes of anonymous memory with its pages mapped up front, or None."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if not populate or not nbytes:
        return None
    try:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), np.uint8)
    except OSError:
        return None


def can_write(backend: Backend, keys: Layers, values: Layers, snap: Snapshot) -> bool:
    """Whether `write` takes snap here: the same layers, copied the way this cache is."""
    raw = _host_views(backend, keys, values) is not None
    return all(p.raw == raw and set(p.keys) == set(keys) for p in snap.pieces())


def write(
    backend: Backend,
    keys: Layers,
    values: Layers,
    cells: np.ndarray,
    snap: Snapshot,
    v_trans: bool,
    first: int = 0,
) -> None:
    """snap's positions first.. first + len(cells) into cells (`can_write` said it fits)."""
    if snap.base is not None and first < snap.start:  # the positions it builds on first
        write(backend, keys, values, cells[: snap.start - first], snap.base, v_trans, first)
        cells, first = cells[snap.start - first :], snap.start
    n = len(cells)
    if not n:
        return
    at_row = first - snap.start  # where its own rows for position `first` start
    if at_row:
        snap = Snapshot({layer: a[at_row:] for layer, a in snap.keys.items()},
                        {layer: a[..., at_row:] if v_trans and snap.raw else a[at_row:]
                         for layer, a in snap.values.items()}, snap.raw)  # fmt: skip
    views = _host_views(backend, keys, values)
    if views is not None:
        at = as_slice(cells)
        for layer, k, v in views:
            k[at] = snap.keys[layer][:n]
            if v_trans:
                v[..., at] = snap.values[layer][..., :n]
            else:
                v[at] = snap.values[layer][:n]
        return
    with backend.new_context() as ctx:
        idx = ctx.input(cells.astype(np.int32), DType.I32)
        for layer, k in keys.items():
            key_rows = ctx.input(snap.keys[layer][:n].astype(np.float32), DType.F32)
            value_rows = ctx.input(snap.values[layer][:n].astype(np.float32), DType.F32)
            ctx.forward(
                k.set_rows(idx, key_rows), write_values(values[layer], idx, value_rows, v_trans)
            )
        ctx.compute()
