"""`herd run`: one-shot generation, or Ollama's interactive chat REPL."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from herd import envconfig
from herd.cli.client import remote_llm
from herd.cli.env import LLM, CliEnv
from herd.cli.progress import PullProgress
from herd.cli.repl import Repl
from herd.cli.session import LocalSession, RemoteSession, Session
from herd.cli.stream import (
    _err,
    _extra,
    _out,
    _response,
    attach_images,
    parse_think,
    stream_out,
    timings,
)
from herd.errors import HerdError
from herd.store.facts import is_model_path


@click.command()
@click.argument("model")
@click.argument("prompt", nargs=-1)
@click.option("--verbose", is_flag=True, help="Show timings for the response.")
@click.option("--backend", default=None, help="Compute backend (numpy, ggml, ...).")
@click.option(
    "--think",
    default=None,
    is_flag=False,
    flag_value="true",
    help="Enable thinking mode: true/false or high/medium/low for supported models.",
)
@click.option("--hidethinking", is_flag=True, help="Hide thinking output (if any).")
@click.option("--format", "fmt", default=None, help="Response format (e.g. json).")
@click.option(
    "--mmproj",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Projector GGUF (llama.cpp's mmproj) that gives the model images.",
)
@click.option(
    "--keepalive", default=None, help="Duration to keep a model loaded (e.g. 5m, 1h, 0, -1)."
)
@click.option("--nowordwrap", is_flag=True, help="Don't wrap words to the next line automatically.")
@click.option(
    "--truncate/--no-truncate",
    default=None,
    help="Embedding models: cut inputs longer than the context (default) or fail.",
)
@click.option(
    "--dimensions", type=click.IntRange(min=1), default=None, help="Embedding models: dimensions."
)
@click.pass_obj
def run(
    env: CliEnv,
    model: str,
    prompt: tuple[str, ...],
    verbose: bool,
    backend: str | None,
    think: str | None,
    hidethinking: bool,
    fmt: str | None,
    mmproj: Path | None,
    keepalive: str | None,
    nowordwrap: bool,
    truncate: bool | None,
    dimensions: int | None,
) -> None:
    """Run a model: answer PROMPT (or stdin), or chat interactively; an embedding model
    prints the vector of PROMPT."""
    if keepalive is not None:
        try:
            envconfig.parse_duration(keepalive)
        except ValueError:
            raise click.BadParameter(
                f"invalid duration {keepalive!r} (e.g. 5m, 1h30m, 0, -1)", param_hint="--keepalive"
            ) from None
    prompts = list(prompt)
    try:
        think_value = parse_think(think)
    except click.BadParameter:  # `--think <prompt>`: a bare --think, then the prompt
        think_value = True
        prompts.insert(0, str(think))
    interactive = not prompts
    if not env.stdin_isatty():
        # like Ollama: piped input goes first, then the arguments, joined by spaces
        piped = sys.stdin.read()
        if piped:
            prompts.insert(0, piped)
        interactive = False
    target: str | Path = Path(model).expanduser() if is_model_path(model) else model
    progress = PullProgress()
    try:
        # like Ollama's CLI: a client of the server (started in the background if none
        # runs); a .gguf file, an explicit --backend or a --mmproj file (which the server
        # cannot be handed) runs in this process instead
        local = backend is not None or isinstance(target, Path) or mmproj is not None
        client = None if local else env.connect(True)
        if client is not None:
            llm: LLM = remote_llm(client, model, progress, keepalive)
        elif mmproj is not None:
            llm = env.loader(target, backend, progress, projector=mmproj.expanduser())
        else:
            llm = env.loader(target, backend, progress)
    finally:
        progress.close()
    caps = llm.info().get("capabilities") or []
    if "embedding" in caps and "completion" not in caps:
        if interactive:
            raise HerdError("embedding models require input text. Usage: herd run MODEL TEXT")
        _out(json.dumps(_embedding(llm, " ".join(prompts), truncate, dimensions)) + "\n")
        return
    if not interactive:
        text = " ".join(prompts)
        if not text.strip():
            return  # Ollama loads the model and prints nothing for an empty prompt
        extra = _extra(think_value, fmt)
        text, images = attach_images(llm, text)  # paths to images, for a vision model
        if images:
            extra["images"] = images
        answer, final = stream_out(
            llm.generate(text, stream=True, **extra),
            _response,
            _out,
            hide_thinking=hidethinking,
            plain=not sys.stdout.isatty(),
            wrap=not nowordwrap,
        )
        if answer and not answer.endswith("\n"):
            _out("\n")
        if verbose and final:
            _err(timings(final))
        return
    session: Session
    if client is not None:
        session = RemoteSession(client, PullProgress, keepalive)
    else:
        session = LocalSession(lambda name: _load_local(env, name, backend))
    repl = Repl(
        llm, env.read_line, verbose=verbose, model=model, session=session, wordwrap=not nowordwrap
    )
    repl.think, repl.format, repl.hide_thinking = think_value, fmt, hidethinking
    repl.run()


def _load_local(env: CliEnv, model: str, backend: str | None) -> LLM:
    with PullProgress() as progress:
        return env.loader(model, backend, progress)


def _embedding(llm: Any, text: str, truncate: bool | None, dimensions: int | None) -> list[float]:
    """The text's vector, as `ollama run EMBEDDING_MODEL TEXT` prints it."""
    if hasattr(llm, "embed_text"):  # the server's /api/embed
        return list(llm.embed_text(text, truncate, dimensions))
    vectors = llm.embed(text, truncate=truncate is not False, dimensions=dimensions)
    # float32 values printed at their own precision, as Go's encoding/json does
    return [float(str(v)) for v in vectors[0]]
