"""Chat templates: parity with transformers' rendering, herd's Gemma 3 built-in, and failures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from herd.errors import TemplateError
from herd.template import JinjaTemplate, builtin, select_template

TEMPLATES = Path(__file__).parents[1] / "testdata" / "templates"
SMOLLM2 = (TEMPLATES / "smollm2.jinja").read_text(encoding="utf-8")

# Exercises what transformers sets up: trim_blocks/lstrip_blocks on indented block tags,
# namespace, loop controls, its tojson (no HTML escaping), {% generation %}, dropped None keys.
FEATURES = """\
{%- set ns = namespace(n=0) %}
{% if tools %}
Tools: {{ tools | tojson(indent=2) }}
{% endif %}
{% for m in messages %}
    {% if m.role == 'system' %}
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
<{{ m.role }} n={{ ns.n }}{% if 'tool_calls' in m %} calls{% endif %}>
    {% if m.content is string %}
{{ m.content | tojson }}
    {% endif %}
    {% if m.role == 'assistant' %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endif %}
</{{ m.role }}>
{% endfor %}
{{ bos_token }}|{{ eos_token }}
{% if add_generation_prompt %}<assistant>{% endif %}
"""

USER = [{"role": "user", "content": "Hello <b>é</b>"}]
SYSTEM_USER = [{"role": "system", "content": "You are terse."}, *USER]
MULTI_TURN = [
    *SYSTEM_USER,
    {"role": "assistant", "content": "Hi.", "tool_calls": None},
    {"role": "user", "content": "Tell me\na joke."},
]
CONVERSATIONS = {"user": USER, "system-user": SYSTEM_USER, "multi-turn": MULTI_TURN}
TOOLS = [
    {"type": "function", "function": {"name": "now", "description": "<time>", "parameters": {}}}
]


@pytest.fixture(scope="module")
def hf_tokenizer() -> Any:
    """The smallest tokenizer transformers accepts: apply_chat_template lives on it."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    model = tokenizers.models.WordLevel(vocab, unk_token="<unk>")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(model), bos_token="<s>", eos_token="</s>"
    )


@pytest.mark.parametrize("gen", [True, False], ids=["gen", "nogen"])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("source", [SMOLLM2, FEATURES], ids=["smollm2", "features"])
def test_renders_like_transformers(
    hf_tokenizer: Any, source: str, conversation: str, gen: bool
) -> None:
    messages = CONVERSATIONS[conversation]
    tools = TOOLS if conversation == "multi-turn" else None
    expected = hf_tokenizer.apply_chat_template(
        messages, chat_template=source, tools=tools, add_generation_prompt=gen, tokenize=False
    )
    got = JinjaTemplate(source).render(
        messages, add_generation_prompt=gen, tools=tools, bos_token="<s>", eos_token="</s>"
    )
    assert got == expected


def test_smollm2_literal() -> None:
    got = JinjaTemplate(SMOLLM2).render(USER)
    assert got == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHello <b>é</b><|im_end|>\n<|im_start|>assistant\n"
    )


# --- Gemma 3 built-in ----------------------------------------------------------------------

BOS = "<bos>"
GEMMA_CASES = [
    (USER, True, "<bos><start_of_turn>user\nHello <b>é</b><end_of_turn>\n<start_of_turn>model\n"),
    (USER, False, "<bos><start_of_turn>user\nHello <b>é</b><end_of_turn>\n"),
    (
        SYSTEM_USER,
        True,
        "<bos><start_of_turn>user\nYou are terse.\n\nHello <b>é</b><end_of_turn>\n"
        "<start_of_turn>model\n",
    ),
    (
        MULTI_TURN,
        True,
        "<bos><start_of_turn>user\nYou are terse.\n\nHello <b>é</b><end_of_turn>\n"
        "<start_of_turn>model\nHi.<end_of_turn>\n"
        "<start_of_turn>user\nTell me\na joke.<end_of_turn>\n<start_of_turn>model\n",
    ),
    (
        [{"role": "user", "content": "  padded \n"}],
        False,
        "<bos><start_of_turn>user\npadded<end_of_turn>\n",
    ),
    (
        [{"role": "system", "content": "Only system."}],
        True,
        "<bos><start_of_turn>user\nOnly system.<end_of_turn>\n<start_of_turn>model\n",
    ),
    (
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        True,
        "<bos><start_of_turn>user\n<start_of_image>What is it?<end_of_turn>\n"
        "<start_of_turn>model\n",
    ),
]


@pytest.mark.parametrize(
    "messages, gen, expected",
    GEMMA_CASES,
    ids=["user", "user-nogen", "system-user", "multi-turn", "trimmed", "system-only", "image"],
)
def test_gemma3_builtin(messages: list[dict], gen: bool, expected: str) -> None:
    assert builtin("gemma3").render(messages, add_generation_prompt=gen, bos_token=BOS) == expected


@pytest.mark.parametrize(
    "kv, override, expected",
    [
        ({"tokenizer.chat_template": SMOLLM2}, "{{ 'override' }}", "override"),
        (
            {"tokenizer.chat_template": SMOLLM2, "general.architecture": "gemma3"},
            None,
            "<|im_start|>",
        ),
        ({"general.architecture": "gemma3"}, None, "<start_of_turn>"),
        ({"general.architecture": "llama"}, None, None),
        ({}, None, None),
    ],
    ids=["override", "gguf", "builtin", "none", "empty"],
)
def test_select_template(kv: dict, override: str | None, expected: str | None) -> None:
    template = select_template(kv, override)
    if expected is None:
        assert template is None
    else:
        assert template is not None and template.render(USER).startswith(expected)


# --- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, line",
    [
        ("{% for m in messages %}\n{{ m.content }\n{% endfor %}", 2),
        ("line one\n\n{% if messages %}\nunclosed", 4),
        ("{% frobnicate %}", 1),
    ],
    ids=["bad-expression", "unclosed-block", "unknown-tag"],
)
def test_parse_error_names_the_line(source: str, line: int) -> None:
    with pytest.raises(TemplateError, match=f"line {line}"):
        JinjaTemplate(source)


@pytest.mark.parametrize(
    "source, line, match",
    [
        ("one\ntwo\n{{ raise_exception('roles must alternate') }}", 3, "roles must alternate"),
        ("{{ messages[0].content.nope() }}", 1, "nope"),
        ("ok\n{{ messages.append(1) }}", 2, "unsafe"),
        ("{{ ''.__class__.__mro__ }}", 1, "unsafe"),
        ("{{ 1 // 0 }}", 1, "division"),
        ("{% set ns = namespace(_x=1) %}", 1, "_x"),
    ],
    ids=["raise_exception", "undefined-call", "mutation", "dunder", "zero-division", "namespace"],
)
def test_render_error_names_the_line(source: str, line: int, match: str) -> None:
    template = JinjaTemplate(source)
    with pytest.raises(TemplateError, match=match) as err:
        template.render(USER)
    assert f"line {line}" in str(err.value)
    assert err.value.__cause__ is None  # no jinja traceback chained behind it


@pytest.mark.parametrize(
    "source",
    [
        "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",  # output bound
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{{ 'x' * 10 ** 10 }}",
        "{{ [0] * 10 ** 9 }}",
        "{{ 7 ** (10 ** 9) }}",
        "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    ],
    ids=["output", "nested-ranges", "string-repeat", "list-repeat", "power", "recursion"],
)
def test_runaway_templates_stop(source: str) -> None:
    with pytest.raises(TemplateError):
        JinjaTemplate(source, max_output=1_000_000).render(USER)


def test_messages_are_not_mutated() -> None:
    messages = [{"role": "user", "content": "hi", "tool_calls": None}]
    JinjaTemplate("{{ messages | length }}").render(messages)
    assert messages == [{"role": "user", "content": "hi", "tool_calls": None}]


# Each makes a string or list far larger than the template and its inputs; the bound must
# refuse it before allocating (a MemoryError caught afterwards would say "MemoryError").
GROWTH = {
    "tilde-doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "plus-doubling": "{% set ns = namespace(s=['x']) %}{% for i in range(64) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "center": "{{ 'x'|center(10**12) }}",
    "ljust": "{{ 'x'.ljust(10**12) }}",
    "percent-width": "{{ '%999999999999s' % 'x' }}",
    "percent-star": "{{ '%*s' % (10**12, 'x') }}",
    "format-width": "{{ '{:>{w}}'.format(1, w=10**12) }}",
    "format-filter": "{{ '%999999999999s'|format('x') }}",
    "replace": "{% set s = 'x' * 100000 %}{{ s|replace('x', s) }}",
    "join": "{% set s = 'x' * 100000 %}{{ range(100000)|join(s) }}",
    "str-join": "{% set s = 'x' * 100000 %}{{ s.join(range(100000)|map('string')) }}",
    "indent": "{{ ('\n' * 100000)|indent(100000) }}",
    "expandtabs": "{{ ('\t' * 100000).expandtabs(100000) }}",
    "tojson-indent": "{{ [[[[[1]]]]]|tojson(indent=10**9) }}",
    "lipsum": "{{ lipsum(10**9) }}",
}


@pytest.mark.parametrize("source", GROWTH.values(), ids=GROWTH.keys())
def test_growth_is_refused_before_it_allocates(source: str) -> None:
    with pytest.raises(TemplateError, match="result too large"):
        JinjaTemplate(source).render(USER)


def test_bounded_operations_render_as_jinja_does() -> None:
    """The checked operators, methods and filters give what Jinja's own sandbox gives."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    source = (
        "{{ 'a' ~ 'b' }} {{ [1] + [2] }} {{ '%d-%s' % (3, 'x') }} {{ 'x'|center(5) }}|"
        "{{ '{}!'.format('hi') }} {{ ['a', 'b']|join(', ') }} {{ '%5.2f'|format(3.14159) }} "
        "{{ 'ab'|replace('a', 'z') }} {{ 'a\nb'|indent(2) }} {{ 3 % 2 }} {{ 2 ** 3 }} "
        "{{ 'a b'.split()|join('-') }} {{ [{'n': 'q'}, {'n': 'r'}]|join(',', attribute='n') }} "
        "{{ 'x'.rjust(3, '.') }} {{ '{:>{w}}'.format(1, w=4) }} {{ 'q'.join(['1', '2']) }}"
    )
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    assert JinjaTemplate(source).render(USER) == plain.from_string(source).render()
