"""herd-onnx's session builds, memory and speed over a chat whose prompts all differ in
length: what shape-polymorphic graphs (one session for every prompt and context length)
change, measured against the same script run on the code before them.

    python -m benchmarks.onnx_sessions [--model smollm2:135m] [--threads 2] [--runs 3]

One process, the ONNX backend only (peers: run it again on another checkout, e.g. one
made with `git archive HEAD`, with PYTHONPATH=<it>/src, in the same minutes). Part 1: a
5-request chat (`LLM.chat`, greedy, 24 tokens each; each request's prompt is the last
one's, its answer and a new question of another length, so every prefill has a new
length): per request, the new prompt tokens, InferenceSessions built so far, the
process's RSS and the request's wall time. Part 2: benchmarks/compare.py's prefill
(256 tokens) and decode (128 tokens) tok/s, the medians of --runs, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.compare import _peak_rss_mb, bench_herd, model_path

QUESTIONS = (
    "What is a planet?",
    "Tell me, in a few sentences and with one example from the solar system, why the moon "
    "shows phases as it goes around the earth each month.",
    "And Venus?",
    "Galileo saw moons around Jupiter with an early telescope in 1610. Explain what that "
    "observation meant for the debate between the geocentric and the heliocentric models "
    "of the sky, who took which side, and why the observation of the phases of Venus that "
    "followed made the case for the sun at the centre so much harder to refuse.",
    "Thanks. Summarize all of that in one line.",
)


def chat(path: str, threads: int) -> list[dict[str, Any]]:
    from herd.api import LLM
    from herd.runner import Source

    opts = {"num_thread": threads, "num_ctx": 1024, "temperature": 0, "num_predict": 24}
    llm = LLM(Source(Path(path).name, Path(path)), backend="onnx", options=opts)
    proc = psutil.Process()
    messages: list[dict[str, Any]] = []
    rows = []
    for q in QUESTIONS:
        messages.append({"role": "user", "content": q})
        t0 = time.perf_counter()
        out = llm.chat(messages, options=opts)
        wall = time.perf_counter() - t0
        assert isinstance(out, dict)
        messages.append(out["message"])
        rows.append(
            {
                "prompt_eval_count": out.get("prompt_eval_count"),
                "eval_count": out.get("eval_count"),
                "sessions": llm.backend.sessions_created,  # type: ignore[attr-defined]
                "rss_mb": round(proc.memory_info().rss / 2**20),
                "wall_s": round(wall, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    llm.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    path = model_path(args.model)
    import herd

    print(f"herd from {Path(herd.__file__).parent}; model {args.model}, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")  # fmt: skip
    rows = chat(path, args.threads)
    print(f"chat: {rows[-1]['sessions']} sessions for 5 requests, RSS {rows[-1]['rss_mb']} MB, "
          f"peak {_peak_rss_mb():.0f} MB, {sum(r['wall_s'] for r in rows):.1f} s")  # fmt: skip
    if not args.skip_speed:
        speed = bench_herd("onnx", path, args.threads, args.runs)
        print("speed:", json.dumps({k: round(v, 2) for k, v in speed.items()}))


if __name__ == "__main__":
    main()
