"""A runner child process: one loaded model, served to `herd serve` over a pipe.

`herd serve` never computes: for each loaded model it starts `python -m herd.runner.serve`
and talks to it in JSON lines, one object per line, over the child's stdin and stdout
(the child's own prints and logs go to stderr). Requests carry an `id` chosen by the
server; every reply carries the id it answers.

    server -> runner                                      runner -> server
    {"op": "load", "path", "projector", "name",           {"op": "ready", "parallel",
     "template", "system", "params", "backend",             "num_ctx", "kv_usage",
     "options", "parallel", "draft"}                       "load_duration", "backend",
                                                            "device", "device_name"}
                                                          | {"op": "error", "error", "type"}
    {"op": "completion", "id", "messages" | "prompt",     {"id", "text", "logprobs"?}  (0+)
     "images", "context", "template", "options", "shift", {"id", "done": true, "done_reason",
     "truncate", "want_context", "logprobs",                "prompt_eval_count",
     "top_logprobs", "tools", "think", "format",            "prompt_cached_count", ...,
     "parser", "render_only"}                               "context", "kv_usage",
                                                            "kv_cache"}
                                                          render_only: {"id", "done": true,
                                                            "rendered", "image_count"}
    {"op": "embed", "id", "input", "truncate"}            {"id", "embeddings",
                                                            "prompt_eval_count"}
    {"op": "rerank", "id", "query", "documents",          {"id", "results": [{"index",
     "top_n"}                                               "relevance_score"}] (best
                                                            first), "prompt_eval_count"}
    {"op": "cancel", "id"}                                (the completion ends early)
                                                          {"op": "alive"} every second
    end of stdin                                          the process exits

An error answers `{"id", "error", "type"}` (`type` is the HerdError class name; the server
rebuilds the error with `herd.errors.error_from_name`). `options` are complete (the server
merged defaults < model parameters < request), by Ollama's names. `projector` is the
path of the model's projector file (llama.cpp's mmproj layout), or null. Images are
base64, as Ollama's API sends them: generate's in `images`, a chat message's in its
`images`. The pipe ties the child's life to the server's: when the server dies, stdin
closes and the runner exits; when the runner dies, stdout closes and the server fails the
requests in flight. A watchdog (`herd.runner.faults.Watchdog`) sends the `alive` heartbeat
while the engine can serve and ends the process when it cannot (its batch thread died, or
one step is stuck); the server kills a runner it has not heard from for
`herd.server.runner_process.SILENCE_S` while requests wait on it. No request can end the
process: a request's error (a token id out of the vocabulary, non-finite logits, a bug)
is that request's error reply.

A completion goes through the request pipeline (`herd.runner.pipeline`, as the library's
do) and then to an `Engine`: `submit(tokens, options, cancelled)` yields the runner's
`Event`s and stops within a batch step once `cancelled` is set (client gone).
`BatchEngine` puts `herd.runner.Runner` (continuous batching over `parallel` slots of one
shared KV cache) behind it; another engine slots in by implementing the same members.

With `tools` or `think`, pieces carry `thinking` and `tool_calls` beside `text`, which is
then only the content. `format` ("json" or a JSON schema) constrains decoding. `parser`
is the model's PARSER (Modelfile), which replaces the formats the template implies.
`render_only` (Ollama's `_debug_render_only`) answers the rendered prompt and generates
nothing. The final reply's `prompt_eval_count` is the whole prompt, as Ollama counts it;
`prompt_cached_count` is the part reused from the slot's cache.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from herd import envconfig
from herd.errors import BadRequestError, HerdError, ImageError, RunnerError
from herd.ml import BackendOptions
from herd.models.imageproc import ImageLimits
from herd.options import Options
from herd.runner.engine import Runner
from herd.runner.faults import Watchdog, request_error
from herd.runner.images import Image
from herd.runner.loaded import Loaded, Source
from herd.runner.pipeline import Prepared, Request, finish, prepare, prepare_embed
from herd.runner.rerank import prepare_rerank, ranked, scores_of
from herd.runner.sequence import Event
from herd.sample.grammar import Grammar

log = logging.getLogger("herd.runner")


class Engine(Protocol):
    """What the runner process needs from the compute side."""

    parallel: int  # sequences it runs at once; the server queues the rest
    num_ctx: int  # context length of each sequence

    def submit(
        self,
        tokens: list[int],
        options: Options,
        cancelled: threading.Event,
        *,
        shift: bool = True,
        logprobs: int = -1,
        grammar: Grammar | None = None,
        images: Sequence[tuple[int, Image]] = (),
        stream: Callable[[Event], None] | None = None,
    ) -> Iterator[Event]:
        """Generate after `tokens` (with `images` placed in them). Ends with a `done`
        Event; returns early (without one) once `cancelled` is set. `shift=False`: stop
        with done_reason "length" when the context is full instead of shifting it;
        `logprobs` >= 0: Events carry each token's log-probability and that many top
        alternatives; `grammar` constrains the tokens (structured outputs); `stream`
        takes the streamed pieces as they come (`Runner.generate`), and the iterator
        yields only the rest."""
        ...

    def kv_usage(self) -> float:
        """Fraction (0..1) of the KV cache cells in use."""
        ...


class BatchEngine:
    """`herd.runner.Runner` in its threaded mode: `parallel` sequences in slots of one
    shared KV cache, continuously batched, each slot keeping its prefix for the next
    request."""

    def __init__(self, runner: Runner, parallel: int) -> None:
        self.runner, self.parallel, self.num_ctx = runner, parallel, runner.num_ctx
        # a slot frees one step after its sequence ends or is cancelled: wait for it here
        # rather than letting a request that arrives in between fail to claim one
        self.free = threading.Semaphore(self.parallel)
        self.runner.start()

    def submit(
        self,
        tokens: list[int],
        options: Options,
        cancelled: threading.Event,
        *,
        shift: bool = True,
        logprobs: int = -1,
        grammar: Grammar | None = None,
        images: Sequence[tuple[int, Image]] = (),
        stream: Callable[[Event], None] | None = None,
    ) -> Iterator[Event]:
        while not self.free.acquire(timeout=0.05):
            if cancelled.is_set():
                return
            if self.runner.failure is not None:  # no slot will ever be freed
                raise RunnerError(f"the model's engine stopped: {self.runner.failure!r}")
        try:
            # ends with the done Event, which the runner sends (also for a cancelled
            # sequence) once the slot is free again
            yield from self.runner.submit(
                tokens,
                options,
                cancelled,
                shift=shift,
                logprobs=logprobs,
                grammar=grammar,
                images=images,
                stream=stream,
            )
        finally:
            self.free.release()

    def kv_usage(self) -> float:
        return self.runner.kv_usage()


def request_of(req: dict[str, Any]) -> Request:
    """The pipeline's request for a completion message (images decoded from base64)."""
    messages = req.get("messages")
    if messages is not None:
        messages = [
            {**m, "images": [_bytes(i) for i in m["images"]]} if m.get("images") else m
            for m in messages
        ]
    return Request(
        prompt=str(req.get("prompt") or ""),
        messages=messages,
        images=[_bytes(i) for i in req.get("images") or []],
        system=req.get("system"),
        raw=bool(req.get("raw")),
        context=_ids(req.get("context")),
        template=req.get("template"),
        tools=req.get("tools"),
        think=req.get("think"),
        format=req.get("format"),
        options=req.get("options"),
        truncate=bool(req.get("truncate", True)),
        want_context=bool(req.get("want_context")),
        parser=str(req.get("parser") or ""),
    )


def _ids(value: Any) -> list[int]:
    """A request's token ids (`context`): a list of integers (the vocabulary is checked in
    the pipeline)."""
    if not value:
        return []
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        raise BadRequestError("context must be a list of integer token ids")
    return value


def _bytes(image: str) -> bytes:
    try:
        return base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise ImageError(f"image: invalid base64 data: {e}") from None


def _logprobs(req: dict[str, Any]) -> int:
    """Top alternatives per token the request wants (-1: no logprobs at all)."""
    if not req.get("logprobs"):
        return -1
    return max(0, min(int(req.get("top_logprobs") or 0), 20))


def _piece(rid: int, prepared: Prepared, event: Event) -> dict[str, Any]:
    """A streamed piece: its text split into content, thinking and tool calls."""
    parsed = prepared.parse(event)
    msg: dict[str, Any] = {"id": rid, "text": parsed.content}
    if parsed.thinking:
        msg["thinking"] = parsed.thinking
    if parsed.tool_calls:
        msg["tool_calls"] = parsed.tool_calls
    if event.logprobs:
        msg["logprobs"] = list(event.logprobs)
    return msg


# ---- the process ----------------------------------------------------------------------------
class Child:
    def __init__(self, out: IO[str], exit: Callable[[int], None] = os._exit) -> None:
        self.out, self.exit = out, exit  # exit: how the watchdog ends the process
        self.write_lock = threading.Lock()
        self.cancels: dict[int, threading.Event] = {}
        self.loaded: Loaded | None = None
        self.engine: Engine | None = None  # None for embedding models: they cannot generate
        self.embed_lock = threading.Lock()
        self.watchdog: Watchdog | None = None

    def send(self, msg: dict[str, Any]) -> None:
        line = json.dumps(msg, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self.write_lock:
            self.out.write(line)
            self.out.flush()

    def load(
        self,
        spec: dict[str, Any],
        *,
        flash_attention: bool | None = None,
        kv_cache_type: str = "f16",
        image_limits: ImageLimits | None = None,
        backend_options: BackendOptions | None = None,
        prompt_cache: int = 0,
        shared_prefix: bool = False,
    ) -> None:
        t0 = time.perf_counter_ns()
        source = Source(
            spec["name"],
            Path(spec["path"]),
            spec.get("template"),
            spec.get("system"),
            spec.get("params"),
            list(spec.get("messages") or []),
            Path(spec["projector"]) if spec.get("projector") else None,
            [(Path(p), 1.0) for p in spec.get("adapters") or []],
            draft=Path(spec["draft"]) if spec.get("draft") else None,
        )
        loaded = self.loaded = Loaded(
            source,
            spec.get("backend") or None,
            spec.get("options"),
            flash_attention=flash_attention,
            kv_cache_type=kv_cache_type,
            image_limits=image_limits,
            backend_options=backend_options,
            prompt_cache=prompt_cache,
            shared_prefix=shared_prefix,
        )
        parallel, num_ctx = 1, loaded.context_length
        if not loaded.is_embedding:
            parallel = max(1, int(spec.get("parallel") or 1))
            self.engine = BatchEngine(loaded.new_runner(loaded.defaults, parallel), parallel)
            num_ctx = self.engine.num_ctx
        runner = self.engine.runner if isinstance(self.engine, BatchEngine) else None
        self.watchdog = Watchdog(runner, self.send, self.exit)
        self.send(
            {
                "op": "ready",
                "parallel": parallel,
                "num_ctx": num_ctx,
                "kv_usage": 0.0,
                "load_duration": time.perf_counter_ns() - t0,
                **loaded.processor,
            }
        )
        self.watchdog.start()  # heartbeats after the ready line

    def completion(self, req: dict[str, Any], cancelled: threading.Event) -> None:
        assert self.loaded is not None
        rid = req["id"]
        prepared = prepare(self.loaded, request_of(req))  # an embedding model stops here
        if req.get("render_only"):  # the prompt as the model would see it, nothing run
            self.send(
                {
                    "id": rid,
                    "done": True,
                    "rendered": prepared.text,
                    "image_count": len(prepared.images),
                    "prompt_eval_count": len(prepared.tokens),  # /v1/messages/count_tokens
                }
            )
            return
        assert self.engine is not None
        # the pieces are written by the batch thread as it makes them; this thread wakes
        # for the last Event (and for any piece a failed write left queued). A server that
        # stops reading stalls the steps, as it stalls the heartbeats it then misses.
        for event in self.engine.submit(
            prepared.tokens,
            prepared.options,
            cancelled,
            shift=bool(req.get("shift", True)),
            logprobs=_logprobs(req),
            grammar=prepared.grammar,
            images=prepared.images,
            stream=lambda event: self.send(_piece(rid, prepared, event)),
        ):
            piece = _piece(rid, prepared, event)
            if not event.done:
                self.send(piece)
                continue
            if piece["text"] or set(piece) - {"id", "text"}:  # what the parser held back
                self.send(piece)
            self.send(
                {
                    "id": rid,
                    "done": True,
                    **finish(prepared, event),
                    "kv_usage": self.engine.kv_usage(),
                    # cells used, fragmentation...: /metrics' cache figures
                    "kv_cache": self.engine.runner.kv_stats()
                    if isinstance(self.engine, BatchEngine)
                    else {},
                }
            )

    def embed(self, req: dict[str, Any]) -> None:
        assert self.loaded is not None
        texts = [str(t) for t in req.get("input") or []]
        inputs, count = prepare_embed(self.loaded, texts, bool(req.get("truncate", True)))
        with self.embed_lock:  # one at a time: embedding models run with parallel 1
            vectors = [[float(x) for x in v] for v in self.loaded.embed(inputs)]
        self.send({"id": req["id"], "embeddings": vectors, "prompt_eval_count": count})

    def rerank(self, req: dict[str, Any]) -> None:
        assert self.loaded is not None
        docs = [str(d) for d in req.get("documents") or []]
        pairs, count = prepare_rerank(self.loaded, str(req.get("query") or ""), docs)
        with self.embed_lock:  # an encoder, as embedding models: one pass at a time
            scores = scores_of(self.loaded.rerank(pairs))
        top_n = req.get("top_n")
        results = ranked(scores, docs, int(top_n) if top_n else None)
        self.send({"id": req["id"], "results": results, "prompt_eval_count": count})

    def handle(self, req: dict[str, Any], cancelled: threading.Event) -> None:
        try:
            if req["op"] == "completion":
                self.completion(req, cancelled)
            elif req["op"] == "rerank":
                self.rerank(req)
            else:
                self.embed(req)
        except Exception as e:  # this request's error; the others go on
            error = request_error(e)  # a bug (not a HerdError) is logged, a RunnerError
            # the nearest herd.errors class: the server rebuilds only those (GoTemplateError
            # travels as TemplateError, a 400, not as an unknown name's 500)
            kind = next(c for c in type(error).__mro__ if c.__module__ == "herd.errors")
            self.send({"id": req["id"], "error": str(error), "type": kind.__name__})
        finally:
            self.cancels.pop(req["id"], None)

    def serve(self, lines: IO[str]) -> None:
        for line in lines:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
                op = req.get("op")
                if op in ("completion", "embed", "rerank", "cancel") and not isinstance(
                    req.get("id"), int
                ):
                    raise ValueError("a request without an integer id")
            except (ValueError, AttributeError) as e:  # the server's bug: this line only
                log.error("ignoring a malformed request line (%s): %.200s", e, line)
                continue
            if op == "cancel":
                event = self.cancels.get(req.get("id"))
                if event is not None:
                    event.set()
            elif op in ("completion", "embed", "rerank"):
                cancelled = self.cancels[req["id"]] = threading.Event()
                threading.Thread(target=self.handle, args=(req, cancelled), daemon=True).start()
            else:
                log.warning("unknown op %r", op)


def main() -> None:
    # stdout is the protocol: keep a private handle on it and send everything else
    # (prints, C libraries writing to fd 1) to stderr
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when runners stop
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s runner %(levelname)s %(message)s"
    )
    child = Child(out)
    stdin = sys.stdin
    first = stdin.readline()
    if not first:
        return
    spec = json.loads(first)
    try:  # the environment is read here, the entry point, and handed down
        child.load(
            spec,
            flash_attention=envconfig.flash_attention(),
            kv_cache_type=envconfig.kv_cache_type(),
            image_limits=ImageLimits(**envconfig.image_limits()),
            backend_options=BackendOptions(**envconfig.backend_options()),
            prompt_cache=envconfig.prompt_cache(),
            shared_prefix=envconfig.shared_prefix(),
        )
    except HerdError as e:
        child.send({"op": "error", "error": str(e), "type": type(e).__name__})
        os._exit(1)
    except Exception as e:
        log.exception("loading %s failed", spec.get("name"))
        child.send(
            {"op": "error", "error": f"loading the model failed: {e}", "type": "RuntimeError"}
        )
        os._exit(1)
    child.serve(stdin)
    out.flush()
    os._exit(0)  # stdin closed: the server unloaded us (or is gone); don't wait for threads


if __name__ == "__main__":
    main()
