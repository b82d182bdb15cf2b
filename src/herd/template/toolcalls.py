"""The tool-call parser: model output -> content and tool calls, incrementally while
streaming, for JSON calls after a tag (or bare JSON objects) and Python-style
`[name(arg=value, ...)]` lists; text that may still become a tag is buffered."""

from __future__ import annotations

import ast
import json
import secrets
import string
from collections.abc import Iterable, Mapping
from typing import Any

from herd.template.thinking import _overlap

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
