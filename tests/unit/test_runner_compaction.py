"""The runner with a cache that moves cells: batched greedy decoding equals decoding alone
for 8 sequences joining and leaving at random steps, and a request cancelled mid-prompt or
mid-answer leaves only the cached prefixes behind."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from herd.gguf import open_gguf
from herd.ml import CacheConfig, DType
from herd.ml.backends.numpy import NumpyBackend
from herd.models import load_model
from herd.options import Options
from herd.runner import Runner
from herd.runner.sequence import Event, Sequence

PAD = 8  # small padding: the moves start at small waste, as they would at 128 on big caches


class SmallPadding(NumpyBackend):
    streams = False  # whether decoding sequences attend as one block (`_streams`)

    def cache_config(self) -> CacheConfig:
        return CacheConfig(True, PAD, DType.F32, False, streams=self.streams)


class Letters:
    def piece(self, id: int, special: bool = False) -> bytes:
        return bytes([97 + id % 26])

    def is_eog(self, id: int) -> bool:
        return False


def make_runner(path, parallel: int, num_ctx: int = 96, streams: bool = False) -> Runner:
    g = open_gguf(path)
    backend = SmallPadding(g)
    backend.streams = streams
    model = load_model(g.config(), backend)
    options = Options(num_ctx=num_ctx, num_batch=16)
    return Runner(model, backend, Letters(), options, model.context_length, parallel=parallel)


def greedy(n: int) -> Options:
    return Options(temperature=0, num_predict=n)


def admit(r: Runner, tokens: list[int], options: Options, cancelled=None) -> Sequence:
    """What `generate` hands the batch loop, without its thread."""
    with r.lock:
        seq = r._new_sequence(tokens, options, cancelled, True)
    r.incoming.put(seq)
    return seq


def drain(seq: Sequence) -> list[Event]:
    events = []
    while not seq.events.empty():
        events.append(seq.events.get())
    return events


@pytest.mark.parametrize(("seed", "streams"), [(0, False), (1, False), (2, True), (3, True)])
def test_batched_decoding_with_moving_cells_equals_decoding_alone(tiny_llama_path, seed, streams):
    """Up to 8 requests at once, arriving at random steps with random prompts (some the
    next turn of an earlier conversation, reusing its cells), random answer lengths, a few
    cancelled midway. Each sequence grows in its own part of the cache; packed at random
    steps (`defragment`), they grow into each other's way and the cache moves cells as
    they come and go. Every answer (a cancelled one: as far as it got) is the one the
    request gets alone. With `streams`, runs of decoding sequences attend as one block,
    each over its own part of the cache, when their cells lie there (`Causal._streams`)."""
    rng = np.random.default_rng(seed)
    r = make_runner(tiny_llama_path, parallel=8, streams=streams)
    planned = r.cache._plan_blocks
    streamed = []

    def recording(batch):
        blocks = planned(batch)
        streamed.extend(b for b in blocks if b[4])
        return blocks

    r.cache._plan_blocks = recording  # type: ignore[method-assign]
    done: list[tuple[list[int], int, tuple[int, ...]]] = []  # prompt, num_predict, answer
    pending = []  # (arrival step, prompt, num_predict, cancel after this many steps or None)
    for i in range(20):
        if done and rng.random() < 0.3:  # filled in when admitted, from a finished one
            prompt = None
        else:
            prompt = [int(t) for t in rng.integers(1, 64, int(rng.integers(3, 30)))]
        cancel = int(rng.integers(1, 8)) if rng.random() < 0.2 else None
        pending.append((int(rng.integers(0, 60)) + i, prompt, int(rng.integers(2, 14)), cancel))
    pending.sort(key=lambda p: p[0])
    running: list[tuple[Sequence, list[int], int, threading.Event, int | None, list]] = []
    step = 0
    while pending or running:
        while pending and pending[0][0] <= step and len(running) < 8:
            _, prompt, n, cancel = pending.pop(0)
            if prompt is None:  # the next turn of a finished conversation
                if not done:
                    prompt = [5, 6, 7]
                else:
                    last = done[int(rng.integers(len(done)))]
                    prompt = last[0] + list(last[2]) + [int(t) for t in rng.integers(1, 64, 4)]
            cancelled = threading.Event()
            seq = admit(r, prompt, greedy(n), cancelled)
            running.append((seq, prompt, n, cancelled, cancel, []))
        r.step()
        step += 1
        if rng.random() < 0.1:  # packed from cell 0: sequences then grow into each other
            r.cache.defragment()  # and their cells move apart again
        still = []
        for seq, prompt, n, cancelled, cancel, events in running:
            events += drain(seq)
            if events and events[-1].done:
                done.append((prompt, n, events[-1].tokens))
            elif cancel is not None and seq.generated and len(seq.generated) >= cancel:
                cancelled.set()  # the client leaves: what it got must still match
                done.append((prompt, n, ("cancelled", *seq.generated)))  # type: ignore[arg-type]
            else:
                still.append((seq, prompt, n, cancelled, cancel, events))
        running = still
        assert step < 2000
    r.step()  # the cancelled ones' cells go
    assert r.cache.moved > 0, "no cell moved: the history did not exercise compaction"
    assert bool(streamed) is streams
    alone = make_runner(tiny_llama_path, parallel=1)
    for prompt, n, got in done:
        want = list(alone.generate(prompt, greedy(n)))[-1].tokens
        if got and got[0] == "cancelled":
            assert want[: len(got) - 1] == got[1:]
        else:
            assert got == want


def test_cancelling_mid_prompt_or_mid_answer_returns_to_the_cached_prefixes(tiny_llama_path):
    """Two finished conversations stay cached (the baseline); a third request cancelled
    mid-prompt, then one cancelled mid-answer, each while the other two slots decode: once
    they are gone the cache holds the baseline's cells again, and a finished
    conversation's next turn still reuses its cells."""
    r = make_runner(tiny_llama_path, parallel=5, num_ctx=128)
    first = [1, *range(10, 30)]
    kept = [list(r.generate(p, greedy(6)))[-1] for p in (first, [2, *range(30, 45)])]
    baseline = r.cache.used_cells()
    assert baseline == (len(first) + 5) + (16 + 5)
    for mid_answer in (False, True):
        busy = [admit(r, [3, *range(40, 60)], greedy(40)) for _ in range(2)]
        cancelled = threading.Event()
        seq = admit(r, [4, *range(1, 60)], greedy(40), cancelled)  # 60 tokens: 4 batches
        while not (seq.generated if mid_answer else seq.slot.cached):
            r.step()
        assert seq.slot.id == 4 and bool(seq.generated) is mid_answer
        assert mid_answer or len(seq.pending) > 16  # a prompt part-way
        assert r.cache.used_cells() > baseline
        cancelled.set()
        for other in busy:
            other.cancelled.set()
        r.step()
        assert seq.done and all(o.done for o in busy)
        assert r.cache.used_cells() == baseline
    follow = first + list(kept[0].tokens) + [7, 8]
    again = list(r.generate(follow, greedy(3)))[-1]
    assert again.prompt_cached_count == len(first) + 5
