"""Ollama's chat templates: a Go template executed over the values Ollama gives it.

`Template.execute` does what Ollama's `template.Execute` does: with a prompt and a suffix,
the fill-in-the-middle values; for a template that uses `.Messages`, one execution over the
collated messages (consecutive messages of one role merged with a blank line, except tool
results; `.System` is every system message joined); otherwise the older prompt-style
rendering, one execution per (system, prompt, response) turn, the last one cut after
`{{ .Response }}`. Parsing appends `{{ .Response }}` to a template that names neither
`.Messages` nor `.Response`, as Ollama does. Also Ollama's template functions (`json`,
`currentDate`, ...). The data it executes over is in herd.template.ollama_data.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from herd.template.gotemplate import MAX_OUTPUT, Func, GoTemplate, GoTemplateError
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
)
from herd.template.ollama_data import (
    Message,
    Tool,
    ToolProperty,
    collate,
    think_values,
    to_message,
    to_tools,
)
from herd.template.ollama_tree import cut_after_response, identifiers

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

        def run(root: Any = None) -> None:  # all turns together within one output bound
            left = MAX_OUTPUT - sum(map(len, out))
            out.append(self._go.execute({**turn, **thinking}, root=root, max_output=left))

        def flush() -> None:
            run()
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
        run(cut_after_response(self._go.root))
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
