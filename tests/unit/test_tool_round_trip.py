"""Tool calls and thinking round trip through `herd serve`'s app, with a fake engine.

For each built-in template family: a chat request with tools (and a previous call and its
result) renders the prompt the family expects, and a canned model output in the family's
tool-call format, streamed a few characters at a time as tokens arrive, comes back as
`tool_calls` in both APIs, streamed and not, with no piece of a tag leaking into content.
Everything real runs (routes, checks, the runner child's rendering and parsing) except the
model: the runner process is replaced by its `Child` in-process over a fake engine.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from _store_helpers import write_gguf
from starlette.testclient import TestClient
from test_grammar import JsonTokenizer

from herd import envconfig
from herd.errors import error_from_name
from herd.options import Options
from herd.runner.loaded import Source
from herd.runner.sequence import Event
from herd.runner.serve import Child
from herd.server import scheduler as sched
from herd.server.app import Settings, create_app
from herd.store import Store
from herd.template import go_builtin

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = {"city": "Rome"}
# family -> (what the model writes to call get_weather(city="Rome"), markers in the prompt:
# the tool list, the earlier call, the tool's result)
FAMILIES = {
    "qwen2.5": (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
        ["<tools>\n", '"name":"get_weather"', '<tool_call>\n{"name": "get_weather", '
         '"arguments": {"city":"Paris"}}\n</tool_call>', "<tool_response>\n12C\n"],
    ),
    "qwen3": (
        "<think>\nThe user asks for Rome.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
        ["<tools>\n", '"name":"get_weather"', '"arguments": {"city":"Paris"}}',
         "<tool_response>\n12C\n"],
    ),
    "llama3": (
        '{"name": "get_weather", "parameters": {"city": "Rome"}}',
        ["Given the following functions", '"name":"get_weather"',
         '{"name": "get_weather", "parameters": {"city":"Paris"}}',
         "<|start_header_id|>ipython<|end_header_id|>\n\n12C"],
    ),
    "mistral": (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}]',
        ["[AVAILABLE_TOOLS]", '"name":"get_weather"',
         '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city":"Paris"}}]',
         '[TOOL_RESULTS] {"content": "12C"}[/TOOL_RESULTS]'],
    ),
}  # fmt: skip
OLLAMA_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_name": "get_weather", "content": "12C"},
    {"role": "user", "content": "And Rome?"},
]  # fmt: skip
OPENAI_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "12C"},
    {"role": "user", "content": "And Rome?"},
]  # fmt: skip


class FakeLLM:
    """What the runner child uses of a loaded model: its template, its tokenizer, and its
    source (no Modelfile SYSTEM or MESSAGEs)."""

    def __init__(self, template: Any) -> None:
        self.template, self.name = template, "m"
        self.source = Source("m", Path("m.gguf"))
        self.tokenizer = JsonTokenizer()  # for grammars
        self.defaults, self.is_embedding, self.context_length = Options(), False, 4096
        self.prompts: list[str] = []

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        self.prompts.append(text)
        return [1, 2, 3]


class FakeEngine:
    """Streams a canned output a few characters per token."""

    parallel, num_ctx = 1, 4096

    def __init__(self, output: str, size: int = 3) -> None:
        self.pieces = [output[i : i + size] for i in range(0, len(output), size)]

    def submit(self, tokens: list[int], options: Any, cancelled: threading.Event,
               **kw: Any) -> Iterator[Event]:  # fmt: skip
        for piece in self.pieces:
            yield Event(text=piece)
        yield Event(done=True, done_reason="stop", eval_count=len(self.pieces))

    def kv_usage(self) -> float:
        return 0.0


class InProcess:
    """A runner process stand-in: each request runs the real `Child` over the fake engine."""

    alive = True

    def __init__(self, child: Child, out: io.StringIO) -> None:
        self.child, self.out = child, out

    async def request(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.out.seek(0)
        self.out.truncate()
        self.child.handle({**payload, "id": 1}, threading.Event())
        for line in self.out.getvalue().splitlines():
            msg = json.loads(line)
            if "error" in msg:
                raise error_from_name(msg["type"], msg["error"])
            yield msg

    async def stop(self) -> None:
        self.alive = False


def serve(tmp: Path, monkeypatch: pytest.MonkeyPatch, family: str, output: str) -> tuple[
        TestClient, FakeLLM]:  # fmt: skip
    store = Store(tmp / "models")
    with store.blob_writer() as w:
        w.write(write_gguf(tmp / "tiny.gguf", template=None).read_bytes())
        layer = w.commit()
    store.write_model("m", layer, template=go_builtin(family).source)
    out = io.StringIO()
    child = Child(out)
    llm = child.loaded = FakeLLM(go_builtin(family))  # type: ignore[assignment]
    child.engine = FakeEngine(output)  # type: ignore[assignment]
    app = create_app(Settings(store, envconfig.host(), memory_limit=2**40))
    scheduler = app.state.scheduler

    async def load(spec: sched.LoadSpec, estimate: int) -> sched.Runner:
        import asyncio

        runner = sched.Runner(
            spec,
            InProcess(child, out),
            estimate,
            1,  # type: ignore[arg-type]
            asyncio.Semaphore(1),
        )
        scheduler.runners[spec.name] = runner
        return runner

    monkeypatch.setattr(scheduler, "_load", load)
    return TestClient(app, base_url="http://localhost"), llm


def ndjson(r: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def sse(r: Any) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in r.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chat_with_tools_round_trip(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output, markers = FAMILIES[family]
    client, llm = serve(tmp_path, monkeypatch, family, output)
    body = {"model": "m", "messages": OLLAMA_CONVERSATION, "tools": [TOOL]}

    # the prompt: the family's tool list, the earlier call and the tool's result
    r = client.post("/api/chat", json={**body, "stream": False})
    assert r.status_code == 200, r.text
    prompt = llm.prompts[-1]
    think = True if family == "qwen3" else None  # a thinking model thinks unless told not to
    assert prompt == go_builtin(family).execute(OLLAMA_CONVERSATION, tools=[TOOL], think=think)
    for marker in markers:
        assert marker in prompt, marker

    # Ollama's API, not streamed
    message = r.json()["message"]
    assert message["content"] == ""
    [call] = message["tool_calls"]
    assert call["function"] == {"index": 0, "name": "get_weather", "arguments": CALL}
    assert call["id"].startswith("call_")
    if family == "qwen3":
        assert message["thinking"].strip() == "The user asks for Rome."

    # streamed: the same call, and no half tag ever shown as content
    lines = ndjson(client.post("/api/chat", json=body))
    assert all(line["message"]["content"] == "" for line in lines)
    calls = [c["function"] for line in lines for c in line["message"].get("tool_calls", [])]
    assert calls == [call["function"]]
    assert lines[-1]["done"] and lines[-1]["done_reason"] == "stop"

    # OpenAI's API: the same prompt from OpenAI's shapes (tool_call_id names the tool)
    oa = {"model": "m", "messages": OPENAI_CONVERSATION, "tools": [TOOL]}
    r = client.post("/v1/chat/completions", json=oa)
    assert r.status_code == 200, r.text
    assert llm.prompts[-1] == prompt
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [tc] = choice["message"]["tool_calls"]
    assert tc["type"] == "function" and tc["id"].startswith("call_") and tc["index"] == 0
    assert tc["function"]["name"] == "get_weather"
    assert json.loads(tc["function"]["arguments"]) == CALL
    if family == "qwen3":
        assert choice["message"]["reasoning"].strip() == "The user asks for Rome."
    chunks = sse(client.post("/v1/chat/completions", json={**oa, "stream": True}))
    deltas = [t for c in chunks for t in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [json.loads(t["function"]["arguments"]) for t in deltas] == [CALL]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == ""


@pytest.mark.parametrize("family", ["chatml", "gemma3", "phi3"])
def test_template_without_tools_is_400(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _ = serve(tmp_path, monkeypatch, family, "x")
    body = {"model": "m", "messages": OLLAMA_CONVERSATION[:1], "tools": [TOOL]}
    r = client.post("/api/chat", json=body)
    assert (r.status_code, r.json()) == (400, {"error": '"m" does not support tools'})
    r = client.post("/api/chat", json={**body, "tools": None, "think": True})
    assert (r.status_code, r.json()) == (400, {"error": '"m" does not support thinking'})
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == '"m" does not support tools'


def test_thinking_in_generate_and_chat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client, llm = serve(tmp_path, monkeypatch, "qwen3", "<think>Two plus two.</think>\n\nFour.")
    r = client.post(
        "/api/generate", json={"model": "m", "prompt": "2+2?", "think": "high", "stream": False}
    )
    assert (r.json()["thinking"], r.json()["response"]) == ("Two plus two.", "Four.")
    lines = ndjson(client.post("/api/generate", json={"model": "m", "prompt": "2+2?"}))
    assert "".join(x.get("thinking", "") for x in lines) == "Two plus two."
    assert "".join(x["response"] for x in lines) == "Four."
    # think: false renders the empty thinking block and leaves the output alone
    r = client.post(
        "/api/chat",
        json={
            "model": "m",
            "think": False,
            "stream": False,
            "messages": [{"role": "user", "content": "2+2?"}],
        },
    )
    assert llm.prompts[-1].endswith("<think>\n\n</think>\n\n")
    assert r.json()["message"]["content"] == "<think>Two plus two.</think>\n\nFour."
    assert "thinking" not in r.json()["message"]
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "m",
            "reasoning_effort": "low",
            "stream": True,
            "messages": [{"role": "user", "content": "2+2?"}],
        },
    )
    chunks = sse(r)
    assert "".join(c["choices"][0]["delta"].get("reasoning", "") for c in chunks) == (
        "Two plus two."
    )
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "Four."
    r = client.post(
        "/api/chat",
        json={"model": "m", "think": "lots", "messages": [{"role": "user", "content": "2+2?"}]},
    )
    assert r.status_code == 400 and "invalid think value" in r.json()["error"]


def test_bad_format_is_400_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client, llm = serve(tmp_path, monkeypatch, "chatml", "{}")
    msgs = [{"role": "user", "content": "x"}]
    r = client.post(
        "/api/chat", json={"model": "m", "messages": msgs, "format": {"type": "object", "not": {}}}
    )
    assert r.status_code == 400 and "Unimplemented keys" in r.json()["error"]
    r = client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": msgs, "response_format": {"type": "xml"}},
    )
    assert r.status_code == 400
    assert llm.prompts == []  # nothing reached the runner


def test_format_with_thinking_answers_without_thinking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grammar holds from the first token, so a thinking model is told not to think."""
    client, llm = serve(tmp_path, monkeypatch, "qwen3", '{"a": 1}')
    r = client.post(
        "/api/chat",
        json={"model": "m", "format": "json", "stream": False,
              "messages": [{"role": "user", "content": "JSON please"}]},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    assert llm.prompts[-1].endswith("<think>\n\n</think>\n\n")
    assert r.json()["message"] == {"role": "assistant", "content": '{"a": 1}'}
