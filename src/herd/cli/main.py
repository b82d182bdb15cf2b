"""The `herd` command: Ollama's CLI for herd's store and engine.

Every error a user can cause is a HerdError; `HerdGroup.invoke` is the one place that
turns it into a single `Error: <message>` line on stderr and exit status 1.
"""

from __future__ import annotations

from typing import Any

import click

from herd.cli.env import CliEnv
from herd.cli.format import human_bytes, human_time, table
from herd.cli.progress import PullProgress
from herd.cli.run import run
from herd.cli.show import load_facts, render_info, single_field
from herd.errors import HerdError
from herd.store import Store, pull


class HerdGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HerdError as e:
            message = " ".join(str(e).split()) or type(e).__name__
            click.echo(f"Error: {message}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            ctx.exit(130)


@click.group(cls=HerdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def cli(ctx: click.Context) -> None:
    """herd: run large language models locally (Ollama-compatible)."""
    ctx.ensure_object(CliEnv)


@cli.command("pull")
@click.argument("model")
def pull_cmd(model: str) -> None:
    """Pull a model into the store."""
    with PullProgress() as progress:
        pull(model, store=Store(), progress=progress)


@cli.command("list")
def list_cmd() -> None:
    """List models in the store."""
    rows = [["NAME", "ID", "SIZE", "MODIFIED"]]
    for m in Store().list():
        rows.append([m.name, m.digest[:12], human_bytes(m.size), human_time(m.modified)])
    click.echo(table(rows))


cli.add_command(list_cmd, "ls")


@cli.command("show")
@click.argument("model")
@click.option("--license", "which", flag_value="license", help="Show the license.")
@click.option("--modelfile", "which", flag_value="modelfile", help="Show the Modelfile.")
@click.option("--parameters", "which", flag_value="parameters", help="Show parameters.")
@click.option("--system", "which", flag_value="system", help="Show the system message.")
@click.option("--template", "which", flag_value="template", help="Show the template.")
@click.option("-v", "--verbose", is_flag=True, help="Also show metadata and tensors.")
def show_cmd(model: str, which: str | None, verbose: bool) -> None:
    """Show information about a model (a store name or a .gguf file)."""
    facts = load_facts(model, Store())
    if which:
        click.echo(single_field(facts, which).rstrip("\n"))
    else:
        click.echo(render_info(facts, verbose))


@cli.command("rm")
@click.argument("models", nargs=-1, required=True)
def rm_cmd(models: tuple[str, ...]) -> None:
    """Remove models (and blobs no other model uses)."""
    store = Store()
    for name in models:
        store.delete(name)
        click.echo(f"deleted '{name}'")


@cli.command("cp")
@click.argument("source")
@click.argument("destination")
def cp_cmd(source: str, destination: str) -> None:
    """Copy a model under a new name (blobs are shared)."""
    Store().copy(source, destination)
    click.echo(f"copied '{source}' to '{destination}'")


cli.add_command(run)


def main() -> None:
    cli()
