"""Anthropic's answer shapes for `/v1/messages`: the message, its SSE event stream, its
errors, from the runner's pieces (`text`, `thinking`, `tool_calls`, then the `done` one).

Stop reasons as Ollama's anthropic package maps them: a tool call is `tool_use`, `length`
is `max_tokens`, `stop` is `end_turn`. herd's runner reports a matched stop sequence as
`stop` too, so `stop_sequence` is never named (Ollama's does the same).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from herd.errors import HerdError
from herd.server import http
from herd.server.errors import headers_for, status_for
from herd.server.http import JSON, close, dumps

log = logging.getLogger("herd.server")

Handler = Callable[[Request], Awaitable[Response]]

# Anthropic's error types by HTTP status (its API reference; Ollama's NewError)
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_body(status: int, message: str) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}}` for a status."""
    if len(message) > 4096:  # errors may quote the request; never a whole request back
        message = message[:4093] + "..."
    kind = _ERROR_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(e: BaseException) -> Response:
    status = status_for(e)
    if status >= 500 and not isinstance(e, HerdError):
        log.exception("request failed", exc_info=e)
    body = error_body(status, str(e) or type(e).__name__)
    return JSON(body, status_code=status, headers=headers_for(e))


def handles_errors(handler: Handler) -> Handler:
    """A handler whose exceptions answer in Anthropic's error shape."""
    return http.handles_errors(respond=error_response)(handler)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def tool_use_id(call: dict[str, Any]) -> str:
    """A runner call id (`call_x`) as Anthropic's `toolu_x`: the same call, the same id, in
    the message and in the stream."""
    cid = str(call.get("id") or "")
    return "toolu_" + cid.removeprefix("call_") if cid else new_id("toolu")


def stop_reason(done_reason: str, called: bool) -> str:
    if called:
        return "tool_use"
    if done_reason == "length":
        return "max_tokens"
    return "end_turn"


def usage(final: dict[str, Any]) -> dict[str, int]:
    """Anthropic's usage: `input_tokens` are the prompt tokens computed for this request and
    `cache_read_input_tokens` those reused from the prefix cache (their sum is the prompt,
    the runner's `prompt_eval_count`; `prompt_cached_count` is the reused part)."""
    prompt = int(final.get("prompt_eval_count", 0))
    cached = min(int(final.get("prompt_cached_count") or 0), prompt)
    return {
        "input_tokens": prompt - cached,
        "output_tokens": int(final.get("eval_count", 0)),
        "cache_read_input_tokens": cached,
    }


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function") or {}
    return {
        "type": "tool_use",
        "id": tool_use_id(call),
        "name": fn.get("name", ""),
        "input": fn.get("arguments") or {},
    }


def message(mid: str, model: str, whole: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
    """The non-streamed message: thinking, text, then tool_use blocks."""
    content: list[dict[str, Any]] = []
    if whole.get("thinking"):
        content.append({"type": "thinking", "thinking": whole["thinking"], "signature": ""})
    calls = whole.get("tool_calls") or []
    if whole.get("text") or not (content or calls):  # an empty answer is one empty text
        content.append({"type": "text", "text": whole.get("text", "")})
    content += [_tool_use(c) for c in calls]
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(str(final.get("done_reason", "")), bool(calls)),
        "stop_sequence": None,
        "usage": usage(final),
    }


class Events:
    """The stream's events, in Anthropic's order: message_start; per content block
    content_block_start (ping after the first), content_block_delta..., content_block_stop;
    then message_delta (stop reason, usage) and message_stop."""

    def __init__(self, mid: str, model: str) -> None:
        self.mid, self.model = mid, model
        self.index = -1  # the current block's
        self.open: str | None = None  # the kind of the block still open
        self.pinged = self.called = False

    def start(self) -> list[tuple[str, dict[str, Any]]]:
        # the prompt's counts come with the last piece: message_delta carries them
        msg = {
            "id": self.mid,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [("message_start", {"type": "message_start", "message": msg})]

    def _close(self, out: list[tuple[str, dict[str, Any]]]) -> None:
        if self.open is not None:
            out.append(("content_block_stop", {"type": "content_block_stop", "index": self.index}))
            self.open = None

    def _begin(self, out: list[tuple[str, dict[str, Any]]], block: dict[str, Any]) -> None:
        self._close(out)
        self.index += 1
        self.open = block["type"]
        out.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": self.index, "content_block": block},
            )
        )
        self._ping(out)

    def _ping(self, out: list[tuple[str, dict[str, Any]]]) -> None:
        if not self.pinged:
            self.pinged = True
            out.append(("ping", {"type": "ping"}))

    def _delta(self, out: list[tuple[str, dict[str, Any]]], delta: dict[str, Any]) -> None:
        event = {"type": "content_block_delta", "index": self.index, "delta": delta}
        out.append(("content_block_delta", event))

    def piece(self, msg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        if msg.get("thinking"):
            if self.open != "thinking":
                self._begin(out, {"type": "thinking", "thinking": "", "signature": ""})
            self._delta(out, {"type": "thinking_delta", "thinking": msg["thinking"]})
        if msg.get("text"):
            if self.open != "text":
                self._begin(out, {"type": "text", "text": ""})
            self._delta(out, {"type": "text_delta", "text": msg["text"]})
        for call in msg.get("tool_calls") or []:
            block = _tool_use(call)
            args = block["input"]
            self._begin(out, {**block, "input": {}})
            self._delta(out, {"type": "input_json_delta", "partial_json": dumps(args)})
            self._close(out)
            self.called = True
        if msg.get("done"):
            self._close(out)
            self._ping(out)
            reason = stop_reason(str(msg.get("done_reason", "")), self.called)
            out.append(
                (
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": reason, "stop_sequence": None},
                        "usage": usage(msg),
                    },
                )
            )
            out.append(("message_stop", {"type": "message_stop"}))
        return out


def _frame(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {dumps(data)}\n\n"


def sse(first: dict[str, Any], rest: AsyncIterator[dict[str, Any]], events: Events) -> Response:
    """The event stream; an error after the first event is an `error` event."""

    async def frames() -> AsyncIterator[str]:
        try:
            for name, data in events.start() + events.piece(first):
                yield _frame(name, data)
            async for item in rest:
                for name, data in events.piece(item):
                    yield _frame(name, data)
        except Exception as e:  # the status line is sent: the error goes in the stream
            status = status_for(e)
            if not isinstance(e, HerdError):
                log.exception("stream failed", exc_info=e)
            yield _frame("error", error_body(status, str(e) or type(e).__name__))
        finally:
            await close(rest)

    return StreamingResponse(
        frames(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
