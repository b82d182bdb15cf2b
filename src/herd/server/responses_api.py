"""OpenAI's Responses API (`POST /v1/responses`), translated to the chat request that
`/v1/chat/completions` makes, as Ollama's openai/responses.go does.

Stateless, like Ollama's: herd stores no response, so `store` is ignored (answers say
`store: false`) and what would need a stored one (`previous_response_id`, `conversation`,
`item_reference` items, `background`) is a 400 saying so. Ollama's Go decoder drops
`previous_response_id` unread, so a client that relies on it would silently lose its
history; herd says why instead. The client resends the conversation as `input` items.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from herd.errors import BadRequestError
from herd.server import validate
from herd.server.http import JSON, first_item, flag, handles_errors, int_field, read_json
from herd.server.images import has_images, image_data
from herd.server.ollama_api import _check_capabilities
from herd.server.openai_api import _options
from herd.server.outputs import fields, from_openai_messages, join_answer, openai_fields
from herd.server.responses_stream import Builder, Envelope, sse_stream
from herd.server.service import Completion, Service

ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
# effort levels OpenAI has and Ollama's think does not: the nearest level
EFFORT = {"minimal": "low", "xhigh": "high"}
STATEFUL = ("previous_response_id", "conversation")  # fields that name stored state


# ---- input -----------------------------------------------------------------------------------
def _parts(content: Any, where: str) -> tuple[str, list[str]]:
    """A message's (or a tool output's) content: a string, or parts; their text joined and
    the images of `input_image` parts (data URLs only, as base64)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise BadRequestError(f"{where} must be a string or a list of content parts")
    text, images = [], []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            text.append(validate.text(part, "text", f"{at}.text") or "")
        elif kind == "refusal":
            text.append(validate.text(part, "refusal", f"{at}.refusal") or "")
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):  # a file_id would name a file herd never had
                raise BadRequestError(f"{at}: an input_image needs an image_url (a data URL)")
            images.append(image_data(url))
        elif kind == "input_file":
            raise BadRequestError(f"{at}: file inputs are not supported")
        else:
            raise BadRequestError(f"{at}: unknown content type {kind!r}")
    return "".join(text), images


def _reasoning_text(item: dict[str, Any]) -> str:
    """A reasoning item sent back: herd's own carry the thinking as their summary."""
    if isinstance(item.get("encrypted_content"), str):  # what Ollama puts there: plain text
        return str(item["encrypted_content"])
    texts = []
    for key in ("summary", "content"):
        for part in validate.items(item.get(key), f"reasoning.{key}"):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
    return "\n".join(texts)


def messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """`instructions` and `input` as OpenAI chat messages (content already text): function
    calls become the assistant's tool_calls, their outputs `tool` messages, reasoning the
    next assistant message's thinking."""
    msgs: list[dict[str, Any]] = []
    instructions = validate.text(body, "instructions")
    if instructions:
        msgs.append({"role": "system", "content": instructions})
    value = body.get("input")
    if value is None:
        raise BadRequestError("input is required (a string or a list of input items)")
    if isinstance(value, str):
        return [*msgs, {"role": "user", "content": value}]
    if not isinstance(value, list):
        raise BadRequestError("input must be a string or a list of input items")
    thinking = ""
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequestError(f"{where} must be an object")
        kind = item.get("type")
        if kind is None and "role" in item:  # the shorthand {"role", "content"}
            kind = "message"
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise BadRequestError(
                    f"{where}.role must be one of 'user', 'assistant', 'system', 'developer'"
                )
            text, images = _parts(item.get("content") or "", f"{where}.content")
            msg: dict[str, Any] = {"role": ROLES[role], "content": text}
            if images:
                msg["images"] = images
            if role == "assistant" and thinking:
                msg["thinking"], thinking = thinking, ""
            msgs.append(msg)
        elif kind == "function_call":
            name = validate.text(item, "name", f"{where}.name")
            args = validate.text(item, "arguments", f"{where}.arguments") or "{}"
            call_id = validate.text(item, "call_id", f"{where}.call_id")
            if not name or not call_id:
                raise BadRequestError(f"{where}: a function_call needs a name and a call_id")
            call = {"id": call_id, "type": "function",
                    "function": {"name": name, "arguments": args}}  # fmt: skip
            if msgs and msgs[-1]["role"] == "assistant":  # one turn: text and its calls
                msgs[-1].setdefault("tool_calls", []).append(call)
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
            if thinking:
                msgs[-1]["thinking"], thinking = thinking, ""
        elif kind == "function_call_output":
            call_id = validate.text(item, "call_id", f"{where}.call_id")
            if not call_id:
                raise BadRequestError(f"{where}: a function_call_output needs a call_id")
            text, images = _parts(item.get("output") or "", f"{where}.output")
            msg = {"role": "tool", "content": text, "tool_call_id": call_id}
            if images:
                msg["images"] = images
            msgs.append(msg)
        elif kind == "reasoning":
            thinking = _reasoning_text(item)
        elif kind == "item_reference":
            raise BadRequestError(f"{where}: herd keeps no items; send the item itself")
        elif kind is None:
            raise BadRequestError(f"{where} needs a type")
        else:
            raise BadRequestError(f"{where}: unknown input item type {kind!r}")
    if thinking:  # reasoning with nothing after it
        msgs.append({"role": "assistant", "content": "", "thinking": thinking})
    if not msgs:
        raise BadRequestError("input must not be empty")
    return msgs


# ---- the other fields ------------------------------------------------------------------------
def tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(the request's tools as sent, as chat's tools for the model). Only function tools:
    herd runs no tools of its own. `tool_choice` "none" gives the model none; a named
    function gives it only that one; "required" is "auto" (no model can be made to call,
    whatever its template: Ollama ignores tool_choice altogether)."""
    sent = validate.items(body.get("tools"), "tools")
    chat = []
    for i, t in enumerate(sent):
        t = validate.obj(t, f"tools[{i}]")
        if t.get("type") != "function":
            raise BadRequestError(
                f"tools[{i}]: tool type {t.get('type')!r} is not supported (only 'function')"
            )
        fn = {"name": t.get("name"), "description": t.get("description"),
              "parameters": t.get("parameters")}  # fmt: skip
        chat.append(
            {"type": "function", "function": {k: v for k, v in fn.items() if v is not None}}
        )
    checked = validate.tools(chat) or []
    for i, t in enumerate(checked):
        if not t["function"].get("name"):
            raise BadRequestError(f"tools[{i}].name is required")
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "required"):
        return sent, checked or None
    if choice == "none":
        return sent, None
    if isinstance(choice, dict) and choice.get("type") == "function":
        named = [t for t in checked if t["function"]["name"] == choice.get("name")]
        if not named:
            raise BadRequestError(f"tool_choice names no tool in tools: {choice.get('name')!r}")
        return sent, named
    raise BadRequestError(
        "tool_choice must be 'auto', 'none', 'required' or {\"type\": \"function\", \"name\"}"
    )


def text_format(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(`text.format` as echoed, as chat's `response_format`)."""
    text = body.get("text")
    if text is None:
        return {"type": "text"}, None
    fmt = validate.obj(text, "text").get("format")
    if fmt is None:
        return {"type": "text"}, None
    fmt = validate.obj(fmt, "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return fmt, None
    if kind == "json_object":
        return fmt, {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise BadRequestError("text.format json_schema needs a `schema` object")
        return fmt, {"type": "json_schema", "json_schema": {"schema": fmt["schema"]}}
    raise BadRequestError(
        f"text.format.type must be 'text', 'json_object' or 'json_schema', not {kind!r}"
    )


def reasoning(body: dict[str, Any]) -> dict[str, Any] | None:
    value = body.get("reasoning")
    if value is None:
        return None
    value = dict(validate.obj(value, "reasoning"))
    effort = value.get("effort")
    value["effort"] = EFFORT.get(effort, effort) if isinstance(effort, str) else effort
    return value


class ResponsesAPI:
    def __init__(self, service: Service) -> None:
        self.service = service

    def routes(self) -> list[Route]:
        return [Route("/v1/responses", handles_errors(openai=True)(self.create), methods=["POST"])]

    async def create(self, request: Request) -> Response:
        body = await read_json(request)
        for name in STATEFUL:
            if body.get(name) is not None:
                raise BadRequestError(
                    f"{name} is not supported: herd keeps no responses; send the whole "
                    "conversation as input items"
                )
        if flag(body, "background", False):
            raise BadRequestError("background responses are not supported: herd keeps none")
        stream = flag(body, "stream", False)
        flag(body, "store", False)  # checked, then ignored: nothing is stored
        ref = self.service.model(body.get("model"))
        msgs = from_openai_messages(messages(body))
        sent_tools, chat_tools = tools(body)
        echo_format, response_format = text_format(body)
        max_tokens = int_field(body, "max_output_tokens", 1, 2**31 - 1)
        chat = {
            "max_tokens": max_tokens,
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
            "reasoning": reasoning(body),
            "response_format": response_format,
        }
        opts = _options(chat)  # OpenAI's sampling defaults (temperature and top_p 1)
        asked: dict[str, Any] = {**openai_fields(chat), "tools": chat_tools}
        payload: dict[str, Any] = {"messages": msgs}
        if has_images(payload):  # "does not support vision" for a text-only model
            asked["images"] = True
        facts = await self.service.facts(ref)
        _check_capabilities(body["model"], facts, asked)
        payload = {**payload, **fields(asked, facts)}
        spec = await self.service.load_spec(ref, opts)
        validate.text_fits(payload, spec.context_length())

        metadata = validate.obj(body.get("metadata") or {}, "metadata")
        envelope = Envelope(
            model=body["model"],
            instructions=validate.text(body, "instructions"),
            tools=sent_tools,
            tool_choice=body.get("tool_choice") or "auto",
            text_format=echo_format,
            temperature=opts["temperature"],
            top_p=opts["top_p"],
            max_output_tokens=max_tokens,
            reasoning=body.get("reasoning"),  # as sent (checked by reasoning())
            metadata=metadata,
            truncation=body.get("truncation") if isinstance(body.get("truncation"), str)
            else "disabled",
            parallel_tool_calls=flag(body, "parallel_tool_calls", True),
        )  # fmt: skip
        events = self.service.completion(Completion(spec, None, payload))
        first = await first_item(request, events)
        builder = Builder(envelope)
        if stream:
            return sse_stream(builder, first, events)
        final, whole, _ = await join_answer(request, first, events)
        builder.feed({**final, **whole, "done": True})
        return JSON(builder.final)
