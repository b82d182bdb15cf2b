"""OpenAI compatibility (`/v1/*`), translated to the same requests the Ollama API makes,
as Ollama's `openai` middleware does."""

from __future__ import annotations

import base64
import secrets
import time
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from herd.errors import BadRequestError, ModelNotFoundError
from herd.server import validate
from herd.server.http import (
    JSON,
    first_item,
    flag,
    handles_errors,
    int_field,
    read_json,
    sse,
    watch,
)
from herd.server.images import has_images, image_data
from herd.server.ollama_api import _check_capabilities, normalize
from herd.server.outputs import (
    fields,
    finish_reason,
    from_openai_messages,
    has_output,
    join_answer,
    openai_fields,
    openai_message,
)
from herd.server.service import Completion, Service
from herd.store import names

FINISH = {"stop": "stop", "length": "length"}


def _options(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI sampling fields as Ollama options (temperature and top_p default to 1), typed
    as OpenAI's schema types them: numbers are JSON numbers, never strings like "NaN"."""
    opts: dict[str, Any] = {}
    for name in ("max_completion_tokens", "max_tokens"):
        max_tokens = int_field(body, name, -1, 2**31 - 1)
        if max_tokens is not None:
            opts["num_predict"] = max_tokens
            break
    seed = int_field(body, "seed", -1, 2**31 - 1)
    if seed is not None:
        opts["seed"] = seed
    for name in ("frequency_penalty", "presence_penalty"):
        value = validate.number(body, name)
        if value is not None:
            opts[name] = value
    temperature, top_p = validate.number(body, "temperature"), validate.number(body, "top_p")
    opts["temperature"] = 1.0 if temperature is None else temperature
    opts["top_p"] = 1.0 if top_p is None else top_p
    stop = body.get("stop")
    if stop is not None:
        opts["stop"] = [stop] if isinstance(stop, str) else validate.strings(stop, "stop")
    return opts


def encode(vector: list[float], dims: int, encoding: str | None) -> list[float] | str:
    """The normalized vector as JSON floats, or for `encoding_format: "base64"` (the OpenAI
    SDK's default) base64 of its little-endian float32 bytes, as OpenAI and Ollama send it."""
    vector = normalize(vector, dims)
    if encoding != "base64":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def _content(content: Any) -> tuple[str, list[str]]:
    """A message's content: a string, or parts; the text parts joined, and the images of
    the `image_url` parts (base64, as Ollama's `images`)."""
    if content is None or isinstance(content, str):
        return content or "", []
    if not isinstance(content, list):
        raise BadRequestError("invalid message content")
    text, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text.append(validate.text(part, "text", "a text part's text") or "")
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise BadRequestError("invalid message format")
            images.append(image_data(url))
        elif kind == "input_audio":
            raise BadRequestError("this model does not support audio")
        else:
            raise BadRequestError(f"invalid message content part: {kind!r}")
    return "".join(text), images


def _logprobs(body: dict[str, Any], legacy: bool = False) -> dict[str, Any]:
    """OpenAI's logprobs request as the runner's: chat takes `logprobs` (bool) and
    `top_logprobs`; /v1/completions takes `logprobs` as the number of alternatives."""
    value = body.get("logprobs")
    if legacy:
        if value is None or isinstance(value, bool) or not isinstance(value, int):
            return {}
        top = value
    else:
        if not flag(body, "logprobs", False):
            return {}
        top = body.get("top_logprobs") or 0
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
        raise BadRequestError("top_logprobs must be between 0 and 20")
    return {"logprobs": True, "top_logprobs": top}


def _choice_logprobs(msg: dict[str, Any]) -> dict[str, Any] | None:
    return {"content": msg["logprobs"]} if msg.get("logprobs") else None


def _usage(final: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's usage: `prompt_tokens` is the whole prompt (the runner's prompt_eval_count,
    counted as Ollama counts it), the part reused from the cache said in
    `prompt_tokens_details.cached_tokens`."""
    p, c = int(final.get("prompt_eval_count", 0)), int(final.get("eval_count", 0))
    cached = int(final.get("prompt_cached_count", 0))
    return {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class OpenAIAPI:
    def __init__(self, service: Service, ollama: Any) -> None:
        self.service, self.ollama = service, ollama

    def routes(self) -> list[Route]:
        e = handles_errors(openai=True)
        return [
            Route("/v1/chat/completions", e(self.chat), methods=["POST"]),
            Route("/v1/completions", e(self.completions), methods=["POST"]),
            Route("/v1/embeddings", e(self.embeddings), methods=["POST"]),
            Route("/v1/models", e(self.models), methods=["GET"]),
            Route("/v1/models/{model:path}", e(self.model), methods=["GET"]),
        ]

    async def _completion(
        self, body: dict[str, Any], payload: dict[str, Any], render: bool = False
    ) -> Any:
        """The runner's events for a request (`render`: the awaitable of its `_debug_info`)."""
        ref = self.service.model(body.get("model"))
        # tools, reasoning effort and response_format as Ollama's tools, think and format
        asked = {**openai_fields(body), "tools": validate.tools(body.get("tools"))}
        if has_images(payload):  # "does not support vision" for a text-only model
            asked["images"] = True
        facts = await self.service.facts(ref)
        _check_capabilities(body["model"], facts, asked)
        payload = {**payload, **fields(asked, facts)}
        spec = await self.service.load_spec(ref, _options(body))
        validate.text_fits(payload, spec.context_length())
        if render:
            return self.service.render_only(Completion(spec, None, payload))
        return self.service.completion(Completion(spec, None, payload))

    async def chat(self, request: Request) -> Response:
        body = await read_json(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequestError("[] is too short - 'messages'")
        stream, include_usage = flag(body, "stream", False), validate.include_usage(body)
        msgs = []
        for i, m in enumerate(messages):
            msg = validate.openai_message(m, i)  # images come only from content parts
            text, images = _content(m.get("content"))
            msg["content"] = text
            if images:
                msg["images"] = images
            msgs.append(msg)
        msgs = from_openai_messages(msgs)
        # the runner's pipeline adds the model's SYSTEM and MESSAGEs
        render = flag(body, "_debug_render_only", False)
        payload = {"messages": msgs, **_logprobs(body)}
        events = await self._completion(body, payload, render)
        model, cid, created = body["model"], f"chatcmpl-{secrets.randbelow(1000)}", int(time.time())
        base = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_ollama",
        }
        if render:  # Ollama's: an empty chat.completion with `_debug_info`, streamed or not
            empty = {"index": 0, "message": {"role": "", "content": ""}, "finish_reason": None}
            return JSON(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [empty],
                    "usage": _usage({}),
                    "_debug_info": await watch(request, events),
                }
            )
        first = await first_item(request, events)

        if stream:
            called = []  # whether a tool call went out: the finish reason says so

            def chunks(msg: dict[str, Any]) -> list[dict[str, Any]]:
                done = bool(msg.get("done"))
                if not has_output(msg):
                    return []
                called.append(bool(msg.get("tool_calls")))
                choice = {
                    "index": 0,
                    "delta": openai_message(msg),
                    "finish_reason": finish_reason(msg.get("done_reason", ""), any(called))
                    if done
                    else None,
                }
                if msg.get("logprobs"):
                    choice["logprobs"] = _choice_logprobs(msg)
                out = [{**base, "choices": [choice]}]
                if done and include_usage:
                    out.append({**base, "choices": [], "usage": _usage(msg)})
                return out

            return sse(first, events, chunks)
        text, final = await self._collect(request, first, events)
        return JSON(
            {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": openai_message(final),
                        "finish_reason": finish_reason(
                            final.get("done_reason", ""), bool(final.get("tool_calls"))
                        ),
                        "logprobs": _choice_logprobs(final),
                    }
                ],
                "usage": _usage(final),
            }
        )

    async def completions(self, request: Request) -> Response:
        body = await read_json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequestError("prompt must be a string")
        stream, include_usage = flag(body, "stream", False), validate.include_usage(body)
        if validate.text(body, "suffix"):
            raise BadRequestError(f'"{body.get("model")}" does not support insert')
        # a generate request: the runner's pipeline adds the model's SYSTEM and MESSAGEs
        events = await self._completion(body, {"prompt": prompt, **_logprobs(body, legacy=True)})
        model, cid, created = body["model"], f"cmpl-{secrets.randbelow(1000)}", int(time.time())
        base = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_ollama",
        }
        first = await first_item(request, events)
        if stream:

            def chunks(msg: dict[str, Any]) -> list[dict[str, Any]]:
                done = bool(msg.get("done"))
                if not done and not msg.get("text") and not msg.get("logprobs"):
                    return []
                choice = {
                    "text": msg.get("text", ""),
                    "index": 0,
                    "logprobs": _choice_logprobs(msg),
                    "finish_reason": FINISH.get(msg.get("done_reason", ""), "stop")
                    if done
                    else None,
                }
                out = [{**base, "choices": [choice]}]
                if done and include_usage:
                    out.append({**base, "choices": [], "usage": _usage(msg)})
                return out

            return sse(first, events, chunks)
        text, final = await self._collect(request, first, events)
        return JSON(
            {
                **base,
                "choices": [
                    {
                        "text": text,
                        "index": 0,
                        "logprobs": _choice_logprobs(final),
                        "finish_reason": FINISH.get(final.get("done_reason", ""), "stop"),
                    }
                ],
                "usage": _usage(final),
            }
        )

    async def _collect(
        self, request: Request, first: dict[str, Any], events: Any
    ) -> tuple[str, dict[str, Any]]:
        final, whole, logprobs = await join_answer(request, first, events)
        if logprobs:  # the final message's own: every token's, in order
            final = {**final, "logprobs": logprobs}
        # whole: text, thinking and tool calls of the whole answer
        return whole["text"], {**final, **whole}

    async def embeddings(self, request: Request) -> Response:
        body = await read_json(request)
        value = body.get("input")
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequestError("invalid input: expected a string or a list of strings")
        dims = int_field(body, "dimensions", 0, 2**31 - 1)
        encoding = body.get("encoding_format")
        if encoding not in (None, "float", "base64"):
            raise BadRequestError('encoding_format must be "float" or "base64"')
        ref = self.service.model(body.get("model"))
        spec = await self.service.load_spec(ref, None)
        for text in texts:  # each input is tokenized (and truncated) on its own
            validate.text_fits({"prompt": text}, spec.context_length())
        vectors, count, _ = await watch(request, self.service.embed(spec, None, texts))
        return JSON(
            {
                "object": "list",
                "model": body["model"],
                "data": [
                    {"object": "embedding", "embedding": encode(v, dims, encoding), "index": i}
                    for i, v in enumerate(vectors)
                ],
                "usage": {"prompt_tokens": count, "total_tokens": count},
            }
        )

    def _entry(self, name: str, modified: float) -> dict[str, Any]:
        try:
            owner = names.parse(name).namespace
        except Exception:
            owner = "library"
        return {"id": name, "object": "model", "created": int(modified), "owned_by": owner}

    async def models(self, request: Request) -> Response:
        return JSON(
            {
                "object": "list",
                "data": [
                    self._entry(m.name, m.modified.timestamp()) for m in self.service.store.list()
                ],
            }
        )

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        try:
            ref = self.service.store.resolve(name)
        except ModelNotFoundError:
            raise ModelNotFoundError(f"model '{name}' not found") from None
        store = self.service.store
        mtime = store.manifest_path(store.existing(ref.name)).stat().st_mtime
        return JSON(self._entry(name, mtime))
