"""GGUF files: a fast reader with typed config access (`reader`), the one writer, streaming
front to back (`writer`), and the one quantizer (`quants`)."""

from herd.gguf.reader import Config, GGUFFile, TensorInfo, open_gguf

__all__ = ["Config", "GGUFFile", "TensorInfo", "open_gguf"]
