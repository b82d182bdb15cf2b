"""Go text/template's literals, as its parser reads them: strconv's unquoting of string and
character constants, and numbers (parse.newNumber) stored under every Go type that can hold
them."""

from __future__ import annotations

from herd.template.gotemplate.lexer import T
from herd.template.gotemplate.nodes import NumberNode


def unquote(s: str) -> str:
    """strconv.Unquote for "..." and `...` literals; ValueError("invalid syntax")."""
    if len(s) < 2 or s[0] != s[-1] or s[0] not in "\"`'":
        raise ValueError("invalid syntax")
    q, body = s[0], s[1:-1]
    if q == "`":
        if "`" in body:
            raise ValueError("invalid syntax")
        return body.replace("\r", "")
    out = bytearray()
    i = 0
    while i < len(body):
        if body[i] == q or body[i] == "\n":
            raise ValueError("invalid syntax")
        value, i, is_byte = unquote_char(body, i, q)
        out += bytes([value]) if is_byte else chr(value).encode("utf-8", "surrogatepass")
    if q == "'":
        raise ValueError("invalid syntax")  # char literals go through unquote_char
    return out.decode("utf-8", "replace")


_SIMPLE = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}


def unquote_char(s: str, i: int, q: str) -> tuple[int, int, bool]:
    """strconv.UnquoteChar at s[i:]: (value, next index, whether value is a raw byte)."""
    c = s[i]
    if c == q and q in "'\"":
        raise ValueError("invalid syntax")
    if c != "\\":
        return ord(c), i + 1, False
    if i + 1 >= len(s):
        raise ValueError("invalid syntax")
    c = s[i + 1]
    if c in _SIMPLE:
        return _SIMPLE[c], i + 2, False
    if c in "\"'":
        if c != q:
            raise ValueError("invalid syntax")
        return ord(c), i + 2, False
    if c in "xuU":
        n = {"x": 2, "u": 4, "U": 8}[c]
        digits = s[i + 2 : i + 2 + n]
        if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
            raise ValueError("invalid syntax")
        v = int(digits, 16)
        if c == "x":
            return v, i + 2 + n, q != "'"
        if v > 0x10FFFF or 0xD800 <= v <= 0xDFFF:
            raise ValueError("invalid syntax")
        return v, i + 2 + n, False
    if c in "01234567":
        digits = s[i + 1 : i + 4]
        if len(digits) != 3 or any(d not in "01234567" for d in digits) or int(digits, 8) > 255:
            raise ValueError("invalid syntax")
        return int(digits, 8), i + 4, q != "'"
    raise ValueError("invalid syntax")


def _go_int(text: str, signed: bool) -> int | None:
    """strconv.ParseInt/ParseUint(text, 0, 64)."""
    body, neg = text, False
    if body[:1] in "+-":
        if not signed:
            return None
        neg, body = body[0] == "-", body[1:]
    base, digits = 10, body
    if body[:2].lower() in ("0x", "0o", "0b"):
        base, digits = {"x": 16, "o": 8, "b": 2}[body[1].lower()], body[2:]
    elif len(body) > 1 and body[0] == "0":
        base, digits = 8, body[1:]
    if digits.startswith("_") and base != 10:
        digits = digits[1:]
    if not digits or digits.endswith("_") or "__" in digits or digits.startswith("_"):
        return None
    try:
        v = int(digits, base)
    except ValueError:
        return None
    v = -v if neg else v
    lo, hi = (-(2**63), 2**63 - 1) if signed else (0, 2**64 - 1)
    return v if lo <= v <= hi else None


def _go_float(text: str) -> float | None:
    t = text.replace("_", "") if "_" in text else text
    try:
        if t.lstrip("+-")[:2].lower() == "0x":
            return float.fromhex(t)
        return float(t)
    except (ValueError, OverflowError):
        return None


def new_number(pos: int, text: str, typ: T) -> NumberNode:
    """parse.newNumber: one literal stored under every type that can hold it."""
    n = NumberNode(pos, text)
    if typ == T.CHAR_CONSTANT:
        value, end, _ = unquote_char(text, 1, "'")
        if text[end:] != "'":
            raise ValueError(f"malformed character constant: {text}")
        n.is_int = n.is_uint = n.is_float = True
        n.int64 = n.uint64 = value
        n.float64 = float(value)
        return n
    if typ == T.COMPLEX:
        try:
            n.complex128 = complex(text.replace("i", "j"))
        except ValueError:
            raise ValueError(f"illegal number syntax: {text!r}") from None
        n.is_complex = True
        _simplify_complex(n)
        return n
    if text.endswith("i"):
        f = _go_float(text[:-1])
        if f is not None:
            n.is_complex, n.complex128 = True, complex(0, f)
            _simplify_complex(n)
            return n
    u = _go_int(text, signed=False)
    if u is not None:
        n.is_uint, n.uint64 = True, u
    i = _go_int(text, signed=True)
    if i is not None:
        n.is_int, n.int64 = True, i
        if i == 0:
            n.is_uint, n.uint64 = True, 0
    if n.is_int:
        n.is_float, n.float64 = True, float(n.int64)
    elif n.is_uint:
        n.is_float, n.float64 = True, float(n.uint64)
    else:
        f = _go_float(text)
        if f is not None:
            if not any(c in text for c in ".eEpP"):
                raise ValueError(f'integer overflow: "{text}"')
            n.is_float, n.float64 = True, f
            if f == int(f) and -(2**63) <= f < 2**63:
                n.is_int, n.int64 = True, int(f)
            if f == int(f) and 0 <= f < 2**64:
                n.is_uint, n.uint64 = True, int(f)
    if not (n.is_int or n.is_uint or n.is_float):
        raise ValueError(f'illegal number syntax: "{text}"')
    return n


def _simplify_complex(n: NumberNode) -> None:
    n.is_float = n.complex128.imag == 0
    if n.is_float:
        f = n.float64 = n.complex128.real
        if f == int(f) and -(2**63) <= f < 2**63:
            n.is_int, n.int64 = True, int(f)
        if f == int(f) and 0 <= f < 2**64:
            n.is_uint, n.uint64 = True, int(f)
