"""Go text/template's executor: walks a parse tree over Python data with Go's semantics
(truth, scoping of variables, range over slices, maps in key order and integers,
break/continue, template calls without dynamic scope) and Go's error messages, bounded in
steps, output size and call depth so that no template can run away."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from herd.template.gotemplate.errors import GoTemplateError, position
from herd.template.gotemplate.funcs import BUILTINS, Func, FuncError, is_true, truth
from herd.template.gotemplate.gofmt import format_value, sort_key, stringer, type_name
from herd.template.gotemplate.nodes import (
    ActionNode,
    BoolNode,
    BreakNode,
    ChainNode,
    CommentNode,
    ContinueNode,
    DotNode,
    FieldNode,
    IdentifierNode,
    IfNode,
    ListNode,
    NilNode,
    Node,
    NumberNode,
    PipeNode,
    RangeNode,
    StringNode,
    TemplateNode,
    TextNode,
    VariableNode,
    WithNode,
)
from herd.template.gotemplate.parser import Tree

MAX_STEPS = 2_000_000  # nodes walked and commands run per execution
MAX_OUTPUT = 16 * 1024 * 1024  # characters written, and the size of any string made
MAX_DEPTH = 100  # nested {{template}} calls (Go: 100000; Python's stack is smaller)

_KIND_NAMES = {"any": "interface {}", "string": "string", "int": "int", "bool": "bool",
               "float": "float64"}  # fmt: skip


class _Missing:
    """No value: the first command of a pipeline has no previous result to receive."""


MISSING = _Missing()


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _ExecError(Exception):
    def __init__(self, message: str, line: int | None, col: int | None) -> None:
        super().__init__(message)
        self.line, self.col = line, col


def _method_func(method: Any) -> Func:
    """A data method as a template function: each parameter takes any value."""
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return Func(method, (), "any")
    fixed = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    variadic = any(p.kind == p.VAR_POSITIONAL for p in params)
    return Func(method, ("any",) * fixed, "any" if variadic else None)


class State:
    """One execution (Go's exec.state); templates share nothing between executions."""

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

    # ---- evaluation -------------------------------------------------------------------
    def eval_pipeline(self, dot: Any, pipe: PipeNode | None) -> Any:
        if pipe is None:
            return None
        self.at(pipe)
        value: Any = MISSING
        for cmd in pipe.cmds:
            self.step()
            value = self.eval_command(dot, cmd.args, value)
        for v in pipe.decl:
            if pipe.is_assign:
                self.set_var(v.ident[0], value)
            else:
                self.vars.append([v.ident[0], value])
        return value

    def not_a_function(self, args: list[Node], final: Any) -> None:
        if len(args) > 1 or final is not MISSING:
            self.errorf(f"can't give argument to non-function {args[0]}")

    def eval_command(self, dot: Any, args: list[Node], final: Any) -> Any:
        first = args[0]
        if isinstance(first, FieldNode):
            return self.eval_field_node(dot, first, args, final)
        if isinstance(first, ChainNode):
            return self.eval_chain_node(dot, first, args, final)
        if isinstance(first, IdentifierNode):
            return self.eval_function(dot, first, first, args, final)
        if isinstance(first, PipeNode):
            self.not_a_function(args, final)
            return self.eval_pipeline(dot, first)
        if isinstance(first, VariableNode):
            return self.eval_variable_node(dot, first, args, final)
        self.at(first)
        self.not_a_function(args, final)
        if isinstance(first, BoolNode):
            return first.true
        if isinstance(first, DotNode):
            return dot
        if isinstance(first, NilNode):
            self.errorf("nil is not a command")
        if isinstance(first, NumberNode):
            return self.ideal_constant(first)
        if isinstance(first, StringNode):
            return first.text
        self.errorf(f'can\'t evaluate command "{first}"')

    def ideal_constant(self, n: NumberNode) -> Any:
        self.at(n)
        if n.is_complex:
            return n.complex128
        hex_int = n.text[:2].lower() == "0x" and not any(c in n.text for c in "pP")
        if (
            n.is_float
            and not hex_int
            and not n.text.startswith("'")
            and any(c in n.text for c in ".eEpP")
        ):
            return n.float64
        if n.is_int:
            return n.int64
        if n.is_uint:
            self.errorf(f"{n.text} overflows int")
        return None

    def eval_field_node(self, dot: Any, field: FieldNode, args: list[Node], final: Any) -> Any:
        self.at(field)
        return self.eval_field_chain(dot, dot, field, field.ident, args, final)

    def eval_chain_node(
        self, dot: Any, chain: ChainNode, args: list[Node] | None, final: Any
    ) -> Any:
        self.at(chain)
        if isinstance(chain.node, NilNode):
            self.errorf(f"indirection through explicit nil in {chain}")
        pipe = self.eval_arg(dot, "any", chain.node)
        return self.eval_field_chain(dot, pipe, chain, chain.field, args, final)

    def eval_variable_node(
        self, dot: Any, var: VariableNode, args: list[Node] | None, final: Any
    ) -> Any:
        self.at(var)
        value = self.var_value(var.ident[0])
        if len(var.ident) == 1:
            self.not_a_function(args or [var], final)
            return value
        return self.eval_field_chain(dot, value, var, var.ident[1:], args, final)

    def eval_field_chain(
        self,
        dot: Any,
        receiver: Any,
        node: Node,
        ident: list[str],
        args: list[Node] | None,
        final: Any,
    ) -> Any:
        for name in ident[:-1]:
            receiver = self.eval_field(dot, name, node, None, MISSING, receiver)
        return self.eval_field(dot, ident[-1], node, args, final, receiver)

    def eval_function(
        self, dot: Any, node: IdentifierNode, cmd: Node, args: list[Node] | None, final: Any
    ) -> Any:
        self.at(node)
        name = node.ident
        if name in self.funcs:
            return self.eval_call(dot, self.funcs[name], False, cmd, name, args, final)
        if name in BUILTINS:
            return self.eval_call(dot, BUILTINS[name], True, cmd, name, args, final)
        self.errorf(f'"{name}" is not a defined function')

    def eval_field(
        self,
        dot: Any,
        name: str,
        node: Node,
        args: list[Node] | None,
        final: Any,
        receiver: Any,
    ) -> Any:
        if receiver is None:
            if self.missingkey == "error":
                self.errorf(f'nil data; no entry for key "{name}"')
            return None
        methods = getattr(type(receiver), "GO_METHODS", None)
        if methods and name in methods:
            method = getattr(receiver, methods[name])
            return self.eval_call(dot, _method_func(method), False, node, name, args, final)
        has_args = (args is not None and len(args) > 1) or final is not MISSING
        fields = getattr(type(receiver), "__dataclass_fields__", None)
        if fields is not None and name in fields:
            if not name[:1].isupper():
                self.errorf(f"{name} is an unexported field of struct type {type_name(receiver)}")
            if has_args:
                self.errorf(f"{name} has arguments but cannot be invoked as function")
            return getattr(receiver, name)
        if isinstance(receiver, dict):
            if has_args:
                self.errorf(f"{name} is not a method but has arguments")
            if name not in receiver and self.missingkey == "error":
                self.errorf(f'map has no entry for key "{name}"')
            return receiver.get(name)
        self.errorf(f"can't evaluate field {name} in type {type_name(receiver)}")

    def eval_call(
        self,
        dot: Any,
        fn: Func,
        is_builtin: bool,
        node: Node,
        name: str,
        args: list[Node] | None,
        final: Any,
    ) -> Any:
        argn = list(args[1:]) if args else []  # args[0] names the function
        num_in = len(argn) + (final is not MISSING)
        fixed = len(fn.params)
        if fn.variadic is not None:
            if num_in < fixed:
                self.errorf(
                    f"wrong number of args for {name}: want at least {fixed} got {len(argn)}"
                )
        elif num_in != fixed:
            self.errorf(f"wrong number of args for {name}: want {fixed} got {num_in}")

        if is_builtin and name in ("and", "or"):  # these two short-circuit
            v: Any = None
            for arg in argn:
                v = self.eval_arg(dot, "any", arg)
                if truth(v) == (name == "or"):
                    return v
            return final if final is not MISSING else v

        argv: list[Any] = []
        for i, arg in enumerate(argn):
            kind = fn.params[i] if i < fixed else fn.variadic
            argv.append(self.eval_arg(dot, kind or "any", arg))
        if final is not MISSING:
            i = num_in - 1
            kind = fn.params[i] if i < fixed else fn.variadic
            argv.append(self.validate(final, kind or "any"))

        if is_builtin and name == "call":
            return self.call(node, argn[0] if argn else None, argv, final)
        try:
            result = fn.fn(*argv)
        except FuncError as e:
            self.at(node)
            self.errorf(f"error calling {name}: {e}")
        if isinstance(result, str) and len(result) > self.max_output:
            self.errorf(f"{name} result exceeds {self.max_output} characters")
        return result

    def call(self, node: Node, callee: Node | None, argv: list[Any], final: Any) -> Any:
        """The call builtin: the first argument is a function value from the data."""
        label = str(callee) if callee is not None else format_value(final)
        fn, rest = argv[0], argv[1:]
        self.at(node)
        if fn is None:
            self.errorf("error calling call: call of nil")
        if not callable(fn):
            self.errorf(f"error calling call: non-function {label} of type {type_name(fn)}")
        try:
            inspect.signature(fn).bind(*rest)
        except TypeError:
            self.errorf(f"error calling call: wrong number of args for {label}: got {len(rest)}")
        except ValueError:
            pass  # builtins without signatures
        try:
            return fn(*rest)
        except Exception as e:  # a data function failing is the template's error
            self.errorf(f"error calling call: {e}")

    def validate(self, value: Any, kind: str) -> Any:
        if value is None:
            if kind == "any":
                return None
            self.errorf(f"invalid value; expected {_KIND_NAMES[kind]}")
        ok = (
            kind == "any"
            or (kind == "string" and isinstance(value, str))
            or (kind == "int" and isinstance(value, int) and not isinstance(value, bool))
            or (kind == "bool" and isinstance(value, bool))
            or (kind == "float" and isinstance(value, float))
        )
        if not ok:
            self.errorf(
                f"wrong type for value; expected {_KIND_NAMES[kind]}; got {type_name(value)}"
            )
        return value

    def eval_arg(self, dot: Any, kind: str, n: Node) -> Any:
        self.at(n)
        if isinstance(n, DotNode):
            return self.validate(dot, kind)
        if isinstance(n, NilNode):
            if kind == "any":
                return None
            self.errorf(f"cannot assign nil to {_KIND_NAMES[kind]}")
        if isinstance(n, FieldNode):
            return self.validate(self.eval_field_node(dot, n, [n], MISSING), kind)
        if isinstance(n, VariableNode):
            return self.validate(self.eval_variable_node(dot, n, None, MISSING), kind)
        if isinstance(n, PipeNode):
            return self.validate(self.eval_pipeline(dot, n), kind)
        if isinstance(n, IdentifierNode):
            return self.validate(self.eval_function(dot, n, n, None, MISSING), kind)
        if isinstance(n, ChainNode):
            return self.validate(self.eval_chain_node(dot, n, None, MISSING), kind)
        if kind == "any":
            if isinstance(n, BoolNode):
                return n.true
            if isinstance(n, NumberNode):
                return self.ideal_constant(n)
            if isinstance(n, StringNode):
                return n.text
            self.errorf(f"can't handle assignment of {n} to empty interface argument")
        if kind == "bool" and isinstance(n, BoolNode):
            return n.true
        if kind == "string" and isinstance(n, StringNode):
            return n.text
        if kind == "int" and isinstance(n, NumberNode) and n.is_int:
            return n.int64
        if kind == "float" and isinstance(n, NumberNode) and n.is_float:
            return n.float64
        expected = {"bool": "bool", "string": "string", "int": "integer", "float": "float"}
        self.errorf(f"expected {expected[kind]}; found {n}")

    def print_value(self, node: Node, v: Any) -> None:
        self.at(node)
        if v is None:
            self.write("<no value>")
            return
        if callable(v) and stringer(v) is None and not hasattr(v, "__dataclass_fields__"):
            self.errorf(f"can't print {node} of type {type_name(v)}")
        self.write(format_value(v))
