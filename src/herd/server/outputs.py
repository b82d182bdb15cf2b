"""Tools, thinking and structured outputs in both APIs: request checks, the runner fields,
and the shapes of the answers.

The runner parses the model's output (herd.runner.serve): its pieces carry `text` (the
content), `thinking` and `tool_calls` (Ollama's shape, arguments as an object). Here those
become Ollama's `message.thinking` / `thinking` and `message.tool_calls`, or OpenAI's
`reasoning` and `tool_calls` (arguments as a JSON string, `finish_reason: "tool_calls"`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from herd.errors import BadRequestError
from herd.sample.grammar import format_grammar
from herd.server.http import close, parse_json, watch
from herd.store.facts import ShowFacts
from herd.template.ollama_data import THINK_LEVELS


# ---- requests ------------------------------------------------------------------------------
def check_think(value: Any) -> None:
    """api.ThinkValue: a bool or a level."""
    if value is None or isinstance(value, bool) or value in THINK_LEVELS:
        return
    raise BadRequestError(
        f'invalid think value: {json.dumps(value)} (must be "high", '
        '"medium", "low", true, or false)'
    )


def check_format(fmt: Any) -> None:
    """`format` must be unset, "json" or a JSON schema llguidance accepts (400 otherwise,
    with llguidance's reason): checked before the model loads."""
    format_grammar(fmt)


def fields(body: dict[str, Any], facts: ShowFacts, *, tools: bool = True) -> dict[str, Any]:
    """The runner's `tools`, `think` and `format` for a request body. Like Ollama, a model
    that can think thinks unless the request says `think: false`."""
    out: dict[str, Any] = {}
    think = body.get("think")
    if think is None and "thinking" in facts.capabilities:
        think = True
    if think is not None:
        out["think"] = think
    if tools and body.get("tools"):
        out["tools"] = body["tools"]
    if body.get("format") not in (None, "", "null"):
        out["format"] = body["format"]
    return out


def has_output(msg: dict[str, Any]) -> bool:
    """Whether a runner piece carries anything to stream."""
    return bool(
        msg.get("done")
        or msg.get("text")
        or msg.get("thinking")
        or msg.get("tool_calls")
        or msg.get("logprobs")
    )


def ollama_message(msg: dict[str, Any]) -> dict[str, Any]:
    """Ollama's chat `message` for a runner piece."""
    out: dict[str, Any] = {"role": "assistant", "content": msg.get("text", "")}
    if msg.get("thinking"):
        out["thinking"] = msg["thinking"]
    if msg.get("tool_calls"):
        out["tool_calls"] = msg["tool_calls"]
    return out


@dataclass
class Joined:
    """The pieces of a non-streamed answer, joined."""

    text: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def add(self, msg: dict[str, Any]) -> None:
        self.text.append(msg.get("text", ""))
        self.thinking.append(msg.get("thinking", ""))
        self.tool_calls += msg.get("tool_calls") or []

    def piece(self) -> dict[str, Any]:
        """All of it as one runner piece."""
        out: dict[str, Any] = {"text": "".join(self.text)}
        if any(self.thinking):
            out["thinking"] = "".join(self.thinking)
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


async def join_answer(
    request: Request, first: dict[str, Any], events: AsyncIterator[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """A non-streamed answer: drain the runner's pieces (the first already read) into the
    final piece, the whole answer as one piece, and every token's logprobs in order.
    Stops when the client goes away; always closes the stream."""
    joined = Joined()
    logprobs: list[dict[str, Any]] = []

    async def drain() -> dict[str, Any]:
        item = first
        while True:
            joined.add(item)
            logprobs.extend(item.get("logprobs") or ())
            if item.get("done"):
                return item
            item = await anext(events)

    try:
        final = await watch(request, drain())
    finally:
        await close(events)
    return final, joined.piece(), logprobs


# ---- OpenAI --------------------------------------------------------------------------------
_EFFORTS = ("high", "medium", "low", "max", "none")


def openai_fields(body: dict[str, Any]) -> dict[str, Any]:
    """Ollama's `think` and `format` from OpenAI's `reasoning_effort` / `reasoning.effort`
    and `response_format` (Ollama's openai middleware)."""
    out: dict[str, Any] = {}
    reasoning = body.get("reasoning")
    effort = body.get("reasoning_effort")
    if effort is None and isinstance(reasoning, dict):
        effort = reasoning.get("effort")
    if effort is not None:
        if effort not in _EFFORTS:
            raise BadRequestError(
                f"invalid reasoning value: '{effort}' (must be \"high\", "
                '"medium", "low", or "none")'
            )
        out["think"] = False if effort == "none" else effort
    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        kind = str(fmt.get("type") or "").strip().lower()
        if kind == "json_object":
            out["format"] = "json"
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise BadRequestError("response_format json_schema needs a `schema` object")
            out["format"] = schema
        elif kind not in ("", "text"):
            raise BadRequestError(f"invalid response_format type: {fmt.get('type')!r}")
    elif fmt is not None:
        raise BadRequestError("response_format must be an object")
    return out


def from_openai_messages(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages (already with text content) as Ollama's: assistant tool calls with
    arguments as objects, `reasoning` as `thinking`, and tool results named after the call
    they answer (`tool_call_id` -> `tool_name`)."""
    names: dict[str, str] = {}
    out = []
    for m in msgs:
        m = dict(m)
        if m.get("reasoning") and not m.get("thinking"):
            m["thinking"] = m.pop("reasoning")
        calls = []
        for call in m.get("tool_calls") or []:
            fn = dict(call.get("function") or {})
            args = fn.get("arguments")
            if isinstance(args, str):  # strict, as a request body: no NaN, no deep nesting
                try:
                    fn["arguments"] = parse_json(args.encode("utf-8")) if args.strip() else {}
                except (BadRequestError, UnicodeEncodeError):
                    raise BadRequestError(f"invalid tool call arguments: {args[:200]}") from None
                if not isinstance(fn["arguments"], dict):
                    raise BadRequestError(f"invalid tool call arguments: {args[:200]}")
            if call.get("id"):
                names[str(call["id"])] = str(fn.get("name", ""))
            calls.append({**call, "function": fn})
        if calls:
            m["tool_calls"] = calls
        if m.get("role") == "tool" and not m.get("tool_name"):
            name = names.get(str(m.get("tool_call_id", ""))) or m.get("name")
            if name:
                m["tool_name"] = name
        out.append(m)
    return out


def openai_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama's tool calls in OpenAI's shape (arguments as a JSON string)."""
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") or {}
        out.append(
            {
                "id": call.get("id", ""),
                "index": fn.get("index", i),
                "type": "function",
                "function": {
                    "name": fn.get("name", ""),
                    "arguments": json.dumps(fn.get("arguments") or {}, ensure_ascii=False),
                },
            }
        )
    return out


def openai_message(msg: dict[str, Any], role: bool = True) -> dict[str, Any]:
    """OpenAI's `message` (or stream `delta`) for a runner piece."""
    out: dict[str, Any] = {"role": "assistant"} if role else {}
    out["content"] = msg.get("text", "")
    if msg.get("thinking"):
        out["reasoning"] = msg["thinking"]
    if msg.get("tool_calls"):
        out["tool_calls"] = openai_tool_calls(msg["tool_calls"])
    return out


def finish_reason(done_reason: str, had_tool_calls: bool) -> str:
    if had_tool_calls:
        return "tool_calls"
    return "length" if done_reason == "length" else "stop"
