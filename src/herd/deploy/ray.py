"""herd replicas on Ray Serve: `herd serve --ray ADDRESS --replicas N`.

Two deployments in one Serve application ("herd"):
- `HerdReplica`, N of them (or autoscaled): each holds herd's own server app,
  `herd.server.app.create_app(settings)`, unchanged, and runs each request through it in
  memory (`herd.deploy.asgi`); the scheduler and runner processes are the ones `herd
  serve` runs, and a stopped replica unloads its models. (Not a Serve ingress itself:
  Serve allows one per application.)
- `HerdIngress`, behind Ray Serve's HTTP proxy: reads each request, computes its prefix
  key (`herd.deploy.affinity`) and forwards it through a DeploymentHandle, streamed, to
  the replica `PrefixAffinityRouter` picks. This hop exists because Ray's HTTP proxy
  hands a replica only the ASGI scope and streams the body later, so a request router in
  front of the replicas never sees the messages it would route by.

Autoscaled (`Plan.autoscaling`), the replicas report their /metrics gauges to Ray's
controller and herd's policy (`herd.deploy.autoscale`) decides; `Plan.policy="ray"` keeps
Ray's default, on requests in flight per replica.

Faults: a replica that dies before answering is retried once on another; one that dies
mid-stream ends that response early (the client sees a broken stream), and Ray starts a
new replica. A replica is ready only once its models are in its store (a shared
HERD_MODELS path, or herd's own pull, whose blobs and manifests land by rename, so no
replica ever reads a half-pulled model) and loaded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig
from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

import herd
from herd.deploy import ClusterError
from herd.deploy.affinity import BLOCK, NO_KEY, AffinityTable, Key, request_key
from herd.deploy.asgi import Forwarded, Head, stream
from herd.deploy.autoscale import HerdPolicy, replica_stats
from herd.errors import HerdError, ModelNotFoundError
from herd.server.app import Settings, create_app, error_for_path

log = logging.getLogger("herd.deploy")

APP = "herd"
REPLICA_HEADER = b"x-herd-replica"  # which replica answered (for operators and the tests)
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@dataclass
class ReplicaSpec:
    """What every replica is built from, decided once by the driver."""

    settings: Settings
    version: str  # the driver's herd.__version__: every node must run the same herd
    models: tuple[str, ...] = ()  # pulled (if missing) and loaded before the replica is ready
    pull: bool = True  # a model missing from the store is pulled; False: an error


@dataclass
class Plan:
    """How many replicas, on what, routed how: `build`'s options."""

    replicas: int = 2
    autoscaling: Mapping[str, Any] | None = None  # Ray Serve's autoscaling_config
    num_cpus: float = 1.0  # Ray resources per replica (its runner threads use them)
    num_gpus: float = 0.0
    max_ongoing: int = 32  # per replica; more wait in the ingress
    slack: int = 4  # affinity yields once a replica has this many more requests in flight
    block: int = BLOCK
    env: Mapping[str, str] = field(default_factory=dict)  # HERD_* for the runner processes
    policy: str = "herd"  # with autoscaling: "herd" (herd.deploy.autoscale) or "ray" (Ray's)
    policy_options: Mapping[str, float] = field(default_factory=dict)  # HerdPolicy's kwargs


# ---------------------------------------------------------------- routing
EARLY = 4096  # completions remembered before their request was counted


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve's request router for HerdReplica: `AffinityTable.rank` picks, one replica
    per rank, so Ray tries the best first and moves on only when its queue is full."""

    def initialize_state(
        self, slack: int = 4, min_match: float = 0.0, preloaded: tuple[str, ...] = ()
    ) -> None:
        self.table = AffinityTable(slack=slack, min_match=min_match, preloaded=preloaded)
        self.inflight: Counter[str] = Counter()
        self.requests: dict[str, str] = {}  # internal request id -> replica
        # (request id, replica) whose completion came before the request was counted: Ray
        # fires on_request_routed only after the replica's accept message, and a request
        # answered fast (a 400, a short reply) may have finished and fired
        # on_request_completed already. Counted then, it would stay in flight for good,
        # and every new chat would go to the other replicas. Bounded: a rejected
        # request's completion also lands here and is never routed to that replica.
        self.early: OrderedDict[tuple[str, str], None] = OrderedDict()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        loads = {i: max(self.inflight[i], cache.get(r.replica_id) or 0) for i, r in by_id.items()}
        return [[by_id[i]] for i in self.table.rank(_key(pending_request), loads)]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        rid, req = replica_id.unique_id, pending_request.metadata.internal_request_id
        self.table.record(_key(pending_request), rid)
        if (req, rid) in self.early:  # done already (see initialize_state)
            del self.early[(req, rid)]
            return
        self.inflight[rid] += 1
        self.requests[req] = rid

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        rid = self.requests.pop(internal_request_id, None)
        if rid is None:
            self.early[(internal_request_id, replica_id.unique_id)] = None
            while len(self.early) > EARLY:
                self.early.popitem(last=False)
        elif self.inflight[rid] > 0:
            self.inflight[rid] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.forget(replica_id.unique_id)
        self.inflight.pop(replica_id.unique_id, None)


def _key(pending: PendingRequest | None) -> Key:
    key = pending.kwargs.get("key") if pending is not None else None
    return key if isinstance(key, Key) else NO_KEY


# ---------------------------------------------------------------- deployments
@serve.deployment(name="HerdReplica")
class HerdReplica:
    """One herd server: herd's app, run in memory by `forward` (Serve allows one ingress app
    per application, and that is HerdIngress's), its lifespan entered here."""

    async def __init__(self, spec: ReplicaSpec) -> None:
        self.spec, self.node = spec, _node()
        if spec.version != herd.__version__:
            raise ClusterError(
                f"node {self.node} runs herd {herd.__version__} but the driver runs herd "
                f"{spec.version}: install the same herd on every node"
            )
        store = spec.settings.store
        for model in spec.models:
            try:
                store.resolve(model)
            except ModelNotFoundError:
                if not spec.pull:
                    raise ClusterError(
                        f"node {self.node}: model {model!r} is not in the store {store.root}"
                    ) from None
                await asyncio.to_thread(self._pull, model)
        self.id = serve.get_replica_context().replica_id.unique_id
        self.app = create_app(spec.settings)
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()
        for model in spec.models:  # loaded before Ray counts the replica ready
            req = Forwarded("POST", "/api/generate", body=_json({"model": model}))
            head, body = await _collect(self.app, req)
            if head.status != 200:
                why = _error_text(body)
                raise ClusterError(f"node {self.node}: cannot load model {model!r}: {why}")

    def _pull(self, model: str) -> None:
        from herd.store import resolve_or_pull

        log.info("node %s: pulling %s into %s", self.node, model, self.spec.settings.store.root)
        try:
            resolve_or_pull(model, store=self.spec.settings.store)
        except HerdError as e:
            raise ClusterError(f"node {self.node}: cannot pull {model!r}: {e}") from None

    async def __del__(self) -> None:
        if getattr(self, "lifespan", None) is not None:  # unloads the models: runners exit
            await self.lifespan.__aexit__(None, None, None)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What /metrics shows, for herd's autoscaling policy (async: read on the loop that
        changes the scheduler)."""
        scheduler = self.app.state.scheduler
        parallel = {name: r.parallel for name, r in scheduler.runners.items()}
        return replica_stats(scheduler.gauges(), parallel, self.spec.settings.num_parallel)

    async def forward(self, req: Forwarded, key: Key = NO_KEY) -> AsyncIterator[Head | bytes]:
        """`req` through herd's app, streamed: a Head (naming this replica), then chunks."""
        async for item in stream(self.app, req):
            if isinstance(item, Head):
                item.headers.append((REPLICA_HEADER, self.id.encode()))
            yield item


@serve.deployment(name="HerdIngress")
@serve.ingress()
class HerdIngress:
    """Behind Ray Serve's HTTP proxy: every route, forwarded to the affine replica."""

    def __init__(self, replicas: Any, block: int = BLOCK) -> None:
        self.replicas, self.block = replicas, block

    def __serve_build_asgi_app__(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.handle, methods=METHODS)])

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        client = request.client
        req = Forwarded(
            request.method,
            path,
            request.scope.get("query_string", b""),
            list(request.scope["headers"]),
            body,
            (client.host, client.port) if client else ("127.0.0.1", 0),
        )
        key = request_key(path, body, self.block)
        handle = self.replicas.options(stream=True, method_name="forward")
        for attempt in range(2):  # a replica that died before answering: once more
            gen = handle.remote(req, key=key)
            try:
                head = await gen.__anext__()
                break
            except RayActorError as e:
                log.warning("replica failed before answering %s %s: %s", request.method, path, e)
                if attempt:
                    return error_for_path(path, 503, "no herd replica could answer; try again")
            except StopAsyncIteration:
                return error_for_path(path, 503, "the replica sent no response")
        assert isinstance(head, Head)
        response = StreamingResponse(_rest(gen, path), status_code=head.status)
        response.raw_headers = head.headers
        return response


async def _rest(gen: Any, path: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in gen:
            yield chunk
    except RayActorError as e:  # the client sees the stream break: no silent truncation
        log.warning("replica died while answering %s: %s", path, e)
        raise


async def _collect(app: Any, req: Forwarded) -> tuple[Head, bytes]:
    head, chunks = Head(500, []), []
    async for item in stream(app, req):
        if isinstance(item, Head):
            head = item
        else:
            chunks.append(item)
    return head, b"".join(chunks)


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _node() -> str:
    try:
        return ray.util.get_node_ip_address()
    except Exception:  # outside a Ray worker (unit tests)
        return socket.gethostname()


# ---------------------------------------------------------------- the application
def build(spec: ReplicaSpec, plan: Plan) -> Any:
    """The Serve application: the ingress bound to the replicas."""
    scaling: dict[str, Any] = {}
    if plan.autoscaling:
        scaling["autoscaling_config"] = autoscaling_config(plan)
    else:
        scaling["num_replicas"] = plan.replicas
    replica = HerdReplica.options(
        **scaling,
        max_ongoing_requests=plan.max_ongoing,
        max_constructor_retry_count=max(2, plan.replicas),
        ray_actor_options={
            "num_cpus": plan.num_cpus,
            "num_gpus": plan.num_gpus,
            "runtime_env": {"env_vars": dict(plan.env)},
        },
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={"slack": plan.slack, "preloaded": tuple(spec.models)},
        ),
    )
    ingress = HerdIngress.options(
        max_ongoing_requests=max(1000, plan.max_ongoing * plan.replicas * 4),
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(replica.bind(spec), plan.block)


def autoscaling_config(plan: Plan) -> AutoscalingConfig:
    """Ray's config from `plan.autoscaling`, with herd's policy unless plan.policy is "ray"
    or the config names a policy itself."""
    config = dict(plan.autoscaling or {})
    if plan.policy not in ("herd", "ray"):
        raise ClusterError(f"autoscaling policy {plan.policy!r}: use 'herd' or 'ray'")
    if plan.policy == "herd" and "policy" not in config:
        try:  # bad options fail here, not in Ray's controller
            HerdPolicy(**plan.policy_options)
        except (TypeError, ValueError) as e:
            raise ClusterError(f"herd's autoscaling policy: {e}") from None
        config["policy"] = AutoscalingPolicy(
            policy_function=HerdPolicy, policy_kwargs=dict(plan.policy_options)
        )
        # the policy holds scale-downs itself and scales up on a queue at once
        config.setdefault("upscale_delay_s", 0.0)
        config.setdefault("downscale_delay_s", 0.0)
    return AutoscalingConfig(**config)


def connect(address: str) -> None:
    """ray.init at `address`; ClusterError naming it when nothing answers there."""
    target = address
    if address not in ("auto", "local"):
        parts = urlsplit(address if "://" in address else f"ray://{address}")
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as e:
            reason = (getattr(e, "strerror", None) or str(e)).lower()
            raise ClusterError(f"cannot reach Ray at {address}: {reason}") from None
    try:
        ray.init(address=target, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(f"cannot connect to Ray at {address}: {e}") from None


def run(
    spec: ReplicaSpec,
    plan: Plan,
    host: str,
    port: int,
    name: str = APP,
    route_prefix: str | None = "/",
) -> None:
    """Deploy the application (Serve's proxy on host:port); ClusterError when it fails."""
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build(spec, plan), name=name, route_prefix=route_prefix)
    except Exception as e:  # Ray reports a failed deployment as text, of several types
        raise ClusterError(f"herd replicas failed to start: {_why(name, e)}") from None


def _why(name: str, e: Exception) -> str:
    """The replicas' own error (a ClusterError names the node) from Serve's status."""
    try:
        app = serve.status().applications.get(name)
        texts = [d.message for d in app.deployments.values() if d.message] if app else []
    except Exception:  # the status is a nicety; Ray's own message is still an answer
        texts = []
    found = [t for t in texts if "ClusterError: " in t]
    return _reason(found[0] if found else "\n".join([*texts, str(e)]))


def _reason(message: str) -> str:
    """The ClusterError (or last error line) in Ray's deployment failure report."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for marker in ("ClusterError: ", "Error: "):
        found = [ln.split(marker, 1)[1] for ln in lines if marker in ln]
        if found:
            return found[-1]
    return lines[-1] if lines else message


def stop(name: str = APP) -> None:
    try:
        serve.delete(name)
    finally:
        ray.shutdown()
