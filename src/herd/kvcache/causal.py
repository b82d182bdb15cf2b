"""The causal KV cache: cells tagged with a position and the sequences that share them.

Several sequences live in one cache without multiplying memory per slot: a cell holds one
token's keys and values for every layer and may belong to several sequences (a shared
prompt prefix). Each forward pass finds free cells for the batch, writes K/V there with
`set_rows`, and attends over the range of cells in use, masked by sequence, causality and
an optional sliding window or chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from herd.errors import CacheFullError
from herd.kvcache import attend, compact, nextstep, rows
from herd.kvcache.attend import ALIGN, BLOCK, Block
from herd.kvcache.nextstep import Decoded
from herd.kvcache.rows import Snapshot
from herd.ml import Backend, Context, DType, Tensor

# model.shift(ctx, layer, keys (N, Hkv, D), delta positions (N,) I32) -> re-roped keys
ShiftFn = Callable[[Context, int, Tensor, Tensor], Tensor]


@dataclass
class BatchLayout:
    """What a cache needs to know about a batch (a subset of models.Batch)."""

    positions: np.ndarray  # (T,) int32
    sequences: np.ndarray  # (T,) int32
    # (first row, rows) of each image's placeholder tokens (see `Causal(bidirectional=)`)
    spans: list[tuple[int, int]] = field(default_factory=list)


class Causal:
    """Causal (optionally sliding-window or chunked) attention cache.

    `padding`: the attended range is padded to a multiple of this many cells so graph
    backends see the same shapes for many decode steps in a row; None: the backend's
    `cache_config().pad`, read at `init` with the rest of how it wants its cache laid out.
    `bidirectional`: the placeholder tokens of one image (`BatchLayout.spans`) see each
    other whatever their order, a window still applying to the earlier ones (Gemma 3's
    image tokens: causal OR same image, AND the window, as transformers masks them).
    """

    def __init__(
        self,
        shift: ShiftFn | None = None,
        *,
        window: int | None = None,
        chunk: int | None = None,
        padding: int | None = None,
        bidirectional: bool = False,
    ) -> None:
        self.shift_fn, self.window, self.chunk = shift, window, chunk
        self.bidirectional = bidirectional
        self._padding = padding
        self.backend: Backend | None = None

    # ---- runner side -------------------------------------------------------------------
    def init(
        self, backend: Backend, dtype: DType, max_sequences: int, capacity: int, max_batch: int
    ) -> None:
        self.backend, self.dtype = backend, dtype
        config = backend.cache_config()
        self.padding = self._padding or config.pad
        self.mask_dtype, self.flash = config.mask_dtype, config.flash_attention
        size = max_sequences * capacity
        self.capacity = capacity  # sequence i's own part of the cache: from i * capacity
        self.size = -(-size // self.padding) * self.padding
        # the parts as one (sequences, capacity) array view, where the sizes allow it
        self.streams = config.streams and self.size == size and max_sequences > 1
        self.max_batch = max_batch
        self.pos = np.full(self.size, -1, dtype=np.int32)  # -1: free
        self.member = np.zeros((self.size, max_sequences), dtype=bool)  # cell x sequence
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.layer = 0
        self.moved = 0  # cells moved to keep the cache compact (`_move`)
        self._step: Decoded | None = None  # see _next_step
        self._planned: BatchLayout | None = None  # the batch the inputs below are for
        # values kept transposed, (Hkv, Dv, cells), where the backend asks for it:
        # attention's V operand is then a plain view instead of a copy of the whole
        # attended range per layer and step (~1.4 ms a token on SmolLM2). Never for
        # quantized types: a column is no whole block.
        self.v_trans = config.v_transposed and dtype in (DType.F32, DType.F16, DType.BF16)

    def used_cells(self) -> int:
        return int(np.count_nonzero(self.pos >= 0))

    def start_forward(self, ctx: Context, batch: BatchLayout) -> None:
        """Claim cells for the batch's tokens and build the mask for this pass.

        Called again with the same batch (a graph built after its inputs were recorded for
        reuse), it only binds the planned inputs to the new context.
        """
        if batch is not self._planned:
            self._plan(batch)
            self._planned = batch
        self.ctx = ctx
        self.locs = ctx.input(self._locs, DType.I32)
        self.mask = ctx.input(self._mask_array, self.mask_dtype)
        self.block_masks = [ctx.input(m, self.mask_dtype) for m in self._block_arrays]

    def view_key(self) -> tuple[int, int, tuple[tuple[int, int, int, int, int], ...]]:
        """The attended cell range of this pass and its blocks: graphs over equal ranges
        are reusable."""
        return self.lo, self.hi, tuple(self._blocks)

    def _plan(self, batch: BatchLayout) -> None:
        n = len(batch.positions)
        if self._step is not None and self._next_step(batch):
            return
        self._step = None
        free = int(np.count_nonzero(self.pos < 0))
        if free < n:
            raise CacheFullError(f"KV cache full: {n} cells needed, {free} free of {self.size}")
        seqs = batch.sequences
        first = int(seqs[0])
        one_sequence = n == 1 or bool((seqs == first).all())
        if not one_sequence and self._sharing(seqs):
            self._plan_together(batch)
            return
        locs = np.empty(n, dtype=np.int64)
        moved = False
        # each sequence's tokens after its own cells, its cells moved together when they
        # lie apart: a block of queries then attends its own sequence's stretch only
        # (`_plan_blocks`), not the range across every sequence in the batch
        for seq in [first] if one_sequence else dict.fromkeys(seqs.tolist()):
            mine = np.flatnonzero(seqs == seq)
            cells = self._place(self.pos < 0, seq, len(mine))
            if compact.scattered(self.member[:, seq], cells, self.padding):
                start = seq * self.capacity
                end = min(self.size, start + self.capacity)
                planned = compact.home(self.pos, self.member, seq, len(mine), start, end)
                src, dst, cells = planned or compact.gather(
                    self.pos, self.member, np.array([seq]), len(mine), self.padding
                )
                self._move(src, dst)
                moved = True
            self.pos[cells] = batch.positions[mine]
            self.member[cells] = False
            self.member[cells, seq] = True
            locs[mine] = cells
        if moved and not one_sequence:  # a later move may have packed earlier ones' cells
            locs = self._cells_of(batch)
        self._finish_plan(batch, locs)

    def _sharing(self, seqs: np.ndarray) -> bool:
        """Whether any of these sequences share cells (a prefix given by `copy_prefix`)."""
        group = np.unique(seqs)
        return bool((self.member[:, group].sum(axis=1) > 1).any())

    def _plan_together(self, batch: BatchLayout) -> None:
        """Sequences that share cells grow apart from one stretch, which they cannot all
        continue: their new cells go near the group's and the group moves as one."""
        n, seqs = len(batch.positions), batch.sequences
        group = np.unique(seqs)
        free = np.flatnonzero(self.pos < 0)
        mine = self.member[:, group].any(axis=1)
        locs = compact.near(free, mine, n)
        if compact.scattered(mine, locs, self.padding):
            src, dst, locs = compact.gather(self.pos, self.member, group, n, self.padding)
            self._move(src, dst)
        self.pos[locs] = batch.positions
        self.member[locs] = False
        self.member[locs, seqs] = True
        self._finish_plan(batch, locs)

    def _finish_plan(self, batch: BatchLayout, locs: np.ndarray) -> None:
        """The attended range, mask and blocks for the batch's planned cells `locs`."""
        n, seqs = len(batch.positions), batch.sequences
        first = int(seqs[0])
        one_sequence = n == 1 or bool((seqs == first).all())
        # the cells of the batch's sequences (one column in the usual one-sequence batch)
        if one_sequence:
            in_use = np.flatnonzero(self.member[:, first])
        else:
            in_use = np.flatnonzero(self.member[:, np.unique(seqs)].any(axis=1))
        lo, hi = int(in_use[0]), int(in_use[-1]) + 1
        lo = lo // self.padding * self.padding
        hi = min(self.size, -(-hi // self.padding) * self.padding)
        self.lo, self.hi = lo, hi
        self._locs = locs.astype(np.int32)
        self._mask_array = self._mask(batch, lo, hi)
        if self.bidirectional:
            for row, rows in batch.spans:  # a span's tokens are in this batch, all of them
                span = np.arange(row, row + rows)
                seen = np.ones((rows, rows), dtype=bool)
                if self.window is not None:  # (query, key): key not older than the window
                    pos = batch.positions[span]
                    seen = pos[:, None] - pos[None, :] < self.window
                block = self._mask_array[np.ix_(span, locs[span] - lo)]
                block[seen] = 0
                self._mask_array[np.ix_(span, locs[span] - lo)] = block
        self._blocks = self._plan_blocks(batch)
        self._block_arrays = []
        for block in self._blocks:
            a, b, s, e, runs = block
            piece = self._mask_array[a:b, s:e] if not runs else self._stream_mask(batch, block)
            self._block_arrays.append(np.ascontiguousarray(piece))
        self._step = nextstep.decoded(self.member, batch, locs)

    def _place(self, is_free: np.ndarray, seq: int, n: int) -> np.ndarray:
        """Cells for n tokens of one sequence: right after its last cell when those are
        free, else the first free stretch with room to grow (`padding` more cells), else
        the lowest free cells. A sequence then stays in one stretch, and its attended range
        (first to last cell) covers little else: taking the lowest free cells instead
        scattered a new conversation among the cached ones of other slots (one sequence
        decoded 1.5x slower after 8 cached conversations, attending 1408 cells for 164).
        A sequence that keeps a cached prefix far from its new stretch moves it there
        (`compact.scattered`, in `_plan`)."""
        mine = np.flatnonzero(self.member[:, seq])
        if len(mine):
            start = int(mine[-1]) + 1
            if start + n <= self.size and is_free[start : start + n].all():
                return np.arange(start, start + n)
        else:  # a new sequence starts its slot's own part of the cache when it is free
            home = seq * self.capacity
            if is_free[home : min(self.size, home + self.capacity)].all():
                return np.arange(home, home + n)
        need = n + self.padding
        starts, ends = compact.free_runs(is_free)
        fits = np.flatnonzero(ends - starts >= need)
        if len(fits):
            start = int(starts[fits[0]])
            return np.arange(start, start + n)
        return np.flatnonzero(is_free)[:n]

    def _cells_of(self, batch: BatchLayout) -> np.ndarray:
        """The cell holding each of the batch's (sequence, position)s."""
        locs = np.empty(len(batch.positions), dtype=np.int64)
        for seq in np.unique(batch.sequences):
            mine = np.flatnonzero(batch.sequences == seq)
            cells = np.flatnonzero(self.member[:, seq])
            order = np.argsort(self.pos[cells])
            at = np.searchsorted(self.pos[cells], batch.positions[mine], sorter=order)
            locs[mine] = cells[order[at]]
        return locs

    def _next_step(self, batch: BatchLayout) -> bool:
        """Plan a decode step from the last one where it is that step's successor (any
        other plan, removal or copy forgets `_step`): `herd.kvcache.nextstep`."""
        assert self._step is not None
        seqs = self._step.seqs
        locs = nextstep.follows(self._step, batch, self, self._blocks)
        if locs is None:
            return False
        self.pos[locs] = batch.positions
        self.member[locs] = False
        self.member[locs, seqs] = True
        self._mask_array, self._block_arrays = nextstep.masks(
            self, self._mask_array, self._blocks, self._block_arrays, batch.positions, locs
        )
        self._locs = locs.astype(np.int32)
        self._step = Decoded(seqs, batch.positions.copy(), locs)
        return True

    def _plan_blocks(self, batch: BatchLayout) -> list[Block]:
        """How the batch's query rows attend, in row order (`herd.kvcache.attend`): (first
        row, end row, first cell, end cell, 0) for a block of one sequence's rows over
        cells of the attended range, or (first row, end row, first sequence, cells, N)
        for a run of N decoding sequences (`_streams`). None of either where blocks
        would save nothing."""
        mask, seqs = self._mask_array, batch.sequences
        t, n = mask.shape
        cuts = np.flatnonzero(seqs[1:] != seqs[:-1]) + 1  # where the sequence changes
        if len(cuts) == 0 and (self.flash or t <= BLOCK):
            return []
        streams = self._streams(batch, cuts)
        step = t if self.flash else BLOCK
        blocks = attend.row_blocks(mask, cuts, streams, step, min(ALIGN, self.padding))
        if not streams and all(e - s == n for _, _, s, e, _ in blocks):
            return []
        return sorted(blocks + streams)

    def _streams(self, batch: BatchLayout, cuts: np.ndarray) -> list[Block]:
        """The batch's runs of decoding sequences (`attend.decoding_runs`), where the
        backend attends them in one op and the parts are one (sequences, capacity) view."""
        if not self.streams or batch.spans:
            return []
        return attend.decoding_runs(self.member, batch.sequences, cuts, self.capacity, self.padding)

    def _stream_mask(self, batch: BatchLayout, run: Block) -> np.ndarray:
        """(N, 1, cells) mask of a run: its row i is sequence seq + i's, over the first
        `cells` of that sequence's part."""
        row, _, seq, cells, n = run
        out = np.empty((n, 1, cells), dtype=np.float32)
        for i in range(n):
            home = (seq + i) * self.capacity
            one = slice(row + i, row + i + 1)
            out[i] = self._mask(
                BatchLayout(batch.positions[one], batch.sequences[one]), home, home + cells
            )
        return out

    def _mask(self, batch: BatchLayout, lo: int, hi: int) -> np.ndarray:
        return attend.causal_mask(
            self.pos, self.member, batch.positions, batch.sequences, lo, hi, self.window, self.chunk
        )

    def remove(self, seq: int, begin: int, end: int | None = None) -> None:
        """Drop seq's tokens at positions [begin, end); later ones move back and re-rope."""
        self._step = None
        mine = self.member[:, seq]
        drop = mine & (self.pos >= begin)
        if end is not None:
            drop &= self.pos < end
        self.member[drop, seq] = False
        self.pos[drop & ~self.member.any(axis=1)] = -1
        if end is None or end == begin:
            return
        moved = np.flatnonzero(self.member[:, seq] & (self.pos >= end))
        if len(moved) == 0:
            return
        if self.member[moved].sum(axis=1).max() > 1:
            raise NotImplementedError("cannot shift cells shared with another sequence")
        if self.shift_fn is None:
            raise NotImplementedError("this model does not support shifting the cache")
        self.pos[moved] -= end - begin
        self._shift(moved.astype(np.int32), begin - end)

    def _shift(self, cells: np.ndarray, delta: int) -> None:
        assert self.backend is not None and self.shift_fn is not None
        for start in range(0, len(cells), max(1, self.max_batch)):
            part = cells[start : start + self.max_batch]
            with self.backend.new_context() as ctx:
                idx = ctx.input(part, DType.I32)
                deltas = ctx.input(np.full(len(part), delta, dtype=np.int32), DType.I32)
                for layer, keys in self.keys.items():
                    shifted = self.shift_fn(ctx, layer, keys.get_rows(idx), deltas)
                    ctx.forward(keys.set_rows(idx, shifted))
                ctx.compute()

    def _move(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Move cells src to dst (free or among src): their tags, and their K/V rows in
        every layer, all read before any is written (one graph: the moves may overlap)."""
        if len(src) == 0:
            return
        self._step = None
        self.moved += len(src)
        pos, member = self.pos[src].copy(), self.member[src].copy()
        self.pos[src], self.member[src] = -1, False
        self.pos[dst], self.member[dst] = pos, member
        if self.keys:
            assert self.backend is not None
            rows.move(self.backend, self.keys, self.values, src, dst, self.v_trans)

    def defragment(self) -> None:
        """Pack every used cell from cell 0, each sequence's cells together in position
        order (shared cells once, with their lowest sequence): no holes, and every
        sequence that shares nothing in one run."""
        self._move(*compact.packed(self.pos, self.member))

    def stats(self) -> dict[str, float]:
        """Cells in use, the cache's size, its fragmentation (cells inside each sequence's
        range that are not its own, over those ranges) and the cells moved to keep it
        compact so far."""
        return {
            "cells_used": self.used_cells(),
            "cells": self.size,
            "fragmentation": compact.fragmentation(self.member),
            "cells_moved": self.moved,
        }

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Let dst share src's cells for positions < n (no K/V copied)."""
        self._step = None
        self.remove(dst, 0, None)
        self.member[self.member[:, src] & (self.pos < n), dst] = True

    def snapshot(
        self, seq: int, n: int, base: Snapshot | None = None, start: int = 0
    ) -> Snapshot | None:
        """A host copy of seq's keys and values at positions < n, in position order, for
        `restore` into any sequence later (the runner's prompt cache); None when those
        positions are not all held. With a base (a snapshot of a prompt seq starts with,
        to `start`), only positions start.. are copied: the rest are base's."""
        base = base.on(start) if base is not None and 0 < start < n else None
        start = start if base is not None else 0
        mine = self.member[:, seq] & (self.pos >= start) & (self.pos < n)
        cells = np.flatnonzero(mine)
        cells = cells[np.argsort(self.pos[cells], kind="stable")]
        if n <= 0 or len(cells) != n - start or not self.keys:
            return None
        if (self.pos[cells] != np.arange(start, n)).any():
            return None
        assert self.backend is not None
        snap = rows.read(self.backend, self.keys, self.values, cells, self.v_trans, self.dtype)
        snap.start, snap.base = start, base
        return snap

    def restore(self, seq: int, snap: Snapshot, n: int) -> bool:
        """Make seq hold snap's first n positions (its cells dropped first): cells placed
        as a new sequence's and their rows written. False, with seq left empty, when the
        cache has not the room or the snapshot is not of this cache's kind."""
        self.remove(seq, 0, None)
        assert self.backend is not None
        if int(np.count_nonzero(self.pos < 0)) < n:
            return False
        if not rows.can_write(self.backend, self.keys, self.values, snap):
            return False
        cells = self._place(self.pos < 0, seq, n)
        self.pos[cells] = np.arange(n, dtype=np.int32)
        self.member[cells] = False
        self.member[cells, seq] = True
        rows.write(self.backend, self.keys, self.values, cells, snap, self.v_trans)
        return True

    def can_resume(self, seq: int, pos: int) -> bool:
        return True  # every cell is kept, so any prefix can be resumed

    def seq_length(self, seq: int) -> int:
        """1 + the highest position stored for seq (0 when empty)."""
        mine = self.member[:, seq]
        return int(self.pos[mine].max()) + 1 if mine.any() else 0

    # ---- model side --------------------------------------------------------------------
    def set_layer(self, layer: int) -> None:
        self.layer = layer

    def put(self, k: Tensor, v: Tensor) -> None:
        """k (T, Hkv, D), v (T, Hkv, Dv) for the current layer."""
        if self.layer not in self.keys:
            assert self.backend is not None, "cache used before init"
            # on the layer's device when the backend offloads it
            shape_k, shape_v = (self.size, *k.shape[1:]), (self.size, *v.shape[1:])
            if self.v_trans:
                shape_v = (*v.shape[1:], self.size)
            self.keys[self.layer] = self.backend.alloc(shape_k, self.dtype, layer=self.layer)
            self.values[self.layer] = self.backend.alloc(shape_v, self.dtype, layer=self.layer)
        self.ctx.forward(
            self.keys[self.layer].set_rows(self.locs, k),
            rows.write_values(self.values[self.layer], self.locs, v, self.v_trans),
        )

    def blocks(self) -> list[tuple[int, int, Tensor, Tensor, Tensor]]:
        """The pass's attention blocks in row order, (first row, end row, keys, values,
        mask): keys (S, Hkv, D), values (S, Hkv, Dv) and mask (rows, S) over cells of
        `get`'s range, or for N decoding sequences attended together (`_streams`) keys
        (N, S, Hkv, D), values (N, S, Hkv, Dv) and mask (N, 1, S) over each one's own
        part. Empty: attend in one piece."""
        if not self._blocks:
            return []
        keys = self.ctx.attach(self.keys[self.layer])
        values = self.ctx.attach(self.values[self.layer])
        k = v = None  # the attended range's, made for the first block that needs them
        out = []
        for block, m in zip(self._blocks, self.block_masks, strict=True):
            a, b, s, e, n = block
            if n:
                p = self.member.shape[1]
                ks, vs = attend.part_views(keys, values, p, self.capacity, block, self.v_trans)
                out.append((a, b, ks, vs, m))
                continue
            if k is None or v is None:
                k, v, _ = self.get()
            out.append((a, b, k.slice(0, s, e), v.slice(0, s, e), m))
        return out

    def get(self) -> tuple[Tensor, Tensor, Tensor]:
        """Keys (S, Hkv, D), values (S, Hkv, Dv) and mask (T, S) over the used range."""
        k = self.ctx.attach(self.keys[self.layer]).slice(0, self.lo, self.hi)
        v = self.ctx.attach(self.values[self.layer])
        if self.v_trans:  # (Hkv, Dv, S) viewed as (S, Hkv, Dv)
            v = v.slice(2, self.lo, self.hi).permute(2, 0, 1)
        else:
            v = v.slice(0, self.lo, self.hi)
        return k, v, self.mask
