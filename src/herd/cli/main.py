"""The `herd` command: Ollama's CLI for herd's store and engine.

Every error a user can cause is a HerdError; `HerdGroup.invoke` is the one place that
turns it into a single `Error: <message>` line on stderr and exit status 1.
"""

from __future__ import annotations

from typing import Any

import click

from herd.cli.convert import convert_cmd
from herd.cli.env import CliEnv
from herd.cli.export import export_cmd
from herd.cli.progress import PullProgress
from herd.cli.rpc_server import rpc_server_cmd
from herd.cli.run import run
from herd.cli.server_cmds import ps_cmd, serve_cmd, show_remote, stop_cmd
from herd.cli.session import model_table
from herd.cli.show import render_info, single_field
from herd.errors import HerdError
from herd.store import Store, pull
from herd.store.facts import is_model_path, load_facts


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


def _server() -> Any:
    """A client of the running `herd serve`, or None: then the store is used in-process."""
    env = click.get_current_context().find_object(CliEnv)
    return (env or CliEnv()).connect(False)


def _version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """`ollama -v`: this program's version, and the server's when one answers."""
    if not value or ctx.resilient_parsing:
        return
    import herd

    click.echo(f"herd version is {herd.__version__}")
    env = ctx.find_object(CliEnv) or CliEnv()
    try:
        client = env.connect(False)
        info = client.request("GET", "/api/version") if client is not None else None
    except (HerdError, OSError):  # a server that answers oddly is no server here
        info = None
    if isinstance(info, dict):
        server = info.get("herd_version") or info.get("version")
        api = f" (Ollama API {info['version']})" if info.get("herd_version") else ""
        click.echo(f"server version is {server}{api}")
    ctx.exit(0)


@click.group(cls=HerdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-v",
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_version,
    help="Show version information.",
)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """herd: run large language models locally (Ollama-compatible)."""
    ctx.ensure_object(CliEnv)


@cli.command("pull")
@click.argument("model")
@click.option("--insecure", is_flag=True, help="Use an insecure (plain HTTP) registry.")
def pull_cmd(model: str, insecure: bool) -> None:
    """Pull a model from the catalog or a registry."""
    client = _server()
    try:
        if client is not None:  # the server pulls into its own store (and stops when we go)
            with PullProgress() as progress:
                client.pull(model, progress, insecure)
            return
        from herd.registry import Options, registry_puller

        with PullProgress() as progress:
            pull(
                model,
                store=Store(),
                progress=progress,
                registry=registry_puller(Options(insecure=insecure)),
            )
    except KeyboardInterrupt:
        _interrupted(f"pull interrupted: `herd pull {model}` resumes it")


@cli.command("push")
@click.argument("model")
@click.option("--insecure", is_flag=True, help="Use an insecure (plain HTTP) registry.")
def push_cmd(model: str, insecure: bool) -> None:
    """Push a model to its registry (the host part of its name)."""
    from herd.registry import Options, push

    try:
        with PullProgress() as progress:
            push(Store(), model, Options(insecure=insecure), progress)
    except KeyboardInterrupt:
        _interrupted(f"push interrupted: `herd push {model}` starts it again")


def _interrupted(message: str) -> None:
    """Ctrl-C: one line instead of a traceback, exit status 130 like a shell's."""
    click.echo(f"Error: {message}", err=True)
    click.get_current_context().exit(130)


@cli.command("create")
@click.argument("model")
@click.option(
    "-f", "--file", "modelfile", default=None, help="Name of the Modelfile (default: ./Modelfile)."
)
@click.option(
    "-q", "--quantize", default=None, help="Quantize the model to this type (e.g. q4_K_M, q8_0)."
)
@click.option("--draft-quantize", default=None, help="Quantize the DRAFT model to this type.")
def create_cmd(
    model: str, modelfile: str | None, quantize: str | None, draft_quantize: str | None
) -> None:
    """Create a model from a Modelfile."""
    from pathlib import Path

    from herd import modelfile as mf
    from herd.registry import registry_puller
    from herd.store.create import create

    path = Path(modelfile or "Modelfile")
    if modelfile is None and not path.exists():
        parsed = mf.parse("FROM .\n")  # like Ollama: the current folder is the model
    else:
        parsed = mf.read(path)
    for warning in parsed.warnings:
        click.echo(warning, err=True)
    with PullProgress() as progress:
        # FROM a model the store lacks: pull it (catalog or registry), as Ollama does
        create(
            Store(),
            model,
            parsed,
            base_dir=path.parent,
            quantize_to=quantize,
            progress=progress,
            pull=lambda store, name, report: pull(
                name, store=store, progress=report, registry=registry_puller()
            ),
            draft_quantize=draft_quantize,
        )


@cli.command("list")
def list_cmd() -> None:
    """List models in the store."""
    click.echo(model_table(_server()))


cli.add_command(list_cmd, "ls")


@cli.command("show")
@click.argument("model")
@click.option("--license", is_flag=True, help="Show the license.")
@click.option("--modelfile", is_flag=True, help="Show the Modelfile.")
@click.option("--parameters", is_flag=True, help="Show parameters.")
@click.option("--system", is_flag=True, help="Show the system message.")
@click.option("--template", is_flag=True, help="Show the template.")
@click.option("-v", "--verbose", is_flag=True, help="Also show metadata and tensors.")
def show_cmd(model: str, verbose: bool, **flags: bool) -> None:
    """Show information about a model (a store name or a .gguf file)."""
    chosen = [name for name, on in flags.items() if on]
    if len(chosen) > 1:
        raise HerdError(
            "only one of '--license', '--modelfile', '--parameters', '--system', "
            "or '--template' can be specified"
        )
    client = None if is_model_path(model) else _server()
    if client is not None:
        show_remote(client, model, chosen, verbose)
        return
    facts = load_facts(model, Store())
    if chosen == ["modelfile"]:
        click.echo(single_field(facts, "modelfile"))  # Ollama's Println: a blank line ends it
    elif chosen:
        click.echo(single_field(facts, chosen[0]).rstrip("\n"))
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
cli.add_command(serve_cmd)  # herd serve
cli.add_command(ps_cmd)  # herd ps
cli.add_command(stop_cmd)  # herd stop

cli.add_command(convert_cmd)  # herd convert
cli.add_command(export_cmd)  # herd export onnx
cli.add_command(rpc_server_cmd)  # herd rpc-server


def main() -> None:
    cli()
