"""herd's autoscaling on a live Ray Serve deployment (a local one-node Ray, loopback only).

One autoscaled application, SmolLM2 with 2 slots a replica, 1 to 2 replicas, metrics pushed
every half second over a 2 s window: a replica's report equals what its /metrics says, Ray's
controller receives herd's gauges by name, and concurrent chats scale it to 2 replicas and
back to 1 once they stop. Ray's own policy is given a target of 100 requests per replica, so
only herd's policy (on the queue) would scale for 8 chats.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # as in test_ray.py: before ray loads
os.environ.update(LOOPBACK)

ray = pytest.importorskip("ray")

from integration.test_server import _copy_store, _free_port  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]

MODEL = "smollm2:135m"
APP = "herd-auto"
SCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 100,  # Ray's policy (the fallback) would not scale
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2.0,
}
GAUGES = {
    "vllm:num_requests_running": "herd_running",
    "vllm:num_requests_waiting": "herd_waiting",
    "vllm:kv_cache_usage_perc": "herd_kv_usage",
}


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, test_store: object) -> Iterator[str]:
    import herd
    from herd.deploy import ray as deploy
    from herd.server.app import Settings
    from herd.store import Store, resolve_or_pull

    resolve_or_pull(MODEL, store=test_store)
    store = tmp_path_factory.mktemp("autoscale") / "models"
    _copy_store(Path(test_store.root), store)  # type: ignore[attr-defined]
    settings = Settings.from_env()
    settings.store, settings.num_parallel = Store(store), 2
    env = {"HERD_MODELS": str(store), "HERD_NUM_PARALLEL": "2"}
    spec = deploy.ReplicaSpec(settings, herd.__version__, (MODEL,))
    plan = deploy.Plan(1, SCALING, num_cpus=1, env=env, policy_options={"down_after_s": 3})
    port = _free_port()
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        deploy.run(spec, plan, "127.0.0.1", port, name=APP)
        yield f"http://127.0.0.1:{port}"
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def _replicas() -> dict[str, int]:
    """Replica state (STARTING, RUNNING, STOPPING...) -> how many."""
    from ray import serve

    app = serve.status().applications[APP]
    return dict(app.deployments["HerdReplica"].replica_states)


def _running() -> int:
    return _replicas().get("RUNNING", 0)


def _metrics(url: str) -> dict[str, float]:
    """/metrics' gauges summed over models (the KV usage: the fullest), by herd's names."""
    out = {name: 0.0 for name in GAUGES.values()}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition("{")
        if name in GAUGES:
            v = float(value.rsplit(" ", 1)[1])
            key = GAUGES[name]
            out[key] = max(out[key], v) if key == "herd_kv_usage" else out[key] + v
    return out


def _chat(http: httpx.Client, i: int, tokens: int) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Story {i}: tell me about a dragon."}],
        "stream": False,
        "options": {"num_predict": tokens, "temperature": 0},
    }
    r = http.post("/api/chat", json=body)
    assert r.status_code == 200, r.text


def test_a_replicas_report_is_its_metrics_and_reaches_the_controller(url: str) -> None:
    from ray import serve
    from ray.serve._private.common import DeploymentID
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    assert _running() == 1
    with httpx.Client(base_url=url, timeout=120) as http:
        _chat(http, 0, 8)  # leaves cells in the KV cache: a figure besides the zeros
    handle = serve.get_deployment_handle("HerdReplica", app_name=APP)
    stats = handle.record_autoscaling_stats.remote().result()
    assert stats == {**_metrics(url), "herd_slots": 2.0}, stats
    assert stats["herd_kv_usage"] > 0
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    deployment = DeploymentID(name="HerdReplica", app_name=APP)
    deadline = time.monotonic() + 20
    while True:
        got = ray.get(controller._get_metrics_for_deployment_for_testing.remote(deployment))
        if {"herd_running", "herd_waiting", "herd_kv_usage", "herd_slots"} <= set(got):
            break
        assert time.monotonic() < deadline, f"the controller has {sorted(got)}"
        time.sleep(0.5)


def test_concurrent_chats_scale_to_two_and_back_to_one(url: str) -> None:
    stop = threading.Event()

    def load(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while not stop.is_set():
                _chat(http, i, 48)

    t0, decided = time.monotonic(), 0.0
    with ThreadPoolExecutor(8) as pool:  # 8 chats on 2 slots: a queue of 6
        futures = [pool.submit(load, i) for i in range(8)]
        try:
            while _running() < 2:
                if not decided and sum(_replicas().values()) > 1:  # the second one starts
                    decided = time.monotonic() - t0
                assert time.monotonic() - t0 < 90, "no second replica under a queue"
                assert not any(f.done() for f in futures), [f.exception() for f in futures]
                time.sleep(0.5)
        finally:
            stop.set()
        for f in futures:
            f.result()
    up = time.monotonic() - t0
    t1 = time.monotonic()
    while _running() > 1:
        assert time.monotonic() - t1 < 90, "still 2 replicas with nothing to do"
        time.sleep(0.5)
    down = time.monotonic() - t1
    print(
        f"2nd replica started after {decided:.1f} s, ready after {up:.1f} s; 1 after {down:.1f} s"
    )
