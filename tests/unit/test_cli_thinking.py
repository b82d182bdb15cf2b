"""`herd run --think/--hidethinking/--format` and the REPL's `/set think|nothink|format`:
what reaches the model, and how thinking is shown (Ollama's "Thinking..." frame)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from test_cli import FakeLLM, Lines, fake_env, invoke, models  # noqa: F401 (fixture)

from herd.cli.repl import Repl
from herd.cli.stream import stream_out
from herd.store import Store


class ThinkingLLM(FakeLLM):
    """Thinks, then answers; records the keyword arguments of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.kwargs: list[dict[str, Any]] = []
        self.prompts: list[str] = []

    def _think(self, key: str) -> Iterator[dict[str, Any]]:
        for thinking, content in [("Let me", ""), (" see.", ""), ("", "Four"), ("", ".")]:
            if key == "response":
                yield {"response": content, "thinking": thinking, "done": False}
            else:
                msg = {"role": "assistant", "content": content, "thinking": thinking}
                yield {"message": msg, "done": False}
        yield from list(self._stream(key))[-1:]

    def generate(self, prompt: str, **kw: Any) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        self.kwargs.append(kw)
        self.prompts.append(prompt)
        return self._think("response")

    def chat(self, messages: list[dict[str, Any]], **kw: Any) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        self.kwargs.append(kw)
        self.calls.append(("chat", [dict(m) for m in messages], kw.get("options")))
        return self._think("message")


@pytest.mark.parametrize(
    "flags, sent, shown",
    [
        ([], {}, "Thinking...\nLet me see.\n...done thinking.\n\nFour.\n"),
        (["--think"], {"think": True}, "Thinking...\nLet me see.\n...done thinking.\n\nFour.\n"),
        (["--think=high"], {"think": "high"}, "Thinking...\n"),
        (["--think=false"], {"think": False}, "Thinking...\n"),
        (["--hidethinking"], {}, "Four.\n"),
        (["--think", "--hidethinking", "--format", "json"], {"think": True, "format": "json"},
         "Four.\n"),
    ],
    ids=["default", "think", "level", "off", "hidden", "all"],
)  # fmt: skip
def test_run_flags(models: Store, flags: list[str], sent: dict[str, Any], shown: str) -> None:  # noqa: F811
    llm = ThinkingLLM()
    env, _ = fake_env(llm)  # type: ignore[arg-type]
    r = invoke(["run", "tiny:1", *flags, "2+2?"], env)
    assert r.exit_code == 0, r.output
    assert llm.kwargs == [{"stream": True, **sent}]
    assert r.stdout.startswith(shown)


def test_bare_think_before_the_prompt(models: Store) -> None:  # noqa: F811
    llm = ThinkingLLM()
    env, _ = fake_env(llm)  # type: ignore[arg-type]
    r = invoke(["run", "tiny:1", "--think", "2+2?", "quickly"], env)
    assert r.exit_code == 0, r.output
    assert llm.kwargs == [{"stream": True, "think": True}]
    assert llm.prompts == ["2+2? quickly"]


def test_repl_set_think_nothink_format() -> None:
    llm = ThinkingLLM()
    out: list[str] = []
    lines = Lines(
        *["/set think", "a", "/set think low", "/set nothink", "b", "/set format json", "c"],
        *["/set format xml", "/set noformat", "d", "/set think extreme", "/bye"],
    )
    Repl(llm, lines, write=out.append).run()
    assert [{k: v for k, v in kw.items() if k in ("think", "format")} for kw in llm.kwargs] == [
        {"think": True},
        {"think": False},
        {"think": False, "format": "json"},
        {"think": False},
    ]
    text = "".join(out)
    for line in [
        "Set 'think' mode.\n",
        "Set 'think' mode to 'low'.\n",
        "Set 'nothink' mode.\n",
        "Set format to 'json' mode.\n",
        "Invalid or missing format. For 'json' mode use '/set format json'\n",
        "Disabled format.\n",
        "Invalid think level 'extreme'. Use high, medium or low.\n",
    ]:
        assert line in text
    assert "Thinking...\nLet me see.\n...done thinking.\n\nFour.\n\n" in text
    # only the answer goes into the history, not the thinking
    assert llm.calls[1][1][1] == {"role": "assistant", "content": "Four."}


def test_stream_out_closes_thinking_without_content() -> None:
    out: list[str] = []
    chunks = [{"response": "", "thinking": "hmm"}, {"response": "", "done": True}]
    text, final = stream_out(chunks, lambda c: c["response"], out.append)
    assert (text, "".join(out)) == ("", "Thinking...\nhmm\n...done thinking.\n\n")
    assert final is not None and final["done"]
