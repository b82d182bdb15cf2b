"""Architectures by GGUF `general.architecture`; each folder is imported on first use."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from herd.errors import UnsupportedModelError
from herd.gguf import Config
from herd.ml import Backend
from herd.models.base import Model, Projector, TakesProjector

_REGISTRY: dict[str, type[Model]] = {}

M = TypeVar("M", bound=type[Model])


def register(*names: str) -> Callable[[M], M]:
    """Class decorator: `@register("llama")` on a class that implements `Model`."""

    def wrap(cls: M) -> M:
        for name in names:
            _REGISTRY[name] = cls
        return cls

    return wrap


def _folders() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.ispkg)


def supported_architectures() -> list[str]:
    for folder in _folders():
        importlib.import_module(f"herd.models.{folder}")
    return sorted(_REGISTRY)


def load_model(config: Config, backend: Backend, projector: Projector | None = None) -> Model:
    """The architecture `general.architecture` names, bound to `backend`'s weights; with
    `projector` (a separate projector file), its vision part bound to that file's."""
    arch = config.arch
    if arch not in _REGISTRY and arch in _folders():
        importlib.import_module(f"herd.models.{arch}")
    if arch not in _REGISTRY:
        supported_architectures()
    if arch not in _REGISTRY:
        raise UnsupportedModelError(
            f"unsupported architecture {arch!r}; supported: {', '.join(supported_architectures())}"
        )
    cls = _REGISTRY[arch]
    if projector is None:
        return cls.from_gguf(config, backend)
    if not isinstance(cls, TakesProjector):
        raise UnsupportedModelError(f"{arch} models take no projector file")
    return cls.from_gguf_with_projector(config, backend, projector)
