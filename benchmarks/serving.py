"""Serving: `herd serve` against llama-cpp-python's OpenAI server, same model and threads.

    python -m benchmarks.serving [--model smollm2:135m] [--threads 2] [--clients 1,4,8]
                                 [--tokens 64] [--rounds 2] [--repeat 2] [--backend auto]

Both servers run as child processes, side by side, and are driven the same way: streamed
`/v1/chat/completions` (temperature 0) from 1, 4 and 8 concurrent clients, each sending
`--rounds` chats in a row, the servers taking turns (one works while the other idles).
Reported per server: aggregate generated tokens/s (all tokens over the wall time of the
whole wave), time to first token p50/p95, and for a multi-turn chat (a long first turn,
then a short follow-up that re-sends the conversation) the time to first token of each
turn. Everything runs `--repeat` times and the best run counts, so that a burst of other
work on a shared machine does not decide the table. llama-cpp-python's server runs one
request at a time (`--interrupt_requests False`, else a new request cuts the running
stream short); herd batches the concurrent ones (HERD_NUM_PARALLEL = most clients) and
reuses cached prefixes across requests.

herd's server gets the model through `/api/create` with `num_thread` and `num_ctx` as
parameters (the OpenAI API has no options), so both engines use the same threads and
context. Tokens are counted from the usage chunk when the server sends one
(`stream_options.include_usage`), else as content chunks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

TOPICS = [
    "a lighthouse keeper",
    "a lost robot",
    "a dragon who bakes bread",
    "a city under the sea",
    "a clockmaker's apprentice",
    "a comet",
    "a talking cat",
    "the last library on Earth",
]
DOCUMENT = (
    "The history of astronomy is the story of how people came to understand the sky. "
    "Early observers tracked the motion of the sun, the moon and the planets, and built "
    "calendars from their cycles. Later, telescopes revealed moons around Jupiter, phases "
    "of Venus and countless stars in the Milky Way. Spectroscopy showed what stars are "
    "made of, and photography let astronomers measure their light precisely. "
) * 6


@dataclass
class Result:
    ttft: float  # seconds to the first content chunk
    tokens: int
    elapsed: float


@dataclass
class Wave:
    clients: int
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.results) / self.wall

    def ttft(self, q: float) -> float:
        values = sorted(r.ttft for r in self.results)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]


@dataclass
class Measured:
    waves: dict[int, Wave]
    turn1: float  # median TTFT of the multi-turn chat's first turn, s
    turn2: float  # ... and of its second turn


# ---- servers ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout:g}s")


@contextlib.contextmanager
def _process(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
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


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


@contextlib.contextmanager
def herd_server(
    store: Path, model: str, args: argparse.Namespace, tmp: Path
) -> Iterator[tuple[str, str]]:
    port = _free_port()
    env = _env(args.threads) | {
        "HERD_MODELS": str(store),
        "HERD_HOST": f"127.0.0.1:{port}",
        "HERD_NUM_PARALLEL": str(max(args.clients)),
        "HERD_KEEP_ALIVE": "-1",
    }
    env.pop("HERD_API_KEY", None)
    if args.backend != "auto":
        env["HERD_BACKEND"] = args.backend
    url = f"http://127.0.0.1:{port}"
    with _process([sys.executable, "-m", "herd", "serve"], env, tmp / "herd.log") as proc:
        _wait_up(url, proc)
        name = "bench-serving:latest"
        r = httpx.post(
            f"{url}/api/create",
            timeout=600,
            json={
                "model": name,
                "from": model,
                "stream": False,
                "parameters": {"num_thread": args.threads, "num_ctx": args.ctx},
            },
        )
        r.raise_for_status()
        try:
            yield url, name
        finally:
            httpx.request("DELETE", f"{url}/api/delete", json={"model": name})


@contextlib.contextmanager
def llama_cpp_server(path: Path, args: argparse.Namespace, tmp: Path) -> Iterator[tuple[str, str]]:
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(path),
        "--n_threads",
        str(args.threads),
        "--n_threads_batch",
        str(args.threads),
        "--n_ctx",
        str(args.ctx),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--interrupt_requests",  # by default a new request cuts the running stream short
        "False",
    ]
    url = f"http://127.0.0.1:{port}"
    with _process(cmd, _env(args.threads), tmp / "llama-cpp.log") as proc:
        _wait_up(f"{url}/v1/models", proc)
        yield url, "model"


# ---- clients ------------------------------------------------------------------------------
def chat(
    url: str, model: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[Result, str]:
    """One streamed chat completion: its timing, token count and text."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first, chunks, usage, text = 0.0, 0, None, []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if msg.get("usage"):
                usage = msg["usage"].get("completion_tokens")
            for choice in msg.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter() - t0
                    chunks += 1
                    text.append(piece)
    elapsed = time.perf_counter() - t0
    return Result(first or elapsed, usage if usage is not None else chunks, elapsed), "".join(text)


def wave(url: str, model: str, clients: int, rounds: int, tokens: int, take: int = 0) -> Wave:
    """`clients` threads at once, each sending `rounds` chats in a row (prompts differ by
    `take`, so that a repeated wave finds nothing but the system prompt cached)."""
    out = Wave(clients)
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    errors: list[Exception] = []

    def client(i: int) -> None:
        start.wait()
        try:
            for k in range(rounds):
                topic = TOPICS[(i + k * clients) % len(TOPICS)]
                ask = f"Story {take}: tell me a story about {topic}."
                messages = [{"role": "user", "content": ask}]
                result, _ = chat(url, model, messages, tokens)
                with lock:
                    out.results.append(result)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    out.wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return out


def two_turns(url: str, model: str, tokens: int, take: int = 0) -> tuple[float, float]:
    """TTFT of a long first turn and of the follow-up that re-sends the conversation."""
    text = f"Document {take}. {DOCUMENT}\n\nSummarize this in a few words."
    messages = [{"role": "user", "content": text}]
    first, answer = chat(url, model, messages, tokens)
    messages += [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Now say which century it starts in."},
    ]
    second, _ = chat(url, model, messages, tokens)
    return first.ttft, second.ttft


def measure(servers: dict[str, tuple[str, str]], args: argparse.Namespace) -> dict[str, Measured]:
    """Every wave and multi-turn chat, servers taking turns, `--repeat` times; the best
    of each (the machine may be shared: the least disturbed run shows the engine)."""
    for url, model in servers.values():
        chat(url, model, [{"role": "user", "content": "Hello!"}], 4)  # load and warm up
    best: dict[str, dict[int, Wave]] = {name: {} for name in servers}
    turns: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
    for take in range(args.repeat):
        for n in args.clients:
            for name, (url, model) in servers.items():
                w = wave(url, model, n, args.rounds, args.tokens, take)
                print(f"  {name}, {n} clients: {w.tokens_per_s:.1f} tok/s", file=sys.stderr)
                if n not in best[name] or w.tokens_per_s > best[name][n].tokens_per_s:
                    best[name][n] = w
        for name, (url, model) in servers.items():
            turns[name].append(two_turns(url, model, args.tokens, take))
    return {
        name: Measured(best[name], min(t[0] for t in turns[name]), min(t[1] for t in turns[name]))
        for name in servers
    }


# ---- report -------------------------------------------------------------------------------
def table(results: dict[str, Measured], args: argparse.Namespace) -> str:
    herd, peer = results.get("herd"), results.get("llama-cpp-python")
    lines = [
        f"model {args.model}, {args.threads} threads, {args.tokens} tokens per reply, "
        f"{args.rounds} chats per client, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}",
        "",
        "| clients | herd tok/s | llama-cpp-python tok/s | herd / llama-cpp-python | "
        "herd TTFT p50 / p95 s | llama-cpp-python TTFT p50 / p95 s |",
        "|---|---|---|---|---|---|",
    ]

    def cells(r: Measured | None, n: int) -> tuple[str, str]:
        if r is None:
            return "-", "-"
        w = r.waves[n]
        return f"{w.tokens_per_s:.1f}", f"{w.ttft(0.5):.2f} / {w.ttft(0.95):.2f}"

    for n in args.clients:
        (h_tps, h_ttft), (p_tps, p_ttft) = cells(herd, n), cells(peer, n)
        ratio = "-"
        if herd and peer:
            ratio = f"{herd.waves[n].tokens_per_s / peer.waves[n].tokens_per_s:.2f}x"
        lines.append(f"| {n} | {h_tps} | {p_tps} | {ratio} | {h_ttft} | {p_ttft} |")
    lines += [
        "",
        "| multi-turn chat | turn 1 TTFT s | turn 2 TTFT s | turn 2 / turn 1 |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r.turn1:.2f} | {r.turn2:.2f} | {r.turn2 / r.turn1:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--models", help="store folder (default: HERD_MODELS)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="best of this many runs")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--backend", default="auto", help="herd's backend (auto picks its best)")
    ap.add_argument("--servers", default="herd,llama-cpp-python")
    ap.add_argument("--json", help="also write the raw numbers here")
    args = ap.parse_args()
    args.clients = [int(n) for n in args.clients.split(",")]

    from herd.store import Store, resolve_or_pull

    store = Store(args.models) if args.models else Store()
    path = Path(resolve_or_pull(args.model, store=store).model_path)
    with tempfile.TemporaryDirectory(prefix="herd-bench-") as tmp, contextlib.ExitStack() as stack:
        servers = {}
        for name in args.servers.split(","):
            print(f"starting {name}...", file=sys.stderr, flush=True)
            server = (
                herd_server(store.root, args.model, args, Path(tmp))
                if name == "herd"
                else llama_cpp_server(path, args, Path(tmp))
            )
            servers[name] = stack.enter_context(server)
        results = measure(servers, args)
    print(table(results, args))
    if args.json:
        raw = {
            name: {
                "waves": {
                    n: {"wall": w.wall, "requests": [vars(x) for x in w.results]}
                    for n, w in r.waves.items()
                },
                "turn1": r.turn1,
                "turn2": r.turn2,
            }
            for name, r in results.items()
        }
        Path(args.json).write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
