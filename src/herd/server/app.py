"""The ASGI app of `herd serve`: routes of both APIs, `/metrics`, CORS, host check, API key.

Requests pass, outermost first: CORS (Ollama's default origins plus HERD_ORIGINS) ->
host check (on a loopback bind, only local host names, against DNS rebinding) -> API key
(HERD_API_KEY: every route but `/`) -> the route.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from herd import envconfig
from herd.errors import UnauthorizedError
from herd.server.anthropic_api import AnthropicAPI
from herd.server.anthropic_stream import error_body
from herd.server.errors import openai_type
from herd.server.http import JSON, error_response
from herd.server.metrics import Metrics
from herd.server.ollama_api import OllamaAPI
from herd.server.openai_api import OpenAIAPI
from herd.server.rerank_api import RerankAPI
from herd.server.responses_api import ResponsesAPI
from herd.server.scheduler import Scheduler
from herd.server.service import Service
from herd.store import Store

log = logging.getLogger("herd.server")

DEFAULT_ORIGINS = [
    f"{scheme}://{host}{port}"
    for host in ("localhost", "127.0.0.1", "0.0.0.0")
    for scheme in ("http", "https")
    for port in ("", ":*")
] + ["app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*"]


@dataclass
class Settings:
    """Everything the server takes from the environment, read once at start."""

    store: Store
    host: envconfig.HostURL
    api_key: str = ""
    origins: tuple[str, ...] = ()
    max_loaded: int = 3
    max_queue: int = 512
    keep_alive: float = 300.0
    load_timeout: float = 300.0
    memory_limit: int | None = None
    num_parallel: int = 4
    backend: str | None = None
    kv_cache_type: str = "f16"

    @classmethod
    def from_env(cls) -> Settings:
        backend = envconfig.backend()
        return cls(
            Store(),
            envconfig.host(),
            envconfig.api_key(),
            tuple(envconfig.origins()),
            envconfig.max_loaded_models(),
            envconfig.max_queue(),
            envconfig.keep_alive(),
            envconfig.load_timeout(),
            envconfig.memory_limit(),
            envconfig.num_parallel(),
            None if backend == "auto" else backend,
            envconfig.kv_cache_type(),
        )


def origin_regex(origins: list[str]) -> str:
    """Ollama's origin patterns (`*` matches anything) as one regular expression."""
    if "*" in origins:
        return ".*"
    return "|".join(".*".join(re.escape(p) for p in o.split("*")) for o in origins)


class APIKey:
    """HERD_API_KEY: `Authorization: Bearer <key>` on every route but `/`."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key
        self.expected = key.encode("utf-8")  # compared as bytes: any header is comparable

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.key
            or scope["path"] == "/"
            or scope["method"] == "OPTIONS"
        ):
            return await self.app(scope, receive, send)
        # raw header bytes, compared in constant time: a non-ASCII or malformed header is a
        # wrong key (401), never an error (compare_digest refuses non-ASCII str)
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected):
            return await self.app(scope, receive, send)
        if scope["path"].startswith("/v1/messages"):  # the anthropic SDK sends `x-api-key`
            key = dict(scope["headers"]).get(b"x-api-key", b"")
            if key and hmac.compare_digest(key.strip(), self.expected):
                return await self.app(scope, receive, send)
            body = error_body(401, "unauthorized")
            return await JSON(body, status_code=401)(scope, receive, send)
        response = error_response(
            UnauthorizedError("unauthorized"), openai=scope["path"].startswith("/v1/")
        )
        await response(scope, receive, send)


class HostCheck:
    """On a loopback bind, refuse Host headers that are not local (DNS rebinding)."""

    def __init__(self, app: ASGIApp, bind_host: str) -> None:
        self.app = app
        self.active = _is_loopback(bind_host)
        self.hostname = socket.gethostname().lower()

    def allowed(self, host: str) -> bool:
        name = host.lower()
        if name.startswith("["):
            name = name[1:].partition("]")[0]
        elif name.count(":") == 1:
            name = name.partition(":")[0]
        if not name or name in ("localhost", self.hostname):
            return True
        if name.endswith((".localhost", ".local", ".internal")):
            return True
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return False
        return ip.is_loopback or ip.is_private or ip.is_unspecified

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.active:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not self.allowed(host):  # Ollama's 403; a message in the route's shape too
                message = (
                    f"forbidden: Host {host[:100]!r} is not a local name, and this server "
                    "is bound to a loopback address (DNS rebinding protection)"
                )
                response = error_for_path(scope["path"], 403, message)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error_for_path(path: str, status: int, message: str) -> Response:
    """An error outside any route's handler, in the shape of the API `path` belongs to."""
    if path.startswith("/v1/messages"):  # Anthropic's shape on its routes
        return JSON(error_body(status, message), status_code=status)
    if path.startswith("/v1/"):  # OpenAI's error shape on its routes
        error = {"message": message, "type": openai_type(status), "param": None, "code": None}
        return JSON({"error": error}, status_code=status)
    return JSON({"error": message}, status_code=status)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    scheduler = Scheduler(
        max_loaded=settings.max_loaded,
        max_queue=settings.max_queue,
        keep_alive=settings.keep_alive,
        load_timeout=settings.load_timeout,
        memory_limit=settings.memory_limit,
        num_parallel=settings.num_parallel,
        backend=settings.backend,
        kv_cache_type=settings.kv_cache_type,
    )
    metrics = Metrics()
    service = Service(settings.store, scheduler, metrics)
    ollama = OllamaAPI(service)
    openai = OpenAIAPI(service, ollama)

    async def metrics_route(request: Request) -> Response:
        return PlainTextResponse(
            metrics.render(scheduler.gauges), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = str(getattr(exc, "detail", "") or "not found")
        return error_for_path(request.url.path, status, message)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log.info(
            "herd %s listening on %s:%d (models: %s)",
            _version(),
            settings.host.bind_host,
            settings.host.port,
            settings.store.root,
        )
        try:
            yield
        finally:
            await scheduler.shutdown()

    routes = [
        *ollama.routes(),
        *openai.routes(),
        *AnthropicAPI(service).routes(),
        *ResponsesAPI(service).routes(),
        *RerankAPI(service).routes(),
        Route("/metrics", metrics_route, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(
                CORSMiddleware,  # type: ignore[arg-type]
                allow_origin_regex=origin_regex(DEFAULT_ORIGINS + list(settings.origins)),
                allow_methods=["*"],
                allow_headers=["*"],
            ),
            Middleware(HostCheck, bind_host=settings.host.bind_host),  # type: ignore[arg-type]
            Middleware(APIKey, key=settings.api_key),  # type: ignore[arg-type]
        ],
        exception_handlers={404: not_found, 405: not_found},
        lifespan=lifespan,
    )
    app.state.scheduler, app.state.service = scheduler, service
    return app


def _version() -> str:
    import herd

    return herd.__version__


def serve(settings: Settings | None = None) -> None:
    """Run the server in the foreground until interrupted (unloads every model on exit)."""
    import uvicorn

    settings = settings or Settings.from_env()
    logging.basicConfig(
        level=logging.DEBUG if envconfig.debug() else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host.bind_host,
        port=settings.host.port,
        log_level="debug" if envconfig.debug() else "warning",
        access_log=False,
        timeout_graceful_shutdown=2,
    )
