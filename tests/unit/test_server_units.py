"""herd serve's pieces without processes: the scheduler (with fake runners), host and
duration parsing, keep_alive, the metrics exposition, CORS origins and the host check."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest

from herd import envconfig
from herd.errors import (
    BadRequestError,
    CacheFullError,
    CapabilityError,
    ContextLengthError,
    GrammarError,
    InsufficientMemoryError,
    OutOfMemoryError,
    QueueFullError,
    RunnerError,
    UnsupportedModelError,
    error_from_name,
)
from herd.options import Options
from herd.server import scheduler as sched
from herd.server.app import DEFAULT_ORIGINS, HostCheck, origin_regex
from herd.server.errors import status_for
from herd.server.http import keep_alive_of
from herd.server.metrics import Metrics
from herd.store import ModelRef
from herd.store.ggufinfo import GGUFFacts

# ---------------------------------------------------------------- scheduler with fakes


class FakeProc:
    def __init__(self, name: str) -> None:
        self.name, self.alive, self.stopped = name, True, False

    async def stop(self) -> None:
        self.alive, self.stopped = False, True


class FakeScheduler(sched.Scheduler):
    """Loads are instant and record themselves; a model's size is its spec's file_size."""

    def __init__(self, **kw: Any) -> None:
        args = dict(
            max_loaded=3,
            max_queue=8,
            keep_alive=300.0,
            load_timeout=5.0,
            memory_limit=1000,
            num_parallel=1,
        )
        super().__init__(**{**args, **kw})
        self.loads: list[str] = []

    async def _load(self, spec: sched.LoadSpec, estimate: int) -> sched.Runner:
        self.loads.append(spec.name)
        runner = sched.Runner(
            spec,
            FakeProc(spec.name),
            estimate,
            1,  # type: ignore[arg-type]
            asyncio.Semaphore(1),
        )
        self.runners[spec.name] = runner
        return runner


def spec(name: str, size: int, **options: Any) -> sched.LoadSpec:
    ref = ModelRef(name, Path("/nonexistent"), None, None, {}, [], digest="d-" + name)
    facts = GGUFFacts("llama", 1, 4096, 8, "Q4_1", None, {})
    return sched.LoadSpec(name, ref, facts, size, Options().merged(options))


@pytest.fixture(autouse=True)
def size_is_file_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sched, "estimate_memory", lambda s, parallel, cache_type: s.file_size)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_loads_once_and_evicts_idle_to_fit() -> None:
    async def go() -> FakeScheduler:
        s = FakeScheduler()
        (await s.lease(spec("a", 600), None)).release()
        (await s.lease(spec("a", 600), None)).release()  # loaded already
        (await s.lease(spec("b", 600), None)).release()  # a is idle: evicted to fit b
        assert s.loads == ["a", "b"] and list(s.runners) == ["b"]
        return s

    run(go())


def test_too_big_names_the_sizes() -> None:
    async def go() -> None:
        s = FakeScheduler()
        with pytest.raises(InsufficientMemoryError, match=r"\(1\.9 GiB\).*\(0\.0 GiB\)"):
            await s.lease(spec("huge", 2 * 10**9), None)
        assert s.pending == 0 and not s.runners

    run(go())


def test_max_loaded_waits_for_a_busy_model() -> None:
    async def go() -> None:
        s = FakeScheduler(max_loaded=1, memory_limit=10**9)
        busy = await s.lease(spec("a", 1), None)
        waiter = asyncio.ensure_future(s.lease(spec("b", 1), None))
        await asyncio.sleep(0.05)
        assert not waiter.done() and s.gauges()["b"]["waiting"] == 1
        busy.release()
        lease = await asyncio.wait_for(waiter, 3)
        assert list(s.runners) == ["b"] and s.loads == ["a", "b"]
        lease.release()

    run(go())


def test_queue_full() -> None:
    async def go() -> None:
        s = FakeScheduler(max_queue=1, memory_limit=10**9)
        first = await s.lease(spec("a", 1), None)  # running: holds the one slot
        second = asyncio.ensure_future(s.lease(spec("a", 1), None))  # waits for the slot
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError, match="maximum pending requests exceeded"):
            await s.lease(spec("a", 1), None)
        first.release()
        (await second).release()

    run(go())


def test_keep_alive_zero_and_short() -> None:
    async def go() -> None:
        s = FakeScheduler(memory_limit=10**9)
        (await s.lease(spec("a", 1), 0.0)).release()
        await asyncio.sleep(0.01)
        assert "a" not in s.runners
        lease = await s.lease(spec("b", 1), 0.05)
        assert s.runners["b"].session == 0.05
        lease.release()
        assert "b" in s.runners
        await asyncio.sleep(0.15)
        assert "b" not in s.runners
        (await s.lease(spec("c", 1), -1)).release()
        assert math.isinf(s.runners["c"].session) and s.runners["c"].timer is None
        await s.expire("c")  # keep_alive 0 with no prompt: unload now
        assert "c" not in s.runners

    run(go())


def test_changed_load_options_reload() -> None:
    async def go() -> None:
        s = FakeScheduler(memory_limit=10**9)
        (await s.lease(spec("a", 1), None)).release()
        (await s.lease(spec("a", 1, temperature=0.1), None)).release()  # per-request option
        (await s.lease(spec("a", 1, num_ctx=2048), None)).release()  # load-time option
        assert s.loads == ["a", "a"]

    run(go())


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "value, url",
    [
        ("", "http://127.0.0.1:11434"),
        ("1.2.3.4", "http://1.2.3.4:11434"),
        (":56789", "http://127.0.0.1:56789"),
        ("0.0.0.0:8080", "http://127.0.0.1:8080"),
        ("http://example.com", "http://example.com:80"),
        ("https://example.com", "https://example.com:443"),
        ("example.com:56789/path/", "http://example.com:56789/path"),
        ("[::1]:9", "http://[::1]:9"),
        ("localhost:99999", "http://localhost:11434"),
    ],
    ids=["empty", "ip", "port-only", "unspecified", "http", "https", "path", "ipv6", "bad-port"],
)
def test_parse_host(value: str, url: str) -> None:
    assert envconfig.parse_host(value).base_url == url


def test_parse_host_binds() -> None:
    assert envconfig.parse_host(":11434").bind_host == "0.0.0.0"
    assert envconfig.parse_host("").bind_host == "127.0.0.1"


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("5m", 300),
        ("1h30m", 5400),
        ("300ms", 0.3),
        ("-1s", -1),
        ("0", 0),
        ("1.5s", 1.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert envconfig.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5x", "m"])
def test_parse_duration_errors(text: str) -> None:
    with pytest.raises(ValueError):
        envconfig.parse_duration(text)


@pytest.mark.parametrize(
    "value, seconds",
    [
        (None, None),
        (0, 0.0),
        (30, 30.0),
        (-1, math.inf),
        ("5m", 300.0),
        ("-1m", math.inf),
        ("10", 10.0),
    ],
)
def test_keep_alive(value: Any, seconds: float | None) -> None:
    assert keep_alive_of({"keep_alive": value}) == seconds


@pytest.mark.parametrize("value", [True, "soon", [1]])
def test_keep_alive_errors(value: Any) -> None:
    with pytest.raises(BadRequestError):
        keep_alive_of({"keep_alive": value})


def test_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "HERD_KEEP_ALIVE",
        "OLLAMA_KEEP_ALIVE",
        "HERD_MAX_QUEUE",
        "OLLAMA_MAX_QUEUE",
        "HERD_MEMORY_LIMIT",
    ):
        monkeypatch.delenv(name, raising=False)
    assert (envconfig.keep_alive(), envconfig.max_queue(), envconfig.memory_limit()) == (
        300.0,
        512,
        None,
    )
    monkeypatch.setenv("OLLAMA_KEEP_ALIVE", "-1")
    monkeypatch.setenv("HERD_MEMORY_LIMIT", "2GiB")
    assert (envconfig.keep_alive(), envconfig.memory_limit()) == (math.inf, 2 * 2**30)


# ---------------------------------------------------------------- metrics, CORS, host check


def test_metrics_exposition() -> None:
    m = Metrics()
    m.ttft.observe("m:1", 0.03)
    m.itl.observe("m:1", 0.02)
    m.finished("m:1", "stop", prompt_tokens=10, generated=5, eval_seconds=0.4, total_seconds=0.5)
    text = m.render(lambda: {"m:1": {"running": 1, "waiting": 2, "kv": 0.25}})
    lines = text.splitlines()
    assert 'vllm:num_requests_waiting{model_name="m:1"} 2.0' in lines
    assert 'vllm:kv_cache_usage_perc{model_name="m:1"} 0.25' in lines
    assert 'vllm:prompt_tokens_total{model_name="m:1"} 10' in lines
    assert 'vllm:time_to_first_token_seconds_bucket{model_name="m:1",le="0.02"} 0' in lines
    assert 'vllm:time_to_first_token_seconds_bucket{model_name="m:1",le="0.04"} 1' in lines
    assert 'vllm:time_to_first_token_seconds_count{model_name="m:1"} 1' in lines
    assert "# TYPE vllm:inter_token_latency_seconds histogram" in lines
    assert 'vllm:request_success_total{finished_reason="stop",model_name="m:1"} 1' in lines


@pytest.mark.parametrize(
    "origin, allowed",
    [
        ("http://localhost", True),
        ("http://localhost:3000", True),
        ("https://127.0.0.1:8", True),
        ("app://obsidian.md", True),
        ("vscode-webview://x", True),
        ("https://evil.com", False),
        ("http://localhost.evil.com", False),
        ("https://my.app", True),
    ],
)
def test_cors_origins(origin: str, allowed: bool) -> None:
    import re

    pattern = origin_regex(DEFAULT_ORIGINS + ["https://my.app"])
    assert bool(re.fullmatch(pattern, origin)) == allowed


@pytest.mark.parametrize(
    "host, allowed",
    [
        ("127.0.0.1:11434", True),
        ("localhost:11434", True),
        ("[::1]:11434", True),
        ("foo.localhost", True),
        ("box.local:80", True),
        ("10.1.2.3", True),
        ("evil.com", False),
        ("8.8.8.8:11434", False),
    ],
)
def test_host_check(host: str, allowed: bool) -> None:
    check = HostCheck(lambda *a: None, "127.0.0.1")  # type: ignore[arg-type, return-value]
    assert check.allowed(host) == allowed


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/api/generate", lambda b: isinstance(b["error"], str)),
        ("/v1/chat/completions", lambda b: isinstance(b["error"]["message"], str)),
        ("/v1/messages", lambda b: b["type"] == "error" and "message" in b["error"]),
    ],
)
def test_a_refused_host_is_a_403_in_the_routes_shape(path: str, shape: Any) -> None:
    """Ollama's 403 for a Host that is not local on a loopback bind, with a message a
    client can show (it was an empty body: `make fuzz`'s shape check failed on it)."""
    reached: list[str] = []

    async def app(scope, receive, send) -> None:
        reached.append(scope["path"])

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    check = HostCheck(app, "127.0.0.1")  # type: ignore[arg-type]
    for host, path_ in ((b"evil.example", path), (b"127.0.0.1:11434", path)):
        scope = {"type": "http", "path": path_, "method": "POST", "headers": [(b"host", host)]}
        asyncio.run(check(scope, receive, send))
    assert reached == [path]  # the local host got through, the other did not
    assert sent[0]["status"] == 403
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert shape(body) and "evil.example" in json.dumps(body)


@pytest.mark.parametrize(
    ("type_name", "cls", "status"),
    [
        ("ContextLengthError", ContextLengthError, 400),
        ("CapabilityError", CapabilityError, 400),
        ("GrammarError", GrammarError, 400),
        ("UnsupportedModelError", UnsupportedModelError, 501),
        ("OutOfMemoryError", OutOfMemoryError, 500),
        ("CacheFullError", CacheFullError, 500),
        ("RuntimeError", RunnerError, 500),  # a bug in the runner: not a HerdError
        ("ModelfileError", RunnerError, 500),  # its message is built from fields
        ("", RunnerError, 500),
    ],
)
def test_runner_errors_come_back_typed(type_name: str, cls: type, status: int) -> None:
    """A runner's `{"error", "type"}` becomes its class again; the status follows the type."""
    error = error_from_name(type_name, "the message as sent")
    assert type(error) is cls and str(error) == "the message as sent"
    assert status_for(error) == status
