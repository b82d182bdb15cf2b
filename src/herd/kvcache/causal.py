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
Keys = Tensor | tuple[Tensor, Tensor]  # a block's keys or values: (prefix's, its own) or one


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
        pre = self._prefix_array
        self.prefix_mask = None if pre is None else ctx.input(pre, self.mask_dtype)
        self.block_masks = [ctx.input(m, self.mask_dtype) for m in self._block_arrays]

    def view_key(self) -> tuple[object, ...]:
        """The attended cell range of this pass, its blocks and its prefix: graphs over
        equal ranges are reusable."""
        view = None if self._prefix is None else self._prefix_view()
        return self.lo, self.hi, tuple(self._blocks), self._prefix, view

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
        locs = np.empty(n, dtype=np.int64)
        moved = False
        # each sequence's tokens after its own cells, its cells moved together when they
        # lie apart: a block of queries then attends its own sequence's stretch only
        # (`_plan_blocks`), not the range across every sequence in the batch
        for seq in [first] if one_sequence else dict.fromkeys(seqs.tolist()):
            mine = np.flatnonzero(seqs == seq)
            cells = self._place(self.pos < 0, seq, len(mine))
            own = self._own(seq)
            if compact.scattered(own, cells, self.padding):
                start = seq * self.capacity
                end = min(self.size, start + self.capacity)
                planned = compact.home(self.pos, self.member, seq, len(mine), start, end, own)
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

    def _stretch(self, seq: int) -> tuple[int, int] | None:
        """The cells seq shares with other sequences, when they are one run of cells: a
        prefix held once for them (`copy_prefix`), attended as a piece of its own
        (`prefix`) rather than across whatever lies between it and their own cells.
        None when it shares none, or they lie apart."""
        cells = np.flatnonzero(self.member[:, seq])
        shared = cells[self.member[cells].sum(axis=1) > 1]
        if len(shared) == 0 or int(shared[-1]) - int(shared[0]) + 1 != len(shared):
            return None
        return int(shared[0]), int(shared[-1]) + 1

    def _own(self, seq: int) -> np.ndarray:
        """A mask of seq's cells, the shared prefix it attends as a piece left out: what
        must lie together for its attention to cost its own length."""
        mine = self.member[:, seq].copy()
        stretch = self._stretch(seq)
        if stretch is not None:
            mine[stretch[0] : stretch[1]] = False
        return mine

    def _batch_prefix(self, seqs: np.ndarray) -> tuple[int, int] | None:
        """The one prefix stretch (`_stretch`) of the batch's sequences that have one;
        None when none has, or theirs differ (then the range spans them all)."""
        found = None
        for seq in np.unique(seqs).tolist():
            cells = np.flatnonzero(self.member[:, seq])
            if not (self.member[cells].sum(axis=1) > 1).any():
                continue
            stretch = self._stretch(seq)
            if stretch is None or (found is not None and stretch != found):
                return None
            found = stretch
        return found

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
        # a prefix shared from another sequence's part is a piece of its own: the range
        # then covers the batch's own cells, not every part between them and it
        prefix = self._batch_prefix(seqs)
        if prefix is not None:
            in_use = in_use[(in_use < prefix[0]) | (in_use >= prefix[1])]
            if len(in_use) == 0:  # nothing of their own yet: the prefix is the range
                in_use, prefix = np.arange(*prefix), None
        self._prefix = prefix
        # a prompt's rows take the prefix rounded up (see `_prefix_view`); decoding rows
        # not: one row a sequence runs no tiled GEMM, and 8 streams would attend more
        self._prefix_align = ALIGN if len(np.unique(seqs)) < n else 1
        self.lo, self.hi = lo, hi = self._range(in_use)
        self._locs = locs.astype(np.int32)
        self._mask_array = self._mask(batch, lo, hi)
        self._prefix_array = None if prefix is None else self._prefix_mask(batch)
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
            piece = self._row_mask(a, b, s, e) if not runs else self._stream_mask(batch, block)
            self._block_arrays.append(np.ascontiguousarray(piece))
        self._step = nextstep.decoded(self.member, batch, locs, self.capacity)

    def _range(self, cells: np.ndarray) -> tuple[int, int]:
        """The padded range from the first of cells to the last."""
        lo, hi = int(cells[0]), int(cells[-1]) + 1
        return lo // self.padding * self.padding, min(
            self.size, -(-hi // self.padding) * self.padding
        )

    def _row_mask(self, a: int, b: int, s: int, e: int) -> np.ndarray:
        """The mask of a block of rows a..b over range cells s..e, after the prefix's."""
        if self._prefix_array is None:
            return self._mask_array[a:b, s:e]
        return np.concatenate([self._prefix_array[a:b], self._mask_array[a:b, s:e]], axis=1)

    def _place(self, is_free: np.ndarray, seq: int, n: int) -> np.ndarray:
        """Cells for n tokens of one sequence: right after its last cell when those are
        free, else the first free stretch with room to grow (`padding` more cells), else
        the lowest free cells. A sequence then stays in one stretch, and its attended range
        (first to last cell) covers little else: taking the lowest free cells instead
        scattered a new conversation among the cached ones of other slots (one sequence
        decoded 1.5x slower after 8 cached conversations, attending 1408 cells for 164).
        A sequence that keeps a cached prefix far from its new stretch moves it there
        (`compact.scattered`, in `_plan`)."""
        home = seq * self.capacity
        end = min(self.size, home + self.capacity)
        mine = np.flatnonzero(self.member[:, seq])
        alone = mine[self.member[mine].sum(axis=1) == 1]  # a shared prefix lies apart
        inside = alone[(alone >= home) & (alone < end)]
        if len(alone):  # after its last cell, in its part when it has any
            start = int((inside if len(inside) else alone)[-1]) + 1
            if start + n <= self.size and is_free[start : start + n].all():
                return np.arange(start, start + n)
        elif len(mine) == 0 and is_free[home:end].all():
            # a new sequence starts its slot's own part of the cache when it is free
            return np.arange(home, home + n)
        # else the first free stretch of its part with room: a shared prefix may lie at
        # its start or end (`_lend`), and its part is where a run of streams looks
        starts, ends = compact.free_runs(is_free[home:end])
        fits = np.flatnonzero(ends - starts >= min(n + self.padding, end - home))
        if len(fits) and ends[fits[0]] - starts[fits[0]] >= n:
            start = home + int(starts[fits[0]])
            return np.arange(start, start + n)
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
        return attend.decoding_runs(
            self.member, batch.sequences, cuts, self.capacity, self.padding, self._prefix
        )

    def _stream_mask(self, batch: BatchLayout, run: Block) -> np.ndarray:
        """(N, 1, P + cells) mask of a run: its row i is sequence seq + i's, over the
        batch's prefix (P cells, none without one) and the first `cells` of that
        sequence's part."""
        row, _, seq, cells, n = run
        pre = self._prefix_cells()
        out = np.empty((n, 1, len(pre) + cells), dtype=np.float32)
        for i in range(n):
            home = (seq + i) * self.capacity
            one = BatchLayout(
                batch.positions[row + i : row + i + 1], batch.sequences[row + i : row + i + 1]
            )
            out[i, :, len(pre) :] = self._mask(one, home, home + cells)
            if len(pre):
                out[i, :, : len(pre)] = self._prefix_mask(one)
        return out

    def _prefix_view(self) -> tuple[int, int]:
        """The cells attended as the pass's prefix: its own (`_batch_prefix`) and, where
        the pass has a prompt's rows, before them as many more as round them up to
        ALIGN, masked. A product over a length that is no multiple of the vector width
        leaves ggml's tiled GEMM for one dot product a row: 8 prompts' rows under a
        200-cell prefix took ~10% longer to compute (725 against 802 ms a step)."""
        assert self._prefix is not None
        ps, pe = self._prefix
        n = -(-(pe - ps) // self._prefix_align) * self._prefix_align
        lo = max(0, pe - n)
        return lo, min(self.size, lo + n)

    def _prefix_mask(self, batch: BatchLayout) -> np.ndarray:
        """The batch's mask over `_prefix_view`: the prefix's cells as any others, the
        cells rounding it up hidden (seen where they are, if anywhere)."""
        assert self._prefix is not None
        lo, hi = self._prefix_view()
        mask = self._mask(batch, lo, hi, True)
        mask[..., : self._prefix[0] - lo] = attend.NEG_INF
        mask[..., self._prefix[1] - lo :] = attend.NEG_INF
        return mask

    def _prefix_cells(self) -> np.ndarray:
        """The cells of the pass's prefix view (`_prefix_view`), none without one."""
        if self._prefix is None:
            return np.zeros(0, dtype=np.int64)
        return np.arange(*self._prefix_view())

    def _mask(self, batch: BatchLayout, lo: int, hi: int, prefix: bool = False) -> np.ndarray:
        """The batch's mask over cells lo..hi. A pass's prefix cells are seen through the
        prefix's own columns (`prefix`), hidden elsewhere: the sequence whose part holds
        them, or a range across it, would otherwise see them twice."""
        mask = attend.causal_mask(
            self.pos, self.member, batch.positions, batch.sequences, lo, hi, self.window, self.chunk
        )
        if self._prefix is not None and not prefix:
            a, b = max(lo, self._prefix[0]), min(hi, self._prefix[1])
            if a < b:
                mask[..., a - lo : b - lo] = attend.NEG_INF
        return mask

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
        if self.shift_fn is None:
            raise NotImplementedError("this model does not support shifting the cache")
        if self.member[moved].sum(axis=1).max() > 1:  # a shared prefix stays as it is
            moved = self._unshare(seq, moved)
        self.pos[moved] -= end - begin
        self._shift(moved.astype(np.int32), begin - end)

    def _unshare(self, seq: int, cells: np.ndarray) -> np.ndarray:
        """cells with seq's shared ones copied to cells of its own (their K/V rows too):
        the others keep theirs as they were."""
        shared = cells[self.member[cells].sum(axis=1) > 1]
        free = int(np.count_nonzero(self.pos < 0))
        if free < len(shared):
            raise CacheFullError(f"KV cache full: {len(shared)} cells needed, {free} free")
        copies = self._place(self.pos < 0, seq, len(shared))
        if self.keys:
            assert self.backend is not None
            rows.move(self.backend, self.keys, self.values, shared, copies, self.v_trans)
        self.pos[copies] = self.pos[shared]
        self.member[copies] = False
        self.member[copies, seq] = True
        self.member[shared, seq] = False
        return np.concatenate([cells[self.member[cells, seq]], copies])

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
        range that are not its own, over those ranges), the cells moved to keep it
        compact so far and the cells several sequences share."""
        return {
            "cells_used": self.used_cells(),
            "cells": self.size,
            "fragmentation": compact.fragmentation(self.member),
            "cells_moved": self.moved,
            "cells_shared": int(np.count_nonzero(self.member.sum(axis=1) > 1)),
        }

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Let dst share src's cells for positions < n (no K/V copied): one copy of a
        common prompt for both, which each attends as a piece of its own (`prefix`), its
        own cells in its own part of the cache."""
        self._step = None
        self.remove(dst, 0, None)
        self._lend(src, n)
        self.member[self.member[:, src] & (self.pos < n), dst] = True

    def _lend(self, src: int, n: int) -> None:
        """Before src's first n positions are first shared, move them to the end of src's
        part and its later cells to the part's start, where there is room: a run of
        decoding sequences attends the first cells of each one's part (`attend.part_views`),
        as many as the longest needs, so a prefix left at the start of src's part would
        widen every sequence's view by its length."""
        home = src * self.capacity
        end = min(self.size, home + self.capacity)
        mine = np.flatnonzero(self.member[:, src])
        mine = mine[np.argsort(self.pos[mine], kind="stable")]
        lent, rest = mine[self.pos[mine] < n], mine[self.pos[mine] >= n]
        if len(lent) == 0 or (self.member[mine].sum(axis=1) > 1).any():
            return  # shared already, or nothing to share
        if (mine < home).any() or (mine >= end).any() or len(mine) > end - home:
            return
        src_cells = np.concatenate([lent, rest])
        dst_cells = np.concatenate(
            [np.arange(end - len(lent), end), np.arange(home, home + len(rest))]
        )
        taken = (self.pos[dst_cells] >= 0) & ~np.isin(dst_cells, src_cells)
        if taken.any():
            return
        moved = src_cells != dst_cells
        self._move(src_cells[moved], dst_cells[moved])

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

    def restore(self, seq: int, snap: Snapshot, n: int, start: int = 0) -> bool:
        """Make seq hold snap's first n positions (its cells dropped first): cells placed
        as a new sequence's and their rows written. With `start`, seq keeps its positions
        before it (a prefix it shares, `copy_prefix`) and takes snap's start..n. False,
        with seq left empty, when the cache has not the room or the snapshot is not of
        this cache's kind."""
        self.remove(seq, start, None)
        assert self.backend is not None
        fits = int(np.count_nonzero(self.pos < 0)) >= n - start
        if not fits or not rows.can_write(self.backend, self.keys, self.values, snap):
            self.remove(seq, 0, None)
            return False
        cells = self._place(self.pos < 0, seq, n - start)
        self.pos[cells] = np.arange(start, n, dtype=np.int32)
        self.member[cells] = False
        self.member[cells, seq] = True
        rows.write(self.backend, self.keys, self.values, cells, snap, self.v_trans, start)
        return True

    def shareable(self, src: int, n: int) -> int:
        """How many of src's first n positions another sequence may share (`copy_prefix`)
        as one prefix: those held in one run of cells, in position order."""
        cells = np.flatnonzero(self.member[:, src] & (self.pos >= 0) & (self.pos < n))
        cells = cells[np.argsort(self.pos[cells], kind="stable")]
        steps = np.arange(len(cells))
        run = (self.pos[cells] == steps) & (cells == (cells[0] if len(cells) else 0) + steps)
        return int(np.argmin(run)) if not run.all() else len(cells)

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

    def blocks(self) -> list[tuple[int, int, Keys, Keys, Tensor]]:
        """The pass's attention blocks in row order, (first row, end row, keys, values,
        mask): keys (S, Hkv, D), values (S, Hkv, Dv) and mask (rows, S) over cells of
        `get`'s range, or for N decoding sequences attended together (`_streams`) keys
        (N, S, Hkv, D), values (N, S, Hkv, Dv) and mask (N, 1, S) over each one's own
        part. With a prefix (`prefix`), keys and values are (the prefix's, the block's)
        and the mask covers the prefix's cells first. Empty: attend in one piece."""
        if not self._blocks:
            return []
        keys = self.ctx.attach(self.keys[self.layer])
        values = self.ctx.attach(self.values[self.layer])
        k = v = None  # the attended range's, made for the first block that needs them
        pre = self.prefix()
        out: list[tuple[int, int, Keys, Keys, Tensor]] = []  # masks: the prefix's columns first
        for block, m in zip(self._blocks, self.block_masks, strict=True):
            a, b, s, e, n = block
            if n:
                p = self.member.shape[1]
                ks, vs = attend.part_views(keys, values, p, self.capacity, block, self.v_trans)
            else:
                if k is None or v is None:
                    k, v = self._view(self.lo, self.hi)
                ks, vs = k.slice(0, s, e), v.slice(0, s, e)
            out.append((a, b, ks, vs, m) if pre is None else (a, b, (pre[0], ks), (pre[1], vs), m))
        return out

    def get(self) -> tuple[Tensor, Tensor, Tensor]:
        """Keys (S, Hkv, D), values (S, Hkv, Dv) and mask (T, S) over the used range."""
        return (*self._view(self.lo, self.hi), self.mask)

    def prefix(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """Keys (P, Hkv, D), values (P, Hkv, Dv) and mask (T, P) of a prefix the pass's
        sequences share (`_batch_prefix`), attended with `get`'s range as one softmax;
        None where the range holds all they see. Its mask apart from `get`'s: joined, a
        wave of 8 prompts' (320 rows over every part of the cache, 21 MB) cost 38 ms."""
        if self._prefix is None or self.prefix_mask is None:
            return None
        return (*self._view(*self._prefix_view()), self.prefix_mask)

    def _view(self, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        k = self.ctx.attach(self.keys[self.layer]).slice(0, lo, hi)
        v = self.ctx.attach(self.values[self.layer])
        if self.v_trans:  # (Hkv, Dv, S) viewed as (S, Hkv, Dv)
            return k, v.slice(2, lo, hi).permute(2, 0, 1)
        return k, v.slice(0, lo, hi)
