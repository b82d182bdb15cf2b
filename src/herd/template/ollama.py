"""Ollama's chat templates: a Go template executed over the values Ollama gives it.

`Template.execute` does what Ollama's `template.Execute` does: with a prompt and a suffix,
the fill-in-the-middle values; for a template that uses `.Messages`, one execution over the
collated messages (consecutive messages of one role merged with a blank line, except tool
results; `.System` is every system message joined); otherwise the older prompt-style
rendering, one execution per (system, prompt, response) turn, the last one cut after
`{{ .Response }}`. Parsing appends `{{ .Response }}` to a template that names neither
`.Messages` nor `.Response`, as Ollama does.

The data model follows Ollama's template types (`templateMessage`, `templateTool`, ...):
field names are Go's, tool arguments and properties print as JSON, and `json` marshals as
Go's encoding/json does (sorted map keys, HTML-safe escapes).
"""

from __future__ import annotations

import copy
import datetime
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from herd.template.gotemplate import Func, GoTemplate, GoTemplateError
from herd.template.gotemplate.errors import position
from herd.template.gotemplate.gojson import MarshalError, marshal
from herd.template.gotemplate.nodes import (
    ActionNode,
    BranchNode,
    CommandNode,
    FieldNode,
    ListNode,
    Node,
    PipeNode,
    TemplateNode,
    VariableNode,
)

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


# ---- Ollama's functions ---------------------------------------------------------------------


def _json(v: Any) -> str:
    try:
        return marshal(v)
    except MarshalError:
        return ""  # Ollama ignores the marshal error


def _today(*_: str) -> str:
    return datetime.date.today().isoformat()


def _yesterday(*_: str) -> str:
    return (datetime.date.today() - datetime.timedelta(days=1)).isoformat()


def _typescript(v: Any) -> str:
    return v.to_typescript_type() if isinstance(v, ToolProperty) else "any"


FUNCS: dict[str, Func] = {
    "json": Func(_json, ("any",)),
    "currentDate": Func(_today, (), "string"),
    "yesterdayDate": Func(_yesterday, (), "string"),
    "toTypeScriptType": Func(_typescript, ("any",)),
}


# ---- tree walks (Ollama's Identifiers and deleteNode) -------------------------------------


def identifiers(n: Node) -> list[str]:
    """Field and variable names a node uses (Ollama's template.Identifiers)."""
    if isinstance(n, ListNode):
        return [i for c in n.nodes for i in identifiers(c)]
    if isinstance(n, TemplateNode):
        if n.pipe is None:
            raise ValueError("undefined template specified")
        return identifiers(n.pipe)
    if isinstance(n, ActionNode):
        return identifiers(n.pipe)
    if isinstance(n, BranchNode):
        names = identifiers(n.pipe)
        for lst in (n.list, n.else_list):
            if lst is not None:
                names += identifiers(lst)
        return names
    if isinstance(n, PipeNode):
        return [i for c in n.cmds for a in c.args for i in identifiers(a)]
    if isinstance(n, FieldNode | VariableNode):
        return list(n.ident)
    return []


def cut_after_response(root: ListNode) -> ListNode:
    """A copy of the tree that ends at the first `.Response` field: the last turn of a
    prompt-style template is rendered up to the model's answer (Ollama's deleteNode)."""
    cut = False

    def drop(n: Node) -> bool:
        nonlocal cut
        if isinstance(n, FieldNode) and "Response" in n.ident:
            cut = True
            return False
        return cut

    def walk(n: Node) -> Node | None:
        if drop(n):
            return None
        if isinstance(n, ListNode):
            n.nodes = [c for c in (walk(c) for c in n.nodes) if c is not None]
        elif isinstance(n, BranchNode):
            # Ollama walks only the branch lists, never the condition; a list dropped
            # whole would crash Ollama, here it just empties
            n.list = walk(n.list) or ListNode(n.list.pos)  # type: ignore[assignment]
            if n.else_list is not None:
                n.else_list = walk(n.else_list) or ListNode(n.else_list.pos)  # type: ignore[assignment]
        elif isinstance(n, ActionNode):
            pipe = walk(n.pipe)
            if pipe is None:
                return None
        elif isinstance(n, PipeNode):
            cmds: list[CommandNode] = []
            for c in n.cmds:
                c.args = [a for a in (walk(a) for a in c.args) if a is not None]
                if not c.args:
                    return None
                cmds.append(c)
            if not cmds:
                return None
            n.cmds = cmds
        return n

    tree = root.copy()
    out = walk(tree)
    return out if isinstance(out, ListNode) else ListNode(root.pos)


# ---- the template --------------------------------------------------------------------------


class Template:
    """An Ollama chat template (Go text/template), parsed once; `execute` is thread-safe."""

    kind = "go"

    def __init__(self, source: str, *, name: str = "", stop: Sequence[str] = ()) -> None:
        self.source = source
        self.stop = list(stop)  # stop strings that come with a built-in template
        self._go = GoTemplate(source, name, FUNCS)
        try:
            self._vars = sorted(
                {v.lower() for t in self._go.trees.values() for v in identifiers(t.root)}
            )
        except ValueError as e:
            pos = _first_bare_template(self._go)
            line, col = position(source, pos)
            raise GoTemplateError(f"template: {name}:{line}:{col}: {e}", line, col) from None
        if "messages" not in self._vars and "response" not in self._vars:
            # Ollama appends {{ .Response }} so the prompt-style output ends with the answer
            end = len(source)
            pipe = PipeNode(end, cmds=[CommandNode(end, [FieldNode(end, ["Response"])])])
            self._go.root.nodes.append(ActionNode(end, 0, pipe))
            self._vars = sorted({*self._vars, "response"})

    @classmethod
    def parse(cls, text: str, *, name: str = "") -> Template:
        """Parse a template; raises GoTemplateError (a TemplateError) with line and column."""
        return cls(text, name=name)

    @property
    def go(self) -> GoTemplate:
        return self._go

    def vars(self) -> list[str]:
        """Lower-cased names of the fields and variables the template uses."""
        return list(self._vars)

    def uses(self, name: str) -> bool:
        return name.lower() in self._vars

    def execute(
        self,
        messages: Sequence[Message | Mapping[str, Any]] | None = None,
        *,
        system: str | None = None,
        tools: Iterable[Tool | Mapping[str, Any]] | None = None,
        think: bool | str | None = None,
        prompt: str | None = None,
        response: str | None = None,
        suffix: str | None = None,
    ) -> str:
        """The prompt for a conversation, as Ollama renders it. `system` is put first unless
        the messages already start with a system message; `prompt` and `response` add a user
        and an assistant message; `prompt` with `suffix` is a fill-in-the-middle request."""
        thinking = think_values(think)
        if prompt and suffix:
            return self._go.execute(
                {"Prompt": prompt, "Suffix": suffix, "Response": "", **thinking}
            )
        msgs = [to_message(m) for m in messages or []]
        if system and not (msgs and msgs[0].Role == "system"):
            msgs.insert(0, Message(Role="system", Content=system))
        if prompt is not None:
            msgs.append(Message(Role="user", Content=prompt))
        if response is not None:
            msgs.append(Message(Role="assistant", Content=response))
        system_text, collated = collate(msgs)
        if "messages" in self._vars:
            return self._go.execute(
                {
                    "System": system_text,
                    "Messages": collated,
                    "Tools": to_tools(tools),
                    "Response": "",
                    **thinking,
                }
            )
        return self._legacy(collated, thinking)

    def _legacy(self, messages: list[Message], thinking: dict[str, Any]) -> str:
        out: list[str] = []
        turn = {"System": "", "Prompt": "", "Response": ""}

        def flush() -> None:
            out.append(self._go.execute({**turn, **thinking}))
            turn.update(System="", Prompt="", Response="")

        for m in messages:
            if m.Role == "system":
                if turn["Prompt"] or turn["Response"]:
                    flush()
                turn["System"] = m.Content
            elif m.Role == "user":
                if turn["Response"]:
                    flush()
                turn["Prompt"] = m.Content
            elif m.Role == "assistant":
                turn["Response"] = m.Content
        out.append(self._go.execute({**turn, **thinking}, root=cut_after_response(self._go.root)))
        return "".join(out)

    def render(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Iterable[Tool | Mapping[str, Any]] | None = None,
        think: bool | str | None = None,
        **_: Any,
    ) -> str:
        """JinjaTemplate.render's signature: Ollama's templates always end ready for the
        assistant, so add_generation_prompt has no effect."""
        return self.execute(messages, tools=tools, think=think)


def _first_bare_template(t: GoTemplate) -> int:
    def find(n: Node) -> int | None:
        if isinstance(n, TemplateNode) and n.pipe is None:
            return n.pos
        for child in _children(n):
            found = find(child)
            if found is not None:
                return found
        return None

    for tree in t.trees.values():
        pos = find(tree.root)
        if pos is not None:
            return pos
    return 0


def _children(n: Node) -> list[Node]:
    if isinstance(n, ListNode):
        return list(n.nodes)
    if isinstance(n, BranchNode):
        return [n.list] + ([n.else_list] if n.else_list is not None else [])
    return []


def walk_nodes(root: Node, visit: Callable[[Node, list[Node]], None]) -> None:
    """Visit every node with its ancestors (like Ollama's templateVisit): lists, branches
    (condition first), actions, template calls, pipelines, commands and their arguments."""
    stack: list[Node] = []

    def go(n: Node | None) -> None:
        if n is None:
            return
        stack.append(n)
        visit(n, stack)
        if isinstance(n, ListNode):
            for c in n.nodes:
                go(c)
        elif isinstance(n, BranchNode):
            go(n.pipe)
            go(n.list)
            go(n.else_list)
        elif isinstance(n, ActionNode | TemplateNode):
            go(n.pipe)
        elif isinstance(n, PipeNode):
            for c in n.cmds:
                go(c)
        elif isinstance(n, CommandNode):
            for a in n.args:
                go(a)
        stack.pop()

    go(root)
