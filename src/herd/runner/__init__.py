"""One loaded model: its cache, the batch loop, prefix reuse, context shift, stop strings;
and the request pipeline that both the library and the runner process go through."""

from herd.runner.engine import Runner
from herd.runner.loaded import Loaded, Source
from herd.runner.pipeline import Prepared, Request, finish, prepare, prepare_embed
from herd.runner.sequence import Event

__all__ = [
    "Event",
    "Loaded",
    "Prepared",
    "Request",
    "Runner",
    "Source",
    "finish",
    "prepare",
    "prepare_embed",
]
