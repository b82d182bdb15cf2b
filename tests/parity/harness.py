"""Tiny random Hugging Face models, converted to GGUF by the architecture's converter."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
from gpu import NUM_GPU

from herd.gguf import open_gguf
from herd.gguf.writer import write_gguf
from herd.ml import BackendOptions, DType, open_backend
from herd.models import Batch, batch_inputs, load_model


def hf_to_gguf(hf_model: Any, arch: str, path: Path) -> Path:
    """Convert an in-memory transformers model with herd.models.<arch>.convert."""
    conv = importlib.import_module(f"herd.models.{arch}.convert")
    cfg = hf_model.config.to_dict()
    tensors = []
    for name, value in hf_model.state_dict().items():
        out = conv.tensor(cfg, name, value.detach().float().numpy())
        if out is not None:
            tensors.append((out[0], np.ascontiguousarray(out[1], dtype=np.float32), None))
    factors = getattr(conv, "llama3_rope_factors", lambda c: None)(cfg)
    if factors is not None:
        tensors.append(("rope_freqs.weight", factors, None))
    return write_gguf(path, arch, conv.kv(cfg), tensors)


class Engine:
    """A converted model on one backend, driven batch by batch."""

    def __init__(
        self,
        path: Path,
        backend: str,
        capacity: int = 256,
        sequences: int = 2,
        extra: dict | None = None,
    ):
        self.gguf = open_gguf(path)
        # HERD_TEST_NUM_GPU: offloaded layers on backends that have devices (default -1)
        options = BackendOptions(num_gpu=NUM_GPU, **(extra or {}))
        self.backend = open_backend(backend, self.gguf, options)
        self.model = load_model(self.gguf.config(), self.backend)
        self.model.cache.init(self.backend, DType.F32, sequences, capacity, capacity)

    def forward(self, batch: Batch) -> np.ndarray:
        with self.backend.new_context() as ctx:  # as the runner builds a pass
            self.model.cache.start_forward(ctx, batch)
            (out,) = ctx.compute(self.model.forward(ctx, batch_inputs(ctx, batch)))
        return out


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())
