"""Model output -> content, thinking and tool calls, incrementally while streaming: the
thinking parser first, then the tool-call parser, with the formats inferred from the
chat template (herd.template.infer). Parsers buffer any text that may still become a tag,
so no half tag is ever emitted as content.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from herd.template.infer import infer_thinking_tags, infer_tool_call_tag, infer_tool_format
from herd.template.thinking import ThinkingParser
from herd.template.toolcalls import ToolCallParser

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
