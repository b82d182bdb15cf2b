"""A sampled token's way into the answer, and the answer's end: the one path every
generated token takes, one per step or several after speculative decoding's verification
(`herd.runner.speculate`)."""

from __future__ import annotations

import time

import numpy as np

from herd.errors import HerdError
from herd.runner.sequence import Event, Sequence
from herd.sample.logprobs import api_logprob
from herd.tokenizer import Tokenizer


def emit(tokenizer: Tokenizer, seq: Sequence, token: int, logits: np.ndarray) -> bool:
    """A sampled token (from `logits`) through the grammar, EOG, stops, logprobs and
    the limit; True when the sequence goes on with it as its next input."""
    if not seq.t_first:
        seq.t_first = time.perf_counter_ns()
    grammar = seq.sampler.grammar
    if grammar is not None:
        try:
            grammar.accept(token)
        except HerdError:  # cannot happen with a sound mask; end the answer, not the loop
            finish(seq, "stop")
            return False
    if tokenizer.is_eog(token):
        finish(seq, "stop")
        return False
    piece = seq.decoder.add(token)
    if seq.stuck(piece):
        finish(seq, "stop")
        return False
    seq.generated.append(token)
    seq.history.append(token)
    text, stopped = seq.stops.feed(piece)
    lp = (api_logprob(tokenizer, logits, token, seq.logprobs),) if seq.logprobs >= 0 else ()
    if text or lp:
        seq.events.put(Event(text=text, logprobs=lp))
    if stopped or (grammar is not None and grammar.done):  # a closed JSON value ends it
        finish(seq, "stop")
    elif len(seq.generated) >= seq.limit:
        finish(seq, "length")
    else:
        seq.pending = [token]
        return True
    return False


def finish(seq: Sequence, reason: str) -> None:
    """End a sequence: text held back by the stop matcher, then the final event with the
    counters; its slot is free for the next request."""
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
            prompt_cached_count=seq.cached,
            prompt_eval_duration=first - seq.t_start,
            eval_count=len(seq.generated),
            eval_duration=now - first,
            draft_proposed=seq.spec.proposed if seq.spec else 0,
            draft_accepted=seq.spec.accepted if seq.spec else 0,
        )
    )
    seq.done = True
    seq.slot.busy = False
    seq.slot.ended = time.monotonic()
