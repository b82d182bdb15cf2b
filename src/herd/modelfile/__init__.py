"""Modelfiles: Ollama's recipe for building a model (`herd create NAME -f Modelfile`)."""

from herd.modelfile.parser import (
    DEPRECATED,
    Command,
    Modelfile,
    parse,
    parse_value,
    quote,
    read,
    resolve_source,
)

__all__ = [
    "DEPRECATED",
    "Command",
    "Modelfile",
    "parse",
    "parse_value",
    "quote",
    "read",
    "resolve_source",
]
