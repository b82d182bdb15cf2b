"""The runner: turns prompts into streamed tokens on one loaded model.

It owns the model's KV cache. Sequence 0 keeps the tokens of the last request, so a
follow-up request (the next chat turn re-sends the whole conversation) only computes what
is new. The server issue grows this into several sequences batched together; the pieces
(Batch with sequence ids, the multi-sequence cache) are already shaped for that.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

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


class Runner:
    SEQ = 0

    def __init__(
        self,
        model: object,
        backend: Backend,
        tokenizer: Tokenizer,
        options: Options,
        context_length: int,
    ) -> None:
        self.model, self.backend, self.tokenizer = model, backend, tokenizer
        self.num_ctx = max(8, min(options.num_ctx, context_length))
        self.num_batch = max(1, min(options.num_batch, self.num_ctx))
        self.cache = model.cache  # type: ignore[attr-defined]
        self.cache.init(
            backend, getattr(model, "cache_dtype", DType.F16), 1, self.num_ctx, self.num_batch
        )
        self.cached: list[int] = []  # tokens whose K/V are in the cache for SEQ

    # ---- low level ----------------------------------------------------------------------
    def _forward(self, tokens: list[int], start: int, all_outputs: bool) -> np.ndarray:
        batch = Batch.single(tokens, start, self.SEQ, "all" if all_outputs else "last")
        with self.backend.new_context() as ctx:
            out = self.model.forward(ctx, batch)  # type: ignore[attr-defined]
            (logits,) = ctx.compute(out)
        self.cached.extend(tokens)
        return logits

    def _reuse_prefix(self, tokens: list[int]) -> int:
        """Keep the longest cached prefix of tokens (minus one so logits get computed)."""
        n = 0
        limit = min(len(self.cached), len(tokens) - 1)
        while n < limit and self.cached[n] == tokens[n]:
            n += 1
        if n < len(self.cached):
            self.cache.remove(self.SEQ, n, None)
            del self.cached[n:]
        return n

    def _prefill(self, tokens: list[int], all_outputs: bool = False) -> np.ndarray:
        """Feed tokens after the reusable prefix; logits of the last (or every new) token."""
        start = self._reuse_prefix(tokens) if not all_outputs else self._reset()
        self.evaluated = len(tokens) - start
        rows = []
        for i in range(start, len(tokens), self.num_batch):
            chunk = tokens[i : i + self.num_batch]
            last = i + self.num_batch >= len(tokens)
            rows.append(self._forward(chunk, i, all_outputs))
            if not all_outputs and not last:
                rows.clear()
        return np.concatenate(rows) if all_outputs else rows[-1][0]

    def _reset(self) -> int:
        self.cache.remove(self.SEQ, 0, None)
        self.cached.clear()
        return 0

    def _truncate(self, tokens: list[int], keep: int) -> list[int]:
        """Ollama's prompt truncation: first `keep` tokens + the most recent ones."""
        if len(tokens) < self.num_ctx:
            return tokens
        keep = min(max(keep, 0), self.num_ctx - 1)
        return tokens[:keep] + tokens[len(tokens) - (self.num_ctx - 1 - keep) :]

    def _shift(self, keep: int) -> None:
        """Context full: drop half of what follows the first `keep` tokens (re-roping keys)."""
        keep = min(max(keep, 0), len(self.cached) - 1)
        discard = max((len(self.cached) - keep) // 2, 1)
        self.cache.remove(self.SEQ, keep, keep + discard)
        del self.cached[keep : keep + discard]

    # ---- public -------------------------------------------------------------------------
    def logits(self, tokens: list[int]) -> np.ndarray:
        """(len(tokens), n_vocab) logits, teacher-forced, from an empty cache."""
        if not tokens:
            raise HerdError("no tokens to evaluate")
        if len(tokens) > self.num_ctx:
            raise HerdError(f"{len(tokens)} tokens do not fit the context of {self.num_ctx}")
        return self._prefill(list(tokens), all_outputs=True)

    def generate(self, tokens: list[int], options: Options) -> Iterator[Event]:
        if not tokens:
            raise HerdError("empty prompt")
        t0 = time.perf_counter_ns()
        tokens = self._truncate(list(tokens), options.num_keep)
        logits = self._prefill(tokens)
        t1 = time.perf_counter_ns()
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
        decoder, stops = StreamDecoder(self.tokenizer), StopMatcher(list(options.stop))
        limit = options.num_predict if options.num_predict >= 0 else 10 * self.num_ctx
        history, generated, reason = list(tokens), [], "length"
        while len(generated) < limit:
            token = sampler.sample(logits, history)
            if self.tokenizer.is_eog(token):
                reason = "stop"
                break
            generated.append(token)
            history.append(token)
            text, stopped = stops.feed(decoder.add(token))
            if text:
                yield Event(text=text)
            if stopped:
                reason = "stop"
                break
            if len(generated) >= limit:
                break
            if len(self.cached) + 1 > self.num_ctx:
                self._shift(options.num_keep)
            logits = self._forward([token], len(self.cached), False)[0]
        if not stops.stopped:  # release text held back for a stop string or partial UTF-8
            tail, _ = stops.feed(decoder.flush())
            tail += "" if stops.stopped else stops.flush()
            if tail:
                yield Event(text=tail)
        t2 = time.perf_counter_ns()
        yield Event(
            done=True,
            done_reason=reason,
            tokens=tuple(generated),
            prompt_eval_count=self.evaluated,
            prompt_eval_duration=t1 - t0,
            eval_count=len(generated),
            eval_duration=t2 - t1,
        )
