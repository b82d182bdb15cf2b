"""Model output -> thinking, content and tool calls: formats inferred from each template,
canned outputs streamed in every chunking give the same result as in one piece."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from herd.template import Template, go_builtin
from herd.template.infer import infer_thinking_tags, infer_tool_call_tag, infer_tool_format
from herd.template.parsers import OutputParser
from herd.template.thinking import ThinkingParser
from herd.template.toolcalls import ToolCallParser

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
GET = {"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}
TOOLS = [WEATHER, GET]


def chunkings(text: str) -> Iterator[list[str]]:
    """Every fixed chunk size, and every split into two pieces."""
    for size in range(1, len(text) + 1):
        yield [text[i : i + size] for i in range(0, len(text), size)]
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


def run(parser: OutputParser, pieces: list[str]) -> tuple[str, str, list[tuple[str, Any]]]:
    content, thinking, calls = [], [], []
    for i, piece in enumerate(pieces):
        out = parser.add(piece, done=i == len(pieces) - 1)
        content.append(out.content)
        thinking.append(out.thinking)
        calls += [(c["function"]["name"], c["function"]["arguments"]) for c in out.tool_calls]
    return "".join(content), "".join(thinking), calls


@pytest.mark.parametrize(
    "name, thinking_tags, tag, fmt",
    [
        ("chatml", ("", ""), "{", "json"),
        ("llama3", ("", ""), "{", "json"),
        ("mistral", ("", ""), "[TOOL_CALLS]", "json"),
        ("qwen2.5", ("", ""), "<tool_call>", "json"),
        ("qwen3", ("<think>", "</think>"), "<tool_call>", "json"),
        ("gemma3", ("", ""), "{", "json"),
        ("phi3", ("", ""), "{", "json"),
    ],
)
def test_inferred_formats(name: str, thinking_tags: tuple[str, str], tag: str, fmt: str) -> None:
    t = go_builtin(name)
    assert infer_thinking_tags(t) == thinking_tags
    assert infer_tool_call_tag(t) == tag
    assert infer_tool_format(t) == fmt


def test_inference_follows_ollamas_rules() -> None:
    t = Template.parse(
        "{{ range .Messages }}{{ if .Thinking }}<reason>{{ .Thinking }}</reason>{{ end }}"
        "{{ if .ToolCalls }}\n[CALLS]{{ range .ToolCalls }}{{ json . }}{{ end }}{{ end }}{{ end }}"
    )
    assert infer_thinking_tags(t) == ("<reason>", "</reason>")
    assert infer_tool_call_tag(t) == "[CALLS]"
    pythonic = Template.parse("Respond as [func_name1(params_name1=params_value1)]{{ .Prompt }}")
    assert infer_tool_format(pythonic) == "pythonic"


THINKING = [
    ("<think>\nLet me see.\n</think>\n\nIt is 4.", "Let me see.\n", "It is 4."),
    ("  <think>a</think>b", "a", "b"),
    ("No thinking here.", "", "No thinking here."),
    ("<think>unfinished", "unfinished", ""),
    ("<thi", "", "<thi"),
    ("<think></think>", "", ""),
]


@pytest.mark.parametrize("output, thinking, content", THINKING, ids=range(len(THINKING)))
def test_thinking_in_every_chunking(output: str, thinking: str, content: str) -> None:
    for pieces in chunkings(output):
        parser = OutputParser(go_builtin("qwen3"), think=True)
        assert run(parser, pieces)[:2] == (content, thinking), pieces


def test_thinking_opened_by_the_prompt() -> None:
    parser = OutputParser(
        go_builtin("qwen3"), think=True, prompt="<|im_start|>assistant\n<think>\n"
    )
    assert run(parser, ["Hmm.", "</think>", "\n\nYes."])[:2] == ("Yes.", "Hmm.")


def test_thinking_off_leaves_tags_in_content() -> None:
    parser = OutputParser(go_builtin("qwen3"), think=False)
    assert run(parser, ["<think>x</think>y"])[:2] == ("<think>x</think>y", "")


def test_thinking_parser_holds_back_partial_closing_tag() -> None:
    p = ThinkingParser()
    assert p.add("<think>abc</th") == ("abc", "")
    assert p.add("ink>done") == ("", "done")


# (template, model output, expected content, expected calls)
ROUND_TRIPS = [
    (
        "qwen3",
        'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
        "\n</tool_call>\n"
        '<tool_call>\n{"name": "get", "arguments": {}}\n</tool_call>',
        "Checking.",
        [("get_weather", {"city": "Paris"}), ("get", {})],
    ),
    (
        "qwen2.5",
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}'
        "\n</tool_call>",
        "",
        [("get_weather", {"city": "Oslo"})],
    ),
    (
        "llama3",
        '{"name": "get_weather", "parameters": {"city": "Rome"}}',
        "",
        [("get_weather", {"city": "Rome"})],
    ),
    (
        "llama3",
        'The answer is {"name": "get_weather"} in JSON.',
        'The answer is {"name": "get_weather"} in JSON.',
        [],
    ),
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Lima"}}, '
        '{"name": "get", "arguments": {}}]',
        "",
        [("get_weather", {"city": "Lima"}), ("get", {})],
    ),
    ("qwen3", "No call, just <b>text</b>.", "No call, just <b>text</b>.", []),
    ("qwen3", "Almost a <tool", "Almost a <tool", []),
]


@pytest.mark.parametrize(
    "name, output, content, calls",
    ROUND_TRIPS,
    ids=[f"{r[0]}-{i}" for i, r in enumerate(ROUND_TRIPS)],
)
def test_tool_calls_round_trip(
    name: str, output: str, content: str, calls: list[tuple[str, Any]]
) -> None:
    template = go_builtin(name)
    prompt = template.execute([{"role": "user", "content": "Weather?"}], tools=TOOLS)
    assert "get_weather" in prompt  # the family's prompt lists the tools
    for pieces in chunkings(output):
        got = run(OutputParser(template, tools=TOOLS), pieces)
        assert (got[0], got[2]) == (content, calls), pieces


def test_rendered_calls_parse_back() -> None:
    """What a template writes for an assistant's calls is what its parser reads."""
    call = {"function": {"name": "get_weather", "arguments": {"city": "Bern"}}}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [call]},
    ]
    for name in ("qwen2.5", "qwen3", "llama3", "mistral"):
        t = go_builtin(name)
        rendered = t.execute(messages, tools=TOOLS)
        tag = infer_tool_call_tag(t)
        start = rendered.rfind('{"name"' if tag == "{" else tag)
        got = run(OutputParser(t, tools=TOOLS), [rendered[start:]])
        assert got[2] == [("get_weather", {"city": "Bern"})], name


def test_pythonic_calls() -> None:
    output = '[get_weather(city="Oslo"), get()] done'
    for pieces in chunkings(output):
        p = ToolCallParser(TOOLS, fmt="pythonic")
        content, calls = "", []
        for piece in pieces:
            c, text = p.add(piece)
            calls += [(x["function"]["name"], x["function"]["arguments"]) for x in c]
            content += text
        assert calls == [("get_weather", {"city": "Oslo"}), ("get", {})]
        assert content == " done"


def test_call_ids_and_indexes() -> None:
    p = ToolCallParser(TOOLS, "<tool_call>")
    calls, _ = p.add('<tool_call>{"name": "get", "arguments": {}}<tool_call>{"name": "get"}')
    assert [c["function"]["index"] for c in calls] == [0, 1]
    assert all(c["id"].startswith("call_") and len(c["id"]) == 13 for c in calls)
