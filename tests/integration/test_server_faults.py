"""Faults against a real `herd serve` with a tiny random model (fast on the NumPy backend):
a runner killed mid-stream, a client that leaves mid-answer, token ids out of the
vocabulary. The server stays up and the model stays served."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

psutil = pytest.importorskip("psutil")

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from test_runner_faults import VOCAB, write_chat_model  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "tiny:faults"
LONG = {"num_predict": 100_000, "temperature": 0}


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def runner_pids(self) -> list[int]:
        return [
            p.pid
            for p in psutil.Process(self.proc.pid).children()
            if "herd.runner.serve" in " ".join(p.cmdline())
        ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(tmp: Path, parallel: int) -> Iterator[Server]:
    """`herd serve` on a free port, its store holding the tiny model as MODEL."""
    from herd.modelfile import parse
    from herd.store import Store
    from herd.store.create import create

    store = tmp / "models"
    write_chat_model(tmp / "chat.gguf")
    create(Store(store), MODEL, parse("FROM ./chat.gguf"), base_dir=tmp)
    port, log = _free_port(), tmp / "server.log"
    env = {
        **os.environ,
        "HERD_MODELS": str(store),
        "HERD_HOST": f"127.0.0.1:{port}",
        "HERD_NUM_PARALLEL": str(parallel),
        "HERD_BACKEND": "numpy",
    }
    env.pop("HERD_API_KEY", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "herd", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
        assert proc.poll() is None, log.read_text()
    try:
        yield Server(url, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One sequence at a time: a slot not freed would block the next request."""
    yield from start_server(tmp_path_factory.mktemp("faults"), parallel=1)


def generate(server: Server, timeout: float = 30, **body: object) -> httpx.Response:
    body = {"model": MODEL, "prompt": "hi", "stream": False, **body}
    body.setdefault("options", {"num_predict": 4, "temperature": 0})
    return httpx.post(f"{server.url}/api/generate", json=body, timeout=timeout)


def test_bad_context_ids_are_a_400_and_the_runner_lives(single: Server) -> None:
    assert generate(single).status_code == 200
    (pid,) = single.runner_pids()
    for bad in (-1, VOCAB, 10**9, 2**31, 2**63):  # the HTTP side or the runner refuses it
        r = generate(single, context=[1, bad])
        assert r.status_code == 400, r.text
        if 0 <= bad < 2**31:  # a valid id anywhere, but not in this model's vocabulary
            assert f"token id {bad} at position 1" in r.json()["error"]
    ok = generate(single, context=[1, VOCAB - 1])
    assert ok.status_code == 200 and ok.json()["done"]
    assert single.runner_pids() == [pid]  # the same process served them all


def test_a_runner_killed_mid_stream_ends_the_stream_with_an_error(single: Server) -> None:
    assert generate(single).status_code == 200
    body = {"model": MODEL, "prompt": "tell", "options": LONG}
    for path, openai in (("/api/generate", False), ("/v1/completions", True)):
        if openai:
            body = {"model": MODEL, "prompt": "tell", "stream": True, "max_tokens": 100_000}
        (pid,) = single.runner_pids()
        with httpx.stream("POST", single.url + path, json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = (line for line in r.iter_lines() if line.strip())
            next(lines)  # streaming
            os.kill(pid, signal.SIGKILL)
            rest = list(lines)  # the stream ends (no hang)
        last = rest[-1].removeprefix("data: ")
        assert "unexpectedly stopped" in json.dumps(json.loads(last)["error"])
        again = generate(single)  # a new runner
        assert again.status_code == 200 and again.json()["done"]
        assert single.runner_pids() not in ([], [pid])
    assert single.proc.poll() is None


def test_a_client_leaving_mid_answer_frees_the_slot(single: Server) -> None:
    assert generate(single).status_code == 200
    body = {"model": MODEL, "prompt": "tell", "options": LONG}
    for _ in range(3):  # each time the one slot must come back
        with httpx.stream("POST", single.url + "/api/generate", json=body, timeout=30) as r:
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
        # the connection is closed: the next request gets the slot at once
        t0 = time.monotonic()
        r2 = generate(single, timeout=10)
        assert r2.status_code == 200 and r2.json()["done"]
        assert time.monotonic() - t0 < 5
    metrics = httpx.get(single.url + "/metrics").text
    running = [
        line for line in metrics.splitlines() if line.startswith("vllm:num_requests_running")
    ]
    assert running and all(line.endswith(" 0.0") or line.endswith(" 0") for line in running)
