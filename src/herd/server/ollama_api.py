"""Ollama's API (`/api/*`): the fields, defaults, status codes and NDJSON streams
Ollama's server has."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import herd
from herd.errors import BadRequestError, DownloadError, HerdError
from herd.server import store_api, validate
from herd.server.http import (
    JSON,
    field_of,
    first_item,
    flag,
    handles_errors,
    int_field,
    keep_alive_of,
    local_time,
    ndjson,
    now_utc,
    read_json,
    watch,
)
from herd.server.images import check_images, has_images
from herd.server.outputs import (
    check_format,
    check_think,
    fields,
    has_output,
    join_answer,
    ollama_message,
)
from herd.server.scheduler import FOREVER_S, Runner
from herd.server.service import Completion, Service
from herd.store import ModelRef
from herd.store.facts import ShowFacts, render_modelfile, render_parameters
from herd.store.layout import parse_digest

log = logging.getLogger("herd.server")

COUNTERS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",  # the whole prompt, cached part included, as Ollama counts it
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
    "prompt_cached_count",  # herd's: the prompt's part reused from the cache
)
SPECULATION = ("draft_proposed", "draft_accepted")  # herd's: only when it speculated

# The Ollama release whose API herd implements: the reference's HEAD (fb3076099) is the
# v0.33.0-rc2 tag. Tools that gate features on Ollama's version read this.
OLLAMA_VERSION = "0.33.0-rc2"


def details(ref_config: dict[str, Any], facts: ShowFacts | None = None) -> dict[str, Any]:
    """Ollama's ModelDetails, from the manifest's config blob (and the GGUF when at hand)."""
    family = ref_config.get("model_family") or (facts.gguf.architecture if facts else "")
    return {
        "parent_model": "",
        "format": ref_config.get("model_format") or "gguf",
        "family": family,
        "families": ref_config.get("model_families") or ([family] if family else None),
        "parameter_size": ref_config.get("model_type")
        or (facts.gguf.parameter_size if facts else ""),
        "quantization_level": ref_config.get("file_type")
        or (facts.gguf.file_type if facts else ""),
    }


def _name(body: dict[str, Any]) -> Any:
    return body.get("model") or body.get("name")


def _check_fields(body: dict[str, Any]) -> None:
    """The generate/chat fields every request may carry, typed (400s otherwise)."""
    for name in ("stream", "raw", "shift", "truncate", "logprobs"):
        flag(body, name, False)
    for name in ("prompt", "suffix", "system", "template"):
        validate.text(body, name)
    validate.tools(body.get("tools"))


def _check_capabilities(name: str, facts: ShowFacts, body: dict[str, Any]) -> None:
    """400s for what the model (or herd) cannot do, in Ollama's words."""
    caps = facts.capabilities
    think = body.get("think")
    check_think(think)
    if think not in (None, False) and "thinking" not in caps:
        raise BadRequestError(f'"{name}" does not support thinking')
    if body.get("tools") and "tools" not in caps:
        raise BadRequestError(f'"{name}" does not support tools')
    if body.get("suffix") and "insert" not in caps:
        raise BadRequestError(f'"{name}" does not support insert')
    if has_images(body) and "vision" not in caps:
        raise BadRequestError(f'"{name}" does not support vision')
    check_format(body.get("format"))
    top = body.get("top_logprobs")
    if top is not None and (
        isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20
    ):
        raise BadRequestError("top_logprobs must be between 0 and 20")


class OllamaAPI:
    def __init__(self, service: Service) -> None:
        self.service = service

    def routes(self) -> list[Route]:
        e = handles_errors()
        return [
            Route("/", self.root, methods=["GET", "HEAD"]),
            Route("/api/version", e(self.version), methods=["GET", "HEAD"]),
            Route("/api/generate", e(self.generate), methods=["POST"]),
            Route("/api/chat", e(self.chat), methods=["POST"]),
            Route("/api/embed", e(self.embed), methods=["POST"]),
            Route("/api/embeddings", e(self.embeddings), methods=["POST"]),
            Route("/api/tags", e(self.tags), methods=["GET", "HEAD"]),
            Route("/api/show", e(self.show), methods=["POST"]),
            Route("/api/ps", e(self.ps), methods=["GET"]),
            Route("/api/copy", e(self.copy), methods=["POST"]),
            Route("/api/delete", e(self.delete), methods=["DELETE"]),
            Route("/api/pull", e(self.pull), methods=["POST"]),
            Route("/api/push", e(self.push), methods=["POST"]),
            Route("/api/create", e(self.create), methods=["POST"]),
            Route("/api/blobs/{digest}", e(self.blob), methods=["HEAD", "POST"]),
        ]

    async def root(self, request: Request) -> Response:
        return Response("Ollama is running", media_type="text/plain")

    async def version(self, request: Request) -> Response:
        return JSON({"version": OLLAMA_VERSION, "herd_version": herd.__version__})

    # ---- generation
    async def _prepare(
        self, body: dict[str, Any]
    ) -> tuple[str, ModelRef, ShowFacts, Any, float | None]:
        name = _name(body)
        ref = self.service.model(name)
        _check_fields(body)
        facts = await self.service.facts(ref)
        _check_capabilities(name, facts, body)
        keep_alive = keep_alive_of(body)
        spec = await self.service.load_spec(ref, body.get("options"))
        return name, ref, facts, spec, keep_alive

    async def _load_or_unload(
        self, request: Request, spec: Any, keep_alive: float | None, out: dict[str, Any]
    ) -> Response:
        if keep_alive == 0:
            await self.service.scheduler.expire(spec.name)
            return JSON({**out, "done": True, "done_reason": "unload"})
        await watch(request, self.service.scheduler.load_only(spec, keep_alive))
        return JSON({**out, "done": True, "done_reason": "load"})

    async def generate(self, request: Request) -> Response:
        body = await read_json(request)
        name, ref, facts, spec, keep_alive = await self._prepare(body)
        prompt = field_of(body, "prompt", str, "")
        system = field_of(body, "system", str)
        template = field_of(body, "template", str)
        if template:
            await asyncio.to_thread(validate.go_template, template)
        context = validate.context(body.get("context"))
        raw = flag(body, "raw", False)
        if raw and (template or system or context):
            raise BadRequestError("raw mode does not support template, system, or context")
        if not prompt and not body.get("images"):
            return await self._load_or_unload(
                request, spec, keep_alive, {"model": name, "created_at": now_utc(), "response": ""}
            )
        # the runner's pipeline adds the model's SYSTEM and MESSAGEs and renders the template
        payload: dict[str, Any] = {"prompt": prompt, "raw": raw, "want_context": not raw}
        if body.get("images"):
            payload["images"] = check_images(body["images"])  # base64, as Ollama's runner
        if not raw:
            payload.update(system=system, context=context, template=template)
        payload.update(
            shift=flag(body, "shift", True),
            truncate=flag(body, "truncate", True),
            **logprob_fields(body),
            **fields(body, facts, tools=False),
        )
        validate.text_fits(payload, spec.context_length())
        if flag(body, "_debug_render_only", False):
            c = Completion(spec, keep_alive, payload)
            return await self._render_only(request, c, name, "response")
        events = self.service.completion(Completion(spec, keep_alive, payload))

        def shape(msg: dict[str, Any]) -> dict[str, Any]:
            out = {"model": name, "created_at": now_utc(), "response": msg.get("text", "")}
            if msg.get("thinking"):
                out["thinking"] = msg["thinking"]
            out["done"] = bool(msg.get("done"))
            if msg.get("logprobs"):
                out["logprobs"] = msg["logprobs"]
            if msg.get("done"):
                out["done_reason"] = msg.get("done_reason", "stop")
                if "context" in msg:
                    out["context"] = msg["context"]
                out.update((k, msg.get(k, 0)) for k in COUNTERS)
                out.update((k, msg[k]) for k in SPECULATION if k in msg)
            return out

        return await self._respond(request, events, shape, body, "response")

    async def chat(self, request: Request) -> Response:
        body = await read_json(request)
        name, ref, facts, spec, keep_alive = await self._prepare(body)
        messages = field_of(body, "messages", list, [])
        if not messages:
            return await self._load_or_unload(
                request,
                spec,
                keep_alive,
                {
                    "model": name,
                    "created_at": now_utc(),
                    "message": {"role": "assistant", "content": ""},
                },
            )
        payload = {
            # the runner adds SYSTEM and MESSAGEs; images stay base64 for the pipe
            "messages": [validate.ollama_message(m, i) for i, m in enumerate(messages)],
            "shift": flag(body, "shift", True),
            "truncate": flag(body, "truncate", True),
            **logprob_fields(body),
            **fields(body, facts),
        }
        validate.text_fits(payload, spec.context_length())
        if flag(body, "_debug_render_only", False):
            c = Completion(spec, keep_alive, payload)
            return await self._render_only(request, c, name, "message")
        events = self.service.completion(Completion(spec, keep_alive, payload))

        def shape(msg: dict[str, Any]) -> dict[str, Any]:
            out = {
                "model": name,
                "created_at": now_utc(),
                "message": ollama_message(msg),
                "done": bool(msg.get("done")),
            }
            if msg.get("logprobs"):
                out["logprobs"] = msg["logprobs"]
            if msg.get("done"):
                out["done_reason"] = msg.get("done_reason", "stop")
                out.update((k, msg.get(k, 0)) for k in COUNTERS)
                out.update((k, msg[k]) for k in SPECULATION if k in msg)
            return out

        return await self._respond(request, events, shape, body, "message")

    async def _render_only(self, request: Request, c: Completion, name: str, key: str) -> Response:
        """Ollama's `_debug_render_only`: one object (streamed or not), nothing generated."""
        info = await watch(request, self.service.render_only(c))
        empty: Any = {"role": "", "content": ""} if key == "message" else ""
        out = {"model": name, "created_at": now_utc(), key: empty, "done": False}
        return JSON({**out, "_debug_info": info})

    async def _respond(
        self, request: Request, events: Any, shape: Any, body: dict[str, Any], key: str
    ) -> Response:
        first = await first_item(request, events)
        if flag(body, "stream", True):
            return _ndjson_skip_empty(first, events, shape)
        last, whole, logprobs = await join_answer(request, first, events)
        final = shape(last)
        if key == "message":
            final["message"] = ollama_message(whole)
        else:
            final["response"] = whole["text"]
            if whole.get("thinking"):
                final["thinking"] = whole["thinking"]
        if logprobs:
            final["logprobs"] = logprobs
        return JSON(final)

    # ---- embeddings
    async def embed(self, request: Request) -> Response:
        body = await read_json(request)
        ref = self.service.model(_name(body))
        value = body.get("input")
        texts = [value] if isinstance(value, str) else value if value is not None else []
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise BadRequestError("input must be a string or a list of strings")
        dimensions = int_field(body, "dimensions", 0, 2**31 - 1)
        truncate = flag(body, "truncate", True)
        keep_alive = keep_alive_of(body)
        spec = await self.service.load_spec(ref, body.get("options"))
        t0 = time.perf_counter_ns()
        if not texts:
            await watch(request, self.service.scheduler.load_only(spec, keep_alive))
            return JSON({"model": _name(body), "embeddings": []})
        for text in texts:  # each input is tokenized (and truncated) on its own
            validate.text_fits({"prompt": text}, spec.context_length())
        vectors, count, load_ns = await watch(
            request,
            self.service.embed(spec, keep_alive, texts, truncate),
        )
        return JSON(
            {
                "model": _name(body),
                "embeddings": [normalize(v, dimensions) for v in vectors],
                "total_duration": time.perf_counter_ns() - t0,
                "load_duration": load_ns,
                "prompt_eval_count": count,
            }
        )

    async def embeddings(self, request: Request) -> Response:
        body = await read_json(request)
        ref = self.service.model(_name(body))
        prompt = field_of(body, "prompt", str, "")
        keep_alive = keep_alive_of(body)
        spec = await self.service.load_spec(ref, body.get("options"))
        if not prompt:
            await watch(request, self.service.scheduler.load_only(spec, keep_alive))
            return JSON({"embedding": []})
        validate.text_fits({"prompt": prompt}, spec.context_length())
        vectors, _, _ = await watch(request, self.service.embed(spec, keep_alive, [prompt]))
        return JSON({"embedding": vectors[0] if vectors else []})

    # ---- models
    async def tags(self, request: Request) -> Response:
        models = []
        for m in self.service.store.list():
            models.append(
                {
                    "name": m.name,
                    "model": m.name,
                    "modified_at": m.modified.isoformat(),
                    "size": m.size,
                    "digest": m.digest,
                    "details": details(m.details),
                }
            )
        return JSON({"models": models})

    async def show(self, request: Request) -> Response:
        body = await read_json(request)
        ref = self.service.model(_name(body))
        facts = await self.service.facts(ref)
        verbose = flag(body, "verbose", False)
        store = self.service.store
        mtime = store.manifest_path(store.existing(ref.name)).stat().st_mtime
        info = {
            k: _jsonable(v) if verbose or not _long(v) else None
            for k, v in sorted(facts.gguf.kv.items())
        }
        info["general.parameter_count"] = facts.gguf.parameter_count
        out: dict[str, Any] = {
            "license": "\n".join(ref.license),
            "modelfile": render_modelfile(facts),
            "parameters": render_parameters(ref.params),
            "template": facts.template or "",
            "details": details(ref.config, facts),
            "model_info": info,
            "capabilities": facts.capabilities,
            "modified_at": local_time(mtime),
        }
        projector = facts.projector_info
        if projector is not None:
            out["projector_info"] = {
                k: _jsonable(v) if verbose or not _long(v) else None
                for k, v in sorted(projector.items())
            }
        if ref.system:
            out["system"] = ref.system
        if ref.messages:
            out["messages"] = ref.messages
        if verbose:
            out["tensors"] = [
                {"name": t.name, "type": t.type, "shape": [int(x) for x in reversed(t.shape)]}
                for t in facts.tensors
            ]
        return JSON(out)

    async def ps(self, request: Request) -> Response:
        models = []
        for r in self.service.scheduler.loaded():
            models.append(ps_entry(r, await self.service.facts(r.spec.ref)))
        return JSON({"models": models})

    async def copy(self, request: Request) -> Response:
        body = await read_json(request)
        src, dst = body.get("source"), body.get("destination")
        if not isinstance(src, str) or not src or not isinstance(dst, str) or not dst:
            raise BadRequestError("source and destination are required")
        self.service.model(src)
        self.service.store.copy(src, dst)
        return Response(status_code=200)

    async def delete(self, request: Request) -> Response:
        body = await read_json(request)
        ref = self.service.model(_name(body))
        self.service.store.delete(ref.name)
        return Response(status_code=200)

    async def pull(self, request: Request) -> Response:
        return await store_api.pull_model(request, await read_json(request), self.service.store)

    async def push(self, request: Request) -> Response:
        return await store_api.push_model(request, await read_json(request), self.service.store)

    async def create(self, request: Request) -> Response:
        body = await read_json(request)
        return await store_api.create_model(request, body, self.service.store)

    async def blob(self, request: Request) -> Response:
        digest = request.path_params["digest"]
        try:
            parse_digest(digest)
        except HerdError as e:
            raise BadRequestError(str(e)) from None
        store = self.service.store
        if request.method == "HEAD":
            return Response(status_code=200 if store.has_blob(digest) else 404)
        if store.has_blob(digest):
            return Response(status_code=200)
        writer = store.blob_writer(digest)
        try:
            async for chunk in request.stream():
                writer.write(chunk)
            writer.commit()
        except DownloadError as e:
            raise BadRequestError(str(e)) from None
        finally:
            writer.discard()
        return Response(status_code=201)


def _ndjson_skip_empty(first: dict[str, Any], events: Any, shape: Any) -> Response:
    # the runner may send empty text pieces; Ollama never streams an empty non-final line
    def shaped(msg: dict[str, Any]) -> dict[str, Any] | None:
        return shape(msg) if has_output(msg) else None

    return ndjson(first, events, shaped)


def logprob_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The runner's logprobs request (validated by _check_capabilities): token
    log-probabilities, computed over the raw logits, with `top_logprobs` alternatives."""
    if not flag(body, "logprobs", False):
        return {}
    return {"logprobs": True, "top_logprobs": int(body.get("top_logprobs") or 0)}


def normalize(v: list[float], dimensions: int | None) -> list[float]:
    """L2-normalized, truncated to `dimensions` first (then renormalized), like Ollama."""
    if dimensions and 0 < dimensions < len(v):
        v = v[:dimensions]
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v] if norm > 0 else list(v)


def ps_entry(r: Runner, facts: ShowFacts) -> dict[str, Any]:
    expires = datetime.fromtimestamp(min(r.expires_at, time.time() + FOREVER_S), UTC)
    return {
        "name": r.name,
        "model": r.name,
        "size": r.estimate,
        "digest": r.spec.ref.digest,
        "details": details(r.spec.ref.config, facts),
        "expires_at": expires.astimezone().isoformat(),
        # a model on a GPU counts whole (ggml's partial offload is not apportioned yet)
        "size_vram": r.estimate if r.processor.get("device") == "gpu" else 0,
        "context_length": r.spec.context_length(),
        # herd's own fields (Ollama's clients ignore them): the engine and its device
        **{k: r.processor[k] for k in ("backend", "device_name") if k in r.processor},
    }


def _long(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) > 1024


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
