"""The runner: one loaded model serving one or many sequences with continuous batching.

Each step packs prompt chunks of new sequences and the decode tokens of running ones into
one batch (up to `num_batch` tokens), runs the model once, and samples a token for every
sequence that produced an output. Sequences live in slots of one shared KV cache; a slot
keeps its tokens after a request ends, so the next request that starts with the same
tokens (the next chat turn re-sends the whole conversation) only computes what is new.

The library drives the loop inline (`generate`); the server runs it on a thread
(`start`) and feeds it with `submit` from many request threads. The sequences and the
events they stream are in `herd.runner.sequence`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import numpy as np

from herd.errors import CapabilityError, HerdError, RunnerError
from herd.ml import KV_CACHE_TYPES, Backend, Context, DType, Tensor
from herd.models import Batch, Model, Pixels, Vision, batch_inputs
from herd.options import Options
from herd.runner.batching import plan_step
from herd.runner.emit import emit, finish
from herd.runner.faults import check_tokens, request_error
from herd.runner.images import (
    Image,
    ImageCache,
    batch_images,
    fits,
    place_images,
    token_ids,
    whole_spans,
)
from herd.runner.prompt_cache import PromptCache
from herd.runner.recorder import KeptGraphs
from herd.runner.sequence import (
    Event,
    Events,
    Sequence,
    Slot,
    context_size,
    finite,
    truncate,
)
from herd.runner.slots import claim_slot, park_idle
from herd.runner.speculate import propose, speculation, verify
from herd.runner.stop import StopMatcher
from herd.sample import Constraint, Sampler
from herd.tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:
    from herd.runner.draft import Drafter

log = logging.getLogger("herd.runner")

GATHER_QUIET = 0.008  # s without a new request that ends a burst (`Runner._gather`)
GATHER_MAX = 0.03  # s a burst's first prompt waits at most for the rest
GATHER_AFTER = 0.25  # s after answers ended among others that their next turns may come
PARK_IDLE = 0.5  # s a slot is idle before the idle runner copies it to the prompt cache


class Runner:
    def __init__(
        self,
        model: Model,
        backend: Backend,
        tokenizer: Tokenizer,
        options: Options,
        context_length: int,
        parallel: int = 1,
        reuse_graphs: bool = True,
        cache_type: str = "f16",
        vision: Vision | None = None,
        encoder_backend: Backend | None = None,
        draft: Drafter | None = None,
        prefill: int | None = None,
        prompt_cache: int = 0,
        shared_prefix: bool = False,
    ) -> None:
        """`cache_type`: the KV cache's element type, "f16", "q8_0" or "q4_0" (Ollama's
        OLLAMA_KV_CACHE_TYPE values). `vision`: the model, where it takes images;
        `encoder_backend`: the one holding its vision encoder (a projector file's), if
        not `backend`. `draft`: a draft model's proposer (`herd.runner.speculate`).
        `prefill`: most prompt tokens in a step while other sequences decode (chunked
        prefill, `herd.runner.batching`); None: the batch's room after the decoding
        sequences' tokens, as llama-server's ubatch and vLLM's token budget share a step
        (half of `num_batch` split bursts of prompts into two steps: chat at 8 clients
        had a TTFT p95 of 1.30 s against llama-server's 1.09 s). `prompt_cache`: bytes
        of host memory for prompts that leave the slots (`herd.runner.prompt_cache`).
        `shared_prefix`: slots take a prefix another slot holds as its cells, one copy for
        all (`herd.runner.slots`), instead of a copy of its rows (HERD_SHARED_PREFIX)."""
        if model.cache is None:
            raise CapabilityError("an embedding model has no cache to generate with")
        if cache_type not in KV_CACHE_TYPES:
            raise HerdError(
                f"unknown KV cache type {cache_type!r}; choose one of: " + ", ".join(KV_CACHE_TYPES)
            )
        self.model, self.backend, self.tokenizer = model, backend, tokenizer
        self.num_ctx = context_size(options, context_length)
        self.num_batch = max(1, min(options.num_batch, self.num_ctx))
        self.prefill = max(1, prefill if prefill is not None else self.num_batch)
        self.cache = model.cache
        self.cache.init(backend, DType(cache_type), parallel, self.num_ctx, self.num_batch)
        self.slots = [Slot(i) for i in range(parallel)]
        self.active: list[Sequence] = []
        self.incoming: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self.lock = threading.Lock()  # one step at a time
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        # requests waiting for `lock` to claim a slot: the batch thread lets them in before
        # its next step (a Lock is not fair: released and taken again at once, it kept 6
        # of 8 requests that came during a prompt step out of the next 8 decode steps)
        self._admitting = 0
        self._admitted = threading.Condition()
        self._arrived = 0.0  # monotonic time the latest request reached the batch thread
        self._ended = -1e9  # monotonic time an answer last ended in a step of several
        # the batch thread's health, for the runner process's watchdog (herd.runner.faults)
        self.failure: BaseException | None = None  # what ended the batch thread
        self.step_started: float | None = None  # monotonic time the running compute began
        # graph reuse, for backends whose contexts can rerun a built graph
        self.graphs = KeptGraphs(backend, reuse_graphs)
        self.vision, self.encoder_backend = vision, encoder_backend or backend
        self.images = ImageCache(self._encode) if vision is not None else None
        self.image_token = None if vision is None else vision.image_token
        self.draft = draft
        self.prompts = PromptCache(prompt_cache) if prompt_cache > 0 else None
        self.shared_prefix = shared_prefix
        self.prompts_shared = 0  # prompt tokens slots took as another's cells (slots._share)
        self._kv_stats: dict[str, float] = {}  # kv_stats' last figures

    # ---- sequences ----------------------------------------------------------------------
    def _new_sequence(
        self,
        tokens: list[int],
        options: Options,
        cancelled: threading.Event | None,
        shift: bool,
        logprobs: int = -1,
        grammar: Constraint | None = None,
        images: Seq[tuple[int, Image]] = (),
        stream: Callable[[Event], None] | None = None,
    ) -> Sequence:
        if not tokens:
            raise HerdError("empty prompt")
        items, encoded = self._place_images(tokens, images)
        tokens = truncate(items, options.num_keep, self.num_ctx)
        if encoded:  # truncation may have cut into an image: it goes whole or not at all
            tokens = whole_spans(tokens, {k: rows for k, (_, rows) in encoded.items()})
        slot, reused = claim_slot(self, tokens)
        sampler = Sampler(**options.sampler_kwargs(), grammar=grammar)
        limit = options.num_predict if options.num_predict >= 0 else 10 * self.num_ctx
        return Sequence(
            slot,
            options,
            tokens[reused:],
            limit,
            sampler,
            StreamDecoder(self.tokenizer),
            StopMatcher(list(options.stop)),
            token_ids(self.image_token, tokens),
            Events(stream),
            cancelled or threading.Event(),
            evaluated=len(tokens) - reused,
            cached=reused,
            shift=shift,
            logprobs=logprobs,
            images=encoded,
            spec=None if encoded else speculation(options, sampler, self.draft is not None),
        )

    def _place_images(
        self, tokens: list[int], images: Seq[tuple[int, Image]]
    ) -> tuple[list[int], dict[int, tuple[np.ndarray, int]]]:
        """The prompt's ids checked against the vocabulary before any backend sees them
        (ggml's row lookup aborts the process on one out of range), then `place_images`."""
        spans = [range(start, start + image.tokens) for start, image in images]
        check_tokens(tokens, self.model.n_vocab, skip=spans)
        return place_images(self.images, tokens, images)

    def _encode(self, pixels: Pixels) -> np.ndarray:
        """The vision encoder's output for one image, in a pass of its own."""
        assert self.vision is not None
        with self.encoder_backend.new_context() as ctx:
            (out,) = ctx.compute(self.vision.encode(ctx, pixels))
        return out

    def _fail(self, seq: Sequence, error: HerdError) -> None:
        """End one sequence with an error; its slot is freed and its cells forgotten (what
        a failed pass wrote there is not to be reused as a prefix)."""
        if seq.done:
            return
        seq.done = True
        seq.events.put(Event(done=True, done_reason="error", error=error))
        self._forget(seq.slot)

    def _forget(self, slot: Slot) -> None:
        """Free a slot and its cells now."""
        slot.busy = False
        try:
            self.cache.remove(slot.id, 0, None)
        finally:
            slot.cached = []

    def _fail_all(self, error: HerdError) -> None:
        """The batch thread is ending: every sequence it holds or was handed fails."""
        with self.lock:
            while not self.incoming.empty():
                self.active.append(self.incoming.get())
            for seq in self.active:
                try:
                    self._fail(seq, error)
                except Exception:  # the cache is as broken as the rest: the error is out
                    log.exception("freeing sequence %d", seq.slot.id)
            self.active = []

    # ---- the batch loop -----------------------------------------------------------------
    def step(self) -> bool:
        """Run one batch over the active sequences; False when there was nothing to do."""
        with self.lock:
            while not self.incoming.empty():
                self.active.append(self.incoming.get())
            for seq in self.active:
                if seq.cancelled.is_set() and not seq.done:  # its client left: nobody
                    finish(seq, "")  # is waiting for this context, free its cells
                    self._forget(seq.slot)
            self.active = [s for s in self.active if not s.done]
            if not self.active:
                return False
            propose(self, self.active)  # speculative decoding's proposals, if any
            step = plan_step(self, self.active, self.prefill)
            if step is not None:
                self.step_started = time.monotonic()
                owners = step.owners
                try:
                    logits = self._compute(step.batch)
                except Exception as e:  # the pass failed: its sequences end, the others go on
                    self.graphs.drop()  # a graph that failed midway is not rerun
                    error = request_error(e)
                    for seq in step.members:
                        self._fail(seq, error)
                    logits, owners = np.zeros((0, 0), np.float32), []
                finally:
                    self.step_started = None
                at = 0
                for seq in owners:
                    n = 1 + (len(seq.spec.tokens) if seq.spec is not None else 0)
                    rows, at = logits[at : at + n], at + n
                    try:
                        if n > 1:
                            verify(self, seq, rows)
                        else:
                            self._advance(seq, rows[0])
                    except Exception as e:  # this request's sampler, grammar or text
                        self._fail(seq, request_error(e))
                if len(step.members) > 1 and any(seq.done for seq in step.members):
                    self._ended = time.monotonic()
            # rotate so a long prompt cannot starve the others
            self.active = self.active[1:] + self.active[:1]
            return True

    def _compute(self, batch: Batch) -> np.ndarray:
        """Logits for the batch's outputs, reusing a kept graph when it fits
        (`recorder.KeptGraphs`): read them before the next step."""
        return self.graphs.compute(self.cache, batch, len(self.slots), self._forward)

    def _forward(self, ctx: Context, batch: Batch) -> Tensor:
        """Build a forward pass: the cache's inputs, then the batch's, then the model.
        `KeptGraphs` records the same two calls to rerun a graph: nothing else may make
        inputs, and they must come in this order."""
        self.cache.start_forward(ctx, batch)
        return self.model.forward(ctx, batch_inputs(ctx, batch))

    def _advance(self, seq: Sequence, logits: np.ndarray) -> None:
        finite(logits)
        emit(self.tokenizer, seq, seq.sampler.sample(logits, seq.history), logits)

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
        logprobs: int = -1,
        grammar: Constraint | None = None,
        images: Seq[tuple[int, Image]] = (),
        stream: Callable[[Event], None] | None = None,
    ) -> Iterator[Event]:
        """Stream one request's events; runs the loop inline unless a thread runs it.

        A prompt longer than the context keeps its first `num_keep` tokens and the latest
        (the request pipeline has turned it away first where the request said so).
        `shift=False`: end with done_reason "length" when the context fills instead of
        dropping old tokens. `logprobs` >= 0: each generated token's Event carries its
        log-probability and that many top alternatives. `grammar` constrains the answer
        (structured outputs) and ends it once complete. `images`: (index of the first
        placeholder in `tokens`, image) of each image in the prompt, encoded here unless
        an earlier request brought the same one. `stream`: called with each streamed
        piece instead of yielding it, in the batch thread while it holds the runner's lock
        (`sequence.Events`: it must be quick, and must not call the runner); the iterator
        then yields the last Event only. Closing the iterator (a client that went away)
        cancels the sequence.
        """
        if self.failure is not None:  # the batch thread died: nothing would serve it
            raise RunnerError(f"the model's engine stopped: {self.failure!r}")
        with self._admitted:
            self._admitting += 1
        try:
            with self.lock:
                seq = self._new_sequence(
                    tokens, options, cancelled, shift, logprobs, grammar, images, stream
                )
                # handed over before the lock goes: a batch thread that saw every slot
                # taken (or no request claiming) could step between the claim and the
                # handover, and left this prompt to a step of its own (traced: 110 ms
                # for 8 rows, right after the burst's 340 ms prompt step)
                self.incoming.put(seq)
                self._arrived = time.monotonic()
        finally:
            with self._admitted:
                self._admitting -= 1
                self._admitted.notify_all()
        self._wake.set()
        try:
            while True:
                if self._thread is None:
                    while seq.events.empty():
                        self.step()
                try:
                    event = seq.events.get(timeout=1.0)
                except queue.Empty:  # the batch thread fails what it holds when it dies
                    if self.failure is not None and seq.events.empty():
                        raise RunnerError(f"the model's engine stopped: {self.failure!r}") from None
                    continue
                if event.error is not None:
                    raise event.error
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
            try:
                while not self._stop.is_set():
                    with self._admitted:  # bounded: a burst of requests cannot stall steps
                        self._admitted.wait_for(lambda: self._admitting == 0, timeout=0.05)
                    self._gather()
                    if not self.step():
                        self._park_idle()
                        self._wake.wait(0.05)
                        self._wake.clear()
            except BaseException as e:  # a bug outside any one request: no more steps
                self.failure = e
                log.error("the runner's batch thread died", exc_info=e)
                self._fail_all(RunnerError(f"the model's engine stopped: {e!r}"))

        self._thread = threading.Thread(target=loop, name="herd-runner", daemon=True)
        self._thread.start()

    def _gather(self) -> None:
        """New prompts with nothing decoding, within GATHER_AFTER of an answer's end in a
        step of several sequences, or several prompts waiting: wait for a lull in
        arrivals (GATHER_QUIET, at most GATHER_MAX, until every slot is taken) before the
        prompt step. A burst's requests reach the runner over 15-25 ms (8 chats' next
        turns, sent as their answers end together); a step started with the first ran
        50-70 ms alone while the rest waited, and left that sequence a step ahead of the
        others to its end, where it had a step of its own again. vLLM's scheduler delays
        prompts likewise (`delay_factor`), while sequences decode."""
        if self.incoming.empty() or any(not s.done for s in self.active):
            return
        start = time.monotonic()
        if start - self._ended > GATHER_AFTER and self.incoming.qsize() < 2:
            return  # one client at a time, however short its requests: no waiting
        while not self._stop.is_set() and not all(s.busy for s in self.slots):
            now = time.monotonic()
            if now - start >= GATHER_MAX:
                return
            if now - self._arrived >= GATHER_QUIET and self._admitting == 0:
                return
            time.sleep(0.001)

    def _park_idle(self) -> None:
        """With nothing to compute, copy the conversations of slots idle for PARK_IDLE to
        the prompt cache (`slots.park_idle`), one slot a lock, and none once a request
        comes: it goes first. A chat's next turn comes sooner than PARK_IDLE, and keeps
        its slot's cells."""
        if self.prompts is None:
            return
        for slot in self.slots:
            if self._admitting or not self.incoming.empty() or self._stop.is_set():
                return
            if slot.busy or slot.parked == slot.ended:
                continue
            if time.monotonic() - slot.ended < PARK_IDLE:
                continue
            with self.lock:
                if not slot.busy:
                    park_idle(self, slot)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def logits(self, tokens: list[int], images: Seq[tuple[int, Image]] = ()) -> np.ndarray:
        """(len(tokens), n_vocab) logits, teacher-forced, from an empty slot 0; `images`
        as in `generate`."""
        if not tokens:
            raise HerdError("no tokens to evaluate")
        if len(tokens) > self.num_ctx:
            raise HerdError(f"{len(tokens)} tokens do not fit the context of {self.num_ctx}")
        with self.lock:
            items, encoded = self._place_images(tokens, images)
            slot = self.slots[0]
            self.cache.remove(slot.id, 0, None)
            slot.cached = []
            rows, i = [], 0
            while i < len(items):
                end = i + fits(items[i:], self.num_batch, True, encoded)
                chunk = items[i:end]
                batch = Batch.single(token_ids(self.image_token, chunk), i, slot.id, "all")
                batch.images = batch_images(chunk, 0, encoded)
                with self.backend.new_context() as ctx:
                    (out,) = ctx.compute(self._forward(ctx, batch))
                rows.append(out)
                slot.cached += chunk
                i = end
            return np.concatenate(rows)

    def kv_usage(self) -> float:
        """Fraction (0..1) of the KV cache cells in use."""
        return min(1.0, self.cache.used_cells() / self.cache.size)

    def kv_stats(self) -> dict[str, float]:
        """The cache's occupancy figures (`Causal.stats`: cells used, fragmentation...),
        or, while a step holds the cache, those of the last call that found it free. Never
        waits for a step: every request's last message carries these, and a wait kept 3
        of 8 chats from their answers' end through another request's 70 ms prompt step
        (their clients' next turns then missed that step's batch)."""
        if not self.lock.acquire(blocking=False):
            return dict(self._kv_stats)
        try:
            stats = self.cache.stats()
            stats["shared_tokens"] = self.prompts_shared
            if self.prompts is not None:
                stats.update(self.prompts.stats())
        finally:
            self.lock.release()
        self._kv_stats = stats
        return dict(stats)

    def release_graphs(self) -> None:
        """Free the kept graphs and their compute buffers (before the backend closes)."""
        with self.lock:
            self.graphs.drop()
        if self.draft is not None:
            self.draft.runner.release_graphs()

    def reset(self) -> None:
        """Forget every cached prefix."""
        if self.draft is not None:
            self.draft.runner.reset()
        with self.lock:
            for slot in self.slots:
                self.cache.remove(slot.id, 0, None)
                slot.cached = []
            if self.prompts is not None:
                self.prompts.clear()
