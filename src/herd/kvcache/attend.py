"""How a batch's query rows attend the causal cache's cells (`herd.kvcache.causal`): the
mask, blocks of one sequence's rows, and runs of decoding sequences attended together.

The cache decides which cells hold which (sequence, position); this decides what each
query row sees of them and in which pieces nn hands attention to the backend. A block is
one sequence's rows (at most BLOCK of them, unless attention is fused: flash skips a
causal prompt's masked cells by itself) over only its own stretch of cells, not every
cell between the first sequence's and the last's. A run is several decoding sequences
with consecutive ids, each with its cells in its own part of the cache (sequence i's
from cell i x capacity), attended in one op over (sequences, cells) views of those parts
where the backend takes a sequences' axis (`CacheConfig.streams`, llama.cpp's
per-sequence streams).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from herd.ml import Tensor

NEG_INF = np.float32(-np.inf)
# A batch longer than BLOCK attends in blocks of BLOCK query rows, each over only the cells
# its rows may see (a causal prompt's first block skips the keys after it), the extents
# rounded out so the products sum as over the whole range: to ALIGN cells for a block of
# several rows (llamafile's tinyBLAS, which ggml runs for them, takes F16 products whose
# shared length is a multiple of 16 with AVX-512, 8 with AVX2, and sums each lane alike
# whatever the length), to ALIGN_ROW for one row (a decoding sequence: ggml's
# vec_dot_f16 sums 64 at a time and the rest one by one, so lengths of 64s sum as the
# streams' views do, `test_decoding_sequences_attended_together_keep_their_logits`).
# 16, not 64, spares a block of a prompt's rows up to 48 masked cells
BLOCK, ALIGN, ALIGN_ROW = 128, 16, 64


@dataclass
class BatchLayout:
    """What a cache needs to know about a batch (a subset of models.Batch)."""

    positions: np.ndarray  # (T,) int32
    sequences: np.ndarray  # (T,) int32
    # (first row, rows) of each image's placeholder tokens (see `Causal(bidirectional=)`)
    spans: list[tuple[int, int]] = field(default_factory=list)


Block = tuple[int, int, int, int, int]  # see `row_blocks` and `decoding_runs`
Keys = Tensor | tuple[Tensor, Tensor]  # a block's keys or values: one, or (a prefix's, its own)
# A pass's sequences may also share a prefix from another sequence's part (`Causal.prefix`):
# each block then attends it too, its mask's first columns, as one softmax with its own


def causal_mask(
    pos: np.ndarray,
    member: np.ndarray,
    positions: np.ndarray,
    sequences: np.ndarray,
    lo: int,
    hi: int,
    window: int | None,
    chunk: int | None,
) -> np.ndarray:
    """(T, hi - lo) float32 mask, 0 where query row t (at `positions[t]` of
    `sequences[t]`) sees cell lo + s, -inf elsewhere: the cell is its sequence's, not after
    it, and inside the sliding window or chunk. `pos`/`member`: the cache's cell tags."""
    cell_pos = pos[lo:hi]  # (S,) int32; free cells are -1 and in no sequence
    tok_pos = positions[:, None]  # (T, 1) int32
    ok = member[lo:hi, sequences].T & (cell_pos <= tok_pos)  # (T, S)
    if window is not None:
        ok &= tok_pos - cell_pos < window
    if chunk is not None:
        ok &= cell_pos >= tok_pos - tok_pos % chunk
    return np.where(ok, np.float32(0), NEG_INF)


def row_blocks(
    mask: np.ndarray, cuts: np.ndarray, skip: list[Block], step: int, align: tuple[int, int]
) -> list[Block]:
    """(first row, end row, first cell, end cell, 0) of each block of at most `step` rows
    of one sequence (`cuts`: the rows where the sequence changes), cells relative to the
    mask's range and rounded out to `align` (for several rows, for one); the rows of the
    runs in `skip` left out."""
    t, n = mask.shape
    seen = mask == 0
    blocks = []
    edges = [0, *cuts.tolist(), t]
    for start, end in zip(edges[:-1], edges[1:], strict=True):
        if any(a <= start < b for a, b, *_ in skip):
            continue
        for a in range(start, end, step):
            b = min(end, a + step)
            cols = np.flatnonzero(seen[a:b].any(axis=0))
            first, last = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 1)
            al = align[0] if b - a > 1 else align[1]
            blocks.append((a, b, first // al * al, min(n, -(-last // al) * al), 0))
    return blocks


def decoding_runs(
    member: np.ndarray,
    sequences: np.ndarray,
    cuts: np.ndarray,
    capacity: int,
    padding: int,
    prefix: tuple[int, int] | None = None,
) -> list[Block]:
    """Runs of two or more decoding sequences (one row each) with consecutive ids whose
    cells all lie in their own parts of the cache, but for the pass's `prefix` (cells
    they share from another part, attended once for all of them): (first row, end row,
    first sequence, cells, N), each of the N attending the first `cells` of its part (the
    run's longest, padded)."""
    starts = [0, *cuts.tolist()]
    ends = [*starts[1:], len(sequences)]
    runs: list[list[tuple[int, int]]] = [[]]  # (row, sequence), per run
    longest: dict[int, int] = {}  # sequence -> cells from its part's start to its last
    for a, b in zip(starts, ends, strict=True):
        seq = int(sequences[a])
        cells = np.flatnonzero(member[:, seq])
        if prefix is not None:
            cells = cells[(cells < prefix[0]) | (cells >= prefix[1])]
        home = seq * capacity
        own = b - a == 1 and len(cells) and home <= cells[0] and cells[-1] < home + capacity
        run = runs[-1]
        if not own:
            runs.append([])
            continue
        if run and seq != run[-1][1] + 1:
            run = []
            runs.append(run)
        run.append((a, seq))
        longest[seq] = int(cells[-1]) + 1 - home
    out = []
    for run in runs:
        if len(run) < 2:
            continue
        cells = min(capacity, -(-max(longest[s] for _, s in run) // padding) * padding)
        out.append((run[0][0], run[-1][0] + 1, run[0][1], cells, len(run)))
    return out


def part_views(
    keys: Tensor, values: Tensor, sequences: int, capacity: int, run: Block, v_trans: bool
) -> tuple[Tensor, Tensor]:
    """Keys (N, cells, Hkv, D) and values (N, cells, Hkv, Dv) of a run (`decoding_runs`):
    the first cells of its sequences' parts, as views of the cache's (cells, ...) keys and
    values ((Hkv, Dv, cells) where `v_trans`) of `sequences` parts (no copy)."""
    _, _, seq, cells, n = run
    p, c = sequences, capacity
    k = keys.reshape(p, c, *keys.shape[1:]).slice(0, seq, seq + n).slice(1, 0, cells)
    if v_trans:  # (Hkv, Dv, P, C) viewed as (N, cells, Hkv, Dv)
        hv, dv = values.shape[:2]
        v = values.reshape(hv, dv, p, c).slice(2, seq, seq + n).slice(3, 0, cells)
        return k, v.permute(2, 3, 0, 1)
    v = values.reshape(p, c, *values.shape[1:]).slice(0, seq, seq + n).slice(1, 0, cells)
    return k, v
