"""Go text/template's lexer: text and actions, `{{-`/`-}}` trimming, comments, and the
tokens inside actions, with Go's error messages."""

from __future__ import annotations

import bisect
import enum
import unicodedata
from dataclasses import dataclass

from herd.template.gotemplate.gofmt import quote

LEFT, RIGHT = "{{", "}}"
LEFT_COMMENT, RIGHT_COMMENT = "/*", "*/"
SPACE_CHARS = " \t\r\n"


class T(enum.IntEnum):
    ERROR = 0
    BOOL = enum.auto()
    CHAR = enum.auto()  # printable ASCII character; grab bag for comma etc.
    CHAR_CONSTANT = enum.auto()
    COMPLEX = enum.auto()
    ASSIGN = enum.auto()  # =
    DECLARE = enum.auto()  # :=
    EOF = enum.auto()
    FIELD = enum.auto()  # .Alphanumeric
    IDENTIFIER = enum.auto()
    LEFT_DELIM = enum.auto()
    LEFT_PAREN = enum.auto()
    NUMBER = enum.auto()
    PIPE = enum.auto()
    RAW_STRING = enum.auto()
    RIGHT_DELIM = enum.auto()
    RIGHT_PAREN = enum.auto()
    SPACE = enum.auto()
    STRING = enum.auto()
    TEXT = enum.auto()
    VARIABLE = enum.auto()
    KEYWORD = enum.auto()  # keywords follow
    BLOCK = enum.auto()
    BREAK = enum.auto()
    CONTINUE = enum.auto()
    DOT = enum.auto()
    DEFINE = enum.auto()
    ELSE = enum.auto()
    END = enum.auto()
    IF = enum.auto()
    NIL = enum.auto()
    RANGE = enum.auto()
    TEMPLATE = enum.auto()
    WITH = enum.auto()


KEYWORDS = {
    ".": T.DOT, "block": T.BLOCK, "break": T.BREAK, "continue": T.CONTINUE,
    "define": T.DEFINE, "else": T.ELSE, "end": T.END, "if": T.IF, "range": T.RANGE,
    "nil": T.NIL, "template": T.TEMPLATE, "with": T.WITH,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Item:
    typ: T
    pos: int  # index into the template text
    val: str
    line: int

    def __str__(self) -> str:
        if self.typ == T.EOF:
            return "EOF"
        if self.typ == T.ERROR:
            return self.val
        if self.typ > T.KEYWORD:
            return f"<{self.val}>"
        if len(self.val) > 10:
            return quote(self.val[:10]) + "..."
        return quote(self.val)


def is_space(c: str) -> bool:
    return c in (" ", "\t", "\r", "\n")


def is_alnum(c: str) -> bool:
    return c == "_" or c.isalpha() or (c != "" and unicodedata.category(c) == "Nd")


def _u(c: str) -> str:
    """Go's %#U of a rune: U+0041 'A'."""
    s = f"U+{ord(c):04X}"
    return f"{s} '{c}'" if c.isprintable() else s


class Lexer:
    """Scans the whole text into items up to EOF or the first error (the parser stops there
    too, so scanning ahead changes nothing)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.start = 0
        self.paren_depth = 0
        self.items: list[Item] = []
        self._newlines = [i for i, c in enumerate(text) if c == "\n"]

    # ---- helpers ----------------------------------------------------------------------
    def _line(self, pos: int) -> int:
        return bisect.bisect_left(self._newlines, pos) + 1

    def _next(self) -> str:
        if self.pos >= len(self.text):
            self.pos += 1  # past the end: backup() undoes it
            return ""
        c = self.text[self.pos]
        self.pos += 1
        return c

    def _backup(self) -> None:
        self.pos -= 1

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _accept(self, valid: str) -> bool:
        c = self._next()
        if c and c in valid:
            return True
        self._backup()
        return False

    def _accept_run(self, valid: str) -> None:
        while self._accept(valid):
            pass

    def _emit(self, typ: T) -> None:
        self.items.append(
            Item(typ, self.start, self.text[self.start : self.pos], self._line(self.start))
        )
        self.start = self.pos

    def _error(self, msg: str) -> None:
        self.items.append(Item(T.ERROR, self.start, msg, self._line(self.start)))

    def _at_right_delim(self) -> tuple[bool, bool]:
        rest = self.text[self.pos :]
        if len(rest) >= 2 and is_space(rest[0]) and rest[1] == "-" and rest[2:].startswith(RIGHT):
            return True, True
        return rest.startswith(RIGHT), False

    def _at_terminator(self) -> bool:
        c = self._peek()
        return (
            is_space(c)
            or c in ("", ".", ",", "|", ":", ")", "(")
            or self.text.startswith(RIGHT, self.pos)
        )

    # ---- states -----------------------------------------------------------------------
    def run(self) -> list[Item]:
        state = self._text
        while state is not None:
            state = state()
        return self.items

    def _text(self):  # type: ignore[no-untyped-def]
        x = self.text.find(LEFT, self.pos)
        if x < 0:
            self.pos = len(self.text)
            if self.pos > self.start:
                self._emit(T.TEXT)
            self._emit(T.EOF)
            return None
        if x > self.pos:
            after = self.text[x + len(LEFT) : x + len(LEFT) + 2]
            end = x
            if len(after) == 2 and after[0] == "-" and is_space(after[1]):
                end = len(self.text[self.start : x].rstrip(SPACE_CHARS)) + self.start
            if end > self.start:
                self.pos = end
                self._emit(T.TEXT)
            self.pos = self.start = x
        else:
            self.start = self.pos = x
        return self._left_delim

    def _left_delim(self):  # type: ignore[no-untyped-def]
        self.pos += len(LEFT)
        rest = self.text[self.pos : self.pos + 2]
        trim = len(rest) == 2 and rest[0] == "-" and is_space(rest[1])
        after = 2 if trim else 0
        if self.text.startswith(LEFT_COMMENT, self.pos + after):
            self.pos += after
            self.start = self.pos
            return self._comment
        self._emit(T.LEFT_DELIM)
        self.pos += after
        self.start = self.pos
        self.paren_depth = 0
        return self._inside_action

    def _comment(self):  # type: ignore[no-untyped-def]
        self.pos += len(LEFT_COMMENT)
        x = self.text.find(RIGHT_COMMENT, self.pos)
        if x < 0:
            self._error("unclosed comment")
            return None
        self.pos = x + len(RIGHT_COMMENT)
        delim, trim = self._at_right_delim()
        if not delim:
            self._error("comment ends before closing delimiter")
            return None
        self.pos += (2 if trim else 0) + len(RIGHT)
        if trim:
            self.pos = len(self.text) - len(self.text[self.pos :].lstrip(SPACE_CHARS))
        self.start = self.pos
        return self._text

    def _right_delim(self):  # type: ignore[no-untyped-def]
        _, trim = self._at_right_delim()
        if trim:
            self.pos += 2
            self.start = self.pos
        self.pos += len(RIGHT)
        self._emit(T.RIGHT_DELIM)
        if trim:
            self.pos = len(self.text) - len(self.text[self.pos :].lstrip(SPACE_CHARS))
            self.start = self.pos
        return self._text

    def _inside_action(self):  # type: ignore[no-untyped-def]
        delim, _ = self._at_right_delim()
        if delim:
            if self.paren_depth == 0:
                return self._right_delim
            self._error("unclosed left paren")
            return None
        c = self._next()
        if c == "":
            self._error("unclosed action")
            return None
        if is_space(c):
            self._backup()
            return self._space
        if c == "=":
            self._emit(T.ASSIGN)
        elif c == ":":
            if self._next() != "=":
                self._error("expected :=")
                return None
            self._emit(T.DECLARE)
        elif c == "|":
            self._emit(T.PIPE)
        elif c == '"':
            return self._quote
        elif c == "`":
            return self._raw_quote
        elif c == "$":
            return self._variable
        elif c == "'":
            return self._char
        elif c == "." and self.pos < len(self.text) and not "0" <= self.text[self.pos] <= "9":
            return self._field
        elif c in ".+-" or "0" <= c <= "9":
            self._backup()
            return self._number
        elif is_alnum(c):
            self._backup()
            return self._identifier
        elif c == "(":
            self.paren_depth += 1
            self._emit(T.LEFT_PAREN)
        elif c == ")":
            self.paren_depth -= 1
            if self.paren_depth < 0:
                self._error("unexpected right paren")
                return None
            self._emit(T.RIGHT_PAREN)
        elif ord(c) < 0x80 and c.isprintable():
            self._emit(T.CHAR)
        else:
            self._error(f"unrecognized character in action: {_u(c)}")
            return None
        return self._inside_action

    def _space(self):  # type: ignore[no-untyped-def]
        n = 0
        while is_space(self._peek()):
            self._next()
            n += 1
        # " -}}" closes the action: the space belongs to the trim marker
        if self.text.startswith("-" + RIGHT, self.pos):
            self._backup()
            if n == 1:
                return self._right_delim
        self._emit(T.SPACE)
        return self._inside_action

    def _identifier(self):  # type: ignore[no-untyped-def]
        while is_alnum(self._next()):
            pass
        self._backup()
        word = self.text[self.start : self.pos]
        if not self._at_terminator():
            self._error(f"bad character {_u(self._peek())}")
            return None
        if word in KEYWORDS:
            self._emit(KEYWORDS[word])
        elif word in ("true", "false"):
            self._emit(T.BOOL)
        else:
            self._emit(T.IDENTIFIER)
        return self._inside_action

    def _field(self):  # type: ignore[no-untyped-def]
        return self._field_or_variable(T.FIELD)

    def _variable(self):  # type: ignore[no-untyped-def]
        if self._at_terminator():
            self._emit(T.VARIABLE)
            return self._inside_action
        return self._field_or_variable(T.VARIABLE)

    def _field_or_variable(self, typ: T):  # type: ignore[no-untyped-def]
        if self._at_terminator():
            self._emit(T.VARIABLE if typ == T.VARIABLE else T.DOT)
            return self._inside_action
        while is_alnum(self._next()):
            pass
        self._backup()
        if not self._at_terminator():
            self._error(f"bad character {_u(self._peek())}")
            return None
        self._emit(typ)
        return self._inside_action

    def _char(self):  # type: ignore[no-untyped-def]
        while True:
            c = self._next()
            if c == "\\":
                c = self._next()
                if c not in ("", "\n"):
                    continue
            if c in ("", "\n"):
                self._error("unterminated character constant")
                return None
            if c == "'":
                break
        self._emit(T.CHAR_CONSTANT)
        return self._inside_action

    def _number(self):  # type: ignore[no-untyped-def]
        if not self._scan_number():
            self._error(f'bad number syntax: "{self.text[self.start : self.pos]}"')
            return None
        if self._peek() in ("+", "-"):
            if not self._scan_number() or self.text[self.pos - 1] != "i":
                self._error(f'bad number syntax: "{self.text[self.start : self.pos]}"')
                return None
            self._emit(T.COMPLEX)
        else:
            self._emit(T.NUMBER)
        return self._inside_action

    def _scan_number(self) -> bool:
        self._accept("+-")
        digits = "0123456789_"
        if self._accept("0"):
            if self._accept("xX"):
                digits = "0123456789abcdefABCDEF_"
            elif self._accept("oO"):
                digits = "01234567_"
            elif self._accept("bB"):
                digits = "01_"
        self._accept_run(digits)
        if self._accept("."):
            self._accept_run(digits)
        if len(digits) == 11 and self._accept("eE"):
            self._accept("+-")
            self._accept_run("0123456789_")
        if len(digits) == 23 and self._accept("pP"):
            self._accept("+-")
            self._accept_run("0123456789_")
        self._accept("i")
        if is_alnum(self._peek()):
            self._next()
            return False
        return True

    def _quote(self):  # type: ignore[no-untyped-def]
        while True:
            c = self._next()
            if c == "\\":
                c = self._next()
                if c not in ("", "\n"):
                    continue
            if c in ("", "\n"):
                self._error("unterminated quoted string")
                return None
            if c == '"':
                break
        self._emit(T.STRING)
        return self._inside_action

    def _raw_quote(self):  # type: ignore[no-untyped-def]
        x = self.text.find("`", self.pos)
        if x < 0:
            self._error("unterminated raw quoted string")
            return None
        self.pos = x + 1
        self._emit(T.RAW_STRING)
        return self._inside_action


def lex(text: str) -> list[Item]:
    return Lexer(text).run()
