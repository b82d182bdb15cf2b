"""The servers benchmarks/serving.py drives, each a child process on a free local port.

Every server gets the same model file, threads and context per sequence:
- herd: `herd serve` with HERD_NUM_PARALLEL slots and HERD_CONTEXT_LENGTH per slot (herd's
  num_ctx is each sequence's context; its KV cache holds parallel x num_ctx cells), and the
  model made through `/api/create` with `num_thread` and `num_ctx` (the OpenAI API has no
  options), then loaded with an empty `/api/generate`, as Ollama loads one.
- llama-server: built by scripts/build_llama_server.py from the llama.cpp source herd's
  ggml comes from; `-c` is the total context, so `-c parallel*ctx --parallel parallel`.
- flash attention: each server's default unless `--flash-attn on|off` sets both (herd's is
  off on a CPU, llama-server's `auto` turns it on there: their defaults differ in kernels).
- llama-cpp-python's OpenAI server: one request at a time (`--interrupt_requests False`,
  else a new request cuts the running stream short), context `ctx`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("herd", "herd-shared", "llama-server", "llama-cpp-python")  # what `start` runs


@dataclass
class Setup:
    store: Path  # herd's model store
    model: str  # its name there
    path: Path  # the GGUF blob every server reads
    threads: int
    ctx: int  # context per sequence
    parallel: int  # slots (herd's HERD_NUM_PARALLEL, llama-server's --parallel)
    backend: str  # herd's backend, "auto" for its best
    logs: Path  # each server's output goes to a file here
    # "on"/"off" for herd and llama-server alike; "default": each its own (herd: off on a
    # CPU, for exactness; llama-server: auto, which turns it on for a CPU)
    flash_attn: str = "default"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"server exited with {proc.returncode}; its log ends:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code < 500:  # llama-server: 503 while loading
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout:g}s (log: {log})")


@contextlib.contextmanager
def process(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


@contextlib.contextmanager
def herd_server(s: Setup, shared: bool = False) -> Iterator[tuple[str, str]]:
    """`shared`: HERD_SHARED_PREFIX=1, one copy of a common system prompt for all slots
    (the `herd-shared` peer), else the default (each slot its own copy)."""
    port = free_port()
    env = thread_env(s.threads) | {
        "HERD_MODELS": str(s.store),
        "HERD_HOST": f"127.0.0.1:{port}",
        "HERD_NUM_PARALLEL": str(s.parallel),
        "HERD_CONTEXT_LENGTH": str(s.ctx),
        "HERD_KEEP_ALIVE": "-1",
        "HERD_SHARED_PREFIX": "1" if shared else "0",
    }
    env.pop("HERD_API_KEY", None)
    if s.flash_attn != "default":
        env["HERD_FLASH_ATTENTION"] = "1" if s.flash_attn == "on" else "0"
    if s.backend != "auto":
        env["HERD_BACKEND"] = s.backend
    url, log = f"http://127.0.0.1:{port}", s.logs / ("herd-shared.log" if shared else "herd.log")
    with process([sys.executable, "-m", "herd", "serve"], env, log) as proc:
        wait_up(url, proc, log)
        name = "bench-serving:latest"
        params = {"num_thread": s.threads, "num_ctx": s.ctx}
        body = {"model": name, "from": s.model, "stream": False, "parameters": params}
        httpx.post(f"{url}/api/create", json=body, timeout=600).raise_for_status()
        load = {"model": name, "keep_alive": -1}
        httpx.post(f"{url}/api/generate", json=load, timeout=600).raise_for_status()
        try:
            yield url, name
        finally:
            with contextlib.suppress(httpx.HTTPError):
                httpx.request("DELETE", f"{url}/api/delete", json={"model": name}, timeout=30)


def llama_server_binary(explicit: str | None) -> Path:
    """--llama-server's path, else the cached build (built now when there is none)."""
    if explicit:
        return Path(explicit)
    sys.path.insert(0, str(ROOT / "scripts"))
    from build_llama_server import ensure

    return ensure()


@contextlib.contextmanager
def llama_server(s: Setup, binary: Path) -> Iterator[tuple[str, str]]:
    port, t = free_port(), str(s.threads)
    cmd = [str(binary), "-m", str(s.path), "-t", t, "-tb", t]
    cmd += ["-c", str(s.parallel * s.ctx), "--parallel", str(s.parallel)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    if s.flash_attn != "default":
        cmd += ["--flash-attn", s.flash_attn]
    url, log = f"http://127.0.0.1:{port}", s.logs / "llama-server.log"
    with process(cmd, thread_env(s.threads), log) as proc:
        wait_up(f"{url}/health", proc, log)
        yield url, "model"


@contextlib.contextmanager
def llama_cpp_python_server(s: Setup) -> Iterator[tuple[str, str]]:
    port, t = free_port(), str(s.threads)
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(s.path)]
    cmd += ["--n_threads", t, "--n_threads_batch", t, "--n_ctx", str(s.ctx)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--interrupt_requests", "False"]
    url, log = f"http://127.0.0.1:{port}", s.logs / "llama-cpp-python.log"
    with process(cmd, thread_env(s.threads), log) as proc:
        wait_up(f"{url}/v1/models", proc, log)
        yield url, "model"


def start(name: str, s: Setup, binary: Path | None) -> contextlib.AbstractContextManager:
    if name in ("herd", "herd-shared"):
        return herd_server(s, shared=name == "herd-shared")
    if name == "llama-server":
        assert binary is not None
        return llama_server(s, binary)
    if name == "llama-cpp-python":
        return llama_cpp_python_server(s)
    raise SystemExit(f"unknown server {name!r} ({', '.join(SERVERS)})")
