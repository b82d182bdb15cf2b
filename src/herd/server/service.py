"""What the HTTP handlers of both APIs share: models by name, options, running a request.

`completion()` yields the runner's replies (`{"text"}` pieces, then the `done` one with
counts and durations: `prompt_eval_count` is the whole prompt, as Ollama reports it, and
`prompt_cached_count` the part of it reused from the runner's cache; with `render_only`
in the payload, one `done` reply with `rendered` and `image_count`) and keeps the books:
the lease on the runner, the timings, the metrics. Closing it early (client gone) cancels
the sequence in the runner.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

from herd import envconfig
from herd.errors import BadRequestError, ModelNotFoundError
from herd.options import Options
from herd.server.metrics import Metrics
from herd.server.scheduler import LoadSpec, Scheduler
from herd.store import ModelRef, Store
from herd.store.facts import ShowFacts, load_facts


@dataclass
class Completion:
    """One generate/chat request, ready for a runner (see herd.runner.serve's protocol)."""

    spec: LoadSpec
    keep_alive: float | None
    payload: dict[str, Any] = field(default_factory=dict)  # messages | prompt, context, ...


class Service:
    def __init__(self, store: Store, scheduler: Scheduler, metrics: Metrics) -> None:
        self.store, self.scheduler, self.metrics = store, scheduler, metrics
        self._facts: dict[str, ShowFacts] = {}

    # ---- models
    def model(self, name: Any) -> ModelRef:
        """The stored model; 404 `model 'x' not found` (Ollama's words) when absent."""
        if not isinstance(name, str) or not name.strip():
            raise BadRequestError("model is required")
        try:
            return self.store.resolve(name)
        except ModelNotFoundError:
            raise ModelNotFoundError(f"model '{name}' not found") from None

    async def facts(self, ref: ModelRef) -> ShowFacts:
        """GGUF facts (metadata, tensors) of a stored model, read once per digest."""
        facts = self._facts.get(ref.digest)
        if facts is None:
            facts = await asyncio.to_thread(load_facts, ref.name, self.store)
            self._facts[ref.digest] = facts
        return facts

    async def load_spec(self, ref: ModelRef, options: Any) -> LoadSpec:
        """Options merged as Ollama does: defaults < model parameters < request."""
        if options is not None and not isinstance(options, dict):
            raise BadRequestError("options must be an object")
        merged = Options(num_ctx=envconfig.context_length()).merged(ref.params).merged(options)
        facts = await self.facts(ref)
        projector_size = ref.projector.stat().st_size if ref.projector is not None else 0
        return LoadSpec(
            ref.name,
            ref,
            facts.gguf,
            ref.model_path.stat().st_size,
            merged,
            self.scheduler.backend,
            facts.projector,  # the projector layer's GGUF facts (None without one)
            projector_size,
        )

    # ---- running
    async def completion(self, c: Completion) -> AsyncIterator[dict[str, Any]]:
        t0 = time.perf_counter_ns()
        lease = await self.scheduler.lease(c.spec, c.keep_alive)
        name = c.spec.name
        first: int | None = None
        last = t0
        try:
            payload = {"op": "completion", **c.payload, "options": asdict(c.spec.options)}
            parser = c.spec.ref.config.get("parser")  # the Modelfile's PARSER
            if parser and isinstance(parser, str):
                payload["parser"] = parser
            async for msg in lease.runner.proc.request(payload):
                now = time.perf_counter_ns()
                if "rendered" in msg:  # render only: nothing was generated
                    pass
                elif msg.get("done"):
                    lease.runner.kv_usage = float(msg.get("kv_usage", lease.runner.kv_usage))
                    msg["load_duration"] = lease.load_duration
                    msg["total_duration"] = now - t0
                    # prompt tokens computed: the cached part was not
                    computed = int(msg.get("prompt_eval_count", 0))
                    computed -= int(msg.get("prompt_cached_count", 0))
                    self.metrics.finished(
                        name,
                        str(msg.get("done_reason", "")),
                        computed,
                        int(msg.get("eval_count", 0)),
                        int(msg.get("eval_duration", 0)) / 1e9,
                        (now - t0) / 1e9,
                    )
                    self.metrics.cache(name, msg)
                elif msg.get("text"):
                    if first is None:
                        first = now
                        self.metrics.ttft.observe(name, (now - t0) / 1e9)
                    else:
                        self.metrics.itl.observe(name, (now - last) / 1e9)
                    last = now
                yield msg
        finally:
            lease.release()

    async def render_only(self, c: Completion) -> dict[str, Any]:
        """Ollama's `_debug_info` for a completion: `rendered_template`, the prompt as the
        model's runner renders it, and `image_count` (left out when 0, as Go's omitempty
        does); nothing is generated."""
        events = self.completion(
            Completion(c.spec, c.keep_alive, {**c.payload, "render_only": True})
        )
        try:
            msg = await anext(events)
        finally:
            await events.aclose()
        info: dict[str, Any] = {"rendered_template": str(msg.get("rendered", ""))}
        if msg.get("image_count"):
            info["image_count"] = int(msg["image_count"])
        return info

    async def embed(
        self, spec: LoadSpec, keep_alive: float | None, texts: list[str], truncate: bool = True
    ) -> tuple[list[list[float]], int, int]:
        """(vectors, prompt tokens, load ns); the runner raises when the model can't embed."""
        lease = await self.scheduler.lease(spec, keep_alive)
        try:
            result: dict[str, Any] = {}
            async for msg in lease.runner.proc.request(
                {"op": "embed", "input": texts, "truncate": truncate}
            ):
                result = msg
            return (
                result.get("embeddings") or [],
                int(result.get("prompt_eval_count", 0)),
                lease.load_duration,
            )
        finally:
            lease.release()

    async def rerank(
        self,
        spec: LoadSpec,
        keep_alive: float | None,
        query: str,
        documents: list[str],
        top_n: int | None,
    ) -> tuple[list[dict[str, Any]], int, int]:
        """(results best first: index, relevance_score; prompt tokens, load ns); the runner
        raises when the model can't rerank or the query does not fit."""
        lease = await self.scheduler.lease(spec, keep_alive)
        try:
            result: dict[str, Any] = {}
            async for msg in lease.runner.proc.request(
                {"op": "rerank", "query": query, "documents": documents, "top_n": top_n}
            ):
                result = msg
            return (
                list(result.get("results") or []),
                int(result.get("prompt_eval_count", 0)),
                lease.load_duration,
            )
        finally:
            lease.release()
