"""Ollama's request options: names, types, defaults, and merging.

Defaults follow Ollama (reference §7.7). Unknown names are ignored with a log line, as
Ollama does; a value of the wrong type is an OptionError naming the option.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace
from typing import Any

from herd.errors import OptionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    # load-time (changing them rebuilds the runner)
    num_ctx: int = 4096
    num_batch: int = 512
    num_gpu: int = -1
    num_thread: int = 0
    # per request
    num_keep: int = 4
    seed: int = -1
    num_predict: int = -1
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_last_n: int = 64
    temperature: float = 0.8
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = field(default_factory=tuple)

    def merged(self, values: dict[str, Any] | None) -> Options:
        """These options with `values` (Ollama names) laid over them."""
        if not values:
            return self
        known = {f.name: f for f in fields(self)}
        changes: dict[str, Any] = {}
        for name, value in values.items():
            if name not in known:
                log.warning("ignoring unknown option %r", name)
                continue
            if value is None:
                continue
            changes[name] = _coerce(name, known[name].type, value)
        return replace(self, **changes)

    def load_key(self) -> tuple[int, int, int, int]:
        return (self.num_ctx, self.num_batch, self.num_gpu, self.num_thread)


def _coerce(name: str, kind: Any, value: Any) -> Any:
    kind = str(kind)
    if kind == "tuple[str, ...]":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(s, str) for s in items):
            raise OptionError(f"option {name!r} must be a string or a list of strings")
        return tuple(items)
    if isinstance(value, bool):
        raise OptionError(f"option {name!r} must be a number, not {value!r}")
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise OptionError(f"option {name!r} must be an integer, not {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise OptionError(f"option {name!r} must be a number, not {value!r}")
