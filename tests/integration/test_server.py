"""`herd serve` as a real subprocess, driven by the official `ollama` and `openai` clients.

Two servers on free loopback ports, each with its own temporary store holding the built-in
smollm2:135m (blobs hard-linked from the cached test store): `server` with the defaults,
and `strict` with HERD_API_KEY, one sequence at a time and a queue of one. Both compute
with the NumPy backend, the oracle, whose batched rows are bit-identical to single ones
(so concurrent greedy answers must equal the lone ones).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow

MODEL = "smollm2:135m"
SHORT = "smollm2:short"
FAST = {"num_predict": 6, "temperature": 0}
KEY = "s3cret"


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    store: Path
    log: Path

    def ollama(self, **kw: object) -> ollama.Client:
        return ollama.Client(host=self.url, **kw)

    def openai(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def metrics(self, headers: dict[str, str] | None = None) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", headers=headers).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

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


def _copy_store(src: Path, dst: Path) -> None:
    """The model's manifests and blobs, blobs hard-linked (copied across devices)."""
    shutil.copytree(src / "manifests", dst / "manifests")
    (dst / "blobs").mkdir(parents=True)
    for blob in (src / "blobs").iterdir():
        if blob.name.startswith("sha256-"):
            try:
                os.link(blob, dst / "blobs" / blob.name)
            except OSError:
                shutil.copy2(blob, dst / "blobs" / blob.name)


def _add_short_model(root: Path) -> None:
    """SHORT: smollm2 whose parameters bound every answer (for `herd run`, which takes none)."""
    from herd.store import Store
    from herd.store.layout import MEDIA_MODEL, Layer

    store = Store(root)
    ref = store.resolve(MODEL)
    digest = "sha256:" + ref.model_path.name.removeprefix("sha256-")
    store.write_model(
        SHORT,
        Layer(MEDIA_MODEL, digest, ref.model_path.stat().st_size),
        params={**ref.params, "num_predict": 8, "temperature": 0},
    )


def _start(tmp: Path, test_store: object, env: dict[str, str]) -> Iterator[Server]:
    store = tmp / "models"
    _copy_store(test_store.root, store)  # type: ignore[attr-defined]
    _add_short_model(store)
    port = _free_port()
    log = tmp / "server.log"
    full = {
        **os.environ,
        "HERD_MODELS": str(store),
        "HERD_HOST": f"127.0.0.1:{port}",
        "HERD_NUM_PARALLEL": "4",
        "HERD_BACKEND": "numpy",
        **env,
    }
    if "HERD_API_KEY" not in env:
        full.pop("HERD_API_KEY", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "herd", "serve"], env=full, stdout=out, stderr=subprocess.STDOUT
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
    server = Server(url, proc, store, log)
    try:
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == "zombie"


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, test_store: object
) -> Iterator[Server]:
    yield from _start(tmp_path_factory.mktemp("server"), test_store, {})


@pytest.fixture(scope="module")
def strict(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, test_store: object
) -> Iterator[Server]:
    yield from _start(
        tmp_path_factory.mktemp("strict"),
        test_store,
        {"HERD_API_KEY": KEY, "HERD_NUM_PARALLEL": "1", "HERD_MAX_QUEUE": "1"},
    )


# ---------------------------------------------------------------- the Ollama API
def test_root_and_version(server: Server) -> None:
    r = httpx.get(server.url)
    assert (r.status_code, r.text) == (200, "Ollama is running")
    assert httpx.head(server.url).status_code == 200
    assert "version" in httpx.get(f"{server.url}/api/version").json()


def test_generate_stream_and_not(server: Server) -> None:
    client = server.ollama()
    whole = client.generate(MODEL, "Why is the sky blue?", options=FAST)
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 6
    assert whole.response and whole.context and whole.prompt_eval_count > 0
    assert whole.total_duration > 0 and whole.eval_duration > 0
    chunks = list(client.generate(MODEL, "Why is the sky blue?", options=FAST, stream=True))
    assert "".join(c.response for c in chunks) == whole.response
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].context == whole.context
    # context continues the conversation (no template re-render of the history)
    more = client.generate(MODEL, "And at night?", context=whole.context, options=FAST)
    assert more.response and more.context[: len(whole.context)] == whole.context
    raw = client.generate(MODEL, "The capital of France is", raw=True, options=FAST)
    assert raw.response and raw.context is None


def test_chat_stream_and_not(server: Server) -> None:
    client = server.ollama()
    messages = [{"role": "user", "content": "Say hello."}]
    whole = client.chat(MODEL, messages, options=FAST)
    assert whole.message.role == "assistant" and whole.message.content
    chunks = list(client.chat(MODEL, messages, options=FAST, stream=True))
    assert "".join(c.message.content for c in chunks) == whole.message.content
    assert chunks[-1].done and chunks[-1].done_reason in ("stop", "length")


def test_prefix_cache_across_turns(server: Server) -> None:
    client = server.ollama()
    history = [{"role": "user", "content": "Name a color of the rainbow, briefly."}]
    first = client.chat(MODEL, history, options=FAST)
    history += [
        first.message.model_dump(exclude_none=True),
        {"role": "user", "content": "And another one?"},
    ]
    body = {"model": MODEL, "messages": history, "options": FAST, "stream": False}
    second = httpx.post(f"{server.url}/api/chat", json=body, timeout=120).json()
    alone = client.generate(MODEL, "x", options={**FAST, "num_predict": 1}, raw=True)
    assert alone.prompt_eval_count >= 1
    # Ollama's count is the whole conversation; only the new turn (and the answer's tail)
    # is computed, the rest comes from the cache (herd's prompt_cached_count)
    assert second["prompt_eval_count"] > first.prompt_eval_count
    computed = second["prompt_eval_count"] - second["prompt_cached_count"]
    assert 0 < computed < first.prompt_eval_count + 10


def test_concurrent_chats_match_alone(server: Server) -> None:
    client = server.ollama()
    prompts = [f"Count from {i} to {i + 3}." for i in range(4)]
    alone = {
        p: client.chat(MODEL, [{"role": "user", "content": p}], options=FAST).message.content
        for p in prompts
    }
    results: dict[str, str] = {}

    def ask(p: str) -> None:
        results[p] = (
            server.ollama()
            .chat(MODEL, [{"role": "user", "content": p}], options=FAST)
            .message.content
        )

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == alone


def test_models_list_show_copy_delete(server: Server) -> None:
    client = server.ollama()
    names = [m.model for m in client.list().models]
    assert MODEL in names
    shown = client.show(MODEL)
    assert shown.details.family == "llama" and shown.details.quantization_level == "Q4_1"
    assert "completion" in shown.capabilities
    assert shown.modelinfo["general.architecture"] == "llama"
    assert ["stop", '"<|im_start|>"'] in [line.split() for line in shown.parameters.splitlines()]
    assert shown.modelfile.startswith("# Modelfile generated by")
    verbose = httpx.post(f"{server.url}/api/show", json={"model": MODEL, "verbose": True}).json()
    assert verbose["tensors"][0]["name"] and isinstance(
        verbose["model_info"]["tokenizer.ggml.tokens"], list
    )
    client.copy(MODEL, "copied:1")
    assert "copied:1" in [m.model for m in client.list().models]
    client.delete("copied:1")
    assert "copied:1" not in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("copied:1")
    assert e.value.status_code == 404


def test_pull_streams_progress(server: Server) -> None:
    client = server.ollama()
    steps = [p.status for p in client.pull(MODEL, stream=True)]
    assert steps[0] == "pulling manifest" and steps[-1] == "success"
    assert client.pull(MODEL).status == "success"
    with pytest.raises(ollama.ResponseError):
        client.pull("no-such-model-anywhere:7b")


def test_blobs(server: Server) -> None:
    data = b"hello blob"
    import hashlib

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    url = f"{server.url}/api/blobs/{digest}"
    assert httpx.head(url).status_code == 404
    assert httpx.post(url, content=data).status_code == 201
    assert httpx.head(url).status_code == 200
    wrong = "sha256:" + "0" * 64
    assert httpx.post(f"{server.url}/api/blobs/{wrong}", content=data).status_code == 400


def test_embeddings_until_bert(server: Server) -> None:
    client = server.ollama()
    for call in (lambda: client.embed(MODEL, "hi"), lambda: client.embeddings(MODEL, "hi")):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 400 and "does not support embeddings" in e.value.error
    with pytest.raises(openai.BadRequestError) as oe:  # the SDK's default: base64
        server.openai().embeddings.create(model=MODEL, input="hi")
    assert "does not support embeddings" in str(oe.value)


# ---------------------------------------------------------------- errors
def test_errors(server: Server) -> None:
    client = server.ollama()
    with pytest.raises(ollama.ResponseError) as e:
        client.generate("nope:1b", "hi")
    assert (e.value.status_code, e.value.error) == (404, "model 'nope:1b' not found")
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(MODEL, [{"role": "user", "content": "hi"}], options={"temperature": "hot"})
    assert e.value.status_code == 400 and "temperature" in e.value.error
    r = httpx.post(f"{server.url}/api/generate", content=b'{"model": ')
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(f"{server.url}/api/chat", content=b"")
    assert (r.status_code, r.json()) == (400, {"error": "missing request body"})
    r = httpx.post(
        f"{server.url}/api/generate", json={"model": MODEL, "prompt": "x", "keep_alive": "soon"}
    )
    assert r.status_code == 400
    with pytest.raises(openai.NotFoundError) as oe:
        server.openai().chat.completions.create(
            model="nope:1b", messages=[{"role": "user", "content": "hi"}]
        )
    assert oe.value.body["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError):
        server.openai().chat.completions.create(model=MODEL, messages=[])


# ---------------------------------------------------------------- keep_alive and /api/ps
def test_keep_alive_load_unload_and_ps(server: Server) -> None:
    client = server.ollama()
    client.copy(MODEL, "brief:1")
    try:
        loaded = client.generate("brief:1", "", keep_alive="1m")
        assert loaded.done_reason == "load"
        ps = {m.model: m for m in client.ps().models}
        assert "brief:1" in ps and ps["brief:1"].context_length == 4096
        assert ps["brief:1"].size > 90_000_000 and ps["brief:1"].size_vram == 0
        # herd's own fields: the engine (the server runs HERD_BACKEND=numpy) and its device
        raw = {m["model"]: m for m in httpx.get(f"{server.url}/api/ps").json()["models"]}
        assert raw["brief:1"]["backend"] == "numpy" and raw["brief:1"]["device_name"] == "cpu"
        gone = client.chat("brief:1", [], keep_alive=0)
        assert gone.done_reason == "unload"
        assert "brief:1" not in [m.model for m in client.ps().models]
        client.generate("brief:1", "Hi", options=FAST, keep_alive=1)
        assert "brief:1" in [m.model for m in client.ps().models]
        deadline = time.monotonic() + 10
        while "brief:1" in [m.model for m in client.ps().models]:
            assert time.monotonic() < deadline, "keep_alive 1s did not unload"
            time.sleep(0.2)
    finally:
        client.delete("brief:1")


def test_runner_crash_is_a_500_then_recovers(server: Server) -> None:
    client = server.ollama()
    client.generate(MODEL, "Hi", options=FAST)  # loaded
    stream = client.generate(
        MODEL, "Tell me a long story.", options={"num_predict": 500, "temperature": 0}, stream=True
    )
    next(stream)
    for pid in server.runner_pids():
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(ollama.ResponseError) as e:
        for _ in stream:
            pass
    assert "unexpectedly stopped" in e.value.error
    again = client.generate(MODEL, "Hi", options=FAST)
    assert again.response and again.done


# ---------------------------------------------------------------- the OpenAI API
def test_openai_chat_and_completions(server: Server) -> None:
    client = server.openai()
    messages = [{"role": "user", "content": "Say hello."}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0
    )
    assert whole.object == "chat.completion" and whole.choices[0].message.content
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 6
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6
    done = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0)
    assert done.object == "text_completion" and done.choices[0].text
    parts = list(
        client.completions.create(
            model=MODEL, prompt="The sky is", max_tokens=5, temperature=0, stream=True
        )
    )
    assert "".join(p.choices[0].text for p in parts) == done.choices[0].text


def test_openai_models(server: Server) -> None:
    client = server.openai()
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids
    model = client.models.retrieve(MODEL)
    assert (model.id, model.owned_by) == (MODEL, "library")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope:1b")


# ---------------------------------------------------------------- metrics
def test_metrics(server: Server) -> None:
    server.ollama().generate(MODEL, "Hi", options=FAST)
    text = httpx.get(f"{server.url}/metrics").text
    label = f'model_name="{MODEL}"'
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
    ):
        assert f"{name}{{{label}}}" in text
    for name in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds"):
        assert f"# TYPE {name} histogram" in text and f'{name}_bucket{{{label},le="+Inf"}}' in text
    values = server.metrics()
    assert values[f"vllm:generation_tokens_total{{{label}}}"] >= 6
    assert 0 < values[f"vllm:kv_cache_usage_perc{{{label}}}"] <= 1


# ---------------------------------------------------------------- CLI as a client
def test_cli_uses_the_server(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from herd.cli.main import cli

    monkeypatch.setenv("HERD_HOST", server.url)
    monkeypatch.setenv("HERD_MODELS", "/nonexistent")  # everything must come from the server
    run = CliRunner().invoke(cli, ["run", SHORT, "Say hi."])
    assert run.exit_code == 0 and run.stdout.strip(), run.output
    listed = CliRunner().invoke(cli, ["list"])
    assert MODEL in listed.stdout and SHORT in listed.stdout
    shown = CliRunner().invoke(cli, ["show", SHORT])
    assert "architecture" in shown.stdout and "llama" in shown.stdout
    assert "num_predict" in shown.stdout
    ps = CliRunner().invoke(cli, ["ps"])
    assert SHORT in ps.stdout and "100% CPU (numpy)" in ps.stdout
    stop = CliRunner().invoke(cli, ["stop", SHORT])
    assert stop.exit_code == 0, stop.output
    assert SHORT not in CliRunner().invoke(cli, ["ps"]).stdout


# ---------------------------------------------------------------- auth, queue, cancel
def test_api_key(strict: Server) -> None:
    assert httpx.get(strict.url).status_code == 200  # `/` stays open
    r = httpx.get(f"{strict.url}/api/tags")
    assert (r.status_code, r.json()) == (401, {"error": "unauthorized"})
    r = httpx.get(f"{strict.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        strict.openai("wrong").models.list()
    assert MODEL in [m.id for m in strict.openai(KEY).models.list()]
    client = strict.ollama(headers={"Authorization": f"Bearer {KEY}"})
    assert client.generate(MODEL, "Hi", options=FAST).done


def _wait_for(pred: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_queue_full_and_cancel_on_disconnect(strict: Server) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    label = f'model_name="{MODEL}"'
    client = strict.ollama(headers=auth)
    client.generate(MODEL, "", keep_alive="5m")  # loaded
    long = {
        "model": MODEL,
        "prompt": "Write a long story about a dragon.",
        "options": {"num_predict": 2000, "temperature": 0},
    }
    with httpx.Client(base_url=strict.url, headers=auth, timeout=60) as http:
        with http.stream("POST", "/api/generate", json=long) as running:
            lines = running.iter_lines()
            json.loads(next(lines))  # it generates: the one slot is taken
            queued = threading.Thread(target=lambda: client.generate(MODEL, "Hi", options=FAST))
            queued.start()
            _wait_for(
                lambda: strict.metrics(auth).get(f"vllm:num_requests_waiting{{{label}}}") == 1
            )
            with pytest.raises(ollama.ResponseError) as e:
                client.generate(MODEL, "Hi", options=FAST)
            assert e.value.status_code == 503
            assert e.value.error.startswith("server busy, please try again.")
            # told when to come back, on both APIs (a client backs off, never hammers)
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
            r = http.post("/api/generate", json={**long, "stream": False})
            assert (r.status_code, r.headers.get("retry-after")) == (503, "1")
            r = http.post("/v1/chat/completions", json=chat)
            assert (r.status_code, r.headers.get("retry-after")) == (503, "1")
            assert r.json()["error"]["type"] == "overloaded_error"
        # leaving the `with` closed the connection: the story is cancelled, the queued
        # request gets the slot and finishes long before 2000 tokens could have been made
        t0 = time.monotonic()
        queued.join(60)
        assert not queued.is_alive() and time.monotonic() - t0 < 30
    _wait_for(lambda: strict.metrics(auth).get(f"vllm:num_requests_running{{{label}}}") == 0)
    assert strict.metrics(auth)[f"vllm:generation_tokens_total{{{label}}}"] < 1500
