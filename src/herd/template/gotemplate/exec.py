"""Go text/template's executor: walks a parse tree over Python data with Go's semantics
(truth, scoping of variables, range over slices, maps in key order and integers,
break/continue, template calls without dynamic scope) and Go's error messages, bounded in
steps, output size and call depth so that no template can run away."""

from __future__ import annotations

from typing import Any

from herd.template.gotemplate.errors import GoTemplateError
from herd.template.gotemplate.exec_eval import Evaluator
from herd.template.gotemplate.exec_state import MAX_DEPTH, _ExecError
from herd.template.gotemplate.funcs import is_true
from herd.template.gotemplate.gofmt import format_value, sort_key
from herd.template.gotemplate.nodes import (
    ActionNode,
    BreakNode,
    CommentNode,
    ContinueNode,
    IfNode,
    ListNode,
    Node,
    RangeNode,
    TemplateNode,
    TextNode,
    WithNode,
)


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class State(Evaluator):
    """One execution (Go's exec.state); templates share nothing between executions."""

    # ---- entry ------------------------------------------------------------------------
    def execute(self, name: str, data: Any, root: ListNode | None = None) -> str:
        tree = self.trees.get(name)
        try:
            if root is None:
                if tree is None:
                    self.errorf(f'"{name}" is an incomplete or empty template')
                root = tree.root  # type: ignore[union-attr]
            self.name = name
            self.vars = [["$", data]]
            self.walk(data, root)
        except _ExecError as e:
            raise GoTemplateError(str(e), e.line, e.col) from None
        except RecursionError:
            raise GoTemplateError(f"template: {name}: nesting too deep") from None
        return "".join(self.out)

    # ---- walking ----------------------------------------------------------------------
    def walk(self, dot: Any, node: Node) -> None:
        self.step()  # before at(): a runaway loop is reported at its range
        self.at(node)
        if isinstance(node, ActionNode):
            # declared variables persist to the enclosing {{end}}; a declaration prints nothing
            val = self.eval_pipeline(dot, node.pipe)
            if not node.pipe.decl:
                self.print_value(node, val)
        elif isinstance(node, TextNode):
            self.write(node.text)
        elif isinstance(node, ListNode):
            for n in node.nodes:
                self.walk(dot, n)
        elif isinstance(node, IfNode | WithNode):
            mark = self.mark()
            val = self.eval_pipeline(dot, node.pipe)
            t, ok = is_true(val)
            if not ok:
                self.errorf(f"if/with can't use {format_value(val)}")
            if t:
                self.walk(val if isinstance(node, WithNode) else dot, node.list)
            elif node.else_list is not None:
                self.walk(dot, node.else_list)
            self.pop(mark)
        elif isinstance(node, RangeNode):
            self.walk_range(dot, node)
        elif isinstance(node, TemplateNode):
            self.walk_template(dot, node)
        elif isinstance(node, BreakNode):
            raise _Break
        elif isinstance(node, ContinueNode):
            raise _Continue
        elif isinstance(node, CommentNode):
            pass
        else:
            self.errorf(f"unknown node: {node}")

    def walk_range(self, dot: Any, r: RangeNode) -> None:
        self.at(r)
        mark0 = self.mark()
        val = self.eval_pipeline(dot, r.pipe)
        mark = self.mark()  # after the range's own variables
        decl, assign = r.pipe.decl, r.pipe.is_assign

        def one(index: Any, elem: Any) -> None:
            self.at(r)
            self.step()
            if decl:
                if assign:
                    self.set_var(decl[0].ident[0], index if len(decl) > 1 else elem)
                else:
                    self.vars[-1][1] = elem  # lexically the last variable
            if len(decl) > 1:
                if assign:
                    self.set_var(decl[1].ident[0], elem)
                else:
                    self.vars[-2][1] = index
            try:
                self.walk(elem, r.list)
            except _Continue:
                pass
            finally:
                self.pop(mark)

        try:
            if isinstance(val, dict):
                items: list[tuple[Any, Any]] = [(k, val[k]) for k in sorted(val, key=sort_key)]
            elif isinstance(val, list | tuple | bytes | bytearray):
                items = list(enumerate(val))
            elif isinstance(val, int) and not isinstance(val, bool):
                if len(decl) > 1:
                    self.errorf(f"can't use {val} to iterate over more than one variable")
                items = []
                for i in range(val):
                    one(i, i)
                if val > 0:
                    return
            elif val is None:
                items = []  # like an empty map
            else:
                self.errorf(f"range can't iterate over {format_value(val)}")
            for k, v in items:
                one(k, v)
            if items:
                return
            if r.else_list is not None:
                self.walk(dot, r.else_list)
        except _Break:
            pass
        finally:
            self.pop(mark0)

    def walk_template(self, dot: Any, t: TemplateNode) -> None:
        self.at(t)
        tree = self.trees.get(t.name)
        if tree is None:
            self.errorf(f'template "{t.name}" not defined')
        if self.depth >= MAX_DEPTH:
            self.errorf(f"exceeded maximum template depth ({MAX_DEPTH})")
        dot = self.eval_pipeline(dot, t.pipe)
        saved = self.name, self.vars
        self.name, self.vars = t.name, [["$", dot]]  # no dynamic scoping
        self.depth += 1
        self.walk(dot, tree.root)  # type: ignore[union-attr]
        self.depth -= 1
        self.name, self.vars = saved
