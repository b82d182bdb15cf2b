"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) on a live `herd
serve`, driven by the official `anthropic` SDK and asserted on the objects it parses.

The built-in smollm2:135m answers the plain, streamed and system-prompt requests. For tool
use, a store entry pairs the same weights with a ChatML template whose calls are bare JSON
objects (the structured-output tests' TOOLS_TEMPLATE), and the request carries two
earlier turns that called the tool: the tiny model then calls it for a new city by itself
(greedy), with no format to force it. The SDK in use takes sampling fields only through
`extra_body`.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

anthropic = pytest.importorskip("anthropic")

from integration.test_server import KEY, MODEL, Server, _start  # noqa: E402
from integration.test_structured_and_tools import TOOLS_TEMPLATE  # noqa: E402

pytestmark = pytest.mark.slow

TOOLS_MODEL = "smollm2:tools"
GREEDY = {"temperature": 0}
HELLO = [{"role": "user", "content": "Say hello"}]
TOOL = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def _turn(city: str, n: int, degrees: int) -> list[dict[str, Any]]:
    """One earlier exchange: the question, the call, its result, the answer."""
    call = {
        "type": "tool_use",
        "id": f"toolu_seed{n}",
        "name": "get_weather",
        "input": {"city": city},
    }
    result = {
        "type": "tool_result",
        "tool_use_id": f"toolu_seed{n}",
        "content": f"{degrees} degrees",
    }
    return [
        {"role": "user", "content": f"What is the weather in {city}?"},
        {"role": "assistant", "content": [call]},
        {"role": "user", "content": [result]},
        {"role": "assistant", "content": f"It is {degrees} degrees in {city}."},
    ]


SEED = _turn("Paris", 1, 12) + _turn("Berlin", 2, 8)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, test_store: object
) -> Iterator[Server]:
    for s in _start(tmp_path_factory.mktemp("anthropic"), test_store, {}):
        from herd.store import Store
        from herd.store.layout import MEDIA_MODEL, Layer

        store = Store(s.store)
        ref = store.resolve(MODEL)
        digest = "sha256:" + ref.model_path.name.removeprefix("sha256-")
        store.write_model(
            TOOLS_MODEL,
            Layer(MEDIA_MODEL, digest, ref.model_path.stat().st_size),
            template=TOOLS_TEMPLATE,
            params=ref.params,
        )
        yield s


def _client(server: Server, key: str = "unused") -> Any:
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0)


def test_create_plain_with_usage_and_stop_sequences(server: Server) -> None:
    client = _client(server)
    msg = client.messages.create(model=MODEL, max_tokens=8, messages=HELLO, extra_body=GREEDY)
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL
    assert msg.id.startswith("msg_")
    (block,) = msg.content
    assert isinstance(block, anthropic.types.TextBlock) and block.text.strip()
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.stop_sequence is None
    assert 0 < msg.usage.output_tokens <= 8
    prompt = msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0)
    assert msg.usage.input_tokens > 0 and prompt > 1
    # the same request again: its prompt comes from the cache, the whole is the same
    again = client.messages.create(model=MODEL, max_tokens=8, messages=HELLO, extra_body=GREEDY)
    assert again.content[0].text == block.text  # type: ignore[union-attr]
    assert again.usage.cache_read_input_tokens and again.usage.cache_read_input_tokens > 0
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == prompt

    # a stop sequence from the greedy answer ends the answer just before it
    words = block.text.split()
    assert len(words) > 2, block.text
    stop = words[2]
    cut = client.messages.create(
        model=MODEL, max_tokens=8, messages=HELLO, stop_sequences=[stop], extra_body=GREEDY
    )
    assert stop not in cut.content[0].text  # type: ignore[union-attr]
    assert block.text.startswith(cut.content[0].text)  # type: ignore[union-attr]
    assert cut.stop_reason == "end_turn"


def test_streamed_text_equals_the_final_message(server: Server) -> None:
    client = _client(server)
    with client.messages.stream(
        model=MODEL, max_tokens=6, messages=HELLO, extra_body=GREEDY
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and text == final.content[0].text  # type: ignore[union-attr]
    assert final.id.startswith("msg_") and final.stop_reason in ("end_turn", "max_tokens")
    assert 0 < final.usage.output_tokens <= 6
    assert final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) > 1

    # the raw events, in Anthropic's order (the SDK drops `ping`, read from the wire below)
    kinds = [
        e.type
        for e in client.messages.create(
            model=MODEL, max_tokens=6, messages=HELLO, stream=True, extra_body=GREEDY
        )
    ]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    body = {"model": MODEL, "max_tokens": 3, "messages": HELLO, "stream": True, **GREEDY}
    with httpx.stream("POST", f"{server.url}/v1/messages", json=body, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        names = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]


def test_system_prompt_and_thinking_on_a_model_that_cannot(server: Server) -> None:
    client = _client(server)
    ask = [{"role": "user", "content": "What is your name?"}]
    system = "You are a pirate named Redbeard. Always say your name."
    plain = client.messages.create(model=MODEL, max_tokens=6, messages=ask, extra_body=GREEDY)
    told = client.messages.create(
        model=MODEL, max_tokens=6, system=system, messages=ask, extra_body=GREEDY
    )
    blocks = client.messages.create(
        model=MODEL,
        max_tokens=6,
        system=[{"type": "text", "text": system}],
        messages=ask,
        extra_body=GREEDY,
    )
    assert told.content[0].text != plain.content[0].text  # type: ignore[union-attr]
    assert blocks.content[0].text == told.content[0].text  # type: ignore[union-attr]
    # the system prompt is part of the counted prompt
    count = client.messages.count_tokens(model=MODEL, messages=ask, system=system)
    assert count.input_tokens == told.usage.input_tokens + (told.usage.cache_read_input_tokens or 0)
    # Ollama's relax_thinking: a model that cannot think answers without thinking
    thought = client.messages.create(
        model=MODEL,
        max_tokens=6,
        system=system,
        messages=ask,
        thinking={"type": "enabled", "budget_tokens": 1024},
        extra_body=GREEDY,
    )
    assert [b.type for b in thought.content] == ["text"]
    assert thought.content[0].text == told.content[0].text  # type: ignore[union-attr]


def test_tool_round_trip_streamed_then_answered(server: Server) -> None:
    client = _client(server)
    ask = [*SEED, {"role": "user", "content": "What is the weather in Rome?"}]
    with client.messages.stream(
        model=TOOLS_MODEL, max_tokens=24, tools=[TOOL], messages=ask, extra_body=GREEDY
    ) as stream:
        kinds = [e.type for e in stream]
        called = stream.get_final_message()
    assert "input_json" in kinds  # the SDK's event for an input_json_delta
    assert called.stop_reason == "tool_use"
    (use,) = [b for b in called.content if b.type == "tool_use"]
    assert isinstance(use, anthropic.types.ToolUseBlock)
    assert use.id.startswith("toolu_") and use.name == "get_weather"
    assert use.input == {"city": "Rome"}

    result = {"type": "tool_result", "tool_use_id": use.id,
              "content": [{"type": "text", "text": "31 degrees"}]}  # fmt: skip
    follow = [*ask, {"role": "assistant", "content": called.content},
              {"role": "user", "content": [result]}]  # fmt: skip
    answer = client.messages.create(
        model=TOOLS_MODEL, max_tokens=12, tools=[TOOL], messages=follow, extra_body=GREEDY
    )
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in answer.content] == ["text"]
    assert "31" in answer.content[0].text  # type: ignore[union-attr]
    # tool_choice none: the tools are not offered, the request still answers
    plain = client.messages.create(
        model=TOOLS_MODEL, max_tokens=4, tools=[TOOL], tool_choice={"type": "none"},
        messages=[{"role": "user", "content": "Hi"}], extra_body=GREEDY,
    )  # fmt: skip
    assert plain.content[0].type == "text"


def test_count_tokens(server: Server) -> None:
    client = _client(server)
    short = client.messages.count_tokens(model=MODEL, messages=HELLO)
    long = client.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "Say hello " * 20}]
    )
    assert short.input_tokens > 1 and long.input_tokens > short.input_tokens + 20
    # the same count as the prompt a real request evaluates
    msg = client.messages.create(model=MODEL, max_tokens=2, messages=HELLO, extra_body=GREEDY)
    assert msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0) == short.input_tokens
    bare = client.messages.count_tokens(model=TOOLS_MODEL, messages=HELLO)
    tools = client.messages.count_tokens(model=TOOLS_MODEL, messages=HELLO, tools=[TOOL])
    assert tools.input_tokens > bare.input_tokens + 10  # the template lists the tools


def _png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _bad(client: Any, body: dict[str, Any]) -> Any:
    """A raw body through the SDK: the 400 it raises."""
    with pytest.raises(anthropic.BadRequestError) as e:
        client.post("/v1/messages", body=body, cast_to=anthropic.types.Message)
    return e.value


@pytest.mark.parametrize(
    "body, words",
    [
        ({"model": MODEL, "messages": HELLO}, "max_tokens: Field required"),
        ({"model": MODEL, "max_tokens": "12", "messages": HELLO}, "max_tokens"),
        ({"model": MODEL, "max_tokens": 0, "messages": HELLO}, "max_tokens"),
        ({"model": MODEL, "max_tokens": 4, "messages": []}, "messages"),
        ({"model": MODEL, "max_tokens": 4}, "messages"),
        ({"max_tokens": 4, "messages": HELLO}, "model is required"),
        ({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": 5}]},
         "messages[0].content"),
        ({"model": MODEL, "max_tokens": 4, "messages": [{"role": "system", "content": "x"}]},
         "messages[0].role"),
        ({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": []}]},
         "non-empty content"),
        ({"model": MODEL, "max_tokens": 4, "messages": HELLO, "temperature": "hot"},
         "temperature"),
        ({"model": MODEL, "max_tokens": 4, "messages": HELLO, "stop_sequences": "END"},
         "stop_sequences"),
        ({"model": MODEL, "max_tokens": 4, "messages": HELLO, "system": 3}, "system"),
        ({"model": MODEL, "max_tokens": 4, "messages": HELLO, "stream": "yes"}, "stream"),
        ({"model": MODEL, "max_tokens": 4, "messages": HELLO, "thinking": {"type": "on"}},
         "thinking.type"),
        ({"model": MODEL, "max_tokens": 4, "messages": HELLO, "tool_choice": {"type": "all"}},
         "tool_choice.type"),
        ({"model": MODEL, "max_tokens": 4, "messages": HELLO,
          "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
        ({"model": MODEL, "max_tokens": 4, "messages": HELLO, "tools": [{"name": "f"}]},
         "tools[0].input_schema"),
        ({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": "{}"}]}]},
         "messages[0].content[0].input"),
        ({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]},
         "only base64 images"),
        ({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "not base64!"}}]}]},
         "illegal base64"),
    ],
    ids=["no-max_tokens", "max_tokens-string", "max_tokens-zero", "messages-empty",
         "messages-missing", "no-model", "content-number", "role-system", "content-empty",
         "temperature-string", "stop-string", "system-number", "stream-string", "thinking-type",
         "tool_choice-type", "server-tool", "tool-no-schema", "tool_use-input-string",
         "image-url", "image-base64"],
)  # fmt: skip
def test_bad_input_is_400_in_anthropics_shape(
    server: Server, body: dict[str, Any], words: str
) -> None:
    error = _bad(_client(server), body)
    assert error.status_code == 400
    assert error.body["type"] == "error"
    assert error.body["error"]["type"] == "invalid_request_error"
    assert words in error.body["error"]["message"]


def test_errors_then_the_server_keeps_serving(server: Server) -> None:
    client = _client(server)
    with pytest.raises(anthropic.BadRequestError) as e:  # an unknown block type
        client.messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [{"type": "bogus"}]}]
        )
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "unknown content block type 'bogus'" in e.value.body["error"]["message"]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": _png()}}  # fmt: skip
    with pytest.raises(anthropic.BadRequestError) as e:  # an image to a text-only model
        client.messages.create(
            model=MODEL,
            max_tokens=4,
            messages=[{"role": "user", "content": [image, {"type": "text", "text": "What?"}]}],
        )
    assert e.value.body["error"]["message"] == f'"{MODEL}" does not support vision'
    with pytest.raises(anthropic.NotFoundError) as nf:
        client.messages.create(model="nope:1b", max_tokens=4, messages=HELLO)
    assert nf.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "model 'nope:1b' not found"},
    }
    with pytest.raises(anthropic.BadRequestError) as e:  # count_tokens checks the same way
        client.messages.count_tokens(model=MODEL, messages=[])
    assert e.value.body["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{server.url}/v1/messages")  # the route takes only POST
    assert r.status_code == 405 and r.json()["type"] == "error"
    r = httpx.post(f"{server.url}/v1/messages", content=b'{"model": ')
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # and a normal request still answers
    msg = client.messages.create(model=MODEL, max_tokens=3, messages=HELLO, extra_body=GREEDY)
    assert msg.content[0].text  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def strict(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, test_store: object
) -> Iterator[Server]:
    yield from _start(tmp_path_factory.mktemp("anthropic-key"), test_store, {"HERD_API_KEY": KEY})


def test_api_key_as_the_sdk_sends_it(strict: Server) -> None:
    """HERD_API_KEY: the SDK's `x-api-key` (or a bearer token) passes; a wrong one is a 401
    in Anthropic's shape. A missing model shows the request got past the key check."""
    with pytest.raises(anthropic.AuthenticationError) as e:
        _client(strict, "wrong").messages.create(model="nope:1b", max_tokens=4, messages=HELLO)
    assert e.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "unauthorized"},
    }
    with pytest.raises(anthropic.NotFoundError):
        _client(strict, KEY).messages.create(model="nope:1b", max_tokens=4, messages=HELLO)
    bearer = anthropic.Anthropic(base_url=strict.url, auth_token=KEY, max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        bearer.messages.create(model="nope:1b", max_tokens=4, messages=HELLO)


# ------------------------------------------- thinking, without a model that thinks
# No built-in model thinks; the shapes of a thinking answer are checked through the SDK
# against herd's own stream and message code, served by a scripted runner.
THOUGHT = [
    {"text": "", "thinking": "Rome is"},
    {"text": "", "thinking": " warm."},
    {"text": "It is"},
    {"text": " sunny."},
    {"text": "", "tool_calls": [
        {"id": "call_ab12", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    {"done": True, "done_reason": "stop", "prompt_eval_count": 30, "prompt_cached_count": 20,
     "eval_count": 9},
]  # fmt: skip


def _scripted(pieces: list[dict[str, Any]], error: Exception | None = None) -> Any:
    """An SDK client whose /v1/messages answers `pieces` as herd's handler would."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from herd.server.anthropic_stream import Events, message, sse
    from herd.server.http import JSON
    from herd.server.outputs import Joined

    async def handler(request: Request) -> Response:
        if not (await request.json()).get("stream"):
            joined = Joined()
            for p in pieces:
                joined.add(p)
            return JSON(message("msg_test", "m", joined.piece(), pieces[-1]))

        async def rest() -> Any:
            for p in pieces[1:]:
                yield p
            if error is not None:
                raise error

        return sse(pieces[0], rest(), Events("msg_test", "m"))

    app = Starlette(routes=[Route("/v1/messages", handler, methods=["POST"])])
    return anthropic.Anthropic(
        base_url="http://testserver", api_key="x", http_client=TestClient(app), max_retries=0
    )


def test_thinking_text_and_tool_use_blocks_streamed_and_not() -> None:
    client = _scripted(THOUGHT)
    with client.messages.stream(model="m", max_tokens=9, messages=HELLO) as stream:
        thinking = [e.thinking for e in stream if e.type == "thinking"]
        streamed = stream.get_final_message()
    whole = client.messages.create(model="m", max_tokens=9, messages=HELLO)
    assert "".join(thinking) == "Rome is warm."
    for msg in (streamed, whole):
        assert [b.type for b in msg.content] == ["thinking", "text", "tool_use"]
        think, text, use = msg.content
        assert think.thinking == "Rome is warm." and text.text == "It is sunny."
        assert (use.id, use.name, use.input) == ("toolu_ab12", "get_weather", {"city": "Rome"})
        assert msg.stop_reason == "tool_use"
        usage = msg.usage
        assert (usage.input_tokens, usage.cache_read_input_tokens, usage.output_tokens) == (
            10, 20, 9)  # fmt: skip


def test_an_error_mid_stream_is_an_error_event() -> None:
    from herd.errors import RunnerError

    client = _scripted(THOUGHT[:3], RunnerError("the runner crashed"))
    with pytest.raises(anthropic.APIStatusError) as e:
        with client.messages.stream(model="m", max_tokens=9, messages=HELLO) as stream:
            for _ in stream:
                pass
    assert e.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "the runner crashed"},
    }
