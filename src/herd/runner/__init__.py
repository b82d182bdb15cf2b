"""One loaded model: its cache, the batch loop, prefix reuse, context shift, stop strings."""

from herd.runner.engine import Event, Runner
from herd.runner.options import Options

__all__ = ["Event", "Options", "Runner"]
