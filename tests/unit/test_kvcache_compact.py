"""The causal cache stays compact: a batch attends about its own cells wherever they were,
moved K/V rows keep what was written for each (sequence, position), `defragment` leaves no
holes, and the moves run on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herd.gguf import open_gguf
from herd.kvcache import Causal
from herd.kvcache.causal import BatchLayout
from herd.kvcache.compact import tolerated
from herd.ml import CacheConfig, DType, available_backends, open_backend
from herd.ml.backends.numpy import NumpyBackend

HISTORIES = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same histories on every run
    suppress_health_check=[HealthCheck.too_slow],
)
N_SEQ, CAPACITY, PAD = 4, 24, 4


class Layout(NumpyBackend):
    """The NumPy backend with V kept as rows or transposed (columns move differently)."""

    def __init__(self, v_transposed: bool) -> None:
        super().__init__(None)  # type: ignore[arg-type]  # no weights needed
        self.config = CacheConfig(v_transposed, PAD, DType.F32, False)

    def cache_config(self) -> CacheConfig:
        return self.config


class Tracked:
    """A cache written through its own API with a value per (writer, position): key
    (writer, position), value (position, -writer); `expected` holds, for each live
    (sequence, position), what its cell must contain."""

    def __init__(self, backend, dtype=DType.F32, capacity=CAPACITY, width=2) -> None:
        self.backend, self.width = backend, width
        self.cache = Causal(padding=PAD)
        self.cache.init(backend, dtype, N_SEQ, capacity, max_batch=16)
        self.expected: dict[tuple[int, int], tuple[int, int]] = {}
        self.spans: list[tuple[int, int]] = []  # (attended cells, own cells) of each sequence

    def length(self, seq: int) -> int:
        return self.cache.seq_length(seq)

    def forward(self, seqs: list[int], counts: list[int]) -> None:
        positions, sequences = [], []
        for seq, count in zip(seqs, counts, strict=True):
            start = self.length(seq)
            positions += range(start, start + count)
            sequences += [seq] * count
        pos, sq = np.array(positions, np.int32), np.array(sequences, np.int32)
        with self.backend.new_context() as ctx:
            self.cache.start_forward(ctx, BatchLayout(pos, sq))
            k = ctx.input(self.rows(sq, pos))
            v = ctx.input(self.rows(pos, -sq))
            self.cache.set_layer(0)
            self.cache.put(k, v)
            keys, values, mask = self.cache.get()
            ctx.compute(keys, values, mask)
        for s, p in zip(sequences, positions, strict=True):
            self.expected[(s, p)] = (s, p)
        # each sequence's rows attend their block's cells (the whole range without blocks)
        # and the pass's prefix (cells shared from another part), if it has one
        blocks = self.cache._blocks or [(0, len(sq), 0, self.cache.hi - self.cache.lo, 0)]
        prefix = self.cache._prefix
        for seq in set(seqs):
            rows = np.flatnonzero(sq == seq)
            extent = max(e - s for a, b, s, e, _ in blocks if a <= rows[-1] and b > rows[0])
            if prefix is not None:
                extent += prefix[1] - prefix[0]
            self.spans.append((extent, int(self.cache.member[:, seq].sum())))

    def rows(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """(T, 1, width): the two numbers, then zeros (a Q8_0 row is 32 wide)."""
        out = np.zeros((len(first), 1, self.width), np.float32)
        out[:, 0, 0], out[:, 0, 1] = first, second
        return out

    def remove(self, seq: int, begin: int) -> None:
        self.cache.remove(seq, begin, None)
        self.expected = {k: w for k, w in self.expected.items() if k[0] != seq or k[1] < begin}

    def share(self, src: int, dst: int, n: int) -> None:
        self.cache.copy_prefix(src, dst, n)
        self.expected = {k: w for k, w in self.expected.items() if k[0] != dst}
        for (s, p), w in list(self.expected.items()):
            if s == src and p < n:
                self.expected[(dst, p)] = w

    def check_contents(self, atol: float = 0.0) -> None:
        """Every live (sequence, position) is in exactly one cell, holding its writer's
        rows; no other cell is in use."""
        c = self.cache
        keys = self.backend_rows(c.keys[0])
        values = self.backend_rows(c.values[0], transposed=c.v_trans)
        seen = set()
        for cell in np.flatnonzero(c.pos >= 0):
            p = int(c.pos[cell])
            for s in np.flatnonzero(c.member[cell]):
                assert (int(s), p) not in seen, f"({s}, {p}) in two cells"
                seen.add((int(s), p))
                writer, at = self.expected[(int(s), p)]
                np.testing.assert_allclose(keys[cell].ravel()[:2], [writer, at], atol=atol)
                np.testing.assert_allclose(values[cell].ravel()[:2], [at, -writer], atol=atol)
        assert seen == set(self.expected)

    def backend_rows(self, tensor, transposed: bool = False) -> np.ndarray:
        with self.backend.new_context() as ctx:
            t = ctx.attach(tensor)
            (a,) = ctx.compute(t.permute(2, 0, 1).contiguous() if transposed else t)
        return a


def check_packed(cache: Causal) -> None:
    """After `defragment`: the used cells are 0..used with no hole, and each sequence that
    shares no cell is one run in position order."""
    used = cache.used_cells()
    assert (cache.pos[:used] >= 0).all() and (cache.pos[used:] < 0).all()
    for seq in range(N_SEQ):
        cells = np.flatnonzero(cache.member[:, seq])
        if len(cells) and cache.member[cells].sum(axis=1).max() == 1:
            np.testing.assert_array_equal(cells, np.arange(cells[0], cells[0] + len(cells)))
            assert (np.diff(cache.pos[cells]) == 1).all()


OPS = st.lists(
    st.tuples(
        st.sampled_from(["prompt", "decode", "batch", "remove", "share", "defragment"]),
        st.integers(0, N_SEQ - 1),
        st.integers(0, N_SEQ - 1),
        st.integers(1, 9),
    ),
    min_size=5,
    max_size=60,
)


@pytest.mark.parametrize("v_transposed", [True, False], ids=["v-columns", "v-rows"])
@HISTORIES
@given(ops=OPS)
def test_any_history_keeps_contents_and_attends_about_its_own_cells(v_transposed, ops):
    """Random histories of sequences joining with prompts, decoding alone or together,
    sharing prefixes and being cut or removed, with compaction wherever the cache decides
    and `defragment` at random: every cell holds what was written for its (sequence,
    position), a pass attends at most its own cells plus `tolerated` and the padding, and
    `defragment` leaves no hole."""
    t = Tracked(Layout(v_transposed))
    cache = t.cache
    for op, a, b, k in ops:
        free = cache.size - cache.used_cells()
        if op == "prompt" and t.length(a) + k <= CAPACITY and k <= free:
            t.forward([a], [k])
        elif op == "decode" and 0 < t.length(a) < CAPACITY and free:
            t.forward([a], [1])
        elif op == "batch":  # the sequences with cells decode together
            live = [s for s in range(N_SEQ) if 0 < t.length(s) < CAPACITY][:k]
            if live and len(live) <= free:
                t.forward(live, [1] * len(live))
        elif op == "remove":
            t.remove(a, min(k - 1, t.length(a)))
        elif op == "share" and a != b and t.length(a) > 1:
            t.share(a, b, min(k, t.length(a)))
        elif op == "defragment":
            cache.defragment()
            check_packed(cache)
        else:
            continue
        if cache.keys:
            t.check_contents()
    for attended, own in t.spans:
        assert attended <= own + tolerated(own, PAD) + 2 * PAD


def test_a_kept_prefix_moves_to_its_sequence_not_the_range_across_the_cache():
    """The README's case: other conversations cached right after a slot's kept prefix
    (here packed there by `defragment`), so its new prompt must go elsewhere. The prefix
    moves there (4 cells, not the 60 after it), and the sequence then attends about its
    own length."""
    t = Tracked(Layout(True), capacity=48)
    cache = t.cache
    t.forward([0], [24])  # slot 0's old conversation
    for seq in (1, 2, 3):
        t.forward([seq], [20])
    t.remove(0, 4)  # a new chat in slot 0 keeps 4 tokens of the old one
    cache.defragment()  # the others' cells now follow the kept 4
    before = cache.moved
    t.forward([0], [22])
    assert cache.moved - before == 4
    for _ in range(6):
        t.forward([0], [1])
    attended, own = t.spans[-1]
    assert own == 32 and attended <= 36
    cells = np.flatnonzero(cache.member[:, 0])
    np.testing.assert_array_equal(cells, np.arange(cells[0], cells[0] + 32))
    t.check_contents()
    assert cache.stats()["cells_used"] == 3 * 20 + 32


def test_sequences_decoded_together_grow_apart_each_in_one_run():
    """Four sequences decoded in one batch each grow in their own part of the cache: no
    cell moves, each sequence stays one run and its rows attend only its own cells.
    `defragment` then closes the holes a removed sequence leaves."""
    t = Tracked(Layout(False))
    for seq in range(4):
        t.forward([seq], [2])
    for _ in range(12):
        t.forward([0, 1, 2, 3], [1, 1, 1, 1])
        assert all(attended <= own + PAD for attended, own in t.spans[-4:])
    assert t.cache.moved == 0
    assert all(cache_span(t.cache, seq) == 14 for seq in range(4))
    t.check_contents()
    t.remove(1, 0)  # free cells between 0's and 2's: room to grow, no fragmentation
    assert t.cache.stats()["fragmentation"] == 0.0
    t.cache.defragment()
    check_packed(t.cache)
    t.check_contents()
    assert t.cache.stats()["fragmentation"] == 0.0


def cache_span(cache: Causal, seq: int) -> int:
    cells = np.flatnonzero(cache.member[:, seq])
    return int(cells[-1] - cells[0] + 1)


BACKENDS = [b for b in ("ggml", "mlx") if b in available_backends()]


@pytest.mark.parametrize("dtype", [DType.F16, DType.F32, DType.Q8_0])
@pytest.mark.parametrize("name", BACKENDS)
def test_moves_copy_rows_on_every_backend(tiny_llama_path, name, dtype):
    """The same relocation and defragmentation on ggml and MLX (their own layouts: V
    transposed or not, quantized or not; MLX keeps Q8_0 as F16): the rows come out as
    the NumPy reference's."""
    backend = open_backend(name, open_gguf(tiny_llama_path))
    try:
        t = Tracked(backend, dtype, width=32)
        ref = Tracked(NumpyBackend(None), width=32)  # type: ignore[arg-type]
        for tracked in (t, ref):
            tracked.forward([0], [24])
            for seq in (1, 2, 3):
                tracked.forward([seq], [20])
            tracked.remove(0, 4)
            tracked.forward([0], [22])
            tracked.forward([0, 1], [1, 1])
            tracked.cache.defragment()
            check_packed(tracked.cache)
        assert t.cache.moved > 22
        np.testing.assert_array_equal(t.cache.pos, ref.cache.pos)
        # small integers are exact in F16; Q8_0 rounds each to its block's scale (max/127)
        t.check_contents(atol=0.1 if dtype == DType.Q8_0 else 0.0)
    finally:
        backend.close()
