"""`herd serve`, and `herd ps` / `herd stop`, which only make sense against a server."""

from __future__ import annotations

import errno
import socket
from datetime import datetime

import click

from herd import envconfig
from herd.cli.client import Client, connect
from herd.cli.format import human_bytes, human_time, table
from herd.errors import HerdError
from herd.store import ModelEntry


@click.command("serve")
@click.option("--ray", "ray_address", metavar="ADDRESS", help="Serve on this Ray cluster.")
@click.option("--replicas", default=2, show_default=True, help="With --ray: herd replicas.")
@click.option(
    "--max-replicas", type=int, help="With --ray: autoscale from --replicas up to this many."
)
@click.option(
    "--scale-on",
    type=click.Choice(["herd", "ray"]),
    default="herd",
    show_default=True,
    help="With --max-replicas: herd's gauges (queue depth, slots) or Ray's requests in flight.",
)
@click.option("--model", "models", multiple=True, help="With --ray: load before ready.")
@click.option("--num-cpus", default=1.0, show_default=True, help="With --ray: CPUs a replica.")
@click.option("--num-gpus", default=0.0, show_default=True, help="With --ray: GPUs a replica.")
def serve_cmd(
    ray_address: str | None,
    replicas: int,
    max_replicas: int | None,
    scale_on: str,
    models: tuple[str, ...],
    num_cpus: float,
    num_gpus: float,
) -> None:
    """Start the server (Ollama's and OpenAI's APIs on HERD_HOST, default 127.0.0.1:11434).

    With --ray, herd replicas on that Ray cluster behind Ray Serve's HTTP proxy on HERD_HOST,
    routed by prompt prefix; the replicas get this environment's HERD_* settings.

    Environment: HERD_HOST, HERD_MODELS, HERD_KEEP_ALIVE, HERD_MAX_LOADED_MODELS,
    HERD_MAX_QUEUE, HERD_NUM_PARALLEL, HERD_CONTEXT_LENGTH, HERD_LOAD_TIMEOUT,
    HERD_MEMORY_LIMIT, HERD_API_KEY, HERD_ORIGINS, HERD_BACKEND, HERD_DEBUG.
    """
    if ray_address:
        return _serve_ray(ray_address, replicas, max_replicas, scale_on, models, num_cpus, num_gpus)
    _check_free(envconfig.host())  # before the server logs that it listens
    from herd.server import serve

    serve()


def _serve_ray(
    address: str,
    replicas: int,
    max_replicas: int | None,
    policy: str,
    models: tuple[str, ...],
    num_cpus: float,
    num_gpus: float,
) -> None:
    """Deploy on Ray, then wait in the foreground; Ctrl-C (or SIGTERM) removes the app."""
    import signal
    import time

    import herd

    try:
        from herd.deploy import ray as deploy
    except ImportError as e:
        raise HerdError(f"--ray needs Ray Serve: pip install 'herd[ray]' ({e})") from None
    from herd.server.app import Settings

    if replicas < 1 or (max_replicas is not None and max_replicas < replicas):
        raise HerdError("--replicas must be at least 1 and --max-replicas at least --replicas")
    settings = Settings.from_env()
    autoscaling = None
    if max_replicas is not None:  # herd's policy; Ray's default (--scale-on ray) on this target
        autoscaling = {
            "min_replicas": replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": settings.num_parallel,
        }
    env = envconfig.herd_variables()  # the replicas' runners read the same settings
    spec = deploy.ReplicaSpec(settings, herd.__version__, models)
    plan = deploy.Plan(replicas, autoscaling, num_cpus, num_gpus, env=env, policy=policy)
    deploy.connect(address)
    signal.signal(signal.SIGTERM, _interrupt)  # stopped like Ctrl-C: the app is removed
    try:
        deploy.run(spec, plan, settings.host.bind_host, settings.host.port)
        scale = f"{replicas}-{max_replicas}" if max_replicas else str(replicas)
        click.echo(
            f"herd {herd.__version__}: {scale} replicas on Ray at {address}, "
            f"listening on {settings.host.base_url}",
            err=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        deploy.stop()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _check_free(host: envconfig.HostURL) -> None:
    """Bind the address as uvicorn will (SO_REUSEADDR) and let it go: a port another server
    holds is a one-line error naming the address, not a false "listening on" line."""
    address = f"{host.bind_host}:{host.port}"
    try:
        infos = socket.getaddrinfo(host.bind_host, host.port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise HerdError(f"cannot listen on {address}: {e}") from None
    family, kind, proto, _, sockaddr = infos[0]
    try:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(sockaddr)
    except OSError as e:
        hint = (
            " (is another herd or ollama server running? set HERD_HOST to use another port)"
            if e.errno == errno.EADDRINUSE
            else ""
        )
        reason = (e.strerror or str(e)).lower()
        raise HerdError(f"cannot listen on {address}: {reason}{hint}") from None


def _client() -> Client:
    client = connect(start=False)
    if client is None:
        raise HerdError(
            f"could not connect to a herd server at {envconfig.host().base_url}, "
            "is it running? (start one with `herd serve`)"
        )
    return client


def _until(expires: str) -> str:
    when = datetime.fromisoformat(expires.replace("Z", "+00:00"))
    now = datetime.now(when.tzinfo)
    if (when - now).days > 365 * 100:
        return "Forever"
    if when < now:
        return "Stopping..."
    return human_time(when, now)


@click.command("ps")
def ps_cmd() -> None:
    """List the models loaded in the server."""
    rows = [["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]]
    for m in _client().request("GET", "/api/ps")["models"]:
        size, vram = int(m.get("size") or 0), int(m.get("size_vram") or 0)
        if vram == 0:
            processor = "100% CPU"
        elif vram >= size:
            processor = "100% GPU"
        else:
            cpu = round(100 * (size - vram) / size)
            processor = f"{cpu}%/{100 - cpu}% CPU/GPU"
        if m.get("backend"):  # herd's server says which engine runs it
            processor += f" ({m['backend']})"
        rows.append(
            [
                m["name"],
                str(m.get("digest", ""))[:12],
                human_bytes(size),
                processor,
                str(m.get("context_length", "")),
                _until(m["expires_at"]),
            ]
        )
    click.echo(table(rows, gap="    "))


@click.command("stop")
@click.argument("model")
def stop_cmd(model: str) -> None:
    """Unload a running model."""
    client = _client()
    loaded = [m["name"] for m in client.request("GET", "/api/ps")["models"]]
    if model not in loaded and f"{model}:latest" not in loaded:
        raise HerdError(f'couldn\'t find model "{model}" to stop')
    client.request("POST", "/api/generate", {"model": model, "keep_alive": 0})


def remote_models(client: Client) -> list[ModelEntry]:
    """`herd list` rows from the server's /api/tags."""
    out = []
    for m in client.request("GET", "/api/tags")["models"]:
        modified = datetime.fromisoformat(m["modified_at"].replace("Z", "+00:00"))
        out.append(
            ModelEntry(
                m["name"],
                m.get("digest", ""),
                int(m.get("size") or 0),
                modified,
                m.get("details") or {},
            )
        )
    return out


def show_remote(client: Client, model: str, chosen: list[str], verbose: bool) -> None:
    """`herd show` from the server's /api/show, printed as the in-process path prints it."""
    from herd.cli.client import show_facts
    from herd.cli.show import render_info, single_field

    resp = client.request("POST", "/api/show", {"model": model, "verbose": verbose})
    facts = show_facts(resp, model)
    if chosen == ["modelfile"]:
        click.echo(resp.get("modelfile", ""))
    elif chosen == ["parameters"] and resp.get("parameters"):
        click.echo(resp["parameters"])
    elif chosen:
        click.echo(single_field(facts, chosen[0]).rstrip("\n"))
    else:
        click.echo(render_info(facts, verbose))
