"""Stop strings over streamed text (Ollama's runner/common/stop.go, as one stateful object).

Generated text arrives a token piece at a time, and a stop string can straddle pieces. Text
is emitted as soon as it cannot be part of a stop string; the tail that could still grow
into one is held back. Works on decoded `str`: holding back incomplete UTF-8 is the
detokenizer's job.
"""

from __future__ import annotations


class StopMatcher:
    """Feed generated text; get back what is safe to stream, and whether a stop was hit.

    On a hit, the stop string and everything after it are dropped (as Ollama does). When
    several stops occur, the one that ends first wins (the one a character-by-character
    stream would complete first; of those ending together, the longest), so the result does
    not depend on how the text was split into pieces.
    """

    def __init__(self, stops: list[str]) -> None:
        # Empty strings would match everywhere (Ollama stops at once); they mean "no stop".
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text to emit now, whether generation must stop)."""
        if self.stopped:
            return "", True
        buf = self._held + text
        cut = self._first_stop(buf)
        if cut is not None:
            self._held, self.stopped = "", True
            return buf[:cut], True
        keep = self._partial_len(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """At the end of generation (EOS, length): the held-back text, which no stop can
        complete any more."""
        out, self._held = self._held, ""
        return out

    def _first_stop(self, buf: str) -> int | None:
        """Where to cut `buf`: the start of the stop occurrence that ends first. Held text
        holds no whole stop, so every occurrence ends in the newly fed text."""
        hits = [(i + len(s), i) for s in self.stops if (i := buf.find(s)) >= 0]
        return min(hits)[1] if hits else None

    def _partial_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop. A stop
        that would start earlier and run past the end also makes such a suffix, so
        everything before it is final."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
