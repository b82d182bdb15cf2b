"""Which devices the backend tests use: HERD_TEST_NUM_GPU layers offloaded (default -1,
herd's own default: every layer that fits on a GPU when ggml was built with one; 0: the
CPU only), and whether the installed ggml has a GPU at all."""

from __future__ import annotations

import os

NUM_GPU = int(os.environ.get("HERD_TEST_NUM_GPU", "-1"))


def ggml_gpus() -> list[str]:
    """Names of the GPUs the installed ggml can use (none without ggml-python)."""
    try:
        from herd.ml.backends.ggml.devices import probe_devices
    except ImportError:
        return []
    return [d.info.name for d in probe_devices() if d.info.kind in ("gpu", "igpu")]
