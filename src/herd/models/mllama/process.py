"""Llama 3.2 Vision's image processor: what transformers' `MllamaImageProcessorPil` makes of
an RGB image with the defaults Llama 3.2 Vision stores (560-pixel tiles, at most 4,
bilinear, rescale 1/255, CLIP's mean and std).

The image goes on a canvas of whole tiles, (h_tiles, w_tiles) with h_tiles * w_tiles <=
max_tiles: the canvas that needs the least upscaling, or else the least downscaling, the
smaller area on a tie. It is resized to fit the canvas keeping its aspect ratio (never
below one tile on a side), padded with black on the bottom and right, normalized, and
cut into tiles in row-major order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from herd.models.imageproc import normalize

TILE_SIZE = 560
MAX_TILES = 4
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Tiles:
    """An image as mllama's vision encoder takes it.

    `pixels` (n_tiles, 3, tile, tile) float32: the tiles in row-major order of the canvas.
    `aspect_ratio` (h_tiles, w_tiles): the canvas in tiles; n_tiles = h_tiles * w_tiles.
    `aspect_ratio_id`: 1 + its index in `aspect_ratios(max_tiles)` (0 is HF's padding).

    HF's processor output for a batch of images is made of these: `pixel_values` (batch,
    images, max_tiles, 3, tile, tile) holds `pixels` at [b, i, :n_tiles] and zeros after
    (`padded` gives that slice); `aspect_ratio_ids[b, i]` = `aspect_ratio_id`;
    `aspect_ratio_mask[b, i]` (max_tiles,) is 1 for the first n_tiles tiles, else 0;
    `num_tiles[b][i]` = `n_tiles`.
    """

    pixels: np.ndarray
    aspect_ratio_id: int
    aspect_ratio: tuple[int, int]

    @property
    def n_tiles(self) -> int:
        return self.aspect_ratio[0] * self.aspect_ratio[1]

    def padded(self, max_tiles: int = MAX_TILES) -> tuple[np.ndarray, np.ndarray]:
        """(max_tiles, 3, tile, tile) pixels padded with zero tiles, and the (max_tiles,)
        int64 aspect-ratio mask: HF's `pixel_values[b, i]` and `aspect_ratio_mask[b, i]`."""
        pixels = np.zeros((max_tiles, *self.pixels.shape[1:]), np.float32)
        pixels[: self.n_tiles] = self.pixels
        mask = np.zeros(max_tiles, np.int64)
        mask[: self.n_tiles] = 1
        return pixels, mask


@lru_cache(maxsize=8)
def aspect_ratios(max_tiles: int = MAX_TILES) -> tuple[tuple[int, int], ...]:
    """The canvases (h_tiles, w_tiles) in id order: for max_tiles 4, (1, 1), (1, 2), (1, 3),
    (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)."""
    return tuple(
        (h, w)
        for h in range(1, max_tiles + 1)
        for w in range(1, max_tiles + 1)
        if h * w <= max_tiles
    )


def canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """The canvas (h_tiles, w_tiles) for an image of height x width pixels."""
    options = aspect_ratios(max_tiles)
    # the scale that fits the image in each canvas
    scales = [min(h * tile / height, w * tile / width) for h, w in options]
    up = [s for s in scales if s >= 1]
    best = min(up) if up else max(scales)
    ties = [hw for hw, s in zip(options, scales, strict=True) if s == best]
    return min(ties, key=lambda hw: hw[0] * hw[1])  # the first of the smallest area


def fit(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """(new height, new width): the image scaled to fit the canvas, aspect ratio kept,
    each side clamped to [tile, canvas side] first."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def preprocess(
    image: Image.Image,
    tile: int = TILE_SIZE,
    max_tiles: int = MAX_TILES,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
) -> Tiles:
    """The tiles of an RGB image (`imageproc.decode`'s)."""
    assert image.mode == "RGB", image.mode
    width, height = image.size
    h_tiles, w_tiles = canvas(height, width, max_tiles, tile)
    new_h, new_w = fit(height, width, h_tiles * tile, w_tiles * tile, tile)
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BILINEAR))
    # padded before normalizing, as transformers does: the padding is black, not zero
    board = np.zeros((h_tiles * tile, w_tiles * tile, 3), np.uint8)
    board[:new_h, :new_w] = resized
    x = normalize(board, mean, std)  # (3, h_tiles * tile, w_tiles * tile)
    x = x.reshape(3, h_tiles, tile, w_tiles, tile).transpose(1, 3, 0, 2, 4)
    pixels = np.ascontiguousarray(x.reshape(h_tiles * w_tiles, 3, tile, tile))
    ratio = (h_tiles, w_tiles)
    return Tiles(pixels, aspect_ratios(max_tiles).index(ratio) + 1, ratio)
