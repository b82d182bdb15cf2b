"""Shared fixtures: the built-in real models, pulled once into a cached test store.

The store lives under HERD_CACHE (default ~/.cache/herd/test-models), outside any
checkout, so CI and later runs reuse the download; the user's own store is never touched.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from herd import envconfig


@pytest.fixture(scope="session")
def test_store():
    from herd.store import Store

    return Store(envconfig.cache_dir() / "test-models")


def _pulled(store, name: str) -> Path:
    from herd.store import resolve_or_pull

    return Path(resolve_or_pull(name, store=store).model_path)


@pytest.fixture(scope="session")
def smollm2_path(test_store) -> Path:
    return _pulled(test_store, "smollm2:135m")


@pytest.fixture(scope="session")
def gemma3_path(test_store) -> Path:
    return _pulled(test_store, "gemma3:270m")


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path, monkeypatch):
    """No test writes to the user's store by accident."""
    monkeypatch.setenv("HERD_MODELS", str(tmp_path / "models"))
