"""What clients read besides the answer, against `herd serve` with the official `ollama` and
`openai` clients: honest token counts (the whole prompt, the cached part said apart),
`_debug_render_only`, the 400s of over-long embedding inputs, `/api/version`, Modelfile
RENDERER/PARSER through `/api/create`, and a built-in model that takes tools."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from herd.gguf import open_gguf
from herd.store import Store, resolve_or_pull
from herd.template import JinjaTemplate
from integration.test_server import FAST, MODEL, Server, _start, ollama, openai

pytestmark = pytest.mark.slow

EMBED = "all-minilm:l6-v2"  # in the test store; context 512 tokens
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city"}},
            "required": ["city"],
        },
    },
}


def _call(city: str) -> dict:
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": city}}}],
    }


# two worked turns, so that a 135M model answers the next question with a call
FEW_SHOT = [
    {"role": "user", "content": "What is the weather in Paris?"},
    _call("Paris"),
    {"role": "user", "content": "What is the weather in Rome?"},
    _call("Rome"),
    {"role": "user", "content": "What is the weather in London?"},
]
GREEDY = {"temperature": 0, "num_predict": 40}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, test_store: object
) -> Iterator[Server]:
    # the embedding tests' model, pulled here: run alone, this module found it missing
    # (404) wherever no earlier test had pulled it into the store
    resolve_or_pull(EMBED, store=test_store)  # type: ignore[arg-type]
    yield from _start(tmp_path_factory.mktemp("clients"), test_store, {})


def _jinja_prompt(server: Server, messages: list[dict]) -> str:
    """The prompt the GGUF's own Jinja chat template gives: an oracle for what herd renders."""
    ref = Store(server.store).resolve(MODEL)
    source = open_gguf(ref.model_path).kv["tokenizer.chat_template"]
    return JinjaTemplate(source).render(messages, add_generation_prompt=True)


# ---------------------------------------------------------------- token counts
def test_repeated_prompt_reports_the_whole_prompt_and_its_cached_part(server: Server) -> None:
    client = server.openai()
    # a system message no other test sends: nothing of it is cached before the first request
    messages = [
        {"role": "system", "content": "You are Quillon, a cartographer of imaginary seas."},
        {"role": "user", "content": "Name one sea on your latest map."},
    ]
    first = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0
    )
    again = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0
    )
    assert first.usage is not None and again.usage is not None
    whole = first.usage.prompt_tokens
    assert whole > 20  # the whole templated prompt, not only what was computed
    assert again.usage.prompt_tokens == whole
    assert again.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details is not None
    # all but the last prompt token came from the cache the second time
    assert again.usage.prompt_tokens_details.cached_tokens == whole - 1
    assert first.usage.prompt_tokens_details.cached_tokens < whole // 2
    assert again.usage.total_tokens == whole + again.usage.completion_tokens
    # streamed, the usage chunk says the same
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage for c in stream if c.usage is not None]
    assert len(usage) == 1 and usage[0].prompt_tokens == whole
    assert usage[0].prompt_tokens_details.cached_tokens == whole - 1
    # Ollama's API: prompt_eval_count is the whole prompt, cached or not
    chat = server.ollama().chat(MODEL, messages, options={**FAST, "num_predict": 4})
    assert chat.prompt_eval_count == whole


# ---------------------------------------------------------------- _debug_render_only
def test_debug_render_only_answers_the_prompt_without_generating(server: Server) -> None:
    messages = [{"role": "user", "content": "Why is the sea salty?"}]
    expected = _jinja_prompt(server, messages)
    chat = httpx.post(
        f"{server.url}/api/chat",
        json={"model": MODEL, "messages": messages, "_debug_render_only": True},
        timeout=120,
    ).json()
    assert chat["_debug_info"] == {"rendered_template": expected}  # image_count 0: omitted
    assert chat["message"] == {"role": "", "content": ""} and chat["done"] is False
    assert "eval_count" not in chat
    generate = httpx.post(
        f"{server.url}/api/generate",
        json={
            "model": MODEL,
            "prompt": "Why is the sea salty?",
            "system": "Answer in one line.",
            "_debug_render_only": True,
            "stream": True,
        },
        timeout=120,
    ).json()
    with_system = [{"role": "system", "content": "Answer in one line."}, *messages]
    assert generate["_debug_info"]["rendered_template"] == _jinja_prompt(server, with_system)
    assert generate["response"] == "" and generate["done"] is False
    # tools are rendered into the prompt
    tools = httpx.post(
        f"{server.url}/api/chat",
        json={"model": MODEL, "messages": messages, "tools": [WEATHER], "_debug_render_only": True},
        timeout=120,
    ).json()
    rendered = tools["_debug_info"]["rendered_template"]
    assert "<tools>" in rendered and '"name":"get_weather"' in rendered
    # OpenAI's route, as Ollama's middleware passes it on: an empty completion + _debug_info
    raw = (
        server.openai()
        .chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, extra_body={"_debug_render_only": True}
        )
        .http_response.json()
    )
    assert raw["_debug_info"] == {"rendered_template": expected}
    assert raw["usage"]["completion_tokens"] == 0


# ---------------------------------------------------------------- 400s and version
def test_over_long_embedding_input_with_truncate_false_is_a_400(server: Server) -> None:
    long = "the quick brown fox jumps over the lazy dog " * 80  # ~720 tokens > 512
    client = server.ollama()
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model=EMBED, input=long, truncate=False)
    assert e.value.status_code == 400 and "exceeds the context length" in str(e.value.error)
    # truncated by default, as Ollama does
    assert len(client.embed(model=EMBED, input=long).embeddings[0]) == 384
    # the OpenAI route has no truncate field: Ollama's default (truncate) holds
    vectors = server.openai().embeddings.create(model=EMBED, input=[long, "short"])
    assert [len(d.embedding) for d in vectors.data] == [384, 384]
    assert httpx.get(server.url).status_code == 200  # still serving


def test_version_is_ollamas_with_herds_own_beside_it(server: Server) -> None:
    import herd

    version = httpx.get(f"{server.url}/api/version").json()
    assert version == {"version": "0.33.0-rc2", "herd_version": herd.__version__}


# ---------------------------------------------------------------- RENDERER / PARSER
def test_create_takes_parsers_herd_has_and_refuses_the_others(server: Server) -> None:
    bad = httpx.post(
        f"{server.url}/api/create",
        json={"model": "coder:1", "from": MODEL, "renderer": "qwen3-coder"},
        timeout=60,
    )
    assert (
        bad.status_code == 400 and "RENDERER 'qwen3-coder' is not supported" in bad.json()["error"]
    )
    bad = httpx.post(
        f"{server.url}/api/create",
        json={"model": "coder:1", "from": MODEL, "parser": "qwen3-coder"},
        timeout=60,
    )
    assert bad.status_code == 400
    assert "qwen3-coder" in bad.json()["error"] and "qwen3-thinking" in bad.json()["error"]
    good = httpx.post(
        f"{server.url}/api/create",
        json={"model": "parsed:1", "from": MODEL, "parser": "qwen3", "stream": False},
        timeout=60,
    )
    assert good.status_code == 200, good.text
    shown = server.ollama().show("parsed:1")
    assert "thinking" in shown.capabilities and "PARSER qwen3" in shown.modelfile
    server.ollama().delete("parsed:1")


# ---------------------------------------------------------------- a built-in model with tools
def test_builtin_model_answers_tools_with_a_parsed_call(server: Server) -> None:
    client = server.ollama()
    assert "tools" in client.show(MODEL).capabilities
    answer = client.chat(MODEL, FEW_SHOT, tools=[WEATHER], options=GREEDY)
    calls = answer.message.tool_calls
    assert calls, answer.message.content
    assert calls[0].function.name == "get_weather"
    assert dict(calls[0].function.arguments) == {"city": "London"}
    # the OpenAI SDK: the same call, arguments as a JSON string, finish_reason tool_calls
    openai_messages = []
    for i, m in enumerate(FEW_SHOT):
        if m.get("tool_calls"):
            fn = m["tool_calls"][0]["function"]
            call = {"name": fn["name"], "arguments": json.dumps(fn["arguments"])}
            tool_call = {"id": f"call_{i}", "type": "function", "function": call}
            openai_messages.append({"role": "assistant", "content": "", "tool_calls": [tool_call]})
        else:
            openai_messages.append(m)
    completion = server.openai().chat.completions.create(
        model=MODEL, messages=openai_messages, tools=[WEATHER], temperature=0, max_tokens=40
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "London"}
    # a model without tools in its template still says so, in Ollama's words
    with pytest.raises(openai.BadRequestError) as e:
        server.openai().chat.completions.create(
            model=EMBED, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER]
        )
    assert e.value.status_code == 400
