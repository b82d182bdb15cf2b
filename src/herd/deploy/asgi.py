"""One HTTP request through an ASGI app in memory, its response streamed back in pieces.

The ingress deployment forwards each request to a replica as a `Forwarded` (picklable:
Ray carries it across nodes), and the replica runs it through herd's own server app with
`stream`: first a `Head` (status and headers), then the body's chunks as the app sends
them, so a streamed answer reaches the client token by token. httpx's ASGI transport
would do the same but buffers the whole body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message

log = logging.getLogger("herd.deploy")

Headers = list[tuple[bytes, bytes]]


@dataclass
class Forwarded:
    """An HTTP request as the ingress read it."""

    method: str
    path: str
    query: bytes = b""
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] = ("127.0.0.1", 0)


@dataclass
class Head:
    status: int
    headers: Headers


async def stream(app: ASGIApp, req: Forwarded) -> AsyncIterator[Head | bytes]:
    """The app's response to `req`: a Head, then body chunks. Closing the iterator early
    (the client went away) tells the app the client disconnected, as a server would."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": req.method,
        "scheme": "http",
        "path": req.path,
        "raw_path": req.path.encode(),
        "root_path": "",
        "query_string": req.query,
        "headers": req.headers,
        "client": req.client,
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    queue: asyncio.Queue[Message | None] = asyncio.Queue()
    finished = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await finished.wait()  # a disconnect only once the response is over or abandoned
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await queue.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            queue.put_nowait(None)

    task = asyncio.create_task(run())
    complete = False
    try:
        while (message := await queue.get()) is not None:
            if message["type"] == "http.response.start":
                yield Head(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    complete = True
                    break
    finally:
        finished.set()
        if not complete:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([task])
    if not complete and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
    if complete and not task.cancelled() and task.exception() is not None:
        # Starlette re-raises after it answered 500: the client has its answer already
        log.debug("after a complete response: %r", task.exception())
