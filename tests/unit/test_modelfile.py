"""Modelfile parsing: Ollama's directives, values and errors (with line and column)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from herd.errors import ModelfileError
from herd.modelfile import parse, quote, read, resolve_source
from herd.store.layout import go_json

# (text, what to read off the result, expected)
PARSES: list[tuple[str, str, Any]] = [
    ("FROM llama3", "from", "llama3"),
    ("from llama3\n", "from", "llama3"),
    ("  FrOm   ./m.gguf  \n", "from", "./m.gguf"),
    ("# comment\n\nFROM m\n# another", "from", "m"),
    ("\ufeffFROM m", "from", "m"),
    ("FROM m\r\nSYSTEM hi\r\n", "system", "hi"),
    ('FROM m\nSYSTEM You are "terse".', "system", 'You are "terse".'),
    ('FROM m\nSYSTEM "quoted"', "system", "quoted"),
    ('FROM m\nSYSTEM ""', "system", ""),
    (
        'FROM m\nTEMPLATE """{{ .System }}\n\n{{ .Prompt }}"""',
        "template",
        "{{ .System }}\n\n{{ .Prompt }}",
    ),
    ('FROM m\nTEMPLATE """\n  indented\n"""   \nSYSTEM s', "template", "\n  indented\n"),
    ('FROM m\nSYSTEM "two\nlines"', "system", "two\nlines"),
    ("FROM m\nSYSTEM a\nSYSTEM b", "system", "b"),
    ('FROM m\nLICENSE MIT\nlicense """Apache\n2.0"""', "licenses", ["MIT", "Apache\n2.0"]),
    ("FROM m\nPARAMETER temperature 0.7", "parameters", {"temperature": 0.7}),
    ("FROM m\nPARAMETER top_p 0.123456789", "parameters", {"top_p": 0.12345679}),
    (
        "FROM m\nPARAMETER num_ctx 4096\nPARAMETER seed -1",
        "parameters",
        {"num_ctx": 4096, "seed": -1},
    ),
    (
        "FROM m\nPARAMETER use_mmap false\nPARAMETER temperature 1",
        "parameters",
        {"use_mmap": False, "temperature": 1.0},
    ),
    (
        'FROM m\nPARAMETER stop <|im_end|>\nPARAMETER stop "<|eot|>"\nparameter stop "a b"',
        "parameters",
        {"stop": ["<|im_end|>", "<|eot|>", "a b"]},
    ),
    ("FROM m\nPARAMETER mirostat 2", "parameters", {}),
    (
        'FROM m\nMESSAGE user Hi there\nMESSAGE assistant "Hello!\nBye"',
        "messages",
        [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!\nBye"}],
    ),
    ("FROM m\nREQUIRES 0.6.0", "requires", "0.6.0"),
    ("FROM m\nREQUIRES v1.2", "requires", "1.2"),
    ("FROM m\nADAPTER ./lora.gguf", "adapters", ["./lora.gguf"]),
    ("FROM m\nRENDERER qwen3\nPARSER qwen3", "renderer", "qwen3"),
]


def _field(text: str, what: str) -> Any:
    m = parse(text)
    if what == "from":
        return m.from_.args
    if what == "adapters":
        return [c.args for c in m.adapters]
    return getattr(m, what)


@pytest.mark.parametrize(
    "text,what,expected", PARSES, ids=[f"{i}-{p[1]}" for i, p in enumerate(PARSES)]
)
def test_parse(text: str, what: str, expected: Any) -> None:
    assert _field(text, what) == expected


# (text, message fragment, line, column)
ERRORS = [
    ("SYSTEM hi", "no FROM line", 0, 0),
    ("FROM m\nFOO bar", "unknown directive 'FOO'", 2, 1),
    ("FROM m\n  BAR=1", "unknown directive 'BAR'", 2, 3),
    ("FROM m\nPARAMETER nope 1", "unknown parameter 'nope'", 2, 11),
    ("FROM m\nPARAMETER temperature hot", "invalid float value [hot]", 2, 23),
    ("FROM m\nPARAMETER num_ctx 4k", "invalid int value [4k]", 2, 19),
    ("FROM m\nPARAMETER use_mmap maybe", "invalid bool value [maybe]", 2, 20),
    ("FROM m\nPARAMETER temperature nan", "invalid float value [nan]", 2, 23),
    ("FROM m\nMESSAGE robot hi", "message role must be one of", 2, 9),
    ("FROM m\nPARAMETER stop", "PARAMETER needs a parameter name and a value", 2, 11),
    ("FROM\nSYSTEM x", "FROM needs a value", 1, 5),
    ('FROM m\nSYSTEM """never closed\nmore', 'no closing """', 2, 8),
    ('FROM m\nSYSTEM "never closed', 'no closing "', 2, 8),
    ("FROM m\nREQUIRES banana", "REQUIRES must be a valid semver", 2, 10),
    ("FROM m\nDRAFT", "DRAFT needs a value", 2, 6),
]


@pytest.mark.parametrize("text,fragment,line,column", ERRORS, ids=[e[1][:24] for e in ERRORS])
def test_errors_name_line_and_column(text: str, fragment: str, line: int, column: int) -> None:
    with pytest.raises(ModelfileError) as info:
        m = parse(text)
        _ = m.requires, m.parameters  # values checked on use
    e = info.value
    assert fragment in str(e)
    assert (e.line, e.column) == (line, column)
    if line:
        assert str(e).startswith(f"Modelfile:{line}:{column}: ")


def test_deprecated_parameter_warns() -> None:
    m = parse("FROM m\nPARAMETER penalize_newline true\nPARAMETER low_vram true")
    assert m.warnings == [
        "warning: parameter penalize_newline is deprecated",
        "warning: parameter low_vram is deprecated",
    ]
    assert m.parameters == {}


def test_utf16_with_bom() -> None:
    assert parse("FROM m\nSYSTEM héllo".encode("utf-16")).system == "héllo"


@pytest.mark.parametrize(
    "value,expected",
    [
        ("plain", "plain"),
        (" lead", '" lead"'),
        ("two\nlines", '"two\nlines"'),
        ('say "hi"\nok', '"""say "hi"\nok"""'),
    ],
    ids=["bare", "space", "newline", "quotes"],
)
def test_quote_like_ollama(value: str, expected: str) -> None:
    assert quote(value) == expected


def test_string_round_trips() -> None:
    text = (
        'FROM m\nPARAMETER stop <end>\nTEMPLATE """{{ "x" }}\n"""\nSYSTEM hi\n'
        "MESSAGE user Hello\nLICENSE MIT\n"
    )
    m = parse(text)
    again = parse(str(m))
    assert [(c.name, c.args, c.role) for c in again.commands] == [
        (c.name, c.args, c.role) for c in m.commands
    ]


def test_params_json_is_gos() -> None:
    m = parse("FROM m\nPARAMETER temperature 1\nPARAMETER top_p 0.9\nPARAMETER stop <a>")
    assert (
        go_json(m.parameters, sort_keys=True)
        == b'{"stop":["\\u003ca\\u003e"],"temperature":1,"top_p":0.9}\n'
    )


def test_resolve_source(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    m = parse("FROM ./m.gguf\nADAPTER missing.gguf")
    assert resolve_source(m.from_, tmp_path) == tmp_path / "m.gguf"
    assert resolve_source(parse("FROM llama3:8b").from_, tmp_path) == "llama3:8b"
    with pytest.raises(ModelfileError, match=r"Modelfile:2:9: ADAPTER missing.gguf: no such"):
        resolve_source(m.adapters[0], tmp_path)
    with pytest.raises(ModelfileError, match=r"Modelfile:1:6: FROM ./gone.gguf: no such"):
        resolve_source(parse("FROM ./gone.gguf").from_, tmp_path)


def test_read_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelfileError, match="no such file"):
        read(tmp_path / "Modelfile")
    (tmp_path / "Modelfile").write_text("FROM m\nBAD x\n")
    with pytest.raises(ModelfileError, match=rf"{tmp_path}/Modelfile:2:1: unknown directive"):
        read(tmp_path / "Modelfile")
