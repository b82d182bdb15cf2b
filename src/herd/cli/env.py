"""What CLI commands get from outside: the engine loader, the terminal. Tests swap these.

`CliEnv` travels as click's context object: `cli.main(obj=CliEnv(loader=fake))`, or with
click's test runner `runner.invoke(cli, args, obj=CliEnv(...))`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from herd.store.wheels import Progress


class LLM(Protocol):
    """The part of `herd.load(...)`'s result the CLI uses."""

    def generate(
        self,
        prompt: str,
        *,
        system: str | None = None,
        options: dict[str, Any] | None = None,
        raw: bool = False,
        stream: bool = False,
        **kw: Any,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """`kw`: `format`, `think` when the user set them."""
        ...

    def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        options: dict[str, Any] | None = None,
        stream: bool = False,
        **kw: Any,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """`kw`: `format`, `think` when the user set them."""
        ...

    def info(self) -> dict[str, Any]: ...


# (model: store name or .gguf Path, backend, progress[, projector=Path]) -> LLM; pulls a
# missing store model; `projector` (a projector GGUF, `herd run --mmproj`) only when given
Loader = Callable[..., LLM]


def default_loader(
    model: str | Path, backend: str | None, progress: Progress, projector: Path | None = None
) -> LLM:
    import herd  # the engine is imported only by commands that run a model

    load = herd.load  # type: ignore[attr-defined]
    llm: LLM = load(model, backend=backend, progress=progress, projector=projector)
    return llm


def default_connect(start: bool = False) -> Any:
    """A client of the running `herd serve` (started in the background when `start`), or
    None when there is none: commands then work on the store and engine in-process."""
    from herd.cli.client import connect

    return connect(start)


def _tty_input(prompt: str) -> str:
    import readline  # noqa: F401  (line editing and in-session history for input())

    return input(prompt)


@dataclass
class CliEnv:
    loader: Loader = default_loader
    stdin_isatty: Callable[[], bool] = lambda: sys.stdin.isatty()
    # the REPL's line reader: raises EOFError on Ctrl-D, KeyboardInterrupt on Ctrl-C
    read_line: Callable[[str], str] = _tty_input
    # (start a server if none runs?) -> herd.cli.client.Client | None
    connect: Callable[[bool], Any] = default_connect
