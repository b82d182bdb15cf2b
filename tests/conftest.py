"""Shared fixtures: the built-in real models, pulled once into a cached test store.

The store lives under HERD_CACHE (default ~/.cache/herd/test-models), outside any
checkout, so CI and later runs reuse the download; the user's own store is never touched.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from herd import envconfig

sys.path.insert(0, str(Path(__file__).parent))  # lets fixtures use tests/parity/harness.py


@pytest.fixture(scope="session")
def test_store():
    from herd.store import Store

    return Store(envconfig.cache_dir() / "test-models")


def _pulled(store, name: str) -> Path:
    from herd.store import resolve_or_pull

    return Path(resolve_or_pull(name, store=store).model_path)


@pytest.fixture(scope="session")
def smollm2_path(test_store) -> Path:
    if path := os.environ.get("HERD_TEST_SMOLLM2"):  # a copy at hand (machines offline)
        return Path(path)
    return _pulled(test_store, "smollm2:135m")


@pytest.fixture(scope="session")
def gemma3_path(test_store) -> Path:
    return _pulled(test_store, "gemma3:270m")


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path, monkeypatch):
    """No test writes to the user's store, or talks to a `herd serve` the user started
    (the CLI uses a running server when one answers at HERD_HOST)."""
    monkeypatch.setenv("HERD_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("HERD_HOST", f"127.0.0.1:{_UNUSED_PORT}")
    monkeypatch.delenv("OLLAMA_HOST", raising=False)


def _unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_UNUSED_PORT = _unused_port()


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> Path:
    """A tiny random Llama (transformers) converted to GGUF by herd's llama converter."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from parity.harness import hf_to_gguf

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    return hf_to_gguf(model, "llama", tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf")
