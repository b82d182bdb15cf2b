"""Images in both APIs' requests: Ollama's base64 `images` and OpenAI's `image_url` data
URLs, checked before the model loads and passed to the runner in base64 (the runner
decodes them; the pipeline says what is no image). herd fetches no URL.
"""

from __future__ import annotations

import re
from typing import Any

from herd.errors import BadRequestError


def has_images(body: dict[str, Any]) -> bool:
    """Whether a generate or chat request brings images (its own or its messages')."""
    messages = body.get("messages")
    messages = messages if isinstance(messages, list) else []
    return bool(body.get("images")) or any(
        isinstance(m, dict) and m.get("images") for m in messages
    )


_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")


def check_images(value: Any, where: str = "images") -> list[str]:
    """A request's `images`: base64 strings (standard alphabet, padded: what Go's JSON
    decoding of []byte takes, line breaks ignored), for the runner to decode: without the
    line breaks, else as sent. 400 for anything else, before the model loads."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequestError(f"{where} must be a list of base64-encoded strings")
    out = []
    for i, text in enumerate(value):
        text = text.replace("\r", "").replace("\n", "")
        data = text.encode("ascii", "replace")
        match = _BASE64.match(data)  # always matches, maybe only the empty prefix
        end = match.end() if match else 0
        if end < len(data) or len(data) % 4:
            at = end if end < len(data) else len(data) - len(data) % 4
            raise BadRequestError(
                f"invalid image data in {where}[{i}]: illegal base64 data at input byte {at}"
            )
        out.append(text)
    return out


# the data URLs Ollama's OpenAI layer takes (and "data:;base64," like /api/chat's bare base64)
_DATA_URL = re.compile(r"data:(?:image/(?:jpeg|jpg|png|webp|gif))?;base64,", re.IGNORECASE)


def image_data(url: str) -> str:
    """An `image_url` as base64 image data: only data URLs, herd fetches nothing (Ollama's
    words for an http(s) URL; "invalid image input" for anything else)."""
    if url.startswith(("http://", "https://")):
        raise BadRequestError(
            "image URLs are not currently supported, please use base64 encoded data instead"
        )
    prefix = _DATA_URL.match(url)
    if prefix is None:
        raise BadRequestError("invalid image input")
    try:
        return check_images([url[prefix.end() :]])[0]
    except BadRequestError:
        raise BadRequestError("invalid image input") from None
