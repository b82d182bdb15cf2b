"""Go's `fmt` as text/template uses it: `print`, `printf`, `println` and `{{ . }}` output.

Python values stand for Go values (see the package docstring): None is nil, int is int,
float is float64, str is string, bytes is []byte, list is a slice, dict is a map, a dataclass
is a struct. A value whose class lists "String" in `GO_METHODS` is a fmt.Stringer.
"""

from __future__ import annotations

import dataclasses
import math
import unicodedata
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

NIL_ANGLE = "<nil>"
_MAX_WIDTH = 1_000_000  # Go's fmt refuses widths and precisions beyond 1e6 (tooLarge)


def type_name(v: Any) -> str:
    """The Go type name of a value, as reflect prints it in error messages."""
    if v is None:
        return NIL_ANGLE
    go = getattr(v, "GO_TYPE", None)
    if isinstance(go, str):
        return go
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float64"
    if isinstance(v, complex):
        return "complex128"
    if isinstance(v, str):
        return "string"
    if isinstance(v, bytes | bytearray):
        return "[]uint8"
    if isinstance(v, list | tuple):
        return "[]interface {}"
    if isinstance(v, dict):
        return "map[string]interface {}"
    if callable(v):
        return "func(...) interface {}"
    return type(v).__name__


def stringer(v: Any) -> Callable[[], str] | None:
    """The value's String method, when its Go type has one."""
    methods = getattr(type(v), "GO_METHODS", None)
    if methods and "String" in methods:
        return getattr(v, methods["String"])  # type: ignore[no-any-return]
    return None


def is_struct(v: Any) -> bool:
    return dataclasses.is_dataclass(v) and not isinstance(v, type)


def struct_fields(v: Any) -> list[tuple[str, Any]]:
    return [(f.name, getattr(v, f.name)) for f in dataclasses.fields(v)]


def sort_key(k: Any) -> tuple[int, Any]:
    """fmtsort's order for map keys: numbers by value, strings bytewise (UTF-8 keeps code
    point order, so Python's string order is the same)."""
    if isinstance(k, bool):
        return (0, int(k))
    if isinstance(k, int | float):
        return (1, k)
    if isinstance(k, str):
        return (2, k)
    return (3, repr(k))


# ---- floats (strconv.FormatFloat) --------------------------------------------------------


def _shortest(f: float) -> tuple[str, int]:
    """Shortest decimal digits that round-trip, and the decimal point position: f = 0.DIGITS
    x 10**dp. Python's repr and Go's strconv both produce the shortest round-trip digits."""
    if f == 0:
        return "", 0
    _, digits, exp = Decimal(repr(abs(f))).as_tuple()
    assert isinstance(exp, int)
    s = "".join(map(str, digits))
    return s.rstrip("0"), len(s) + exp


def _fmt_e(digits: str, dp: int, prec: int, e: str = "e") -> str:
    # d.ddde±XX with prec digits after the point (prec == -1: all digits)
    digits = digits or "0"
    first, rest = digits[0], digits[1:]
    if prec >= 0:
        rest = (rest + "0" * prec)[:prec]
    out = first + ("." + rest if rest else "")
    exp = dp - 1 if digits != "0" else 0
    sign = "-" if exp < 0 else "+"
    return f"{out}{e}{sign}{abs(exp):02d}"


def _fmt_f(digits: str, dp: int, prec: int) -> str:
    if dp <= 0:
        intpart, frac = "0", "0" * (-dp) + digits
    else:
        intpart = (digits + "0" * dp)[:dp]
        frac = digits[dp:]
    intpart = intpart.lstrip("0") or "0"
    if prec >= 0:
        frac = (frac + "0" * prec)[:prec]
    return intpart + ("." + frac if frac else "")


def format_float(f: float, verb: str = "g", prec: int = -1) -> str:
    """strconv.FormatFloat(f, verb, prec, 64) for verbs e, E, f, g, G (prec -1: shortest)."""
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    neg = "-" if math.copysign(1.0, f) < 0 else ""
    if prec >= 0:  # fixed precision: Python's formatting rounds exactly like strconv
        return neg + format(abs(f), f".{prec}{verb}")
    digits, dp = _shortest(f)
    if verb in "eE":
        return neg + _fmt_e(digits, dp, -1, verb)
    if verb == "f":
        return neg + _fmt_f(digits, dp, -1)
    exp = dp - 1 if digits else 0
    if exp < -4 or exp >= 6:  # shortest %g decides with precision 6, as Go does
        return neg + _fmt_e(digits, dp, -1, "e" if verb == "g" else "E")
    return neg + _fmt_f(digits, dp, -1)


def _fmt_complex(c: complex, verb: str = "g", prec: int = -1) -> str:
    re = format_float(c.real, verb, prec)
    im = format_float(c.imag, verb, prec)
    if not im.startswith(("-", "+")):
        im = "+" + im
    return f"({re}{im}i)"


# ---- strings (strconv.Quote) ------------------------------------------------------------


def _is_print(ch: str) -> bool:
    # unicode.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
            "\v": "\\v", "\\": "\\\\"}  # fmt: skip


def quote(s: str, quote_char: str = '"', ascii_only: bool = False) -> str:
    """strconv.Quote (QuoteToASCII with ascii_only; QuoteRune with quote_char "'")."""
    out = [quote_char]
    for ch in s:
        if ch == quote_char:
            out.append("\\" + ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            out.append("\\ufffd" if ascii_only else "\ufffd")
        elif _is_print(ch) and not (ascii_only and ord(ch) >= 0x80):
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append(quote_char)
    return "".join(out)


def _can_backquote(s: str) -> bool:
    return all(ch == "\t" or (ch != "`" and ord(ch) >= 0x20 and ch != "\x7f") for ch in s)


# ---- the printer ------------------------------------------------------------------------


@dataclasses.dataclass
class _Flags:
    plus: bool = False
    minus: bool = False
    sharp: bool = False
    space: bool = False
    zero: bool = False
    wid: int | None = None
    prec: int | None = None


def _pad(s: str, f: _Flags, zero_ok: bool = False) -> str:
    if f.wid is None or len(s) >= f.wid:
        return s
    n = f.wid - len(s)
    if f.minus:
        return s + " " * n
    if f.zero and zero_ok:
        sign = s[0] if s[:1] in ("-", "+", " ") else ""
        return sign + "0" * n + s[len(sign) :]
    return " " * n + s


def _bad_verb(verb: str, v: Any) -> str:
    if v is None:
        return f"%!{verb}({NIL_ANGLE})"
    return f"%!{verb}({type_name(v)}={format_value(v)})"


def _fmt_int(n: int, verb: str, f: _Flags) -> str:
    if verb in "vd":
        digits = str(abs(n))
    elif verb == "b":
        digits = format(abs(n), "b")
    elif verb in "oO":
        digits = format(abs(n), "o")
    elif verb in "xX":
        digits = format(abs(n), verb)
    elif verb == "c":
        return _pad(chr(n) if 0 <= n <= 0x10FFFF else "\ufffd", f)
    elif verb == "q":
        return _pad(quote(chr(n) if 0 <= n <= 0x10FFFF else "\ufffd", "'", f.plus), f)
    elif verb == "U":
        s = f"U+{n:04X}"
        if f.sharp and 0 <= n <= 0x10FFFF and _is_print(chr(n)):
            s += f" '{chr(n)}'"
        return _pad(s, f)
    elif verb in "eEfFgG":
        return _bad_verb(verb, n)
    else:
        return _bad_verb(verb, n)
    if f.prec is not None:
        digits = "" if f.prec == 0 and n == 0 else digits.rjust(f.prec, "0")
    prefix = ""
    if f.sharp:
        prefix = {"b": "0b", "o": "0", "x": "0x", "X": "0X"}.get(verb, "")
    if verb == "O":
        prefix = "0o"
    sign = "-" if n < 0 else ("+" if f.plus else (" " if f.space else ""))
    return _pad(sign + prefix + digits, f, zero_ok=f.prec is None)


def _fmt_float(x: float, verb: str, f: _Flags) -> str:
    if verb == "v":
        verb = "g"
    if verb not in "eEfFgGxX":
        return _bad_verb(verb, x)
    if verb in "xX":
        s = float.hex(abs(x)) if math.isfinite(x) else format_float(abs(x))
        if math.isfinite(x):
            mant, _, exp = s.partition("p")
            mant = mant.rstrip("0").rstrip(".") if "." in mant else mant
            e = int(exp)
            s = f"{mant}p{'-' if e < 0 else '+'}{abs(e):02d}"
            s = s.upper() if verb == "X" else s
        s = ("-" if math.copysign(1, x) < 0 else "") + s
    else:
        prec = f.prec if f.prec is not None else (-1 if verb in "gG" else 6)
        s = format_float(x, "f" if verb == "F" else verb, prec)
    if not s.startswith(("-", "+")):
        if f.plus:
            s = "+" + s
        elif f.space:
            s = " " + s
    elif s.startswith("+") and not f.plus:  # +Inf keeps its sign only under '+'
        s = (" " if f.space else "") + s[1:]
    return _pad(s, f, zero_ok=math.isfinite(x))


def _fmt_str(s: str, verb: str, f: _Flags) -> str:
    if f.prec is not None:
        s = s[: f.prec]
    if verb in "vs":
        return _pad(s, f)
    if verb == "q":
        if f.sharp and _can_backquote(s):
            return _pad("`" + s + "`", f)
        return _pad(quote(s, '"', f.plus), f)
    if verb in "xX":
        data = s.encode("utf-8", "surrogatepass")
        sep = " " if f.space else ""
        pre = ("0x" if verb == "x" else "0X") if f.sharp else ""
        parts = [f"{pre}{b:02x}" if verb == "x" else f"{pre}{b:02X}" for b in data]
        if not f.space and pre:
            return _pad(pre + "".join(p[2:] for p in parts), f)
        return _pad(sep.join(parts), f)
    return _bad_verb(verb, s)


def format_value(v: Any, verb: str = "v", f: _Flags | None = None, depth: int = 0) -> str:
    """One operand formatted with one verb, as fmt's printArg/printValue do it."""
    f = f or _Flags()
    if verb == "T":
        return _pad(type_name(v), f)
    if v is None:
        return _pad(NIL_ANGLE, f) if verb == "v" else _bad_verb(verb, None)
    method = stringer(v)
    if method is not None and verb in "vsxXq":
        return _fmt_str(method(), verb, f)
    if isinstance(v, bool):
        return _pad("true" if v else "false", f) if verb in "vt" else _bad_verb(verb, v)
    if isinstance(v, int):
        return _fmt_int(v, verb, f)
    if isinstance(v, float):
        return _fmt_float(v, verb, f)
    if isinstance(v, complex):
        if verb not in "veEfFgG":
            return _bad_verb(verb, v)
        prec = f.prec if f.prec is not None else (-1 if verb in "vgG" else 6)
        return _pad(_fmt_complex(v, "g" if verb == "v" else verb, prec), f)
    if isinstance(v, str):
        return _fmt_str(v, verb, f)
    if isinstance(v, bytes | bytearray):
        if verb in "sqxX":
            return _fmt_str(bytes(v).decode("utf-8", "replace"), verb, f)
        return "[" + " ".join(format_value(b, verb, f, depth + 1) for b in v) + "]"
    if isinstance(v, dict):
        items = sorted(v.items(), key=lambda kv: sort_key(kv[0]))
        body = " ".join(
            f"{format_value(k, verb, f, depth + 1)}:{format_value(x, verb, f, depth + 1)}"
            for k, x in items
        )
        return "map[" + body + "]"
    if isinstance(v, list | tuple):
        return "[" + " ".join(format_value(x, verb, f, depth + 1) for x in v) + "]"
    if is_struct(v):
        parts = []
        for name, x in struct_fields(v):
            s = format_value(x, verb, f, depth + 1)
            parts.append(f"{name}:{s}" if f.plus else s)
        return "{" + " ".join(parts) + "}"
    if callable(v):
        return f"0x{id(v):x}" if verb in "vp" else _bad_verb(verb, v)
    return _pad(str(v), f)


def sprint(*args: Any) -> str:
    """fmt.Sprint: spaces between operands when neither side is a string."""
    out = []
    for i, a in enumerate(args):
        if i > 0 and not isinstance(a, str) and not isinstance(args[i - 1], str):
            out.append(" ")
        out.append(format_value(a))
    return "".join(out)


def sprintln(*args: Any) -> str:
    return " ".join(format_value(a) for a in args) + "\n"


def _parsenum(fmt: str, i: int) -> tuple[int, bool, int]:
    """Go's fmt.parsenum: (number, whether there was one, next index). A number that grows
    past 1e6 ends the parse at the end of the format (so "%.1000000000f" prints %!(NOVERB),
    never a billion digits)."""
    num, isnum, n = 0, False, len(fmt)
    while i < n and "0" <= fmt[i] <= "9":
        if num > _MAX_WIDTH:
            return 0, False, n
        num, isnum, i = num * 10 + ord(fmt[i]) - 48, True, i + 1
    return num, isnum, i


def sprintf(fmt: str, *args: Sequence[Any] | Any) -> str:
    """fmt.Sprintf with Go's verbs, flags, widths, precisions, argument indexes and its
    in-band error notation (%!d(string=x), %!v(MISSING), %!(EXTRA ...))."""
    out: list[str] = []
    argnum, reordered, n, i = 0, False, len(fmt), 0
    while i < n:
        j = fmt.find("%", i)
        if j < 0:
            out.append(fmt[i:])
            break
        out.append(fmt[i:j])
        i = j + 1
        f = _Flags()
        while i < n and fmt[i] in "+-# 0":
            c = fmt[i]
            f.plus |= c == "+"
            f.minus |= c == "-"
            f.sharp |= c == "#"
            f.space |= c == " "
            f.zero |= c == "0" and not f.minus
            i += 1
        if f.minus:
            f.zero = False
        argnum, i, ok = _arg_index(fmt, i, argnum, len(args))
        reordered |= i > 0 and fmt[i - 1 : i] == "]"
        bad_width = bad_prec = False
        if i < n and fmt[i] == "*":
            i += 1
            if (
                argnum < len(args)
                and isinstance(args[argnum], int)
                and not isinstance(args[argnum], bool)
            ):
                w = int(args[argnum])  # type: ignore[call-overload]
                if abs(w) > _MAX_WIDTH:
                    bad_width = True
                else:
                    f.wid, f.minus = abs(w), f.minus or w < 0
                    f.zero = f.zero and not f.minus
            else:
                bad_width = True
            argnum += 1
        else:
            num, isnum, i = _parsenum(fmt, i)
            if isnum:
                f.wid = num
        if i < n and fmt[i] == ".":
            i += 1
            argnum, i, ok2 = _arg_index(fmt, i, argnum, len(args))
            ok = ok and ok2
            if i < n and fmt[i] == "*":
                i += 1
                p = args[argnum] if argnum < len(args) else None
                if isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= _MAX_WIDTH:
                    f.prec = p
                else:
                    bad_prec = True
                argnum += 1
            else:
                f.prec, _, i = _parsenum(fmt, i)  # "%.f": precision 0
        argnum, i, ok3 = _arg_index(fmt, i, argnum, len(args))
        ok = ok and ok3
        if i >= n:
            out.append("%!(NOVERB)")
            break
        verb = fmt[i]
        i += 1
        if bad_width:
            out.append("%!(BADWIDTH)")
        if bad_prec:
            out.append("%!(BADPREC)")
        if verb == "%":
            out.append("%")
        elif not ok:
            out.append(f"%!{verb}(BADINDEX)")
        elif argnum >= len(args):
            out.append(f"%!{verb}(MISSING)")
        else:
            out.append(format_value(args[argnum], verb, f))
            argnum += 1
    if not reordered and argnum < len(args):
        extra = [
            NIL_ANGLE if a is None else f"{type_name(a)}={format_value(a)}" for a in args[argnum:]
        ]
        out.append("%!(EXTRA " + ", ".join(extra) + ")")
    return "".join(out)


def _arg_index(fmt: str, i: int, argnum: int, nargs: int) -> tuple[int, int, bool]:
    """An explicit `[n]` argument index at fmt[i:], if any."""
    if i >= len(fmt) or fmt[i] != "[":
        return argnum, i, True
    end = fmt.find("]", i)
    if end < 0:
        return argnum, i + 1, False
    text = fmt[i + 1 : end]
    if not text.isdigit() or not 1 <= int(text) <= nargs:
        return argnum, end + 1, False
    return int(text) - 1, end + 1, True
