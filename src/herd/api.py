"""herd as a library: `herd.load(name_or_path)` and the `LLM` it returns.

Results are shaped like Ollama's API responses (fields, nanosecond durations), so code
written against Ollama's /api/generate and /api/chat reads herd's results unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from herd.errors import HerdError
from herd.gguf import GGUFFile, open_gguf
from herd.ml import BackendOptions, open_backend
from herd.models import Batch, load_model
from herd.runner import Options, Runner
from herd.sample.grammar import Grammar
from herd.template import select_template
from herd.template.parsers import OutputParser, Parsed, infer_thinking_tags, supports_tools
from herd.tokenizer import Tokenizer, from_gguf

Progress = Callable[[str, "str | None", "int | None", "int | None"], None]


@dataclass
class Source:
    """Where a model comes from: a GGUF path plus what a store manifest adds."""

    name: str
    path: Path
    template: str | None = None
    system: str | None = None
    params: dict[str, Any] | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def resolve(model: str | Path, progress: Progress | None = None) -> Source:
    """A .gguf path, or a store name (pulled from the catalog when missing)."""
    text = str(model)
    if text.endswith(".gguf") or Path(text).is_file() or "/" in text and Path(text).exists():
        return Source(Path(text).name, Path(text))
    from herd.registry import registry_puller
    from herd.store import resolve_or_pull

    ref = resolve_or_pull(text, progress=progress, registry=registry_puller())
    return Source(ref.name, Path(ref.model_path), ref.template, ref.system, ref.params)


class LLM:
    """A loaded model: tokenizer, engine and chat template."""

    def __init__(
        self, source: Source, backend: str | None = None, options: dict[str, Any] | None = None
    ) -> None:
        t0 = time.perf_counter_ns()
        self.source, self.name = source, source.name
        self.gguf: GGUFFile = open_gguf(source.path)
        self.defaults = Options().merged(source.params).merged(options)
        self.backend = open_backend(
            backend,
            self.gguf,
            BackendOptions(
                num_thread=self.defaults.num_thread,
                num_gpu=self.defaults.num_gpu,
                num_ctx=self.defaults.num_ctx,
                num_batch=self.defaults.num_batch,
            ),
        )
        self.model = load_model(self.gguf.config(), self.backend)
        self.tokenizer: Tokenizer = from_gguf(self.gguf)
        self.template = select_template(self.gguf.kv, source.template)
        self._runner: Runner | None = None
        self.load_duration = time.perf_counter_ns() - t0

    # ---- tokens -------------------------------------------------------------------------
    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: list[int], special: bool = False) -> str:
        return self.tokenizer.decode(ids, special=special)

    # ---- compute ------------------------------------------------------------------------
    def runner(self, options: Options) -> Runner:
        if self._runner is None or self._runner_key != options.load_key():
            from herd import envconfig

            if self._runner is not None:
                self._runner.release_graphs()
            self._runner = Runner(
                self.model, self.backend, self.tokenizer, options, self.model.context_length,
                cache_type=envconfig.kv_cache_type(),
            )
            self._runner_key = options.load_key()
        return self._runner

    def logits(self, ids: list[int], options: dict[str, Any] | None = None) -> np.ndarray:
        """(len(ids), n_vocab) float32: one row per input position, one batch."""
        opts = self.defaults.merged(options)
        need = max(opts.num_ctx, len(ids))
        opts = opts.merged({"num_ctx": need, "num_batch": max(opts.num_batch, len(ids))})
        return self.runner(opts).logits(list(ids))

    def embed(
        self, texts: str | list[str], truncate: bool = True, dimensions: int | None = None
    ) -> np.ndarray:
        """(len(texts), n) float32 L2-normalized embeddings, as Ollama's /api/embed.

        Inputs longer than the context are cut (keeping the final [SEP]) unless `truncate`
        is False, which raises instead; `dimensions` keeps the first n dims, renormalized.
        """
        if not getattr(self.model, "is_embedding", False):
            raise HerdError(f"{self.name} does not support embeddings")
        texts = [texts] if isinstance(texts, str) else list(texts)
        n_ctx, rows, batch = self.model.context_length, [], []
        for i, text in enumerate(texts):
            ids = self.tokenize(text)
            if len(ids) > n_ctx:
                if not truncate:
                    raise HerdError(f"input {i} has {len(ids)} tokens, over the context "
                                    f"length {n_ctx} (truncate is false)")
                ids = ids[: n_ctx - 1] + ids[-1:]
            if sum(map(len, batch)) + len(ids) > n_ctx:
                rows.append(self._embed_batch(batch))
                batch = []
            batch.append(ids)
        if batch:
            rows.append(self._embed_batch(batch))
        out = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
        if dimensions:
            out = out[:, :dimensions]
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32)

    def _embed_batch(self, batch: list[list[int]]) -> np.ndarray:
        """One forward pass over several texts, each its own sequence."""
        seq = np.concatenate([np.full(len(ids), k, np.int32) for k, ids in enumerate(batch)])
        b = Batch(np.concatenate(batch).astype(np.int32),
                       np.concatenate([np.arange(len(ids), dtype=np.int32) for ids in batch]),
                       seq, np.zeros(0, np.int32))
        with self.backend.new_context() as ctx:
            (out,) = ctx.compute(self.model.forward(ctx, b))
        return out

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        think: bool | str | None = None,
    ) -> str:
        if self.template is None:
            raise HerdError(f"{self.name} has no chat template; use generate(..., raw=True)")
        return self.template.render(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, think=think
        )

    def _parser(
        self, tools: list[dict[str, Any]] | None, think: bool | str | None, prompt: str
    ) -> OutputParser | None:
        """The output parser for tools and thinking (None without either); errors in
        Ollama's words when the template cannot do what is asked."""
        if think not in (None, False) and not all(infer_thinking_tags(self.template)):
            raise HerdError(f'"{self.name}" does not support thinking')
        if tools and not supports_tools(self.template):
            raise HerdError(f'"{self.name}" does not support tools')
        if not tools and think in (None, False):
            return None
        return OutputParser(self.template, tools=tools, think=think, prompt=prompt)

    def generate(
        self,
        prompt: str,
        *,
        system: str | None = None,
        options: dict[str, Any] | None = None,
        raw: bool = False,
        context: list[int] | None = None,
        stream: bool = False,
        format: str | dict[str, Any] | None = None,
        think: bool | str | None = None,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Ollama's /api/generate. `format`: "json" or a JSON schema the response must
        follow; `think`: True/False or "low"/"medium"/"high" for thinking models (the
        thinking goes to `thinking`, apart from `response`)."""
        opts = self.defaults.merged(options)
        think = False if format and think else think  # the grammar holds from the start
        system = system if system is not None else self.source.system
        if raw or self.template is None:
            text = prompt
        else:
            msgs = [{"role": "system", "content": system}] if system else []
            text = self.render(msgs + [{"role": "user", "content": prompt}], think=think)
        parser = self._parser(None, think, text)
        prefix = list(context or [])
        tokens = prefix + self.tokenize(text, add_special=not prefix, parse_special=not raw)
        chunks = self._stream(
            tokens, opts, _generate_fields, prompt_tokens=tokens,
            grammar=Grammar.from_format(self.tokenizer, format), parser=parser,
        )  # fmt: skip
        return chunks if stream else _collect(chunks, "response")

    def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        options: dict[str, Any] | None = None,
        stream: bool = False,
        tools: list[dict[str, Any]] | None = None,
        think: bool | str | None = None,
        format: str | dict[str, Any] | None = None,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Ollama's /api/chat. `tools`: function definitions the model may call (its calls
        come back in `message.tool_calls`); `think` and `format` as in `generate`."""
        opts = self.defaults.merged(options)
        think = False if format and think else think  # the grammar holds from the start
        msgs = list(messages)
        if self.source.system and not any(m.get("role") == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.source.system})
        text = self.render(msgs, tools=tools, think=think)
        parser = self._parser(tools, think, text)
        tokens = self.tokenize(text, add_special=True, parse_special=True)
        chunks = self._stream(
            tokens, opts, _chat_fields,
            grammar=Grammar.from_format(self.tokenizer, format), parser=parser,
        )  # fmt: skip
        return chunks if stream else _collect(chunks, "message")

    def _stream(
        self,
        tokens: list[int],
        opts: Options,
        shape: Callable[[Parsed], dict[str, Any]],
        prompt_tokens: list[int] | None = None,
        grammar: Grammar | None = None,
        parser: OutputParser | None = None,
    ) -> Iterator[dict[str, Any]]:
        t0 = time.perf_counter_ns()
        first_load = self._runner is None
        runner = self.runner(opts)
        load = self.load_duration if first_load else 0
        for event in runner.generate(tokens, opts, grammar=grammar):
            parsed = Parsed(event.text) if parser is None else parser.add(event.text, event.done)
            out = {"model": self.name, "created_at": _now(), **shape(parsed), "done": event.done}
            if event.done:
                out.update(
                    done_reason=event.done_reason,
                    total_duration=time.perf_counter_ns() - t0 + load,
                    load_duration=load,
                    prompt_eval_count=event.prompt_eval_count,
                    prompt_eval_duration=event.prompt_eval_duration,
                    eval_count=event.eval_count,
                    eval_duration=event.eval_duration,
                )
                if prompt_tokens is not None:
                    out["context"] = list(prompt_tokens) + list(event.tokens)
            yield out

    def info(self) -> dict[str, Any]:
        from herd.store.ggufinfo import describe

        facts = describe(self.gguf)
        return {
            "architecture": facts.architecture,
            "parameters": facts.parameter_count,
            "context_length": facts.context_length or 0,
            "embedding_length": facts.embedding_length or 0,
            "quantization": facts.file_type,
            "backend": self.backend.name,
            "template": self.template.source if self.template is not None else None,
        }

    def close(self) -> None:
        if self._runner is not None:
            self._runner.release_graphs()
        self.backend.close()


def _generate_fields(p: Parsed) -> dict[str, Any]:
    return {"response": p.content, **({"thinking": p.thinking} if p.thinking else {})}


def _chat_fields(p: Parsed) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": p.content}
    if p.thinking:
        message["thinking"] = p.thinking
    if p.tool_calls:
        message["tool_calls"] = p.tool_calls
    return {"message": message}


def _collect(chunks: Iterator[dict[str, Any]], key: str) -> dict[str, Any]:
    """Join a stream into the one object Ollama returns for `stream: false`."""
    text, thinking, calls, final = [], [], [], {}
    for chunk in chunks:
        part = chunk[key] if key == "message" else chunk
        text.append(part["content"] if key == "message" else part["response"])
        thinking.append(part.get("thinking", ""))
        calls += part.get("tool_calls", [])
        final = chunk
    whole = _chat_fields(Parsed("".join(text), "".join(thinking), calls))["message"]
    if key == "message":
        final["message"] = whole
    else:
        final.pop("thinking", None)
        final.update(_generate_fields(Parsed(whole["content"], whole.get("thinking", ""))))
    return final


def load(
    model: str | Path,
    backend: str | None = None,
    options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> LLM:
    """Load a model by store name (pulled if missing) or .gguf path.

    `backend`: "auto" (default: HERD_BACKEND, else the fastest installed), "numpy", "ggml".
    """
    from herd import envconfig

    return LLM(resolve(model, progress), backend or envconfig.backend(), options)
