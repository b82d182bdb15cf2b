"""One client's decode rate after 8 cached conversations, with and without the cache's
compaction (README, "Serving": 121 -> 70 tok/s when a new chat's cells lay apart from its
kept prefix), on the engine alone: a Runner with 8 slots, the same model and threads.

    python -m benchmarks.cache_layout [--model PATH] [--threads 2] [--rounds 3]

Each round: a fresh runner, one chat alone (the fresh rate); a fresh runner, 8 chats at
once that share a 30-token opening (their conversations stay cached), then one more chat
keeping that opening (the rate after). Compaction off and on alternate in each round;
medians are printed with the cells the last decode step attended.
"""

from __future__ import annotations

import argparse
import statistics
import threading
from pathlib import Path

import numpy as np

from herd.kvcache import compact
from herd.options import Options
from herd.runner import Runner
from herd.runner.loaded import Loaded, Source

OPENING = list(range(100, 130))  # the chats' shared opening, as a template's would be


def decode_rate(runner: Runner, prompt: list[int], n: int) -> float:
    done = list(runner.generate(prompt, Options(temperature=0, num_predict=n)))[-1]
    return done.eval_count / (done.eval_duration / 1e9)  # the engine's own decode timing


def chat(rng: np.random.Generator, length: int) -> list[int]:
    return OPENING + [int(t) for t in rng.integers(200, 20000, length)]


def after_waves(runner: Runner, rng: np.random.Generator, n: int) -> float:
    def client(prompt: list[int]) -> None:
        list(runner.generate(prompt, Options(temperature=0, num_predict=64)))

    threads = [threading.Thread(target=client, args=(chat(rng, 100),)) for _ in range(8)]
    runner.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    runner.stop()
    moved = runner.cache.stats()["cells_moved"]
    rate = decode_rate(runner, chat(rng, 130), n)
    print(f"cells moved for the last chat: {runner.cache.stats()['cells_moved'] - moved:.0f}")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/gm/smollm2.gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    loaded = Loaded(Source("m", Path(args.model)), "ggml", {"num_thread": args.threads})
    options = Options(num_ctx=2048, num_thread=args.threads)
    scattered = compact.scattered
    rates: dict[str, list[float]] = {}
    spans: dict[str, int] = {}
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            if mode == "off":  # placement as before this change: no moves
                compact.scattered = lambda *a: False  # type: ignore[assignment]
            else:
                compact.scattered = scattered
            rng = np.random.default_rng(0)
            fresh = loaded.new_runner(options, 8)
            rates.setdefault(f"fresh {mode}", []).append(
                decode_rate(fresh, chat(rng, 130), args.tokens)
            )
            fresh.release_graphs()
            runner = loaded.new_runner(options, 8)
            rates.setdefault(f"after 8 {mode}", []).append(after_waves(runner, rng, args.tokens))
            spans[mode] = runner.cache.hi - runner.cache.lo
            print(mode, runner.cache.stats(), flush=True)
            runner.release_graphs()
    compact.scattered = scattered
    for name, values in rates.items():
        each = [round(v, 1) for v in values]
        print(f"{name:12s} median {statistics.median(values):6.1f} tok/s  {each}")
    print("cells attended by the last step:", spans)


if __name__ == "__main__":
    main()
