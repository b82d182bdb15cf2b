"""Go text/template's evaluation of pipelines and their commands: fields, map keys and
methods of the data, chains, variables, function calls (with `and`/`or` short-circuiting and
the `call` builtin), checking of argument types, constants, and printing a value."""

from __future__ import annotations

import inspect
from typing import Any

from herd.template.gotemplate.exec_state import StateBase
from herd.template.gotemplate.funcs import BUILTINS, Func, FuncError, truth
from herd.template.gotemplate.gofmt import format_value, stringer, type_name
from herd.template.gotemplate.nodes import (
    BoolNode,
    ChainNode,
    DotNode,
    FieldNode,
    IdentifierNode,
    NilNode,
    Node,
    NumberNode,
    PipeNode,
    StringNode,
    VariableNode,
)

_KIND_NAMES = {"any": "interface {}", "string": "string", "int": "int", "bool": "bool",
               "float": "float64"}  # fmt: skip


class _Missing:
    """No value: the first command of a pipeline has no previous result to receive."""


MISSING = _Missing()


def _method_func(method: Any) -> Func:
    """A data method as a template function: each parameter takes any value."""
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return Func(method, (), "any")
    fixed = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    variadic = any(p.kind == p.VAR_POSITIONAL for p in params)
    return Func(method, ("any",) * fixed, "any" if variadic else None)


class Evaluator(StateBase):
    """The evaluating half of an execution; `State` walks the nodes and calls into it."""

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
        if isinstance(result, str):
            self.made_string(name, result)
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
