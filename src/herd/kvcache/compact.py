"""Keeping the causal cache compact: where a batch's sequences should lie, and moving cells.

A pass attends the range from the first to the last cell of its sequences, so every cell
of another sequence (or free) in between is work for nothing. After waves of concurrent
chats a new conversation kept its slot's cached prefix at one end of the cache and grew at
the other, attending everything in between (README, "Serving": 121 -> 70 tok/s). The cache
checks each planned batch (`scattered`); when its range holds more than a little that is
not its own, the batch's cells move together (`gather`): into the largest free stretch
when one has room for them and some growth, else the whole cache is packed from cell 0
(llama.cpp's defragmentation) with the batch's cells last, so they grow into the free
cells after them. A sequence's attention then costs its own length, not where its cells
happened to lie. Cells shared by several sequences move once and stay shared.

Only NumPy here: which cells go where. The K/V rows move in `Causal._move`.
"""

from __future__ import annotations

import numpy as np


def free_runs(is_free: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends of the runs of True in is_free."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], is_free, [False])).astype(np.int8)))
    return edges[::2], edges[1::2]


def tolerated(count: int, padding: int) -> int:
    """Cells a batch's range may hold that are not its own before its cells move: a
    quarter of its own, at least one padding (the range is padded to that anyway). Larger
    ranges tolerate more, so a decode step that only appends never triggers a move the
    step before it did not (the incremental plan relies on it)."""
    return max(padding, count // 4)


def scattered(mine: np.ndarray, locs: np.ndarray, padding: int) -> bool:
    """Whether the batch's cells (`mine`: a mask of the cells its sequences hold; `locs`:
    the cells planned for its tokens) span more than `tolerated` cells not theirs."""
    cells = np.flatnonzero(mine)
    count = len(cells) + len(locs)
    lo, hi = int(locs.min()), int(locs.max()) + 1
    if len(cells):
        lo, hi = min(lo, int(cells[0])), max(hi, int(cells[-1]) + 1)
    return hi - lo - count > tolerated(count, padding)


def place(
    member: np.ndarray, is_free: np.ndarray, seq: int, n: int, capacity: int, padding: int
) -> np.ndarray:
    """Cells for n tokens of one sequence: right after its last cell (of those it holds
    alone, in its part when it has any there) when those are free; a new sequence at the
    start of its part (sequence i's from i x capacity) when that is free; else the first
    free stretch of its part with room to grow (`padding` more cells): a shared prefix
    may lie at its start or end (`shared.lend`), and its part is where a run of streams
    looks; else the first free stretch anywhere with that room, else the lowest free
    cells. A sequence then stays in one stretch, and its attended range (first to last
    cell) covers little else: taking the lowest free cells instead scattered a new
    conversation among the cached ones of other slots (one sequence decoded 1.5x slower
    after 8 cached conversations, attending 1408 cells for 164). A sequence that keeps a
    cached prefix far from its new stretch moves it there (`scattered`, in
    `Causal._plan`)."""
    size = len(is_free)
    home = seq * capacity
    end = min(size, home + capacity)
    mine = np.flatnonzero(member[:, seq])
    alone = mine[member[mine].sum(axis=1) == 1]  # a shared prefix lies apart
    inside = alone[(alone >= home) & (alone < end)]
    if len(alone):
        start = int((inside if len(inside) else alone)[-1]) + 1
        if start + n <= size and is_free[start : start + n].all():
            return np.arange(start, start + n)
    elif len(mine) == 0 and is_free[home:end].all():
        return np.arange(home, home + n)
    starts, ends = free_runs(is_free[home:end])
    fits = np.flatnonzero(ends - starts >= min(n + padding, end - home))
    if len(fits) and ends[fits[0]] - starts[fits[0]] >= n:
        start = home + int(starts[fits[0]])
        return np.arange(start, start + n)
    starts, ends = free_runs(is_free)
    fits = np.flatnonzero(ends - starts >= n + padding)
    if len(fits):
        start = int(starts[fits[0]])
        return np.arange(start, start + n)
    return np.flatnonzero(is_free)[:n]


def ordered(cells: np.ndarray, pos: np.ndarray, member: np.ndarray, seqs: np.ndarray) -> np.ndarray:
    """cells grouped by sequence (a shared cell goes with the first of `seqs` holding it,
    before that sequence's own cells, as its positions are lower), each group in position
    order: every sequence that shares nothing is one run once laid out so."""
    owner = np.argmax(member[np.ix_(cells, seqs)], axis=1)
    return cells[np.lexsort((pos[cells], owner))]


def gather(
    pos: np.ndarray, member: np.ndarray, seqs: np.ndarray, n: int, padding: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the cells of sequences `seqs` go so that they and n new cells lie in one run:
    (cells to move, their new places, the n cells for the batch's tokens).

    Into the largest run of cells that are free or already theirs, when it has room for
    them, the new tokens and `padding` cells to grow; else every used cell is packed from
    cell 0, the others first and in their present order (those before the first hole stay),
    the batch's last.
    """
    used = pos >= 0
    mine = member[:, seqs].any(axis=1)
    cells = ordered(np.flatnonzero(mine), pos, member, seqs)
    count = len(cells) + n
    starts, ends = free_runs(~used | mine)
    best = int(np.argmax(ends - starts))
    if ends[best] - starts[best] >= count + padding:
        base = int(starts[best])
        src, dst = cells, np.arange(base, base + len(cells))
    else:
        others = np.flatnonzero(used & ~mine)
        src = np.concatenate([others, cells])
        dst = np.arange(len(src))
        base = len(others)
    moved = src != dst
    start = base + len(cells)
    return src[moved], dst[moved], np.arange(start, start + n)


def home(
    pos: np.ndarray, member: np.ndarray, seq: int, n: int, start: int, end: int, mine: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Sequence seq's cells (`mine`: a mask of those that must lie together, a prefix
    shared from elsewhere left out) and n new ones packed from `start`, in position
    order, when they fit in its own part of the cache, cells start..end, and nothing else
    lies there (a shift's hole closed where it is, none of the others' cells touched):
    (cells to move, their new places, the n cells for the batch's tokens); None otherwise."""
    cells = np.flatnonzero(mine)
    others = (pos[start:end] >= 0) & ~mine[start:end]
    if len(cells) + n > end - start or others.any() or member[cells].sum(axis=1).max(initial=1) > 1:
        return None
    cells = cells[np.argsort(pos[cells], kind="stable")]
    dst = np.arange(start, start + len(cells))
    moved = cells != dst
    first = start + len(cells)
    return cells[moved], dst[moved], np.arange(first, first + n)


def packed(pos: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every used cell packed from cell 0, grouped by sequence in position order (shared
    cells with their lowest sequence): (cells to move, their new places)."""
    cells = np.flatnonzero(pos >= 0)
    if len(cells) == 0:
        return cells, cells
    src = ordered(cells, pos, member, np.arange(member.shape[1]))
    dst = np.arange(len(src))
    moved = src != dst
    return src[moved], dst[moved]


def fragmentation(member: np.ndarray) -> float:
    """Cells inside each sequence's ranges that are not its own, free or another's, over
    those ranges (0: every sequence is one run). A sequence's ranges: its first cell to
    its last, of the cells it holds alone and, apart, of those it shares (a prefix held
    once for several, attended as a piece of its own). What a sequence's attention
    reads for nothing; the free cells between sequences, each in its own part of the
    cache, are room to grow and count for nothing here."""
    spans = waste = 0
    shared = member.sum(axis=1) > 1
    for seq in range(member.shape[1]):
        for part in (np.flatnonzero(member[:, seq] & ~shared),
                     np.flatnonzero(member[:, seq] & shared)):  # fmt: skip
            if len(part):
                span = int(part[-1]) - int(part[0]) + 1
                spans, waste = spans + span, waste + span - len(part)
    return waste / spans if spans else 0.0
