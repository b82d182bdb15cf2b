"""Hostile requests against every route of `herd serve`'s app, in-process: no 5xx, and each
error in its API's own shape (Ollama `{"error": "..."}`, OpenAI `{"error": {"message",
"type", ...}}`).

The runner is the real runner child (`Child`: the request pipeline, the template, the output
parser) over a fake engine, so a field the boundary lets through malformed fails here as the
runner's RunnerError (a 500). A payload check at the pipe also refuses NaN, infinity and out
of range ids or options that reach it. Hypothesis draws bodies from each route's schema,
each field valid or junk; then one regression test per bug the issue's fuzzing run found,
with its minimal input.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from _store_helpers import write_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from test_tool_round_trip import FakeEngine, FakeLLM, InProcess

from herd import envconfig
from herd.errors import ModelNotFoundError
from herd.options import INT32, OPTIONS, RANGES
from herd.runner.serve import Child
from herd.server import scheduler as sched
from herd.server import store_api
from herd.server.app import Settings, create_app
from herd.server.http import MAX_BODY, MAX_DEPTH
from herd.store import Store
from herd.template import go_builtin

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# ---- the app, with the real runner child over a fake engine ---------------------------------
def _finite_everywhere(value: Any, where: str = "payload") -> None:
    stack = [(value, where)]
    while stack:
        v, w = stack.pop()
        if isinstance(v, float):
            assert math.isfinite(v), f"non-finite number reached the runner at {w}"
        elif isinstance(v, dict):
            stack.extend((x, f"{w}.{k}") for k, x in v.items())
        elif isinstance(v, list | tuple):
            stack.extend((x, f"{w}[{i}]") for i, x in enumerate(v))


def check_payload(payload: dict[str, Any]) -> None:
    """What may cross the pipe to a runner: finite numbers, ids and options in range."""
    _finite_everywhere(payload)
    for token in payload.get("context") or []:
        assert isinstance(token, int) and 0 <= token < INT32, token
    for name, value in payload.get("options", {}).items():
        if OPTIONS[name].type is int:
            low, high = RANGES.get(name, (-INT32, INT32 - 1))
            assert low <= value <= high, (name, value)


class CheckedProcess(InProcess):
    async def request(self, payload: dict[str, Any]) -> Any:
        check_payload(payload)
        async for msg in super().request(payload):
            yield msg


class Loaded(FakeLLM):
    """The fake model, with what a request's own template and images need of it."""

    def __init__(self, template: Any) -> None:
        super().__init__(template)
        self.gguf, self.vision = SimpleNamespace(kv={}), None
        self.n_vocab = 40  # context ids past it: the runner's 400
        self.model = SimpleNamespace(n_vocab=self.n_vocab)


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    return serve(tmp_path, monkeypatch)


def serve(tmp: Path, monkeypatch: pytest.MonkeyPatch, api_key: str = "") -> TestClient:
    store = Store(tmp / "models")
    with store.blob_writer() as w:
        w.write(write_gguf(tmp / "tiny.gguf", template=None).read_bytes())
        layer = w.commit()
    store.write_model("m", layer, template=go_builtin("qwen2.5").source)
    out = io.StringIO()
    child = Child(out)
    child.loaded = Loaded(go_builtin("qwen2.5"))  # type: ignore[assignment]
    child.engine = FakeEngine("an answer")  # type: ignore[assignment]
    app = create_app(Settings(store, envconfig.host(), api_key=api_key, memory_limit=2**40))
    scheduler = app.state.scheduler

    async def load(spec: sched.LoadSpec, estimate: int) -> sched.Runner:
        import asyncio

        proc = CheckedProcess(child, out)
        runner = sched.Runner(spec, proc, estimate, 1, asyncio.Semaphore(1))  # type: ignore[arg-type]
        scheduler.runners[spec.name] = runner
        return runner

    def no_network(*args: Any, **kw: Any) -> None:  # pull(name, ...), push(store, name, ...)
        raise ModelNotFoundError("pull model manifest: file does not exist")

    monkeypatch.setattr(scheduler, "_load", load)
    monkeypatch.setattr(store_api, "pull", no_network)
    monkeypatch.setattr("herd.registry.push", no_network, raising=False)
    client = TestClient(app, base_url="http://localhost")
    client.llm = child.loaded  # type: ignore[attr-defined]
    return client


def send(client: TestClient, method: str, path: str, body: Any = None, **kw: Any) -> Any:
    content = body if isinstance(body, bytes) else None
    if body is not None and content is None:
        content = json.dumps(body, allow_nan=True).encode()  # NaN, Infinity as literals
    return client.request(method, path, content=content, **kw)


def assert_clean(r: Any, path: str) -> None:
    """No 5xx; an error in the API's own shape."""
    assert r.status_code < 500, (path, r.status_code, r.text[:500])
    if r.status_code >= 400 and r.content and r.status_code not in (405, 499):
        error = r.json()["error"]
        if path.startswith("/v1/"):
            assert isinstance(error["message"], str) and isinstance(error["type"], str), error
        else:
            assert isinstance(error, str) and error, error


def answers_normally(client: TestClient) -> None:
    r = client.post("/api/generate", json={"model": "m", "prompt": "hi", "stream": False})
    assert (r.status_code, r.json()["response"]) == (200, "an answer"), r.text


# ---- schemas: each field valid or junk ---------------------------------------------------------
NASTY = [
    "NaN", "nan", "Infinity", "-Infinity", "1e309", "", " ", "\x00", "../../etc/passwd",
    "sha256:" + "0" * 64, "sha256-../../x", "x" * 5000, "😀", "%00", "{{ .Prompt }}",
]  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([2**31, 2**63, -1, 10**9, 2**64])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(NASTY)
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: of its type (values at and past its limits included) 6 times in 7,
    else junk; so that most requests get past their first field."""
    return sometimes(JUNK, valid, 7)


def sometimes(rare: Any, usual: Any, n: int) -> st.SearchStrategy[Any]:
    """`rare` once in `n` draws, else `usual` (one_of would pick each half the time)."""
    return st.integers(1, n).flatmap(lambda i: rare if i == n else usual)


OPTION_NAMES = st.sampled_from([*OPTIONS, "mirostat", "num_thread"])
OPTION_VALUES = (
    st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["NaN", "inf", "-Infinity", "1e30", "5", "0.5", 1e30, 2**63, -2, 0])
    | JUNK
)
OPTIONS_FIELD = field(st.dictionaries(OPTION_NAMES, OPTION_VALUES, max_size=4))
MODEL = sometimes(
    field(st.sampled_from(["m:latest", "nope", "bad name!", "../m", "a/b/c/d/e"])), st.just("m"), 5
)
BOOL = field(st.booleans())
TEXT = field(st.text(max_size=30))
TEMPLATES = st.sampled_from([
    "{{ .Prompt }}", "{{ range .Messages }}{{ .Content }}{{ end }}", "{{ if }}",
    "{{ .Nope.x }}", "{{ 'a'.ljust(10) }}", "{% for m in messages %}{{ m }}{% endfor %}",
    '{{ printf "%.9999999999f" 1.0 }}',
])  # fmt: skip
TOOL = st.fixed_dictionaries(
    {"type": field(st.just("function"))},
    optional={"function": field(st.fixed_dictionaries({}, optional={
        "name": TEXT, "description": TEXT,
        "parameters": field(st.fixed_dictionaries({}, optional={
            "type": field(st.just("object")), "required": field(st.lists(st.text(max_size=4))),
            "properties": field(st.dictionaries(st.text(max_size=4), field(st.fixed_dictionaries(
                {}, optional={"type": field(st.sampled_from(["string", ["a", "b"]])),
                              "enum": JUNK, "description": TEXT})), max_size=2)),
        })),
    }))},
)  # fmt: skip
CALL = st.fixed_dictionaries({}, optional={
    "function": field(st.fixed_dictionaries({}, optional={
        "name": TEXT, "index": field(st.integers(0, 3)),
        "arguments": field(st.dictionaries(st.text(max_size=3), JUNK, max_size=2)
                           | st.sampled_from(['{"a": 1}', "[1]", "NaN", '{"a": NaN}', "[" * 5000])),
    })),
    "id": TEXT, "type": TEXT,
})  # fmt: skip
IMAGES = field(st.lists(st.sampled_from(["aGVsbG8=", "!!!", "", "aGVsbG8"]), max_size=2))
MESSAGE = field(st.fixed_dictionaries(
    {"role": field(st.sampled_from(["user", "assistant", "system", "tool"]))},
    optional={"content": TEXT, "images": IMAGES, "thinking": TEXT, "tool_name": TEXT,
              "tool_calls": field(st.lists(CALL, max_size=2))},
))  # fmt: skip
OA_CONTENT = field(st.lists(field(st.fixed_dictionaries(
    {"type": field(st.sampled_from(["text", "image_url", "input_audio"]))},
    optional={"text": TEXT, "image_url": field(st.sampled_from(
        ["data:image/png;base64,aGVsbG8=", "http://x/y.png", "data:;base64,!!"]))},
)), max_size=2))  # fmt: skip
OA_MESSAGE = field(st.fixed_dictionaries(
    {"role": field(st.sampled_from(["user", "assistant", "system", "tool"]))},
    optional={"content": TEXT | OA_CONTENT, "name": TEXT, "tool_call_id": TEXT,
              "tool_calls": field(st.lists(CALL, max_size=2))},
))  # fmt: skip
GENERATION = {
    "stream": BOOL, "keep_alive": field(st.sampled_from(["5m", 10, -1, "1h", "x"])),
    "options": OPTIONS_FIELD, "format": field(st.sampled_from(["json", "", {"type": "object"}])),
    "think": sometimes(field(st.sampled_from([True, "high", "lots"])), st.just(False), 4),
    "truncate": BOOL, "shift": BOOL, "logprobs": BOOL,
    "top_logprobs": field(st.integers(-1, 25)),
}  # fmt: skip
OPENAI = {
    "stream": BOOL, "stream_options": field(st.fixed_dictionaries({}, optional={
        "include_usage": BOOL})),
    "temperature": field(st.floats(0, 2)), "top_p": field(st.floats(0, 1)),
    "frequency_penalty": field(st.floats(-2, 2)), "presence_penalty": field(st.floats(-2, 2)),
    "seed": field(st.integers(-1, 2**31)), "max_tokens": field(st.integers(-2, 100)),
    "stop": field(st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=2)),
    "tools": field(st.lists(TOOL, max_size=2)), "logprobs": BOOL,
    "response_format": field(st.sampled_from([{"type": "json_object"}, {"type": "xml"}])),
    "reasoning_effort": field(st.sampled_from(["low", "none", "lots"])),
}  # fmt: skip
A_BLOCK = field(st.fixed_dictionaries(
    {"type": field(st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking"]))},
    optional={"text": TEXT, "id": TEXT, "name": TEXT, "tool_use_id": TEXT, "thinking": TEXT,
              "input": field(st.dictionaries(st.text(max_size=3), JUNK, max_size=2)),
              "content": TEXT, "source": field(st.fixed_dictionaries({}, optional={
                  "type": field(st.sampled_from(["base64", "url"])), "data": IMAGES,
                  "media_type": field(st.sampled_from(["image/png", "text/plain"]))}))},
))  # fmt: skip
A_MESSAGE = field(st.fixed_dictionaries(
    {"role": field(st.sampled_from(["user", "assistant", "system"]))},
    optional={"content": TEXT | field(st.lists(A_BLOCK, max_size=2))},
))  # fmt: skip
ANTHROPIC = {
    "max_tokens": field(st.integers(-2, 100)), "system": TEXT | field(st.lists(A_BLOCK)),
    "stream": BOOL, "temperature": field(st.floats(0, 1)), "top_p": field(st.floats(0, 1)),
    "top_k": field(st.integers(-1, 50)), "stop_sequences": field(st.lists(st.text(max_size=3))),
    "tools": field(st.lists(field(st.fixed_dictionaries({}, optional={
        "name": TEXT, "description": TEXT, "input_schema": field(st.just({"type": "object"}))
    })), max_size=2)),
    "thinking": field(st.fixed_dictionaries({"type": field(st.sampled_from(
        ["enabled", "disabled", "maybe"]))}, optional={"budget_tokens": field(st.integers())})),
    "tool_choice": field(st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "no"}])),
}  # fmt: skip
R_ITEM = field(st.fixed_dictionaries({}, optional={
    "type": field(st.sampled_from(["message", "function_call", "function_call_output", "x"])),
    "role": field(st.sampled_from(["user", "assistant", "system", "developer"])),
    "content": TEXT | field(st.lists(field(st.fixed_dictionaries(
        {"type": field(st.sampled_from(["input_text", "input_image", "output_text"]))},
        optional={"text": TEXT, "image_url": field(st.sampled_from(
            ["data:image/png;base64,aGVsbG8=", "http://x/y.png"]))})), max_size=2)),
    "call_id": TEXT, "name": TEXT, "arguments": TEXT, "output": TEXT,
}))  # fmt: skip
R_TOOL = field(st.fixed_dictionaries({"type": field(st.sampled_from(["function", "web"]))},
    optional={"name": TEXT, "description": TEXT,
              "parameters": field(st.just({"type": "object"}))}))  # fmt: skip
RERANK = {
    "query": TEXT, "top_n": field(st.integers(-1, 5)), "return_documents": BOOL,
    "documents": field(st.lists(TEXT | field(st.fixed_dictionaries({}, optional={
        "text": TEXT})), max_size=3)), "options": OPTIONS_FIELD, "keep_alive": JUNK,
}  # fmt: skip
ROUTES: dict[str, tuple[str, dict[str, Any]]] = {
    "/api/rerank": ("POST", RERANK),
    "/v1/rerank": ("POST", RERANK),
    "/api/generate": ("POST", {
        "prompt": TEXT, "system": TEXT, "suffix": TEXT, "raw": BOOL, "images": IMAGES,
        "template": field(TEMPLATES), "context": field(st.lists(
            st.integers(0, 50) | st.sampled_from([-1, 2**31, 2**63, 10**9]), max_size=4)),
        **GENERATION}),
    "/api/chat": ("POST", {"messages": field(st.lists(MESSAGE, max_size=3)),
                           "tools": field(st.lists(TOOL, max_size=2)), **GENERATION}),
    "/api/embed": ("POST", {"input": field(st.text() | st.lists(st.text(max_size=5))),
                            "dimensions": field(st.integers(-2, 8)), "truncate": BOOL,
                            "options": OPTIONS_FIELD, "keep_alive": JUNK}),
    "/api/embeddings": ("POST", {"prompt": TEXT, "options": OPTIONS_FIELD}),
    "/api/show": ("POST", {"verbose": BOOL}),
    "/api/copy": ("POST", {"source": MODEL, "destination": field(st.sampled_from(
        ["copy", "../../etc/x", "a" * 400, "ok:tag", ""]))}),
    "/api/delete": ("DELETE", {"name": field(st.sampled_from(["gone", "../x", ":", "a:b:c"]))}),
    "/api/pull": ("POST", {"insecure": BOOL, "stream": BOOL}),
    "/api/push": ("POST", {"insecure": BOOL, "stream": BOOL}),
    "/api/create": ("POST", {
        "from": MODEL, "system": TEXT, "template": field(TEMPLATES), "stream": BOOL,
        "parameters": field(st.dictionaries(OPTION_NAMES, OPTION_VALUES, max_size=3)),
        "files": field(st.dictionaries(st.sampled_from(["a.gguf", "../x", "/abs", ""]),
                                       st.sampled_from(["sha256:" + "1" * 64, "x"]), max_size=2)),
        "messages": field(st.lists(MESSAGE, max_size=2)), "quantize": field(st.just("zz")),
        "license": field(st.lists(st.text(max_size=3), max_size=2))}),
    "/v1/chat/completions": ("POST", {"messages": field(st.lists(OA_MESSAGE, max_size=3)),
                                      **OPENAI}),
    "/v1/completions": ("POST", {"prompt": field(st.text(max_size=20)), "suffix": TEXT,
                                 **OPENAI}),
    "/v1/embeddings": ("POST", {"input": field(st.text(max_size=5)),
                                "encoding_format": field(st.just("float")),
                                "dimensions": field(st.integers(-1, 4))}),
    "/v1/messages": ("POST", {"messages": field(st.lists(A_MESSAGE, max_size=3)), **ANTHROPIC}),
    "/v1/messages/count_tokens": ("POST", {"messages": field(st.lists(A_MESSAGE, max_size=3)),
                                           "system": TEXT, "tools": ANTHROPIC["tools"]}),
    "/v1/responses": ("POST", {
        "input": field(st.text(max_size=20) | st.lists(R_ITEM, max_size=3)),
        "instructions": TEXT, "stream": BOOL, "max_output_tokens": field(st.integers(-2, 100)),
        "temperature": field(st.floats(0, 2)), "top_p": field(st.floats(0, 1)),
        "tools": field(st.lists(R_TOOL, max_size=2)), "previous_response_id": TEXT,
        "tool_choice": field(st.sampled_from(["auto", "none", "required", {"type": "x"}])),
        "text": field(st.fixed_dictionaries({}, optional={"format": field(st.sampled_from(
            [{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}]))})),
        "reasoning": field(st.fixed_dictionaries({}, optional={"effort": field(
            st.sampled_from(["low", "high", "max"]))})), "store": BOOL}),
}  # fmt: skip


@pytest.mark.parametrize("path", list(ROUTES))
def test_route_schema_fuzz(path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = serve(tmp_path, monkeypatch)
    method, fields = ROUTES[path]
    required = {} if path in ("/api/copy", "/api/delete") else {"model": MODEL}
    bodies = st.fixed_dictionaries(required, optional=fields)

    @FUZZ
    @given(body=sometimes(JUNK, bodies, 6))
    def one(body: Any) -> None:
        assert_clean(send(client, method, path, body), path)

    one()
    answers_normally(client)


@FUZZ
@given(
    path=st.sampled_from(["/api/blobs/", "/v1/models/", "/api/"]),
    tail=st.sampled_from([*NASTY, "\ud800", "a%2F..%2F..%2Fb"]) | st.text(max_size=20),
    method=st.sampled_from(["GET", "HEAD", "POST", "DELETE", "PUT"]),
)
def test_path_parameters_fuzz(client: TestClient, path: str, tail: str, method: str) -> None:
    from urllib.parse import quote

    r = client.request(method, path + quote(tail, safe="/:", errors="surrogatepass"))
    assert_clean(r, path)


# ---- regressions: the minimal inputs ---------------------------------------------------
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def error_of(r: Any, openai: bool) -> str:
    assert r.status_code == 400, (r.status_code, r.text)
    return r.json()["error"]["message"] if openai else r.json()["error"]


@pytest.mark.parametrize("value", [math.nan, "NaN", math.inf, "-Infinity", "1e39"])
@pytest.mark.parametrize(
    "name", ["temperature", "repeat_penalty", "presence_penalty", "frequency_penalty", "top_p"]
)
def test_non_finite_options_on_api_are_400(client: TestClient, name: str, value: Any) -> None:
    for path in ("/api/chat", "/api/generate"):
        body = {**CHAT, "prompt": "hi", "options": {name: value}}
        message = error_of(send(client, "POST", path, body), False)
        # a literal NaN or Infinity is no JSON at all; a string one is no number for the option
        assert ("is not a JSON number" if isinstance(value, float) else name) in message
    answers_normally(client)


@pytest.mark.parametrize("value", [math.nan, "NaN", math.inf, "Infinity"])
@pytest.mark.parametrize("name", ["temperature", "top_p", "presence_penalty", "frequency_penalty"])
def test_non_finite_sampling_on_v1_is_400(client: TestClient, name: str, value: Any) -> None:
    for path, body in (
        ("/v1/chat/completions", CHAT),
        ("/v1/completions", {"model": "m", "prompt": "hi"}),
    ):
        message = error_of(send(client, "POST", path, {**body, name: value}), True)
        assert ("is not a JSON number" if isinstance(value, float) else name) in message
    answers_normally(client)


@pytest.mark.parametrize("token", [2**31, 2**63, -1, 1.5, "7"])
def test_context_ids_out_of_range_are_400(client: TestClient, token: Any) -> None:
    body = {"model": "m", "prompt": "hi", "context": [1, token], "stream": False}
    assert "context token id" in error_of(send(client, "POST", "/api/generate", body), False)
    answers_normally(client)


def test_num_thread_beyond_the_machine_is_400(client: TestClient) -> None:
    body = {"model": "m", "prompt": "hi", "options": {"num_thread": 1e30}}
    assert "num_thread" in error_of(send(client, "POST", "/api/generate", body), False)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 10_000 + b"]" * 10_000,
        b'{"model": "m", "x": ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}",
        b'{"model": "m", "options": {"x": ' + b'{"a": ' * 900 + b"1" + b"}" * 901 + b"}",
    ],
    ids=["10000-deep", "just-past-the-limit", "900-deep-objects"],
)
def test_deep_nesting_is_400(client: TestClient, body: bytes) -> None:
    for path in ("/api/chat", "/v1/chat/completions"):
        assert "nested deeper" in error_of(send(client, "POST", path, body), path[1] == "v")


@pytest.mark.parametrize(
    "path, body",
    [
        ("/api/chat", {"model": "m", "messages": "hi"}),
        ("/api/chat", {"model": "m", "messages": ["hi"]}),
        ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": 5}]}),
        ("/api/chat", {"model": "m", "messages": [{"role": "user", "tool_calls": "x"}]}),
        ("/api/chat", {"model": "m", "messages": [{"role": "user", "tool_calls": [5]}]}),
        ("/api/chat", {**CHAT, "tools": {"a": 1}}),
        ("/api/chat", {**CHAT, "tools": [{"function": {"parameters": {"properties": [1]}}}]}),
        ("/api/chat", {**CHAT, "stream": "yes"}),
        ("/api/generate", {"model": "m", "prompt": "hi", "context": "1,2"}),
        ("/api/generate", {"model": "m", "prompt": "hi", "keep_alive": 10**400}),
        ("/api/generate", {"model": "m", "prompt": 5}),
        ("/api/generate", {"model": "m", "prompt": "hi", "options": {"seed": "x"}}),
        ("/api/generate", {"model": "m", "prompt": "hi", "options": {"seed": 2**63}}),
        ("/api/embed", {"model": "m", "input": "x", "dimensions": "3"}),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": {"a": 1}}]}),
        ("/v1/chat/completions", {**CHAT, "stream_options": "yes"}),
        ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": "y"}}),
        ("/v1/chat/completions", {**CHAT, "seed": "42"}),
        ("/v1/chat/completions", {**CHAT, "seed": 2**63}),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 1.5}),
        ("/v1/chat/completions", {**CHAT, "stop": [1]}),
        (
            "/v1/chat/completions",
            {
                **CHAT,
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": "[" * 5000}}],
                    }
                ],
            },
        ),  # fmt: skip
        (
            "/v1/chat/completions",
            {
                **CHAT,
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": '{"a": NaN}'}}],
                    }
                ],
            },
        ),  # fmt: skip
        ("/v1/completions", {"model": "m", "prompt": "hi", "stream": "yes"}),
        ("/v1/embeddings", {"model": "m", "input": "x", "dimensions": "3"}),
        ("/api/pull", {"model": "m", "stream": "no"}),
        ("/api/create", {"model": "made", "from": "m", "license": 5}),  # was a TypeError
        ("/api/create", {"model": "made", "from": "m", "stream": "no"}),
        ("/v1/embeddings", {"model": "m", "input": "x", "encoding_format": 2**64}),
    ],
)
def test_wrongly_typed_fields_are_400(client: TestClient, path: str, body: Any) -> None:
    error_of(send(client, "POST", path, body), path.startswith("/v1/"))
    answers_normally(client)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "m", "prompt": "\\ud800"}',
        b'{"model": "m", "prompt": "a\\udc00b"}',
        b'{"model": "m", "messages": [{"role": "user", "content": "\\udfff"}]}',
        b'{"model": "m", "options": {"stop": ["\\ud83d"]}}',
        b'{"\\ud800": 1, "model": "m"}',
    ],
)
def test_lone_surrogates_are_400(client: TestClient, raw: bytes) -> None:
    for path in ("/api/generate", "/api/chat", "/v1/chat/completions"):
        assert "surrogate" in error_of(send(client, "POST", path, raw), path[1] == "v")


def test_a_surrogate_pair_is_text(client: TestClient) -> None:
    body = b'{"model": "m", "prompt": "\\ud83d\\ude00", "stream": false}'
    assert send(client, "POST", "/api/generate", body).status_code == 200


@pytest.mark.parametrize(
    "raw, words",
    [
        (b'{"model": "m", "prompt": "\xff"}', "not UTF-8"),
        (b'{"model": "m", "prompt": "\xed\xa0\x80"}', "not UTF-8"),  # a surrogate, encoded
        (b'{"model": "m", "options": {"temperature": NaN}}', "NaN is not a JSON number"),
        (b'{"model": "m", "options": {"temperature": 1e999}}', "out of range"),
        (b'{"model": "m", "x": ' + b"9" * 5000 + b"}", "invalid JSON"),
        (b"", "missing request body"),
        (b"[1]", "must be a JSON object"),
    ],
)
def test_bodies_that_are_no_json_object_are_400(client: TestClient, raw: bytes, words: str) -> None:
    assert words in error_of(send(client, "POST", "/api/generate", raw), False)


def test_body_size_is_bounded(client: TestClient) -> None:
    big = b'{"model": "m", "prompt": "' + b"x" * MAX_BODY + b'"}'
    assert "too large" in error_of(send(client, "POST", "/api/generate", big), False)
    answers_normally(client)


def test_text_far_beyond_the_context_is_400(client: TestClient) -> None:
    """Tokenizing megabytes costs the runner seconds each (the fuzz run saw a runner go
    silent and be replaced): text past 32 characters per context token is refused."""
    from herd.server.validate import MIN_TEXT

    over, fits = "x" * (MIN_TEXT + 1), "x" * (MIN_TEXT // 2)
    for path, body in (
        ("/api/generate", {"model": "m", "prompt": over}),
        ("/api/chat", {**CHAT, "messages": [{"role": "user", "content": over}]}),
        ("/v1/completions", {"model": "m", "prompt": over}),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": over}]}),
    ):
        assert "far longer than the context" in error_of(
            send(client, "POST", path, body), path.startswith("/v1/")
        )
    body = {"model": "m", "prompt": fits, "stream": False}
    assert send(client, "POST", "/api/generate", body).status_code == 200


@pytest.mark.parametrize(
    "header",
    [b"Bearer s\xc3\xa9cret", b"Bearer \xff\xfe", "Bearer sécret".encode(), b"Bearer", b"\xff",
     b"Basic secret", b"Bearer secret2", b"bearer  secret  x"],
)  # fmt: skip
def test_malformed_or_non_ascii_bearer_is_401(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, header: bytes
) -> None:
    client = serve(tmp_path, monkeypatch, api_key="secret")
    for path in ("/api/tags", "/v1/models"):
        r = client.get(path, headers=[(b"authorization", header)])
        assert r.status_code == 401, (header, r.status_code)
        assert_clean(r, path)
    assert client.get("/api/tags", headers={"Authorization": "Bearer secret"}).status_code == 200


def test_a_non_ascii_api_key_still_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = serve(tmp_path, monkeypatch, api_key="sécret")
    r = client.get("/api/tags", headers=[(b"authorization", "Bearer sécret".encode())])
    assert r.status_code == 200


# a Go template that doubles a string until it is gigabytes, and variables that keep copies
DOUBLING = '{{$s := "aaaaaaaa"}}{{range 40}}{{$s = print $s $s}}{{end}}{{$s}}'
HOARDING = (
    '{{$s := "aaaaaaaa"}}{{range 20}}{{$s = print $s $s}}{{end}}'
    + "".join(f"{{{{$v{i} := print $s $s}}}}" for i in range(40))
    + "{{len $s}}"
)


@pytest.mark.parametrize(
    "template, words",
    [
        (DOUBLING, "print result exceeds"),
        (HOARDING, "characters of strings"),
        ('{{printf "%.1000000000f" 1.0}}{{.Prompt}}', None),  # Go's NOVERB, no gigabyte
        ('{{printf "%9999999d" 1}}', "far more than the context"),  # not tokenized: 4 GB
        ("{{ 'a'.ljust(1000000000) }}", "unexpected . after term"),  # Go reads no Jinja
        ("{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
         "{% endfor %}{{ ns.s }}", "not Jinja"),
    ],
    ids=["doubling", "hoarding", "printf-prec", "printf-width", "jinja-ljust", "jinja-loop"],
)  # fmt: skip
def test_request_template_memory_is_bounded(
    client: TestClient, template: str, words: str | None
) -> None:
    body = {"model": "m", "prompt": "hi", "template": template, "stream": False}
    r = send(client, "POST", "/api/generate", body)
    if words is None:
        assert r.status_code == 200, r.text
        assert client.llm.prompts[-1].startswith("%!(NOVERB)")  # type: ignore[attr-defined]
    else:
        assert words in error_of(r, False)
    answers_normally(client)


@pytest.mark.parametrize(
    "template, words",
    [("{{ 'a'.ljust(1000000000) }}", "unexpected . after term"),
     ("{% for i in range(9) %}{% endfor %}", "not Jinja"), ("{{ .Prompt", "unclosed action")],
)  # fmt: skip
def test_create_takes_go_templates_only(client: TestClient, template: str, words: str) -> None:
    body = {"model": "made", "from": "m", "template": template, "stream": False}
    assert words in error_of(send(client, "POST", "/api/create", body), False)
    body["template"] = "{{ .System }} {{ .Prompt }}"
    assert send(client, "POST", "/api/create", body).status_code == 200


def test_legacy_template_turns_share_one_output_bound() -> None:
    """A prompt-style template runs once per turn: all turns together stay within one bound,
    not one per turn."""
    from herd.errors import TemplateError
    from herd.template.gotemplate import MAX_OUTPUT
    from herd.template.ollama import Template

    template = Template("{{ .Prompt }}{{ .Response }}")
    turn = "x" * (MAX_OUTPUT // 3)
    messages = [{"role": r, "content": turn} for r in ("user", "assistant") * 2]
    with pytest.raises(TemplateError, match="output exceeds"):
        template.execute(messages)
    assert len(template.execute(messages[:2])) == 2 * len(turn)


def test_client_leaving_mid_body_is_no_500() -> None:
    """A body cut short by the client: 499 for the log, no traceback."""
    import asyncio

    from herd.server.http import handles_errors, read_json

    async def handler(request: Any) -> Any:
        await read_json(request)

    async def go() -> int:
        from starlette.requests import Request

        events = [
            {"type": "http.request", "body": b'{"model": ', "more_body": True},
            {"type": "http.disconnect"},
        ]

        async def receive() -> dict[str, Any]:
            return events.pop(0)

        scope = {"type": "http", "method": "POST", "path": "/api/generate", "headers": []}
        response = await handles_errors()(handler)(Request(scope, receive))
        return response.status_code

    assert asyncio.run(go()) == 499
