"""herd-onnx's cold load to a first token with its disk cache of compiled sessions and
without it (`HERD_ONNX_CACHE=0`): what the cache saves a second process.

    python -m benchmarks.onnx_cache [--model smollm2:135m ...] [--pairs 5] [--threads 2]

Each load is a fresh child process timed by `benchmarks.compare.bench_herd` (its cold load
to the first token), started as `benchmarks.revisions` starts its own. The cache lives in a
temporary `HERD_CACHE`, filled by one load first; then cached and uncached loads alternate
in pairs whose order flips (A B, B A, ...), so the machine's drift falls on both. Prints the
medians, ranges and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

from benchmarks import revisions

MODES = ("cached", "uncached")
ROOT = Path(__file__).resolve().parent.parent


def cold_load(path: str, threads: int, cache: str, mode: str) -> float:
    """One child process's cold load to a first token, seconds (`revisions.measure`: this
    checkout's herd, one timed run)."""
    env = {"HERD_CACHE": cache, "HERD_ONNX_CACHE": "0" if mode == "uncached" else "1"}
    return float(revisions.measure(ROOT, path, threads, 1, "onnx", env)["cold_s"])


def measure(pairs: int, load: Callable[[str], float]) -> dict[str, list[float]]:
    """`load(mode)` once to fill the cache, then `pairs` pairs, the order flipping."""
    load("cached")
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for i in range(pairs):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            times[mode].append(load(mode))
    return times


def line(model: str, times: dict[str, list[float]]) -> str:
    med = {m: statistics.median(t) for m, t in times.items()}
    span = {m: f"{min(t):.2f}-{max(t):.2f}" for m, t in times.items()}
    return (
        f"{model}: cold load to the first token {med['cached']:.2f} s cached "
        f"(runs {span['cached']}), {med['uncached']:.2f} s with HERD_ONNX_CACHE=0 "
        f"(runs {span['uncached']}): {med['uncached'] / med['cached']:.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="a model name or GGUF path (repeatable)")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.pairs < 1 or args.threads < 1:
        ap.error("--pairs and --threads must be at least 1")
    from benchmarks.compare import model_path
    from herd.errors import HerdError

    for model in args.model or ["smollm2:135m"]:
        try:
            path = model_path(model)
            with tempfile.TemporaryDirectory(prefix="herd-onnx-cache-") as cache:
                times = measure(args.pairs, partial(cold_load, path, args.threads, cache))
        except (HerdError, revisions.ChildFailed) as e:
            raise SystemExit(f"onnx_cache: {model}: {e}") from None
        print(line(model, times), flush=True)


if __name__ == "__main__":
    main()
