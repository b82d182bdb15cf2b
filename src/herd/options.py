"""Ollama's model options (`api.Options` and `api.Runner`): the one table of them.

`Options` below is that table: one line per option with its type, its default (Ollama's
`DefaultOptions`) and whether it is load-time (changing it rebuilds the runner). `OPTIONS`
reads it back by name, with each option's Go kind, for everything that needs to know the
options: the server (requests: JSON values, unknown names ignored with a log line), the
Modelfile parser and the CLI's `/set parameter` (text, through `parse_text`, Ollama's
`api.FormatParams`: unknown names are an error there).
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
from dataclasses import dataclass, field, fields, replace
from typing import Any, get_type_hints

from herd.errors import OptionError

log = logging.getLogger(__name__)


def _option(default: Any, *, load_time: bool = False) -> Any:
    return field(default=default, metadata={"load_time": load_time})


@dataclass(frozen=True)
class Options:
    """One request's options, fully merged (defaults < model parameters < request)."""

    # load-time (Ollama's api.Runner)
    num_ctx: int = _option(4096, load_time=True)
    num_batch: int = _option(512, load_time=True)
    num_gpu: int = _option(-1, load_time=True)  # layers to offload; -1: as many as fit
    main_gpu: int = _option(0, load_time=True)  # accepted; layers go where most is free
    num_thread: int = _option(0, load_time=True)  # 0: the backend's default
    use_mmap: bool = _option(True, load_time=True)  # accepted; the file is mapped where it can be
    # per request
    # speculative decoding (herd.runner.speculate): tokens proposed at first per step,
    # then adapted to the acceptance rate within 1..16; 0 turns speculation off
    draft_num_predict: int = _option(4)
    # prompt-lookup decoding: proposals follow an earlier occurrence of the last n-gram of
    # up to this many tokens (llama-cpp-python's max_ngram_size); 0: off (herd's option)
    lookup_ngram: int = _option(0)
    num_keep: int = _option(4)
    seed: int = _option(-1)
    num_predict: int = _option(-1)
    top_k: int = _option(40)
    top_p: float = _option(0.9)
    min_p: float = _option(0.0)
    typical_p: float = _option(1.0)
    repeat_last_n: int = _option(64)
    temperature: float = _option(0.8)
    repeat_penalty: float = _option(1.0)
    presence_penalty: float = _option(0.0)
    frequency_penalty: float = _option(0.0)
    stop: tuple[str, ...] = _option(())

    def merged(self, values: dict[str, Any] | None) -> Options:
        """These options with `values` (Ollama names, JSON values) laid over them; unknown
        names are ignored with a log line, as Ollama does; a value of the wrong type is an
        OptionError naming the option."""
        if not values:
            return self
        changes: dict[str, Any] = {}
        for name, value in values.items():
            spec = OPTIONS.get(name)
            if spec is None:
                log.warning("ignoring unknown option %r", name)
                continue
            if value is None:
                continue
            changes[name] = check_range(name, _coerce(name, spec.type, value))
        return replace(self, **changes)

    def load_key(self) -> tuple[Any, ...]:
        """The load-time options: a runner serves requests whose key equals its own."""
        return tuple(getattr(self, name) for name in LOAD_TIME)

    def sampler_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `herd.sample.Sampler` (built once per request)."""
        return {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "min_p": self.min_p,
            "seed": self.seed,
            "repeat_penalty": self.repeat_penalty,
            "repeat_last_n": self.repeat_last_n,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }


@dataclass(frozen=True)
class OptionSpec:
    type: type  # int, float, bool, or tuple (of strings)
    default: Any
    load_time: bool
    kind: str  # the Go kind of Ollama's field: "int", "float", "bool", "[]string"


_KINDS: dict[type, str] = {int: "int", float: "float", bool: "bool", tuple: "[]string"}


def _table() -> dict[str, OptionSpec]:
    hints = get_type_hints(Options)
    out = {}
    for f in fields(Options):
        kind = getattr(hints[f.name], "__origin__", hints[f.name])  # tuple[str, ...] -> tuple
        out[f.name] = OptionSpec(kind, f.default, f.metadata["load_time"], _KINDS[kind])
    return out


OPTIONS: dict[str, OptionSpec] = _table()
LOAD_TIME = tuple(name for name, spec in OPTIONS.items() if spec.load_time)

# ---- ranges: what a value may be before it reaches a runner --------------------------------
INT32 = 2**31
FLOAT32_MAX = 3.4028234663852886e38  # Ollama keeps float32s: beyond is no float32 at all
# ggml's GGML_MAX_N_THREADS is 512; more threads than 4 per core only thrash (and the issue
# saw num_thread 1e30 end in bad_alloc)
MAX_THREADS = min(512, max(64, 4 * (os.cpu_count() or 1)))
# inclusive bounds; ints not listed are Go int32s, floats any finite float32
RANGES: dict[str, tuple[float, float]] = {
    "num_ctx": (0, INT32 - 1),
    "num_batch": (0, INT32 - 1),
    "num_gpu": (-1, INT32 - 1),  # -1: as many layers as fit
    "main_gpu": (0, INT32 - 1),
    "num_thread": (0, MAX_THREADS),  # 0: the backend's default
    "draft_num_predict": (0, INT32 - 1),
    "lookup_ngram": (0, 64),
    "num_keep": (-1, INT32 - 1),  # -1: keep the whole prompt
    "seed": (-1, INT32 - 1),  # -1: random
    "num_predict": (-2, INT32 - 1),  # -1: no limit, -2: until the context is full
    "repeat_last_n": (-1, INT32 - 1),  # -1: the whole context
}


def check_range(name: str, value: Any) -> Any:
    """`value` (already of the option's type) if it is within the option's range, else an
    OptionError naming the option: no NaN, infinity or number beyond what a runner takes."""
    kind = OPTIONS[name].type
    if kind is float:
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
            raise OptionError(f"option {name!r} must be a finite number, not {shown(value)}")
        if name == "repeat_penalty" and value <= 0:  # logits are divided by it
            raise OptionError(f"option {name!r} must be greater than 0, not {shown(value)}")
    elif kind is int:
        low, high = RANGES.get(name, (-INT32, INT32 - 1))
        if not low <= value <= high:
            raise OptionError(
                f"option {name!r} must be between {low} and {high}, not {shown(value)}"
            )
    return value


# ---- JSON values (requests, stored model parameters) ---------------------------------------
def shown(value: Any, limit: int = 80) -> str:
    """A value as an error message quotes it: repr, cut to `limit` characters (a request may
    send megabytes where a number belongs)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _coerce(name: str, kind: type, value: Any) -> Any:
    if kind is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(s, str) for s in items):
            raise OptionError(f"option {name!r} must be a string or a list of strings")
        return tuple(items)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise OptionError(f"option {name!r} must be true or false, not {shown(value)}")
    if isinstance(value, bool):
        raise OptionError(f"option {name!r} must be a number, not {shown(value)}")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise OptionError(f"option {name!r} must be an integer, not {shown(value)}")
    try:
        if isinstance(value, int | float | str):
            return float(value)
    except (ValueError, OverflowError):  # not a number; an int beyond any float
        pass
    raise OptionError(f"option {name!r} must be a number, not {shown(value)}")


# ---- text values (Modelfile PARAMETER, `/set parameter`) -----------------------------------
_TRUE = ("1", "t", "T", "TRUE", "true", "True")  # Go's strconv.ParseBool
_FALSE = ("0", "f", "F", "FALSE", "false", "False")
_INT = re.compile(r"[+-]?\d+")  # Go's strconv.ParseInt(s, 10, 64): no spaces, no '_'


def parse_text(name: str, values: list[str]) -> Any:
    """The typed value of option `name` given as text, as Ollama's `api.FormatParams`
    reads it: a list option (`stop`) takes every value, the others the first; floats are
    float32s. OptionError for unknown names and values that do not parse."""
    spec = OPTIONS.get(name)
    if spec is None:
        raise OptionError(f"unknown parameter '{name}'")
    if not values:
        raise OptionError(f"parameter '{name}' needs a value")
    if spec.type is tuple:
        return list(values)
    first = values[0]
    bad = OptionError(f"invalid {spec.kind} value [{' '.join(values)}]")  # Go prints [a b]
    if spec.type is int:
        if not _INT.fullmatch(first) or len(first) > 20:  # beyond int64 in any case
            raise bad
        return check_range(name, int(first, 10))
    if spec.type is float:
        try:
            value = float(first.replace("_", "x"))  # Go rejects '_' separators; so do we
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise bad
        return check_range(name, _float32(value))
    if first in _TRUE or first in _FALSE:
        return first in _TRUE
    raise bad


def _float32(value: float) -> float:
    """Ollama keeps a float32, and its JSON shows the float32's shortest digits (0.7, not
    0.699999988): the shortest decimal that reads back as the same float32. (By hand, not
    NumPy's float32 repr: NumPy costs every CLI command ~100 ms to import.)"""
    try:
        f32 = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond float32's range
        return math.copysign(math.inf, value)
    for digits in range(1, 10):  # 9 significant digits always identify a float32
        short = float(f"{f32:.{digits}g}")
        if struct.unpack("f", struct.pack("f", short))[0] == f32:
            return short
    return f32
