"""The runner: one loaded model serving one or many sequences with continuous batching.

Each step packs prompt chunks of new sequences and the decode tokens of running ones into
one batch (up to `num_batch` tokens), runs the model once, and samples a token for every
sequence that produced an output. Sequences live in slots of one shared KV cache; a slot
keeps its tokens after a request ends, so the next request that starts with the same
tokens (the next chat turn re-sends the whole conversation) only computes what is new.

The library drives the loop inline (`generate`); the server runs it on a thread
(`start`) and feeds it with `submit` from many request threads.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from herd.errors import HerdError
from herd.ml import Backend, DType
from herd.models import Batch
from herd.runner.options import Options
from herd.runner.stop import StopMatcher
from herd.sample import Sampler
from herd.tokenizer import StreamDecoder, Tokenizer


@dataclass
class Event:
    """A piece of streamed output; the last one has `done` and the counters."""

    text: str = ""
    done: bool = False
    done_reason: str = ""
    tokens: tuple[int, ...] = ()  # tokens generated (final event: all of them)
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0  # ns
    eval_count: int = 0
    eval_duration: int = 0  # ns


@dataclass
class Slot:
    id: int
    cached: list[int] = field(default_factory=list)  # tokens whose K/V are in the cache
    busy: bool = False


@dataclass
class Sequence:
    slot: Slot
    options: Options
    pending: list[int]  # tokens still to feed
    limit: int
    sampler: Sampler
    decoder: StreamDecoder
    stops: StopMatcher
    history: list[int]
    events: queue.SimpleQueue[Event]
    cancelled: threading.Event
    evaluated: int
    shift: bool = True
    generated: list[int] = field(default_factory=list)
    t_start: int = field(default_factory=time.perf_counter_ns)
    t_first: int = 0
    done: bool = False


class Runner:
    def __init__(
        self,
        model: object,
        backend: Backend,
        tokenizer: Tokenizer,
        options: Options,
        context_length: int,
        parallel: int = 1,
    ) -> None:
        self.model, self.backend, self.tokenizer = model, backend, tokenizer
        self.num_ctx = max(8, min(options.num_ctx, context_length))
        self.num_batch = max(1, min(options.num_batch, self.num_ctx))
        self.cache = model.cache  # type: ignore[attr-defined]
        self.cache.init(
            backend,
            getattr(model, "cache_dtype", DType.F16),
            parallel,
            self.num_ctx,
            self.num_batch,
        )
        self.slots = [Slot(i) for i in range(parallel)]
        self.active: list[Sequence] = []
        self.incoming: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self.lock = threading.Lock()  # one step at a time
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

    # ---- sequences ----------------------------------------------------------------------
    def _truncate(self, tokens: list[int], keep: int) -> list[int]:
        """Ollama's prompt truncation: first `keep` tokens + the most recent ones."""
        if len(tokens) < self.num_ctx:
            return tokens
        keep = min(max(keep, 0), self.num_ctx - 1)
        return tokens[:keep] + tokens[len(tokens) - (self.num_ctx - 1 - keep) :]

    def _claim_slot(self, tokens: list[int]) -> tuple[Slot, int]:
        """The free slot sharing the longest prefix with tokens; stale entries removed."""
        free = [s for s in self.slots if not s.busy]
        if not free:
            raise HerdError("no free sequence slot")

        def common(slot: Slot) -> int:
            n, limit = 0, min(len(slot.cached), len(tokens) - 1)
            while n < limit and slot.cached[n] == tokens[n]:
                n += 1
            return n

        slot = max(free, key=common)
        n = common(slot)
        if n < len(slot.cached):
            self.cache.remove(slot.id, n, None)
            del slot.cached[n:]
        slot.busy = True
        return slot, n

    def _new_sequence(
        self,
        tokens: list[int],
        options: Options,
        cancelled: threading.Event | None,
        shift: bool,
        truncate: bool,
    ) -> Sequence:
        if not tokens:
            raise HerdError("empty prompt")
        if len(tokens) >= self.num_ctx and not truncate:
            raise HerdError("the input length exceeds the context length")
        tokens = self._truncate(list(tokens), options.num_keep)
        slot, reused = self._claim_slot(tokens)
        sampler = Sampler(
            options.temperature,
            options.top_k,
            options.top_p,
            options.min_p,
            options.seed,
            options.repeat_penalty,
            options.repeat_last_n,
            options.presence_penalty,
            options.frequency_penalty,
        )
        limit = options.num_predict if options.num_predict >= 0 else 10 * self.num_ctx
        return Sequence(
            slot,
            options,
            tokens[reused:],
            limit,
            sampler,
            StreamDecoder(self.tokenizer),
            StopMatcher(list(options.stop)),
            list(tokens),
            queue.SimpleQueue(),
            cancelled or threading.Event(),
            evaluated=len(tokens) - reused,
            shift=shift,
        )

    def _finish(self, seq: Sequence, reason: str) -> None:
        if not seq.stops.stopped and reason != "":  # release text held back
            tail, _ = seq.stops.feed(seq.decoder.flush())
            tail += "" if seq.stops.stopped else seq.stops.flush()
            if tail:
                seq.events.put(Event(text=tail))
        now = time.perf_counter_ns()
        first = seq.t_first or now
        seq.events.put(
            Event(
                done=True,
                done_reason=reason,
                tokens=tuple(seq.generated),
                prompt_eval_count=seq.evaluated,
                prompt_eval_duration=first - seq.t_start,
                eval_count=len(seq.generated),
                eval_duration=now - first,
            )
        )
        seq.done = True
        seq.slot.busy = False

    # ---- the batch loop -----------------------------------------------------------------
    def step(self) -> bool:
        """Run one batch over the active sequences; False when there was nothing to do."""
        with self.lock:
            while not self.incoming.empty():
                self.active.append(self.incoming.get())
            for seq in self.active:
                if seq.cancelled.is_set() and not seq.done:
                    self._finish(seq, "")
            self.active = [s for s in self.active if not s.done]
            if not self.active:
                return False
            tokens: list[int] = []
            positions: list[int] = []
            seqs: list[int] = []
            outputs: list[int] = []
            owners: list[Sequence] = []
            for seq in self.active:
                room = self.num_batch - len(tokens)
                if room <= 0:
                    break
                if not seq.pending:
                    continue
                slot = seq.slot
                if len(slot.cached) + 1 > self.num_ctx:  # context full while generating
                    if not seq.shift:
                        self._finish(seq, "length")
                        continue
                    self._shift(slot, seq.options.num_keep)
                take = seq.pending[:room]
                start = len(slot.cached)
                tokens += take
                positions += range(start, start + len(take))
                seqs += [slot.id] * len(take)
                slot.cached += take
                seq.pending = seq.pending[len(take) :]
                if not seq.pending:
                    outputs.append(len(tokens) - 1)
                    owners.append(seq)
            if tokens:
                batch = Batch(
                    np.array(tokens, np.int32),
                    np.array(positions, np.int32),
                    np.array(seqs, np.int32),
                    np.array(outputs, np.int32),
                )
                with self.backend.new_context() as ctx:
                    out = self.model.forward(ctx, batch)  # type: ignore[attr-defined]
                    (logits,) = ctx.compute(out)
                for seq, row in zip(owners, logits, strict=True):
                    self._advance(seq, row)
            # rotate so a long prompt cannot starve the others
            self.active = self.active[1:] + self.active[:1]
            return True

    def _advance(self, seq: Sequence, logits: np.ndarray) -> None:
        if not seq.t_first:
            seq.t_first = time.perf_counter_ns()
        token = seq.sampler.sample(logits, seq.history)
        if self.tokenizer.is_eog(token):
            self._finish(seq, "stop")
            return
        seq.generated.append(token)
        seq.history.append(token)
        text, stopped = seq.stops.feed(seq.decoder.add(token))
        if text:
            seq.events.put(Event(text=text))
        if stopped:
            self._finish(seq, "stop")
        elif len(seq.generated) >= seq.limit:
            self._finish(seq, "length")
        else:
            seq.pending = [token]

    def _shift(self, slot: Slot, keep: int) -> None:
        """Context full: drop half of what follows the first `keep` tokens (re-roping keys)."""
        keep = min(max(keep, 0), len(slot.cached) - 1)
        discard = max((len(slot.cached) - keep) // 2, 1)
        self.cache.remove(slot.id, keep, keep + discard)
        del slot.cached[keep : keep + discard]

    # ---- public -------------------------------------------------------------------------
    def generate(
        self,
        tokens: list[int],
        options: Options,
        cancelled: threading.Event | None = None,
        *,
        shift: bool = True,
        truncate: bool = True,
    ) -> Iterator[Event]:
        """Stream one request's events; runs the loop inline unless a thread runs it.

        `shift=False`: end with done_reason "length" when the context fills instead of
        dropping old tokens; `truncate=False`: reject a prompt longer than the context.
        Closing the iterator (a client that went away) cancels the sequence.
        """
        with self.lock:
            seq = self._new_sequence(tokens, options, cancelled, shift, truncate)
        self.incoming.put(seq)
        self._wake.set()
        try:
            while True:
                if self._thread is None:
                    while seq.events.empty():
                        self.step()
                event = seq.events.get()
                yield event
                if event.done:
                    return
        finally:
            seq.cancelled.set()  # the consumer went away: free the slot at the next step
            self._wake.set()

    submit = generate

    def start(self) -> None:
        """Run the batch loop on a background thread (the server's mode)."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.is_set():
                if not self.step():
                    self._wake.wait(0.05)
                    self._wake.clear()

        self._thread = threading.Thread(target=loop, name="herd-runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def logits(self, tokens: list[int]) -> np.ndarray:
        """(len(tokens), n_vocab) logits, teacher-forced, from an empty slot 0."""
        if not tokens:
            raise HerdError("no tokens to evaluate")
        if len(tokens) > self.num_ctx:
            raise HerdError(f"{len(tokens)} tokens do not fit the context of {self.num_ctx}")
        with self.lock:
            slot = self.slots[0]
            self.cache.remove(slot.id, 0, None)
            slot.cached = []
            rows = []
            for i in range(0, len(tokens), self.num_batch):
                chunk = list(tokens[i : i + self.num_batch])
                batch = Batch.single(chunk, i, slot.id, "all")
                with self.backend.new_context() as ctx:
                    (out,) = ctx.compute(self.model.forward(ctx, batch))  # type: ignore[attr-defined]
                rows.append(out)
                slot.cached += chunk
            return np.concatenate(rows)

    def reset(self) -> None:
        """Forget every cached prefix."""
        with self.lock:
            for slot in self.slots:
                self.cache.remove(slot.id, 0, None)
                slot.cached = []
