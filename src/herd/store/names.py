"""Ollama's model names: `[scheme://][host/][namespace/]model[:tag]`.

Parsing and validity follow Ollama's `types/model/name.go` so that a name means the same
file in herd's store as in Ollama's: the tag is what follows the last `:` when that comes
after the last `/`; the rest splits from the right on `/` into model, namespace, host.
A separator with nothing on one side leaves that part empty, which is invalid.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from herd.errors import InvalidNameError

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
DEFAULT_SCHEME = "https"

_ALNUM_ = set(string.ascii_letters + string.digits + "_")
_MAX_LEN = {"host": 350, "namespace": 80, "model": 80, "tag": 80}


@dataclass(frozen=True)
class Name:
    """A model name; parts may be empty only on a name straight out of `parse_bare`."""

    host: str = ""
    namespace: str = ""
    model: str = ""
    tag: str = ""
    scheme: str = ""

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def with_defaults(self) -> Name:
        return replace(
            self,
            host=self.host or DEFAULT_HOST,
            namespace=self.namespace or DEFAULT_NAMESPACE,
            tag=self.tag or DEFAULT_TAG,
            scheme=self.scheme or DEFAULT_SCHEME,
        )

    def display_shortest(self) -> str:
        """Drop the default host (and namespace) like Ollama's list; model:tag always stays."""
        if self.host.lower() != DEFAULT_HOST:
            prefix = f"{self.host}/{self.namespace}/"
        elif self.namespace.lower() != DEFAULT_NAMESPACE:
            prefix = f"{self.namespace}/"
        else:
            prefix = ""
        return f"{prefix}{self.model}:{self.tag}"

    def filepath(self) -> PurePosixPath:
        """host/namespace/model/tag: the manifest's path under `manifests/`."""
        validate(self)
        return PurePosixPath(self.host, self.namespace, self.model, self.tag)

    def equal_fold(self, other: Name) -> bool:
        """Same model ignoring case (Ollama treats `Llama3` and `llama3` as one model)."""
        return self.parts_lower() == other.parts_lower()

    def parts_lower(self) -> tuple[str, str, str, str]:
        return (self.host.lower(), self.namespace.lower(), self.model.lower(), self.tag.lower())


def parse_bare(s: str) -> Name:
    """Split without defaults or validation; a cut with an empty side yields an empty part.

    Ollama marks such parts `!MISSING!`; herd keeps them empty and `validate` reports them.
    """
    host = namespace = tag = scheme = ""
    if s.rfind(":") > s.rfind("/"):
        s, _, tag = s.rpartition(":")
        tag = tag or ":"  # "model:" has a separator with nothing after it: invalid, not default
    if "/" not in s:
        return Name(model=s, tag=tag)
    s, _, model = s.rpartition("/")
    if "/" not in s:
        return Name(namespace=s or "/", model=model or "/", tag=tag)
    s, _, namespace = s.rpartition("/")
    scheme, sep, host = s.partition("://")
    if not sep:
        scheme, host = "", s
    return Name(
        host=host or "/", namespace=namespace or "/", model=model or "/", tag=tag, scheme=scheme
    )


def parse(s: str) -> Name:
    """Parse a user's model name, fill Ollama's defaults, and validate every part."""
    name = parse_bare(s).with_defaults()
    validate(name, original=s)
    return name


def is_valid(s: str) -> bool:
    try:
        parse(s)
    except InvalidNameError:
        return False
    return True


def validate(name: Name, original: str | None = None) -> None:
    """Raise InvalidNameError naming the first bad part (Ollama's `isValidPart` rules)."""
    shown = original if original is not None else str(name)
    for kind in ("host", "namespace", "model", "tag"):
        problem = _part_problem(kind, getattr(name, kind))
        if problem:
            raise InvalidNameError(f"invalid model name '{shown}': {problem}")


def _part_problem(kind: str, part: str) -> str | None:
    # parse_bare leaves a lone separator where Ollama would have `!MISSING!`
    if part in ("", "/", ":"):
        return f"{kind} is empty"
    if len(part) > _MAX_LEN[kind]:
        return f"{kind} is longer than {_MAX_LEN[kind]} characters"
    if part[0] not in _ALNUM_:
        return f"{kind} '{part}' must start with a letter, digit or '_'"
    allowed = {"host": "_-.:", "namespace": "_-", "model": "_-.", "tag": "_-."}[kind]
    for ch in part[1:]:
        if ch not in _ALNUM_ and ch not in allowed:
            return f"{kind} '{part}' contains {ch!r} (allowed: letters, digits, {_list(allowed)})"
    return None


def _list(chars: str) -> str:
    return ", ".join(f"'{c}'" for c in chars)


def from_filepath(path: PurePosixPath | str) -> Name | None:
    """The name of a manifest at host/namespace/model/tag (relative path), or None."""
    parts = PurePosixPath(path).parts
    if len(parts) != 4:
        return None
    name = Name(*parts)
    try:
        validate(name)
    except InvalidNameError:
        return None
    return name


def match_existing(name: Name, existing: Iterable[Name]) -> Name:
    """The spelling of `name` already in the store, compared case-insensitively.

    Keeps one manifest per model whatever case a user types (Ollama's getExistingName).
    """
    for other in existing:
        if other.equal_fold(name):
            return replace(other, scheme=name.scheme)
    return name
