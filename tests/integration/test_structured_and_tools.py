"""Structured outputs, tool calling and thinking with the real SmolLM2 (NumPy backend).

Structured outputs: 20 prompts over 5 JSON schemas (nested objects, arrays, enums, required
fields, bounded numbers) through the library; every answer must parse and validate with
`jsonschema`, whatever the model would have written unconstrained. Through a live `herd
serve`: both APIs' format fields, their 400s (bad schema, think or tools on a model that
cannot), and tool calls from the real model. SmolLM2 writes no tool calls by itself, so a
store entry pairs it with a template whose calls are bare JSON objects, and the request
adds a schema that makes the answer one: the parser then finds a real call in real output.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

jsonschema = pytest.importorskip("jsonschema")
ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

from integration.test_server import MODEL, SHORT, Server, _start  # noqa: E402

pytestmark = pytest.mark.slow

TOOLS_MODEL = "smollm2:tools"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "address"],
}
SHOPPING = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {"type": "string", "maxLength": 16},
            "minItems": 1,
            "maxItems": 4,
        },
        "store": {"type": "string", "maxLength": 20},
    },
    "required": ["items"],
}
SENTIMENT = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["sentiment", "confidence"],
}
WEATHER = {
    "type": "object",
    "properties": {
        "temperature_c": {"type": "integer", "minimum": -50, "maximum": 60},
        "humidity": {"type": "number", "minimum": 0, "maximum": 100},
        "windy": {"type": "boolean"},
        "sky": {"enum": ["clear", "cloudy", "rain", "snow"]},
    },
    "required": ["temperature_c", "humidity", "windy", "sky"],
}
RECIPE = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 24},
        "steps": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "n": {"type": "integer", "minimum": 1, "maximum": 9},
                    "action": {"type": "string", "maxLength": 24},
                },
                "required": ["n", "action"],
            },
        },
    },
    "required": ["title", "steps"],
}
CASES = [
    (PERSON, "Describe Alice, a 34 year old from Paris, as JSON."),
    (PERSON, "Give me a fictional person as JSON."),
    (PERSON, "Who is Bob? Answer in JSON."),
    (PERSON, "Make up a user profile."),
    (SHOPPING, "List what I need to bake bread."),
    (SHOPPING, "What should I buy for a picnic?"),
    (SHOPPING, "Groceries for a week, as JSON."),
    (SHOPPING, "Name some fruit."),
    (SENTIMENT, "Classify: 'I love this phone, it is great!'"),
    (SENTIMENT, "Classify: 'The service was terrible.'"),
    (SENTIMENT, "Classify: 'It is a chair.'"),
    (SENTIMENT, "How do you feel about Mondays?"),
    (WEATHER, "What is the weather like in Oslo in winter?"),
    (WEATHER, "Report the weather in Cairo in summer."),
    (WEATHER, "Is it raining in London?"),
    (WEATHER, "Give me a weather report."),
    (RECIPE, "How do I make tea?"),
    (RECIPE, "Steps to boil an egg."),
    (RECIPE, "A recipe for toast."),
    (RECIPE, "How to make a sandwich?"),
]


@pytest.fixture(scope="module")
def llm(smollm2_path: Path) -> Iterator[Any]:
    import herd

    model = herd.load(smollm2_path, backend="numpy")
    yield model
    model.close()


def test_twenty_prompts_five_schemas_all_validate(llm: Any) -> None:
    for i, (schema, prompt) in enumerate(CASES):
        # half greedy, half sampled: the mask must hold for any choice of token
        options = {"num_predict": 160, "temperature": 0 if i % 2 == 0 else 0.8, "seed": i}
        out = llm.chat([{"role": "user", "content": prompt}], format=schema, options=options)
        text = out["message"]["content"]
        assert out["done_reason"] == "stop", (prompt, text)  # the closed value ended it
        jsonschema.validate(json.loads(text), schema)


def test_format_json_and_generate(llm: Any) -> None:
    out = llm.generate(
        "Describe a cat in JSON.", format=RECIPE, options={"num_predict": 160, "temperature": 0}
    )
    jsonschema.validate(json.loads(out["response"]), RECIPE)
    chunks = list(
        llm.chat(
            [{"role": "user", "content": "One fruit, in JSON."}],
            format="json",
            stream=True,
            options={"num_predict": 24, "temperature": 0},
        )
    )
    text = "".join(c["message"]["content"] for c in chunks)
    assert text.startswith("{")
    if chunks[-1]["done_reason"] == "stop":
        assert isinstance(json.loads(text), dict)


def test_library_refuses_what_the_template_cannot_do(llm: Any) -> None:
    from herd.errors import GrammarError, HerdError

    with pytest.raises(HerdError, match="does not support thinking"):
        llm.chat([{"role": "user", "content": "hi"}], think=True)
    with pytest.raises(HerdError, match="does not support tools"):
        llm.chat([{"role": "user", "content": "hi"}], tools=[TOOL])
    with pytest.raises(GrammarError, match="Invalid type"):
        llm.chat([{"role": "user", "content": "hi"}], format={"type": "nope"})


# ---------------------------------------------------------------- a live server

# ChatML with tools, whose calls are bare JSON objects (tag "{")
TOOLS_TEMPLATE = """\
{{- if .Tools }}<|im_start|>system
You can call these functions: {{ range .Tools }}{{ json .Function }}{{ end }}
Answer with {"name": ..., "arguments": {...}} to call one.<|im_end|>
{{ end }}
{{- range .Messages }}<|im_start|>{{ .Role }}
{{ if .ToolCalls }}{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", \
"arguments": {{ json .Function.Arguments }}}{{ end }}{{ else }}{{ .Content }}{{ end }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CALL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"enum": ["get_weather"]},
        "arguments": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}},
            "required": ["city"],
        },
    },
    "required": ["name", "arguments"],
}
FAST = {"num_predict": 48, "temperature": 0}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, test_store: object
) -> Iterator[Server]:
    for s in _start(tmp_path_factory.mktemp("structured"), test_store, {}):
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


def test_server_structured_outputs_both_apis(server: Server) -> None:
    msg = server.ollama().chat(MODEL, ASK, format=WEATHER, options=FAST).message
    jsonschema.validate(json.loads(msg.content), WEATHER)
    gen = server.ollama().generate(MODEL, "Weather in Rome?", format=WEATHER, options=FAST)
    jsonschema.validate(json.loads(gen.response), WEATHER)
    oa = server.openai().chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=48, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "weather", "schema": WEATHER}},
    )  # fmt: skip
    assert oa.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(oa.choices[0].message.content or ""), WEATHER)
    obj = server.openai().chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=48, temperature=0,
        response_format={"type": "json_object"},
    )  # fmt: skip
    assert (obj.choices[0].message.content or "").startswith("{")


@pytest.mark.parametrize(
    "fmt, reason",
    [
        ({"type": "nope"}, "Invalid type: nope"),
        ({"type": "array", "uniqueItems": True}, "Unimplemented keys"),
        ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
        ("xml", 'invalid format: "xml"'),
    ],
    ids=["bad-type", "unsupported-keyword", "bad-regex", "not-json"],
)
def test_bad_schema_is_400_with_the_reason(server: Server, fmt: Any, reason: str) -> None:
    r = httpx.post(
        f"{server.url}/api/chat",
        json={"model": MODEL, "messages": ASK, "format": fmt, "stream": False},
        timeout=60,
    )
    assert r.status_code == 400 and reason in r.json()["error"]
    if isinstance(fmt, dict):
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": ASK,
                "response_format": {"type": "json_schema", "json_schema": {"schema": fmt}},
            },
            timeout=60,
        )
        assert r.status_code == 400 and reason in r.json()["error"]["message"]


def test_think_and_tools_on_a_model_that_cannot_are_400(server: Server) -> None:
    client = server.ollama()
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(MODEL, ASK, think=True)
    assert e.value.status_code == 400 and e.value.error == f'"{MODEL}" does not support thinking'
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(MODEL, "hi", think="high")
    assert e.value.status_code == 400 and "does not support thinking" in e.value.error
    # the built-in smollm2:135m takes tools (its template layer); SHORT, its bare GGUF, not
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(SHORT, ASK, tools=[TOOL])
    assert e.value.status_code == 400 and e.value.error == f'"{SHORT}" does not support tools'
    with pytest.raises(openai.BadRequestError) as oe:
        server.openai().chat.completions.create(model=SHORT, messages=ASK, tools=[TOOL])  # type: ignore[list-item]
    assert "does not support tools" in str(oe.value)
    with pytest.raises(openai.BadRequestError):
        server.openai().chat.completions.create(model=MODEL, messages=ASK, reasoning_effort="high")
    r = httpx.post(
        f"{server.url}/api/chat",
        json={"model": MODEL, "messages": ASK, "think": "very"},
        timeout=60,
    )
    assert r.status_code == 400 and "invalid think value" in r.json()["error"]
    # think: false is fine anywhere
    assert client.chat(MODEL, ASK, think=False, options={"num_predict": 2}).done


def test_real_tool_calls_both_apis(server: Server) -> None:
    client = server.ollama()
    assert "tools" in client.show(TOOLS_MODEL).capabilities
    whole = client.chat(TOOLS_MODEL, ASK, tools=[TOOL], format=CALL_SCHEMA, options=FAST)
    calls = whole.message.tool_calls or []
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert isinstance(calls[0].function.arguments["city"], str)
    assert whole.message.content == "" and whole.done_reason == "stop"
    raw = httpx.post(
        f"{server.url}/api/chat",
        json={
            "model": TOOLS_MODEL,
            "messages": ASK,
            "tools": [TOOL],
            "format": CALL_SCHEMA,
            "options": FAST,
            "stream": False,
        },
        timeout=120,
    ).json()
    call = raw["message"]["tool_calls"][0]
    assert call["id"].startswith("call_") and call["function"]["index"] == 0
    chunks = list(
        client.chat(TOOLS_MODEL, ASK, tools=[TOOL], format=CALL_SCHEMA, options=FAST, stream=True)
    )
    streamed = [c for ch in chunks for c in ch.message.tool_calls or []]
    assert [c.function.model_dump() for c in streamed] == [c.function.model_dump() for c in calls]
    assert "".join(ch.message.content for ch in chunks) == ""

    oa = server.openai().chat.completions.create(
        model=TOOLS_MODEL, messages=ASK, tools=[TOOL], max_tokens=48, temperature=0,  # type: ignore[list-item]
        response_format={"type": "json_schema", "json_schema": {"schema": CALL_SCHEMA}},
    )  # fmt: skip
    choice = oa.choices[0]
    assert choice.finish_reason == "tool_calls"
    tc = (choice.message.tool_calls or [])[0]
    assert tc.type == "function" and tc.function.name == "get_weather"
    assert json.loads(tc.function.arguments) == calls[0].function.arguments
    stream = server.openai().chat.completions.create(
        model=TOOLS_MODEL, messages=ASK, tools=[TOOL], max_tokens=48, temperature=0,  # type: ignore[list-item]
        response_format={"type": "json_schema", "json_schema": {"schema": CALL_SCHEMA}},
        stream=True,
    )  # fmt: skip
    parts = list(stream)
    deltas = [t for p in parts for t in (p.choices[0].delta.tool_calls or []) if p.choices]
    assert deltas and deltas[0].function.name == "get_weather"
    assert parts[-1].choices[0].finish_reason == "tool_calls"

    # the tool's result goes back as a `tool` message; the model answers in text
    follow = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [tc.model_dump()]},
        {"role": "tool", "tool_call_id": tc.id, "content": "12 degrees, sunny"},
    ]
    answer = server.openai().chat.completions.create(
        model=TOOLS_MODEL,
        messages=follow,
        tools=[TOOL],
        max_tokens=8,  # type: ignore[arg-type]
        temperature=0,
    )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    back = client.chat(
        TOOLS_MODEL,
        [
            *ASK,
            whole.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_name": "get_weather", "content": "12 degrees, sunny"},
        ],
        tools=[TOOL],
        options={"num_predict": 8, "temperature": 0},
    )
    assert back.done
