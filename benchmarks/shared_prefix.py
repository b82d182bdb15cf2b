"""8 slots decoding under one system prompt, the prompt held once for all of them
(HERD_SHARED_PREFIX=1) against a copy in each slot (the default), on the engine alone: a
Runner with 8 slots, the same model and threads, the two modes alternating.

    python -m benchmarks.shared_prefix [--model PATH] [--threads 2] [--rounds 3]

Each round and mode: a fresh runner answers one chat under the system prompt (its slot
then holds it), then 8 chats under it at once; printed: the tokens the wave generated
per second of its wall time, the prompt tokens it computed and took from cache, and the
KV cells in use after it.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from herd.options import Options
from herd.runner import Runner
from herd.runner.loaded import Loaded, Source
from herd.runner.prompt_cache import MIN_TOKENS


def wave(runner: Runner, prompts: list[list[int]], n: int) -> dict[str, float]:
    """The prompts as concurrent requests: tokens generated per second of the wave's
    wall time, prompt tokens computed and taken from cache, and KV cells in use."""
    done = []

    def client(prompt: list[int]) -> None:
        done.append(list(runner.generate(prompt, Options(temperature=0, num_predict=n)))[-1])

    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "tok/s": sum(d.eval_count for d in done) / wall,
        "computed": sum(d.prompt_eval_count for d in done),  # the engine's: computed only
        "cached": sum(d.prompt_cached_count for d in done),
        "cells": runner.cache.used_cells(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/gm/smollm2.gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--system", type=int, default=200, help="system prompt tokens")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    if not Path(args.model).is_file():
        ap.error(f"no model file at {args.model} (give --model PATH to a GGUF)")
    if min(args.threads, args.rounds, args.tokens) < 1:
        ap.error("--threads, --rounds and --tokens must be at least 1")
    if args.system < MIN_TOKENS:  # a shorter prefix is neither shared nor copied
        ap.error(f"--system must be at least {MIN_TOKENS} tokens")
    # a server's default prompt cache: copies come from it or from a busy slot
    loaded = Loaded(Source("m", Path(args.model)), "ggml", {"num_thread": args.threads},
                    prompt_cache=2**30)  # fmt: skip
    options = Options(num_ctx=2048, num_thread=args.threads)
    rates: dict[str, list[float]] = {}
    last: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for mode in ("copied", "shared"):
            loaded.shared_prefix = mode == "shared"  # HERD_SHARED_PREFIX in a server
            rng = np.random.default_rng(0)
            system = [int(t) for t in rng.integers(200, 20000, args.system)]
            runner = loaded.new_runner(options, 8)
            runner.start()
            wave(runner, [system + [int(t) for t in rng.integers(200, 20000, 20)]], 4)
            chats = [system + [int(t) for t in rng.integers(200, 20000, 40)] for _ in range(8)]
            last[mode] = wave(runner, chats, args.tokens)
            rates.setdefault(mode, []).append(last[mode]["tok/s"])
            runner.stop()
            runner.release_graphs()
    for mode, values in rates.items():
        f = last[mode]
        print(f"{mode:7s} median {statistics.median(values):6.1f} tok/s over the wave "
              f"{[round(v, 1) for v in values]}; prompt tokens computed {f['computed']:.0f}, "
              f"cached {f['cached']:.0f}; KV cells in use {f['cells']:.0f}")  # fmt: skip
    ratio = statistics.median(rates["shared"]) / statistics.median(rates["copied"])
    print(f"shared / copied: {ratio:.2f}x")


if __name__ == "__main__":
    main()
