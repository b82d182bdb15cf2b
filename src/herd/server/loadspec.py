"""A model to load: its store entry, GGUF facts and load options, what a runner for it
needs in memory, and the `load` message a runner process is started with."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from herd.gguf import open_gguf
from herd.ml import layout
from herd.options import Options
from herd.store import ModelRef
from herd.store.ggufinfo import GGUFFacts

RUNNER_OVERHEAD = 200 * 2**20  # a Python process with NumPy and the engine imported


@dataclass
class LoadSpec:
    """A model to load (or find loaded): its store entry, GGUF facts and load options;
    for a model with a projector file (`ref.projector`), that file's facts and size."""

    name: str
    ref: ModelRef
    facts: GGUFFacts
    file_size: int
    options: Options  # fully merged; the load-time fields pick the runner
    backend: str | None = None
    projector: GGUFFacts | None = None
    projector_size: int = 0

    def context_length(self) -> int:
        ctx = self.facts.context_length or self.options.num_ctx
        return max(4, min(self.options.num_ctx, ctx))


def estimate_memory(spec: LoadSpec, parallel: int, kv_cache_type: str = "f16") -> int:
    """Bytes a runner needs: the file, a KV cache of `parallel` x num_ctx cells of
    `kv_cache_type`, compute buffers (the estimate the backend's fit check lays out), the
    projector file's weights and image-encoding buffers, a draft model's file, cache and
    buffers, and the process itself."""
    opts = spec.options
    need = layout.estimate(
        spec.facts.kv,
        spec.file_size,
        num_ctx=opts.num_ctx,
        num_batch=opts.num_batch,
        kv_cache_type=kv_cache_type,
        sequences=parallel,
    )
    projector = 0
    if spec.projector is not None:
        projector = layout.estimate_projector(spec.projector.kv, spec.projector_size).total
    draft = 0
    if spec.ref.draft is not None:  # a draft model: its weights and a cache like the model's
        kv = _draft_kv(spec.ref.draft)
        draft = layout.estimate(kv, spec.ref.draft.stat().st_size, num_ctx=opts.num_ctx,
                                num_batch=opts.num_batch, kv_cache_type=kv_cache_type,
                                sequences=parallel).total  # fmt: skip
    return need.total + projector + draft + RUNNER_OVERHEAD


@functools.lru_cache(maxsize=8)
def _draft_kv(blob: Path) -> dict[str, Any]:
    """A draft blob's GGUF metadata (a blob's content never changes: read it once)."""
    return open_gguf(blob).kv


def load_message(spec: LoadSpec, backend: str | None, parallel: int) -> dict[str, Any]:
    """The runner's `load` request for `spec` (`herd.runner.serve`'s protocol)."""
    ref = spec.ref
    return {
        "name": spec.name,
        "path": str(ref.model_path),
        "projector": str(ref.projector) if ref.projector is not None else None,
        "adapters": [str(p) for p in ref.adapters],
        "draft": str(ref.draft) if ref.draft is not None else None,
        "template": ref.template,
        "system": ref.system,
        "messages": list(ref.messages),
        "params": ref.params,
        "backend": backend,
        "options": asdict(spec.options),
        "parallel": parallel,
    }
