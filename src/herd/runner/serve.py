"""A runner child process: one loaded model, served to `herd serve` over a pipe.

`herd serve` never computes: for each loaded model it starts `python -m herd.runner.serve`
and talks to it in JSON lines, one object per line, over the child's stdin and stdout
(the child's own prints and logs go to stderr). Requests carry an `id` chosen by the
server; every reply carries the id it answers.

    server -> runner                                      runner -> server
    {"op": "load", "path", "name", "template",            {"op": "ready", "parallel",
     "system", "params", "backend", "options",              "num_ctx", "kv_usage",
     "parallel"}                                            "load_duration"}
                                                          | {"op": "error", "error", "type"}
    {"op": "completion", "id", "messages" | "prompt",     {"id", "text", "logprobs"?}  (0+)
     "context", "template", "options", "shift",           {"id", "done": true, "done_reason",
     "truncate", "want_context", "logprobs",                "prompt_eval_count", ...,
     "top_logprobs", "tools", "think", "format"}            "context", "kv_usage"}
    {"op": "embed", "id", "input", "truncate"}            {"id", "embeddings",
                                                            "prompt_eval_count"}
    {"op": "cancel", "id"}                                (the completion ends early)
    end of stdin                                          the process exits

An error answers `{"id", "error", "type"}` (`type` is the HerdError class name; the server
maps it to an HTTP status). `options` are complete (the server merged defaults < model
parameters < request), by Ollama's names. The pipe ties the child's life to the server's:
when the server dies, stdin closes and the runner exits; when the runner dies, stdout
closes and the server fails the requests in flight.

Inside, requests go to an `Engine`: `submit(tokens, options, cancelled)` yields the
runner's `Event`s and stops within a batch step once `cancelled` is set (client gone).
`BatchEngine` puts `herd.runner.Runner` (continuous batching over `parallel` slots of one
shared KV cache) behind it; another engine slots in by implementing the same members.

With `tools` or `think`, the output is parsed here (the template says how the model writes
tool calls and thinking): pieces then carry `thinking` and `tool_calls` beside `text`,
which is only the content. `format` ("json" or a JSON schema) constrains decoding.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO, Any, Protocol

from herd.errors import HerdError, UnsupportedModelError
from herd.runner.engine import Event
from herd.runner.options import Options
from herd.sample.grammar import Grammar
from herd.template.parsers import OutputParser

log = logging.getLogger("herd.runner")


class ContextLengthError(HerdError):
    """A prompt longer than the context with `truncate: false`."""


class CapabilityError(HerdError):
    """The model cannot do what the request asks (generate with an embedding model)."""


class Engine(Protocol):
    """What the runner process needs from the compute side."""

    parallel: int  # sequences it runs at once; the server queues the rest
    num_ctx: int  # context length of each sequence

    def submit(self, tokens: list[int], options: Options, cancelled: threading.Event, *,
               shift: bool = True, truncate: bool = True,
               logprobs: int = -1, grammar: Grammar | None = None) -> Iterator[Event]:
        """Generate after `tokens`. Ends with a `done` Event; returns early (without one)
        once `cancelled` is set. `shift=False`: stop with done_reason "length" when the
        context is full instead of shifting it; `truncate=False`: ContextLengthError for
        a prompt that does not fit instead of cutting it; `logprobs` >= 0: Events carry
        each token's log-probability and that many top alternatives; `grammar`
        constrains the tokens (structured outputs)."""
        ...

    def kv_usage(self) -> float:
        """Fraction (0..1) of the KV cache cells in use."""
        ...


class BatchEngine:
    """`herd.runner.Runner` in its threaded mode: `parallel` sequences in slots of one
    shared KV cache, continuously batched, each slot keeping its prefix for the next
    request."""

    def __init__(self, llm: Any, parallel: int) -> None:
        from herd.runner.engine import Runner

        self.parallel = max(1, parallel)
        from herd import envconfig

        self.runner = Runner(llm.model, llm.backend, llm.tokenizer, llm.defaults,
                             llm.model.context_length, parallel=self.parallel,
                             cache_type=envconfig.kv_cache_type())
        self.num_ctx = self.runner.num_ctx
        # a slot frees one step after its sequence ends or is cancelled: wait for it here
        # rather than letting a request that arrives in between fail to claim one
        self.free = threading.Semaphore(self.parallel)
        self.runner.start()

    def submit(self, tokens: list[int], options: Options, cancelled: threading.Event, *,
               shift: bool = True, truncate: bool = True,
               logprobs: int = -1, grammar: Grammar | None = None) -> Iterator[Event]:
        if len(tokens) >= self.num_ctx and not truncate:
            raise ContextLengthError(
                f"the input length ({len(tokens)} tokens) exceeds the context length "
                f"({self.num_ctx} tokens)")
        while not self.free.acquire(timeout=0.05):
            if cancelled.is_set():
                return
        try:
            # ends with the done Event, which the runner sends (also for a cancelled
            # sequence) once the slot is free again
            yield from self.runner.submit(tokens, options, cancelled, shift=shift,
                                          truncate=truncate, logprobs=logprobs,
                                          grammar=grammar)
        finally:
            self.free.release()

    def kv_usage(self) -> float:
        cache = self.runner.cache
        used = getattr(cache, "used_cells", None)
        size = getattr(cache, "size", 0)
        if used is not None and size:
            return min(1.0, used() / size)
        return sum(len(s.cached) for s in self.runner.slots) / (self.num_ctx * self.parallel)


class NoGeneration:
    """The engine of an embedding model: it has no causal cache and cannot generate."""

    parallel = 1

    def __init__(self, name: str, num_ctx: int) -> None:
        self.name, self.num_ctx = name, num_ctx

    def submit(self, tokens: list[int], options: Options, cancelled: threading.Event, *,
               shift: bool = True, truncate: bool = True,
               logprobs: int = -1, grammar: Grammar | None = None) -> Iterator[Event]:
        raise CapabilityError(f'"{self.name}" does not support generate')

    def kv_usage(self) -> float:
        return 0.0


def _logprobs(req: dict[str, Any]) -> int:
    """Top alternatives per token the request wants (-1: no logprobs at all)."""
    if not req.get("logprobs"):
        return -1
    return max(0, min(int(req.get("top_logprobs") or 0), 20))


def _piece(rid: int, event: Event) -> dict[str, Any]:
    msg: dict[str, Any] = {"id": rid, "text": event.text}
    if event.logprobs:
        msg["logprobs"] = list(event.logprobs)
    return msg


def _parsed(msg: dict[str, Any], parser: OutputParser | None, done: bool) -> dict[str, Any]:
    """A piece with its text split into content, thinking and tool calls."""
    if parser is None:
        return msg
    out = parser.add(msg["text"], done=done)
    msg["text"] = out.content
    if out.thinking:
        msg["thinking"] = out.thinking
    if out.tool_calls:
        msg["tool_calls"] = out.tool_calls
    return msg


# ---- the process ----------------------------------------------------------------------------
class Child:
    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.write_lock = threading.Lock()
        self.cancels: dict[int, threading.Event] = {}
        self.llm: Any = None
        self.engine: Engine | None = None
        self.embed_lock = threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        line = json.dumps(msg, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self.write_lock:
            self.out.write(line)
            self.out.flush()

    def load(self, spec: dict[str, Any]) -> None:
        from herd.api import LLM, Source

        t0 = time.perf_counter_ns()
        source = Source(spec["name"], spec["path"], spec.get("template"), spec.get("system"),
                        spec.get("params"))
        self.llm = LLM(source, spec.get("backend") or None, spec.get("options"))
        if getattr(self.llm.model, "is_embedding", False):
            self.engine = NoGeneration(self.llm.name, self.llm.model.context_length)
        else:
            self.engine = BatchEngine(self.llm, int(spec.get("parallel") or 1))
        self.send({"op": "ready", "parallel": self.engine.parallel,
                   "num_ctx": self.engine.num_ctx,
                   "kv_usage": 0.0, "load_duration": time.perf_counter_ns() - t0})

    def prompt_tokens(self, req: dict[str, Any]) -> list[int]:
        return self.prompt(req)[0]

    def prompt(self, req: dict[str, Any]) -> tuple[list[int], str, Any]:
        """(tokens, rendered text, template used) of a completion request."""
        context = [int(t) for t in req.get("context") or []]
        messages = req.get("messages")
        template = None
        if messages is None:
            text = str(req.get("prompt") or "")
        else:
            template = self.llm.template
            if req.get("template"):
                from herd.template import select_template

                template = select_template(self.llm.gguf.kv, req["template"])
            if template is None:
                text = "\n".join(str(m.get("content") or "") for m in messages)
            else:
                text = template.render(messages, add_generation_prompt=True,
                                       tools=req.get("tools"), think=req.get("think"))
        tokens = self.llm.tokenize(text, add_special=not context, parse_special=True)
        return context + tokens, text, template

    def completion(self, req: dict[str, Any], cancelled: threading.Event) -> None:
        assert self.engine is not None
        rid = req["id"]
        fmt = req.get("format")
        if fmt and req.get("think"):  # the grammar holds from the first token: no thinking
            req = {**req, "think": False}
        tokens, text, template = self.prompt(req)
        options = Options().merged(req.get("options"))
        grammar = Grammar.from_format(self.llm.tokenizer, fmt) if fmt else None
        parser = None
        if req.get("tools") or req.get("think") not in (None, False):
            parser = OutputParser(template, tools=req.get("tools"), think=req.get("think"),
                                  prompt=text)
        for event in self.engine.submit(tokens, options, cancelled,
                                        shift=bool(req.get("shift", True)),
                                        truncate=bool(req.get("truncate", True)),
                                        logprobs=_logprobs(req), grammar=grammar):
            if not event.done:
                self.send(_parsed(_piece(rid, event), parser, event.done))
                continue
            final: dict[str, Any] = {
                "id": rid, "done": True, "done_reason": event.done_reason,
                "prompt_eval_count": event.prompt_eval_count,
                "prompt_eval_duration": event.prompt_eval_duration,
                "eval_count": event.eval_count, "eval_duration": event.eval_duration,
                "kv_usage": self.engine.kv_usage(),
            }
            piece = _parsed(_piece(rid, event), parser, event.done)
            if piece["text"] or set(piece) - {"id", "text"}:
                self.send(piece)
            if req.get("want_context"):
                final["context"] = tokens + list(event.tokens)
            self.send(final)

    def embed(self, req: dict[str, Any]) -> None:
        embed = getattr(self.llm, "embed", None)
        if embed is None or not getattr(self.llm.model, "is_embedding", False):
            raise UnsupportedModelError(f'"{self.llm.name}" does not support embeddings')
        texts = [str(t) for t in req.get("input") or []]
        kwargs = {}
        if "truncate" in inspect.signature(embed).parameters:
            kwargs["truncate"] = bool(req.get("truncate", True))
        with self.embed_lock:  # one at a time: embedding models run with parallel 1
            vectors = [[float(x) for x in v] for v in embed(texts, **kwargs)]
        count = sum(len(self.llm.tokenize(t)) for t in texts)
        self.send({"id": req["id"], "embeddings": vectors, "prompt_eval_count": count})

    def handle(self, req: dict[str, Any], cancelled: threading.Event) -> None:
        try:
            if req["op"] == "completion":
                self.completion(req, cancelled)
            else:
                self.embed(req)
        except HerdError as e:
            self.send({"id": req["id"], "error": str(e), "type": type(e).__name__})
        except Exception as e:  # a bug: report it to the request, keep serving the others
            log.exception("request %s failed", req.get("id"))
            self.send({"id": req["id"], "error": f"runner error: {e}", "type": "RuntimeError"})
        finally:
            self.cancels.pop(req["id"], None)

    def serve(self, lines: IO[str]) -> None:
        for line in lines:
            if not line.strip():
                continue
            req = json.loads(line)
            op = req.get("op")
            if op == "cancel":
                event = self.cancels.get(req.get("id"))
                if event is not None:
                    event.set()
            elif op in ("completion", "embed"):
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
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s runner %(levelname)s %(message)s")
    child = Child(out)
    stdin = sys.stdin
    first = stdin.readline()
    if not first:
        return
    spec = json.loads(first)
    try:
        child.load(spec)
    except HerdError as e:
        child.send({"op": "error", "error": str(e), "type": type(e).__name__})
        os._exit(1)
    except Exception as e:
        log.exception("loading %s failed", spec.get("name"))
        child.send({"op": "error", "error": f"loading the model failed: {e}",
                    "type": "RuntimeError"})
        os._exit(1)
    child.serve(stdin)
    out.flush()
    os._exit(0)  # stdin closed: the server unloaded us (or is gone); don't wait for threads


if __name__ == "__main__":
    main()
