"""HTTP plumbing shared by the Ollama and OpenAI routes: bodies, fields, disconnects,
streams, errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from herd import envconfig
from herd.errors import BadRequestError, HerdError
from herd.server.errors import headers_for, openai_type, status_for

log = logging.getLogger("herd.server")
T = TypeVar("T")

Handler = Callable[[Request], Awaitable[Response]]


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


def now_utc() -> str:
    """Ollama's created_at: RFC 3339 in UTC with nanosecond-ish precision and a Z."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def local_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat()


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        # "replace": a lone surrogate that reached an answer (a path, a header) is no reason
        # to fail the answer
        return dumps(content).encode("utf-8", "replace")


# Limits on a request body, stated once: what a real request needs is far below them
MAX_BODY = 32 * 2**20  # bytes of JSON (base64 images included); uploads use /api/blobs
MAX_DEPTH = 64  # nested arrays and objects; Python's own parser fails near 1,000
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a maybe-lone surrogate, in JSON text


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The whole body, refused past `limit` bytes before it is all read; ClientGone when the
    client leaves half-way."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadRequestError(f"request body too large (limit {limit} bytes)")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequestError(f"request body too large (limit {limit} bytes)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    return b"".join(chunks)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def parse_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN or Infinity (literal or beyond float range), nested at most
    MAX_DEPTH deep, no lone surrogate in any string. BadRequestError otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequestError(f"invalid JSON: body is not UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise BadRequestError(f"invalid JSON: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:
        raise BadRequestError(f"invalid JSON: {str(e)[:200]}") from None
    if _too_deep(value, MAX_DEPTH):
        raise BadRequestError(f"invalid JSON: nested deeper than {MAX_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(text):  # pairs are fine; a lone one is no Unicode text
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequestError("invalid JSON: a string holds a lone surrogate") from None
    return value


def _too_deep(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` deep (iterative: no recursion)."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object (see parse_json); BadRequestError as Ollama words it
    otherwise."""
    body = await read_body(request)
    if not body.strip():
        raise BadRequestError("missing request body")
    value = parse_json(body)
    if not isinstance(value, dict):
        raise BadRequestError("request body must be a JSON object")
    return value


def flag(body: dict[str, Any], name: str, default: bool) -> bool:
    """A JSON boolean field (absent or null: `default`); 400 for anything else."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequestError(f"field '{name}' must be true or false")
    return value


def int_field(
    body: dict[str, Any], name: str, low: int, high: int, default: int | None = None
) -> int | None:
    """A JSON integer field within [low, high] (absent or null: `default`); 400 else."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequestError(f"field '{name}' must be an integer between {low} and {high}")
    return value


def field_of(
    body: dict[str, Any], name: str, kind: type[T] | tuple[type, ...], default: Any = None
) -> Any:
    """body[name] when it has the type (None/absent gives default); else a 400."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if bool not in kinds and isinstance(value, bool) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise BadRequestError(f"field '{name}' must be of type {names}")
    return value


def keep_alive_of(body: dict[str, Any]) -> float | None:
    """Ollama's api.Duration: a number of seconds or a Go duration string; negative =
    forever (inf). None when absent (the server default applies)."""
    value = body.get("keep_alive")
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequestError("keep_alive must be a number of seconds or a duration")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int past any float: no duration at all
            raise BadRequestError("keep_alive is out of range") from None
    elif isinstance(value, str):
        try:
            seconds = (
                float(value)
                if value.strip().lstrip("+-").replace(".", "", 1).isdigit()
                else envconfig.parse_duration(value)
            )
        except ValueError as e:
            raise BadRequestError(str(e)) from None
    else:
        raise BadRequestError("keep_alive must be a number of seconds or a duration")
    return math.inf if seconds < 0 else seconds


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def watch(request: Request, awaitable: Awaitable[T]) -> T:
    """Await while watching the connection: a client that leaves cancels the work."""
    task = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        gone.cancel()
        raise
    if task in done:
        gone.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientGone()


async def first_item(request: Request, items: AsyncIterator[T]) -> T:
    """The first item, awaited under `watch`, so that errors before any output get their
    own status code (as Ollama does) instead of a 200 with an error line."""
    try:
        return await watch(request, anext(items))
    except BaseException:
        await close(items)
        raise


async def close(items: AsyncIterator[Any]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await aclose()


def ndjson(
    first: dict[str, Any],
    rest: AsyncIterator[dict[str, Any]],
    shape: Callable[[dict[str, Any]], dict[str, Any] | None],
) -> StreamingResponse:
    """One JSON object per line; an error after the first line is a final {"error"} line."""

    async def lines() -> AsyncIterator[str]:
        try:
            for item in (first,):
                shaped = shape(item)
                if shaped is not None:
                    yield dumps(shaped) + "\n"
            async for item in rest:
                shaped = shape(item)
                if shaped is not None:
                    yield dumps(shaped) + "\n"
        except HerdError as e:
            yield dumps({"error": str(e)}) + "\n"
        finally:
            await close(rest)

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def sse(
    first: dict[str, Any],
    rest: AsyncIterator[dict[str, Any]],
    shape: Callable[[dict[str, Any]], list[dict[str, Any]]],
) -> StreamingResponse:
    """OpenAI's server-sent events: `data: {...}` blocks, then `data: [DONE]`."""

    async def events() -> AsyncIterator[str]:
        try:
            for chunk in shape(first):
                yield f"data: {dumps(chunk)}\n\n"
            async for item in rest:
                for chunk in shape(item):
                    yield f"data: {dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        except HerdError as e:
            status = status_for(e)
            error = {"message": str(e), "type": openai_type(status), "param": None, "code": None}
            yield f"data: {dumps({'error': error})}\n\n"
        finally:
            await close(rest)

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def error_response(e: BaseException, openai: bool = False) -> Response:
    status = status_for(e)
    if status >= 500 and not isinstance(e, HerdError):
        log.exception("request failed", exc_info=e)
    message = str(e) or type(e).__name__
    if len(message) > 4096:  # errors may quote the request; never a whole request back
        message = message[:4093] + "..."
    if openai:
        return JSON(
            {
                "error": {
                    "message": message,
                    "type": openai_type(status),
                    "param": None,
                    "code": None,
                }
            },
            status_code=status,
            headers=headers_for(e),
        )
    return JSON({"error": message}, status_code=status, headers=headers_for(e))


def handles_errors(
    openai: bool = False, respond: Callable[[Exception], Response] | None = None
) -> Callable[[Handler], Handler]:
    """Turn a handler's exceptions into Ollama's (or OpenAI's) JSON error responses, or
    into what `respond` makes of them (another API's error shape)."""

    def wrap(handler: Handler) -> Handler:
        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except (ClientGone, ClientDisconnect):
                return Response(status_code=499)
            except Exception as e:
                return respond(e) if respond is not None else error_response(e, openai)

        run.__name__ = handler.__name__
        return run

    return wrap
