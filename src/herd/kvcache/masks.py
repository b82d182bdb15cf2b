"""The masks of a pass over the causal cache (`herd.kvcache.causal`): over its attended
range, over a shared prefix's cells, for each block of rows and each run of decoding
streams. -inf where a query row may not see a cell, 0 where it may (`attend.causal_mask`:
its sequence's, not after it, inside a window or chunk).

A pass whose sequences share a prefix (`herd.kvcache.shared`) sees its cells through the
prefix's own columns only, which come first in every block's mask: the sequence whose
part holds them, or a range across it, would otherwise see them twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from herd.kvcache.attend import NEG_INF, BatchLayout, Block, causal_mask

if TYPE_CHECKING:
    from herd.kvcache.causal import Causal


def over(cache: Causal, batch: BatchLayout, lo: int, hi: int, prefix: bool = False) -> np.ndarray:
    """(T, hi - lo): the batch's rows over cells lo..hi, the pass's prefix cells hidden
    unless these are the prefix's own columns (`prefix`)."""
    mask = causal_mask(cache.pos, cache.member, batch.positions, batch.sequences, lo, hi,
                       cache.window, cache.chunk)  # fmt: skip
    if cache._prefix is not None and not prefix:
        a, b = max(lo, cache._prefix[0]), min(hi, cache._prefix[1])
        if a < b:
            mask[..., a - lo : b - lo] = NEG_INF
    return mask


def of_prefix(cache: Causal, batch: BatchLayout) -> np.ndarray:
    """(T, P): the batch's rows over the cells attended as the pass's prefix
    (`Causal._prefix_cells`): the prefix's cells as any others, the cells rounding it up
    hidden (seen where they are, if anywhere)."""
    assert cache._prefix is not None
    cells = cache._prefix_cells
    lo, hi = int(cells[0]), int(cells[-1]) + 1
    mask = over(cache, batch, lo, hi, True)
    mask[..., : cache._prefix[0] - lo] = NEG_INF
    mask[..., cache._prefix[1] - lo :] = NEG_INF
    return mask


def of_rows(cache: Causal, a: int, b: int, s: int, e: int) -> np.ndarray:
    """A block of rows a..b over range cells s..e, after the prefix's columns."""
    if cache._prefix_array is None:
        return cache._mask_array[a:b, s:e]
    return np.concatenate([cache._prefix_array[a:b], cache._mask_array[a:b, s:e]], axis=1)


def of_run(cache: Causal, batch: BatchLayout, run: Block) -> np.ndarray:
    """(N, 1, P + cells) mask of a run of decoding streams: its row i is sequence
    seq + i's, over the pass's prefix (P cells, none without one) and the first `cells`
    of that sequence's part."""
    row, _, seq, cells, n = run
    p = len(cache._prefix_cells)
    out = np.empty((n, 1, p + cells), dtype=np.float32)
    for i in range(n):
        home = (seq + i) * cache.capacity
        at = slice(row + i, row + i + 1)
        one = BatchLayout(batch.positions[at], batch.sequences[at])
        out[i, :, p:] = over(cache, one, home, home + cells)
        if p:
            out[i, :, :p] = of_prefix(cache, one)
    return out


def open_spans(cache: Causal, batch: BatchLayout, locs: np.ndarray) -> None:
    """Let the placeholder tokens of one image see each other whatever their order
    (`Causal(bidirectional=)`), a window still applying to the earlier ones, in the
    pass's range mask."""
    lo = cache.lo
    for row, rows in batch.spans:  # a span's tokens are in this batch, all of them
        span = np.arange(row, row + rows)
        seen = np.ones((rows, rows), dtype=bool)
        if cache.window is not None:  # (query, key): key not older than the window
            pos = batch.positions[span]
            seen = pos[:, None] - pos[None, :] < cache.window
        block = cache._mask_array[np.ix_(span, locs[span] - lo)]
        block[seen] = 0
        cache._mask_array[np.ix_(span, locs[span] - lo)] = block
