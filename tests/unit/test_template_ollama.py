"""Ollama's template semantics (data, collation, prompt-style turns, fill-in-the-middle),
herd's Go built-ins rendered for a set of conversations, and template selection."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest

from herd.errors import TemplateError
from herd.template import (
    JinjaTemplate,
    Template,
    go_builtin,
    match_builtin,
    parse_template,
    select_template,
)
from herd.template.ollama_data import collate, to_message

TEMPLATES = Path(__file__).parents[1] / "testdata" / "templates"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {"city": {"type": "string", "description": "City name"}},
        },
    },
}
U = {"role": "user", "content": "Hi"}
SYS = {"role": "system", "content": "Be brief."}
CONVERSATIONS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None, Any]] = {
    "user": ([U], None, None),
    "system-user": ([SYS, U], None, None),
    "multi-turn": (
        [
            SYS,
            U,
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?"},
        ],
        None,
        None,
    ),
    "tools": ([{"role": "user", "content": "Weather in Paris?"}], [WEATHER], None),
    "tool-results": (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                ],
            },
            {"role": "tool", "content": "22C", "tool_name": "get_weather"},
        ],
        [WEATHER],
        None,
    ),
    "thinking": (
        [
            U,
            {"role": "assistant", "content": "Hello!", "thinking": "Greet back."},
            {"role": "user", "content": "2+2?"},
        ],
        None,
        True,
    ),
    "no-think": ([U], None, False),
    "images": (
        [{"role": "user", "content": "[img-0]What is this?", "images": ["aGk="]}],
        None,
        None,
    ),
    "continue": ([U, {"role": "assistant", "content": "Hel"}], None, None),
}

# The prompt each built-in renders for each conversation: Ollama's data model and each
# family's documented prompt format, reviewed by hand (tests/testdata/templates/).
EXPECTED: dict[str, dict[str, str]] = json.loads(
    (TEMPLATES / "gotemplate_builtins.json").read_text(encoding="utf-8")
)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", EXPECTED)
def test_builtin_renders(name: str, conversation: str) -> None:
    messages, tools, think = CONVERSATIONS[conversation]
    assert (
        go_builtin(name).execute(messages, tools=tools, think=think) == EXPECTED[name][conversation]
    )


# ---- Ollama's Template.Parse and Execute --------------------------------------------------


@pytest.mark.parametrize(
    "source, variables",
    [
        ("{{ .Prompt }}", ["prompt", "response"]),
        ("{{ .System }} {{ .Prompt }} {{ .Response }}", ["prompt", "response", "system"]),
        ("{{ with .Tools }}{{ . }}{{ end }} {{ .Prompt }}", ["prompt", "response", "tools"]),
        (
            "{{ range .Messages }}{{ .Role }} {{ .Content }}{{ end }}",
            ["content", "messages", "role"],
        ),
        ("{{ range $i, $m := .Messages }}{{ $m.Role }}{{ end }}", ["$m", "messages", "role"]),
    ],
    ids=["prompt", "system-prompt-response", "tools", "messages", "variables"],
)
def test_vars(source: str, variables: list[str]) -> None:
    assert Template.parse(source).vars() == variables


def test_template_without_pipeline_is_rejected_like_ollama() -> None:
    with pytest.raises(TemplateError, match="1:38: undefined template specified"):
        Template.parse('{{ define "x" }}x{{ end }}{{ template "x" }}')


def test_parse_error_has_line_and_column() -> None:
    with pytest.raises(TemplateError) as err:
        Template.parse("{{ range .Messages }}\n{{ .Content }\n{{ end }}")
    assert str(err.value) == 'template: :2:12: unexpected "}" in operand'
    assert (err.value.line, err.value.col) == (2, 12)  # type: ignore[attr-defined]


MISTRAL_LEGACY = "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST] "
CHATML_LEGACY = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
)
MESSAGES_MISTRAL = (
    "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}\n"
    "{{- range .Messages }}\n"
    '{{- if eq .Role "user" }}{{ .Content }}[/INST] {{ else if eq .Role "assistant" }}'
    "{{ .Content }}[INST] {{ end }}\n"
    "{{- end }}"
)
CHAT = [
    {"role": "system", "content": "You are a helpful assistant!"},
    {"role": "user", "content": "Hello friend!"},
    {"role": "assistant", "content": "Hello human!"},
    {"role": "user", "content": "What is your name?"},
]


@pytest.mark.parametrize(
    "source, messages, expected",
    [
        (
            MISTRAL_LEGACY,
            CHAT[1:],
            "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] ",
        ),
        (
            MISTRAL_LEGACY + "{{ .Response }}",
            CHAT,
            "[INST] You are a helpful assistant!\n\nHello friend![/INST] Hello human!"
            "[INST] What is your name?[/INST] ",
        ),
        (
            MESSAGES_MISTRAL,
            CHAT,
            "[INST] You are a helpful assistant!\n\nHello friend![/INST] Hello human!"
            "[INST] What is your name?[/INST] ",
        ),
        (
            CHATML_LEGACY,
            CHAT,
            "<|im_start|>system\nYou are a helpful assistant!<|im_end|>\n"
            "<|im_start|>user\nHello friend!<|im_end|>\n"
            "<|im_start|>assistant\nHello human!<|im_end|>\n"
            "<|im_start|>user\nWhat is your name?<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            "[INST] {{ .Prompt }}[/INST] {{ .Response }}",
            [*CHAT[1:], {"role": "assistant", "content": "My name is"}],
            "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] My name is",
        ),
    ],
    ids=["legacy-no-response", "legacy-response", "messages", "legacy-chatml", "legacy-prefill"],
)
def test_prompt_style_and_messages_templates(
    source: str, messages: list[dict[str, str]], expected: str
) -> None:
    assert Template.parse(source).execute(messages) == expected


def test_fill_in_the_middle() -> None:
    t = Template.parse(
        "{{- if .Suffix }}<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>\n"
        "{{- else }}{{ .Prompt }}\n{{- end }}"
    )
    assert t.execute(prompt="def add(", suffix="return x") == "<PRE> def add( <SUF>return x <MID>"
    assert t.execute([{"role": "user", "content": "hello"}]) == "hello"


def test_collate_merges_consecutive_roles_but_not_tool_results() -> None:
    messages = [
        to_message(m)
        for m in [
            {"role": "system", "content": "A"},
            {"role": "system", "content": "B"},
            {"role": "user", "content": "Hello"},
            {"role": "user", "content": "How are you?"},
            {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
            {"role": "tool", "content": "72F", "tool_name": "get_temperature"},
        ]
    ]
    system, out = collate(messages)
    assert system == "A\n\nB"
    assert [(m.Role, m.Content, m.ToolName) for m in out] == [
        ("system", "A\n\nB", ""),
        ("user", "Hello\n\nHow are you?", ""),
        ("tool", "sunny", "get_weather"),
        ("tool", "72F", "get_temperature"),
    ]
    assert messages[0].Content == "A"  # the caller's messages are not changed


TOOL_CALL = {
    "role": "assistant",
    "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"unit": "c", "city": "<Tokyo>"}}}
    ],
}


@pytest.mark.parametrize(
    "source, expected",
    [
        (
            "{{ range .Messages }}{{ range .ToolCalls }}{{ .Function.Arguments }}{{ end }}"
            "{{ end }}",
            '{"city":"\\u003cTokyo\\u003e","unit":"c"}',
        ),
        (
            "{{ range .Messages }}{{ range .ToolCalls }}{{ range $k, $v := .Function.Arguments }}"
            "{{ $k }}={{ $v }};{{ end }}{{ end }}{{ end }}",
            "city=<Tokyo>;unit=c;",
        ),
        (
            "{{ range .Messages }}{{ end }}{{ range .Tools }}"
            "{{ range $n, $p := .Function.Parameters.Properties }}"
            "{{ $n }}:{{ $p.Type }}:{{ toTypeScriptType $p }};{{ end }}{{ end }}",
            "city:string:string;",
        ),
        (
            "{{ range .Messages }}{{ end }}{{ .Tools }}",
            '[{"type":"function","function":{"name":"get_weather","description":"Current weather'
            ' in a city","parameters":{"type":"object","required":["city"],"properties":{"city":'
            '{"type":"string","description":"City name"}}}}}]',
        ),
        (
            "{{ range .Messages }}{{ end }}{{ range .Tools }}{{ .Function }}{{ end }}",
            '{"name":"get_weather","description":"Current weather in a city","parameters":'
            '{"type":"object","required":["city"],"properties":{"city":{"type":"string",'
            '"description":"City name"}}}}',
        ),
        (
            "{{ range .Messages }}{{ json .Role }}{{ json .ToolCalls }}{{ end }}",
            '"assistant"['
            '{"ID":"","Function":{"Index":0,"Name":"get_weather","Arguments":'
            '{"city":"\\u003cTokyo\\u003e","unit":"c"}}}]',
        ),  # fmt: skip
        ("{{ range .Messages }}{{ end }}{{ .Prompt }}", "<no value>"),
    ],
    ids=[
        "arguments-json",
        "arguments-range",
        "properties",
        "tools",
        "function",
        "json",
        "no-prompt",
    ],
)
def test_template_data(source: str, expected: str) -> None:
    assert Template.parse(source).execute([TOOL_CALL], tools=[WEATHER]) == expected


@pytest.mark.parametrize(
    "think, expected",
    [
        (None, "false||false"),
        (True, "true|medium|true"),
        (False, "false||true"),
        ("high", "true|high|true"),
    ],  # fmt: skip
    ids=["unset", "true", "false", "high"],
)
def test_think_values(think: Any, expected: str) -> None:
    t = Template.parse(
        "{{ range .Messages }}{{ end }}{{ .Think }}|{{ .ThinkLevel }}|{{ .IsThinkSet }}"
    )
    assert t.execute([U], think=think) == expected


def test_dates_and_system() -> None:
    t = Template.parse("{{ range .Messages }}{{ .Role }}:{{ .Content }} {{ end }}{{ currentDate }}")
    today = datetime.date.today().isoformat()
    assert t.execute([U], system="Sys") == f"system:Sys user:Hi {today}"
    assert t.execute([SYS, U], system="Other") == f"system:Be brief. user:Hi {today}"
    assert t.execute(prompt="Q", response="A") == f"user:Q assistant:A {today}"


def test_execution_error_is_template_error() -> None:
    with pytest.raises(TemplateError, match=r"template: :1:\d+: executing .* can't evaluate field"):
        Template.parse("{{ range .Messages }}{{ .Nope }}{{ end }}").execute([U])


# ---- selection -------------------------------------------------------------------------------

SMOLLM2 = (TEMPLATES / "smollm2.jinja").read_text(encoding="utf-8")
GEMMA3_JINJA = (Path(__file__).parents[2] / "src/herd/template/builtin/gemma3.jinja").read_text()
CHATML_JINJA = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
PHI3_JINJA = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@pytest.mark.parametrize(
    "jinja, expected",
    [
        (CHATML_JINJA, "chatml"),
        (LLAMA3_JINJA, "llama3"),
        (PHI3_JINJA, "phi3"),
        (GEMMA3_JINJA, "gemma3"),
        (SMOLLM2, None),
        ("{{ messages[0]['content'] }}", None),
    ],  # fmt: skip
    ids=["chatml", "llama3", "phi3", "gemma3", "smollm2-default-system", "unknown"],
)
def test_match_builtin(jinja: str, expected: str | None) -> None:
    assert match_builtin(jinja) == expected


@pytest.mark.parametrize(
    "kv, override, kind, start",
    [
        ({}, "{{ range .Messages }}{{ .Content }}{{ end }}", "go", "Hi"),
        ({}, "{% for m in messages %}{{ m.content }}{% endfor %}", "jinja", "Hi"),
        ({}, "{{ messages[0].content }}", "jinja", "Hi"),
        ({"tokenizer.chat_template": CHATML_JINJA}, None, "go", "<|im_start|>user"),
        ({"tokenizer.chat_template": SMOLLM2}, None, "jinja", "<|im_start|>system"),
        ({"general.architecture": "gemma3"}, None, "go", "<start_of_turn>user"),
    ],
    ids=["go-override", "jinja-override", "jinja-expression", "gguf-chatml", "gguf-jinja", "arch"],
)
def test_select_template(kv: dict[str, Any], override: str | None, kind: str, start: str) -> None:
    template = select_template(kv, override)
    assert template is not None
    assert isinstance(template, Template if kind == "go" else JinjaTemplate)
    assert template.render([U]).startswith(start)


def test_parse_template_reports_the_go_error() -> None:
    with pytest.raises(TemplateError, match="unclosed action"):
        parse_template("{{ .Prompt ")


def test_builtins_carry_stop_strings() -> None:
    assert go_builtin("llama3").stop == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
