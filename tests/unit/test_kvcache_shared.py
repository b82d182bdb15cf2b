"""A prefix held once for several sequences (`Causal.copy_prefix`, which slots use for a
common system prompt): each sequence attends it as a piece of its own, with its own cells
in its own part of the cache, and gets what attending its own copy of those rows gives,
on every backend, alone or decoding with others as one block of streams."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from herd import envconfig
from herd.gguf import open_gguf
from herd.kvcache import Causal
from herd.kvcache.causal import BatchLayout
from herd.ml import DType, available_backends, open_backend
from herd.nn.attention import attention

BACKENDS = [b for b in ("numpy", "ggml") if b in available_backends()]
HQ, HKV, D, VOCAB = 4, 2, 8, 50
rng = np.random.default_rng(5)
# a token's query, key and value, the same wherever it is (so a shared prefix's rows are
# what the sequence would have computed itself)
TABLE = rng.standard_normal((3, VOCAB, HQ, D)).astype(np.float32)


class Run:
    def __init__(self, path, backend: str, streams: bool, dtype: DType) -> None:
        self.backend = open_backend(backend, open_gguf(path))  # its weights go unused
        # NumPy, told it takes streams, attends each sequence of a run in turn
        config = replace(self.backend.cache_config(), streams=streams)
        self.backend.cache_config = lambda: config  # type: ignore[method-assign]
        self.cache = Causal(padding=16)
        self.cache.init(self.backend, dtype, max_sequences=4, capacity=64, max_batch=64)
        self.tokens: dict[int, list[int]] = {s: [] for s in range(4)}

    planned: list[tuple[object, ...]] = []  # (blocks, prefix) of each pass

    def step(self, feed: dict[int, list[int]]) -> dict[int, np.ndarray]:
        """Each sequence's new tokens in one pass: the attention output of its rows."""
        positions, seqs, toks = [], [], []
        for seq, new in feed.items():
            start = len(self.tokens[seq])
            positions += range(start, start + len(new))
            seqs += [seq] * len(new)
            toks += new
            self.tokens[seq] += new
        batch = BatchLayout(np.array(positions, np.int32), np.array(seqs, np.int32))
        ids = np.array(toks)
        with self.backend.new_context() as ctx:
            self.cache.start_forward(ctx, batch)
            self.planned = [*self.planned, (list(self.cache._blocks), self.cache._prefix)]
            self.cache.set_layer(0)
            q = ctx.input(TABLE[0, ids])
            k = ctx.input(TABLE[1, ids, :HKV])
            v = ctx.input(TABLE[2, ids, :HKV])
            (out,) = ctx.compute(attention(q, k, v, 0.5, self.cache))
        return {s: out[np.array(seqs) == s] for s in feed}

    def share(self, src: int, dst: int, n: int) -> None:
        self.cache.copy_prefix(src, dst, n)
        self.tokens[dst] = self.tokens[src][:n]


def _history(run: Run, shared: bool) -> list[dict[int, np.ndarray]]:
    system = rng_tokens(0, 21)
    outs = [run.step({0: system + rng_tokens(1, 5)})]
    if shared:
        run.share(0, 1, len(system))
        run.share(0, 3, len(system))
        outs.append(run.step({1: rng_tokens(2, 7), 2: rng_tokens(3, 9), 0: [7]}))
        outs.append(run.step({3: rng_tokens(4, 3)}))
    else:
        outs.append(run.step({1: system + rng_tokens(2, 7), 2: rng_tokens(3, 9), 0: [7]}))
        outs.append(run.step({3: system + rng_tokens(4, 3)}))
    for i in range(12):  # all four decode together, then one alone, then two
        outs.append(run.step({s: [(i * 7 + s) % VOCAB] for s in range(4)}))
    outs.append(run.step({1: [3]}))
    outs.append(run.step({1: [4], 3: [5, 6, 7]}))
    return outs


def rng_tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


@pytest.mark.parametrize("streams", [True, False], ids=["streams", "blocks"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shared_prefix_attends_as_each_sequences_own_copy(tiny_llama_path, backend, streams):
    shared_run = Run(tiny_llama_path, backend, streams, DType.F16)
    shared = _history(shared_run, True)
    own = _history(Run(tiny_llama_path, backend, streams, DType.F16), False)
    cache = shared_run.cache
    assert cache.stats()["cells_shared"] == 21  # one copy of the system prompt for three
    # the four decoding together: one run over their parts, with the prefix piece, which
    # moved to the end of sequence 0's part when it was first shared: no view of a part
    # (the first cells of each, as many as the longest needs) takes it in
    runs = [(b, p) for blocks, p in shared_run.planned for b in blocks if b[4] == 4]
    assert bool(runs) == streams and all(p == (64 - 21, 64) for _, p in runs)
    assert all(b[3] <= 64 - 21 for b, _ in runs)
    for a, b in zip(shared, own, strict=True):
        for seq in a:
            rows = len(a[seq])
            np.testing.assert_allclose(a[seq], b[seq][-rows:], rtol=2e-3, atol=2e-3)
    # each sequence's own cells lie in its own part: the prefix is a piece apart
    for seq in (1, 3):
        cells = np.flatnonzero(cache.member[:, seq])
        mine = cells[cells >= seq * 64]
        assert len(mine) == len(cells) - 21 and mine[-1] - mine[0] + 1 == len(mine)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_prefix_stays_with_its_first_holder_when_the_others_leave(tiny_llama_path, backend):
    """The others' chats end: the prefix, moved to the end of sequence 0's part when it
    was first shared, is sequence 0's alone again, and 0's next chat under it goes to
    its own part, attending as it would have."""
    outs = {}
    for shared in (True, False):
        run = Run(tiny_llama_path, backend, True, DType.F16)
        _history(run, shared)
        for seq in (1, 2, 3):
            run.cache.remove(seq, 0, None)
        run.cache.remove(0, 21, None)  # a new chat keeps the system prompt
        run.tokens[0] = run.tokens[0][:21]
        outs[shared] = [run.step({0: rng_tokens(9, 6)})] + [run.step({0: [t]}) for t in (1, 2)]
        cells = np.flatnonzero(run.cache.member[:, 0])
        assert len(cells) == 21 + 8 and cells.min() >= 0 and cells.max() < 64
        assert run.cache.stats()["cells_shared"] == 0
    for a, b in zip(outs[True], outs[False], strict=True):
        np.testing.assert_allclose(a[0], b[0], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(
    ("value", "want"),
    [("", False), ("0", False), ("false", False), ("F", False), ("1", True), ("true", True)],
)
def test_herd_shared_prefix_reads_as_a_bool(monkeypatch, value, want):
    """Unset or a false value keeps the copies (the default); `false` is not on."""
    monkeypatch.setenv("HERD_SHARED_PREFIX", value)
    assert envconfig.shared_prefix() is want
