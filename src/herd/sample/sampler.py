"""`Sampler`: one sequence's token choice from a logits row, in Ollama's fixed order."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from herd.errors import OptionError
from herd.sample import transforms as t


class Constraint(Protocol):
    """A constraint on one sequence's tokens (herd.sample.grammar.Grammar: structured
    outputs). The sampler masks with it; whoever drives the sampler advances it."""

    def mask(self, logits: t.Logits, out: t.Logits) -> t.Logits:
        """`logits` (n_vocab,) with every token the constraint rules out at -inf, written
        into `out` (which may be `logits` itself); returns `out`."""
        ...

    def accept(self, token: int) -> None:
        """Advance past the token the sampler chose."""
        ...

    @property
    def done(self) -> bool:
        """Nothing but the end of the sequence can follow."""
        ...


class Sampler:
    """Penalties, the grammar mask, then greedy (temperature 0) or top_k, temperature,
    softmax, top_p, min_p, draw.

    Values are clamped as Ollama does (temperature < 0 -> 0; top_p, min_p into [0, 1]).
    `seed` -1 draws from OS entropy; any other seed makes the draws reproducible. Pass `rng`
    to inject a generator directly (tests, or several samplers sharing one stream).
    `grammar` (structured outputs) rules tokens out before any choice is made; whoever
    drives the sampler advances it with the chosen token (`grammar.accept`).
    """

    def __init__(
        self,
        *,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.9,
        min_p: float = 0.0,
        seed: int = -1,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        rng: np.random.Generator | None = None,
        grammar: Constraint | None = None,
    ) -> None:
        # NaN passes every clamp below and ends in a draw from NaN probabilities: refused
        # here too, for callers that build options without the server's checks
        for name, value in (
            ("temperature", temperature),
            ("top_p", top_p),
            ("min_p", min_p),
            ("repeat_penalty", repeat_penalty),
            ("presence_penalty", presence_penalty),
            ("frequency_penalty", frequency_penalty),
        ):
            if not math.isfinite(float(value)):
                raise OptionError(f"option {name!r} must be a finite number, not {value!r}")
        self.temperature = max(float(temperature), 0.0)
        self.top_k = int(top_k)
        self.top_p = min(max(float(top_p), 0.0), 1.0)
        self.min_p = min(max(float(min_p), 0.0), 1.0)
        self.repeat_penalty = float(repeat_penalty)
        self.repeat_last_n = int(repeat_last_n)
        self.presence_penalty = float(presence_penalty)
        self.frequency_penalty = float(frequency_penalty)
        if rng is None:
            # a negative seed other than -1 wraps (NumPy takes no negative seeds)
            rng = np.random.default_rng(None if seed == -1 else seed % 2**64)
        self.rng = rng
        self.grammar = grammar
        self._scratch: t.Logits | None = None  # penalized logits, reused across tokens

    def sample(self, logits: t.Logits, history: Sequence[int] = ()) -> int:
        """Choose the next token id from `logits` (n_vocab,), given the tokens so far."""
        ids, weights = self._candidates(logits, history)
        if weights is None:
            return int(ids[0])
        return int(ids[t.draw(weights, self.rng)])

    def distribution(self, logits: t.Logits, history: Sequence[int] = ()) -> tuple[t.Ids, t.Probs]:
        """The distribution `sample` draws from, as (ids, probabilities summing to 1): the
        target of speculative decoding's acceptance rule. Greedy: all mass on one id."""
        ids, weights = self._candidates(logits, history)
        if weights is None:
            return ids, np.ones(1)
        return ids, weights / float(weights.sum())

    def _candidates(self, logits: t.Logits, history: Sequence[int]) -> tuple[t.Ids, t.Probs | None]:
        """The ids `sample` may choose and their (unnormalised) weights; weights None:
        greedy, the one id."""
        if self._scratch is None or self._scratch.shape != logits.shape:
            self._scratch = np.empty_like(logits)
        logits = t.penalize(
            logits,
            history,
            last_n=self.repeat_last_n,
            repeat=self.repeat_penalty,
            presence=self.presence_penalty,
            frequency=self.frequency_penalty,
            out=self._scratch,
        )
        if self.grammar is not None:
            logits = self.grammar.mask(logits, self._scratch)
        if self.temperature == 0.0:
            return np.array([t.greedy(logits)], np.intp), None
        ids, values = t.top_k(logits, self.top_k)
        probs = t.softmax(t.temperature(values, self.temperature))
        probs = probs[: t.top_p(probs, self.top_p)]
        probs = probs[: t.min_p(probs, self.min_p)]
        return ids[: len(probs)], probs
