"""The causal KV cache: cells tagged with a position and the sequences that share them.

Several sequences live in one cache without multiplying memory per slot: a cell holds one
token's keys and values for every layer and may belong to several sequences (a shared
prompt prefix). Each forward pass finds free cells for the batch, writes K/V there with
`set_rows`, and attends over the range of cells in use, masked by sequence, causality and
an optional sliding window or chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from herd.errors import CacheFullError
from herd.kvcache import attend, compact, masks, nextstep, rows, shared
from herd.kvcache.attend import ALIGN, ALIGN_ROW, BLOCK, BatchLayout, Block, Keys
from herd.kvcache.nextstep import Decoded
from herd.kvcache.rows import Snapshot
from herd.ml import Backend, Context, DType, Tensor

# model.shift(ctx, layer, keys (N, Hkv, D), delta positions (N,) I32) -> re-roped keys
ShiftFn = Callable[[Context, int, Tensor, Tensor], Tensor]


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
        # the pass's shared prefix (`shared.batch_prefix`), the cells attended as it and
        # its mask (`prefix`)
        self._prefix: shared.Stretch | None = None
        self._prefix_cells = np.zeros(0, dtype=np.int64)
        self._prefix_array: np.ndarray | None = None
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
        view = (int(self._prefix_cells[0]), len(self._prefix_cells)) if self._prefix else None
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
            cells = self._place(seq, len(mine))
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
            self._take(cells, batch.positions[mine], seq)
            locs[mine] = cells
        if moved and not one_sequence:  # a later move may have packed earlier ones' cells
            locs = self._cells_of(batch)
        self._finish_plan(batch, locs)

    def _own(self, seq: int) -> np.ndarray:
        """A mask of seq's cells, the shared prefix it attends as a piece left out: what
        must lie together for its attention to cost its own length."""
        mine = self.member[:, seq].copy()
        stretch = shared.stretch(self.member, seq)
        if stretch is not None:
            mine[stretch[0] : stretch[1]] = False
        return mine

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
        prefix = shared.batch_prefix(self.member, seqs)
        if prefix is not None:
            in_use = in_use[(in_use < prefix[0]) | (in_use >= prefix[1])]
            if len(in_use) == 0:  # nothing of their own yet: the prefix is the range
                in_use, prefix = np.arange(*prefix), None
        self._prefix = prefix
        self._prefix_cells = np.zeros(0, dtype=np.int64)
        if prefix is not None:  # rounded up for a prompt's rows (`shared.rounded`)
            align = ALIGN if len(np.unique(seqs)) < n else 1
            self._prefix_cells = np.arange(*shared.rounded(prefix, align, self.size))
        self.lo, self.hi = lo, hi = self._range(in_use)
        self._locs = locs.astype(np.int32)
        self._mask_array = masks.over(self, batch, lo, hi)
        self._prefix_array = None if prefix is None else masks.of_prefix(self, batch)
        if self.bidirectional:
            masks.open_spans(self, batch, locs)
        self._blocks = self._plan_blocks(batch)
        self._block_arrays = []
        for block in self._blocks:
            a, b, s, e, runs = block
            piece = (
                masks.of_rows(self, a, b, s, e) if not runs else masks.of_run(self, batch, block)
            )
            self._block_arrays.append(np.ascontiguousarray(piece))
        self._step = nextstep.decoded(self.member, batch, locs, self.capacity)

    def _range(self, cells: np.ndarray) -> tuple[int, int]:
        """The padded range from the first of cells to the last."""
        lo, hi = int(cells[0]), int(cells[-1]) + 1
        return lo // self.padding * self.padding, min(
            self.size, -(-hi // self.padding) * self.padding
        )

    def _place(self, seq: int, n: int) -> np.ndarray:
        """Free cells for n tokens of seq (`compact.place`)."""
        return compact.place(self.member, self.pos < 0, seq, n, self.capacity, self.padding)

    def _take(self, cells: np.ndarray, positions: np.ndarray, seqs: np.ndarray | int) -> None:
        """Tag cells as holding these positions of these sequences (one each)."""
        self.pos[cells] = positions
        self.member[cells] = False
        self.member[cells, seqs] = True

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
        self._take(locs, batch.positions, seqs)
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
        align = (min(ALIGN, self.padding), min(ALIGN_ROW, self.padding))
        blocks = attend.row_blocks(mask, cuts, streams, step, align)
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
        held = cells[self.member[cells].sum(axis=1) > 1]
        free = int(np.count_nonzero(self.pos < 0))
        if free < len(held):
            raise CacheFullError(f"KV cache full: {len(held)} cells needed, {free} free")
        copies = self._place(seq, len(held))
        if self.keys:
            assert self.backend is not None
            rows.move(self.backend, self.keys, self.values, held, copies, self.v_trans)
        self._take(copies, self.pos[held], seq)
        self.member[held, seq] = False
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
        moves = shared.lend(self.pos, self.member, src, n, self.capacity)
        if moves is not None:  # out of the streams' views (`shared.lend`)
            self._move(*moves)
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
        cells = self._place(seq, n - start)
        self._take(cells, np.arange(start, n, dtype=np.int32), seq)
        rows.write(self.backend, self.keys, self.values, cells, snap, self.v_trans, start)
        return True

    def shareable(self, src: int, n: int) -> int:
        """How many of src's first n positions another may share (`shared.shareable`)."""
        return shared.shareable(self.pos, self.member, src, n)

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
        sequences share (`shared.batch_prefix`), attended with `get`'s range as one softmax;
        None where the range holds all they see. Its mask apart from `get`'s: joined, a
        wave of 8 prompts' (320 rows over every part of the cache, 21 MB) cost 38 ms."""
        if self._prefix is None or self.prefix_mask is None:
            return None
        lo, hi = int(self._prefix_cells[0]), int(self._prefix_cells[-1]) + 1
        return (*self._view(lo, hi), self.prefix_mask)

    def _view(self, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        k = self.ctx.attach(self.keys[self.layer]).slice(0, lo, hi)
        v = self.ctx.attach(self.values[self.layer])
        if self.v_trans:  # (Hkv, Dv, S) viewed as (S, Hkv, Dv)
            return k, v.slice(2, lo, hi).permute(2, 0, 1)
        return k, v.slice(0, lo, hi)
