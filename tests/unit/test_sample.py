"""Samplers: each transform as a table, then the whole `Sampler` against softmax statistics."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from herd.errors import NonFiniteError
from herd.options import Options
from herd.sample import Sampler, logprobs
from herd.sample import transforms as t


def row(*values: float) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def random_logits(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 3).astype(np.float32)


# --- transforms ----------------------------------------------------------------------------

PROBS = np.array([0.5, 0.25, 0.125, 0.125])  # exact in binary: cumulative sums have no rounding


@pytest.mark.parametrize(
    "p, kept",
    [(1.0, 4), (0.9, 4), (0.875, 4), (0.8, 3), (0.75, 3), (0.74, 2), (0.5, 2), (0.49, 1), (0.0, 1)],
)
def test_top_p_keeps_until_cumulative_exceeds_p(p: float, kept: int) -> None:
    assert t.top_p(PROBS, p) == kept


@pytest.mark.parametrize("p, kept", [(0.0, 4), (0.25, 4), (0.26, 2), (0.5, 2), (0.51, 1), (1.0, 1)])
def test_min_p_drops_below_fraction_of_max(p: float, kept: int) -> None:
    assert t.min_p(PROBS, p) == kept


@pytest.mark.parametrize(
    "history, kw, expected",
    [
        ([0, 1, 0], dict(last_n=64), [2, -2, 1, 0]),
        ([0, 1, 0], dict(last_n=64, repeat=2.0), [1, -4, 1, 0]),
        ([0, 1, 0], dict(last_n=64, presence=0.5), [1.5, -2.5, 1, 0]),
        ([0, 1, 0], dict(last_n=64, frequency=0.25), [1.5, -2.25, 1, 0]),
        ([0, 1, 0], dict(last_n=64, repeat=2.0, presence=0.5, frequency=0.25), [0, -4.75, 1, 0]),
        ([0, 1, 0], dict(last_n=1, repeat=2.0), [1, -2, 1, 0]),
        ([0, 1, 0], dict(last_n=0, repeat=2.0), [2, -2, 1, 0]),
        ([1, 0, 0, 0], dict(last_n=-1, frequency=1.0), [-1, -3, 1, 0]),
        ([], dict(last_n=64, repeat=2.0), [2, -2, 1, 0]),
    ],
    ids=[
        "none",
        "repeat",
        "presence",
        "frequency",
        "all",
        "window",
        "last_n-0",
        "last_n-all",
        "empty",
    ],
)
def test_penalties(history: list[int], kw: dict, expected: list[float]) -> None:
    logits = row(2, -2, 1, 0)
    before = logits.copy()
    assert t.penalize(logits, history, **kw).tolist() == expected
    assert np.array_equal(logits, before)  # pure: the input row is untouched


@pytest.mark.parametrize("n, k", [(10, 3), (1000, 40), (49152, 40), (1000, 400), (1000, 999)])
def test_top_k_is_the_k_largest_sorted(n: int, k: int) -> None:
    logits = random_logits(n, seed=k)
    ids, values = t.top_k(logits, k)
    assert ids.tolist() == np.argsort(-logits, kind="stable")[:k].tolist()
    assert np.array_equal(values, logits[ids])


@pytest.mark.parametrize("k", [0, -1, 10, 11])
def test_top_k_out_of_range_keeps_all(k: int) -> None:
    logits = random_logits(10, seed=0)
    ids, _ = t.top_k(logits, k)
    assert sorted(ids.tolist()) == list(range(10))


def test_top_k_with_ties_returns_k() -> None:
    ids, values = t.top_k(np.zeros(1000, dtype=np.float32), 40)
    assert len(set(ids.tolist())) == 40 and np.all(values == 0)


# --- Sampler -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, 1000, 49152])
def test_greedy_is_argmax(n: int) -> None:
    logits = random_logits(n, seed=n)
    assert Sampler(temperature=0).sample(logits, []) == int(np.argmax(logits))


def test_negative_temperature_is_greedy() -> None:
    logits = random_logits(100, seed=1)
    assert Sampler(temperature=-1, seed=3).sample(logits, []) == int(np.argmax(logits))


def test_greedy_applies_penalties_first() -> None:
    logits = row(3, 2.5, 0)
    assert Sampler(temperature=0).sample(logits, [0]) == 0
    assert Sampler(temperature=0, repeat_penalty=2.0).sample(logits, [0]) == 1


@pytest.mark.parametrize("seed", range(5))
def test_top_k_1_equals_greedy(seed: int) -> None:
    logits = random_logits(1000, seed)
    s = Sampler(temperature=1.5, top_k=1, top_p=1.0, seed=seed)
    assert all(s.sample(logits, []) == int(np.argmax(logits)) for _ in range(20))


def test_seeded_draws_are_reproducible() -> None:
    logits = np.zeros(1000, dtype=np.float32)
    draws = [
        [s.sample(logits, []) for _ in range(50)] for s in (Sampler(seed=42), Sampler(seed=42))
    ]
    assert draws[0] == draws[1]
    assert draws[0] != [Sampler(seed=43).sample(logits, []) for _ in range(50)]


def test_takes_the_options_by_keyword_with_their_defaults() -> None:
    """`Sampler(**options.sampler_kwargs())`: the same names and defaults as the options
    table, and no positional arguments to get out of order."""
    params = inspect.signature(Sampler).parameters
    kwargs = Options().sampler_kwargs()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert {n: params[n].default for n in kwargs} == kwargs
    assert set(params) == {*kwargs, "rng", "grammar"}
    with pytest.raises(TypeError):
        Sampler(0.5)  # type: ignore[misc]


def test_injected_rng_is_used() -> None:
    logits = np.zeros(1000, dtype=np.float32)
    a = Sampler(top_k=0, top_p=1.0, rng=np.random.default_rng(7))
    b = Sampler(top_k=0, top_p=1.0, seed=7)
    assert [a.sample(logits) for _ in range(10)] == [b.sample(logits) for _ in range(10)]


@pytest.mark.parametrize(
    "kw, allowed",
    [
        (dict(top_p=0.49), {0}),
        (dict(top_p=0.6), {0, 1}),
        (dict(top_p=0.74), {0, 1}),
        (dict(min_p=0.3), {0, 1}),
        (dict(top_k=3), {0, 1, 2}),
    ],
    ids=["top_p-0.49", "top_p-0.6", "top_p-0.74", "min_p", "top_k"],
)
def test_masks_restrict_the_draws(kw: dict, allowed: set[int]) -> None:
    # softmax of log(PROBS) at temperature 1 is PROBS; token 4 has (almost) no mass.
    logits = np.log(np.append(PROBS, 1e-9)).astype(np.float32)
    s = Sampler(**{"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 5, **kw})
    drawn = {s.sample(logits, []) for _ in range(300)}
    if kw.get("top_p") == 0.5:
        allowed = {0, 1}
    assert drawn == allowed


@pytest.mark.parametrize(
    "kw, keep",
    [
        (dict(temperature=0.7, top_k=5, top_p=1.0), 5),
        (dict(temperature=1.3, top_k=0, top_p=1.0), 8),
        (dict(temperature=1.0, top_k=0, top_p=0.8), None),
    ],
    ids=["top_k-T0.7", "all-T1.3", "top_p-0.8"],
)
def test_draws_follow_softmax(kw: dict, keep: int | None) -> None:
    logits = row(2.0, 1.5, 1.0, 0.7, 0.3, 0.0, -0.5, -1.0)  # already sorted descending
    probs = np.exp(logits / kw["temperature"])
    if keep is None:  # top_p: the prefix up to the first cumulative sum above p
        p = probs / probs.sum()
        keep = int(np.searchsorted(np.cumsum(p), kw["top_p"], side="right")) + 1
    else:
        probs = np.exp(logits[:keep] / kw["temperature"])
    expected = probs[:keep] / probs[:keep].sum()

    n = 20_000
    s = Sampler(seed=1234, **kw)
    counts = np.bincount([s.sample(logits, []) for _ in range(n)], minlength=8)
    assert counts[keep:].sum() == 0
    chi2 = float(((counts[:keep] - n * expected) ** 2 / (n * expected)).sum())
    assert chi2 < 25.0, (chi2, counts, n * expected)  # ~p=0.001 for up to 7 degrees of freedom


def test_nan_logits_raise() -> None:
    logits = row(1.0, float("nan"), 0.5)
    with pytest.raises(NonFiniteError, match="non-finite"):
        Sampler(temperature=0).sample(logits, [])
    with pytest.raises(NonFiniteError, match="non-finite"):
        Sampler(seed=1, top_k=0).sample(logits, [])


# --- logprobs ------------------------------------------------------------------------------


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    logits = random_logits(1000, seed=9)
    x = logits.astype(np.float64)
    ref = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
    lp, top = logprobs(logits, 17, top_n=5)
    assert lp == pytest.approx(ref[17], abs=1e-5)
    assert [i for i, _ in top] == np.argsort(-ref)[:5].tolist()
    assert [v for _, v in top] == pytest.approx(np.sort(ref)[::-1][:5], abs=1e-5)
    assert logprobs(logits, 17, top_n=0)[1] == []
    assert len(logprobs(row(1, 2), 0, top_n=20)[1]) == 2
