"""Model output -> content, thinking and tool calls, incrementally while streaming.

The formats are inferred from the chat template, as Ollama does without a model-specific
parser: thinking tags are the text around `{{ .Thinking }}` inside `range .Messages`;
the tool-call tag is the first text after `{{ if .ToolCalls }}` (`<tool_call>`,
`[TOOL_CALLS]`, ...), or `{` when there is none (bare JSON objects). A template that asks
for Python-style calls (`[func_name1(params_name1=params_value1, ...)]`, Llama 3.2/4) gets
that parser. Parsers buffer any text that may still become a tag, so no half tag is ever
emitted as content.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from herd.errors import TemplateError
from herd.template.gotemplate.nodes import (
    ActionNode,
    BranchNode,
    FieldNode,
    IfNode,
    ListNode,
    Node,
    RangeNode,
    TextNode,
    WithNode,
)
from herd.template.ollama import Template, walk_nodes

# ---- inference from the template ---------------------------------------------------------


def infer_thinking_tags(template: Any) -> tuple[str, str]:
    """(opening, closing) thinking tags of a chat template, or ("", "")."""
    if isinstance(template, Template):
        return _go_thinking_tags(template)
    source = getattr(template, "source", "") or ""
    if "<think>" in source and "</think>" in source:  # Jinja: the de-facto standard tags
        return "<think>", "</think>"
    return "", ""


def _go_thinking_tags(template: Template) -> tuple[str, str]:
    tags = ["", ""]

    def visit(n: Node, ancestors: list[Node]) -> None:
        if not (isinstance(n, FieldNode) and n.ident and n.ident[0] == "Thinking"):
            return
        rng = next((a for a in reversed(ancestors) if isinstance(a, RangeNode)), None)
        if rng is None or not _uses_field(rng, "Messages"):
            return
        lst = next((a for a in reversed(ancestors) if isinstance(a, ListNode)), None)
        if lst is not None and lst.nodes:
            if isinstance(lst.nodes[0], TextNode):
                tags[0] = lst.nodes[0].text.strip()
            if isinstance(lst.nodes[-1], TextNode):
                tags[1] = lst.nodes[-1].text.strip()

    walk_nodes(template.go.root, visit)
    return tags[0], tags[1]


def _uses_field(rng: RangeNode, name: str) -> bool:
    found = []
    walk_nodes(rng.pipe, lambda n, _: found.append(isinstance(n, FieldNode) and n.ident[0] == name))
    return any(found)


def infer_tool_call_tag(template: Any) -> str:
    """The text a model writes before its tool calls, or "{" for bare JSON objects."""
    if not isinstance(template, Template):
        source = getattr(template, "source", "") or ""  # Jinja: the common tags
        return next((t for t in ("<tool_call>", "[TOOL_CALLS]") if t in source), "{")
    node = _find_tool_calls_if(template.go.root.nodes)
    text = _first_text(node.list.nodes) if node is not None else None
    if text is None:
        return "{"
    tag = text.replace("\r\n", "\n").split("{", 1)[0].strip()
    return tag or "{"


def _find_tool_calls_if(nodes: list[Node]) -> IfNode | None:
    for n in nodes:
        if isinstance(n, IfNode) and any(
            isinstance(a, FieldNode) and "ToolCalls" in a.ident for c in n.pipe.cmds for a in c.args
        ):
            return n
        if isinstance(n, ListNode):
            found = _find_tool_calls_if(n.nodes)
        elif isinstance(n, BranchNode):
            found = _find_tool_calls_if(n.list.nodes) or (
                _find_tool_calls_if(n.else_list.nodes) if n.else_list is not None else None
            )
        else:
            found = None
        if found is not None:
            return found
    return None


def _first_text(nodes: list[Node]) -> str | None:
    """The first non-blank text, searching into branches but stopping at an action."""
    for n in nodes:
        if isinstance(n, TextNode):
            if n.text.strip():
                return n.text
        elif isinstance(n, ListNode):
            found = _first_text(n.nodes)
            if found is not None:
                return found
        elif isinstance(n, IfNode | RangeNode | WithNode):
            found = _first_text(n.list.nodes)
            if found is None and n.else_list is not None:
                found = _first_text(n.else_list.nodes)
            return found
        elif isinstance(n, ActionNode):
            return None
    return None


@lru_cache(maxsize=64)
def template_capabilities(text: str) -> tuple[str, ...]:
    """Ollama's template-given capabilities of a template text: "tools" when it renders
    tools, "thinking" when thinking tags can be inferred from it."""
    from herd.template.select import parse_template

    try:
        template = parse_template(text)
    except TemplateError:
        return ()
    caps = ("tools",) if supports_tools(template) else ()
    return caps + (("thinking",) if all(infer_thinking_tags(template)) else ())


def supports_tools(template: Any) -> bool:
    """Ollama's `tools` capability: the template renders `.Tools` (Jinja: `tools`)."""
    if isinstance(template, Template):
        return template.uses("tools")
    return bool(re.search(r"\btools\b", getattr(template, "source", "") or ""))


def infer_tool_format(template: Any) -> str:
    """ "pythonic" when the template asks for `[func(a=1)]` calls, else "json"."""
    source = getattr(template, "source", "") or ""
    return "pythonic" if re.search(r"func_name\d?\(", source) else "json"


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


# ---- tool calls ----------------------------------------------------------------------------

_ID_CHARS = string.ascii_lowercase + string.digits


def tool_call_id() -> str:
    """Ollama's tool call ids: call_ and 8 random characters."""
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(8))


def _tool_names(tools: Iterable[Any]) -> list[str]:
    names = []
    for t in tools:
        if isinstance(t, Mapping):
            fn = t.get("function", t)
            names.append(str(fn.get("name", "")))
        else:
            names.append(str(getattr(getattr(t, "Function", None), "Name", "")))
    return [n for n in names if n]


def _call(index: int, name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": tool_call_id(),
        "function": {"index": index, "name": name, "arguments": dict(arguments)},
    }


def _objects(buf: str) -> Iterable[tuple[int, int]]:
    """(start, end) of each complete top-level {...} in buf, skipping JSON strings."""
    depth, start, in_str, esc = 0, -1, False, False
    for i, c in enumerate(buf):
        if esc:
            esc = False
        elif c == "\\":
            esc = True
        elif c == '"':
            in_str = not in_str
        elif in_str:
            continue
        elif c == "{":
            if depth == 0:
                start = i
            depth += 1
        elif c == "}" and depth > 0:
            depth -= 1
            if depth == 0 and start >= 0:
                yield start, i + 1


def _args_in(obj: Mapping[str, Any], name: str) -> tuple[Mapping[str, Any] | None, bool]:
    """Ollama's findObject: the arguments of a call object, searching nested objects."""

    def as_map(v: Any) -> Mapping[str, Any] | None:
        if isinstance(v, Mapping):
            return v
        if isinstance(v, str):
            try:
                parsed = json.loads(v)
            except json.JSONDecodeError:
                return None
            return parsed if isinstance(parsed, Mapping) else None
        return None

    if "name" in obj:
        for key in ("arguments", "parameters"):
            m = as_map(obj.get(key))
            if m is not None:
                return m, True
        return {}, True  # a call without arguments (Ollama misses these)
    m = as_map(obj.get(name))
    if m is not None:
        return m, True
    for v in obj.values():
        children = (
            [v]
            if isinstance(v, Mapping)
            else [x for x in v if isinstance(x, Mapping)]
            if isinstance(v, list)
            else []
        )
        for child in children:
            found, ok = _args_in(child, name)
            if ok:
                return found, True
    return None, False


class ToolCallParser:
    """Ollama's generic tool-call parser: text before the tag is content; after it, each
    tool name with the JSON object that holds its arguments is a call. With the tag "{"
    (or "["), calls are parsed only when the output starts with one, otherwise it is all
    content. `fmt="pythonic"` parses `[name(arg=value, ...), ...]` instead."""

    def __init__(self, tools: Iterable[Any], tag: str = "{", fmt: str = "json") -> None:
        self.names = _tool_names(tools)
        self.tag, self.fmt = tag, fmt
        self.state = "looking"  # looking, calling, done
        self.buf = ""
        self.n = 0

    def add(self, text: str) -> tuple[list[dict[str, Any]], str]:
        """(tool calls, content) that can be emitted now."""
        if self.state == "done":
            return [], text
        self.buf += text
        if self.fmt == "pythonic":
            return self._add_pythonic()
        content = ""
        if self.state == "looking":
            i, found = self._find_tag()
            content, self.buf = (self.buf, "") if i < 0 else (self.buf[:i], self.buf[i:])
            if self.tag in ("{", "[") and content.strip():
                self.state = "done"
                out, self.buf = content + self.buf, ""
                return [], out
            if not found:
                return [], content
            self.state = "calling"
        calls = []
        while (call := self._next_call()) is not None:
            calls.append(call)
        if self._closed():
            self.state = "done"
            content += self.buf
            self.buf = ""
        return calls, content

    def flush(self) -> str:
        """Content still held back at the end of the output: all of it when no call was
        found (a tag that was not one after all), else nothing."""
        buf, self.buf = self.buf, ""
        return buf if self.n == 0 else ""

    def _find_tag(self) -> tuple[int, bool]:
        i = self.buf.find(self.tag)
        if i >= 0:
            return i, True
        n = _overlap(self.buf, self.tag)
        return (len(self.buf) - n, False) if n else (-1, False)

    def _next_call(self) -> dict[str, Any] | None:
        buf = self.buf
        if not buf:
            return None
        longest = max((len(n) for n in self.names), default=0)
        for i in range(1, min(len(buf), longest) + 1):  # a name may still be growing
            tail = buf[-i:]
            if any(len(tail) < len(n) and n.startswith(tail) for n in self.names):
                return None
        best: tuple[int, int, str] | None = None
        for name in self.names:
            pos = buf.find(name)
            if pos >= 0 and (
                best is None or pos < best[0] or (pos == best[0] and len(name) > len(best[2]))
            ):
                best = (pos, pos + len(name), name)
        if best is None:
            return None
        _, end, name = best
        for start, stop in _objects(buf):
            try:
                obj = json.loads(buf[start:stop])
            except json.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            args, ok = _args_in(obj, name)
            call = _call(self.n, name, args if ok and args is not None else obj)
            self.n += 1
            self.buf = buf[max(end, stop) :]
            return call
        return None

    def _closed(self) -> bool:
        if self.tag not in ("{", "["):
            return False
        open_, close = self.tag, "}" if self.tag == "{" else "]"
        depth, in_str, esc = 0, False, False
        for c in self.buf:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = not in_str
            elif in_str:
                continue
            elif c == open_:
                depth += 1
            elif c == close:
                depth -= 1
                if depth == 0:
                    return True
        return False

    def _add_pythonic(self) -> tuple[list[dict[str, Any]], str]:
        stripped = self.buf.lstrip()
        if not stripped:
            return [], ""
        if not stripped.startswith("["):
            self.state = "done"
            out, self.buf = self.buf, ""
            return [], out
        end = _bracket_end(stripped)
        if end < 0:
            return [], ""  # the list is still open
        calls = _pythonic_calls(stripped[:end], self.names)
        if calls is None:  # not a call list after all
            self.state = "done"
            out, self.buf = self.buf, ""
            return [], out
        rest = stripped[end:]
        self.state, self.buf = "done", ""
        out = []
        for name, args in calls:
            out.append(_call(self.n, name, args))
            self.n += 1
        return out, rest


def _bracket_end(s: str) -> int:
    depth, quote, esc = 0, "", False
    for i, c in enumerate(s):
        if esc:
            esc = False
        elif c == "\\":
            esc = True
        elif quote:
            quote = "" if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c in "[(":
            depth += 1
        elif c in "])":
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def _pythonic_calls(text: str, names: list[str]) -> list[tuple[str, dict[str, Any]]] | None:
    """`[f(a=1, b="x"), g()]` -> [("f", {...}), ("g", {})], or None when it is not that."""
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = ast.unparse(node.func)
        if names and name not in names:
            return None
        try:
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
        except (ValueError, SyntaxError):
            return None
        calls.append((name, args))
    return calls


# ---- both, as a chat response needs them ---------------------------------------------------


@dataclass
class Parsed:
    content: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class OutputParser:
    """Thinking first (when `think` is on and the template has thinking tags), then tool
    calls (when tools were given), over the streamed output of one response."""

    def __init__(
        self,
        template: Any,
        *,
        tools: Iterable[Any] | None = None,
        think: bool | str | None = None,
        prompt: str = "",
    ) -> None:
        self.thinking: ThinkingParser | None = None
        opening, closing = infer_thinking_tags(template) if template is not None else ("", "")
        if think not in (None, False, "") and opening and closing:
            self.thinking = ThinkingParser(opening, closing)
            if prompt.rstrip().endswith(opening):  # the template opened the thinking
                self.thinking.add(opening)
        tools = list(tools or [])
        self.tools: ToolCallParser | None = None
        if tools:
            self.tools = ToolCallParser(
                tools, infer_tool_call_tag(template), infer_tool_format(template)
            )

    def add(self, text: str, done: bool = False) -> Parsed:
        out = Parsed()
        content = text
        if self.thinking is not None:
            out.thinking, content = self.thinking.add(text)
            if done:
                t, c = self.thinking.flush()
                out.thinking += t
                content += c
        if self.tools is not None:
            out.tool_calls, content = self.tools.add(content)
            if done:
                content += self.tools.flush()
        out.content = content
        return out
