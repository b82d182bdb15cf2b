"""Images in prompts: the encoder-output cache and the keys image placeholders have.

A chat client sends the whole conversation every turn, images included, so the same image
comes back again and again. Each distinct image (by the digest of its bytes) is encoded
once and its output kept here, least recently used first out, like Ollama's
multimodalStore; a request that brings it again finds it without running the encoder.

A prompt is a list of ints. Text tokens are their ids (>= 0); an image's placeholder
tokens get negative keys, one per row, that name the image and the row: equal keys mean
the same image at the same row, so comparing two prompts for a common prefix (the slot's
cache reuse) treats images as part of the prefix, and a different image at the same place
ends it. `token` turns a key back into the id the model is given (the placeholder's).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from herd.errors import CapabilityError
from herd.models import BatchImage, Pixels

ROWS = 1 << 16  # rows (placeholders) one image may have in a key
V = TypeVar("V")


class LRU(Generic[V]):
    """At most `capacity` values by key, the least recently used out first; thread-safe
    (the server prepares requests on many threads)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: V) -> V:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value


@dataclass(frozen=True)
class Image:
    """A decoded, preprocessed image of a request, ready to encode."""

    digest: str  # "sha256:<hex>" of the bytes as sent
    pixels: Pixels
    tokens: int  # its placeholders in the prompt


class ImageCache:
    """Encoded images by digest (at most `capacity` kept), and the keys of their rows.

    `encode(pixels) -> np.ndarray` runs the model's encoder; `encoded` counts its runs.
    """

    def __init__(self, encode: Callable[[Pixels], np.ndarray], capacity: int = 32) -> None:
        self._encode = encode
        self._outputs: LRU[np.ndarray] = LRU(capacity)
        self._serials: dict[str, int] = {}  # digest -> the number in its keys
        self.encoded = 0

    def embedding(self, image: Image) -> np.ndarray:
        """The encoder's output for the image: kept, or computed now and kept."""
        out = self._outputs.get(image.digest)
        if out is None:
            out = self._outputs.put(image.digest, self._encode(image.pixels))
            self.encoded += 1
        return out

    def keys(self, image: Image) -> list[int]:
        """The keys of the image's placeholder rows (the same for the same bytes)."""
        assert image.tokens < ROWS
        serial = self._serials.setdefault(image.digest, len(self._serials))
        base = -(serial * ROWS) - 1
        return [base - row for row in range(image.tokens)]


def split_key(key: int) -> tuple[int, int]:
    """(image serial, row) of a placeholder's key."""
    serial, row = divmod(-key - 1, ROWS)
    return serial, row


def span_start(items: list[int], i: int) -> int:
    """Index of the first row of the image span holding items[i] (i itself for text, or
    for the end of the list): where a prompt may be cut without splitting an image."""
    if i >= len(items) or items[i] >= 0:
        return i
    return i - split_key(items[i])[1]


def fits(
    items: list[int], room: int, whole: bool, images: dict[int, tuple[np.ndarray, int]]
) -> int:
    """How many of `items` go in a batch with `room` left: up to `room`, but an image's
    rows never split (they attend to each other, and the model takes the encoder output
    whole). An image longer than the room waits for a batch of its own and then, `whole`
    (the batch is empty), goes in whole even past `num_batch`. `images`: (encoder
    output, rows) by image serial."""
    if len(items) <= room:
        return len(items)
    cut = span_start(items, room)
    if cut == 0 and whole:  # the image at the front: all of its rows
        return images[split_key(items[0])[0]][1]
    return cut


def whole_spans(items: list[int], rows: dict[int, int]) -> list[int]:
    """`items` without the rows of image spans that lost some of their rows (a truncated
    prompt); `rows`: placeholders of each image serial."""
    out: list[int] = []
    i = 0
    while i < len(items):
        key = items[i]
        if key >= 0:
            out.append(key)
            i += 1
            continue
        serial, row = split_key(key)
        n = rows[serial]
        span = items[i : i + n]
        whole = row == 0 and len(span) == n and span == [key - r for r in range(n)]
        if whole:
            out += span
            i += n
        else:  # skip this partial run of the image's rows
            i += 1
            while i < len(items) and items[i] < 0 and split_key(items[i])[0] == serial:
                if split_key(items[i])[1] == 0:
                    break
                i += 1
    return out


def batch_images(
    items: list[int], offset: int, encoded: dict[int, tuple[np.ndarray, int]]
) -> list[BatchImage]:
    """The images whose spans start in `items` (batch rows from `offset` on)."""
    out = []
    for i, key in enumerate(items):
        if key < 0:
            serial, row = split_key(key)
            if row == 0:
                embedding, rows = encoded[serial]
                out.append(BatchImage(offset + i, rows, embedding))
    return out


def place_images(
    cache: ImageCache | None, tokens: list[int], images: Sequence[tuple[int, Image]]
) -> tuple[list[int], dict[int, tuple[np.ndarray, int]]]:
    """The prompt with each image's placeholders (at its start index) replaced by the
    image's keys, and the images' encoder outputs (kept or computed now) by serial."""
    items, encoded = list(tokens), {}
    if images and cache is None:
        raise CapabilityError("this model does not take images")
    for start, image in images:
        assert cache is not None
        keys = cache.keys(image)
        items[start : start + image.tokens] = keys
        encoded[split_key(keys[0])[0]] = (cache.embedding(image), image.tokens)
    return items, encoded


def token_ids(image_token: int | None, items: list[int]) -> list[int]:
    """Token ids of prompt items: image keys become the placeholder token (`image_token`;
    None for a model without images)."""
    if image_token is None:
        return list(items)
    return [k if k >= 0 else image_token for k in items]
