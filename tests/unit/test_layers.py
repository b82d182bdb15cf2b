"""Layering: every module under src/herd, read with `ast`, checked against one table.

`MAY_IMPORT` below is the single statement of which part of herd may import which
(docs/ARCHITECTURE.md draws the same rules). Every import counts: at the top, inside a
function, under `if TYPE_CHECKING`, relative ones resolved. A failure lists every
violation at once, each with its file, line and the module it imports.

Dynamic imports are the intended indirections and are not checked: `ml/registry.py`
finds backends by name, the convert driver discovers `models/<arch>/convert.py`, and the
server starts `python -m herd.runner.serve` as a child process.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"

# Anyone may import these: the error types, the one options schema, and the package root
# for `herd.__version__` (its lazy `herd.load` / `herd.LLM` count as importing herd.api).
LEAVES = {"herd", "herd.errors", "herd.options"}
LAZY = {"load": "herd.api", "LLM": "herd.api"}  # herd/__init__.py's __getattr__

# What the runner needs to turn a request into tokens and tokens back into text.
TEXT = {"herd.gguf", "herd.tokenizer", "herd.template", "herd.sample"}
# Beside the engine: files, text, Modelfiles and the model store.
BESIDE = TEXT | {"herd.modelfile", "herd.convert", "herd.store", "herd.registry"}
ENGINE = {"herd.runner", "herd.models", "herd.nn", "herd.kvcache", "herd.ml"}

# unit -> the units it may import, besides LEAVES and itself. A module belongs to the
# longest unit its dotted name starts with. The stack reads
#     cli -> server -> runner -> models -> nn -> ml <- ml.backends
# and a layer may skip down (models use ml directly), never up.
MAY_IMPORT: dict[str, set[str]] = {
    # entry points
    "herd": {"herd.api"},  # herd.load / herd.LLM, imported on first use
    "herd.__main__": {"herd.cli"},
    "herd.cli": {"herd.server", "herd.api", "herd.deploy"} | ENGINE | BESIDE,
    "herd.api": ENGINE | BESIDE,  # the library: the same engine, no server, no CLI
    # the stack
    "herd.server": {"herd.runner", "herd.ml"} | BESIDE,  # models run in the runner process
    "herd.deploy": {"herd.server"} | BESIDE,  # herd's server app, as replicas on a cluster
    "herd.runner": {"herd.models", "herd.nn", "herd.kvcache", "herd.ml"} | TEXT,
    "herd.models": {"herd.nn", "herd.kvcache", "herd.ml", "herd.gguf"},
    "herd.nn": {"herd.kvcache", "herd.ml"},
    "herd.kvcache": {"herd.ml"},
    "herd.ml": {"herd.gguf"},  # backends are opened by name (ml/registry.py), not imported
    "herd.ml.backends": {"herd.ml", "herd.gguf"},
    # beside the stack
    "herd.sample": {"herd.tokenizer"},  # grammars mask over the tokenizer's vocabulary
    "herd.tokenizer": {"herd.gguf"},
    "herd.template": set(),
    "herd.gguf": set(),
    "herd.modelfile": set(),
    "herd.convert": {"herd.models", "herd.gguf"},  # models/<arch>/convert.py, never back
    "herd.store": {"herd.convert", "herd.modelfile", "herd.template", "herd.gguf"},
    "herd.registry": {"herd.store"},
    # leaves
    "herd.errors": set(),
    "herd.options": set(),
    "herd.envconfig": set(),
}

# Who may read the environment (herd.envconfig): the entry points, the runner process's
# main, and the store and registry, whose defaults are the user's (HERD_MODELS,
# HERD_CACHE, the registry key, HERD_NOPRUNE). Everything below gets its settings passed in.
ENV_READERS = {
    "herd",
    "herd.__main__",
    "herd.cli",
    "herd.api",
    "herd.server",
    "herd.runner.serve",
    "herd.store",
    "herd.registry",
}


def modules(src: Path = SRC) -> dict[str, Path]:
    """Dotted name -> file, for every module and package under src/herd."""
    out = {}
    for path in sorted((src / "herd").rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[int, str]]:
    """(line, imported herd module) for every import in the file, wherever it is."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    imports_root = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                imports_root |= alias.name.split(".")[0] == "herd" and alias.asname is None
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from ..x import y` inside package a.b -> a.x
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in known:  # `from herd import envconfig`
                    yield node.lineno, f"{base}.{alias.name}"
                elif base == "herd" and alias.name in LAZY:
                    yield node.lineno, LAZY[alias.name]
                else:
                    yield node.lineno, base
    if imports_root:  # `import herd` then `herd.load(...)`
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "herd"
                and node.attr in LAZY
            ):
                yield node.lineno, LAZY[node.attr]


def _in(name: str, unit: str) -> bool:
    return name == unit or unit != "herd" and name.startswith(unit + ".")


def unit_of(name: str) -> str | None:
    """The longest unit of MAY_IMPORT that `name` belongs to."""
    units = [u for u in MAY_IMPORT if _in(name, u)]
    return max(units, key=len) if units else None


def violations(src: Path = SRC) -> tuple[list[str], list[str], list[str]]:
    """(modules outside the table, upward imports, environment reads), one line each."""
    known = modules(src)
    unplaced, upward, env = [], [], []
    for name, path in known.items():
        where = path.relative_to(src.parent)
        unit = unit_of(name)
        if unit is None:
            unplaced.append(f"{where}: {name} belongs to no unit of MAY_IMPORT")
            continue
        for line, target in sorted(set(imports(name, path, known))):
            if target.split(".")[0] != "herd":
                continue
            if target == "herd.envconfig":  # ENV_READERS, not MAY_IMPORT, says who
                if not any(_in(name, r) for r in ENV_READERS):
                    env.append(
                        f"{where}:{line}: {name} imports herd.envconfig "
                        "(only entry points read the environment; pass the setting in)"
                    )
                continue
            to = unit_of(target)
            if to in LEAVES or to == unit or to in MAY_IMPORT[unit]:
                continue
            upward.append(f"{where}:{line}: {name} imports {target} ({unit} may not import {to})")
    return unplaced, upward, env


def _report(found: list[str], what: str) -> str:
    return f"{len(found)} {what}:\n" + "\n".join(found)


def test_every_module_has_a_unit() -> None:
    unplaced, _, _ = violations()
    assert not unplaced, _report(unplaced, "modules outside the layer table")
    stale = [u for u in MAY_IMPORT if not any(_in(m, u) for m in modules())]
    assert not stale, f"units in MAY_IMPORT that no module belongs to: {stale}"


def test_imports_point_down() -> None:
    _, upward, _ = violations()
    assert not upward, _report(upward, "imports against the layering")


def test_only_entry_points_read_the_environment() -> None:
    _, _, env = violations()
    assert not env, _report(env, "environment reads below the entry points")


# The checker itself, on a made-up tree: each kind of import it must see.
FAKE = {
    "herd/__init__.py": "from herd import api\n",
    "herd/api.py": "",
    "herd/envconfig.py": "",
    "herd/errors.py": "",
    "herd/cli/__init__.py": "",
    "herd/cli/show.py": "",
    "herd/ml/__init__.py": "",
    "herd/ml/base.py": "def f():\n    from ..runner import engine\n",
    "herd/ml/backends/__init__.py": "",
    "herd/ml/backends/x.py": "from herd.ml.base import f\nfrom herd import envconfig\n",
    "herd/models/__init__.py": "import herd\n\nLLM = herd.LLM\n",
    "herd/runner/__init__.py": "",
    "herd/runner/engine.py": "from . import serve\nfrom herd.errors import HerdError\n",
    "herd/runner/serve.py": "from herd import envconfig\n",
    "herd/server/__init__.py": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from herd.cli.show import x\n"
    ),
    "herd/brand_new.py": "",
}


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    for rel, text in FAKE.items():
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_text(text)
    unplaced, upward, env = violations(tmp_path / "src")
    assert [x.split(":")[0] for x in unplaced] == ["src/herd/brand_new.py"]
    assert [x.split(" (")[0] for x in upward] == [
        "src/herd/ml/base.py:2: herd.ml.base imports herd.runner.engine",
        "src/herd/models/__init__.py:3: herd.models imports herd.api",
        "src/herd/server/__init__.py:3: herd.server imports herd.cli.show",
    ]
    assert [x.split(" (")[0] for x in env] == [
        "src/herd/ml/backends/x.py:2: herd.ml.backends.x imports herd.envconfig"
    ]


# ---- size and probes -------------------------------------------------------------------
# Files that grew past a reader's patience before and were split; keep them split.
SMALL = [
    SRC / "herd/api.py",
    SRC / "herd/runner/serve.py",
    *sorted((SRC / "herd/ml/backends/ggml").glob("*.py")),
    *sorted((SRC / "herd/deploy").glob("*.py")),
]
MAX_LINES = 500


@pytest.mark.parametrize("path", SMALL, ids=lambda p: str(p.relative_to(SRC)))
def test_file_stays_small(path: Path) -> None:
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n < MAX_LINES, f"{path.relative_to(ROOT)}: {n} lines (keep under {MAX_LINES})"


# The runner and the library hold the engine through declared contracts (the Model
# protocol, GraphReuse, Backend.cache_config()), not by probing for attributes.
PROBES = re.compile(r"type: ignore|hasattr\(|getattr\(backend")


def test_runner_and_api_use_contracts_not_probes() -> None:
    files = [SRC / "herd/api.py", *sorted((SRC / "herd/runner").rglob("*.py"))]
    found = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for path in files
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if PROBES.search(line)
    ]
    assert not found, _report(found, "probes where a declared contract belongs")
