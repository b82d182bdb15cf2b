"""Go `text/template`, written for herd: Ollama's Modelfiles and registry models carry their
chat templates in this language.

Written by hand because no maintained Python library renders Go templates with Go's
semantics: PyPI has only `go-template` 0.0.3 (2019, bindings to a Go shared library,
unmaintained) and unrelated engines that borrow the `{{ }}` syntax.

The language is Go's (text/template of Go 1.26): actions, pipelines, variables (`$x :=`,
`$x =`, `$`), `if`/`else if`/`else`, `range` (index and element variables, `else`,
`break`/`continue`, maps in key order, integers), `with`/`else with`, `define`/`template`/
`block`, `{{-`/`-}}` trimming, comments, and the predefined functions (`and or not len index
slice print printf println html js urlquery call eq ne lt le gt ge`) with Go's truth, fmt
formatting and error messages. Functions are checked at parse time, as Go does.

Data is plain Python standing for Go values: None is nil, bool, int (Go int), float
(float64), str (string; measured and indexed in UTF-8 bytes), bytes ([]byte), list/tuple
(slices), dict (map[string]any; fields `.key`, ranged in key order), dataclasses (structs;
exported fields start with a capital letter). A class may declare `GO_TYPE` (the Go type
name for messages) and `GO_METHODS` (Go method name -> Python method name; "String" makes
it a fmt.Stringer). Callables in the data are function values for `call`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from herd.template.gotemplate.errors import GoTemplateError
from herd.template.gotemplate.exec import State
from herd.template.gotemplate.exec_state import MAX_OUTPUT, MAX_STEPS
from herd.template.gotemplate.funcs import BUILTINS, Func, FuncError
from herd.template.gotemplate.nodes import ListNode
from herd.template.gotemplate.parser import Tree, parse


class GoTemplate:
    """A parsed template and the templates it defines; `execute` may run in many threads."""

    def __init__(self, text: str, name: str = "", funcs: Mapping[str, Func] | None = None) -> None:
        self.text, self.name = text, name
        self.funcs: dict[str, Func] = dict(funcs or {})
        self.trees: dict[str, Tree] = parse(text, name, set(BUILTINS) | set(self.funcs))

    @property
    def root(self) -> ListNode:
        return self.trees[self.name].root

    def execute(
        self,
        data: Any,
        *,
        name: str | None = None,
        root: ListNode | None = None,
        missingkey: str = "zero",
        max_steps: int = MAX_STEPS,
        max_output: int = MAX_OUTPUT,
    ) -> str:
        """The output of template `name` (default: the main one), or of `root` (a tree from
        this template, e.g. an edited copy), over `data`. missingkey: "zero"/"default"
        (a missing map key is nil) or "error"."""
        state = State(
            self.trees, self.text, self.name, self.funcs, missingkey, max_steps, max_output
        )
        return state.execute(self.name if name is None else name, data, root)


__all__ = [
    "BUILTINS",
    "MAX_OUTPUT",
    "Func",
    "FuncError",
    "GoTemplate",
    "GoTemplateError",
    "Tree",
]
