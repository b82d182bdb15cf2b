"""What `herd run` shows: streamed answers with their thinking, and `--verbose` timings;
also what both the one-shot path and the REPL send besides the text: the `--think` and
`--format` arguments, and the images whose paths the prompt names."""

from __future__ import annotations

import os
import re
import shutil
import threading
import unicodedata
from collections.abc import Callable, Iterable
from typing import Any

import click

from herd.cli.format import go_duration
from herd.errors import HerdError

Write = Callable[[str], None]


def _out(text: str) -> None:
    click.echo(text, nl=False)  # click.echo flushes: tokens appear as they arrive


def _err(text: str) -> None:
    click.echo(text, nl=False, err=True)


def parse_think(value: str | None) -> bool | str | None:
    """`--think`: true/false, or a level for models that take one."""
    if value is None:
        return None
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("high", "medium", "low"):
        return low
    raise click.BadParameter(
        f"invalid value {value!r}: use true, false, high, medium or low", param_hint="--think"
    )


def _extra(think: bool | str | None, fmt: str | None) -> dict[str, Any]:
    """generate/chat keyword arguments for what was set (an LLM may not take them all)."""
    out: dict[str, Any] = {}
    if think is not None:
        out["think"] = think
    if fmt:
        out["format"] = fmt
    return out


# Ollama's CLI (cmd/interactive.go): a path from /, ./ or a backslash (or ~/, herd's),
# maybe after a drive letter, up to the first image extension; spaces escaped or not
# (a match that names no file stays text)
IMAGE_PATH = re.compile(r"(?:[a-zA-Z]:)?(?:~/|\./|/|\\)[\S\\ ]+?\.(?i:jpg|jpeg|png|webp)\b")
_ESCAPE = re.compile(r"\\([ ()\[\]{}$&;'\\*?~])")  # a shell's escapes: "\ " -> " "
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG (WebP: RIFF....WEBP)
MAX_IMAGE_FILE = 100 * 1024 * 1024  # Ollama's CLI limit


def attach_images(llm: Any, text: str, note: Write | None = None) -> tuple[str, list[bytes]]:
    """The prompt without the image paths it names, and those images' bytes, for a model
    with vision (`llm.info()["capabilities"]`); for any other model the paths stay text,
    as in Ollama. `note` hears "Added image '<path>'" for each (default: stderr)."""
    if not IMAGE_PATH.search(text) or "vision" not in (llm.info().get("capabilities") or []):
        return text, []
    return extract_images(text, note or _err)


def extract_images(text: str, note: Write) -> tuple[str, list[bytes]]:
    """Ollama's extractFileData: each path in `text` to an existing JPEG, PNG or WebP file
    is read and removed from the text (with the quotes around it); a path to nothing is
    left alone; HerdError for a file that is no such image or is over 100 MB."""
    images: list[bytes] = []
    for found in IMAGE_PATH.findall(text):
        path = os.path.expanduser(_ESCAPE.sub(r"\1", found))
        data = _read_image(path)
        if data is None:
            continue
        note(f"Added image '{path}'\n")
        for quoted in (f"'{path}'", f"'{found}'", f'"{path}"', f'"{found}"', found):
            text = text.replace(quoted, "")
        images.append(data)
    return text.strip(), images


def _read_image(path: str) -> bytes | None:
    """The file's bytes; None when there is no such file."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if not (head.startswith(_MAGIC) or head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
                raise HerdError(f"couldn't process image '{path}': not a JPEG, PNG or WebP file")
            if os.fstat(f.fileno()).st_size > MAX_IMAGE_FILE:
                raise HerdError(f"couldn't process image '{path}': larger than 100MB")
            return head + f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise HerdError(f"couldn't process image '{path}': {e.strerror or e}") from None


def _response(chunk: dict[str, Any]) -> str:
    return str(chunk.get("response") or "")


def _content(chunk: dict[str, Any]) -> str:
    return str((chunk.get("message") or {}).get("content") or "")


def _thinking(chunk: dict[str, Any]) -> str:
    return str(chunk.get("thinking") or (chunk.get("message") or {}).get("thinking") or "")


GREY, BOLD, DEFAULT = "\033[90m", "\033[1m", "\033[0m"


class Shown:
    """An answer as Ollama's CLI shows it: the thinking first, between "Thinking..." and
    "...done thinking." (grey on a terminal), then the content."""

    def __init__(self, write: Write, *, hide_thinking: bool = False, plain: bool = True) -> None:
        self.write, self.hide, self.plain = write, hide_thinking, plain
        self.thinking_open = False
        self.last = ""

    def add(self, chunk: dict[str, Any], content: str) -> None:
        thinking = _thinking(chunk)
        if thinking and not self.hide:
            if not self.thinking_open:
                self.write(
                    "Thinking...\n" if self.plain else f"{GREY}{BOLD}Thinking...\n{DEFAULT}{GREY}"
                )
                self.thinking_open = True
            self.write(thinking)
            self.last = thinking
        if content:
            self.close()
            self.write(content)

    def close(self) -> None:
        if self.thinking_open:
            end = "...done thinking.\n\n"
            self.write(
                ("" if self.last.endswith("\n") else "\n")
                + (end if self.plain else f"{GREY}{BOLD}{end}{DEFAULT}")
            )
            self.thinking_open = False


def stream_out(
    chunks: Any,
    pick: Callable[[dict[str, Any]], str],
    write: Write,
    *,
    hide_thinking: bool = False,
    plain: bool = True,
    wrap: bool = False,
    interruptible: bool = False,
) -> tuple[str, dict[str, Any] | None]:
    """Write each chunk's text (and thinking, unless hidden) as it comes; returns (whole
    text, final chunk). On a terminal (`plain` False) a spinner turns until the first chunk
    and, with `wrap`, lines break between words at the terminal's width, as Ollama's do.

    Ctrl-C propagates from here (one-shot exits 130) unless `interruptible`: then it stops
    this answer only (the REPL), keeping what was shown.
    """
    parts: list[str] = []
    final = None
    wrapper = WordWrap(write, terminal_width()) if wrap and not plain else None
    shown = Shown(wrapper.write if wrapper else write, hide_thinking=hide_thinking, plain=plain)
    spinner = None if plain else Spinner(write)
    try:
        for chunk in _iterate(chunks):
            if spinner is not None:
                spinner.stop()
                spinner = None
            piece = pick(chunk)
            shown.add(chunk, piece)
            if piece:
                parts.append(piece)
            if chunk.get("done"):
                final = chunk
    except KeyboardInterrupt:
        if not interruptible:
            raise
        close = getattr(chunks, "close", None)
        if close is not None:
            close()  # drops the connection: the server stops generating
    finally:
        if spinner is not None:
            spinner.stop()
    shown.close()
    if wrapper is not None:
        wrapper.flush()
    return "".join(parts), final


def terminal_width() -> int:
    return shutil.get_terminal_size((80, 24)).columns


_ESC = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _cells(ch: str) -> int:
    """Columns a character takes: 2 for East Asian wide ones, 0 for combining marks."""
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


class WordWrap:
    """Word wrap while streaming, as Ollama's CLI does it: a word that would reach past
    the line (Ollama keeps 5 columns free) starts the next one. The word being typed and
    the spaces before it are held until it ends, so nothing has to be taken back and no
    line ends in spaces; a word longer than a line is cut.
    """

    def __init__(self, write: Write, width: int) -> None:
        self.out = write
        self.limit = max(width - 5, 10)
        self.col = 0  # columns used on the current line
        self.gap = ""  # spaces before the held word
        self.word, self.word_cells = "", 0

    def write(self, text: str) -> None:
        pos = 0
        for m in _ESC.finditer(text):
            self._text(text[pos : m.start()])
            self.flush()
            self.out(m.group())  # colours take no columns
            pos = m.end()
        self._text(text[pos:])

    def _text(self, text: str) -> None:
        for ch in text:
            if ch in "\r\n":
                self.flush()
                self.gap = ""
                self.out(ch)
                self.col = 0
            elif ch in " \t":
                self.flush()
                self.gap += ch
            elif _cells(ch) == 2:  # CJK: every character may start a line
                self.flush()
                self._place(ch, 2)
            else:
                self.word += ch
                self.word_cells += _cells(ch)
                if self.word_cells >= self.limit:  # a word longer than a line
                    self.flush()

    def _place(self, text: str, cells: int) -> None:
        if self.col and self.col + len(self.gap) + cells > self.limit:
            self.out("\n")  # the break takes the place of the spaces
            self.col, self.gap = 0, ""
        self.out(self.gap + text)  # at a line's start: the model's own indentation
        self.col += len(self.gap) + cells
        self.gap = ""

    def flush(self) -> None:
        """Write the word held so far."""
        if self.word:
            word, cells = self.word, self.word_cells
            self.word, self.word_cells = "", 0
            self._place(word, cells)


class Spinner:
    """Ollama's braille spinner, drawn until the first token (on a terminal only)."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, write: Write, interval: float = 0.1) -> None:
        self.write, self.interval = write, interval
        self.done = threading.Event()
        self.drawn = False
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        i = 0
        while not self.done.wait(self.interval if i else 0.0):
            self.write(self.FRAMES[i % len(self.FRAMES)] + "\b")
            self.drawn = True
            i += 1

    def stop(self) -> None:
        if not self.done.is_set():
            self.done.set()
            self.thread.join()
            if self.drawn:
                self.write(" \b")  # clear the frame; the answer starts where it was


def timings(final: dict[str, Any]) -> str:
    """Ollama's `--verbose` summary (durations in ns, printed as Go durations)."""

    def ns(key: str) -> int:
        return int(final.get(key) or 0)

    lines = []
    if ns("total_duration") > 0:
        lines.append(f"total duration:       {go_duration(ns('total_duration'))}")
    if ns("load_duration") > 0:
        lines.append(f"load duration:        {go_duration(ns('load_duration'))}")
    for label, count, duration in (
        ("prompt eval", "prompt_eval_count", "prompt_eval_duration"),
        ("eval", "eval_count", "eval_duration"),
    ):
        if ns(count) > 0:
            lines.append(f"{label + ' count:':<22}{ns(count)} token(s)")
        if ns(duration) > 0:
            lines.append(f"{label + ' duration:':<22}{go_duration(ns(duration))}")
            rate = ns(count) / (ns(duration) / 1e9)
            lines.append(f"{label + ' rate:':<22}{rate:.2f} tokens/s")
    return "".join(line + "\n" for line in lines)


def _iterate(chunks: Any) -> Iterable[dict[str, Any]]:
    return [chunks] if isinstance(chunks, dict) else chunks
