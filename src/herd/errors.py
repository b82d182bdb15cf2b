"""Typed exceptions raised at herd's boundaries.

Every error a user can cause derives from `HerdError`; the CLI prints its message on one
line and exits non-zero, the server maps it to an HTTP status by type (`server/errors.py`).
A runner process sends its errors over the pipe as `{"error": message, "type": class name}`
and the server rebuilds them with `error_from_name`. Anything else is a bug.
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


class ImageError(HerdError):
    """Bytes that are not an image herd can read (format, truncation, size limits)."""


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


class ConvertError(HerdError):
    """A Hugging Face directory that cannot be converted (bad file, tensor, or config)."""


class AdapterError(HerdError):
    """A LoRA adapter that is not one, or that does not fit its base model (architecture,
    a tensor the base lacks, shapes), named by tensor."""


class ContextLengthError(HerdError):
    """A prompt longer than the context with `truncate: false`."""


class CapabilityError(HerdError):
    """The model cannot do what the request asks (generate with an embedding model)."""


class BadRequestError(HerdError):
    """The request body is not what the endpoint takes (bad JSON, a field of the wrong type)."""


class InvalidTokenError(BadRequestError):
    """A token id a request carries (`context` on /api/generate) that is not in the
    model's vocabulary: refused before it reaches a backend, whose lookup would abort."""


class DraftError(BadRequestError):
    """A speculative-decoding draft model that cannot draft for its target (another
    vocabulary, an embedding model)."""


class UnauthorizedError(HerdError):
    """A missing or wrong API key."""


class QueueFullError(HerdError):
    """More requests are waiting than HERD_MAX_QUEUE allows."""

    def __init__(self) -> None:
        # Ollama's ErrMaxQueue, two spaces included
        super().__init__("server busy, please try again.  maximum pending requests exceeded")


class InsufficientMemoryError(HerdError):
    """The model, its KV cache and compute buffers do not fit in the memory left."""


class RunnerError(HerdError):
    """A runner process failed: it crashed, did not load in time, or raised something that
    is not a HerdError (a bug)."""


class NonFiniteError(HerdError):
    """The model produced non-finite values (NaN or infinity) for a request: broken weights
    or a numeric overflow. The request ends; the runner goes on serving the others."""


class NotImplementedYetError(HerdError):
    """An endpoint or feature herd does not have yet."""


# The errors a runner process can send by name: those built from their message alone (the
# others format their message from fields the pipe does not carry).
_BY_NAME: dict[str, type[HerdError]] = {
    cls.__name__: cls
    for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, HerdError) and cls.__init__ is Exception.__init__
}


def error_from_name(type_name: str, message: str) -> HerdError:
    """The typed error a runner process reported as `{"error": message, "type": type_name}`.

    Names herd does not rebuild (a RuntimeError, an error with fields) become RunnerError,
    with the message as sent.
    """
    return _BY_NAME.get(type_name, RunnerError)(message)
