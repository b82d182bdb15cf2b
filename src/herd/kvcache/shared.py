"""A prefix held once for several sequences (`Causal.copy_prefix`: slots under one system
prompt, HERD_SHARED_PREFIX): which cells a pass attends as that prefix, how much of a
sequence another may share, and where the prefix goes when it is first shared.

Each sequence keeps its own cells in its own part of the cache (sequence i's from
i x capacity) and attends the prefix's cells as a piece of their own (`Causal.prefix`),
one softmax over both, so no part's view has to reach across the cache to them. Only
NumPy here: which cells. The K/V rows move in `Causal._move`.
"""

from __future__ import annotations

import numpy as np

Stretch = tuple[int, int]  # first cell, end cell


def stretch(member: np.ndarray, seq: int) -> Stretch | None:
    """The cells seq shares with other sequences, when they are one run of cells; None
    when it shares none, or they lie apart (then its range spans them as any cells)."""
    cells = np.flatnonzero(member[:, seq])
    shared = cells[member[cells].sum(axis=1) > 1]
    if len(shared) == 0 or int(shared[-1]) - int(shared[0]) + 1 != len(shared):
        return None
    return int(shared[0]), int(shared[-1]) + 1


def batch_prefix(member: np.ndarray, seqs: np.ndarray) -> Stretch | None:
    """The one stretch of the batch's sequences that share cells; None when none does,
    or one's shared cells lie apart, or theirs differ."""
    found = None
    for seq in np.unique(seqs).tolist():
        cells = np.flatnonzero(member[:, seq])
        if not (member[cells].sum(axis=1) > 1).any():
            continue
        one = stretch(member, seq)
        if one is None or (found is not None and one != found):
            return None
        found = one
    return found


def rounded(prefix: Stretch, align: int, size: int) -> Stretch:
    """The cells attended as the prefix: its own and, before them, as many more as round
    them up to `align` (masked by the caller). A product over a length that is no
    multiple of the vector width leaves ggml's tiled GEMM for one dot product a row: 8
    prompts' rows under a 200-cell prefix took ~10% longer to compute (725 against 802 ms
    a step). Decoding rows take align 1: one row a sequence runs no tiled GEMM, and 8
    streams would attend more."""
    ps, pe = prefix
    n = -(-(pe - ps) // align) * align
    lo = max(0, pe - n)
    return lo, min(size, lo + n)


def shareable(pos: np.ndarray, member: np.ndarray, src: int, n: int) -> int:
    """How many of src's first n positions another sequence may share as one prefix:
    those held in one run of cells, in position order."""
    cells = np.flatnonzero(member[:, src] & (pos >= 0) & (pos < n))
    cells = cells[np.argsort(pos[cells], kind="stable")]
    steps = np.arange(len(cells))
    run = (pos[cells] == steps) & (cells == (cells[0] if len(cells) else 0) + steps)
    return int(np.argmin(run)) if not run.all() else len(cells)


def lend(
    pos: np.ndarray, member: np.ndarray, src: int, n: int, capacity: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Where src's cells go before its first n positions are first shared: those to the
    end of src's part, its later cells to the part's start, as (cells to move, their new
    places); None when they are shared already or there is no room. A run of decoding
    sequences attends the first cells of each one's part (`attend.part_views`), as many
    as the longest needs, so a prefix left at the start of src's part would widen every
    sequence's view by its length (35.1 against 31.1 ms a decode step, 8 slots)."""
    home = src * capacity
    end = min(len(pos), home + capacity)
    mine = np.flatnonzero(member[:, src])
    mine = mine[np.argsort(pos[mine], kind="stable")]
    lent, rest = mine[pos[mine] < n], mine[pos[mine] >= n]
    if len(lent) == 0 or (member[mine].sum(axis=1) > 1).any():
        return None
    if (mine < home).any() or (mine >= end).any() or len(mine) > end - home:
        return None
    src_cells = np.concatenate([lent, rest])
    dst_cells = np.concatenate([np.arange(end - len(lent), end), np.arange(home, home + len(rest))])
    if ((pos[dst_cells] >= 0) & ~np.isin(dst_cells, src_cells)).any():
        return None
    moved = src_cells != dst_cells
    return src_cells[moved], dst_cells[moved]
