"""Hugging Face safetensors / PyTorch checkpoints -> GGUF (`herd convert`).

    from herd.convert import convert
    convert("path/to/hf-model", "model.gguf", outtype="f16")

The driver (`driver.py`) reads the directory and writes the file; each architecture's
renaming and fix-ups live in `herd/models/<arch>/convert.py`; `vocab.py` turns the
tokenizer files into `tokenizer.ggml.*` metadata.
"""

from herd.convert.driver import (
    OUTTYPES,
    convert,
    converter_for,
    converters,
    read_config,
    supported_architectures,
)

__all__ = [
    "OUTTYPES",
    "convert",
    "converter_for",
    "converters",
    "read_config",
    "supported_architectures",
]
