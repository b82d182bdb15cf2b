"""Llama logits against transformers (the research implementation), full and cached."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from herd.ml import available_backends  # noqa: E402
from herd.models import Batch  # noqa: E402

from .harness import Engine, hf_to_gguf, rel_err  # noqa: E402

TOL = {"numpy": 1e-4, "ggml": 1e-3, "mlx": 1e-4, "onnx": 1e-4}

CONFIGS = {
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "mqa-rope-linear": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
    "gqa-rope-llama3": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "rope_theta": 500000.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
}


def tiny_llama(seed: int, **overrides):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        **overrides,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def converted(request, tmp_path_factory):
    model = tiny_llama(sum(map(ord, request.param)), **CONFIGS[request.param])
    path = hf_to_gguf(model, "llama", tmp_path_factory.mktemp("llama") / "tiny.gguf")
    return model, path


@pytest.mark.parametrize("backend", available_backends())
def test_full_prompt_logits_match_transformers(converted, backend):
    model, path = converted
    ids = list(np.random.default_rng(0).integers(0, 128, size=40))
    ref = hf_logits(model, ids)
    out = Engine(path, backend).forward(Batch.single(ids, outputs="all"))
    assert out.shape == ref.shape
    assert rel_err(out, ref) < TOL[backend]


@pytest.mark.parametrize("backend", available_backends())
def test_cached_decode_equals_full_recompute(converted, backend):
    model, path = converted
    ids = list(np.random.default_rng(1).integers(0, 128, size=24))
    ref = hf_logits(model, ids)
    engine = Engine(path, backend)
    rows = [engine.forward(Batch.single(ids[:10], 0))[0]]
    for i in range(10, len(ids)):
        rows.append(engine.forward(Batch.single([ids[i]], i))[0])
    assert rel_err(np.stack(rows), ref[9:]) < TOL[backend]
