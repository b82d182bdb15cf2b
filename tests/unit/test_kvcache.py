"""The causal KV cache with a fake model: contents, masks, windows, removal with shift."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from herd.errors import CacheFullError
from herd.kvcache import Causal, Wrapper
from herd.kvcache.causal import BatchLayout
from herd.ml import CacheConfig, DType
from herd.ml.backends.numpy import NumpyBackend, NumpyContext, NumpyTensor

INF = -np.inf


class FakeModel:
    """One layer whose key and value for a token are its position (so shifts are visible)."""

    def __init__(self, **cache_args):
        self.backend = NumpyBackend(None)  # type: ignore[arg-type]  # no weights needed
        self.cache = Causal(self.shift, padding=cache_args.pop("padding", 1), **cache_args)
        self.shifts: list[int] = []

    def shift(self, ctx, layer, key, delta):
        self.shifts.extend(int(d) for d in delta.a)
        return key.add(delta.cast(DType.F32).reshape(-1, 1, 1))

    def step(self, positions, sequences):
        batch = BatchLayout(np.asarray(positions, np.int32), np.asarray(sequences, np.int32))
        with self.backend.new_context() as ctx:
            self.cache.start_forward(ctx, batch)
            kv = ctx.input(np.asarray(positions, np.float32).reshape(-1, 1, 1))
            self.cache.set_layer(0)
            self.cache.put(kv, kv)
            k, v, mask = self.cache.get()
            prefix = self.cache.prefix()  # cells shared from another part, masked first
            if prefix is None:
                return ctx.compute(k, v, mask)
            pk, pv, pm, k, v, mask = ctx.compute(*prefix, k, v, mask)
            return np.concatenate([pk, k]), np.concatenate([pv, v]), np.concatenate([pm, mask], 1)


def visible(mask: np.ndarray, keys: np.ndarray) -> list[list[int]]:
    """For each batch token, the positions (key values) it may attend to."""
    return [sorted(int(keys[s, 0, 0]) for s in np.flatnonzero(row == 0)) for row in mask]


def new(**kw) -> FakeModel:
    m = FakeModel(**kw)
    m.cache.init(m.backend, DType.F32, max_sequences=2, capacity=16, max_batch=8)
    return m


def test_causal_mask_and_contents():
    m = new()
    k, v, mask = m.step([0, 1, 2, 3], [0, 0, 0, 0])
    assert visible(mask, k) == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]
    k, _, mask = m.step([4], [0])
    assert visible(mask, k) == [[0, 1, 2, 3, 4]]
    np.testing.assert_array_equal(k[:5, 0, 0], [0, 1, 2, 3, 4])


def test_sequences_do_not_see_each_other():
    m = new()
    k, _, mask = m.step([0, 1, 0, 1, 2], [0, 0, 1, 1, 1])
    seqs = [0, 0, 1, 1, 1]
    for t, row in enumerate(mask):
        cells = np.flatnonzero(row == 0)
        assert all(m.cache.member[c, seqs[t]] for c in cells)
    assert [len(r) for r in visible(mask, k)] == [1, 2, 1, 2, 3]


@pytest.mark.parametrize(
    "window, expected",
    [(None, [0, 1, 2, 3, 4, 5]), (3, [3, 4, 5]), (1, [5])],
    ids=["full", "window-3", "window-1"],
)
def test_sliding_window(window, expected):
    m = new(window=window)
    m.step(list(range(5)), [0] * 5)
    k, _, mask = m.step([5], [0])
    assert visible(mask, k) == [expected]


def test_chunked_attention():
    m = new(chunk=4)
    k, _, mask = m.step(list(range(7)), [0] * 7)
    assert visible(mask, k)[5] == [4, 5]
    assert visible(mask, k)[3] == [0, 1, 2, 3]


def test_remove_middle_shifts_later_keys():
    m = new()
    m.step(list(range(6)), [0] * 6)
    m.cache.remove(0, 2, 4)
    assert m.shifts == [-2, -2]
    k, v, mask = m.step([4], [0])  # the next position after the shift
    assert visible(mask, k) == [[0, 1, 2, 3, 4]]  # keys re-roped to their new positions
    assert m.cache.seq_length(0) == 5


def test_remove_to_end_frees_cells():
    m = new()
    m.step(list(range(6)), [0] * 6)
    m.cache.remove(0, 3, None)
    assert m.cache.used_cells() == 3 and m.shifts == []


def test_copy_prefix_shares_cells_without_copying():
    m = new()
    m.step(list(range(4)), [0] * 4)
    m.cache.copy_prefix(0, 1, 3)
    assert m.cache.used_cells() == 4
    k, _, mask = m.step([3], [1])
    assert visible(mask, k) == [[0, 1, 2, 3]]
    assert m.cache.used_cells() == 5


def test_a_shift_copies_the_shared_cells_it_moves_and_leaves_the_others_theirs():
    m = new()
    m.step(list(range(4)), [0] * 4)
    m.cache.copy_prefix(0, 1, 4)
    m.cache.remove(0, 0, 1)  # 0 drops position 0: its 1..3 move back, 1's stay
    assert m.shifts == [-1, -1, -1]
    k, _, mask = m.step([3], [0])
    assert visible(mask, k) == [[0, 1, 2, 3]]  # 0's keys re-roped: 1..3 now 0..2
    k, _, mask = m.step([4], [1])
    assert visible(mask, k) == [[0, 1, 2, 3, 4]]  # 1's prefix as it was
    assert m.cache.used_cells() == 4 + 3 + 2


def test_full_cache_raises():
    m = FakeModel()
    m.cache.init(m.backend, DType.F32, max_sequences=1, capacity=4, max_batch=4)
    m.step([0, 1, 2], [0, 0, 0])
    with pytest.raises(CacheFullError):
        m.step([3, 4], [0, 0])


def test_padding_masks_unused_cells():
    m = FakeModel(padding=8)
    m.cache.init(m.backend, DType.F32, max_sequences=1, capacity=16, max_batch=8)
    k, _, mask = m.step([0, 1, 2], [0, 0, 0])
    assert mask.shape == (3, 8)
    assert np.isinf(mask[:, 3:]).all()


def _full_plan(cache: Causal, before: tuple[np.ndarray, np.ndarray], batch: BatchLayout):
    """What the whole plan makes of `batch` from the cells as they were before it."""
    ref = Causal(window=cache.window, chunk=cache.chunk, padding=cache.padding)
    n_seq = cache.member.shape[1]
    ref.init(cache.backend, DType.F32, n_seq, cache.size // n_seq, cache.max_batch)
    assert ref.size == cache.size
    ref.pos[:], ref.member[:] = before
    ref._plan(batch)
    return ref


@pytest.mark.parametrize(
    "kw",
    [{}, {"window": 5}, {"chunk": 4}, {"window": 3, "padding": 4}, {"padding": 8}],
    ids=["causal", "window", "chunk", "window-padded", "padded"],
)
def test_decode_steps_planned_from_the_last_equal_the_whole_plan(kw):
    """A decode step is planned from the previous step's plan where it can be; whatever
    happened in between (other sequences, prompts, removals, shared prefixes, padding
    crossed, a window or chunk boundary), it must equal planning from scratch."""
    rng = np.random.default_rng(3)
    m = FakeModel(**kw)
    cache = m.cache
    cache.init(m.backend, DType.F32, max_sequences=2, capacity=40, max_batch=8)
    lengths = [0, 0]
    incremental = 0
    for _ in range(300):
        seq = int(rng.integers(2)) if rng.random() < 0.15 else 0
        r = rng.random()
        if r < 0.05 and lengths[seq] > 2:
            cut = int(rng.integers(1, lengths[seq]))
            cache.remove(seq, cut, None)
            lengths[seq] = cut
            continue
        if r < 0.08 and lengths[0] > 2:
            cache.copy_prefix(0, 1, lengths[0] - 1)
            lengths[1] = lengths[0] - 1
            continue
        n = 1 if r < 0.9 else int(rng.integers(2, 5))
        if cache.used_cells() + n > cache.size - 2:
            for s in (0, 1):
                cache.remove(s, 0, None)
            lengths = [0, 0]
        positions = np.arange(lengths[seq], lengths[seq] + n, dtype=np.int32)
        batch = BatchLayout(positions, np.full(n, seq, np.int32))
        before = (cache.pos.copy(), cache.member.copy())
        was_step = cache._step
        ref = _full_plan(cache, before, batch)
        cache._plan(batch)
        incremental += was_step is not None and cache._step is not None and n == 1
        lengths[seq] += n
        np.testing.assert_array_equal(cache._locs, ref._locs)
        assert (cache.lo, cache.hi) == (ref.lo, ref.hi)
        np.testing.assert_array_equal(cache._mask_array, ref._mask_array)
        np.testing.assert_array_equal(cache.pos, ref.pos)
        np.testing.assert_array_equal(cache.member, ref.member)
    assert incremental > 100  # the short path was taken, not only the whole plan


class FakeGemma(FakeModel):
    """Two layers as Gemma 3 has them: a sliding-window one and a global one, each with its
    own cache behind the wrapper."""

    def __init__(self, window: int) -> None:
        self.backend = NumpyBackend(None)  # type: ignore[arg-type]
        local, overall = Causal(self.shift, window=window, padding=1), Causal(self.shift, padding=1)
        self.cache = Wrapper([local, overall], [0, 1])
        self.cache.init(self.backend, DType.F32, max_sequences=1, capacity=16, max_batch=8)
        self.shifts = []

    def step(self, positions, sequences=None):
        sequences = [0] * len(positions) if sequences is None else sequences
        batch = BatchLayout(np.asarray(positions, np.int32), np.asarray(sequences, np.int32))
        seen = []
        with self.backend.new_context() as ctx:
            self.cache.start_forward(ctx, batch)
            kv = ctx.input(np.asarray(positions, np.float32).reshape(-1, 1, 1))
            for layer in (0, 1):
                self.cache.set_layer(layer)
                self.cache.put(kv, kv)
                seen.append(self.cache.get())
            (k0, _, m0), (k1, _, m1) = seen
            k0, m0, k1, m1 = ctx.compute(k0, m0, k1, m1)
        return visible(m0, k0), visible(m1, k1)


def test_wrapper_masks_at_the_window_boundary_and_across_a_context_shift():
    m = FakeGemma(window=3)
    local, overall = m.step(list(range(6)))
    assert local[2] == [0, 1, 2] and local[3] == [1, 2, 3] and local[5] == [3, 4, 5]
    assert overall[5] == [0, 1, 2, 3, 4, 5]
    for position in (6, 7):  # decode steps, each leaving one position out of the window
        local, overall = m.step([position])
        assert local == [[position - 2, position - 1, position]]
        assert overall == [list(range(position + 1))]
    # a context shift: positions 1 and 2 go, 3..7 move back by 2 and are re-roped (both
    # caches: the fake keys are their positions, so the shifted keys show the new ones)
    m.cache.remove(0, 1, 3)
    assert m.shifts == [-2] * 10  # five cells, in each of the two layers' caches
    local, overall = m.step([6])
    assert local == [[4, 5, 6]]
    assert overall == [[0, 1, 2, 3, 4, 5, 6]]
    local, overall = m.step([7])
    assert local == [[5, 6, 7]] and overall == [list(range(8))]


def test_a_new_sequence_takes_one_stretch_not_the_holes_between_others():
    """Two sequences decoded together interleave their cells; when one ends, a new one goes
    to a free stretch and grows there, so its attended range stays its own length."""
    m = FakeModel(padding=4)
    m.cache.init(m.backend, DType.F32, max_sequences=3, capacity=16, max_batch=8)
    m.step([0, 1], [0, 0])
    m.step([0, 1], [1, 1])
    for p in range(2, 8):  # decode steps of both in one batch: cells alternate
        m.step([p, p], [0, 1])
    m.cache.remove(0, 0, None)  # sequence 0 ends: 8 single-cell holes among 1's cells
    k, _, mask = m.step([0, 1, 2], [2, 2, 2])
    for p in range(3, 8):
        k, _, mask = m.step([p], [2])
    cells = np.flatnonzero(m.cache.member[:, 2])
    np.testing.assert_array_equal(cells, np.arange(cells[0], cells[0] + 8))
    assert m.cache.hi - m.cache.lo <= 12  # its 8 cells, padded: not the 24 it would span
    assert visible(mask, k) == [list(range(8))]


class DeclaringBackend(NumpyBackend):
    """The NumPy backend declaring another cache layout, as a backend with fused attention
    would; its contexts record the dtype of every input."""

    def __init__(self, config: CacheConfig) -> None:
        super().__init__(None)  # type: ignore[arg-type]  # no weights needed
        self.config = config
        self.input_dtypes: list[DType] = []

    def cache_config(self) -> CacheConfig:
        return self.config

    def new_context(self) -> NumpyContext:
        backend = self

        class Recording(NumpyContext):
            def input(self, array: Any, dtype: DType = DType.F32) -> NumpyTensor:
                backend.input_dtypes.append(dtype)
                return super().input(array, dtype)

        return Recording()


@pytest.mark.parametrize(
    ("config", "values", "blocked", "mask"),
    [
        (CacheConfig(True, 128, DType.F32, False), (1, 1, 256), True, DType.F32),
        (CacheConfig(False, 32, DType.F16, True), (224, 1, 1), False, DType.F16),
    ],
    ids=["composed", "fused"],
)
def test_cache_follows_the_backends_declared_layout(config, values, blocked, mask):
    """What `cache_config` declares, the cache does: V transposed or as rows, the padding
    (here from the backend, not the model), masks in the backend's dtype, and a long
    prompt in blocks of queries only where attention is not fused."""
    backend = DeclaringBackend(config)
    cache = Causal()
    cache.init(backend, DType.F32, max_sequences=1, capacity=200, max_batch=200)
    assert cache.size == -(-200 // config.pad) * config.pad
    batch = BatchLayout(np.arange(200, dtype=np.int32), np.zeros(200, np.int32))
    with backend.new_context() as ctx:
        cache.start_forward(ctx, batch)
        kv = ctx.input(np.arange(200, dtype=np.float32).reshape(-1, 1, 1))
        cache.set_layer(0)
        cache.put(kv, kv)
        k, v, _ = cache.get()
        np.testing.assert_array_equal(ctx.compute(v)[0], ctx.compute(k)[0])
    assert cache.values[0].shape == values
    assert bool(cache.blocks()) is blocked
    assert backend.input_dtypes[:2] == [DType.I32, mask]  # cell locations, then the mask
