"""The error type of the Go template engine."""

from __future__ import annotations

from herd.errors import TemplateError


class GoTemplateError(TemplateError):
    """A Go template failed to parse or execute. The message reads like Go's
    (`template: NAME:LINE:COL: ...`); `line` is 1-based, `col` is the byte offset in the line
    (0-based), as Go's execution errors count it."""

    def __init__(self, message: str, line: int | None = None, col: int | None = None) -> None:
        super().__init__(message)
        self.line = line
        self.col = col


def position(text: str, pos: int) -> tuple[int, int]:
    """(line, byte column) of a text index, as parse.Tree.ErrorContext computes them."""
    before = text[:pos]
    nl = before.rfind("\n")
    col = len(before[nl + 1 :].encode("utf-8", "surrogatepass"))
    return before.count("\n") + 1, col
