"""Go text/template's execution state: the limits on one execution, its output, its error
messages (with the position of the node being run) and its variables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from herd.template.gotemplate.errors import position
from herd.template.gotemplate.funcs import Func
from herd.template.gotemplate.nodes import Node
from herd.template.gotemplate.parser import Tree

MAX_STEPS = 2_000_000  # nodes walked and commands run per execution
MAX_OUTPUT = 16 * 1024 * 1024  # characters written, and the size of any string made
# characters of all the strings functions make in one execution: variables can hold many
# strings of MAX_OUTPUT each, so each one's bound alone does not bound memory
MAX_MADE = 4 * MAX_OUTPUT
MAX_DEPTH = 100  # nested {{template}} calls (Go: 100000; Python's stack is smaller)


class _ExecError(Exception):
    def __init__(self, message: str, line: int | None, col: int | None) -> None:
        super().__init__(message)
        self.line, self.col = line, col


class StateBase:
    """What one execution holds: its templates, output, step count and variables."""

    def __init__(
        self,
        trees: Mapping[str, Tree],
        text: str,
        parse_name: str,
        funcs: Mapping[str, Func],
        missingkey: str = "zero",
        max_steps: int = MAX_STEPS,
        max_output: int = MAX_OUTPUT,
    ) -> None:
        self.trees, self.text, self.parse_name, self.funcs = trees, text, parse_name, funcs
        self.missingkey = missingkey
        self.max_steps, self.max_output = max_steps, max_output
        self.name = parse_name  # the executing template's name
        self.node: Node | None = None
        self.vars: list[list[Any]] = []
        self.depth = 0
        self.steps = 0
        self.out: list[str] = []
        self.size = 0
        self.made = 0

    # ---- errors -----------------------------------------------------------------------
    def at(self, node: Node) -> None:
        self.node = node

    def errorf(self, msg: str) -> None:
        if self.node is None:
            raise _ExecError(f"template: {self.name}: {msg}", None, None)
        line, col = position(self.text, self.node.pos)
        raise _ExecError(
            f'template: {self.parse_name}:{line}:{col}: executing "{self.name}" at '
            f"<{self.node}>: {msg}",
            line,
            col,
        )

    def step(self) -> None:
        self.steps += 1
        if self.steps > self.max_steps:
            self.errorf(f"execution exceeds {self.max_steps} steps")

    def made_string(self, name: str, s: str) -> None:
        """Count a string a function made against the bounds (before anyone keeps it)."""
        if len(s) > self.max_output:
            self.errorf(f"{name} result exceeds {self.max_output} characters")
        self.made += len(s)
        if self.made > MAX_MADE:
            self.errorf(f"execution makes more than {MAX_MADE} characters of strings")

    def write(self, s: str) -> None:
        self.size += len(s)
        if self.size > self.max_output:
            self.errorf(f"output exceeds {self.max_output} characters")
        self.out.append(s)

    # ---- variables --------------------------------------------------------------------
    def mark(self) -> int:
        return len(self.vars)

    def pop(self, mark: int) -> None:
        del self.vars[mark:]

    def set_var(self, name: str, value: Any) -> None:
        for v in reversed(self.vars):
            if v[0] == name:
                v[1] = value
                return
        self.errorf(f"undefined variable: {name}")

    def var_value(self, name: str) -> Any:
        for v in reversed(self.vars):
            if v[0] == name:
                return v[1]
        self.errorf(f"undefined variable: {name}")
