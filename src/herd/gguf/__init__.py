"""GGUF files: a fast reader with typed config access, and writing through the `gguf` package."""

from herd.gguf.reader import Config, GGUFFile, TensorInfo, open_gguf

__all__ = ["Config", "GGUFFile", "TensorInfo", "open_gguf"]
