"""Each sequence of the causal cache in its own part (sequence i from cell i * capacity, as
llama.cpp's per-sequence streams): a new sequence starts there, a sequence whose part has
a hole (a context shift's) is packed there again, and fragmentation counts only what lies
inside a sequence's own range."""

from __future__ import annotations

import numpy as np
import pytest

from herd.kvcache import Causal, compact
from herd.kvcache.causal import BatchLayout
from herd.ml import CacheConfig, DType
from herd.ml.backends.numpy import NumpyBackend

PAD = 4


class Small(NumpyBackend):
    def __init__(self) -> None:
        super().__init__(None)  # type: ignore[arg-type]  # no weights needed

    def cache_config(self) -> CacheConfig:
        return CacheConfig(False, PAD, DType.F32, False)


def plan(cache: Causal, seqs: list[int], counts: list[int]) -> None:
    positions, sequences = [], []
    for seq, count in zip(seqs, counts, strict=True):
        start = cache.seq_length(seq)
        positions += range(start, start + count)
        sequences += [seq] * count
    batch = BatchLayout(np.array(positions, np.int32), np.array(sequences, np.int32))
    with Small().new_context() as ctx:
        cache.start_forward(ctx, batch)


def test_new_sequences_start_in_their_own_part_and_grow_there():
    cache = Causal(padding=PAD)
    cache.init(Small(), DType.F32, max_sequences=4, capacity=32, max_batch=16)
    plan(cache, [2, 0, 3], [5, 3, 7])
    for _ in range(6):
        plan(cache, [0, 2, 3], [1, 1, 1])
    for seq, n in ((0, 9), (2, 11), (3, 13)):
        cells = np.flatnonzero(cache.member[:, seq])
        np.testing.assert_array_equal(cells, np.arange(seq * 32, seq * 32 + n))
    assert cache.moved == 0 and cache.stats()["fragmentation"] == 0.0
    # each sequence's rows attend a block over only its own cells
    assert [(a, b) for a, b, _, _, _ in cache._blocks] == [(0, 1), (1, 2), (2, 3)]
    assert all(e - s <= 16 and n == 0 for _, _, s, e, n in cache._blocks)


class Streams(Small):
    def cache_config(self) -> CacheConfig:
        return CacheConfig(False, PAD, DType.F32, False, streams=True)


def test_decoding_sequences_with_consecutive_ids_in_their_parts_attend_as_one_block():
    """Where the backend takes a sequences' axis, a run of decoding sequences with
    consecutive ids, each in its own part, is one block over the first cells of every
    part in the run (its longest, padded); a sequence with no neighbour in the batch,
    a prompt's rows, or cells moved out of its part keep blocks of their own. Each
    stream's mask is its sequence's row over its own part."""
    cache = Causal(padding=PAD)
    cache.init(Streams(), DType.F32, max_sequences=4, capacity=32, max_batch=16)
    plan(cache, [0, 1, 2, 3], [3, 9, 5, 2])
    plan(cache, [0, 2, 3], [1, 1, 1])  # 0 alone; 2 and 3 consecutive
    assert cache._blocks[0][4] == 0 and cache._blocks[1:] == [(1, 3, 2, 8, 2)]
    stream = cache._block_arrays[1]
    assert stream.shape == (2, 1, 8)
    np.testing.assert_array_equal(stream[0, 0] == 0, np.arange(8) < 6)  # 2: 6 positions
    np.testing.assert_array_equal(stream[1, 0] == 0, np.arange(8) < 3)  # 3: 3 positions
    plan(cache, [0, 1, 2, 3], [1, 1, 1, 1])
    assert cache._blocks == [(0, 4, 0, 12, 4)]  # 1's 11 cells rounded to the padding
    plan(cache, [0, 1, 2, 3], [1, 4, 1, 1])  # 1 feeds a prompt chunk: 0 alone, 2-3 a run
    assert [b[4] for b in cache._blocks] == [0, 0, 2]
    # packed from cell 0, each sequence gathers its cells again, 1-3 in their own parts;
    # 0's find no room in its part (the others' lie there): it is attended on its own
    cache.defragment()
    plan(cache, [0, 1, 2, 3], [1, 1, 1, 1])
    assert not cache.member[:32, 0].any()
    assert cache._blocks == [(0, 1, 0, 8, 0), (1, 4, 1, 24, 3)]


def test_a_hole_in_a_sequences_part_is_closed_there():
    """A shift drops positions from the middle (the later cells keep their places): the
    sequence is packed from its part's start, its cells in position order, and the new
    tokens follow them."""
    pos = np.full(64, -1, np.int32)
    member = np.zeros((64, 2), bool)
    pos[32:36], pos[44:50] = range(4), range(4, 10)  # sequence 1: a hole at 36..43
    member[32:36, 1] = member[44:50, 1] = True
    pos[0:5], member[0:5, 0] = range(5), True
    assert compact.fragmentation(member) == 8 / (18 + 5)
    src, dst, new = compact.home(pos, member, 1, 3, 32, 64, member[:, 1])
    np.testing.assert_array_equal(src, np.arange(44, 50))
    np.testing.assert_array_equal(dst, np.arange(36, 42))
    np.testing.assert_array_equal(new, [42, 43, 44])
    member[10, 1], pos[10] = True, 10  # another sequence's cell in 0's part: not packed
    assert compact.home(pos, member, 0, 3, 0, 32, member[:, 0]) is None


def seen(cache: Causal) -> list[set[tuple[int, int]]]:
    """What each query row of the planned pass attends, as (sequence, position) pairs:
    where its block's mask (or the whole range's, without blocks) is 0."""
    out: list[set[tuple[int, int]]] = [set() for _ in range(len(cache._locs))]

    def add(row: int, cells: np.ndarray) -> None:
        for cell in cells.tolist():
            seqs = np.flatnonzero(cache.member[cell])
            out[row] |= {(int(q), int(cache.pos[cell])) for q in seqs}

    if not cache._blocks:
        for row, mask in enumerate(cache._mask_array):
            add(row, cache.lo + np.flatnonzero(mask == 0))
    for (a, b, s, _, n), mask in zip(cache._blocks, cache._block_arrays, strict=True):
        for i, row in enumerate(range(a, b)):
            if n:  # a run: row i over the first cells of sequence s + i's part
                add(row, (s + i) * cache.capacity + np.flatnonzero(mask[i, 0] == 0))
            else:
                add(row, cache.lo + s + np.flatnonzero(mask[i] == 0))
    return out


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("backend", [Small, Streams], ids=["blocks", "streams"])
def test_a_decode_step_planned_from_the_last_sees_what_a_full_plan_sees(backend, window):
    """`_next_step` plans a decode step of several sequences from the last one (their new
    cells after their last ones, the masks' changed columns only). Over random histories
    (sequences joining with prompts, decoding in changing groups, leaving), every row of
    every step attends exactly the (sequence, position)s a full plan gives it, in the same
    cells; and the short plan is taken for most decode steps."""
    rng = np.random.default_rng(7)
    # padded to 16 cells: a block's extent grows, and the full plan runs, every 16 tokens
    fast, full = (Causal(padding=16, window=window) for _ in range(2))
    for cache in (fast, full):
        cache.init(backend(), DType.F32, max_sequences=4, capacity=48, max_batch=16)
    full._next_step = lambda batch: False  # type: ignore[method-assign]
    calls = {"short": 0, "steps": 0}
    original = fast._next_step

    def counted(batch: BatchLayout) -> bool:
        short = original(batch)
        calls["short"] += short
        return short

    fast._next_step = counted  # type: ignore[method-assign]
    group = [0, 1, 2, 3]
    for step in range(160):
        if step % 20 == 0:  # a new group, some with a prompt chunk first
            group = sorted(rng.choice(4, size=int(rng.integers(1, 5)), replace=False).tolist())
            counts = [int(rng.integers(1, 6)) if rng.random() < 0.5 else 1 for _ in group]
        else:
            counts = [1] * len(group)
        if step % 40 == 39:  # one leaves, its cells freed
            seq = group.pop()
            for cache in (fast, full):
                cache.remove(seq, 0)
            continue
        for q, c in zip(group, counts, strict=True):
            if fast.seq_length(q) + c > 44:  # its part is full: it starts again
                for cache in (fast, full):
                    cache.remove(q, 0)
        for cache in (fast, full):
            plan(cache, group, counts)
        calls["steps"] += counts == [1] * len(group)
        np.testing.assert_array_equal(fast._locs, full._locs)
        assert seen(fast) == seen(full), step
    assert calls["short"] > calls["steps"] // 2, calls
