"""herd as a library: `herd.load(name_or_path)` and the `LLM` it returns.

Results are shaped like Ollama's API responses (fields, nanosecond durations), so code
written against Ollama's /api/generate and /api/chat reads herd's results unchanged.
Requests go through the same pipeline as the server's (`herd.runner.pipeline`); what is
left here is the library's shape: calls in, dicts out, one runner run inline.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from herd import envconfig
from herd.errors import HerdError
from herd.ml import BackendOptions
from herd.models.imageproc import ImageLimits
from herd.options import Options
from herd.runner import (
    Loaded,
    Prepared,
    Request,
    Runner,
    Source,
    finish,
    prepare,
    prepare_embed,
)
from herd.runner.rerank import prepare_rerank, ranked, scores_of
from herd.template.parsers import Parsed

Progress = Callable[[str, "str | None", "int | None", "int | None"], None]
ImageInput = str | os.PathLike[str] | bytes  # a path to an image file, or its bytes


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def resolve(
    model: str | Path, progress: Progress | None = None, projector: str | Path | None = None
) -> Source:
    """A .gguf path, or a store name (pulled from the catalog when missing). `projector`:
    a projector GGUF (llama.cpp's mmproj) to load with it, in place of a store model's."""
    text = str(model)
    extra = Path(projector).expanduser() if projector is not None else None
    if text.endswith(".gguf") or Path(text).is_file() or "/" in text and Path(text).exists():
        return Source(Path(text).name, Path(text), projector=extra)
    from herd.registry import registry_puller
    from herd.store import resolve_or_pull

    ref = resolve_or_pull(text, progress=progress, registry=registry_puller())
    return Source(ref.name, Path(ref.model_path), ref.template, ref.system, ref.params,
                  list(ref.messages), extra or ref.projector,
                  [(p, 1.0) for p in ref.adapters], ref.draft)  # fmt: skip


class LLM:
    """A loaded model: tokenizer, engine and chat template.

    `backend`: "auto" (None: HERD_BACKEND, else the fastest installed), "numpy", "ggml";
    flash attention, the KV cache type, the image limits and the ONNX backend's settings
    come from the environment (HERD_FLASH_ATTENTION, HERD_KV_CACHE_TYPE,
    HERD_MAX_IMAGE_*, HERD_ONNX_*), as for `herd serve`.
    """

    def __init__(
        self, source: Source, backend: str | None = None, options: dict[str, Any] | None = None
    ) -> None:
        from_env = BackendOptions(**envconfig.backend_options())
        self.loaded = Loaded(source, backend or envconfig.backend(), options,
                             flash_attention=envconfig.flash_attention(),
                             kv_cache_type=envconfig.kv_cache_type(),
                             image_limits=ImageLimits(**envconfig.image_limits()),
                             backend_options=from_env,
                             prompt_cache=envconfig.prompt_cache(),
                             shared_prefix=envconfig.shared_prefix())  # fmt: skip
        self.source, self.name, self.gguf = source, source.name, self.loaded.gguf
        self.backend, self.model = self.loaded.backend, self.loaded.model
        self.tokenizer, self.template = self.loaded.tokenizer, self.loaded.template
        self.defaults, self.load_duration = self.loaded.defaults, self.loaded.load_duration
        self._runner: Runner | None = None
        self._runner_key: tuple[Any, ...] = ()

    # ---- tokens -------------------------------------------------------------------------
    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        return self.loaded.tokenize(text, add_special, parse_special)

    def detokenize(self, ids: list[int], special: bool = False) -> str:
        return self.tokenizer.decode(ids, special=special)

    # ---- compute ------------------------------------------------------------------------
    def runner(self, options: Options) -> Runner:
        """The runner for these load-time options (a new one when they changed)."""
        if self._runner is None or self._runner_key != options.load_key():
            if self._runner is not None:
                self._runner.release_graphs()
            self._runner = self.loaded.new_runner(options)
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
        texts = [texts] if isinstance(texts, str) else list(texts)
        inputs, _ = prepare_embed(self.loaded, texts, truncate)
        out = self.loaded.embed(inputs)
        if dimensions:
            out = out[:, :dimensions]
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32)

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        top_n: int | None = None,
        return_documents: bool = False,
    ) -> list[dict[str, Any]]:
        """A cross-encoder's scores of `documents` for `query`, best first: dicts with
        `index` (into `documents`), `relevance_score` (the raw logit, as llama.cpp's server
        returns it; its sigmoid is CrossEncoder's 0..1 score) and, with `return_documents`,
        `document` ({"text"}); the first `top_n`. A document that does not fit the context
        beside the query is cut; a query that leaves no room is refused."""
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int)
                                  or top_n < 1):  # fmt: skip
            raise HerdError(f"top_n must be a positive integer, not {top_n!r}")
        docs = list(documents)
        pairs, _ = prepare_rerank(self.loaded, query, docs)
        return ranked(scores_of(self.loaded.rerank(pairs)), docs, top_n, return_documents)

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
        images: Sequence[ImageInput] | None = None,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Ollama's /api/generate. `format`: "json" or a JSON schema the response must
        follow; `think`: True/False or "low"/"medium"/"high" for thinking models (the
        thinking goes to `thinking`, apart from `response`); `images`: paths or bytes of
        images for a model with vision."""
        request = Request(
            prompt=prompt,
            images=image_bytes(images),
            system=system,
            raw=raw,
            context=context or (),
            think=think,
            format=format,
            options=options,
            want_context=True,
        )
        chunks = self._stream(request, _generate_fields)
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
        come back in `message.tool_calls`); `think` and `format` as in `generate`; a
        message's `images`: paths or bytes of images, as in `generate`."""
        messages = [
            {**m, "images": image_bytes(m["images"])} if m.get("images") else m for m in messages
        ]
        request = Request(
            messages=messages, tools=tools, think=think, format=format, options=options
        )
        chunks = self._stream(request, _chat_fields)
        return chunks if stream else _collect(chunks, "message")

    def _stream(
        self, request: Request, shape: Callable[[Parsed], dict[str, Any]]
    ) -> Iterator[dict[str, Any]]:
        prepared = prepare(self.loaded, request)  # errors here, not at the first next()
        return self._events(prepared, shape)

    def _events(
        self, prepared: Prepared, shape: Callable[[Parsed], dict[str, Any]]
    ) -> Iterator[dict[str, Any]]:
        t0 = time.perf_counter_ns()
        first_load = self._runner is None
        runner = self.runner(prepared.options)
        load = self.load_duration if first_load else 0
        events = runner.generate(
            prepared.tokens, prepared.options, grammar=prepared.grammar, images=prepared.images
        )
        for event in events:
            parsed = prepared.parse(event)
            out = {"model": self.name, "created_at": _now(), **shape(parsed), "done": event.done}
            if event.done:
                out.update(finish(prepared, event))
                out.update(total_duration=time.perf_counter_ns() - t0 + load, load_duration=load)
            yield out

    def info(self) -> dict[str, Any]:
        from herd.store.facts import capabilities
        from herd.store.ggufinfo import describe

        facts = describe(self.gguf)
        template = self.template.source if self.template is not None else None
        return {
            "architecture": facts.architecture,
            "parameters": facts.parameter_count,
            "context_length": facts.context_length or 0,
            "embedding_length": facts.embedding_length or 0,
            "quantization": facts.file_type,
            "backend": self.backend.name,
            "template": template,
            "capabilities": capabilities(
                facts.architecture, facts.kv, template, vision=self.loaded.vision is not None
            ),
        }

    def close(self) -> None:
        if self._runner is not None:
            self._runner.release_graphs()
        self.loaded.close()


def image_bytes(images: Sequence[ImageInput] | None) -> list[bytes]:
    """Images as the pipeline takes them: bytes kept, paths read (HerdError when one
    cannot be read; the pipeline says what is no image)."""
    out = []
    for image in images or ():
        if isinstance(image, bytes | bytearray | memoryview):
            out.append(bytes(image))
            continue
        if not isinstance(image, str | os.PathLike):
            raise HerdError(f"an image must be a path or bytes, not {type(image).__name__}")
        path = Path(image).expanduser()
        try:
            out.append(path.read_bytes())
        except FileNotFoundError:
            raise HerdError(f"image file not found: {path}") from None
        except OSError as e:
            raise HerdError(f"cannot read image file {path}: {e.strerror or e}") from None
    return out


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
    projector: str | Path | None = None,
    adapters: Sequence[str | Path | tuple[str | Path, float]] = (),
    draft: str | Path | None = None,
) -> LLM:
    """Load a model by store name (pulled if missing) or .gguf path.

    `backend`: "auto" (default: HERD_BACKEND, else the fastest installed), "numpy", "ggml";
    `projector`: the model's projector GGUF (llama.cpp's mmproj, for a text GGUF that
    takes images from a separate file); a store model brings its own projector layer.
    `adapters`: LoRA GGUFs (llama.cpp's format; `herd convert PEFT_DIR --base ...`), a path or
    (path, scale), applied after a store model's own ADAPTER layers (scale 1).
    `draft`: a draft model (store name or .gguf path) with the same vocabulary, for
    speculative decoding (`herd.runner.speculate`), in place of a store model's DRAFT.
    """
    source = resolve(model, progress, projector)
    for a in adapters:
        path, scale = a if isinstance(a, tuple) else (a, 1.0)
        source.adapters.append((Path(path).expanduser(), float(scale)))
    if draft is not None:
        source.draft = resolve(draft, progress).path
    return LLM(source, backend, options)
