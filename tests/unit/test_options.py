"""The one options table: JSON values merged as a request gives them, text values parsed as
a Modelfile or `/set parameter` gives them, and the same names everywhere."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest

from herd.errors import OptionError
from herd.modelfile import parse
from herd.options import OPTIONS, Options, parse_text

# a text value of each Go kind, and what it parses to
SAMPLE = {
    "int": ("7", 7),
    "float": ("0.5", 0.5),
    "bool": ("false", False),
    "[]string": ("<end>", ["<end>"]),
}


def test_table_kinds_and_defaults() -> None:
    assert {n: s.kind for n, s in OPTIONS.items() if s.load_time} == {
        "num_ctx": "int",
        "num_batch": "int",
        "num_gpu": "int",
        "main_gpu": "int",
        "num_thread": "int",
        "use_mmap": "bool",
    }
    assert OPTIONS["stop"].kind == "[]string" and OPTIONS["temperature"].kind == "float"
    assert all(getattr(Options(), n) == s.default for n, s in OPTIONS.items())


@pytest.mark.parametrize(
    "values, changed",
    [
        ({"num_ctx": 2048.0, "top_k": "5"}, {"num_ctx": 2048, "top_k": 5}),
        ({"temperature": 1, "seed": None}, {"temperature": 1.0}),
        ({"stop": "###"}, {"stop": ("###",)}),
        ({"stop": ["a", "b"], "use_mmap": False}, {"stop": ("a", "b"), "use_mmap": False}),
        ({"colour": "red"}, {}),
    ],
    ids=["numbers", "none-kept", "stop-string", "stop-list-bool", "unknown"],
)
def test_merged(values: dict[str, Any], changed: dict[str, Any]) -> None:
    merged = Options().merged(values)
    assert {
        n: getattr(merged, n) for n in OPTIONS if getattr(merged, n) != OPTIONS[n].default
    } == changed


def test_unknown_request_option_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "herd.options"):
        assert Options().merged({"mirostat": 2}) == Options()
    assert "ignoring unknown option 'mirostat'" in caplog.text


@pytest.mark.parametrize(
    "values, message",
    [
        ({"top_k": 4.5}, "option 'top_k' must be an integer, not 4.5"),
        ({"num_ctx": True}, "option 'num_ctx' must be a number, not True"),
        ({"temperature": "hot"}, "option 'temperature' must be a number, not 'hot'"),
        ({"stop": [1]}, "option 'stop' must be a string or a list of strings"),
        ({"use_mmap": "no"}, "option 'use_mmap' must be true or false, not 'no'"),
    ],
    ids=["int", "bool-for-number", "float", "stop", "bool"],
)
def test_merged_errors(values: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionError, match=re.escape(message)):
        Options().merged(values)


@pytest.mark.parametrize(
    "change, reloads",
    [
        ({"num_ctx": 8}, True),
        ({"main_gpu": 1}, True),
        ({"use_mmap": False}, True),
        ({"temperature": 0.1}, False),
        ({"stop": ["x"]}, False),
    ],
    ids=["num_ctx", "main_gpu", "use_mmap", "temperature", "stop"],
)
def test_load_key_changes_with_load_time_options_only(change: dict[str, Any], reloads: bool):
    assert (Options().merged(change).load_key() != Options().load_key()) is reloads


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_parses_as_text_the_same_way_everywhere(name: str) -> None:
    """`/set parameter` and a Modelfile PARAMETER accept every option of the table, and
    what they parse merges back into `Options` as a request's JSON value would."""
    text, value = SAMPLE[OPTIONS[name].kind]
    assert parse_text(name, [text]) == value
    assert parse(f"FROM m\nPARAMETER {name} {text}").parameters == {name: value}
    expected = tuple(value) if isinstance(value, list) else value
    assert getattr(Options().merged({name: value}), name) == expected


@pytest.mark.parametrize(
    "name, values, expected",
    [
        ("top_p", ["0.123456789"], 0.12345679),
        ("num_ctx", ["+8"], 8),
        ("stop", ["a", "b"], ["a", "b"]),
        ("use_mmap", ["T", "x"], True),
    ],
    ids=["float32", "signed-int", "list-takes-all", "first-value"],
)
def test_parse_text_like_format_params(name: str, values: list[str], expected: Any) -> None:
    assert parse_text(name, values) == expected


@pytest.mark.parametrize(
    "name, values, message",
    [
        ("num_ctx", ["1_000"], "invalid int value [1_000]"),
        ("temperature", ["inf"], "invalid float value [inf]"),
        ("top_k", ["x", "y"], "invalid int value [x y]"),
        ("seed", [], "parameter 'seed' needs a value"),
        ("mirostat", ["1"], "unknown parameter 'mirostat'"),
    ],
    ids=["int-underscore", "float-inf", "shows-all-values", "no-value", "unknown"],
)
def test_parse_text_errors(name: str, values: list[str], message: str) -> None:
    with pytest.raises(OptionError, match=re.escape(message)):
        parse_text(name, values)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"temperature": "NaN"}, "option 'temperature' must be a finite number, not nan"),
        ({"repeat_penalty": "nan"}, "option 'repeat_penalty' must be a finite number"),
        ({"presence_penalty": float("inf")}, "must be a finite number, not inf"),
        ({"frequency_penalty": "-Infinity"}, "must be a finite number, not -inf"),
        ({"top_p": 1e39}, "must be a finite number, not 1e+39"),  # beyond float32
        ({"temperature": 10**400}, "option 'temperature' must be a number"),  # beyond float
        ({"repeat_penalty": 0}, "option 'repeat_penalty' must be greater than 0"),
        ({"num_thread": 1e30}, "option 'num_thread' must be between 0 and"),
        ({"num_thread": -1}, "option 'num_thread' must be between 0 and"),
        ({"seed": 2**63}, "option 'seed' must be between -1 and 2147483647"),
        ({"seed": -2}, "option 'seed' must be between -1 and 2147483647"),
        ({"num_predict": -3}, "option 'num_predict' must be between -2 and 2147483647"),
        ({"num_ctx": 2**31}, "option 'num_ctx' must be between 0 and 2147483647"),
        ({"top_k": -(2**31) - 1}, "option 'top_k' must be between -2147483648 and"),
        ({"top_k": "x" * 10_000}, "option 'top_k' must be an integer, not 'xxxxx"),
    ],
)
def test_merged_refuses_values_no_runner_can_take(values: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionError, match=re.escape(message)) as e:
        Options().merged(values)
    assert len(str(e.value)) < 200  # a request's megabytes are never quoted back whole


def test_num_thread_bound_is_within_the_machine_and_ggml() -> None:
    import os

    from herd.options import MAX_THREADS

    assert 64 <= MAX_THREADS <= 512 and MAX_THREADS >= min(512, 4 * (os.cpu_count() or 1))
    assert Options().merged({"num_thread": MAX_THREADS}).num_thread == MAX_THREADS


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("num_thread", "100000", "option 'num_thread' must be between 0 and"),
        ("num_ctx", "9" * 30, "invalid int value"),
        ("seed", "-7", "option 'seed' must be between -1"),
        ("repeat_penalty", "0", "option 'repeat_penalty' must be greater than 0"),
        ("temperature", "1e39", "option 'temperature' must be a finite number"),
    ],
)
def test_parse_text_refuses_values_out_of_range(name: str, text: str, message: str) -> None:
    with pytest.raises(OptionError, match=re.escape(message)):
        parse_text(name, [text])
