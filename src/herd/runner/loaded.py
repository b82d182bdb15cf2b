"""A loaded model: the GGUF file opened on a backend, with its tokenizer and chat template.

A model in llama.cpp's two-file layout comes with a projector file (`Source.projector`,
an `mmproj` GGUF: `general.architecture` "clip"): it is opened on a second backend of
the same kind (weights only: it holds no cache) and handed to the architecture
(`load_model(..., projector=...)`), whose image encoder then runs on that backend.

The library (`herd.api.LLM`) and the runner process (`herd.runner.serve`) both hold one
and hand it to the request pipeline (`herd.runner.pipeline`). Configuration comes in as
arguments: the entry points read the environment (the backend, flash attention, the KV
cache type), nothing here does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from herd.errors import CapabilityError, GGUFError
from herd.gguf import GGUFFile, open_gguf
from herd.ml import Backend, BackendOptions, DeviceInfo, open_backend
from herd.models import Batch, Model, Vision, batch_inputs, load_model
from herd.models.base import Projector
from herd.models.imageproc import ImageLimits
from herd.models.rank import Ranker
from herd.nn.lora import Adapted
from herd.options import Options
from herd.runner.adapters import adapted, check_bound
from herd.runner.draft import Drafter, check_draft
from herd.runner.engine import Runner
from herd.runner.images import LRU, Image
from herd.template import ChatTemplate, select_template
from herd.tokenizer import Tokenizer, from_gguf


@dataclass
class Source:
    """Where a model comes from: a GGUF path plus what a store manifest adds."""

    name: str
    path: Path
    template: str | None = None
    system: str | None = None
    params: dict[str, Any] | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)  # Modelfile MESSAGEs
    projector: Path | None = None  # llama.cpp's mmproj GGUF (a store's projector layer)
    adapters: list[tuple[Path, float]] = field(default_factory=list)  # LoRA GGUFs, scales
    draft: Path | None = None  # a speculative-decoding draft model's GGUF (Modelfile DRAFT)


class Loaded:
    """A model ready to serve requests.

    `defaults`: Ollama's option defaults < the model's parameters (Modelfile) < `options`.
    `flash_attention` (None: the backend decides) and `kv_cache_type` ("f16", "q8_0",
    "q4_0") go to the backend, which plans memory for them, and to the runners made here.
    `backend_options`: what the environment sets for every backend opened here (the ONNX
    backend's onnx_* fields); the model's options and the two above override theirs.
    `prompt_cache`: bytes of host memory each runner made here keeps prompts that left its
    slots in (`herd.runner.prompt_cache`; 0: none). `shared_prefix`: its runners' slots
    hold a common prefix once (`herd.runner.slots`).
    """

    def __init__(
        self,
        source: Source,
        backend: str | None = None,
        options: dict[str, Any] | None = None,
        *,
        flash_attention: bool | None = None,
        kv_cache_type: str = "f16",
        image_limits: ImageLimits | None = None,
        backend_options: BackendOptions | None = None,
        prompt_cache: int = 0,
        shared_prefix: bool = False,
    ) -> None:
        t0 = time.perf_counter_ns()
        self.source, self.name = source, source.name
        self.draft: Loaded | None = None  # on the same kind of backend, checked to fit
        self.gguf: GGUFFile = open_gguf(source.path)
        self.defaults = Options().merged(source.params).merged(options)
        self.kv_cache_type, self.prompt_cache = kv_cache_type, prompt_cache
        self.shared_prefix = shared_prefix
        self.image_limits = image_limits or ImageLimits()
        self.images: LRU[Image] = LRU(8)  # preprocessed images by digest (the pipeline's)
        self.projector_gguf = open_projector(source.projector) if source.projector else None
        opts = replace(
            backend_options or BackendOptions(),
            num_thread=self.defaults.num_thread,
            num_gpu=self.defaults.num_gpu,
            num_ctx=self.defaults.num_ctx,
            num_batch=self.defaults.num_batch,
            flash_attention=flash_attention,
            kv_cache_type=kv_cache_type,
        )
        self.backend = open_backend(backend, self.gguf, opts)
        self.projector_backend: Backend | None = None
        try:
            projector = None
            if self.projector_gguf is not None:
                # the text model's kind of backend, for the weights only (no cache)
                self.projector_backend = open_backend(
                    self.backend.name, self.projector_gguf, replace(opts, num_ctx=0)
                )
                projector = Projector(self.projector_gguf.config(), self.projector_backend)
            bound: Backend = self.backend
            if source.adapters:  # LoRA: Linear.bind takes each weight's from the wrapper
                bound = adapted(self.backend, self.gguf, source.adapters)
            self.model: Model = load_model(self.gguf.config(), bound, projector)
            if isinstance(bound, Adapted):
                check_bound(bound, self.gguf.architecture)
        except BaseException:
            self.close()
            raise
        self.tokenizer: Tokenizer = from_gguf(self.gguf)
        self.template: ChatTemplate | None = select_template(self.gguf.kv, source.template)
        if source.draft is not None:
            try:
                self.draft = Loaded(Source(source.draft.name, source.draft), self.backend.name,
                                    options, flash_attention=flash_attention,
                                    kv_cache_type=kv_cache_type,
                                    backend_options=backend_options)  # fmt: skip
                check_draft(self, self.draft)
            except BaseException:
                self.close()
                raise
        self.load_duration = time.perf_counter_ns() - t0  # ns

    @property
    def is_embedding(self) -> bool:
        return self.model.is_embedding

    @property
    def is_rank(self) -> bool:
        """A cross-encoder (rerank model): scores pairs, computes no embeddings."""
        return isinstance(self.model, Ranker)

    @property
    def vision(self) -> Vision | None:
        """The model, where it takes images (its file has a vision encoder)."""
        model = self.model
        return model if isinstance(model, Vision) and model.vision is not None else None

    @property
    def n_vocab(self) -> int:
        """Token ids the model takes: 0 to n_vocab - 1."""
        return self.model.n_vocab

    @property
    def context_length(self) -> int:
        """The model's trained context (tokens)."""
        return self.model.context_length

    @property
    def processor(self) -> dict[str, str]:
        """Which backend runs the model and on what (`herd ps`): the GPUs a ggml model is
        laid out on, else the device the backend computes on."""
        gpus = getattr(self.backend, "gpus", None)  # the GPUs in use (ggml probes more)
        if gpus is not None:
            # ggml's are its GPU handles, MLX's their DeviceInfo
            infos = [g if isinstance(g, DeviceInfo) else g.device.info for g in gpus]
            names = [d.name for d in infos]
            # "rpc": layers on other machines' ggml RPC servers (their memory is no VRAM)
            kind = "cpu" if not infos else "rpc" if infos[0].kind == "rpc" else "gpu"
        else:
            devices = self.backend.devices()
            names = [d.name for d in devices[:1]]
            kind = devices[0].kind if devices else "cpu"
        if not names:
            names = [d.name for d in self.backend.devices() if d.kind == "cpu"][:1]
        return {"backend": self.backend.name, "device": kind, "device_name": ", ".join(names)}

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def new_runner(self, options: Options, parallel: int = 1) -> Runner:
        """A runner (KV cache of `parallel` x num_ctx cells) for the load-time `options`."""
        draft = None if self.draft is None else Drafter(self.draft.new_runner(options, parallel))
        return Runner(self.model, self.backend, self.tokenizer, options, self.context_length,
                      parallel=parallel, cache_type=self.kv_cache_type,
                      vision=self.vision, encoder_backend=self.projector_backend,
                      draft=draft, prompt_cache=self.prompt_cache,
                      shared_prefix=self.shared_prefix)  # fmt: skip

    def embed(self, inputs: list[list[int]]) -> np.ndarray:
        """(len(inputs), n_embd) float32: the embedding of each token list, as many in one
        forward pass as fit the context, each its own sequence."""
        if self.is_rank:
            raise CapabilityError(f'"{self.name}" does not support embeddings')
        rows, batch = [], []
        for ids in inputs:
            if sum(map(len, batch)) + len(ids) > self.context_length:
                rows.append(self._embed_batch(batch))
                batch = []
            batch.append(ids)
        if batch:
            rows.append(self._embed_batch(batch))
        return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)

    def _embed_batch(self, batch: list[list[int]]) -> np.ndarray:
        seq = np.concatenate([np.full(len(ids), k, np.int32) for k, ids in enumerate(batch)])
        b = Batch(np.concatenate(batch).astype(np.int32),
                  np.concatenate([np.arange(len(ids), dtype=np.int32) for ids in batch]),
                  seq, np.zeros(0, np.int32))  # fmt: skip
        with self.backend.new_context() as ctx:  # an encoder: no cache inputs to make
            (out,) = ctx.compute(self.model.forward(ctx, batch_inputs(ctx, b)))
        return out

    def rerank(self, pairs: list[tuple[list[int], list[int]]]) -> np.ndarray:
        """(len(pairs), n_labels) float32 raw classifier logits of (token ids, token types)
        pairs (`herd.runner.rerank.prepare_rerank`), as many per pass as fit the context."""
        assert isinstance(self.model, Ranker)
        rows, batch = [], []
        for pair in pairs:
            if sum(len(ids) for ids, _ in batch) + len(pair[0]) > self.context_length:
                rows.append(self._rank_batch(batch))
                batch = []
            batch.append(pair)
        if batch:
            rows.append(self._rank_batch(batch))
        return np.concatenate(rows) if rows else np.zeros((0, 1), np.float32)

    def _rank_batch(self, batch: list[tuple[list[int], list[int]]]) -> np.ndarray:
        assert isinstance(self.model, Ranker)
        ids = [p[0] for p in batch]
        b = Batch(np.concatenate(ids).astype(np.int32),
                  np.concatenate([np.arange(len(x), dtype=np.int32) for x in ids]),
                  np.concatenate([np.full(len(x), k, np.int32) for k, x in enumerate(ids)]),
                  np.zeros(0, np.int32))  # fmt: skip
        types = np.concatenate([np.asarray(p[1], np.int32) for p in batch])
        with self.backend.new_context() as ctx:
            (out,) = ctx.compute(self.model.rank(ctx, batch_inputs(ctx, b), types))
        return out

    def close(self) -> None:
        if self.draft is not None:
            self.draft.close()
            self.draft = None
        if self.projector_backend is not None:
            self.projector_backend.close()
            self.projector_backend = None
        self.backend.close()


def open_projector(path: Path) -> GGUFFile:
    """A projector file, checked to be one: GGUFError for anything else (a text model given
    where the projector goes, a file that is no GGUF)."""
    g = open_gguf(path)
    arch = g.kv.get("general.architecture")
    if arch != "clip":
        raise GGUFError(
            f"{path}: not a projector file: its general.architecture is {arch!r}, a projector "
            "(llama.cpp's mmproj) has 'clip'"
        )
    return g
