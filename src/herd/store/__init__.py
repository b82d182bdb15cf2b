"""Ollama-layout model store: names, manifests, blobs, and the catalog of built-in models."""

from herd.store.names import Name
from herd.store.pull import pull, resolve_or_pull
from herd.store.store import ModelEntry, ModelRef, Store

__all__ = ["ModelEntry", "ModelRef", "Name", "Store", "pull", "resolve_or_pull"]
