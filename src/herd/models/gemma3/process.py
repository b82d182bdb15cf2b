"""Gemma 3's image processor: what transformers' `Gemma3ImageProcessorPil` makes of an RGB
image with the defaults Gemma 3 stores (896x896, bilinear, rescale 1/255, mean and std
0.5, no pan-and-scan): one square picture, the aspect ratio not kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from herd.models.imageproc import normalize

SIZE = 896
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def preprocess(
    image: Image.Image,
    size: int = SIZE,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
) -> np.ndarray:
    """(3, size, size) float32 pixels of an RGB image (`imageproc.decode`'s)."""
    assert image.mode == "RGB", image.mode
    # transformers resizes the uint8 image with Pillow, then rescales and normalizes
    resized = image.resize((size, size), Image.Resampling.BILINEAR)
    return normalize(np.asarray(resized), mean, std)  # (3, size, size)
