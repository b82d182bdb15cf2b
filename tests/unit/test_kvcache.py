"""The causal KV cache with a fake model: contents, masks, windows, removal with shift."""

from __future__ import annotations

import numpy as np
import pytest

from herd.errors import CacheFullError
from herd.kvcache import Causal
from herd.kvcache.causal import BatchLayout
from herd.ml import DType
from herd.ml.backends.numpy import NumpyBackend

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
            return ctx.compute(k, v, mask)


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


def test_shared_cells_cannot_shift():
    m = new()
    m.step(list(range(4)), [0] * 4)
    m.cache.copy_prefix(0, 1, 4)
    with pytest.raises(NotImplementedError):
        m.cache.remove(0, 0, 1)


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
