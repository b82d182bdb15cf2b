"""One memory estimate: the server's scheduler (before it starts a runner) and the
backend's fit check (when the runner opens the model) count the same bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from herd.gguf import open_gguf
from herd.gguf.writer import write_gguf
from herd.ml import BackendOptions, DeviceInfo
from herd.ml.layout import plan
from herd.options import Options
from herd.server import loadspec as sched
from herd.store import ModelRef
from herd.store.ggufinfo import describe

N_LAYERS, D, VOCAB = 3, 64, 80


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Llama with a vocabulary and per-layer KV head counts in its metadata."""
    w = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    tensors = [("token_embd.weight", w(VOCAB, D), None), ("output_norm.weight", w(D), None)]
    for i in range(N_LAYERS):
        tensors += [
            (f"blk.{i}.attn_q.weight", w(D, D), None),
            (f"blk.{i}.ffn_up.weight", w(96, D), None),
        ]
    kv = {
        "llama.block_count": N_LAYERS,
        "llama.embedding_length": D,
        "llama.feed_forward_length": 96,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": [2, 1, 2],
        "llama.context_length": 512,
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(VOCAB)],
    }
    return write_gguf(tmp_path_factory.mktemp("est") / "m.gguf", "llama", kv, tensors)


@pytest.mark.parametrize("cache_type", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("num_ctx", [128, 4096], ids=["ctx-128", "ctx-over-model"])
@pytest.mark.parametrize("parallel", [1, 3])
def test_scheduler_and_fit_check_agree(model: Path, cache_type: str, num_ctx: int, parallel: int):
    gguf, size = open_gguf(model), model.stat().st_size
    options = Options(num_ctx=num_ctx, num_batch=256)
    ref = ModelRef("m", model, None, None, {}, [], digest="d")
    spec = sched.LoadSpec("m", ref, describe(gguf), size, options)
    backend_options = BackendOptions(
        num_gpu=0, num_ctx=num_ctx, num_batch=256, kv_cache_type=cache_type
    )
    cpu = DeviceInfo("cpu", "cpu", 1 << 40, 1 << 40)
    need = plan(gguf, backend_options, [], cpu).needs[-1]  # one sequence's cells
    assert need.cache > 0 and need.graph > 0
    scheduled = sched.estimate_memory(spec, parallel, cache_type) - sched.RUNNER_OVERHEAD
    assert scheduled == size + parallel * need.cache + need.graph
    assert need.weights <= size  # the file: the tensors and the metadata before them
