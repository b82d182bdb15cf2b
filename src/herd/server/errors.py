"""The server's own errors, and the one place where errors become HTTP statuses."""

from __future__ import annotations

from herd.errors import (
    CacheFullError,
    DownloadError,
    GrammarError,
    HerdError,
    InvalidNameError,
    ModelNotFoundError,
    OptionError,
    TemplateError,
    UnsupportedModelError,
)


class BadRequestError(HerdError):
    """The request body is not what the endpoint takes (bad JSON, a field of the wrong type)."""


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
    """A runner process failed: it crashed, or did not load in time."""


class RemoteError(HerdError):
    """An error a runner process reported; `kind` is the HerdError class name it raised."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class NotImplementedYetError(HerdError):
    """An endpoint or feature herd does not have yet."""


_STATUS: list[tuple[type[HerdError], int]] = [
    (BadRequestError, 400),
    (OptionError, 400),
    (InvalidNameError, 400),
    (TemplateError, 400),
    (GrammarError, 400),
    (UnauthorizedError, 401),
    (ModelNotFoundError, 404),
    (UnsupportedModelError, 501),
    (NotImplementedYetError, 501),
    (QueueFullError, 503),
    (InsufficientMemoryError, 500),
    (RunnerError, 500),
    (CacheFullError, 500),
    (DownloadError, 500),
]
_REMOTE_STATUS = {cls.__name__: status for cls, status in _STATUS}
_REMOTE_STATUS.update(ContextLengthError=400, CapabilityError=400)


def status_for(exc: BaseException) -> int:
    """The HTTP status Ollama answers for this error (500 for anything unexpected)."""
    if isinstance(exc, RemoteError):
        return _REMOTE_STATUS.get(exc.kind, 500)
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def openai_type(status: int) -> str:
    """OpenAI's error `type` for a status, as Ollama's compatibility layer names them."""
    return {400: "invalid_request_error", 401: "authentication_error",
            404: "not_found_error", 503: "overloaded_error"}.get(status, "api_error")
