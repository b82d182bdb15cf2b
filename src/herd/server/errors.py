"""The one place where errors become HTTP statuses: matched by type, most specific first."""

from __future__ import annotations

from herd.errors import (
    BadRequestError,
    CacheFullError,
    CapabilityError,
    ContextLengthError,
    DownloadError,
    GrammarError,
    HerdError,
    ImageError,
    InsufficientMemoryError,
    InvalidNameError,
    ModelNotFoundError,
    NotImplementedYetError,
    OptionError,
    QueueFullError,
    RunnerError,
    TemplateError,
    UnauthorizedError,
    UnsupportedModelError,
)

# A subclass must come before its base; anything not listed is a 500.
_STATUS: list[tuple[type[HerdError], int]] = [
    (BadRequestError, 400),
    (OptionError, 400),
    (InvalidNameError, 400),
    (TemplateError, 400),
    (GrammarError, 400),
    (ContextLengthError, 400),
    (CapabilityError, 400),
    (ImageError, 400),
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


def status_for(exc: BaseException) -> int:
    """The HTTP status Ollama answers for this error (500 for anything unexpected)."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


# A client told "busy" (503, the queue past HERD_MAX_QUEUE) is told when to come back, so
# it backs off instead of hammering the server (RFC 9110 Retry-After, in seconds)
RETRY_AFTER_S = 1


def headers_for(exc: BaseException) -> dict[str, str]:
    """Response headers an error answers with besides its body."""
    return {"Retry-After": str(RETRY_AFTER_S)} if isinstance(exc, QueueFullError) else {}


def openai_type(status: int) -> str:
    """OpenAI's error `type` for a status, as Ollama's compatibility layer names them."""
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        503: "overloaded_error",
    }.get(status, "api_error")
