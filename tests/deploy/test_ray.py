"""herd replicas on Ray Serve, on a local two-node Ray cluster (loopback only).

The cluster: a head and a worker node (`ray.cluster_utils.Cluster`, each one CPU, so the two
replicas land one per node), started and stopped by this module. `herd serve --ray` runs as
a subprocess with 2 replicas of SmolLM2 (and all-minilm for the embeddings), each loaded
before Ray counts it ready; the official `ollama` and `openai` clients talk to Ray Serve's
HTTP proxy. Also: prefix affinity of second turns, a replica killed mid-stream, and the
errors an operator sees for an unreachable address, a model that does not load and a node
with another herd version.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

# Ray turns a loopback address into this host's outward IP before it connects (its
# resolve_ip_for_localhost); with this it keeps 127.0.0.1, where the test cluster listens.
# Read when ray is first imported, so before that, and passed on to `herd serve --ray`.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
os.environ.update(LOOPBACK)

ray = pytest.importorskip("ray")
ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

from integration.test_server import _copy_store, _free_port  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]

MODEL = "smollm2:135m"
EMBED = "all-minilm:l6-v2"
FAST = {"num_predict": 4, "temperature": 0}
REPLICA = "ServeReplica:herd:HerdReplica"


@dataclass
class Deployment:
    url: str
    address: str  # the Ray cluster's GCS address
    dashboard: str
    proc: subprocess.Popen[bytes]
    log: Path
    store: Path

    def ollama(self) -> ollama.Client:
        return ollama.Client(host=self.url, timeout=120)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def replicas(self) -> dict[str, int]:
        """Live replica id -> its process id, from Ray's state API."""
        from ray.util.state import list_actors

        actors = list_actors(
            address=self.dashboard,
            filters=[("class_name", "=", REPLICA), ("state", "=", "ALIVE")],
            detail=True,
        )
        return {a.name.rsplit("#", 1)[-1]: a.pid for a in actors}


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[object, str]]:
    from ray.cluster_utils import Cluster

    dashboard_port = _free_port()
    c = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
            "node_ip_address": "127.0.0.1",
        },
    )
    try:
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        c.wait_for_nodes()
        yield c, f"http://127.0.0.1:{dashboard_port}"
    finally:
        c.shutdown()


def _env(store: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERD_", "OLLAMA_"))}
    return {**env, "HERD_MODELS": str(store), "HERD_HOST": f"127.0.0.1:{port}"} | {
        "HERD_NUM_PARALLEL": "2",
        "RAY_ADDRESS": "",  # the address comes from --ray
        **LOOPBACK,
    }


@pytest.fixture(scope="module")
def deployment(
    cluster: tuple[object, str], tmp_path_factory: pytest.TempPathFactory, test_store: object
) -> Iterator[Deployment]:
    c, dashboard = cluster
    from herd.store import resolve_or_pull

    resolve_or_pull(MODEL, store=test_store)
    resolve_or_pull(EMBED, store=test_store)
    tmp = tmp_path_factory.mktemp("ray")
    store = tmp / "models"
    _copy_store(test_store.root, store)  # type: ignore[attr-defined]
    port = _free_port()
    log = tmp / "herd.log"
    address = c.address  # type: ignore[attr-defined]
    cmd = [sys.executable, "-m", "herd", "serve", "--ray", address, "--replicas", "2"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--model", MODEL, "--model", EMBED],
            env=_env(store, port),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 240
    while "listening on" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.5)
    d = Deployment(f"http://127.0.0.1:{port}", address, dashboard, proc, log, store)
    try:
        yield d
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---------------------------------------------------------------- the official clients
def test_ollama_client_through_the_proxy(deployment: Deployment) -> None:
    client = deployment.ollama()
    messages = [{"role": "user", "content": "Say hello."}]
    chat = client.chat(MODEL, messages, options=FAST)
    assert chat.message.content and chat.done
    parts = list(client.chat(MODEL, messages, options=FAST, stream=True))
    assert len(parts) >= 2 and parts[-1].done
    assert "".join(p.message.content for p in parts) == chat.message.content
    embed = client.embed(EMBED, ["the sky is blue", "grass is green"])
    assert len(embed.embeddings) == 2 and len(embed.embeddings[0]) == 384
    assert MODEL in [m.model for m in client.list().models]


def test_openai_client_through_the_proxy(deployment: Deployment) -> None:
    client = deployment.openai()
    messages = [{"role": "user", "content": "Say hello."}]
    done = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0
    )
    text = done.choices[0].message.content
    assert text
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    emb = client.embeddings.create(model=EMBED, input=["the sky is blue"])
    assert len(emb.data[0].embedding) == 384


def test_api_key_and_errors_pass_through(deployment: Deployment) -> None:
    r = httpx.post(f"{deployment.url}/api/chat", json={"model": "nosuch:1b"}, timeout=60)
    assert r.status_code == 404 and "nosuch" in r.json()["error"]
    r = httpx.post(f"{deployment.url}/v1/chat/completions", content=b"{", timeout=60)
    assert r.status_code == 400 and "error" in r.json()
    assert httpx.get(f"{deployment.url}/", timeout=60).status_code == 200


# ---------------------------------------------------------------- prefix affinity
def test_second_turns_land_on_the_replica_of_the_first(deployment: Deployment) -> None:
    topics = [
        "rivers", "volcanoes", "owls", "bread", "glaciers", "comets", "violins", "tides",
        "bees", "deserts", "coral", "lighthouses", "maple trees", "thunder", "salt",
        "penguins", "clocks", "copper", "fog", "kites",
    ]  # fmt: skip
    first, hits = [], 0
    with httpx.Client(base_url=deployment.url, timeout=120) as http:
        for topic in topics:
            messages = [{"role": "user", "content": f"Tell me one fact about {topic}."}]
            body = {"model": MODEL, "messages": messages, "stream": False, "options": FAST}
            r1 = http.post("/api/chat", json=body)
            assert r1.status_code == 200, r1.text
            messages += [r1.json()["message"], {"role": "user", "content": "And another?"}]
            r2 = http.post("/api/chat", json={**body, "messages": messages})
            assert r2.status_code == 200, r2.text
            first.append(r1.headers["x-herd-replica"])
            hits += r2.headers["x-herd-replica"] == r1.headers["x-herd-replica"]
    assert hits >= 18, f"{hits}/20 second turns on the first turn's replica"
    assert len(set(first)) == 2, "new chats spread over both replicas"


# ---------------------------------------------------------------- faults
def test_replica_killed_mid_stream(deployment: Deployment) -> None:
    before = deployment.replicas()
    assert len(before) == 2
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        "options": {"num_predict": 400, "temperature": 0},
    }
    broke = False
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", f"{deployment.url}/api/chat", json=body) as r:
            victim = r.headers["x-herd-replica"]
            lines = r.iter_lines()
            assert '"done":false' in next(lines).replace(" ", "")
            os.kill(before[victim], signal.SIGKILL)
            try:
                rest = list(lines)
                broke = not rest or '"done":true' not in rest[-1].replace(" ", "")
            except httpx.HTTPError:
                broke = True
    assert broke, "the stream of a killed replica must not end as if complete"
    client = deployment.ollama()
    for i in range(10):
        chat = client.chat(MODEL, [{"role": "user", "content": f"Count to {i}."}], options=FAST)
        assert chat.done
    deadline = time.monotonic() + 150
    while True:
        now = deployment.replicas()
        if len(now) == 2 and victim not in now:
            break
        assert time.monotonic() < deadline, f"Ray did not restart the replica: {now}"
        time.sleep(1)


# ---------------------------------------------------------------- bad input
def test_unreachable_ray_address_is_one_clear_line(tmp_path: Path) -> None:
    address = f"127.0.0.1:{_free_port()}"
    run = subprocess.run(
        [sys.executable, "-m", "herd", "serve", "--ray", address],
        env=_env(tmp_path, _free_port()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert address in run.stderr and "Traceback" not in run.stderr, run.stderr


@pytest.fixture
def driver(deployment: Deployment) -> Iterator[None]:
    ray.init(address=deployment.address, logging_level="WARNING", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _failed_deploy(deployment: Deployment, spec: object) -> str:
    from herd.deploy import ClusterError
    from herd.deploy import ray as deploy

    plan = deploy.Plan(replicas=1, num_cpus=0)  # the cluster's CPUs are the replicas'
    port = int(deployment.url.rsplit(":", 1)[1])
    with pytest.raises(ClusterError) as info:
        deploy.run(spec, plan, "127.0.0.1", port, name="herd-bad", route_prefix=None)  # type: ignore[arg-type]
    from ray import serve

    serve.delete("herd-bad")
    return str(info.value)


def test_a_model_that_does_not_load_names_it(deployment: Deployment, driver: None) -> None:
    from herd.deploy.ray import ReplicaSpec
    from herd.server.app import Settings
    from herd.store import Store
    from herd.store.ggufinfo import GGUFFacts
    from herd.store.layout import MEDIA_MODEL

    store = Store(deployment.store)  # a model whose blob is no GGUF: stored, not loadable
    facts = GGUFFacts("llama", 1, None, None, "F16", None, {})
    store.write_model("broken:1", store.write_blob(b"not a gguf", MEDIA_MODEL), facts=facts)
    settings = Settings.from_env()
    settings.store = store
    import herd

    message = _failed_deploy(deployment, ReplicaSpec(settings, herd.__version__, ("broken:1",)))
    assert "broken:1" in message and "127.0.0.1" in message, message


def test_another_herd_version_names_the_node(deployment: Deployment, driver: None) -> None:
    from herd.deploy.ray import ReplicaSpec
    from herd.server.app import Settings

    settings = Settings.from_env()
    message = _failed_deploy(deployment, ReplicaSpec(settings, "0.0.0-elsewhere"))
    assert "0.0.0-elsewhere" in message and "node 127.0.0.1" in message, message
