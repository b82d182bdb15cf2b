"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`), translated into
the same chat requests as the other APIs, as Ollama's anthropic package does; the answers'
shapes are in herd.server.anthropic_stream.

A message's content blocks become Ollama messages: text joined, base64 images as
`images`, assistant `tool_use` as `tool_calls`, `thinking` as `thinking`, and each
`tool_result` a `tool` message of its own (before the user's text, as Ollama orders them).
`tool_choice` is checked and, as in Ollama, cannot force a call (`any`, `tool` act as
`auto`); `none` leaves the tools out of the prompt, so the model is not offered them.
`thinking` is Ollama's `think`, silently dropped for a model that cannot think (Ollama's
relax_thinking); `budget_tokens` is checked, not enforced.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from herd.errors import BadRequestError
from herd.server import validate
from herd.server.anthropic_stream import Events, handles_errors, message, new_id, sse
from herd.server.http import JSON, first_item, flag, int_field, read_json
from herd.server.images import check_images
from herd.server.ollama_api import _check_capabilities
from herd.server.outputs import fields, from_openai_messages, join_answer
from herd.server.service import Completion, Service

MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
EFFORTS = ("low", "medium", "high", "max")
THINKING = ("enabled", "disabled", "adaptive", "between_tools")


def _system(value: Any) -> str:
    """`system`: a string or a list of text blocks, joined."""
    if value is None or isinstance(value, str):
        return value or ""
    if not isinstance(value, list):
        raise BadRequestError("system: Input should be a string or a list of text blocks")
    parts = []
    for j, block in enumerate(value):
        where = f"system[{j}]"
        block = validate.obj(block, where)
        if block.get("type") != "text":
            raise BadRequestError(f"{where}: only text blocks are allowed in system")
        parts.append(_text(block, where))
    return "".join(parts)


def _text(block: dict[str, Any], where: str) -> str:
    value = block.get("text")
    if not isinstance(value, str):
        raise BadRequestError(f"{where}.text: Input should be a valid string")
    return value


def _image(block: dict[str, Any], where: str) -> str:
    """An image block's base64 data: only `source.type: "base64"` (herd fetches no URL)."""
    source = validate.obj(block.get("source"), f"{where}.source")
    if source.get("type") != "base64":
        raise BadRequestError(
            f"{where}.source: invalid image source type {source.get('type')!r}; "
            "only base64 images are supported"
        )
    media = source.get("media_type")
    if media is not None and media not in MEDIA_TYPES:
        raise BadRequestError(f"{where}.source.media_type: must be one of {', '.join(MEDIA_TYPES)}")
    data = source.get("data")
    if not isinstance(data, str):
        raise BadRequestError(f"{where}.source.data: Input should be a valid string")
    return check_images([data], f"{where}.source.data")[0]


def _tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    """A `tool_result` as a tool message: content a string or text and image blocks."""
    tool_use_id = block.get("tool_use_id")
    if not isinstance(tool_use_id, str) or not tool_use_id:
        raise BadRequestError(f"{where}.tool_use_id: Field required")
    flag(block, "is_error", False)
    content = block.get("content")
    text, images = "", []
    if isinstance(content, str):
        text = content
    elif content is not None:
        parts = []
        for k, part in enumerate(validate.items(content, f"{where}.content")):
            at = f"{where}.content[{k}]"
            part = validate.obj(part, at)
            if part.get("type") == "text":
                parts.append(_text(part, at))
            elif part.get("type") == "image":
                images.append(_image(part, at))
            else:
                raise BadRequestError(f"{at}: unknown content block type {part.get('type')!r}")
        text = "".join(parts)
    out: dict[str, Any] = {"role": "tool", "content": text, "tool_call_id": tool_use_id}
    if images:
        out["images"] = images
    return out


def _message(m: Any, i: int) -> list[dict[str, Any]]:
    """One Anthropic message as Ollama messages (tool results are messages of their own)."""
    where = f"messages[{i}]"
    m = validate.obj(m, where)
    role = m.get("role")
    if role not in ("user", "assistant"):
        raise BadRequestError(f"{where}.role: Input should be 'user' or 'assistant'")
    content = m.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise BadRequestError(f"{where}.content: Input should be a string or a list of blocks")
    text, images, calls, thinking, results = [], [], [], "", []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        block = validate.obj(block, at)
        kind = block.get("type")
        if kind == "text":
            text.append(_text(block, at))
        elif kind == "image":
            images.append(_image(block, at))
        elif kind == "tool_use":
            calls.append(_tool_use(block, at))
        elif kind == "tool_result":
            results.append(_tool_result(block, at))
        elif kind == "thinking":
            thinking = validate.text(block, "thinking", f"{at}.thinking") or ""
        elif kind == "redacted_thinking":
            pass  # encrypted by Anthropic's servers: nothing a local model can read
        else:
            raise BadRequestError(f"{at}: unknown content block type {kind!r}")
    out = []
    if text or images or calls or thinking:
        msg: dict[str, Any] = {"role": role, "content": "".join(text)}
        if images:
            msg["images"] = images
        if calls:
            msg["tool_calls"] = calls
        if thinking:
            msg["thinking"] = thinking
        out.append(msg)
    # a user turn answers the calls before it says more; Ollama puts the results first
    return results + out if role == "user" else out + results


def _tool_use(block: dict[str, Any], where: str) -> dict[str, Any]:
    for key in ("id", "name"):
        if not isinstance(block.get(key), str) or not block[key]:
            raise BadRequestError(f"{where}.{key}: Field required")
    args = block.get("input")
    if args is None:
        args = {}
    validate.obj(args, f"{where}.input")
    return {"id": block["id"], "function": {"name": block["name"], "arguments": args}}


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Client tools as Ollama's; Anthropic's server tools (web search, code execution,
    bash ...) need Anthropic's servers and are refused."""
    value = body.get("tools")
    if value is None:
        return None
    out = []
    for i, t in enumerate(validate.items(value, "tools")):
        where = f"tools[{i}]"
        t = validate.obj(t, where)
        kind = t.get("type")
        if kind not in (None, "custom"):
            raise BadRequestError(
                f"{where}.type: {kind!r} is one of Anthropic's server tools, which herd "
                'does not run; define it as a client tool (type "custom") instead'
            )
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequestError(f"{where}.name: Field required")
        fn: dict[str, Any] = {"name": name}
        description = validate.text(t, "description", f"{where}.description")
        if description is not None:
            fn["description"] = description
        schema = t.get("input_schema")
        if schema is None:
            raise BadRequestError(f"{where}.input_schema: Field required")
        fn["parameters"] = schema
        out.append({"type": "function", "function": fn})
    return validate.tools(out)


def _tool_choice(body: dict[str, Any]) -> str:
    """The choice's type (auto when absent)."""
    value = body.get("tool_choice")
    if value is None:
        return "auto"
    choice = validate.obj(value, "tool_choice")
    kind = choice.get("type")
    if kind not in ("auto", "any", "tool", "none"):
        raise BadRequestError("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
    if kind == "tool" and not isinstance(choice.get("name"), str):
        raise BadRequestError("tool_choice.name: Field required")
    flag(choice, "disable_parallel_tool_use", False)
    return str(kind)


def _think(body: dict[str, Any]) -> bool | str | None:
    """`thinking: {type, budget_tokens}` or `output_config.effort` as Ollama's `think`."""
    value = body.get("thinking")
    if value is not None:
        thinking = validate.obj(value, "thinking")
        kind = thinking.get("type")
        if kind not in THINKING:
            raise BadRequestError(
                f"thinking.type: Input should be one of {', '.join(map(repr, THINKING))}"
            )
        int_field(thinking, "budget_tokens", 1, 2**31 - 1)
        return kind != "disabled"  # adaptive, between_tools: a model that can, thinks
    config = body.get("output_config")
    if config is None:
        return None
    effort = validate.obj(config, "output_config").get("effort")
    if effort is None:
        return None
    if not isinstance(effort, str):
        raise BadRequestError("output_config.effort: Input should be a valid string")
    effort = effort.strip().lower()
    effort = "high" if effort == "xhigh" else effort
    return effort if effort in EFFORTS else None


def _options(body: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if max_tokens is not None:
        opts["num_predict"] = max_tokens
    for name in ("temperature", "top_p"):
        value = validate.number(body, name)
        if value is not None:
            opts[name] = value
    top_k = int_field(body, "top_k", 0, 2**31 - 1)
    if top_k is not None:
        opts["top_k"] = top_k
    stop = validate.strings(body.get("stop_sequences"), "stop_sequences")
    if stop:
        opts["stop"] = stop
    return opts


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's system prompt and messages as Ollama chat messages."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("messages: at least one message is required")
    system = _system(body.get("system"))
    out = [{"role": "system", "content": system}] if system else []
    for i, m in enumerate(messages):
        empty = isinstance(m, dict) and m.get("content") in ("", [])
        if empty and not (i == len(messages) - 1 and m.get("role") == "assistant"):
            raise BadRequestError(
                f"messages[{i}]: all messages must have non-empty content except for the "
                "optional final assistant message"
            )
        out += _message(m, i)
    # tool results named after the calls they answer (tool_use_id -> the call's name)
    return from_openai_messages(out)


class AnthropicAPI:
    def __init__(self, service: Service) -> None:
        self.service = service

    def routes(self) -> list[Route]:
        e = handles_errors
        return [
            Route("/v1/messages", e(self.messages), methods=["POST"]),
            Route("/v1/messages/count_tokens", e(self.count_tokens), methods=["POST"]),
        ]

    async def _completion(self, body: dict[str, Any], options: dict[str, Any], **extra: Any) -> Any:
        """The runner's replies for a Messages request (checks done before the model loads)."""
        ref = self.service.model(body.get("model"))
        msgs = chat_messages(body)
        tools = _tools(body)
        if _tool_choice(body) == "none":
            tools = None
        facts = await self.service.facts(ref)
        think = _think(body)
        if think and "thinking" not in facts.capabilities:
            think = None  # Ollama's relax_thinking: a model that cannot think just answers
        asked: dict[str, Any] = {"think": think, "tools": tools, "messages": msgs}
        _check_capabilities(body["model"], facts, asked)  # tools, vision: 400s as elsewhere
        payload = {"messages": msgs, **fields(asked, facts), **extra}
        spec = await self.service.load_spec(ref, options)
        validate.text_fits(payload, spec.context_length())
        return self.service.completion(Completion(spec, None, payload))

    async def messages(self, request: Request) -> Response:
        body = await read_json(request)
        if body.get("max_tokens") is None:
            raise BadRequestError("max_tokens: Field required")
        max_tokens = int_field(body, "max_tokens", 1, 2**31 - 1)
        stream = flag(body, "stream", False)
        validate.text(body, "model")
        events = await self._completion(body, _options(body, max_tokens))
        mid, model = new_id("msg"), body["model"]
        first = await first_item(request, events)
        if stream:
            return sse(first, events, Events(mid, model))
        final, whole, _ = await join_answer(request, first, events)
        return JSON(message(mid, model, whole, final))

    async def count_tokens(self, request: Request) -> Response:
        """The prompt's length in the model's tokens: the request rendered with the model's
        template and tokenized by its runner (`render_only`: nothing is generated)."""
        body = await read_json(request)
        validate.text(body, "model")
        events = await self._completion(body, _options(body, None), render_only=True)
        final, _, _ = await join_answer(request, await first_item(request, events), events)
        return JSON({"input_tokens": int(final.get("prompt_eval_count", 0))})
