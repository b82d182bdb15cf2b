"""`herd run`'s interactive chat REPL: the loop, `\"\"\"` multi-line input, slash commands."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from herd.cli.env import LLM
from herd.cli.session import Session
from herd.cli.show import render_info, single_field
from herd.cli.stream import (
    Write,
    _content,
    _err,
    _extra,
    _out,
    attach_images,
    parse_think,
    stream_out,
    timings,
)
from herd.errors import HerdError
from herd.options import parse_text
from herd.store.facts import ShowFacts

HELP = '''Available Commands:
  /set            Set session variables
  /show           Show model information
  /load <model>   Load a session or model
  /save <model>   Save your current session
  /clear          Clear session context
  /list           List models (like herd list)
  /bye            Exit
  /?, /help       Help for a command
  /? set          Help for /set
  /? show         Help for /show

Use """ to begin a multi-line message.

'''

HELP_SET = """Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set think             Enable thinking
  /set nothink           Disable thinking
  /set format json       Enable JSON mode
  /set noformat          Disable formatting
  /set wordwrap          Enable wordwrap
  /set nowordwrap        Disable wordwrap
  /set verbose           Show LLM stats
  /set quiet             Disable LLM stats

"""

HELP_SHOW = """Available Commands:
  /show info         Show details for this model
  /show license      Show model license
  /show modelfile    Show Modelfile for this model
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show prompt template

"""

HELP_PARAMETERS = """Available Parameters:
  /set parameter seed <int>             Random number seed
  /set parameter num_predict <int>      Max number of tokens to predict
  /set parameter top_k <int>            Pick from top k num of tokens
  /set parameter top_p <float>          Pick token based on sum of probabilities
  /set parameter min_p <float>          Pick token based on top token probability * min_p
  /set parameter num_ctx <int>          Set the context size
  /set parameter temperature <float>    Set creativity level
  /set parameter repeat_penalty <float> How strongly to penalize repetitions
  /set parameter repeat_last_n <int>    Set how far back to look for repetitions
  /set parameter num_gpu <int>          The number of layers to send to the GPU
  /set parameter stop <string> <string> ...   Set the stop parameters

"""


class Repl:
    """Ollama's chat loop: `>>> ` prompt, `\"\"\"` multi-line input, slash commands.

    The whole conversation (`messages`) goes to `llm.chat` every turn, with the images
    each message brought (the bytes of the files its prompt named, for a vision model).
    """

    def __init__(
        self,
        llm: LLM,
        read_line: Callable[[str], str],
        *,
        verbose: bool = False,
        facts: Callable[[], ShowFacts] | None = None,
        write: Write = _out,
        write_err: Write = _err,
        model: str = "",
        session: Session | None = None,
        wordwrap: bool = True,
    ) -> None:
        self.llm, self.read_line, self.verbose, self.facts = llm, read_line, verbose, facts
        self.write, self.write_err = write, write_err
        self.model, self.session, self.wordwrap = model, session, wordwrap
        if facts is None and session is not None:
            self.facts = lambda: session.facts(self.model)
        self.messages: list[dict[str, Any]] = []
        self.options: dict[str, Any] = {}
        self.system: str | None = None
        self.think: bool | str | None = None
        self.format: str | None = None
        self.hide_thinking = False

    def run(self) -> None:
        pending: list[str] = []  # lines of an unfinished """ block
        pending_kind = ""  # "prompt" or "system" while a block is open
        while True:
            try:
                line = self.read_line("... " if pending_kind else ">>> ")
            except EOFError:  # Ctrl-D
                self.write("\n")
                return
            except KeyboardInterrupt:
                if pending_kind:
                    pending, pending_kind = [], ""
                    self.write("\n")
                else:
                    self.write("\nUse Ctrl + d or /bye to exit.\n\n")
                continue
            if pending_kind:
                before, ended = _cut_suffix(line, '"""')
                pending.append(before)
                if not ended:
                    continue
                text, kind = "\n".join(pending), pending_kind
                pending, pending_kind = [], ""
                if kind == "system":
                    self.set_system(text)
                else:
                    self.send(text)
                continue
            if line.startswith('"""'):
                body, ended = _cut_suffix(line[3:], '"""')
                if not ended:
                    pending, pending_kind = [body], "prompt"
                    continue
                line = body
            elif _system_block(line) is not None:
                body, ended = _cut_suffix(_system_block(line) or "", '"""')
                if ended:
                    self.set_system(body)
                else:
                    pending, pending_kind = [body], "system"
                continue
            elif line.startswith("/"):
                try:
                    if self.command(line):
                        return
                except HerdError as e:
                    self.write(f"Error: {e}\n")
                continue
            if line.strip():
                self.send(line)

    def send(self, text: str) -> None:
        """One chat turn; an engine error is reported and the turn dropped, the REPL goes on."""
        try:
            text, images = attach_images(self.llm, text, self.write_err)
        except HerdError as e:  # an image file it cannot read: nothing was sent
            self.write(f"Error: {e}\n")
            return
        message: dict[str, Any] = {"role": "user", "content": text}
        if images:
            message["images"] = images
        try:
            self._turn(message)
        except HerdError as e:
            self.messages.pop()
            self.write(f"Error: {e}\n")

    def command(self, line: str) -> bool:
        """Run a slash command; True means leave the REPL."""
        args = line.split()
        cmd = args[0]
        if cmd in ("/bye", "/exit"):
            return True
        if cmd in ("/?", "/help"):
            topic = args[1] if len(args) > 1 else ""
            self.write({"set": HELP_SET, "show": HELP_SHOW}.get(topic, HELP))
        elif cmd == "/clear":
            self.messages = [{"role": "system", "content": self.system}] if self.system else []
            self.write("Cleared session context\n")
        elif cmd == "/set":
            self._set(args, line)
        elif cmd == "/show":
            self._show(args)
        elif cmd == "/list":
            if self.session is not None:
                self.write(self.session.list() + "\n")
        elif cmd in ("/load", "/save"):
            if len(args) != 2:
                self.write(f"Usage:\n  {cmd} <modelname>\n")
            elif self.session is None:
                self.write(f"{cmd} needs a model name this session can reach.\n")
            elif cmd == "/load":
                self.load(args[1])
            else:
                self.save(args[1])
        else:
            self.write(f"Unknown command '{cmd}'. Type /? for help\n")
        return False

    def _set(self, args: list[str], line: str) -> None:
        what = args[1] if len(args) > 1 else ""
        if what == "parameter":
            if len(args) < 4:
                self.write(HELP_PARAMETERS)
                return
            name, values = args[2], args[3:]
            try:
                self.options[name] = parse_text(name, values)
            except HerdError as e:
                self.write(f"Couldn't set parameter: {e}\n\n")
                return
            self.write(f"Set parameter '{name}' to '{', '.join(values)}'\n\n")
        elif what == "system":
            text = line.split(None, 2)[2] if len(args) > 2 else ""
            if not text:
                self.write(HELP_SET)
                return
            self.set_system(text)
        elif what in ("wordwrap", "nowordwrap"):
            self.wordwrap = what == "wordwrap"
            self.write(f"Set '{what}' mode.\n" if self.wordwrap else "Set 'nowordwrap' mode.\n")
        elif what in ("verbose", "quiet"):
            self.verbose = what == "verbose"
            self.write(f"Set '{what}' mode.\n")
        elif what == "think":
            level = args[2] if len(args) > 2 else ""
            try:
                self.think = parse_think(level) if level else True
            except click.BadParameter:
                self.write(f"Invalid think level '{level}'. Use high, medium or low.\n")
                return
            self.write(f"Set 'think' mode to '{level}'.\n" if level else "Set 'think' mode.\n")
        elif what == "nothink":
            self.think = False
            self.write("Set 'nothink' mode.\n")
        elif what == "format":
            if len(args) < 3 or args[2] != "json":
                self.write("Invalid or missing format. For 'json' mode use '/set format json'\n")
            else:
                self.format = args[2]
                self.write(f"Set format to '{args[2]}' mode.\n")
        elif what == "noformat":
            self.format = None
            self.write("Disabled format.\n")
        elif not what:
            self.write(HELP_SET)
        else:
            self.write(f"Unknown command '/set {what}'. Type /? for help\n")

    def _show(self, args: list[str]) -> None:
        what = args[1] if len(args) > 1 else ""
        if what not in ("info", "license", "modelfile", "parameters", "system", "template"):
            if what:
                self.write(f"Unknown command '/show {what}'. Type /? for help\n")
            else:
                self.write(HELP_SHOW)
            return
        if self.facts is None:
            self.write("No model information available.\n")
            return
        facts = self.facts()
        if what == "info":
            self.write(render_info(facts) + "\n")
        elif what == "system" and self.system:
            self.write(self.system + "\n\n")
        elif what == "parameters" and self.options:
            self.write(single_field(facts, "parameters") + "\n\nUser defined parameters:\n")
            self.write("".join(f"{k:<30} {v}\n" for k, v in sorted(self.options.items())) + "\n")
        else:
            self.write(single_field(facts, what).rstrip("\n") + "\n\n")

    def set_system(self, text: str) -> None:
        self.system = text
        message = {"role": "system", "content": text}
        # a new system message replaces one that nothing has followed yet
        if self.messages and self.messages[-1]["role"] == "system":
            self.messages[-1] = message
        else:
            self.messages.append(message)
        self.write("Set system message.\n")

    def load(self, model: str) -> None:
        """Ollama's /load: another model (or a saved session), with the conversation its
        MESSAGE lines hold, shown as if typed; this session's messages are dropped."""
        assert self.session is not None
        self.write(f"Loading model '{model}'\n")
        try:
            llm = self.session.load(model)
            facts = self.session.facts(model)
        except HerdError as e:
            self.write(f"error: {e}\n")
            return
        self.llm, self.model = llm, model
        self.messages = [dict(m) for m in facts.messages]
        self.system, self.options = None, {}
        for m in self.messages:
            if m.get("role") == "user":
                self.write(f">>> {m.get('content', '')}\n")
            elif m.get("role") == "assistant":
                self.write(f"{m.get('content', '')}\n\n")

    def save(self, name: str) -> None:
        """Ollama's /save: a new model FROM this one with the session's system message,
        parameters and conversation (as MESSAGE lines), created as /api/create does."""
        assert self.session is not None
        request: dict[str, Any] = {
            "model": name,
            "from": self.model,
            "messages": [
                {"role": m["role"], "content": m.get("content") or ""}
                for m in self.messages
                if m.get("role") in ("user", "assistant")
            ],
        }
        if self.system:
            request["system"] = self.system
        if self.options:
            request["parameters"] = dict(self.options)
        try:
            self.session.save(request)
        except HerdError as e:
            self.write(f"error: {e}\n")
            return
        self.write(f"Created new model '{name}'\n")

    def _turn(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        chunks = self.llm.chat(
            list(self.messages),
            options=dict(self.options) or None,
            stream=True,
            **_extra(self.think, self.format),
        )
        plain = not sys.stdout.isatty()
        # Ctrl-C stops this answer only; keep what was shown so turns still alternate
        answer, final = stream_out(
            chunks,
            _content,
            self.write,
            hide_thinking=self.hide_thinking,
            plain=plain,
            wrap=self.wordwrap,
            interruptible=True,
        )
        if answer:
            self.messages.append({"role": "assistant", "content": answer})
        self.write("\n\n")
        if self.verbose and final:
            self.write_err(timings(final))


def _system_block(line: str) -> str | None:
    """The text after `/set system` and an opening triple quote, else None."""
    if not line.startswith("/set system"):
        return None
    rest = line[len("/set system") :].strip()
    return rest[3:] if rest.startswith('"""') else None


def _cut_suffix(s: str, suffix: str) -> tuple[str, bool]:
    return (s[: -len(suffix)], True) if s.endswith(suffix) else (s, False)
