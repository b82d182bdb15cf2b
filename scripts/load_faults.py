"""Load and faults: concurrent streaming clients against a real `herd serve` while its
runner is killed at random and clients leave at random.

    python scripts/load_faults.py --clients 32 --seconds 120 [--seed 1] [--smollm2]

The server runs on a free port with a temporary store holding the tiny random model of
tests/unit/test_runner_faults.py (or, with --smollm2, SmolLM2 135M from the test store in
HERD_CACHE, pulled there if missing), on the NumPy backend with HERD_NUM_PARALLEL=4 (so
most clients queue). Each
client loops until the time is up: a streaming request on one of /api/generate, /api/chat,
/v1/chat/completions, /v1/completions with a random length, leaving after a few lines one
time in five. A killer SIGKILLs the runner every 3 to 10 s.

Every request is counted as completed (its final line or [DONE]), ended with a clear
error (an error object in the stream, or an error status with the API's error body),
left by the client, or hung (no line for --deadline seconds: must be 0). Printed at the
end: the counts, the runners killed, the server's RSS at baseline (after a first request)
and after the run (after a last request; it must be within --rss-tolerance MiB), whether
that last request succeeded, and tracebacks in the server log (must be 0). Exit status 1
when a figure is off.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
MODEL = "load:faults"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_store(tmp: Path, smollm2: bool) -> Path:
    from herd.modelfile import parse
    from herd.store import Store
    from herd.store.create import create

    store = Store(tmp / "models")
    if smollm2:  # from the tests' store (tests/conftest.py), pulled there if missing
        from herd import envconfig
        from herd.store import resolve_or_pull

        source = resolve_or_pull("smollm2:135m", store=Store(envconfig.cache_dir() / "test-models"))
        gguf = source.model_path
    else:
        sys.path.insert(0, str(ROOT / "tests" / "unit"))
        from test_runner_faults import write_chat_model

        gguf = write_chat_model(tmp / "chat.gguf")
    create(store, MODEL, parse(f"FROM {gguf}"), base_dir=tmp)
    return tmp / "models"


def start_server(tmp: Path, store: Path, parallel: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "HERD_MODELS": str(store),
        "HERD_HOST": f"127.0.0.1:{port}",
        "HERD_NUM_PARALLEL": str(parallel),
        "HERD_BACKEND": "numpy",
    }
    env.pop("HERD_API_KEY", None)
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 (the server's lifetime)
    proc = subprocess.Popen(
        [sys.executable, "-m", "herd", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("herd serve did not start; see " + str(tmp / "server.log"))


def request_for(rng: random.Random) -> tuple[str, dict[str, object], bool]:
    """(path, body, openai) of a random streaming request."""
    n = rng.randint(5, 200)
    kind = rng.choice(["generate", "chat", "openai_chat", "openai_completions"])
    opts = {"num_predict": n, "temperature": rng.choice([0, 0.8])}
    messages = [{"role": "user", "content": f"Say something about {rng.randint(0, 99)}."}]
    if kind == "generate":
        return "/api/generate", {"model": MODEL, "prompt": "Tell me", "options": opts}, False
    if kind == "chat":
        return "/api/chat", {"model": MODEL, "messages": messages, "options": opts}, False
    common = {"model": MODEL, "stream": True, "max_tokens": n, "temperature": opts["temperature"]}
    if kind == "openai_chat":
        return "/v1/chat/completions", {**common, "messages": messages}, True
    return "/v1/completions", {**common, "prompt": "Tell me"}, True


def _message(error: object) -> str:
    """An error's message (Ollama's string, OpenAI's object), cut to group alike ones."""
    text = error.get("message") if isinstance(error, dict) else error
    return str(text)[:70]


def one_request(
    url: str, rng: random.Random, deadline: float, counts: collections.Counter[str]
) -> None:
    path, body, openai = request_for(rng)
    leave_after = rng.randint(1, 10) if rng.random() < 0.2 else None
    timeout = httpx.Timeout(deadline, connect=10)
    t0 = time.monotonic()
    try:
        with httpx.stream("POST", url + path, json=body, timeout=timeout) as r:
            if r.status_code != 200:
                error = json.loads(r.read()).get("error")
                counts["error" if error else "unclear_error"] += 1
                counts[f"status_{r.status_code}"] += 1
                counts["error: " + _message(error)] += 1
                return
            seen = 0
            for line in r.iter_lines():
                if not line.strip():
                    continue
                seen += 1
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    counts["completed"] += 1
                    return
                msg = json.loads(data)
                if "error" in msg:
                    counts["error"] += 1
                    counts["error: " + _message(msg["error"])] += 1
                    return
                if not openai and msg.get("done"):
                    counts["completed"] += 1
                    return
                if leave_after is not None and seen >= leave_after:
                    counts["left"] += 1
                    return
                if time.monotonic() - t0 > 10 * deadline:
                    counts["hung"] += 1  # streaming, but far beyond any request's length
                    return
            counts["ended_without_final_line"] += 1
    except httpx.TimeoutException:
        counts["hung"] += 1
    except (httpx.HTTPError, ValueError) as e:
        counts["transport_error: " + type(e).__name__] += 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--deadline", type=float, default=60, help="seconds without a line: hung")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--rss-tolerance", type=float, default=64, help="MiB over the baseline")
    p.add_argument("--smollm2", action="store_true", help="SmolLM2 135M instead of a tiny model")
    args = p.parse_args()
    print(f"seed {args.seed}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="herd-load-"))
    store = make_store(tmp, args.smollm2)
    server, url = start_server(tmp, store, args.parallel)
    me = psutil.Process(server.pid)
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    try:
        first = httpx.post(
            url + "/api/generate",
            json={"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 4}},
            timeout=120,
        )
        assert first.status_code == 200, first.text
        baseline = me.memory_info().rss
        stop_at = time.monotonic() + args.seconds
        kills = 0

        def client(i: int) -> None:
            rng = random.Random(args.seed * 1000 + i)
            mine: collections.Counter[str] = collections.Counter()
            while time.monotonic() < stop_at:
                mine["requests"] += 1
                one_request(url, rng, args.deadline, mine)
            with lock:
                counts.update(mine)

        def killer() -> None:
            nonlocal kills
            rng = random.Random(args.seed)
            while True:
                wait = rng.uniform(3, 10)
                if time.monotonic() + wait > stop_at:
                    return
                time.sleep(wait)
                for child in me.children():
                    if "herd.runner.serve" in " ".join(child.cmdline()):
                        os.kill(child.pid, signal.SIGKILL)
                        kills += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        threads.append(threading.Thread(target=killer))
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - t0
        time.sleep(2)
        last = httpx.post(
            url + "/api/generate",
            json={"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 4}},
            timeout=120,
        )
        after = me.memory_info().rss
        alive = server.poll() is None
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
    log = (tmp / "server.log").read_text(errors="replace")
    tracebacks = log.count("Traceback (most recent call last)")
    grew = (after - baseline) / 2**20
    report = {
        "clients": args.clients,
        "seconds": round(took, 1),
        "requests": counts["requests"],
        "completed": counts["completed"],
        "ended_with_error": counts["error"],
        "left_by_client": counts["left"],
        "hung": counts["hung"],
        "other": {
            k: v for k, v in counts.items() if k.startswith(("transport", "ended", "unclear"))
        },
        "errors_by_message": {k[7:]: v for k, v in counts.items() if k.startswith("error: ")},
        "statuses": {k: v for k, v in counts.items() if k.startswith("status_")},
        "runners_killed": kills,
        "server_rss_mib": {
            "baseline": round(baseline / 2**20, 1),
            "after": round(after / 2**20, 1),
        },
        "rss_growth_mib": round(grew, 1),
        "rss_tolerance_mib": args.rss_tolerance,
        "last_request_ok": last.status_code == 200 and bool(last.json().get("done")),
        "server_alive": alive,
        "tracebacks_in_log": tracebacks,
        "log": str(tmp / "server.log"),
    }
    print(json.dumps(report, indent=2))
    unclear = sum(report["other"].values()) + counts["unclear_error"]  # type: ignore[arg-type]
    ok = (
        counts["hung"] == 0
        and unclear == 0
        and grew <= args.rss_tolerance
        and report["last_request_ok"]
        and alive
        and tracebacks == 0
    )
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
