"""The `herd` CLI: list/show/rm/cp/pull output, one-line errors, `run` with a fake engine."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _store_helpers import write_gguf
from click.testing import CliRunner, Result

from herd.cli.env import CliEnv
from herd.cli.format import go_duration, human_bytes, human_duration
from herd.cli.main import cli
from herd.cli.repl import Repl
from herd.errors import OptionError
from herd.gguf import open_gguf
from herd.options import parse_text
from herd.store import Store

# ---------------------------------------------------------------- fakes


class FakeLLM:
    """Streams a fixed answer; records every call. `interrupt` raises Ctrl-C mid-answer."""

    def __init__(self, pieces: tuple[str, ...] = ("Hello", " there")) -> None:
        self.pieces, self.calls, self.interrupt = pieces, [], False

    def _stream(self, key: str) -> Iterator[dict[str, Any]]:
        for i, piece in enumerate(self.pieces):
            if self.interrupt and i == 1:
                raise KeyboardInterrupt
            body = (
                {"response": piece}
                if key == "response"
                else {"message": {"role": "assistant", "content": piece}}
            )
            yield {"model": "m", "done": False, **body}
        yield {
            "model": "m",
            "done": True,
            "done_reason": "stop",
            **(
                {"response": ""}
                if key == "response"
                else {"message": {"role": "assistant", "content": ""}}
            ),
            "total_duration": 2_500_000_000,
            "load_duration": 1_500_000,
            "prompt_eval_count": 10,
            "prompt_eval_duration": 500_000_000,
            "eval_count": 20,
            "eval_duration": 1_000_000_000,
        }

    def generate(
        self,
        prompt: str,
        *,
        system: str | None = None,
        options: dict[str, Any] | None = None,
        raw: bool = False,
        stream: bool = False,
    ) -> Iterator[dict[str, Any]]:
        self.calls.append(("generate", prompt, options))
        return self._stream("response")

    def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        options: dict[str, Any] | None = None,
        stream: bool = False,
    ) -> Iterator[dict[str, Any]]:
        self.calls.append(("chat", [dict(m) for m in messages], options))
        return self._stream("message")

    def info(self) -> dict[str, Any]:
        return {"architecture": "llama"}


class FakeLoader:
    """Like herd.load: a Path must be a readable GGUF, a name must be in the store."""

    def __init__(self, llm: FakeLLM) -> None:
        self.llm, self.loaded = llm, []

    def __call__(self, model: str | Path, backend: str | None, progress: Any) -> FakeLLM:
        self.loaded.append((model, backend))
        if isinstance(model, Path):
            open_gguf(model)
        else:
            Store().resolve(model)
        return self.llm


class Lines:
    """Scripted REPL input: strings are typed lines, exceptions are raised (Ctrl-C/D)."""

    def __init__(self, *items: str | BaseException) -> None:
        self.items, self.prompts = list(items), []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if not self.items:
            raise EOFError
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


# ---------------------------------------------------------------- fixtures


def no_server(start: bool = False) -> None:
    """No `herd serve` to talk to: commands use the store and the (fake) engine in-process."""
    return None


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    monkeypatch.setenv("HERD_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("HERD_CACHE", str(tmp_path / "cache"))
    store = Store()
    src = write_gguf(tmp_path / "tiny.gguf")
    with store.blob_writer() as w:
        w.write(src.read_bytes())
        layer = w.commit()
    store.write_model(
        "tiny:1",
        layer,
        system="Be brief.\nReally.\nVery.",
        params={"stop": ["<end>"], "temperature": 0.5},
        license=["MIT License"],
    )
    return store


def invoke(args: list[str], env: CliEnv | None = None, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, args, obj=env or CliEnv(connect=no_server), input=input)


def fake_env(
    llm: FakeLLM | None = None, tty: bool = False, lines: Lines | None = None
) -> tuple[CliEnv, FakeLoader]:
    loader = FakeLoader(llm or FakeLLM())
    env = CliEnv(
        loader=loader, stdin_isatty=lambda: tty, read_line=lines or Lines(), connect=no_server
    )
    return env, loader


# ---------------------------------------------------------------- list / show / rm / cp


def test_list(models: Store) -> None:
    models.copy("tiny:1", "me/other:2")
    r = invoke(["list"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert re.fullmatch(r"NAME\s{4,}ID\s{4,}SIZE\s{4,}MODIFIED", lines[0])
    digest = models.resolve("tiny:1").digest
    assert {ln.split()[0] for ln in lines[1:]} == {"tiny:1", "me/other:2"}
    for ln in lines[1:]:
        age = r"(Less than a second|\d+ seconds?) ago"
        assert re.search(rf"\s{digest[:12]}\s+\d+(\.\d)? KB\s+{age}$", ln), ln
    assert invoke(["ls"]).stdout == r.stdout


def test_list_empty_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERD_MODELS", str(tmp_path / "none"))
    r = invoke(["list"])
    assert (r.exit_code, r.stdout.split()) == (0, ["NAME", "ID", "SIZE", "MODIFIED"])


def test_show_default(models: Store) -> None:
    r = invoke(["show", "tiny:1"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("  Model\n    architecture        llama\n")
    for line in [
        "    parameters          136",
        "    context length      2048",
        "    embedding length    8",
        "    quantization        Q4_1",
        "  Capabilities\n    completion",
        "  Parameters\n",
        '    stop           "<end>"',
        "    temperature    0.5",
        "  System\n    Be brief.\n    Really.\n    ...",
        "  License\n    MIT License",
    ]:
        assert line in r.stdout


@pytest.mark.parametrize(
    "flag,expected",
    [
        ("--template", "{{ messages }}"),  # no template layer: the GGUF's chat template
        ("--system", "Be brief.\nReally.\nVery."),
        (
            "--parameters",
            'stop                           "<end>"\ntemperature                    0.5',
        ),
        ("--license", "MIT License"),
    ],
    ids=["template", "system", "parameters", "license"],
)
def test_show_single_field(models: Store, flag: str, expected: str) -> None:
    r = invoke(["show", "tiny:1", flag])
    assert (r.exit_code, r.stdout) == (0, expected + "\n")


def test_show_modelfile(models: Store) -> None:
    r = invoke(["show", "tiny:1", "--modelfile"])
    ref = models.resolve("tiny:1")
    assert f"FROM {ref.model_path}\n" in r.stdout
    assert "# FROM tiny:1\n" in r.stdout
    assert "PARAMETER stop <end>\nPARAMETER temperature 0.5\n" in r.stdout
    assert 'SYSTEM "Be brief.\nReally.\nVery."\n' in r.stdout  # Ollama's quote()


def test_show_gguf_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_gguf(tmp_path / "file.gguf", arch="gemma3", file_type=15, template=None)
    r = invoke(["show", "./file.gguf", "-v"])
    assert r.exit_code == 0, r.output
    assert "architecture        gemma3" in r.stdout and "Q4_K_M" in r.stdout
    assert "  Tensors\n" in r.stdout
    assert re.search(r"token_embd.weight\s+F32\s+\[8 16\]", r.stdout)
    no_template = invoke(["show", "file.gguf", "--template"])
    assert no_template.stdout == "No prompt template was specified for this model.\n"


def test_rm_and_cp(models: Store) -> None:
    r = invoke(["cp", "tiny:1", "Copy:1"])
    assert (r.exit_code, r.stdout) == (0, "copied 'tiny:1' to 'Copy:1'\n")
    r = invoke(["rm", "copy:1", "tiny:1"])
    assert (r.exit_code, r.stdout) == (0, "deleted 'copy:1'\ndeleted 'tiny:1'\n")
    assert models.list() == []
    assert list(models.blobs_dir.iterdir()) == []


# ---------------------------------------------------------------- one-line errors


def bad_files(tmp: Path) -> dict[str, Path]:
    text = tmp / "notes.gguf"
    text.write_text("just some text, not a model at all")
    truncated = write_gguf(tmp / "cut.gguf")
    truncated.write_bytes(truncated.read_bytes()[:-40])
    return {"text": text, "truncated": truncated, "missing": tmp / "missing.gguf"}


ERRORS = [
    (["show", "nope"], "model 'nope' not found"),
    (["show", "bad name!"], "invalid model name 'bad name!'"),
    (["show", "{missing}"], "missing.gguf: no such file"),
    (["show", "{text}"], "not a GGUF file"),
    (["show", "{truncated}"], "runs past the end of the file"),
    (["rm", "nope"], "model 'nope' not found"),
    (["rm", "../etc/x"], "invalid model name"),
    (["cp", "nope", "other"], "model 'nope' not found"),
    (["cp", "tiny:1", "bad:"], "tag is empty"),
    (["pull", "nosuch"], "built-in models: smollm2:135m"),
    (["pull", "smollm2"], "try smollm2:135m"),
    (["pull", "ns/"], "model is empty"),
    (["run", "nope", "hi"], "model 'nope' not found"),
    (["run", "{missing}", "hi"], "no such file"),
    (["run", "{text}", "hi"], "not a GGUF file"),
    (["run", "{truncated}", "hi"], "runs past the end"),
]


@pytest.mark.parametrize("args,message", ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_user_errors_are_one_line(
    models: Store, tmp_path: Path, args: list[str], message: str
) -> None:
    files = {k: str(v) for k, v in bad_files(tmp_path).items()}
    env, _ = fake_env()
    r = invoke([a.format(**files) for a in args], env)
    assert r.exit_code == 1
    error_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(error_lines) == 1 and message in error_lines[0], r.stderr
    assert r.stderr.rstrip("\n").splitlines()[-1] == error_lines[0]
    assert "Traceback" not in r.output


def test_bad_option_value_from_engine_is_one_line(models: Store) -> None:
    class Rejecting(FakeLLM):
        def generate(self, prompt: str, **kw: Any) -> Iterator[dict[str, Any]]:
            raise OptionError("option 'top_k' must be an integer")

    env, _ = fake_env(Rejecting())
    r = invoke(["run", "tiny:1", "hi"], env)
    assert (r.exit_code, r.stderr) == (1, "Error: option 'top_k' must be an integer\n")


def test_ctrl_c_exits_130_quietly(models: Store) -> None:
    llm = FakeLLM()
    llm.interrupt = True
    env, _ = fake_env(llm)
    r = invoke(["run", "tiny:1", "hi"], env)
    assert r.exit_code == 130
    assert r.stderr == "" and "Aborted" not in r.output


# ---------------------------------------------------------------- run: one-shot


@pytest.mark.parametrize(
    "args,stdin,prompt",
    [
        (["hello", "world"], None, "hello world"),
        ([], "piped text", "piped text"),
        (["and", "args"], "piped", "piped and args"),
    ],
    ids=["args", "stdin", "stdin-then-args"],
)
def test_run_one_shot(models: Store, args: list[str], stdin: str | None, prompt: str) -> None:
    llm = FakeLLM()
    env, loader = fake_env(llm, tty=stdin is None)
    r = invoke(["run", "tiny:1", *args], env, input=stdin)
    assert r.exit_code == 0, r.output
    assert llm.calls == [("generate", prompt, None)]
    assert r.stdout == "Hello there\n"
    assert loader.loaded == [("tiny:1", None)]


def test_run_gguf_path_and_backend(models: Store, tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    env, loader = fake_env()
    r = invoke(["run", str(path), "--backend", "numpy", "hi"], env)
    assert r.exit_code == 0, r.output
    assert loader.loaded == [(path, "numpy")]


def test_run_verbose_prints_timings(models: Store) -> None:
    env, _ = fake_env()
    r = invoke(["run", "tiny:1", "--verbose", "hi"], env)
    assert r.stderr == (
        "total duration:       2.5s\n"
        "load duration:        1.5ms\n"
        "prompt eval count:    10 token(s)\n"
        "prompt eval duration: 500ms\n"
        "prompt eval rate:     20.00 tokens/s\n"
        "eval count:           20 token(s)\n"
        "eval duration:        1s\n"
        "eval rate:            20.00 tokens/s\n"
    )


# ---------------------------------------------------------------- run: REPL


def test_repl_session(models: Store) -> None:
    llm = FakeLLM()
    lines = Lines(
        "hi",
        '"""first',
        "second",
        'third"""',
        "/set parameter temperature 0.5",
        "/set parameter stop a b",
        "/set parameter top_k x",
        "/set parameter nope 1",
        "/set system Be terse.",
        "again",
        "/clear",
        "fresh",
        "/foo",
        "/bye",
        "unread",
    )
    env, _ = fake_env(llm, tty=True, lines=lines)
    r = invoke(["run", "tiny:1"], env)
    assert r.exit_code == 0, r.output
    user1 = {"role": "user", "content": "hi"}
    reply = {"role": "assistant", "content": "Hello there"}
    user2 = {"role": "user", "content": "first\nsecond\nthird"}
    system = {"role": "system", "content": "Be terse."}
    opts = {"temperature": 0.5, "stop": ["a", "b"]}
    assert llm.calls == [
        ("chat", [user1], None),
        ("chat", [user1, reply, user2], None),
        ("chat", [user1, reply, user2, reply, system, {"role": "user", "content": "again"}], opts),
        ("chat", [system, {"role": "user", "content": "fresh"}], opts),  # /clear keeps system
    ]
    assert lines.prompts[:4] == [">>> ", ">>> ", "... ", "... "]
    assert lines.items == ["unread"]  # /bye left the loop
    out = r.stdout
    assert "Hello there\n\n" in out
    assert "Set parameter 'temperature' to '0.5'" in out
    assert "Set parameter 'stop' to 'a, b'" in out
    assert "Couldn't set parameter: invalid int value [x]" in out
    assert "Couldn't set parameter: unknown parameter 'nope'" in out
    assert "Set system message." in out and "Cleared session context" in out
    assert "Unknown command '/foo'. Type /? for help" in out


def test_repl_show_and_help(models: Store) -> None:
    lines = Lines("/show info", "/show parameters", "/show system", "/?", "/exit")
    env, _ = fake_env(tty=True, lines=lines)
    r = invoke(["run", "tiny:1"], env)
    assert r.exit_code == 0, r.output
    shown = invoke(["show", "tiny:1"]).stdout
    assert shown in r.stdout  # /show info prints what `herd show` prints
    assert 'stop                           "<end>"' in r.stdout
    assert "Be brief.\nReally.\nVery." in r.stdout
    assert "/set            Set session variables" in r.stdout


def test_repl_ctrl_c_and_ctrl_d() -> None:
    llm = FakeLLM()
    llm.interrupt = True
    out: list[str] = []
    lines = Lines(KeyboardInterrupt(), "tell me", "next", EOFError())
    Repl(llm, lines, write=out.append, write_err=out.append).run()
    text = "".join(out)
    assert "Use Ctrl + d or /bye to exit." in text
    # Ctrl-C stopped the answer after "Hello"; the REPL went on with the next turn
    assert llm.calls[1][1] == [
        {"role": "user", "content": "tell me"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "next"},
    ]
    assert text.endswith("\n")


def test_repl_ctrl_c_cancels_multiline_block() -> None:
    llm = FakeLLM()
    out: list[str] = []
    Repl(llm, Lines('"""start', KeyboardInterrupt(), "fresh", "/bye"), write=out.append).run()
    assert llm.calls == [("chat", [{"role": "user", "content": "fresh"}], None)]


def test_repl_multiline_system_and_verbose() -> None:
    llm = FakeLLM()
    out: list[str] = []
    err: list[str] = []
    lines = Lines('/set system """You are', 'a pirate."""', "/set verbose", "ahoy", "/bye")
    Repl(llm, lines, write=out.append, write_err=err.append).run()
    assert llm.calls[0][1][0] == {"role": "system", "content": "You are\na pirate."}
    assert "eval rate:            20.00 tokens/s" in "".join(err)


def test_repl_engine_error_keeps_going() -> None:
    class Failing(FakeLLM):
        def chat(self, messages: list[dict[str, Any]], **kw: Any) -> Iterator[dict[str, Any]]:
            self.calls.append(("chat", [dict(m) for m in messages], kw.get("options")))
            if len(self.calls) == 1:
                raise OptionError("bad option")
            return self._stream("message")

    llm = Failing()
    out: list[str] = []
    Repl(llm, Lines("one", "two", "/bye"), write=out.append).run()
    assert "Error: bad option\n" in "".join(out)
    assert llm.calls[1][1] == [{"role": "user", "content": "two"}]  # failed turn dropped


# ---------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    "name,values,expected",
    [
        ("temperature", ["0.7"], 0.7),
        ("top_k", ["40"], 40),
        ("seed", ["-1"], -1),
        ("stop", ["<a>", "<b>"], ["<a>", "<b>"]),
        ("use_mmap", ["false"], False),
    ],
    ids=["float", "int", "negative", "list", "bool"],
)
def test_parse_parameter(name: str, values: list[str], expected: object) -> None:
    assert parse_text(name, values) == expected


@pytest.mark.parametrize(
    "name,values,message",
    [
        ("top_k", ["4.5"], "invalid int value [4.5]"),
        ("temperature", ["hot"], "invalid float value [hot]"),
        ("use_mmap", ["maybe"], "invalid bool value [maybe]"),
        ("colour", ["red"], "unknown parameter 'colour'"),
    ],
    ids=["int", "float", "bool", "unknown"],
)
def test_parse_parameter_errors(name: str, values: list[str], message: str) -> None:
    with pytest.raises(OptionError, match=re.escape(message)):
        parse_text(name, values)


@pytest.mark.parametrize(
    "ns,text",
    [
        (0, "0s"),
        (999, "999ns"),
        (1_500, "1.5µs"),
        (1_500_000, "1.5ms"),
        (2_000_000_000, "2s"),
        (61_500_000_000, "1m1.5s"),
        (3_600_000_000_000, "1h0m0s"),
        (4_563_862_583, "4.563862583s"),
    ],
    ids=["zero", "ns", "us", "ms", "s", "m", "h", "precise"],
)
def test_go_duration(ns: int, text: str) -> None:
    assert go_duration(ns) == text


@pytest.mark.parametrize(
    "n,text",
    [
        (512, "512 B"),
        (1_500, "1.5 KB"),
        (98_362_432, "98 MB"),
        (253_113_024, "253 MB"),
        (2_000_000_000, "2 GB"),
        (4_700_000_000, "4.7 GB"),
    ],
    ids=["bytes", "kb", "98mb", "253mb", "2gb", "4.7gb"],
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


@pytest.mark.parametrize(
    "seconds,text",
    [
        (0.2, "Less than a second"),
        (1, "1 second"),
        (45, "45 seconds"),
        (90, "About a minute"),
        (150, "2 minutes"),
        (3700, "About an hour"),
        (5 * 3600, "5 hours"),
        (3 * 86400, "3 days"),
        (20 * 86400, "2 weeks"),
        (90 * 86400, "3 months"),
        (800 * 86400, "2 years"),
    ],
    ids=["sub-second", "1s", "45s", "1m", "2m", "1h", "5h", "3d", "2w", "3mo", "2y"],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


@pytest.mark.parametrize("choice", ["numpy", "mlx", "nosuch"])
def test_show_says_which_backend_runs_the_model(
    models: Store, monkeypatch: pytest.MonkeyPatch, choice: str
) -> None:
    """The backend HERD_BACKEND resolves to and the device it would compute on."""
    from herd.ml import available_backends, default_devices

    if choice == "mlx" and "mlx" not in available_backends():
        pytest.skip("mlx not installed (pip install -e '.[mlx]')")
    monkeypatch.setenv("HERD_BACKEND", choice)
    r = invoke(["show", "tiny:1"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.stdout.splitlines() if x.strip().startswith("backend"))
    expected = {
        "numpy": "numpy (cpu)",
        "mlx": f"mlx ({default_devices('mlx')[0].name})",  # the CPU, named, or the GPU
        "nosuch": "none (unknown backend 'nosuch'",
    }[choice]
    assert line.split(None, 1)[1].startswith(expected), line


def test_the_cli_starts_without_the_engine_libraries() -> None:
    """`herd list`, `ps`, `--help` and a `run` against a server need no NumPy or gguf:
    importing them cost every command ~100 ms before it did anything."""
    import subprocess
    import sys

    code = "import sys, herd.cli.main; print(sorted({'numpy', 'gguf'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
