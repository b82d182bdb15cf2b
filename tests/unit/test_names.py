"""Model names follow Ollama's types/model/name.go rules."""

from __future__ import annotations

import pytest

from herd.errors import InvalidNameError
from herd.store import names
from herd.store.names import Name

VALID = [
    ("smollm2:135m", "registry.ollama.ai/library/smollm2:135m", "smollm2"),
    ("llama3", "registry.ollama.ai/library/llama3:latest", "default-tag"),
    ("user/model", "registry.ollama.ai/user/model:latest", "namespace"),
    ("example.com/user/model:v1", "example.com/user/model:v1", "host"),
    ("localhost:5000/ns/m:t", "localhost:5000/ns/m:t", "host-with-port"),
    ("http://localhost:5000/ns/m", "localhost:5000/ns/m:latest", "scheme"),
    ("_x/m_x:t-1.2", "registry.ollama.ai/_x/m_x:t-1.2", "underscore-dash-dot"),
    ("Model.Name:Tag_1", "registry.ollama.ai/library/Model.Name:Tag_1", "case-kept"),
    ("m" * 80, f"registry.ollama.ai/library/{'m' * 80}:latest", "model-80"),
    ("h" * 350 + "/n/m", f"{'h' * 350}/n/m:latest", "host-350"),
]


@pytest.mark.parametrize("text,full,_id", VALID, ids=[v[2] for v in VALID])
def test_valid_names(text: str, full: str, _id: str) -> None:
    assert str(names.parse(text)) == full
    assert names.is_valid(text)


def test_scheme_is_kept() -> None:
    assert names.parse("http://localhost:5000/ns/m").scheme == "http"
    assert names.parse("ns/m").scheme == "https"


INVALID = [
    ("", "model is empty", "empty"),
    ("model:", "tag is empty", "empty-tag"),
    (":tag", "model is empty", "empty-model"),
    ("/model", "namespace is empty", "empty-namespace"),
    ("ns/", "model is empty", "trailing-slash"),
    ("a/b/c/d", "host 'a/b'", "too-many-parts"),
    ("ns.x/model", "namespace 'ns.x' contains '.'", "dot-in-namespace"),
    ("-model", "model '-model' must start", "bad-first-char"),
    ("mo del", "contains ' '", "space"),
    ("model:ta:g", "model 'model:ta'", "colon-in-model"),
    ("host:5000/model", "namespace 'host:5000'", "colon-in-namespace"),
    ("m" * 81, "model is longer than 80", "model-81"),
    ("m:" + "t" * 81, "tag is longer than 80", "tag-81"),
    ("h" * 351 + "/n/m", "host is longer than 350", "host-351"),
    ("http://ns/model", "host 'http:/'", "scheme-without-host"),
    ("m:t/x", "namespace 'm:t'", "slash-after-colon"),
]


@pytest.mark.parametrize("text,problem,_id", INVALID, ids=[v[2] for v in INVALID])
def test_invalid_names_name_the_bad_part(text: str, problem: str, _id: str) -> None:
    with pytest.raises(InvalidNameError) as e:
        names.parse(text)
    assert problem in str(e.value)
    assert str(e.value).startswith(f"invalid model name '{text}'")


TRAVERSAL = [
    "../etc/passwd",
    "ns/../x",
    "../../x:y",
    "model/..",
    "model:../x",
    "..",
    "ns/.hidden",
    "a\\..\\b",
    "m:..",
    "./m",
]


@pytest.mark.parametrize("text", TRAVERSAL, ids=range(len(TRAVERSAL)))
def test_path_traversal_is_rejected(text: str) -> None:
    with pytest.raises(InvalidNameError):
        names.parse(text)


SHORTEST = [
    ("smollm2:135m", "smollm2:135m"),
    ("llama3", "llama3:latest"),
    ("user/m", "user/m:latest"),
    ("example.com/library/m:t", "example.com/library/m:t"),
    ("REGISTRY.OLLAMA.AI/Library/M:T", "M:T"),
]


@pytest.mark.parametrize("text,shown", SHORTEST, ids=[s[0] for s in SHORTEST])
def test_display_shortest(text: str, shown: str) -> None:
    assert names.parse(text).display_shortest() == shown


@pytest.mark.parametrize(
    "text,path",
    [
        ("user/m:t", "registry.ollama.ai/user/m/t"),
        ("smollm2:135m", "registry.ollama.ai/library/smollm2/135m"),
        ("localhost:5000/ns/M:T", "localhost:5000/ns/M/T"),
    ],
    ids=["namespace", "catalog", "host-case-kept"],
)
def test_filepath(text: str, path: str) -> None:
    assert names.parse(text).filepath().as_posix() == path


def test_filepath_of_invalid_name_raises() -> None:
    with pytest.raises(InvalidNameError):
        Name("h", "..", "m", "t").filepath()


@pytest.mark.parametrize(
    "path,expected",
    [
        ("registry.ollama.ai/library/m/t", Name("registry.ollama.ai", "library", "m", "t")),
        ("a/b/c", None),
        ("a/../c/d", None),
        ("h/n/m/.herd-tmp-123", None),
    ],
    ids=["valid", "three-parts", "dotdot", "temp-file"],
)
def test_from_filepath(path: str, expected: Name | None) -> None:
    assert names.from_filepath(path) == expected


@pytest.mark.parametrize(
    "typed,found",
    [
        ("smollm2:135m", "registry.ollama.ai/library/SmolLM2:135M"),
        ("SMOLLM2:135M", "registry.ollama.ai/library/SmolLM2:135M"),
        ("other:1", "registry.ollama.ai/library/other:1"),
    ],
    ids=["lower", "upper", "absent"],
)
def test_match_existing_is_case_insensitive(typed: str, found: str) -> None:
    existing = [Name("registry.ollama.ai", "library", "SmolLM2", "135M")]
    assert str(names.match_existing(names.parse(typed), existing)) == found
