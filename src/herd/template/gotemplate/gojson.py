"""Go's `encoding/json` Marshal, for Ollama's `json` template function and the String
methods of its template data: map keys sorted, `<`, `>`, `&`, U+2028 and U+2029 escaped,
floats in JavaScript's notation, struct fields by their `json` tags with omitempty.

Struct fields carry their tag in dataclass metadata: `field(metadata={"json": "name,omitempty"})`.
A dict class with `GO_JSON_ORDERED = True` keeps insertion order (Ollama's ordered maps).
"""

from __future__ import annotations

import base64
import dataclasses
import math
from typing import Any

from herd.template.gotemplate.gofmt import _fmt_e, _fmt_f, _shortest, is_struct, type_name


class MarshalError(ValueError):
    """A value json.Marshal refuses (NaN, functions, complex numbers)."""


_SHORT = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b",
          "\f": "\\f"}  # fmt: skip
_HTML = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def quote(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch in _SHORT:
            out.append(_SHORT[ch])
        elif ch in _HTML:
            out.append(_HTML[ch])
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            out.append("\ufffd")  # invalid UTF-8 becomes the replacement character
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _float(f: float) -> str:
    if math.isnan(f) or math.isinf(f):
        raise MarshalError(f"json: unsupported value: {f!r}")
    if f == 0:
        return "-0" if math.copysign(1, f) < 0 else "0"
    digits, dp = _shortest(f)
    neg = "-" if f < 0 else ""
    if abs(f) < 1e-6 or abs(f) >= 1e21:
        s = _fmt_e(digits, dp, -1)
        mant, _, exp = s.partition("e")
        sign, num = exp[0], exp[1:].lstrip("0") or "0"
        return f"{neg}{mant}e{sign}{num}"  # e-07 -> e-7, as ES6 writes it
    return neg + _fmt_f(digits, dp, -1)


def _empty(v: Any) -> bool:
    if v is None or v is False:
        return True
    if isinstance(v, int | float) and not isinstance(v, bool):
        return v == 0
    if isinstance(v, str | bytes | list | tuple | dict):
        return len(v) == 0
    return False


def marshal(v: Any) -> str:
    """json.Marshal(v) as a string."""
    custom = getattr(v, "go_marshal_json", None)
    if custom is not None:
        return str(custom())
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _float(v)
    if isinstance(v, str):
        return quote(v)
    if isinstance(v, bytes | bytearray):
        return quote(base64.b64encode(bytes(v)).decode())
    if isinstance(v, dict):
        keys = list(v) if getattr(v, "GO_JSON_ORDERED", False) else sorted(v, key=str)
        return "{" + ",".join(f"{quote(str(k))}:{marshal(v[k])}" for k in keys) + "}"
    if isinstance(v, list | tuple):
        return "[" + ",".join(marshal(x) for x in v) + "]"
    if is_struct(v):
        parts = []
        for f in dataclasses.fields(v):
            tag = f.metadata.get("json", f.name)
            name, _, opts = tag.partition(",")
            if name == "-":
                continue
            value = getattr(v, f.name)
            if "omitempty" in opts.split(",") and _empty(value):
                continue
            parts.append(f"{quote(name or f.name)}:{marshal(value)}")
        return "{" + ",".join(parts) + "}"
    raise MarshalError(f"json: unsupported type: {type_name(v)}")
