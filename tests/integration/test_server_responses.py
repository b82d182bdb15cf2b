"""OpenAI's Responses API (`POST /v1/responses`) driven by the official `openai` SDK against
a live `herd serve` (the real SmolLM2, NumPy backend), asserting on the SDK's parsed
objects: a plain answer, a streamed one (event order, deltas joined), a function tool
round trip, JSON schema outputs, and bad input (400s in OpenAI's error shape).

Greedy answers are compared with those of `/v1/chat/completions` and `/api/chat` for the
same conversation: equal text means the Responses request became the same prompt. The
tool tests use the store entry of test_structured_and_tools (SmolLM2 with a template whose
calls are bare JSON objects) and a call schema, so that the parser finds a real call in
real output. The event builder is also checked alone, with thinking (which SmolLM2 cannot
do), against the SDK's own event and Response types.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import pytest

jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

from integration.test_server import MODEL, Server  # noqa: E402
from integration.test_structured_and_tools import (  # noqa: E402
    CALL_SCHEMA,
    TOOLS_MODEL,
    WEATHER,
)
from integration.test_structured_and_tools import server as server  # noqa: E402, F401

ASK = "Why is the sky blue?"  # SmolLM2 runs past 6 tokens on it (test_server says so)
WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL = {  # the Responses API's flat function tool
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
CHAT_TOOL = {
    "type": "function",
    "function": {k: TOOL[k] for k in ("name", "description", "parameters")},
}
OK_SCHEMA = {
    "type": "object",
    "properties": {"sunny": {"type": "boolean"}},
    "required": ["sunny"],
    "additionalProperties": False,
}
CALL_FORMAT = {"format": {"type": "json_schema", "name": "call", "schema": CALL_SCHEMA}}


def _types(events: list[Any]) -> list[str]:
    return [e.type for e in events]


# ---------------------------------------------------------------- plain and streamed
def test_plain_answer_equals_chat_completions(server: Server) -> None:
    client = server.openai()
    r = client.responses.create(
        model=MODEL, instructions="Answer briefly.", input=ASK, max_output_tokens=6, temperature=0
    )
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.instructions == "Answer briefly." and r.created_at > 0
    # six tokens and not done: incomplete, as OpenAI says it
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text and [o.type for o in r.output] == ["message"]
    msg = r.output[0]
    assert msg.role == "assistant" and msg.id.startswith("msg_")
    assert [c.type for c in msg.content] == ["output_text"]
    assert r.usage is not None and r.usage.input_tokens > 0 and r.usage.output_tokens == 6
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens >= 0
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": ASK},
        ],
        max_tokens=6,
        temperature=0,
    )
    assert r.output_text == chat.choices[0].message.content

    # the same conversation as items: developer = system, parts joined
    items = client.responses.create(
        model=MODEL,
        input=[
            {"type": "message", "role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "input_text", "text": ASK}]},
        ],
        max_output_tokens=6,
        temperature=0,
    )
    assert items.output_text == r.output_text and items.id != r.id
    # the same prompt again: counted whole, its reused part said apart
    assert items.usage is not None and items.usage.input_tokens == r.usage.input_tokens
    cached = items.usage.input_tokens_details.cached_tokens
    assert 0 < cached < items.usage.input_tokens
    assert items.usage.input_tokens_details.cache_write_tokens == items.usage.input_tokens - cached


def test_streamed_events_in_order_and_deltas_join(server: Server) -> None:
    client = server.openai()
    whole = client.responses.create(model=MODEL, input=ASK, max_output_tokens=6, temperature=0)
    events = list(
        client.responses.create(
            model=MODEL, input=ASK, max_output_tokens=6, temperature=0, stream=True
        )
    )
    types = _types(events)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",  # max_output_tokens reached, as whole.status says
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    text = "".join(d.delta for d in deltas)
    done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response
    assert text == done.text == final.output_text == whole.output_text
    assert final.status == "incomplete" and final.usage.output_tokens == 6
    assert final.id == events[0].response.id and final.output[0].id == deltas[0].item_id


# ---------------------------------------------------------------- structured outputs
def test_json_schema_whole_and_with_the_stream_helper(server: Server) -> None:
    client = server.openai()
    text = {"format": {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}}
    r = client.responses.create(
        model=MODEL, input=WEATHER_Q, text=text, max_output_tokens=48, temperature=0
    )
    assert r.status == "completed" and r.text.format.type == "json_schema"
    jsonschema.validate(json.loads(r.output_text), WEATHER)
    # the SDK's stream helper accumulates the events into the same Response (a small schema:
    # the helper wants `response.completed`, which the schema's end brings quickly)
    small = {"format": {"type": "json_schema", "name": "ok", "schema": OK_SCHEMA}}
    whole = client.responses.create(model=MODEL, input=WEATHER_Q, text=small, temperature=0)
    with client.responses.stream(model=MODEL, input=WEATHER_Q, text=small, temperature=0) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == whole.output_text
    assert json.loads(final.output_text) in ({"sunny": True}, {"sunny": False})
    obj = client.responses.create(
        model=MODEL,
        input=WEATHER_Q,
        text={"format": {"type": "json_object"}},
        max_output_tokens=8,
        temperature=0,
    )
    assert obj.output_text.startswith("{")


# ---------------------------------------------------------------- tools
def test_function_tool_round_trip(server: Server) -> None:
    client = server.openai()
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.responses.create(
        model=TOOLS_MODEL, input=ask, tools=[TOOL], text=CALL_FORMAT,  # type: ignore[list-item]
        max_output_tokens=48, temperature=0,
    )  # fmt: skip
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    assert call.id and call.id.startswith("fc_") and call.status == "completed"
    args = json.loads(call.arguments)
    assert isinstance(args["city"], str) and r.output_text == ""
    assert [t.name for t in r.tools] == ["get_weather"]  # type: ignore[union-attr]

    # streamed: the call arrives whole, as delta then done, with the same arguments
    events = list(
        client.responses.create(
            model=TOOLS_MODEL,
            input=ask,
            tools=[TOOL],
            text=CALL_FORMAT,  # type: ignore[list-item]
            max_output_tokens=48,
            temperature=0,
            stream=True,
        )  # fmt: skip
    )
    types = _types(events)
    at = types.index("response.function_call_arguments.delta")
    assert types[at - 1 : at + 3] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert types[-1] == "response.completed"
    assert events[at].delta == events[at + 1].arguments == call.arguments
    assert events[at - 1].item.name == "get_weather"

    # the result goes back as a function_call_output, with the call itself from r.output
    result = "12 degrees, sunny"
    back = client.responses.create(
        model=TOOLS_MODEL,
        input=[
            *ask,
            *[o.model_dump(exclude_none=True) for o in r.output],
            {"type": "function_call_output", "call_id": call.call_id, "output": result},
        ],  # type: ignore[list-item]
        tools=[TOOL],  # type: ignore[list-item]
        max_output_tokens=8,
        temperature=0,
    )
    # the same conversation through /api/chat gives the same greedy answer: the call and
    # its output reached the prompt as the assistant's tool call and a tool message
    same = server.ollama().chat(
        TOOLS_MODEL,
        [
            *ask,
            {"role": "assistant", "content": "",
             "tool_calls": [{"function": {"name": "get_weather", "arguments": args}}]},
            {"role": "tool", "tool_name": "get_weather", "content": result},
        ],
        tools=[CHAT_TOOL],
        options={"num_predict": 8, "temperature": 0},
    )  # fmt: skip
    assert back.output_text == same.message.content
    got = [(o.name, json.loads(o.arguments)) for o in back.output if o.type == "function_call"]
    want = [(c.function.name, dict(c.function.arguments)) for c in same.message.tool_calls or []]
    assert got == want
    assert back.output_text or got  # it answered something

    # tool_choice "none": the model is given no tools, so the answer is text
    none = client.responses.create(
        model=TOOLS_MODEL, input=ask, tools=[TOOL], tool_choice="none",  # type: ignore[list-item]
        max_output_tokens=6, temperature=0,
    )  # fmt: skip
    assert none.tool_choice == "none" and none.output_text


# ---------------------------------------------------------------- bad input
def _png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2, 2), "red").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


BAD: list[tuple[dict[str, Any], str]] = [
    ({"input": "hi"}, "model is required"),
    ({"model": MODEL}, "input is required"),
    ({"model": MODEL, "input": 42}, "input must be a string or a list"),
    ({"model": MODEL, "input": [{"type": "bogus"}]}, "unknown input item type 'bogus'"),
    ({"model": MODEL, "input": ["hi"]}, "input[0] must be an object"),
    ({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_audio"}]}]},
     "unknown content type 'input_audio'"),
    ({"model": MODEL, "input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"model": MODEL, "input": [{"type": "function_call_output", "output": "x"}]}, "call_id"),
    ({"model": MODEL, "input": [{"type": "function_call", "call_id": "c", "name": "f",
                                 "arguments": "{not json"}]}, "invalid tool call arguments"),
    ({"model": MODEL, "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": _png()}]}]}, "does not support vision"),
    ({"model": MODEL, "input": "hi", "previous_response_id": "resp_1"}, "keeps no responses"),
    ({"model": MODEL, "input": "hi", "tools": [{"type": "web_search"}]}, "not supported"),
    ({"model": MODEL, "input": "hi", "temperature": "hot"}, "temperature must be a number"),
    ({"model": MODEL, "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": MODEL, "input": "hi", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"model": MODEL, "input": "hi", "reasoning": {"effort": "high"}}, "support thinking"),
    ({"model": MODEL, "input": "hi", "stream": "yes"}, "stream"),
]  # fmt: skip


@pytest.mark.parametrize("body, words", BAD, ids=[w for _, w in BAD])
def test_bad_input_is_400_in_openai_shape(server: Server, body: dict, words: str) -> None:
    client = server.openai()
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**body)
    assert e.value.status_code == 400 and e.value.type == "invalid_request_error"
    assert words in e.value.message, e.value.message


def test_bad_bodies_then_a_normal_answer(server: Server) -> None:
    url = f"{server.url}/v1/responses"
    for content in (b"{nope", b"[]", b""):
        r = httpx.post(url, content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        server.openai().responses.create(model="no-such-model", input="hi")
    assert "not found" in e.value.message
    # the server keeps serving
    ok = server.openai().responses.create(model=MODEL, input="Hi", max_output_tokens=3)
    assert ok.output_text and ok.usage is not None and ok.usage.output_tokens > 0


# ---------------------------------------------------------------- the event builder alone
def test_builder_events_with_thinking_text_and_calls_parse_as_the_sdks() -> None:
    """Thinking (SmolLM2 has none), then text, then a tool call, as the runner sends them:
    every event and the final Response validate against the SDK's own types."""
    from openai.types.responses import Response, ResponseStreamEvent

    from herd.server.responses_stream import Builder, Envelope

    b = Builder(Envelope(model="m", tools=[TOOL]))
    call = {"id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    pieces = [
        {"thinking": "Let me "},
        {"thinking": "think."},
        {"text": "Checking"},
        {"text": "."},
        {"tool_calls": [call]},
        {"done": True, "done_reason": "stop", "prompt_eval_count": 5, "eval_count": 9},
    ]
    raw = b.start() + [e for p in pieces for e in b.feed(p)]
    adapter = pydantic.TypeAdapter(ResponseStreamEvent)
    events = [adapter.validate_python(json.loads(json.dumps(e))) for e in raw]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert _types(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = Response.model_validate(json.loads(json.dumps(b.final)))
    assert [o.type for o in final.output] == ["reasoning", "message", "function_call"]
    assert final.output[0].summary[0].text == "Let me think."  # type: ignore[union-attr]
    assert final.output_text == "Checking."
    fc = final.output[2]
    assert fc.call_id == "call_1" and json.loads(fc.arguments) == {"city": "Oslo"}  # type: ignore[union-attr]
    assert final.usage is not None and final.usage.total_tokens == 14
    assert final.status == "completed" and final.incomplete_details is None
    # a whole answer fed at once gives the same output
    whole = Builder(Envelope(model="m"))
    whole.feed({"thinking": "Let me think.", "text": "Checking.", "tool_calls": [call],
                "done": True, "done_reason": "stop"})  # fmt: skip
    strip = [{k: v for k, v in o.items() if k != "id"} for o in whole.final["output"]]
    assert strip == [{k: v for k, v in o.items() if k != "id"} for o in b.final["output"]]


def test_reasoning_items_come_back_as_thinking() -> None:
    from herd.server.outputs import from_openai_messages
    from herd.server.responses_api import messages

    out = from_openai_messages(
        messages(
            {
                "instructions": "Be brief.",
                "input": [
                    {"role": "user", "content": "Weather?"},
                    {"type": "reasoning", "id": "rs_1",
                     "summary": [{"type": "summary_text", "text": "Need the tool."}]},
                    {"type": "function_call", "call_id": "call_9", "name": "get_weather",
                     "arguments": '{"city": "Oslo"}'},
                    {"type": "function_call_output", "call_id": "call_9", "output": "sunny"},
                ],
            }
        )
    )  # fmt: skip
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool"]
    assert out[2]["thinking"] == "Need the tool."
    assert out[2]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": {"city": "Oslo"},
    }
    assert out[3]["tool_name"] == "get_weather" and out[3]["content"] == "sunny"
