"""Pure logit transforms, applied by `Sampler` in a fixed order.

Each function takes arrays and returns new ones; none mutates its input. After `top_k` the
sampler works on a small candidate set, `(ids, values)` sorted by value descending, so every
later step costs O(k) instead of O(n_vocab).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from herd.errors import NonFiniteError

Logits = npt.NDArray[np.float32]
Ids = npt.NDArray[np.intp]
Probs = npt.NDArray[np.float64]


def penalize(
    logits: Logits,
    history: Sequence[int],
    *,
    last_n: int,
    repeat: float = 1.0,
    presence: float = 0.0,
    frequency: float = 0.0,
    out: Logits | None = None,
) -> Logits:
    """llama.cpp's penalties over the last `last_n` tokens of `history` (-1: all of it, 0: none).

    A token seen `c` times: its logit is divided by `repeat` when positive and multiplied by it
    when negative (both push it down), then `c * frequency + presence` is subtracted.
    Returns `logits` itself when nothing applies, else a penalized copy, written into `out`
    when given (a reused buffer: a fresh 1 MB array per token costs more in page faults
    than the penalties themselves).
    """
    if last_n == 0 or not history or (repeat == 1.0 and presence == 0.0 and frequency == 0.0):
        return logits
    window = history if last_n < 0 else history[-last_n:]
    ids, counts = np.unique(np.asarray(window, dtype=np.intp), return_counts=True)
    if out is None:
        out = logits.copy()
    else:
        np.copyto(out, logits)
    seen = out[ids]
    seen = np.where(seen > 0, seen / repeat, seen * repeat)
    seen -= counts * frequency + presence
    out[ids] = seen
    return out


def greedy(logits: Logits) -> int:
    """The highest logit's id; NaN logits are an error (a broken model must not emit tokens)."""
    token = int(np.argmax(logits))
    if np.isnan(logits[token]):
        raise NonFiniteError("the model produced non-finite values (NaN logits)")
    return token


def top_k(logits: Logits, k: int) -> tuple[Ids, Logits]:
    """The `k` largest logits as `(ids, values)`, sorted descending; k <= 0 or >= n keeps all."""
    n = logits.shape[0]
    if 0 < k < n:
        ids = _largest(logits, k)
    else:
        ids = np.arange(n, dtype=np.intp)
    order = np.argsort(-logits[ids], kind="stable")
    ids = ids[order]
    return ids, logits[ids]


def _largest(logits: Logits, k: int) -> Ids:
    """Ids of the k largest logits, unordered, in about two vectorized passes over the row.

    Split the row into k chunks: the smallest chunk maximum is a value that k distinct logits
    reach, so every top-k logit is >= it. Few logits pass that bar on real outputs, so the
    O(n) `argpartition` (about 5x slower than the passes) then runs on a few hundred values.
    """
    n = logits.shape[0]
    if 4 * k <= n:
        bar = logits[: (n // k) * k].reshape(k, -1).max(axis=1).min()
        cand = np.flatnonzero(logits >= bar)
        if cand.shape[0] >= k:  # fewer only with NaN logits: fall through to the full partition
            m = cand.shape[0]
            return cand[np.argpartition(logits[cand], m - k)[m - k :]]
    return np.argpartition(logits, n - k)[n - k :]


def temperature(values: Logits, temp: float) -> Logits:
    """Scale logits by 1/temp; the floor keeps a tiny temperature from dividing by zero."""
    return (values / max(temp, 1e-7)).astype(np.float32, copy=False)


def softmax(values: Logits) -> Probs:
    """Probabilities in float64 (the candidate set is small, and sums stay exact enough)."""
    x = values.astype(np.float64) - np.max(values)
    e = np.exp(x)
    return e / float(e.sum())


def top_p(probs: Probs, p: float) -> int:
    """How many of the (descending) probabilities to keep: up to and including the first one
    where the cumulative sum exceeds `p` (p >= 1 keeps all)."""
    if p >= 1.0:
        return len(probs)
    cut = int(np.searchsorted(np.cumsum(probs), p, side="right"))
    return min(cut + 1, len(probs))


def min_p(probs: Probs, p: float) -> int:
    """How many of the (descending) probabilities reach `p` times the largest one."""
    if p <= 0.0 or len(probs) == 0:
        return len(probs)
    # Descending order makes the kept set a prefix, so its length is a count.
    return max(1, int(np.count_nonzero(probs >= probs[0] * p)))


def draw(probs: Probs, rng: np.random.Generator) -> int:
    """An index drawn in proportion to `probs` (which need not sum to 1)."""
    cum = np.cumsum(probs)
    total = float(cum[-1]) if len(cum) else float("nan")
    if not np.isfinite(total) or total <= 0.0:
        raise NonFiniteError(
            "the model produced non-finite values: no probability to draw from (NaN or "
            "infinite logits)"
        )
    r = rng.random() * total
    return min(int(np.searchsorted(cum, r, side="right")), len(cum) - 1)
