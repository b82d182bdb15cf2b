"""Ollama's template data: the values a chat template executes over, following Ollama's
template types (`templateMessage`, `templateTool`, ...), and their conversion from API
shapes (messages, tools, `think`), with Ollama's collate.

Field names are Go's, tool arguments and properties print as JSON, and `json` marshals as
Go's encoding/json does (sorted map keys, HTML-safe escapes).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from herd.template.gotemplate.gojson import marshal

THINK_LEVELS = ("high", "medium", "low", "max")


# ---- template data (Ollama's template types) ----------------------------------------------


class PropertyType(list[str]):
    """api.PropertyType: one JSON-schema type or several."""

    GO_TYPE = "api.PropertyType"
    GO_METHODS: ClassVar[dict[str, str]] = {"String": "go_string"}

    def go_string(self) -> str:
        return "" if not self else self[0] if len(self) == 1 else "[" + " ".join(self) + "]"

    def go_marshal_json(self) -> str:
        return marshal(self[0]) if len(self) == 1 else marshal(list(self))


class PropertiesMap(dict[str, Any]):
    """api.ToolPropertiesMap: nested properties, marshalled in insertion order."""

    GO_TYPE = "*api.ToolPropertiesMap"
    GO_JSON_ORDERED = True


@dataclass
class ToolProperty:
    GO_TYPE: ClassVar[str] = "api.ToolProperty"
    GO_METHODS: ClassVar[dict[str, str]] = {"ToTypeScriptType": "to_typescript_type"}

    AnyOf: list[ToolProperty] = field(default_factory=list, metadata={"json": "anyOf,omitempty"})
    Type: PropertyType = field(default_factory=PropertyType, metadata={"json": "type,omitempty"})
    Items: Any = field(default=None, metadata={"json": "items,omitempty"})
    Description: str = field(default="", metadata={"json": "description,omitempty"})
    Enum: list[Any] = field(default_factory=list, metadata={"json": "enum,omitempty"})
    Properties: PropertiesMap | None = field(
        default=None, metadata={"json": "properties,omitempty"}
    )
    Required: list[str] = field(default_factory=list, metadata={"json": "required,omitempty"})

    def to_typescript_type(self) -> str:
        if self.AnyOf:
            return " | ".join(p.to_typescript_type() for p in self.AnyOf)
        if not self.Type:
            return "any"
        return " | ".join(_TS_TYPES.get(t, "any") for t in self.Type)


_TS_TYPES = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
             "array": "any[]", "object": "Record<string, any>", "null": "null"}  # fmt: skip


class TemplateProperties(dict[str, ToolProperty]):
    """A tool's parameters: a map to range over that prints as JSON."""

    GO_TYPE = "template.templateProperties"
    GO_METHODS: ClassVar[dict[str, str]] = {"String": "go_string"}

    def go_string(self) -> str:
        return marshal(self)


@dataclass
class ToolFunctionParameters:
    GO_TYPE: ClassVar[str] = "template.templateToolFunctionParameters"
    GO_METHODS: ClassVar[dict[str, str]] = {"String": "go_string"}

    Type: str = field(default="", metadata={"json": "type"})
    Defs: Any = field(default=None, metadata={"json": "$defs,omitempty"})
    Items: Any = field(default=None, metadata={"json": "items,omitempty"})
    Required: list[str] = field(default_factory=list, metadata={"json": "required,omitempty"})
    Properties: TemplateProperties | None = field(default=None, metadata={"json": "properties"})

    def go_string(self) -> str:
        return marshal(self)


@dataclass
class ToolFunction:
    # Ollama's HEAD lost String() on this type (it prints as a Go struct); herd keeps the JSON
    # that api.ToolFunction printed, which templates like `"function": {{ .Function }}` need.
    GO_TYPE: ClassVar[str] = "template.templateToolFunction"
    GO_METHODS: ClassVar[dict[str, str]] = {"String": "go_string"}

    Name: str = field(default="", metadata={"json": "name"})
    Description: str = field(default="", metadata={"json": "description"})
    Parameters: ToolFunctionParameters = field(
        default_factory=ToolFunctionParameters, metadata={"json": "parameters"}
    )

    def go_string(self) -> str:
        return marshal(self)


@dataclass
class Tool:
    GO_TYPE: ClassVar[str] = "template.templateTool"
    GO_METHODS: ClassVar[dict[str, str]] = {"String": "go_string"}

    Type: str = field(default="function", metadata={"json": "type"})
    Items: Any = field(default=None, metadata={"json": "items,omitempty"})
    Function: ToolFunction = field(default_factory=ToolFunction, metadata={"json": "function"})

    def go_string(self) -> str:
        return marshal(self)


class Tools(list[Tool]):
    GO_TYPE = "template.templateTools"
    GO_METHODS: ClassVar[dict[str, str]] = {"String": "go_string"}

    def go_string(self) -> str:
        return marshal(self)


class Arguments(dict[str, Any]):
    """A tool call's arguments: a map to range over that prints as JSON."""

    GO_TYPE = "template.templateArgs"
    GO_METHODS: ClassVar[dict[str, str]] = {"String": "go_string"}

    def go_string(self) -> str:
        return marshal(self)


@dataclass
class ToolCallFunction:
    GO_TYPE: ClassVar[str] = "template.templateToolCallFunction"
    Index: int = 0
    Name: str = ""
    Arguments: Arguments = field(default_factory=Arguments)


@dataclass
class ToolCall:
    GO_TYPE: ClassVar[str] = "template.templateToolCall"
    ID: str = ""
    Function: ToolCallFunction = field(default_factory=ToolCallFunction)


@dataclass
class Message:
    GO_TYPE: ClassVar[str] = "*template.templateMessage"
    Role: str = ""
    Content: str = ""
    Thinking: str = ""
    Images: list[Any] = field(default_factory=list)
    ToolCalls: list[ToolCall] = field(default_factory=list)
    ToolName: str = ""
    ToolCallID: str = ""


# ---- conversion from API shapes -----------------------------------------------------------


def _content(content: Any) -> tuple[str, list[Any]]:
    """Text and images of a message content: a string, or OpenAI-style parts."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    text, images = [], []
    for part in content:
        if isinstance(part, str):
            text.append(part)
        elif isinstance(part, Mapping) and part.get("type") == "text":
            text.append(str(part.get("text", "")))
        elif isinstance(part, Mapping) and "image" in str(part.get("type", "")):
            images.append(part.get("image_url") or part.get("image") or part)
    return "".join(text), images


def _arguments(args: Any) -> Arguments:
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return Arguments()
    return Arguments(args) if isinstance(args, Mapping) else Arguments()


def to_message(m: Message | Mapping[str, Any]) -> Message:
    """A template message from an Ollama (or OpenAI) chat message."""
    if isinstance(m, Message):
        return copy.deepcopy(m)
    text, images = _content(m.get("content"))
    calls = []
    for i, tc in enumerate(m.get("tool_calls") or []):
        fn = tc.get("function", tc)
        calls.append(
            ToolCall(
                ID=str(tc.get("id") or ""),
                Function=ToolCallFunction(
                    Index=int(fn.get("index", i) or 0),
                    Name=str(fn.get("name", "")),
                    Arguments=_arguments(fn.get("arguments")),
                ),
            )
        )
    return Message(
        Role=str(m.get("role", "")).lower(),
        Content=text,
        Thinking=str(m.get("thinking") or m.get("reasoning_content") or ""),
        Images=list(m.get("images") or []) + images,
        ToolCalls=calls,
        ToolName=str(m.get("tool_name") or m.get("name") or ""),
        ToolCallID=str(m.get("tool_call_id") or ""),
    )


def _property(p: Mapping[str, Any]) -> ToolProperty:
    t = p.get("type")
    nested = p.get("properties")
    return ToolProperty(
        AnyOf=[_property(x) for x in p.get("anyOf") or [] if isinstance(x, Mapping)],
        Type=PropertyType([t] if isinstance(t, str) else list(t or [])),
        Items=p.get("items"),
        Description=str(p.get("description") or ""),
        Enum=list(p.get("enum") or []),
        Properties=PropertiesMap({k: _property(v) for k, v in nested.items()})
        if isinstance(nested, Mapping)
        else None,
        Required=list(p.get("required") or []),
    )


def to_tools(tools: Iterable[Tool | Mapping[str, Any]] | None) -> Tools | None:
    """Template tools from Ollama/OpenAI tool definitions."""
    if tools is None:
        return None
    out = Tools()
    for t in tools:
        if isinstance(t, Tool):
            out.append(t)
            continue
        fn = t.get("function") or {}
        params = fn.get("parameters") or {}
        props = params.get("properties")
        out.append(
            Tool(
                Type=str(t.get("type", "function")),
                Items=t.get("items"),
                Function=ToolFunction(
                    Name=str(fn.get("name", "")),
                    Description=str(fn.get("description") or ""),
                    Parameters=ToolFunctionParameters(
                        Type=str(params.get("type") or ""),
                        Defs=params.get("$defs"),
                        Items=params.get("items"),
                        Required=list(params.get("required") or []),
                        Properties=TemplateProperties({k: _property(v) for k, v in props.items()})
                        if isinstance(props, Mapping)
                        else None,
                    ),
                ),
            )
        )
    return out


def collate(messages: Sequence[Message]) -> tuple[str, list[Message]]:
    """Ollama's collate: merge consecutive same-role messages (not tool results) with a
    blank line; also return every system message joined."""
    system: list[str] = []
    out: list[Message] = []
    for m in messages:
        if m.Role == "system":
            system.append(m.Content)
        if out and out[-1].Role == m.Role and m.Role != "tool":
            out[-1].Content += "\n\n" + m.Content
        else:
            out.append(copy.copy(m))
    return "\n\n".join(system), out


def think_values(think: bool | str | None) -> dict[str, Any]:
    """.Think, .ThinkLevel and .IsThinkSet for a request's `think` (api.ThinkValue)."""
    if think is None:
        return {"Think": False, "ThinkLevel": "", "IsThinkSet": False}
    if isinstance(think, str):
        return {"Think": think in THINK_LEVELS, "ThinkLevel": think, "IsThinkSet": True}
    return {"Think": bool(think), "ThinkLevel": "medium" if think else "", "IsThinkSet": True}
