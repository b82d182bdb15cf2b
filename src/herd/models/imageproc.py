"""Images from bytes: decoding, the limits on what is decoded, and the shared pixel math.

`decode` turns the bytes a request carries (JPEG, PNG, WebP, GIF's first frame) into an
RGB `PIL.Image.Image` the way the research implementation prepares one: transformers'
image processors (`do_convert_rgb`) composite any transparency onto white, then take RGB.
It also applies the EXIF orientation, as transformers' `load_image` does for files, so a
phone photo is seen upright, as the user sees it. Anything else the bytes may be, a
truncated file, or an image over `ImageLimits` is an `ImageError`.

Each architecture's processor (`models/<arch>/process.py`) resizes the RGB image and
makes its float32 pixels with `normalize`.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from herd.errors import ImageError

FORMATS = ("JPEG", "PNG", "WEBP", "GIF")  # Pillow's names; nothing else is even tried
RESCALE = 1 / 255  # uint8 -> [0, 1], transformers' `rescale_factor` for every model here


@dataclass(frozen=True)
class ImageLimits:
    """How big an image may be; over either limit, `decode` raises `ImageError`.

    `max_bytes`: the encoded size (20 MiB, the per-image limit OpenAI's API documents).
    `max_pixels`: width * height, read from the header before any pixel is decoded
    (2**26, about 67 megapixels: every phone camera up to 64 MP; decoding one takes
    about 200 MB). Pillow's own decompression-bomb guard starts at 89.5 megapixels and
    refuses above 179: a larger `max_pixels` does not lift it.
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 1 << 26


def digest(data: bytes) -> str:
    """The key of an image's bytes (the encoder cache's): "sha256:<hex>"."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def decode(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """The image in `data` as RGB, fully loaded; `ImageError` for anything else."""
    if len(data) > limits.max_bytes:
        raise ImageError(f"image: {len(data)} bytes is over the limit of {limits.max_bytes} bytes")
    with warnings.catch_warnings():
        # Pillow warns above its own pixel limit; ours (checked below) gives the error
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.DecompressionBombError as e:
            raise ImageError(
                f"image: too many pixels, over the limit of {limits.max_pixels} pixels ({e})"
            ) from None
        except Exception as e:  # Pillow raises several types for what it cannot read
            raise ImageError(
                f"image: cannot decode {len(data)} bytes (not a JPEG, PNG, WebP or GIF image)"
            ) from e
        width, height = image.size
        if width * height > limits.max_pixels:
            raise ImageError(
                f"image: {width}x{height} is {width * height} pixels, over the limit of "
                f"{limits.max_pixels} pixels"
            )
        try:
            image.load()  # truncated or corrupt data fails here (never loaded partially)
            return to_rgb(ImageOps.exif_transpose(image))
        except MemoryError:
            raise
        except Exception as e:
            raise ImageError(
                f"image: the {image.format} image is truncated or corrupt ({e})"
            ) from e


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' `convert_to_rgb` makes it: an image with an alpha band or a
    transparent color is composited onto white first (palette and grayscale too)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 in transformers' order and precision: rescale
    in float64 then cast, subtract and divide in float32 (so values agree bit for bit)."""
    x = (pixels.astype(np.float64) * RESCALE).astype(np.float32)  # (H, W, 3)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, H, W)
