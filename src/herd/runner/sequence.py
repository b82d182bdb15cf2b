"""A request's sequence and what it streams: the Event each request yields, the Events
that carry them to the request, the Slot of the shared KV cache a sequence runs in, the
Sequence's per-request state, the repeat limit and the context size of each sequence."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from herd.errors import HerdError, NonFiniteError
from herd.options import Options
from herd.runner.stop import StopMatcher
from herd.sample import Sampler
from herd.tokenizer import StreamDecoder

if TYPE_CHECKING:
    from herd.runner.speculate import Speculation

log = logging.getLogger("herd.runner")


@dataclass
class Event:
    """A piece of streamed output; the last one has `done` and the counters."""

    text: str = ""
    done: bool = False
    done_reason: str = ""
    tokens: tuple[int, ...] = ()  # tokens generated (final event: all of them)
    prompt_eval_count: int = 0  # prompt tokens computed for this request
    # prompt tokens reused from the slot's cache (not computed): with prompt_eval_count,
    # the whole prompt
    prompt_cached_count: int = 0
    prompt_eval_duration: int = 0  # ns
    eval_count: int = 0
    eval_duration: int = 0  # ns
    # per generated token, Ollama's api.Logprob: {token, logprob, bytes, top_logprobs}
    logprobs: tuple[dict[str, Any], ...] = ()
    # the request failed (done is set too): `generate` raises it to the request's reader
    error: HerdError | None = None
    # speculative decoding (final event): tokens proposed, and how many the target kept
    draft_proposed: int = 0
    draft_accepted: int = 0


class Events:
    """A sequence's events on their way to its request. Without `stream`, all wait in a
    queue for the request's thread. With it, each streamed piece (every Event but the
    last, `done`, which an error is too) goes to `stream` at once, in the batch thread,
    and only the last waits: a server then wakes one request thread per request rather
    than one per token. At 8 clients those 8 wakes a step took the GIL from the batch
    thread, which spent 2.3 ms of a 35.5 ms step after the compute (0.9 ms streamed, the
    writes included), and streamed, `herd serve` gave 1.3% more tokens/s (9 of 10 paired
    waves ahead). A `stream` that raises is dropped: that piece and the rest queue, so
    that the request gets them the usual way."""

    def __init__(self, stream: Callable[[Event], None] | None = None) -> None:
        self.stream = stream
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()

    def put(self, event: Event) -> None:
        if self.stream is not None and not event.done:
            try:
                self.stream(event)
                return
            except Exception as e:  # the request's own consumer: never the batch loop's
                log.warning("a request's stream failed; its events queue instead: %r", e)
                self.stream = None
        self._queue.put(event)

    def get(self, timeout: float | None = None) -> Event:
        return self._queue.get(timeout=timeout)

    def empty(self) -> bool:
        return self._queue.empty()


@dataclass
class Slot:
    id: int
    # tokens whose K/V are in the cache (image rows by their keys, `herd.runner.images`)
    cached: list[int] = field(default_factory=list)
    busy: bool = False
    ended: float = 0.0  # monotonic time its last sequence ended
    parked: float = -1.0  # `ended` of the conversation last offered to the prompt cache


@dataclass
class Sequence:
    slot: Slot
    options: Options
    pending: list[int]  # tokens still to feed (image rows by their keys)
    limit: int
    sampler: Sampler
    decoder: StreamDecoder
    stops: StopMatcher
    history: list[int]
    events: Events
    cancelled: threading.Event
    evaluated: int
    cached: int = 0  # the prompt's first tokens, reused from the slot's cache
    shift: bool = True
    logprobs: int = -1  # top alternatives to report per token; -1: no logprobs
    generated: list[int] = field(default_factory=list)
    t_start: int = field(default_factory=time.perf_counter_ns)
    t_first: int = 0
    done: bool = False
    last_piece: str = ""  # the last token's text, stripped, and how many times in a row
    repeats: int = 0  # it came again (Ollama starts from "" too)
    # the prompt's images by the serial in their keys: encoded output and placeholder rows
    images: dict[int, tuple[np.ndarray, int]] = field(default_factory=dict)
    spec: Speculation | None = None  # speculative decoding (`herd.runner.speculate`)

    def stuck(self, piece: str) -> bool:
        """Ollama's guard against a model stuck on one token: the answer ends, without this
        token, when the same text, spaces stripped, comes more than REPEAT_LIMIT times in a
        row after itself."""
        piece = piece.strip()
        if piece == self.last_piece:
            self.repeats += 1
        else:
            self.last_piece, self.repeats = piece, 0
        return self.repeats > REPEAT_LIMIT


REPEAT_LIMIT = 30  # Ollama's: the 31st repeat of one token's text ends the answer


def finite(logits: np.ndarray) -> None:
    """NonFiniteError for a logits row with NaN or +inf (both propagate to the max)."""
    if not np.isfinite(logits.max()):
        raise NonFiniteError(
            "the model produced non-finite values (NaN or infinity) in its output; "
            "its weights may be corrupt"
        )


def context_size(options: Options, context_length: int) -> int:
    """The context (tokens) of each sequence: `num_ctx`, at most what the model was
    trained for."""
    return max(8, min(options.num_ctx, context_length))


def truncate(tokens: list[int], keep: int, num_ctx: int) -> list[int]:
    """Ollama's prompt truncation: first `keep` tokens + the most recent ones."""
    if len(tokens) < num_ctx:
        return tokens
    keep = min(max(keep, 0), num_ctx - 1)
    return tokens[:keep] + tokens[len(tokens) - (num_ctx - 1 - keep) :]
