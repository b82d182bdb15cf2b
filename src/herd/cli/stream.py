"""What `herd run` shows: streamed answers with their thinking, and `--verbose` timings;
also what both the one-shot path and the REPL send besides the text: the `--think` and
`--format` arguments, and the images whose paths the prompt names."""

from __future__ import annotations

import os
import re
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
) -> tuple[str, dict[str, Any] | None]:
    """Write each chunk's text (and thinking, unless hidden) as it comes; returns (whole
    text, final chunk).

    Ctrl-C propagates from here (one-shot exits 130); the REPL catches it in `send`.
    """
    parts: list[str] = []
    final = None
    shown = Shown(write, hide_thinking=hide_thinking, plain=plain)
    for chunk in _iterate(chunks):
        piece = pick(chunk)
        shown.add(chunk, piece)
        if piece:
            parts.append(piece)
        if chunk.get("done"):
            final = chunk
    shown.close()
    return "".join(parts), final


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
