"""Go text/template's parser: a template text becomes a set of named trees (the main one
and those from `define` and `block`), with Go's checks and error messages at parse time:
undefined functions and variables, `break`/`continue` outside `range`, misplaced
`else`/`end`, empty pipelines."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from herd.template.gotemplate.errors import GoTemplateError, position
from herd.template.gotemplate.gofmt import quote
from herd.template.gotemplate.lexer import Item, T, lex
from herd.template.gotemplate.literals import new_number, unquote
from herd.template.gotemplate.nodes import (
    ActionNode,
    BoolNode,
    BranchNode,
    BreakNode,
    ChainNode,
    CommandNode,
    ContinueNode,
    DotNode,
    ElseNode,
    EndNode,
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
    is_empty_tree,
)

MAX_PAREN_DEPTH = 100  # Go allows 10000; Python's stack is the limit here
MAX_NESTING = 100  # nested if/range/with/block; same reason
MAX_PIPELINE_CMDS = 100_000
_OPERAND_START = frozenset(
    {T.BOOL, T.CHAR_CONSTANT, T.COMPLEX, T.DOT, T.FIELD, T.IDENTIFIER, T.NUMBER, T.NIL,
     T.RAW_STRING, T.STRING, T.VARIABLE, T.LEFT_PAREN}
)  # fmt: skip


@dataclass
class Tree:
    name: str
    root: ListNode


class _Tokens:
    """The lexer's items, shared by the trees parsed from one text."""

    def __init__(self, text: str) -> None:
        self.items = lex(text)
        self.i = 0

    def next_item(self) -> Item:
        item = self.items[min(self.i, len(self.items) - 1)]
        self.i += 1
        return item


class _Abort(Exception):
    pass


class _Parser:
    """One tree's parser (parse.Tree during parsing). `define` and `block` start another
    parser on the same tokens, with its own variables."""

    def __init__(
        self,
        name: str,
        parse_name: str,
        text: str,
        tokens: _Tokens,
        funcs: Collection[str],
        trees: dict[str, Tree],
        depth: int = 0,
    ) -> None:
        self.name, self.parse_name, self.text = name, parse_name, text
        self.tokens, self.funcs, self.trees = tokens, funcs, trees
        self.token: list[Item] = [Item(T.EOF, 0, "", 1)] * 3
        self.peek_count = 0
        self.vars = ["$"]
        self.range_depth = 0
        self.paren_depth = 0
        self.depth = depth  # nesting of control structures, to bound recursion
        self.action_line = 0
        self.root = ListNode(0)

    # ---- errors -----------------------------------------------------------------------
    def errorf(self, msg: str) -> None:
        line, col = position(self.text, self.token[0].pos)
        raise GoTemplateError(f"template: {self.parse_name}:{line}:{col}: {msg}", line, col)

    def unexpected(self, token: Item, context: str) -> None:
        if token.typ == T.ERROR:
            extra = ""
            if self.action_line and self.action_line != token.line:
                extra = f" in action started at {self.parse_name}:{self.action_line}"
                if token.val.endswith(" action"):
                    extra = extra[len(" in action") :]
            self.errorf(f"{token}{extra}")
        self.errorf(f"unexpected {token} in {context}")

    # ---- tokens -----------------------------------------------------------------------
    def next(self) -> Item:
        if self.peek_count > 0:
            self.peek_count -= 1
        else:
            self.token[0] = self.tokens.next_item()
        return self.token[self.peek_count]

    def backup(self) -> None:
        self.peek_count += 1

    def backup2(self, t1: Item) -> None:
        self.token[1] = t1
        self.peek_count = 2

    def backup3(self, t2: Item, t1: Item) -> None:
        self.token[1] = t1
        self.token[2] = t2
        self.peek_count = 3

    def peek(self) -> Item:
        if self.peek_count > 0:
            return self.token[self.peek_count - 1]
        self.peek_count = 1
        self.token[0] = self.tokens.next_item()
        return self.token[0]

    def next_non_space(self) -> Item:
        while True:
            token = self.next()
            if token.typ != T.SPACE:
                return token

    def peek_non_space(self) -> Item:
        token = self.next_non_space()
        self.backup()
        return token

    def expect(self, expected: T, context: str) -> Item:
        token = self.next_non_space()
        if token.typ != expected:
            self.unexpected(token, context)
        return token

    # ---- structure --------------------------------------------------------------------
    def parse(self) -> None:
        """The top level: text, actions and `define`s up to EOF."""
        self.root = ListNode(self.peek().pos)
        while self.peek().typ != T.EOF:
            if self.peek().typ == T.LEFT_DELIM:
                delim = self.next()
                if self.next_non_space().typ == T.DEFINE:
                    child = self._child("definition")
                    child.parse_definition()
                    continue
                self.backup2(delim)
            n = self.text_or_action()
            if isinstance(n, EndNode | ElseNode):
                self.errorf(f"unexpected {n}")
            self.root.nodes.append(n)
        self.add()

    def _child(self, name: str) -> _Parser:
        if self.depth >= MAX_NESTING:
            self.errorf("template nesting too deep")
        return _Parser(
            name, self.parse_name, self.text, self.tokens, self.funcs, self.trees, self.depth + 1
        )

    def add(self) -> None:
        tree = self.trees.get(self.name)
        if tree is None or is_empty_tree(tree.root):
            self.trees[self.name] = Tree(self.name, self.root)
        elif not is_empty_tree(self.root):
            self.errorf(f'template: multiple definition of template "{self.name}"')

    def parse_definition(self) -> None:
        context = "define clause"
        name = self.next_non_space()
        if name.typ not in (T.STRING, T.RAW_STRING):
            self.unexpected(name, context)
        self.name = self._unquote(name.val)
        self.expect(T.RIGHT_DELIM, context)
        self.root, end = self.item_list()
        if not isinstance(end, EndNode):
            self.errorf(f"unexpected {end} in {context}")
        self.add()

    def item_list(self) -> tuple[ListNode, Node]:
        """textOrAction* up to {{end}} or {{else}}, which is returned separately."""
        lst = ListNode(self.peek_non_space().pos)
        while self.peek_non_space().typ != T.EOF:
            n = self.text_or_action()
            if isinstance(n, EndNode | ElseNode):
                return lst, n
            lst.nodes.append(n)
        self.errorf("unexpected EOF")
        raise AssertionError

    def text_or_action(self) -> Node:
        token = self.next_non_space()
        if token.typ == T.TEXT:
            return TextNode(token.pos, token.val)
        if token.typ == T.LEFT_DELIM:
            self.action_line = token.line
            try:
                return self.action()
            finally:
                self.action_line = 0
        self.unexpected(token, "input")
        raise AssertionError

    def action(self) -> Node:
        token = self.next_non_space()
        control = {
            T.BLOCK: self.block_control,
            T.ELSE: self.else_control,
            T.END: self.end_control,
            T.IF: lambda: IfNode(*self.parse_control("if")),
            T.RANGE: lambda: RangeNode(*self.parse_control("range")),
            T.TEMPLATE: self.template_control,
            T.WITH: lambda: WithNode(*self.parse_control("with")),
        }
        if token.typ in (T.BREAK, T.CONTINUE):
            word = "break" if token.typ == T.BREAK else "continue"
            after = self.next_non_space()
            if after.typ != T.RIGHT_DELIM:
                self.unexpected(after, "{{" + word + "}}")
            if self.range_depth == 0:
                self.errorf("{{" + word + "}} outside {{range}}")
            cls = BreakNode if token.typ == T.BREAK else ContinueNode
            return cls(token.pos, token.line)
        if token.typ in control:
            return control[token.typ]()
        self.backup()
        token = self.peek()
        return ActionNode(token.pos, token.line, self.pipeline("command", T.RIGHT_DELIM))

    def parse_control(self, context: str) -> tuple[int, int, PipeNode, ListNode, ListNode | None]:
        nvars = len(self.vars)
        if self.depth >= MAX_NESTING:
            self.errorf("template nesting too deep")
        self.depth += 1
        pipe = self.pipeline(context, T.RIGHT_DELIM)
        if context == "range":
            self.range_depth += 1
        lst, nxt = self.item_list()
        if context == "range":
            self.range_depth -= 1
        else_list = None
        if isinstance(nxt, ElseNode):
            # {{else if x}} and {{else with x}} are {{else}}{{if x}}...{{end}}{{end}}
            if context == "if" and self.peek().typ == T.IF:
                self.next()
                else_list = ListNode(nxt.pos, [IfNode(*self.parse_control("if"))])
            elif context == "with" and self.peek().typ == T.WITH:
                self.next()
                else_list = ListNode(nxt.pos, [WithNode(*self.parse_control("with"))])
            else:
                else_list, nxt = self.item_list()
                if not isinstance(nxt, EndNode):
                    self.errorf(f"expected end; found {nxt}")
        self.depth -= 1
        del self.vars[nvars:]
        return pipe.pos, pipe.line, pipe, lst, else_list

    def end_control(self) -> Node:
        return EndNode(self.expect(T.RIGHT_DELIM, "end").pos)

    def else_control(self) -> Node:
        peek = self.peek_non_space()
        if peek.typ in (T.IF, T.WITH):
            return ElseNode(peek.pos, peek.line)
        token = self.expect(T.RIGHT_DELIM, "else")
        return ElseNode(token.pos, token.line)

    def block_control(self) -> Node:
        context = "block clause"
        token = self.next_non_space()
        name = self.template_name(token, context)
        pipe = self.pipeline(context, T.RIGHT_DELIM)
        block = self._child(name)
        block.root, end = block.item_list()
        if not isinstance(end, EndNode):
            self.errorf(f"unexpected {end} in {context}")
        block.add()
        return TemplateNode(token.pos, token.line, name, pipe)

    def template_control(self) -> Node:
        context = "template clause"
        token = self.next_non_space()
        name = self.template_name(token, context)
        pipe = None
        if self.next_non_space().typ != T.RIGHT_DELIM:
            self.backup()
            pipe = self.pipeline(context, T.RIGHT_DELIM)
        return TemplateNode(token.pos, token.line, name, pipe)

    def template_name(self, token: Item, context: str) -> str:
        if token.typ not in (T.STRING, T.RAW_STRING):
            self.unexpected(token, context)
        return self._unquote(token.val)

    def _unquote(self, s: str) -> str:
        try:
            return unquote(s)
        except ValueError as e:
            self.errorf(str(e))
            raise AssertionError from None

    # ---- pipelines --------------------------------------------------------------------
    def pipeline(self, context: str, end: T) -> PipeNode:
        token = self.peek_non_space()
        pipe = PipeNode(token.pos, token.line)
        while True:  # declarations: $x :=, $x =, range $i, $e :=
            v = self.peek_non_space()
            if v.typ != T.VARIABLE:
                break
            self.next()
            after = self.peek()
            nxt = self.peek_non_space()
            if nxt.typ in (T.ASSIGN, T.DECLARE):
                pipe.is_assign = nxt.typ == T.ASSIGN
                self.next_non_space()
                pipe.decl.append(VariableNode(v.pos, v.val.split(".")))
                self.vars.append(v.val)
                break
            if nxt.typ == T.CHAR and nxt.val == ",":
                self.next_non_space()
                pipe.decl.append(VariableNode(v.pos, v.val.split(".")))
                self.vars.append(v.val)
                if context == "range" and len(pipe.decl) < 2:
                    if self.peek_non_space().typ in (T.VARIABLE, T.RIGHT_DELIM, T.RIGHT_PAREN):
                        continue
                    self.errorf("range can only initialize variables")
                self.errorf(f"too many declarations in {context}")
            if after.typ == T.SPACE:
                self.backup3(v, after)
            else:
                self.backup2(v)
            break
        while True:
            token = self.next_non_space()
            if token.typ == end:
                self.check_pipeline(pipe, context)
                return pipe
            if token.typ in _OPERAND_START:
                self.backup()
                pipe.cmds.append(self.command())
                if len(pipe.cmds) > MAX_PIPELINE_CMDS:
                    self.errorf("pipeline too long")
            else:
                self.unexpected(token, context)

    def check_pipeline(self, pipe: PipeNode, context: str) -> None:
        if not pipe.cmds:
            self.errorf(f"missing value for {context}")
        for i, c in enumerate(pipe.cmds[1:]):
            if isinstance(c.args[0], BoolNode | DotNode | NilNode | NumberNode | StringNode):
                self.errorf(f"non executable command in pipeline stage {i + 2}")

    def command(self) -> CommandNode:
        cmd = CommandNode(self.peek_non_space().pos)
        while True:
            self.peek_non_space()
            operand = self.operand()
            if operand is not None:
                cmd.args.append(operand)
            token = self.next()
            if token.typ == T.SPACE:
                continue
            if token.typ in (T.RIGHT_DELIM, T.RIGHT_PAREN):
                self.backup()
            elif token.typ != T.PIPE:
                self.unexpected(token, "operand")
            break
        if not cmd.args:
            self.errorf("empty command")
        return cmd

    def operand(self) -> Node | None:
        node = self.term()
        if node is None:
            return None
        if self.peek().typ == T.FIELD:
            chain = ChainNode(self.peek().pos, node)
            while self.peek().typ == T.FIELD:
                chain.field.append(self.next().val[1:])
            if isinstance(node, FieldNode):
                return FieldNode(chain.pos, str(chain)[1:].split("."))
            if isinstance(node, VariableNode):
                return VariableNode(chain.pos, str(chain).split("."))
            if isinstance(node, BoolNode | StringNode | NumberNode | NilNode | DotNode):
                self.errorf(f"unexpected . after term {quote(str(node))}")
            return chain
        return node

    def term(self) -> Node | None:
        token = self.next_non_space()
        typ = token.typ
        if typ == T.IDENTIFIER:
            if token.val not in self.funcs:
                self.errorf(f'function "{token.val}" not defined')
            return IdentifierNode(token.pos, token.val)
        if typ == T.DOT:
            return DotNode(token.pos)
        if typ == T.NIL:
            return NilNode(token.pos)
        if typ == T.VARIABLE:
            v = VariableNode(token.pos, token.val.split("."))
            if v.ident[0] not in self.vars:
                self.errorf(f'undefined variable "{v.ident[0]}"')
            return v
        if typ == T.FIELD:
            return FieldNode(token.pos, token.val[1:].split("."))
        if typ == T.BOOL:
            return BoolNode(token.pos, token.val == "true")
        if typ in (T.CHAR_CONSTANT, T.COMPLEX, T.NUMBER):
            try:
                return new_number(token.pos, token.val, typ)
            except ValueError as e:
                self.errorf(str(e))
        if typ == T.LEFT_PAREN:
            if self.paren_depth >= MAX_PAREN_DEPTH:
                self.errorf("max expression depth exceeded")
            self.paren_depth += 1
            try:
                return self.pipeline("parenthesized pipeline", T.RIGHT_PAREN)
            finally:
                self.paren_depth -= 1
        if typ in (T.STRING, T.RAW_STRING):
            return StringNode(token.pos, token.val, self._unquote(token.val))
        self.backup()
        return None


def parse(text: str, name: str = "", funcs: Collection[str] = ()) -> dict[str, Tree]:
    """All trees of a template text by name; the main one is `name`. Raises
    GoTemplateError at the first problem."""
    trees: dict[str, Tree] = {}
    parser = _Parser(name, name, text, _Tokens(text), frozenset(funcs), trees)
    try:
        parser.parse()
    except RecursionError:
        raise GoTemplateError(f"template: {name}: template nesting too deep") from None
    return trees


__all__ = ["BranchNode", "Tree", "parse"]
