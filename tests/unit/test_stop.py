"""Stop strings on streamed text: every way of splitting a stream must give the same output."""

from __future__ import annotations

import itertools

import pytest

from herd.runner.stop import StopMatcher

# (stops, full generated text, expected emitted text, stopped)
CASES = [
    (["</s>"], "Hello</s>ignored", "Hello", True),
    (["</s>"], "Hello world", "Hello world", False),
    (["</s>"], "a < b </ c </s", "a < b </ c </s", False),  # unfinished stop flushed at the end
    ([], "anything </s> goes", "anything </s> goes", False),
    ([""], "empty stops are ignored", "empty stops are ignored", False),
    (["User:", "\n\n"], "Sure.\n\nUser: hi", "Sure.", True),
    (["User:", "\n\n"], "Sure.\nUser: hi", "Sure.\n", True),
    (["b", "abc"], "xxabc", "xxa", True),  # the stop that completes first wins
    (["abc", "b"], "xxabc", "xxa", True),
    (["bc", "abc"], "xxabc", "xx", True),  # ending together: the longer one
    (["abcd", "bc"], "xabcd", "xa", True),
    (["aab"], "aaab", "a", True),  # overlapping prefix: "aa" then "aab"
    (["aab"], "aaaa", "aaaa", False),
    (["<|im_end|>"], "ok<|im_<|im_end|>", "ok<|im_", True),
    (["stop"], "stop", "", True),
    (["ab", "abc"], "xab", "x", True),
    (["日本"], "こんにちは日本語", "こんにちは", True),
]


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, stopped = m.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + m.flush(), False


def splits(text: str, max_cuts: int = 3) -> list[list[str]]:
    """The text cut at every combination of up to `max_cuts` boundaries (pieces may be empty)."""
    out = []
    for n in range(max_cuts + 1):
        for cuts in itertools.combinations_with_replacement(range(len(text) + 1), n):
            bounds = [0, *cuts, len(text)]
            out.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return out


@pytest.mark.parametrize("stops, text, expected, stopped", CASES)
def test_every_split_gives_the_same_result(
    stops: list[str], text: str, expected: str, stopped: bool
) -> None:
    for pieces in splits(text):
        assert run(stops, pieces) == (expected, stopped), pieces


def test_stop_arriving_in_pieces_is_held_then_dropped() -> None:
    m = StopMatcher(["</s>"])
    assert m.feed("Hi <") == ("Hi ", False)
    assert m.feed("/s") == ("", False)
    assert m.feed(">after") == ("", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_held_text_is_released_when_it_cannot_be_a_stop() -> None:
    m = StopMatcher(["</s>"])
    assert m.feed("a </") == ("a ", False)
    assert m.feed("b") == ("</b", False)
    assert m.feed("</") == ("", False)
    assert m.flush() == "</"
