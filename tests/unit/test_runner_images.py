"""The runner's image bookkeeping: keys that make images part of a prompt's prefix, spans
that are never cut, and the encoder-output cache by digest."""

from __future__ import annotations

import numpy as np

from herd.runner.images import (
    Image,
    ImageCache,
    batch_images,
    fits,
    span_start,
    split_key,
    whole_spans,
)


def _cache() -> tuple[ImageCache, list[object]]:
    runs: list[object] = []

    def encode(pixels: object) -> np.ndarray:
        runs.append(pixels)
        return np.full((3, 2), float(len(runs)), np.float32)

    return ImageCache(encode, capacity=2), runs


def test_same_bytes_same_keys_and_one_encoder_run() -> None:
    cache, runs = _cache()
    a, a_again = Image("sha256:a", "pix-a", 3), Image("sha256:a", "pix-a2", 3)
    b = Image("sha256:b", "pix-b", 3)
    assert cache.keys(a) == cache.keys(a_again)
    assert cache.keys(a) != cache.keys(b)
    assert all(k < 0 for k in cache.keys(a) + cache.keys(b))
    first = cache.embedding(a)
    assert np.array_equal(cache.embedding(a_again), first)
    assert runs == ["pix-a"] and cache.encoded == 1
    cache.embedding(b)
    assert cache.encoded == 2
    # the keys say which image and which row
    assert [split_key(k) for k in cache.keys(b)] == [(1, 0), (1, 1), (1, 2)]


def test_least_recently_used_image_is_encoded_again() -> None:
    cache, _ = _cache()
    images = [Image(f"sha256:{c}", c, 1) for c in "abc"]
    for image in images:
        cache.embedding(image)
    cache.embedding(images[2])  # kept
    assert cache.encoded == 3
    cache.embedding(images[0])  # a fell out (capacity 2)
    assert cache.encoded == 4


def test_prompts_are_cut_between_images_never_inside() -> None:
    cache, _ = _cache()
    keys = cache.keys(Image("sha256:a", None, 3))
    items = [5, 6, *keys, 7]
    assert span_start(items, 1) == 1  # text
    assert span_start(items, 2) == 2  # an image's first row
    assert span_start(items, 4) == 2  # inside it: back to its start
    assert span_start(items, 6) == 6  # the end


def test_truncation_drops_images_it_cut() -> None:
    cache, _ = _cache()
    a = cache.keys(Image("sha256:a", None, 3))
    b = cache.keys(Image("sha256:b", None, 2))
    rows = {split_key(a[0])[0]: 3, split_key(b[0])[0]: 2}
    whole = [1, *a, 2, *b, 3]
    assert whole_spans(whole, rows) == whole
    assert whole_spans([1, a[0], a[1], 2, *b, 3], rows) == [1, 2, *b, 3]  # a lost its tail
    assert whole_spans([a[2], 2, b[1], 3], rows) == [2, 3]  # heads lost
    # the same image twice in a row: two whole spans
    assert whole_spans([*a, *a], rows) == [*a, *a]


def test_batch_images_by_row() -> None:
    cache, _ = _cache()
    image = Image("sha256:a", None, 2)
    keys = cache.keys(image)
    serial = split_key(keys[0])[0]
    emb = np.ones((2, 4), np.float32)
    out = batch_images([9, *keys, 8], 10, {serial: (emb, 2)})
    assert [(b.row, b.rows) for b in out] == [(11, 2)]
    assert out[0].embedding is emb


def test_a_batch_takes_an_image_whole_or_not_at_all() -> None:
    cache, _ = _cache()
    keys = cache.keys(Image("sha256:a", None, 3))
    images = {split_key(keys[0])[0]: (np.zeros((3, 2), np.float32), 3)}
    items = [1, 2, *keys, 4]
    assert fits(items, 10, False, images) == 6  # all of it fits
    assert fits(items, 3, False, images) == 2  # the room ends inside the image: before it
    assert fits(items[2:], 2, False, images) == 0  # the image waits for a batch of its own
    assert fits(items[2:], 2, True, images) == 3  # which takes it whole past its room
