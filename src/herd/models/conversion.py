"""What an architecture's converter (`models/<arch>/convert.py`) works with: a checkpoint
tensor not yet loaded (`TensorRef`) and the dtypes that can become weights.

These live with the models, not in `herd.convert`, because the convert driver imports
the architectures' converters: a converter importing `herd.convert` back would make a
cycle. The driver and its readers import them from here. The hooks a converter provides
are listed in `herd/convert/driver.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from herd.errors import ConvertError

FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors spellings


@dataclass(frozen=True)
class TensorRef:
    """One tensor in one file; `load()` returns it as C-contiguous float32."""

    file: Path
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: F32, F16, BF16, I64, ...
    _load: Callable[[], np.ndarray]

    def load(self) -> np.ndarray:
        if self.dtype not in FLOAT_DTYPES:
            raise ConvertError(
                f"{self.file.name}: tensor {self.name} has dtype {self.dtype}; "
                f"only {', '.join(FLOAT_DTYPES)} weights can be converted"
            )
        raw = self._load()
        if self.dtype == "BF16":
            out = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw.astype(np.float32, copy=False)
        return np.ascontiguousarray(out.reshape(self.shape))
