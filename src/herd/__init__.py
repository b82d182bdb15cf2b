"""herd: a local LLM runtime with Ollama's store, API and CLI (see docs/ARCHITECTURE.md).

`herd.load` and `herd.LLM` are imported on first use, so importing a leaf module
(`herd.gguf`, `herd.errors`) stays cheap.
"""

from typing import Any

from herd.errors import HerdError

__version__ = "0.1.0"
__all__ = ["LLM", "HerdError", "__version__", "load"]


def __getattr__(name: str) -> Any:
    if name in ("load", "LLM"):
        from herd import api

        return getattr(api, name)
    raise AttributeError(f"module 'herd' has no attribute {name!r}")
