"""Sizes that a graph computes from its inputs, so one graph serves every batch length.

A `Dim` is an int (the size in the pass being recorded: shape checks and NumPy see a
plain number) that also carries how the graph gets it: ("shape", input, axis), the size
of an input's axis; ("value", input), a one-element int64 input's value (the context's
slice bounds); or (op, a, b) of those and ints, for + - * //. A context's inputs have
Dim sizes; ops compute their output shapes in Python as before, and the arithmetic keeps
the symbol; `Graph.const` given a list holding a Dim (a Reshape target, a Slice bound)
emits the nodes that compute it instead of a constant (`DimValues`), so the recorded
graph names no token or cell count. A size that loses its symbol (any other arithmetic,
`int()`) is embedded as a constant: that graph is then specific to it, which is correct
(the serialized graph is the session key) and only costs a session of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Expr = Any  # a tuple as above, or an int


class Dim(int):
    """An int with the expression the graph computes it by (`expr`)."""

    expr: Expr

    def __new__(cls, value: int, expr: Expr) -> Dim:
        d = super().__new__(cls, value)
        d.expr = expr
        return d

    def _op(self, sym: str, other: object, value: Callable[[int, int], int],
            flip: bool = False) -> Any:  # fmt: skip
        if not isinstance(other, int):
            return NotImplemented
        a, b = (other, self) if flip else (self, other)
        v = value(int(a), int(b))
        ea, eb = expr_of(a), expr_of(b)
        if (sym in "+-" and eb == 0) or (sym in ("*", "//") and eb == 1):
            return a  # x + 0, x - 0, x * 1, x // 1
        if sym in "+*" and ea == (0 if sym == "+" else 1):
            return b
        if sym == "*" and 0 in (ea, eb):
            return 0
        return Dim(v, (sym, ea, eb))

    def __add__(self, o: object) -> Any:
        return self._op("+", o, lambda a, b: a + b)

    def __radd__(self, o: object) -> Any:
        return self._op("+", o, lambda a, b: a + b, True)

    def __sub__(self, o: object) -> Any:
        return self._op("-", o, lambda a, b: a - b)

    def __rsub__(self, o: object) -> Any:
        return self._op("-", o, lambda a, b: a - b, True)

    def __mul__(self, o: object) -> Any:
        return self._op("*", o, lambda a, b: a * b)

    def __rmul__(self, o: object) -> Any:
        return self._op("*", o, lambda a, b: a * b, True)

    def __floordiv__(self, o: object) -> Any:
        return self._op("//", o, lambda a, b: a // b)

    def __rfloordiv__(self, o: object) -> Any:
        return self._op("//", o, lambda a, b: a // b, True)

    def __neg__(self) -> Any:
        return Dim(-int(self), ("-", 0, self.expr))

    def __pos__(self) -> Any:
        return self


def expr_of(v: int) -> Expr:
    return v.expr if isinstance(v, Dim) else int(v)


def symbolic(value: Any) -> bool:
    """Whether a shape list (or a size) holds a Dim."""
    if isinstance(value, Dim):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, Dim) for v in value)


class DimValues:
    """The int64 graph values of Dims and of shape lists holding them, each made once per
    graph. `op(op_type, inputs, **attrs)` records a node; `const(list)` embeds int64s."""

    def __init__(self, op: Callable[..., str], const: Callable[[list[int]], str]) -> None:
        self.op, self.const = op, const
        self._made: dict[Expr, str] = {}

    def one(self, e: Expr) -> str:
        """A (1,) int64 value: the expression's."""
        if isinstance(e, int):
            return self.const([e])
        name = self._made.get(e)
        if name is not None:
            return name
        kind = e[0]
        if kind == "shape":
            name = self.op("Shape", [e[1]], start=e[2], end=e[2] + 1)
        elif kind == "value":
            name = e[1]
        else:
            a, b = self.one(e[1]), self.one(e[2])
            if kind == "//":  # floor, for any signs: (a - a mod b) / b divides exactly
                name = self.op("Div", [self.op("Sub", [a, self.op("Mod", [a, b])]), b])
            else:
                name = self.op({"+": "Add", "-": "Sub", "*": "Mul"}[kind], [a, b])
        self._made[e] = name
        return name

    def shape(self, dims: list[int]) -> str:
        """A (len(dims),) int64 value: runs of plain ints as one constant."""
        key = ("list", *(expr_of(d) for d in dims))
        name = self._made.get(key)
        if name is not None:
            return name
        parts: list[str] = []
        run: list[int] = []
        for d in dims:
            if isinstance(d, Dim):
                if run:
                    parts.append(self.const(run))
                    run = []
                parts.append(self.one(d.expr))
            else:
                run.append(int(d))
        if run:
            parts.append(self.const(run))
        name = parts[0] if len(parts) == 1 else self.op("Concat", parts, axis=0)
        self._made[key] = name
        return name
