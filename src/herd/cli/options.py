"""Typed model options from text, as `/set parameter` and Modelfile PARAMETER give them.

Mirrors Ollama's `api.FormatParams`: each option has one type; a list option (`stop`)
takes every value given, the others the first.
"""

from __future__ import annotations

from typing import Any

from herd.errors import OptionError

INT, FLOAT, BOOL, LIST = "int", "float", "bool", "list"

OPTION_TYPES: dict[str, str] = {
    # load-time (Ollama's api.Runner)
    "num_ctx": INT, "num_batch": INT, "num_gpu": INT, "main_gpu": INT, "num_thread": INT,
    "use_mmap": BOOL,
    # per request
    "num_keep": INT, "seed": INT, "num_predict": INT, "top_k": INT, "top_p": FLOAT,
    "min_p": FLOAT, "typical_p": FLOAT, "repeat_last_n": INT, "temperature": FLOAT,
    "repeat_penalty": FLOAT, "presence_penalty": FLOAT, "frequency_penalty": FLOAT,
    "stop": LIST,
}

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_parameter(name: str, values: list[str]) -> Any:
    """The typed value of option `name`; OptionError for unknown names and bad values."""
    kind = OPTION_TYPES.get(name)
    if kind is None:
        raise OptionError(f"unknown parameter '{name}'")
    if not values:
        raise OptionError(f"parameter '{name}' needs a value")
    shown = "[" + " ".join(values) + "]"  # Go prints a []string as [a b]
    if kind == LIST:
        return list(values)
    first = values[0]
    if kind == INT:
        try:
            return int(first, 10)
        except ValueError:
            raise OptionError(f"invalid int value {shown}") from None
    if kind == FLOAT:
        try:
            return float(first)
        except ValueError:
            raise OptionError(f"invalid float value {shown}") from None
    if first in _TRUE or first in _FALSE:
        return first in _TRUE
    raise OptionError(f"invalid bool value {shown}")
