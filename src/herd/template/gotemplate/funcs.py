"""Go text/template's predefined functions, with Go's semantics and error texts.

Strings are indexed, sliced and measured in UTF-8 bytes, as Go does (`len "é"` is 2).
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from herd.template.gotemplate.gofmt import (
    format_value,
    is_struct,
    sprint,
    sprintf,
    sprintln,
    type_name,
)

NO_VALUE = "<no value>"


class FuncError(Exception):
    """A function's error result: execution stops with `error calling NAME: <message>`."""


@dataclass(frozen=True)
class Func:
    """A function callable from templates. Parameter kinds: "any" (interface{} or
    reflect.Value), "string", "int", "bool", "float". `variadic` is the kind of `...` args."""

    fn: Callable[..., Any]
    params: tuple[str, ...] = ()
    variadic: str | None = None


def is_true(v: Any) -> tuple[bool, bool]:
    """Go's truth: false, 0, nil and empty strings, slices and maps are false; structs are
    true. Second value: whether v has a truth value at all."""
    if v is None:
        return False, True
    if isinstance(v, bool):
        return v, True
    if isinstance(v, int | float | complex):
        return v != 0, True
    if isinstance(v, str | bytes | bytearray | list | tuple | dict):
        return len(v) > 0, True
    return True, True  # structs, functions, pointers


def truth(v: Any) -> bool:
    return is_true(v)[0]


# ---- indexing -----------------------------------------------------------------------------


def _index_arg(ix: Any, cap: int) -> int:
    if ix is None:
        raise FuncError("cannot index slice/array with nil")
    if isinstance(ix, bool) or not isinstance(ix, int):
        raise FuncError(f"cannot index slice/array with type {type_name(ix)}")
    if ix < 0 or ix > cap:
        raise FuncError(f"index out of range: {ix}")
    return ix


def index(item: Any, *indexes: Any) -> Any:
    """index x 1 2 is x[1][2]: slices, arrays, strings (bytes) and maps."""
    if item is None:
        raise FuncError("index of untyped nil")
    for ix in indexes:
        if item is None:
            raise FuncError("index of nil pointer")
        if isinstance(item, str | bytes | bytearray | list | tuple):
            seq = item.encode() if isinstance(item, str) else item
            x = _index_arg(ix, len(seq))
            if x == len(seq):
                kind = "string" if isinstance(item, str) else "slice"
                raise FuncError(f"reflect: {kind} index out of range")
            item = seq[x]
        elif isinstance(item, dict):
            if ix is None:
                raise FuncError("value is nil; should be of type string")
            if not isinstance(ix, str):
                raise FuncError(f"value has type {type_name(ix)}; should be string")
            item = item.get(ix)
        else:
            raise FuncError(f"can't index item of type {type_name(item)}")
    return item


def slice_(item: Any, *indexes: Any) -> Any:
    """slice x 1 2 is x[1:2]; slice x is x[:]; slice x 1 2 3 is x[1:2:3]."""
    if item is None:
        raise FuncError("slice of untyped nil")
    if len(indexes) > 3:
        raise FuncError(f"too many slice indexes: {len(indexes)}")
    if isinstance(item, str):
        if len(indexes) == 3:
            raise FuncError("cannot 3-index slice a string")
        seq: Any = item.encode()
    elif isinstance(item, list | tuple | bytes | bytearray):
        seq = item
    else:
        raise FuncError(f"can't slice item of type {type_name(item)}")
    idx = [0, len(seq), 0]
    for i, ix in enumerate(indexes):
        idx[i] = _index_arg(ix, len(seq))
    if idx[0] > idx[1]:
        raise FuncError(f"invalid slice index: {idx[0]} > {idx[1]}")
    if len(indexes) == 3 and idx[1] > idx[2]:
        raise FuncError(f"invalid slice index: {idx[1]} > {idx[2]}")
    out = seq[idx[0] : idx[1]]
    if isinstance(item, str):
        return out.decode("utf-8", "replace")
    return type(item)(out) if isinstance(item, list) and type(item) is not list else out


def length(item: Any) -> int:
    if item is None:
        raise FuncError("reflect: call of reflect.Value.Type on zero Value")
    if isinstance(item, str):
        return len(item.encode("utf-8", "surrogatepass"))
    if isinstance(item, bytes | bytearray | list | tuple | dict):
        return len(item)
    raise FuncError(f"len of type {type_name(item)}")


def not_(v: Any) -> bool:
    return not truth(v)


# ---- comparison ---------------------------------------------------------------------------


def _basic(v: Any) -> str | None:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, complex):
        return "complex"
    if isinstance(v, str):
        return "string"
    return None


def _go_kind(v: Any) -> str:
    if v is None:
        return "invalid"
    if isinstance(v, list | tuple | bytes | bytearray):
        return "slice"
    if isinstance(v, dict):
        return "map"
    if is_struct(v):
        return "struct"
    return "func" if callable(v) else "other"


def eq(arg1: Any, *args: Any) -> bool:
    """arg1 == arg2 || arg1 == arg3 ..."""
    if not args:
        raise FuncError("missing argument for comparison")
    k1 = _basic(arg1)
    for arg in args:
        k2 = _basic(arg)
        if k1 != k2:
            if arg1 is not None and arg is not None:
                raise FuncError(
                    f"incompatible types for comparison: {type_name(arg1)} and {type_name(arg)}"
                )
            truth_ = False
        elif k1 is not None:
            truth_ = arg1 == arg
        else:
            kind1, kind2 = _go_kind(arg1), _go_kind(arg)
            if kind1 != kind2 and "invalid" not in (kind1, kind2):
                raise FuncError(
                    f"non-comparable types {format_value(arg1)}: {type_name(arg1)}, "
                    f"{type_name(arg)}: {format_value(arg)}"
                )
            if arg1 is None or arg is None:
                truth_ = (arg1 is None) == (arg is None)
            elif kind2 in ("slice", "map", "func"):
                raise FuncError(f"non-comparable type {format_value(arg)}: {type_name(arg)}")
            else:
                truth_ = arg1 is arg or (dataclasses.is_dataclass(arg1) and arg1 == arg)
        if truth_:
            return True
    return False


def ne(arg1: Any, arg2: Any) -> bool:
    return not eq(arg1, arg2)


def lt(arg1: Any, arg2: Any) -> bool:
    k1, k2 = _basic(arg1), _basic(arg2)
    if k1 is None or k2 is None:
        raise FuncError("invalid type for comparison")
    if k1 != k2:
        raise FuncError(
            f"incompatible types for comparison: {type_name(arg1)} and {type_name(arg2)}"
        )
    if k1 in ("bool", "complex"):
        raise FuncError("invalid type for comparison")
    return bool(arg1 < arg2)


def le(arg1: Any, arg2: Any) -> bool:
    return lt(arg1, arg2) or eq(arg1, arg2)


def gt(arg1: Any, arg2: Any) -> bool:
    return not le(arg1, arg2)


def ge(arg1: Any, arg2: Any) -> bool:
    return not lt(arg1, arg2)


# ---- escaping -----------------------------------------------------------------------------


def eval_args(args: tuple[Any, ...]) -> str:
    """fmt.Sprint of the arguments, with nil printed as <no value> (evalArgs)."""
    if len(args) == 1 and isinstance(args[0], str):
        return args[0]
    return sprint(*(NO_VALUE if a is None else a for a in args))


_HTML = {'"': "&#34;", "'": "&#39;", "&": "&amp;", "<": "&lt;", ">": "&gt;", "\0": "\ufffd"}


def html(*args: Any) -> str:
    return "".join(_HTML.get(c, c) for c in eval_args(args))


_JS = {"\\": "\\\\", "'": "\\'", '"': '\\"', "<": "\\u003C", ">": "\\u003E", "&": "\\u0026",
       "=": "\\u003D"}  # fmt: skip


def js(*args: Any) -> str:
    out = []
    for c in eval_args(args):
        if c in _JS:
            out.append(_JS[c])
        elif ord(c) < 0x20:
            out.append(f"\\u00{ord(c):02X}")
        elif ord(c) >= 0x80 and not c.isprintable():
            out.append(f"\\u{ord(c):04X}")
        else:
            out.append(c)
    return "".join(out)


def urlquery(*args: Any) -> str:
    return urllib.parse.quote_plus(eval_args(args), safe="")


def _special(*args: Any) -> Any:  # and, or, call: evaluated by the executor itself
    raise AssertionError("unreachable")


BUILTINS: dict[str, Func] = {
    "and": Func(_special, ("any",), "any"),
    "call": Func(_special, ("any",), "any"),
    "html": Func(html, (), "any"),
    "index": Func(index, ("any",), "any"),
    "slice": Func(slice_, ("any",), "any"),
    "js": Func(js, (), "any"),
    "len": Func(length, ("any",)),
    "not": Func(not_, ("any",)),
    "or": Func(_special, ("any",), "any"),
    "print": Func(sprint, (), "any"),
    "printf": Func(sprintf, ("string",), "any"),
    "println": Func(sprintln, (), "any"),
    "urlquery": Func(urlquery, (), "any"),
    "eq": Func(eq, ("any",), "any"),
    "ge": Func(ge, ("any", "any")),
    "gt": Func(gt, ("any", "any")),
    "le": Func(le, ("any", "any")),
    "lt": Func(lt, ("any", "any")),
    "ne": Func(ne, ("any", "any")),
}
