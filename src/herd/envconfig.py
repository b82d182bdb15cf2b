"""Every environment variable herd reads, read here and nowhere else.

Each is a function so tests can change the environment at run time.
"""

from __future__ import annotations

import os
from pathlib import Path


def _get(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def models_dir() -> Path:
    """Root of the model store (Ollama's layout). HERD_MODELS, default ~/.herd/models."""
    value = _get("HERD_MODELS")
    return Path(value).expanduser() if value else Path.home() / ".herd" / "models"


def cache_dir() -> Path:
    """Downloads that may be reused (catalog packages). HERD_CACHE, default ~/.cache/herd."""
    value = _get("HERD_CACHE")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "herd"


def backend() -> str:
    """Compute backend: auto (default), numpy, ggml. HERD_BACKEND."""
    return _get("HERD_BACKEND", "auto").lower() or "auto"


def debug() -> bool:
    return _get("HERD_DEBUG").lower() in ("1", "true", "yes")


def context_length() -> int:
    """Default num_ctx (HERD_CONTEXT_LENGTH, else OLLAMA_CONTEXT_LENGTH, else 4096)."""
    value = _get("HERD_CONTEXT_LENGTH") or _get("OLLAMA_CONTEXT_LENGTH")
    try:
        return int(value) if value else 4096
    except ValueError:
        return 4096


def kv_cache_type() -> str:
    """KV cache element type: f16 (default), q8_0, q4_0. HERD_KV_CACHE_TYPE."""
    return (_get("HERD_KV_CACHE_TYPE") or _get("OLLAMA_KV_CACHE_TYPE") or "f16").lower()


def nohistory() -> bool:
    return _get("HERD_NOHISTORY").lower() in ("1", "true", "yes")


def noprune() -> bool:
    """Keep blobs a pull no longer references (HERD_NOPRUNE, else OLLAMA_NOPRUNE)."""
    value = (_get("HERD_NOPRUNE") or _get("OLLAMA_NOPRUNE")).lower()
    return value in ("1", "true", "yes")


def registry_key() -> Path:
    """The ed25519 key that signs registry token requests, as Ollama's (HERD_KEY, default
    ~/.ollama/id_ed25519, so a key registered with ollama.com works for herd too)."""
    value = _get("HERD_KEY")
    return Path(value).expanduser() if value else Path.home() / ".ollama" / "id_ed25519"
