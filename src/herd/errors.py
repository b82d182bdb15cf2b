"""Typed exceptions raised at herd's boundaries.

Every error a user can cause derives from `HerdError`; the CLI prints its message on one
line and exits non-zero, the server maps it to an HTTP status. Anything else is a bug.
"""

from __future__ import annotations


class HerdError(Exception):
    """Base class of every error herd raises on purpose."""


class GGUFError(HerdError):
    """A file is not a readable GGUF (wrong magic, truncated, inconsistent tensors)."""


class UnsupportedModelError(HerdError):
    """The model's architecture (or one of its features) is not implemented."""


class WeightError(HerdError):
    """A tensor the architecture needs is missing or has the wrong shape."""


class ModelNotFoundError(HerdError):
    """No model by that name in the store (and none to pull)."""


class InvalidNameError(HerdError):
    """A model name that does not follow Ollama's naming rules."""


class DownloadError(HerdError):
    """A pull failed: network, digest mismatch, interrupted transfer."""


class ModelfileError(HerdError):
    """A Modelfile that does not parse or names something that does not exist.

    `line` and `column` are 1-based; 0 when the problem has no single place (missing FROM).
    """

    def __init__(self, message: str, line: int = 0, column: int = 0, path: str = "Modelfile"):
        self.message, self.line, self.column, self.path = message, line, column, path
        where = f"{path}:{line}:{column}" if line else path
        super().__init__(f"{where}: {message}")


class RegistryError(DownloadError):
    """A registry answered with an error, refused access, or broke the protocol."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class CacheFullError(HerdError):
    """The KV cache has no free cells for the batch."""


class TokenizerError(HerdError):
    """The GGUF's tokenizer metadata is missing or of an unsupported kind."""


class TemplateError(HerdError):
    """A chat template failed to parse or render."""


class GrammarError(HerdError):
    """A structured-output format (JSON schema) that is invalid or that the grammar
    engine does not support, or a constrained sequence that can go no further."""


class OptionError(HerdError):
    """An option has an unknown name or a value of the wrong type."""


class BackendError(HerdError):
    """A compute backend is unavailable or failed."""


class OutOfMemoryError(BackendError):
    """A model, KV cache or compute buffer does not fit in a device's free memory."""
