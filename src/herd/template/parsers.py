"""Model output -> content, thinking and tool calls, incrementally while streaming: the
thinking parser first, then the tool-call parser, with the formats inferred from the
chat template (herd.template.infer), or fixed by a model's named parser (a Modelfile's
PARSER, `NAMED`). Parsers buffer any text that may still become a tag, so no half tag is
ever emitted as content.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from herd.template.infer import infer_thinking_tags, infer_tool_call_tag, infer_tool_format
from herd.template.thinking import ThinkingParser
from herd.template.toolcalls import ToolCallParser


# ---- Ollama's named parsers (Modelfile PARSER) ---------------------------------------------
@dataclass(frozen=True)
class NamedParser:
    """The output format one of Ollama's `model/parsers` names stands for, where herd's
    thinking and tool-call parsers read it; it replaces what the template would say."""

    thinking: bool  # Ollama's HasThinkingSupport
    tools: bool  # HasToolSupport
    opening: str = ""
    closing: str = ""
    tool_tag: str = "{"
    starts_thinking: bool = False  # the prompt opened the thinking: the output starts in it


# Ollama's parsers for the architectures herd runs and the formats its parsers read: qwen3
# and qwen3moe write <think>...</think> and <tool_call>{json}</tool_call> ("qwen3"; the
# 2507 thinking models' template opens <think> itself: "qwen3-thinking"); "passthrough"
# leaves the output as content. The others (qwen3-coder's XML calls, harmony, ministral,
# cogito, deepseek3, gemma4, functiongemma, olmo3, lfm2, glm, nemotron, laguna, qwen3-vl,
# qwen3.5) are for formats or architectures herd does not have: create refuses them.
NAMED: dict[str, NamedParser] = {
    "passthrough": NamedParser(thinking=False, tools=False),
    "qwen3": NamedParser(True, True, "<think>", "</think>", "<tool_call>"),
    "qwen3-thinking": NamedParser(True, True, "<think>", "</think>", "<tool_call>", True),
}


def named_capabilities(name: str) -> tuple[str, ...]:
    """The capabilities a named parser gives a model ("tools", "thinking")."""
    named = NAMED.get(name)
    if named is None:
        return ()
    return ("tools",) * named.tools + ("thinking",) * named.thinking


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
        named: NamedParser | None = None,
    ) -> None:
        self.thinking: ThinkingParser | None = None
        if named is not None:
            opening, closing = named.opening, named.closing
        elif template is not None:
            opening, closing = infer_thinking_tags(template)
        else:
            opening, closing = "", ""
        if think not in (None, False, "") and opening and closing:
            self.thinking = ThinkingParser(opening, closing)
            opened = named is not None and named.starts_thinking
            if opened or prompt.rstrip().endswith(opening):  # the prompt opened the thinking
                self.thinking.add(opening)
        tools = list(tools or [])
        self.tools: ToolCallParser | None = None
        if tools and named is not None and named.tools:
            self.tools = ToolCallParser(tools, named.tool_tag, "json")
        elif tools:
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
