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
from herd.models.base import Model

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


def load_model(config: Config, backend: Backend) -> Model:
    arch = config.arch
    if arch not in _REGISTRY and arch in _folders():
        importlib.import_module(f"herd.models.{arch}")
    if arch not in _REGISTRY:
        supported_architectures()
    if arch not in _REGISTRY:
        raise UnsupportedModelError(
            f"unsupported architecture {arch!r}; supported: {', '.join(supported_architectures())}"
        )
    return _REGISTRY[arch].from_gguf(config, backend)
