"""OpenAI's Responses API answer, built from the runner's pieces: the Response object and its
server-sent events (`event: <type>` / `data: {...}`, each with a `sequence_number`).

One state machine serves both: a streamed answer sends its events; a whole answer feeds the
joined pieces through the same machine and sends only the final Response, so the two
cannot disagree. Output items in order: `reasoning` (the thinking, as a summary, as
Ollama's openai/responses.go does), `message` (`output_text`), then one `function_call`
per tool call (arguments as a JSON string).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import StreamingResponse

from herd.errors import HerdError
from herd.server.errors import status_for
from herd.server.http import close, dumps


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


@dataclass
class Envelope:
    """What a Response repeats of its request, and its identity."""

    model: str
    instructions: str | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: Any = "auto"
    text_format: dict[str, Any] = field(default_factory=lambda: {"type": "text"})
    temperature: float = 1.0
    top_p: float = 1.0
    max_output_tokens: int | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    truncation: str = "disabled"
    parallel_tool_calls: bool = True
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    def response(self, status: str, output: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": None,
            "error": None,
            "incomplete_details": None,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "max_tool_calls": None,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": None,  # herd keeps no responses
            "reasoning": self.reasoning,
            "store": False,
            "temperature": self.temperature,
            "text": {"format": self.text_format},
            "tool_choice": self.tool_choice,
            "tools": self.tools,
            "top_p": self.top_p,
            "truncation": self.truncation,
            "usage": None,
            "metadata": self.metadata,
            "background": False,
            "service_tier": "default",
            **more,
        }


def usage(final: dict[str, Any]) -> dict[str, Any]:
    """The runner's counts as the Responses API's. `prompt_cached_count`, when the runner
    sends it, is the part of the prompt reused from the cache (already within
    prompt_eval_count); the rest was evaluated and stays in the sequence's cache for the
    next turn (cache_write_tokens). The runner does not count thinking tokens apart:
    reasoning_tokens 0."""
    given, made = int(final.get("prompt_eval_count", 0)), int(final.get("eval_count", 0))
    cached = int(final.get("prompt_cached_count", 0) or 0)
    return {
        "input_tokens": given,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": given - cached},
        "output_tokens": made,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": given + made,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class Builder:
    """Runner pieces in, Responses events out (`events()` after each call)."""

    def __init__(self, envelope: Envelope) -> None:
        self.env = envelope
        self.output: list[dict[str, Any]] = []
        self.seq = 0
        self.open: dict[str, Any] | None = None  # the reasoning or message item being written
        self.final: dict[str, Any] | None = None
        self.done = False

    def _event(self, kind: str, **data: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self.env.response("in_progress", [])),
            self._event("response.in_progress", response=self.env.response("in_progress", [])),
        ]

    def feed(self, piece: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if piece.get("thinking"):
            out += self._write("reasoning", piece["thinking"])
        if piece.get("text"):
            out += self._write("message", piece["text"])
        for call in piece.get("tool_calls") or ():
            out += self._call(call)
        if piece.get("done"):
            out += self._finish(piece)
        return out

    # ---- items
    def _add(self, item: dict[str, Any]) -> dict[str, Any]:
        self.output.append(item)
        return self._event("response.output_item.added", output_index=len(self.output) - 1,
                           item=json.loads(dumps(item)))  # fmt: skip

    def _write(self, kind: str, delta: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.open is None or self.open["type"] != kind:
            out += self._close()
            out += self._open(kind)
        item, index = self.open, len(self.output) - 1
        assert item is not None
        if kind == "reasoning":
            item["_text"] += delta
            out.append(self._event("response.reasoning_summary_text.delta", item_id=item["id"],
                                   output_index=index, summary_index=0, delta=delta))  # fmt: skip
        else:
            item["_text"] += delta
            out.append(self._event("response.output_text.delta", item_id=item["id"],
                                   output_index=index, content_index=0, delta=delta,
                                   logprobs=[]))  # fmt: skip
        return out

    def _open(self, kind: str) -> list[dict[str, Any]]:
        if kind == "reasoning":
            item = {"id": new_id("rs"), "type": "reasoning", "summary": []}
        else:
            item = {"id": new_id("msg"), "type": "message", "status": "in_progress",
                    "role": "assistant", "content": []}  # fmt: skip
        out = [self._add(item)]
        item["_text"] = ""
        self.open = item
        index = len(self.output) - 1
        if kind == "reasoning":
            out.append(self._event("response.reasoning_summary_part.added", item_id=item["id"],
                                   output_index=index, summary_index=0,
                                   part={"type": "summary_text", "text": ""}))  # fmt: skip
        else:
            out.append(self._event("response.content_part.added", item_id=item["id"],
                                   output_index=index, content_index=0,
                                   part=_text_part("")))  # fmt: skip
        return out

    def _close(self, status: str = "completed") -> list[dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        text, index = item.pop("_text"), self.output.index(item)
        if item["type"] == "reasoning":
            part = {"type": "summary_text", "text": text}
            item["summary"] = [part]
            out = [
                self._event("response.reasoning_summary_text.done", item_id=item["id"],
                            output_index=index, summary_index=0, text=text),
                self._event("response.reasoning_summary_part.done", item_id=item["id"],
                            output_index=index, summary_index=0, part=part),
            ]  # fmt: skip
        else:
            item["content"], item["status"] = [_text_part(text)], status
            out = [
                self._event("response.output_text.done", item_id=item["id"],
                            output_index=index, content_index=0, text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"],
                            output_index=index, content_index=0, part=_text_part(text)),
            ]  # fmt: skip
        out.append(self._event("response.output_item.done", output_index=index, item=item))
        return out

    def _call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        """A whole tool call (the runner's parser sends each once it is complete)."""
        out = self._close()
        fn = call.get("function") or {}
        args = json.dumps(fn.get("arguments") or {}, ensure_ascii=False)
        item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress",
                "call_id": call.get("id") or new_id("call"), "name": fn.get("name", ""),
                "arguments": ""}  # fmt: skip
        out.append(self._add(item))
        index = len(self.output) - 1
        item["arguments"], item["status"] = args, "completed"
        out += [
            self._event("response.function_call_arguments.delta", item_id=item["id"],
                        output_index=index, delta=args),
            self._event("response.function_call_arguments.done", item_id=item["id"],
                        output_index=index, name=item["name"], arguments=args),
            self._event("response.output_item.done", output_index=index, item=item),
        ]  # fmt: skip
        return out

    def _finish(self, final: dict[str, Any]) -> list[dict[str, Any]]:
        """Close the last item; the answer is `incomplete` when it ran out of tokens (the
        terminal event is then `response.incomplete`, as OpenAI sends it)."""
        length = final.get("done_reason") == "length"
        out = self._close("incomplete" if length else "completed")
        if not any(i["type"] in ("message", "function_call") for i in self.output):
            # an answer with nothing to say is still an (empty) message, as Ollama's
            out += self._open("message")
            out += self._close("incomplete" if length else "completed")
        self.final, self.done = self.response(final), True
        kind = "response.incomplete" if length else "response.completed"
        return out + [self._event(kind, response=self.final)]

    def response(self, final: dict[str, Any]) -> dict[str, Any]:
        length = final.get("done_reason") == "length"
        return self.env.response(
            "incomplete" if length else "completed",
            self.output,
            completed_at=int(time.time()),
            incomplete_details={"reason": "max_output_tokens"} if length else None,
            usage=usage(final),
        )

    def fail(self, e: HerdError) -> list[dict[str, Any]]:
        """An error after the stream began: OpenAI's `error` event, then `response.failed`."""
        out = self._close("incomplete")
        # OpenAI's codes for a failed response: the server's fault, or the request's
        code = "server_error" if status_for(e) >= 500 else "invalid_prompt"
        failed = self.env.response("failed", self.output, error={"code": code, "message": str(e)})
        return out + [
            self._event("error", code=code, message=str(e), param=None),
            self._event("response.failed", response=failed),
        ]


def sse_stream(
    builder: Builder, first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]
) -> StreamingResponse:
    """The events of a streamed answer; the stream ends after the terminal event (the
    Responses API sends no `[DONE]`)."""

    def block(event: dict[str, Any]) -> str:
        return f"event: {event['type']}\ndata: {dumps(event)}\n\n"

    async def events() -> AsyncIterator[str]:
        try:
            for event in builder.start() + builder.feed(first):
                yield block(event)
            async for piece in rest:
                for event in builder.feed(piece):
                    yield block(event)
                if builder.done:
                    break
        except HerdError as e:
            for event in builder.fail(e):
                yield block(event)
        finally:
            await close(rest)

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
