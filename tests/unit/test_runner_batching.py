"""What a step of the batch loop computes with several sequences (herd.runner.batching and
the cache's per-sequence blocks): each sequence's rows attend only its own cells, with the
logits of attending the whole range, on every backend; decoding sequences get their token
every step while a long prompt is fed in chunks of at most `prefill` tokens; a decode
step's rows come in slot order, so its graph is rerun however the runner rotates; requests
that come during a step join the next one."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest

import herd.kvcache.causal as causal
from herd.gguf import open_gguf
from herd.ml import available_backends, open_backend
from herd.models import load_model
from herd.options import Options
from herd.runner import Runner
from herd.runner.sequence import Sequence

BACKENDS = [b for b in ("numpy", "ggml", "mlx") if b in available_backends()]


class Letters:
    def piece(self, id: int, special: bool = False) -> bytes:
        return bytes([97 + id % 26])

    def is_eog(self, id: int) -> bool:
        return False


def make_runner(path, backend: str = "numpy", parallel: int = 3, **kw) -> Runner:
    g = open_gguf(path)
    b = open_backend(backend, g)
    model = load_model(g.config(), b)
    options = Options(num_ctx=128, num_batch=kw.pop("num_batch", 64))
    return Runner(model, b, Letters(), options, model.context_length, parallel=parallel, **kw)


def admit(r: Runner, tokens: list[int], n: int = 8) -> Sequence:
    with r.lock:
        seq = r._new_sequence(tokens, Options(temperature=0, num_predict=n), None, True)
    r.incoming.put(seq)
    return seq


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(1, 64, n)] for n in lengths]


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_sequence_attends_its_own_cells_with_the_same_logits(
    tiny_llama_path, monkeypatch, backend
):
    """Three sequences' prompts and then their decode steps in one batch each: planned in
    blocks (one per sequence, each over its own part of the cache), and the decoding ones
    as one block of streams where the backend takes them (ggml: `CacheConfig.streams`;
    NumPy, told it does, attends each in turn), the logits equal those of one attention
    over the whole range with the mask."""
    if backend == "numpy":
        declared = type(open_backend("numpy", open_gguf(tiny_llama_path))).cache_config
        monkeypatch.setattr(
            "herd.ml.backends.numpy.NumpyBackend.cache_config",
            lambda self: replace(declared(self), streams=True),
        )
    logits: dict[str, list[np.ndarray]] = {}
    planned: dict[str, list[list[tuple[int, ...]]]] = {}
    for mode in ("streams", "blocks", "whole"):
        if mode == "blocks":
            monkeypatch.setattr(causal.Causal, "_streams", lambda self, batch, cuts: [])
        if mode == "whole":
            monkeypatch.setattr(causal.Causal, "_plan_blocks", lambda self, batch: [])
        r = make_runner(tiny_llama_path, backend)
        seen: list[np.ndarray] = []
        compute = r._compute

        def recording(batch, compute=compute, seen=seen, r=r, mode=mode):
            out = compute(batch)
            planned.setdefault(mode, []).append(list(r.cache._blocks))
            seen.append(np.array(out, copy=True))
            return out

        r._compute = recording  # type: ignore[method-assign]
        for tokens in prompts(0, [9, 5, 12]):
            admit(r, tokens, n=4)
        while r.active or not r.incoming.empty():
            r.step()
        logits[mode] = seen
    # the prompts: one block per sequence, each narrower than the whole range
    first = planned["blocks"][0]
    assert len(first) == 3 and all(n == 0 and e - s < 3 * 128 for _, _, s, e, n in first)
    # decode steps: with streams, the three sequences as one block over their own parts
    # (MLX declares no streams: its decode steps stay one block per sequence)
    assert all(len(p) == 3 for p in planned["blocks"][1:])
    streams = [(0, 3, 0, 128, 3)] if backend != "mlx" else planned["blocks"][1]
    assert all(p == streams for p in planned["streams"][1:])
    assert len(logits["streams"]) == len(logits["whole"]) >= 4
    for mode in ("streams", "blocks"):
        for a, b in zip(logits[mode], logits["whole"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def steps_while_decoding(r: Runner, prompted: list[Sequence], decoding: list[Sequence]):
    """The batches' slot ids (`Batch.sequences`) of the steps until every prompted
    sequence's prompt is in (it has sampled its first token), each decoding sequence
    getting a token every step."""
    batches = []
    compute = r._compute

    def recording(batch):
        batches.append(batch.sequences.copy())
        return compute(batch)

    r._compute = recording  # type: ignore[method-assign]
    while not all(seq.generated for seq in prompted):
        before = [len(seq.generated) for seq in decoding]
        r.step()
        assert [len(seq.generated) for seq in decoding] == [n + 1 for n in before]
    return batches


def test_decoding_goes_on_while_a_long_prompt_is_fed_in_chunks(tiny_llama_path):
    """Two sequences decode; a 100-token prompt arrives. Every step feeds each decoding
    sequence its token and at most `prefill` of the prompt's, until the prompt is in."""
    r = make_runner(tiny_llama_path, prefill=24)
    a, b = (admit(r, p, n=40) for p in prompts(1, [6, 7]))
    r.step()  # both prompts in one step, then decoding
    r.step()
    long = admit(r, prompts(2, [100])[0], n=2)
    batches = steps_while_decoding(r, [long], [a, b])
    prompt_rows = [int((s == long.slot.id).sum()) for s in batches]
    assert max(prompt_rows) <= 24 and sum(prompt_rows[:-1]) >= 100 - 24
    assert len(batches) == -(-100 // 24)


def test_two_long_prompts_share_the_prefill_budget_in_turn(tiny_llama_path):
    """Two 100-token prompts arrive while two sequences decode: the runner's rotating
    order puts each prompt first within one turn of its four sequences, so neither waits
    until the other is in, and the decoding sequences still get a token every step."""
    r = make_runner(tiny_llama_path, parallel=4, prefill=24)
    a, b = (admit(r, p, n=60) for p in prompts(1, [6, 7]))
    r.step()
    r.step()
    first, second = (admit(r, p, n=2) for p in prompts(3, [100, 100]))
    batches = steps_while_decoding(r, [first, second], [a, b])
    rows = [[int((s == seq.slot.id).sum()) for s in batches] for seq in (first, second)]
    assert all(max(r_) <= 24 for r_ in rows)
    firsts = [next(i for i, n in enumerate(r_) if n) for r_ in rows]
    assert max(firsts) < 4  # each prompt has come first within one turn of the four
    last_steps = [max(i for i, n in enumerate(r_) if n) for r_ in rows]
    assert min(last_steps) > max(firsts)  # the second began before the first was in
    assert len(batches) <= -(-200 // 24) + 1  # the budget was used, not left idle


def test_decode_steps_keep_their_layout_and_rerun_their_graph(tiny_llama_path):
    """Three sequences decoding together: the runner rotates its list every step, the
    batch's rows stay in slot order, and the kept decode graph is rerun, not rebuilt."""
    if "ggml" not in available_backends():
        pytest.skip("ggml-python not installed (pip install -e '.[ggml]')")
    r = make_runner(tiny_llama_path, "ggml")
    for tokens in prompts(3, [5, 6, 7]):
        admit(r, tokens, n=30)
    r.step()  # the prompts
    orders, graphs = [], []
    compute = r._compute

    def recording(batch):
        orders.append(batch.sequences.tolist())
        out = compute(batch)
        graphs.append(id(r.graphs.kept["decode"][1]))
        return out

    r._compute = recording  # type: ignore[method-assign]
    for _ in range(12):
        r.step()
    assert all(order == sorted(order) for order in orders)
    assert len(set(graphs)) <= 2  # built once (again at most once, crossing an alignment)


def test_requests_that_come_during_a_step_join_the_next(tiny_llama_path):
    """Requests that wait for the runner's lock while a step computes claim their slots
    before the batch thread takes the lock again: the next step has their prompts. (A
    Lock is not fair: the batch thread took it straight back, and requests that came
    during a prompt step sat out the next decode steps.)"""
    r = make_runner(tiny_llama_path, parallel=4)
    batches: list[set[int]] = []
    compute = r._compute

    def recording(batch):
        if not batches:  # the first step: hold it until all three are at the lock
            deadline = time.monotonic() + 10
            while r._admitting < 3 and time.monotonic() < deadline:
                time.sleep(0.001)
        batches.append(set(batch.sequences.tolist()))
        return compute(batch)

    r._compute = recording  # type: ignore[method-assign]
    r.start()
    try:
        greedy = Options(temperature=0, num_predict=6)
        first = threading.Thread(target=lambda: list(r.generate(prompts(1, [20])[0], greedy)))
        first.start()
        while not batches and r.step_started is None:
            time.sleep(0.001)
        later = [
            threading.Thread(target=lambda t=t: list(r.generate(t, greedy)))
            for t in prompts(2, [6, 7, 8])
        ]
        for t in later:
            t.start()
        for t in [first, *later]:
            t.join(timeout=60)
    finally:
        r.stop()
    assert len(batches[0]) == 1
    assert len(batches[1]) == 4, batches[:4]


def test_the_cache_figures_never_wait_for_a_step(tiny_llama_path):
    """Every request's last message carries the cache's figures. Asked for while a step
    holds the runner, they are those of the last time it was free, at once: waiting held
    chats' ends back through another request's prompt step, and their clients' next turns
    then missed that step's batch."""
    r = make_runner(tiny_llama_path)
    list(r.generate(prompts(3, [12])[0], Options(temperature=0, num_predict=4)))
    before = r.kv_stats()
    assert before["cells_used"] > 0
    got: list[dict[str, float]] = []
    with r.lock:  # a step computing
        asking = threading.Thread(target=lambda: got.append(r.kv_stats()))
        asking.start()
        asking.join(timeout=5)
        assert not asking.is_alive(), "kv_stats waited for the step"
    assert got == [before]
    r.cache.remove(0, 0, None)  # free again: the figures are fresh
    assert r.kv_stats()["cells_used"] < before["cells_used"]


def test_a_burst_of_prompts_after_a_busy_step_goes_in_one_step(tiny_llama_path, monkeypatch):
    """With nothing decoding and answers just ended in a step of several sequences
    (chat clients whose answers ended together send their next turns), the first prompts
    of a burst wait for a lull in arrivals: requests a few ms apart share one prompt step instead of
    the first computing alone while the others wait for it. One client never waits, even
    with answers of one token that end a step after its request came."""
    import herd.runner.engine as engine

    monkeypatch.setattr(engine, "GATHER_QUIET", 0.5)  # generous: CI's threads start late
    monkeypatch.setattr(engine, "GATHER_MAX", 5.0)
    r = make_runner(tiny_llama_path, parallel=4)
    batches: list[set[int]] = []
    compute = r._compute

    def recording(batch):
        batches.append(set(batch.sequences.tolist()))
        return compute(batch)

    r._compute = recording  # type: ignore[method-assign]
    r.start()
    try:
        for p in prompts(4, [9, 8, 7]):  # one client's short requests, one after another
            t = time.monotonic()
            list(r.generate(p, Options(temperature=0, num_predict=1)))
            assert time.monotonic() - t < 0.4  # at once, not after a lull of 0.5 s
        # two clients decoding together (long enough to overlap), then a burst of four
        for n, apart, wave in ((64, 0.0, prompts(5, [6, 7])), (3, 0.01, prompts(6, [5, 6, 7, 8]))):
            batches.clear()
            ask = Options(temperature=0, num_predict=n)
            clients = [
                threading.Thread(target=lambda p=p, ask=ask: list(r.generate(p, ask))) for p in wave
            ]
            for c in clients:
                c.start()
                time.sleep(apart)
            for c in clients:
                c.join(timeout=60)
        # the pair's answers ended among others: the next burst, 10 ms apart, goes together
        assert len(batches[0]) == 4, batches
    finally:
        r.stop()


def test_a_claimed_slot_is_handed_to_the_batch_thread_with_the_lock(tiny_llama_path):
    """Whenever the runner's lock is free, every taken slot's sequence is with the batch
    thread (queued or active): one that saw every slot taken, or nobody claiming, and
    stepped between a claim and its handover left that prompt to a step of its own."""
    r = make_runner(tiny_llama_path)
    seen: list[tuple[int, int]] = []

    class Watched:
        def __init__(self, lock: threading.Lock) -> None:
            self.inner = lock

        def __enter__(self):
            self.inner.acquire()

        def __exit__(self, *exc):
            busy = sum(s.busy for s in r.slots)
            held = r.incoming.qsize() + sum(not s.done for s in r.active)
            seen.append((busy, held))
            self.inner.release()

        def acquire(self, blocking: bool = True) -> bool:
            return self.inner.acquire(blocking)

        def release(self) -> None:
            self.inner.release()

    r.lock = Watched(r.lock)  # type: ignore[assignment]
    list(r.generate(prompts(7, [10])[0], Options(temperature=0, num_predict=3)))
    assert seen and all(busy <= held for busy, held in seen), seen


def test_streamed_pieces_come_from_the_batch_thread_and_equal_the_yielded_ones(
    tiny_llama_path,
):
    """`generate(stream=)`: three concurrent requests' pieces go to their callbacks in the
    batch thread, and the iterator yields only the last Event; the text and counters are
    those of the same requests without a stream."""

    def run(streamed: bool) -> list[tuple[str, tuple[int, ...], set[str]]]:
        r = make_runner(tiny_llama_path, parallel=3)
        r.start()
        out: list = [None] * 3

        def client(i: int) -> None:
            pieces: list[str] = []
            threads: set[str] = set()

            def stream(event) -> None:
                pieces.append(event.text)
                threads.add(threading.current_thread().name)

            events = list(
                r.generate(
                    prompts(i, [5 + 7 * i])[0],
                    Options(temperature=0, num_predict=6 + i),
                    stream=stream if streamed else None,
                )
            )
            if streamed:
                assert len(events) == 1 and events[0].done
            text = "".join(pieces) + "".join(e.text for e in events)
            out[i] = (text, events[-1].tokens, threads)

        try:
            clients = [threading.Thread(target=client, args=(i,)) for i in range(3)]
            for t in clients:
                t.start()
            for t in clients:
                t.join(60)
        finally:
            r.stop()
        return out

    plain, streamed = run(False), run(True)
    assert [(t, k) for t, k, _ in streamed] == [(t, k) for t, k, _ in plain]
    assert all(len(text) == 6 + i for i, (text, _, _) in enumerate(streamed))
    assert all(threads == {"herd-runner"} for _, _, threads in streamed)


def test_a_stream_that_fails_leaves_its_pieces_to_the_queue_in_order():
    """`Events`: a callback that raises is dropped; the piece it failed on and every later
    one wait in the queue, in order, and the batch loop never sees the error."""
    from herd.runner.sequence import Event, Events

    got: list[str] = []

    def stream(event: Event) -> None:
        if event.text == "c":
            raise BrokenPipeError("the server went away")
        got.append(event.text)

    events = Events(stream)
    for text in "abcd":
        events.put(Event(text=text))
    events.put(Event(done=True, done_reason="stop"))
    queued = []
    while not events.empty():
        queued.append(events.get())
    assert got == ["a", "b"]
    assert [e.text for e in queued[:2]] == ["c", "d"] and queued[2].done
