"""`herd rpc-server`: lend this machine's CPU and memory to another herd's model (ggml RPC).

The other machine names it in HERD_RPC=host:port and places layers on it. The protocol
has no authentication or encryption (ggml's own warning): bind to a trusted network only.
"""

from __future__ import annotations

import click

DEFAULT_PORT = 50052  # llama.cpp's rpc-server's


@click.command("rpc-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--threads", default=0, type=click.IntRange(0), help="0: the physical cores")
@click.option(
    "--cache",
    "cache_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="keep large tensors here by hash: a client loading the same model again sends "
    "hashes, not weights",
)
def rpc_server_cmd(host: str, port: int, threads: int, cache_dir: str | None) -> None:
    """Serve this machine's CPU to herd clients with HERD_RPC=host:port (ggml RPC)."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(
            f"warning: ggml RPC on {host} has no authentication; any client that reaches "
            "this port can run graphs here",
            err=True,
        )
    from herd.ml.registry import serve_rpc  # the engine only when serving

    serve_rpc(host, port, threads, cache_dir)
