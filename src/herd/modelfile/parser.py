"""Ollama's Modelfile format (`parser/parser.go`), with errors that point at line and column.

    FROM ./model.gguf            # a GGUF file, a directory, or a model name
    FROM ./mmproj.gguf           # a second FROM: a projector GGUF (llama.cpp's mmproj)
    PARAMETER temperature 0.7    # Ollama's option names and types; `stop` repeats
    TEMPLATE \"\"\"{{ .Prompt }}\"\"\"   # bare to end of line, "quoted", or \"\"\"multi-line\"\"\"
    SYSTEM You are terse.
    ADAPTER ./lora.gguf
    DRAFT ./draft.gguf           # a draft model (GGUF, folder or model name): speculative decoding
    LICENSE \"\"\"MIT ...\"\"\"        # repeatable
    MESSAGE user Hello           # roles: system, user, assistant
    REQUIRES 0.6.0

Directives are case-insensitive; `#` starts a comment line. As in Ollama, a quoted value
ends at the first line whose trimmed text ends with the closing quote(s), and quotes are
not escapable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herd.errors import ModelfileError, OptionError
from herd.options import OPTIONS, parse_text

DIRECTIVES = (
    "from",
    "license",
    "template",
    "system",
    "adapter",
    "draft",
    "renderer",
    "parser",
    "parameter",
    "message",
    "requires",
)
ROLES = ("system", "user", "assistant")

# Accepted with a warning and dropped, as Ollama does.
DEPRECATED = (
    "penalize_newline",
    "low_vram",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "use_mlock",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
)

_SEMVER = re.compile(
    r"v(0|[1-9]\d*)(\.(0|[1-9]\d*)(\.(0|[1-9]\d*)"
    r"(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?)?)?"
)


@dataclass(frozen=True)
class Command:
    """One directive. `name` is Ollama's command name ("model" for FROM, the parameter name
    for PARAMETER); `role` is set for MESSAGE; line/column locate the value."""

    name: str
    args: str
    line: int
    column: int
    directive: str  # lower-case directive as written: "from", "parameter", ...
    role: str = ""

    def __str__(self) -> str:
        """The directive as Ollama's `Command.String` writes it."""
        if self.name == "model":
            return f"FROM {self.args}"
        if self.directive == "message":
            return f"MESSAGE {self.role} {quote(self.args)}"
        if self.directive == "parameter":
            return f"PARAMETER {self.name} {quote(self.args)}"
        return f"{self.name.upper()} {quote(self.args)}"


@dataclass
class Modelfile:
    """The parsed file, plus the typed values a create needs (Ollama's CreateRequest)."""

    commands: list[Command]
    path: str = "Modelfile"
    warnings: list[str] = field(default_factory=list)

    @property
    def from_(self) -> Command:
        return next(c for c in self.commands if c.name == "model")

    @property
    def froms(self) -> list[Command]:
        """Every FROM: the model, and (llama.cpp's two-file layout) its projector file;
        which is which, the files say (`herd.store.create`)."""
        return [c for c in self.commands if c.name == "model"]

    def values(self, name: str) -> list[Command]:
        return [c for c in self.commands if c.name == name and c.directive != "parameter"]

    def last(self, name: str) -> str | None:
        found = self.values(name)
        return found[-1].args if found else None

    @property
    def template(self) -> str | None:
        return self.last("template")

    @property
    def system(self) -> str | None:
        return self.last("system")

    @property
    def licenses(self) -> list[str]:
        return [c.args for c in self.values("license")]

    @property
    def adapters(self) -> list[Command]:
        return self.values("adapter")

    @property
    def draft(self) -> Command | None:
        """The DRAFT line: a draft model for speculative decoding (at most one)."""
        return next(iter(self.values("draft")), None)

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": c.role, "content": c.args} for c in self.values("message")]

    @property
    def renderer(self) -> str | None:
        return self.last("renderer")

    @property
    def parser(self) -> str | None:
        return self.last("parser")

    @property
    def requires(self) -> str | None:
        c = next(iter(self.values("requires")[-1:]), None)
        if c is None:
            return None
        v = c.args if c.args.startswith("v") else "v" + c.args
        if not _SEMVER.fullmatch(v):
            raise ModelfileError(
                "REQUIRES must be a valid semver (e.g. 0.14.0)", c.line, c.column, self.path
            )
        return v[1:]

    @property
    def parameters(self) -> dict[str, Any]:
        """Typed PARAMETER values; repeated `stop`s collect into one list."""
        out: dict[str, Any] = {}
        for c in self.commands:
            if c.directive != "parameter" or c.name in DEPRECATED:
                continue
            value = parse_value(c.name, c.args, c, self.path)
            if isinstance(value, list) and isinstance(out.get(c.name), list):
                out[c.name] = out[c.name] + value
            else:
                out[c.name] = value
        return out

    def __str__(self) -> str:
        return "".join(f"{c}\n" for c in self.commands)


def quote(s: str) -> str:
    """Ollama's quote(): only values with newlines or edge spaces get quotes."""
    if "\n" in s or s.startswith(" ") or s.endswith(" "):
        return f'"""{s}"""' if '"' in s else f'"{s}"'
    return s


def parse_value(name: str, text: str, at: Command | None = None, path: str = "Modelfile") -> Any:
    """A PARAMETER value typed like Ollama's api.FormatParams; ModelfileError else."""
    try:
        return parse_text(name, [text])
    except OptionError as e:
        where = (at.line, at.column) if at else (0, 0)
        suffix = f" for parameter '{name}'" if name in OPTIONS else ""
        raise ModelfileError(f"{e}{suffix}", *where, path) from None


def _decode(data: bytes | str) -> str:
    if isinstance(data, str):
        return data.removeprefix("\ufeff")
    for bom, codec in (
        (b"\xef\xbb\xbf", "utf-8"),
        (b"\xff\xfe", "utf-16-le"),
        (b"\xfe\xff", "utf-16-be"),
    ):
        if data.startswith(bom):
            return data[len(bom) :].decode(codec, errors="replace")
    return data.decode("utf-8", errors="replace")


class _Scanner:
    def __init__(self, text: str, path: str) -> None:
        # CRLF and CR count as one line break, as they do in an editor
        self.lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self.path = path
        self.row = 0  # index into lines

    def error(self, message: str, row: int, col: int) -> ModelfileError:
        return ModelfileError(message, row + 1, col + 1, self.path)


def parse(data: bytes | str, path: str = "Modelfile") -> Modelfile:
    """Parse a Modelfile's text; ModelfileError names the line and column of a problem."""
    s = _Scanner(_decode(data), path)
    commands: list[Command] = []
    warnings: list[str] = []
    while s.row < len(s.lines):
        line = s.lines[s.row]
        stripped = line.lstrip(" \t")
        col = len(line) - len(stripped)
        if not stripped or stripped.startswith("#"):
            s.row += 1
            continue
        m = re.match(r"[A-Za-z]+", stripped)
        word = m.group(0) if m else stripped.split()[0]
        rest = stripped[len(word) :] if m else ""
        if not m or word.lower() not in DIRECTIVES or rest[:1] not in (" ", "\t"):
            if m and word.lower() in DIRECTIVES:
                raise s.error(f"{word.upper()} needs a value", s.row, col + len(word))
            raise s.error(
                f"unknown directive {word!r}: must be one of "
                + ", ".join(d.upper() for d in DIRECTIVES),
                s.row,
                col,
            )
        directive = word.lower()
        col += len(word)
        name, role = ("model" if directive == "from" else directive), ""
        if directive in ("parameter", "message"):
            text = s.lines[s.row][col:]
            pad = len(text) - len(text.lstrip(" \t"))
            col += pad
            m2 = re.match(
                r"[A-Za-z0-9_]+" if directive == "parameter" else r"[A-Za-z]+", text[pad:]
            )
            key = m2.group(0) if m2 else ""
            after = text[pad + len(key) :][:1]
            what = "parameter name" if directive == "parameter" else "message role"
            if not key or after not in (" ", "\t"):
                raise s.error(f"{directive.upper()} needs a {what} and a value", s.row, col)
            if directive == "parameter":
                name = key
                if key in DEPRECATED:
                    warnings.append(f"warning: parameter {key} is deprecated")
                elif key not in OPTIONS:
                    raise s.error(f"unknown parameter '{key}'", s.row, col)
            else:
                if key not in ROLES:
                    raise s.error(
                        f'message role must be one of "system", "user", or '
                        f'"assistant", not {key!r}',
                        s.row,
                        col,
                    )
                role = key
            col += len(key)
        value, vrow, vcol = _value(s, col)
        if directive in ("from", "adapter", "draft") and not value:
            raise s.error(f"{word.upper()} needs a value", vrow, vcol)
        cmd = Command(name, value, vrow + 1, vcol + 1, directive, role)
        if directive == "parameter":
            parse_value(name, value, cmd, path) if name not in DEPRECATED else None
        commands.append(cmd)
    froms = [c for c in commands if c.name == "model"]
    if not froms:
        raise ModelfileError(
            "no FROM line: a Modelfile must say what model it builds on", path=path
        )
    if len(froms) > 2:
        raise ModelfileError(
            "too many FROM lines: at most two, a model and its projector file",
            froms[2].line,
            froms[2].column,
            path,
        )
    drafts = [c for c in commands if c.name == "draft"]
    if len(drafts) > 1:
        raise ModelfileError(
            "too many DRAFT lines: a model takes one draft model",
            drafts[1].line,
            drafts[1].column,
            path,
        )
    return Modelfile(commands, path, warnings)


def _value(s: _Scanner, col: int) -> tuple[str, int, int]:
    """The value starting at column `col` of the current line; advances past it."""
    first = s.lines[s.row][col:]
    pad = len(first) - len(first.lstrip(" \t"))
    row, vcol = s.row, col + pad
    text = first.strip(" \t")
    if not text.startswith('"'):
        s.row += 1
        return text, row, vcol
    triple = text.startswith('"""')
    close, need = ('"""', 6) if triple else ('"', 2)
    buf = text
    while not (len(buf) >= need and buf.endswith(close)):
        s.row += 1
        if s.row >= len(s.lines):
            what = 'closing """' if triple else 'closing "'
            raise s.error(f"unterminated value: no {what} before the end of the file", row, vcol)
        buf = (first[pad:] + "\n" + "\n".join(s.lines[row + 1 : s.row + 1])).strip(" \t")
    s.row += 1
    return buf[len(close) : len(buf) - len(close)], row, vcol


def read(path: str | Path) -> Modelfile:
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ModelfileError("no such file", path=str(path)) from None
    except IsADirectoryError:
        raise ModelfileError("is a directory, not a Modelfile", path=str(path)) from None
    return parse(data, str(path))


_PATHLIKE = re.compile(r"^(\.{1,2}(/|\\|$)|/|~|\\)|\.(gguf|bin|safetensors)$", re.IGNORECASE)


def expand_path(value: str, base_dir: Path) -> Path:
    """Ollama's expandPath: `~`, `~user`, absolute, else relative to the Modelfile's folder."""
    p = Path(value).expanduser() if value.startswith("~") else Path(value)
    return (p if p.is_absolute() else base_dir / p).absolute()


def resolve_source(cmd: Command, base_dir: Path, path: str = "Modelfile") -> Path | str:
    """A FROM/ADAPTER/DRAFT value as an existing path, or (FROM, DRAFT) a model name.

    Like Ollama, anything that is not an existing file or folder is a model name; values
    that can only be paths (./x, /x, ~/x, *.gguf) report "not found" here instead.
    """
    try:
        p = expand_path(cmd.args, base_dir)
    except RuntimeError:  # ~user that does not exist
        raise ModelfileError(f"{cmd.args}: no such user", cmd.line, cmd.column, path) from None
    if p.exists():
        return p
    if cmd.directive == "adapter" or _PATHLIKE.search(cmd.args):
        raise ModelfileError(
            f"{cmd.directive.upper()} {cmd.args}: no such file or directory ({p})",
            cmd.line,
            cmd.column,
            path,
        )
    return cmd.args
