"""Modelfile RENDERER and PARSER (refused or taken at create, the named parser used at run
time), the cached prompt count of the runner, and the built-in smollm2 template layer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _store_helpers import write_gguf
from test_runner import GREEDY, PROMPTS, make_runner, run

from herd.errors import CapabilityError, ModelfileError
from herd.modelfile import parse
from herd.runner.pipeline import _parser, finish
from herd.runner.sequence import Event
from herd.store import Store
from herd.store.catalog import CATALOG
from herd.store.create import create
from herd.store.facts import load_facts
from herd.template import JinjaTemplate, parse_template
from herd.template.infer import template_capabilities
from herd.template.parsers import NAMED, OutputParser
from herd.template.select import PROBES

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    write_gguf(tmp_path / "tiny.gguf", template=None)
    return tmp_path


# ---- create --------------------------------------------------------------------------------
def test_parser_herd_has_is_stored_and_gives_its_capabilities(src: Path) -> None:
    store = Store(src / "models")
    create(store, "plain:1", parse("FROM ./tiny.gguf"), base_dir=src)
    assert load_facts("plain:1", store).capabilities == ["completion"]
    create(store, "q:1", parse("FROM ./tiny.gguf\nPARSER qwen3"), base_dir=src)
    facts = load_facts("q:1", store)
    assert facts.config["parser"] == "qwen3"
    assert facts.capabilities == ["completion", "tools", "thinking"]
    # a model made FROM it inherits the parser, as Ollama's create does
    create(store, "child:1", parse("FROM q:1\nSYSTEM terse"), base_dir=src)
    assert load_facts("child:1", store).config["parser"] == "qwen3"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("PARSER qwen3-coder", "'qwen3-coder'"),
        ("PARSER harmony", "'harmony'"),
        ("RENDERER qwen3-coder", "'qwen3-coder'"),
        ("RENDERER gemma4", "'gemma4'"),
    ],
)
def test_unsupported_renderer_or_parser_is_refused_before_writing(
    src: Path, text: str, named: str
) -> None:
    store = Store(src / "models")
    with pytest.raises(ModelfileError) as info:
        create(store, "x:1", parse(f"FROM ./tiny.gguf\n{text}"), base_dir=src)
    message = str(info.value)
    assert named in message and "not supported" in message
    assert "supported parsers: passthrough, qwen3, qwen3-thinking" in message or (
        "RENDERER" in text and "TEMPLATE" in message
    )
    assert info.value.line == 2  # points at the directive
    assert not store.blobs_dir.exists() or not any(store.blobs_dir.iterdir())
    assert list(store.names()) == []


# ---- the named parser at run time ------------------------------------------------------------
def test_named_parser_reads_thinking_and_tool_calls_without_template_help() -> None:
    template = parse_template("{{ range .Messages }}{{ .Content }}{{ end }}")  # no tools
    with pytest.raises(CapabilityError, match="does not support tools"):
        _parser("m", template, TOOLS, None, "")
    parser = _parser("m", template, TOOLS, True, "", "qwen3-thinking")
    assert isinstance(parser, OutputParser)
    out = parser.add('weighing it</think>Here.<tool_call>{"name": "get_weather", ', False)
    rest = parser.add('"arguments": {"city": "Oslo"}}</tool_call>', True)
    assert out.thinking == "weighing it" and out.content + rest.content == "Here."
    calls = out.tool_calls + rest.tool_calls
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("get_weather", {"city": "Oslo"})
    ]
    # passthrough: the template decides again (no tools here)
    with pytest.raises(CapabilityError, match="does not support thinking"):
        _parser("m", template, None, True, "", "passthrough")
    assert set(NAMED) == {"passthrough", "qwen3", "qwen3-thinking"}


# ---- cached prompt tokens ------------------------------------------------------------------
def test_final_event_says_how_much_of_the_prompt_came_from_the_cache(tiny_llama_path) -> None:
    runner = make_runner(tiny_llama_path)
    first, _ = run(runner, PROMPTS[0])
    assert (first.prompt_eval_count, first.prompt_cached_count) == (len(PROMPTS[0]), 0)
    again, _ = run(runner, PROMPTS[0])  # the same prompt: all but its last token reused
    assert (again.prompt_eval_count, again.prompt_cached_count) == (1, len(PROMPTS[0]) - 1)
    longer = PROMPTS[0] + [40, 41]
    third, _ = run(runner, longer)
    assert third.prompt_eval_count + third.prompt_cached_count == len(longer)
    assert third.prompt_cached_count >= len(PROMPTS[0]) - 1


def test_finish_reports_the_whole_prompt_as_ollama_does() -> None:
    from herd.runner.pipeline import Prepared

    prepared = Prepared([1, 2, 3, 4, 5], GREEDY, None, None, "text")
    event = Event(done=True, done_reason="stop", prompt_eval_count=2, prompt_cached_count=3)
    out = finish(prepared, event)
    assert (out["prompt_eval_count"], out["prompt_cached_count"]) == (5, 3)


# ---- the built-in smollm2 template layer -----------------------------------------------------
def test_smollm2_template_layer_has_tools_and_renders_as_its_gguf_template(
    smollm2_path: Path,
) -> None:
    from herd.gguf import open_gguf

    text = CATALOG["smollm2:135m"].template_text()
    assert text is not None
    assert template_capabilities(text) == ("tools",)
    go = parse_template(text)
    jinja = JinjaTemplate(open_gguf(smollm2_path).kv["tokenizer.chat_template"])
    for messages in PROBES:  # without tools: exactly the GGUF's own prompt
        assert go.render(messages, add_generation_prompt=True) == jinja.render(
            messages, add_generation_prompt=True
        )
    with_tools = go.render(PROBES[0], add_generation_prompt=True, tools=TOOLS)
    assert "<tools>" in with_tools and '"get_weather"' in with_tools


def test_an_older_store_gains_the_template_layer(smollm2_path: Path, tmp_path: Path) -> None:
    """A store pulled before the entry had a template: resolving it adds the layer (the
    model blob is the one the store has, nothing is downloaded)."""
    from herd.store.layout import MEDIA_MODEL, Layer
    from herd.store.pull import resolve_or_pull

    store = Store(tmp_path / "models")
    store.blobs_dir.mkdir(parents=True)
    entry = CATALOG["smollm2:135m"]
    digest = f"sha256:{entry.sha256}"
    try:
        store.blob_path(digest).hardlink_to(smollm2_path)
    except OSError:  # another device
        shutil.copy(smollm2_path, store.blob_path(digest))
    store.write_model("smollm2:135m", Layer(MEDIA_MODEL, digest, entry.size), params=entry.params)
    assert store.resolve("smollm2:135m").template is None  # as an old pull left it
    ref = resolve_or_pull("smollm2:135m", store=store)
    assert ref.template == entry.template_text() and ref.params == entry.params
    assert "tools" in load_facts("smollm2:135m", store).capabilities
    # a model the user built with a template of their own is left alone
    store.write_model(
        "smollm2:135m", Layer(MEDIA_MODEL, digest, entry.size), template="{{ .Prompt }}"
    )
    assert resolve_or_pull("smollm2:135m", store=store).template == "{{ .Prompt }}"
