"""Output formats inferred from a chat template, as Ollama does without a model-specific
parser: thinking tags are the text around `{{ .Thinking }}` inside `range .Messages`;
the tool-call tag is the first text after `{{ if .ToolCalls }}` (`<tool_call>`,
`[TOOL_CALLS]`, ...), or `{` when there is none (bare JSON objects). A template that asks
for Python-style calls (`[func_name1(params_name1=params_value1, ...)]`, Llama 3.2/4) gets
that parser. Also the template-given capabilities ("tools", "thinking").
"""

from __future__ import annotations

import re
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
from herd.template.ollama import Template
from herd.template.ollama_tree import walk_nodes

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
