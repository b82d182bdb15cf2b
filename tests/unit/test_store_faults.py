"""The store under faults: a full disk during create, pull and convert; Ctrl-C during a
pull (in-process and a real SIGINT); a server-side pull whose client leaves; `herd serve`
on a port another process holds.

The full disk is `OSError(ENOSPC)` raised part way through the write path (the blob
writer, a part's state file, the converter's output), the way a real one surfaces.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _store_helpers import write_gguf
from click.testing import CliRunner
from test_catalog_pull import Env
from test_registry_faults import FAST, FakeRegistry, assert_no_model, leftovers, serving

from herd.cli.env import CliEnv
from herd.cli.main import cli
from herd.errors import DownloadError, HerdError
from herd.modelfile import parse
from herd.registry import Options, pull
from herd.store import Store
from herd.store.create import create
from herd.store.layout import BlobWriter

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


class _FullFile:
    """A blob writer's file on a disk that just filled: writes and the flush on close fail."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def write(self, data: bytes) -> int:
        raise ENOSPC

    def fileno(self) -> int:
        return int(self.real.fileno())

    def flush(self) -> None:
        raise ENOSPC

    def close(self) -> None:
        self.real.close()
        raise ENOSPC


def disk_fills(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The disk fills at the second BlobWriter write: the first chunk lands; the lengths of
    the writes are returned."""
    calls: list[int] = []
    original = BlobWriter.write

    def write(self: BlobWriter, data: bytes | memoryview) -> None:
        calls.append(len(data))
        if len(calls) == 2:
            self._file = _FullFile(self._file)  # type: ignore[assignment]
        original(self, data)

    monkeypatch.setattr(BlobWriter, "write", write)
    return calls


def _in_chunks(size: int) -> Any:
    """`read_member` yielding `size`-byte chunks, so a small blob takes several writes."""
    from herd.store.wheels import read_member

    def read(path: Path, member: str) -> Iterator[bytes]:
        data = b"".join(read_member(path, member))
        for i in range(0, len(data), size):
            yield data[i : i + size]

    return read


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    write_gguf(tmp_path / "tiny.gguf")
    return tmp_path


def test_disk_full_during_create_leaves_the_store_as_it_was(
    src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(src / "models")
    create(store, "old:1", parse("FROM ./tiny.gguf\nSYSTEM hi"), base_dir=src)
    before = _files(store.root)
    monkeypatch.setattr("herd.store.create._COPY_CHUNK", 256)  # the copy takes several writes
    calls = disk_fills(monkeypatch)
    write_gguf(src / "other.gguf", extra={"general.name": "other"})
    with pytest.raises(HerdError, match="no space left on device") as e:
        create(store, "new:1", parse("FROM ./other.gguf"), base_dir=src)
    assert "Traceback" not in str(e.value) and len(calls) == 2
    assert _files(store.root) == before  # no temp file, no blob, no manifest


def test_disk_full_during_convert_leaves_the_store_as_it_was(
    src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from convert.handmade import make_dir

    from herd.convert import driver

    make_dir(src)  # a tiny BERT in src/hf
    store = Store(src / "models")
    create(store, "old:1", parse("FROM ./tiny.gguf"), base_dir=src)
    before = _files(store.root)
    written: list[int] = []
    original = driver.GGUFStream.tensor

    def tensor(self: Any, data: Any) -> None:
        written.append(1)
        if len(written) == 3:
            raise ENOSPC
        original(self, data)

    monkeypatch.setattr(driver.GGUFStream, "tensor", tensor)
    with pytest.raises(HerdError, match="no space left on device"):
        create(store, "bert:1", parse("FROM ./hf"), base_dir=src)
    assert len(written) == 3
    assert _files(store.root) == before
    assert sorted(p.name for p in store.root.iterdir()) == ["blobs", "manifests"]  # no temp dir


def test_disk_full_during_a_catalog_pull_leaves_the_store_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from _store_helpers import gguf_bytes

    env = Env(tmp_path, gguf_bytes(tmp_path))
    pull_module = importlib.import_module("herd.store.pull")  # `herd.store.pull` is a function
    monkeypatch.setattr(pull_module, "read_member", _in_chunks(256))
    calls = disk_fills(monkeypatch)
    with pytest.raises(DownloadError, match="no space left on device") as e:
        env.pull()
    assert "pulling tiny:1m" in str(e.value) and len(calls) == 2
    assert env.store_files() == []
    assert "writing manifest" not in [x[0] for x in env.events]


def test_disk_full_during_a_registry_pull_removes_what_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blob's bytes are in its partial file when the part's state save fills the disk:
    the partial files go (their space is what ran out), no blob, no manifest."""
    from herd.registry import parts

    saves: list[str] = []
    original = parts.write_part

    def write_part(path: Path, part: parts.Part) -> None:
        saves.append(path.name)
        if part.completed:
            raise ENOSPC
        original(path, part)

    monkeypatch.setattr(parts, "write_part", write_part)
    with serving(FakeRegistry()) as fake:
        store = Store(tmp_path / "models")
        with pytest.raises(DownloadError, match="no space left on device"):
            pull(store, fake.name, Options(**FAST))
        assert leftovers(store) == []
        assert fake.model_requests() == ["bytes=0-0", f"bytes=0-{len(fake.blob) - 1}"]


# ---- Ctrl-C ---------------------------------------------------------------------------------
def test_ctrl_c_in_a_pull_stops_every_part_at_once(tmp_path: Path) -> None:
    """Ctrl-C (KeyboardInterrupt from the progress callback, as a signal handler would
    raise it) ends a 4-part pull in well under a second; it was suppressed around the
    download futures, which waited for every dripping part."""
    with serving(FakeRegistry(mode="drip")) as fake:
        store = Store(tmp_path / "models")

        pressed: list[bool] = []

        def progress(status: str, digest: Any, total: Any, completed: Any) -> None:
            if completed and not pressed:  # once, in whichever part got the first byte
                pressed.append(True)
                raise KeyboardInterrupt

        options = Options(**{**FAST, "part_min": 1, "parts": 4})
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            pull(store, fake.name, options, progress)
        assert time.monotonic() - started < 3
        assert_no_model(store, fake, partial_ok=True)
        states = [json.loads(p.read_bytes()) for p in store.blobs_dir.glob("*-partial-*")]
        assert len(states) == 4 and sum(s["Completed"] for s in states) >= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigint_stops_herd_pull_with_a_clean_message(tmp_path: Path) -> None:
    with serving(FakeRegistry(mode="drip")) as fake:
        env = {
            **os.environ,
            "HERD_MODELS": str(tmp_path / "models"),
            "HERD_HOST": f"127.0.0.1:{_free_port()}",  # no server there: pull in-process
            "PYTHONUNBUFFERED": "1",
            "PYTHONFAULTHANDLER": "1",  # a SIGABRT below prints every thread's stack
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "herd", "pull", "--insecure", fake.name],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_sigint_as_at_a_terminal,
        )
        try:
            deadline = time.monotonic() + 30
            while len(fake.model_requests()) < 2:  # the probe, then a dripping part
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, fake.log
                time.sleep(0.05)
            time.sleep(0.2)
            sent = time.monotonic()
            proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                pytest.fail(_stuck(proc))
            took = time.monotonic() - sent
        finally:
            proc.kill()
    text = err.decode()
    assert proc.returncode == 130, text
    assert took < 4, took
    assert "Traceback" not in text
    assert text.strip().splitlines()[-1] == (
        f"Error: pull interrupted: `herd pull {fake.name}` resumes it"
    )


def _sigint_as_at_a_terminal() -> None:
    """The child's SIGINT at its default, as a command typed at a terminal has it. A shell
    starts a background job (`make test &`) with SIGINT ignored, its children inherit that,
    and Python keeps an inherited SIG_IGN rather than raise KeyboardInterrupt: the pull
    then rightly ran on (its /proc status showed SigIgn 0x...07, SIGHUP, SIGINT, SIGQUIT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stuck(proc: subprocess.Popen[bytes]) -> str:
    """Why a child ignored SIGINT: its signal state (blocked, ignored, caught, pending; bit
    2 is SIGINT) and, through faulthandler on SIGABRT, where each of its threads was."""
    try:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        state = " ".join(ln for ln in status.splitlines() if ln.startswith(("Sig", "ShdPnd")))
    except OSError as e:
        state = f"(no /proc status: {e})"
    proc.send_signal(signal.SIGABRT)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return f"herd pull ran on 10 s after SIGINT; {state}\n{err.decode(errors='replace')[-6000:]}"


# ---- the server ---------------------------------------------------------------------------
@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """A real `herd serve` app (uvicorn in a thread) on a free port; its base URL."""
    import uvicorn

    from herd import envconfig
    from herd.server.app import Settings, create_app

    port = _free_port()
    settings = Settings(Store(tmp_path / "served"), envconfig.parse_host(f"127.0.0.1:{port}"))
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="error")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


def test_a_server_side_pull_stops_when_its_client_leaves(server: str) -> None:
    with serving(FakeRegistry(mode="drip")) as fake:
        body = {"model": fake.name, "insecure": True}
        with (
            httpx.Client(base_url=server, timeout=10) as http,
            http.stream("POST", "/api/pull", json=body) as r,
        ):
            for line in r.iter_lines():
                if json.loads(line).get("completed"):
                    break  # bytes are moving: now the client goes away
        left = time.monotonic()
        seen = len(fake.log)
        while fake.dripping and time.monotonic() - left < 5:
            time.sleep(0.05)
        assert not fake.dripping, "the registry is still being read after the client left"
        time.sleep(0.3)
        assert len(fake.log) == seen  # and the pull asked for nothing more


# ---- herd serve on a busy port --------------------------------------------------------------
def test_serve_on_a_busy_port_fails_before_claiming_to_listen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv("HERD_HOST", f"127.0.0.1:{port}")
        monkeypatch.setenv("HERD_MODELS", str(tmp_path / "models"))
        r = CliRunner().invoke(cli, ["serve"], obj=CliEnv())
    assert r.exit_code == 1, r.output
    assert r.stderr.strip().splitlines() == [
        f"Error: cannot listen on 127.0.0.1:{port}: address already in use (is another herd "
        "or ollama server running? set HERD_HOST to use another port)"
    ]
    assert "listening on" not in caplog.text + r.output
