"""The thinking parser: model output -> thinking (between the tags, at the start) and
content, incrementally while streaming; a possible partial tag is held back."""

from __future__ import annotations

# ---- thinking ------------------------------------------------------------------------------


def _overlap(s: str, tag: str) -> int:
    """Length of the longest suffix of s that is a prefix of tag."""
    for i in range(min(len(s), len(tag)), 0, -1):
        if s.endswith(tag[:i]):
            return i
    return 0


class ThinkingParser:
    """Splits output into thinking (between the tags, at the start) and content, as
    Ollama's thinking.Parser does: whitespace around the tags is dropped, output without an
    opening tag is all content, and a possible partial tag is held back."""

    def __init__(self, opening: str = "<think>", closing: str = "</think>") -> None:
        self.opening, self.closing = opening, closing
        self.state = "opening"  # opening, start, thinking, end, done
        self.acc = ""

    def add(self, text: str) -> tuple[str, str]:
        """(thinking, content) that can be emitted now."""
        self.acc += text
        thinking, content = [], []
        while True:
            t, c, more = self._eat()
            thinking.append(t)
            content.append(c)
            if not more:
                return "".join(thinking), "".join(content)

    def flush(self) -> tuple[str, str]:
        """What is still held back, at the end of the output."""
        acc, self.acc = self.acc, ""
        if self.state in ("thinking", "start"):
            return acc, ""
        return "", acc if self.state != "end" else acc.lstrip()

    def _eat(self) -> tuple[str, str, bool]:
        acc = self.acc
        if self.state == "opening":
            trimmed = acc.lstrip()
            if trimmed.startswith(self.opening):
                after = trimmed[len(self.opening) :].lstrip()
                self.acc = after
                self.state = "thinking" if after else "start"
                return "", "", True
            if self.opening.startswith(trimmed):
                return "", "", False  # a partial tag or only whitespace: wait
            self.state, self.acc = "done", ""
            return "", acc, False
        if self.state == "start":
            trimmed = acc.lstrip()
            self.acc = ""
            if not trimmed:
                return "", "", False
            self.state, self.acc = "thinking", trimmed
            return "", "", True
        if self.state == "thinking":
            if self.closing in acc:
                thinking, rest = acc.split(self.closing, 1)
                rest = rest.lstrip()
                self.acc = ""
                self.state = "done" if rest else "end"
                return thinking, rest, False
            n = _overlap(acc, self.closing)
            self.acc = acc[len(acc) - n :] if n else ""
            return acc[: len(acc) - n], "", False
        if self.state == "end":
            trimmed = acc.lstrip()
            self.acc = ""
            if trimmed:
                self.state = "done"
            return "", trimmed, False
        self.acc = ""
        return "", acc, False
