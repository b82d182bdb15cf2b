"""Two checkouts of herd against each other: did a change move prefill or decode?

    python -m benchmarks.revisions BEFORE_DIR AFTER_DIR [--model smollm2:135m] [--pairs 8]
                                   [--backend ggml|onnx|numpy|mlx]

For a refactor that must not change speed, comparing two `benchmarks.compare` tables run
minutes apart hands the machine's drift to the result (on a shared 2-core VM single
rounds move by 20%). Here the two revisions take turns in child processes, in pairs whose
order alternates (A B, B A, ...), each measured by its own checkout's
`benchmarks.compare.bench_herd` (so each uses its own API), and the ratio is taken within
each pair: after / before, median and range over the pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = (
    "import json, sys; from benchmarks.compare import bench_herd; "
    "print(json.dumps(bench_herd(sys.argv[4], sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))"
)
FIGURES = (("prefill_tps", "prefill tok/s"), ("decode_tps", "decode tok/s"))


def measure(
    checkout: Path,
    path: str,
    threads: int,
    runs: int,
    backend: str = "ggml",
    env: dict[str, str] | None = None,
) -> dict[str, float]:
    """One child process running `checkout`'s herd and its benchmark code (`env`: more
    environment variables for it)."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": f"{checkout / 'src'}{os.pathsep}{checkout}"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, path, str(threads), str(runs), backend],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:  # the child's own last line says why (a bad file, a backend)
        why = (out.stderr.strip().splitlines() or ["no message"])[-1]
        raise ChildFailed(f"the {backend} run of {path} in {checkout} failed: {why}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class ChildFailed(RuntimeError):
    """A measuring child process exited with an error."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per child (median)")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--backend", default="ggml", help="herd's backend both sides run")
    args = ap.parse_args()
    from benchmarks.compare import model_path

    path = model_path(args.model)
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for i in range(args.pairs):
        order = ("before", "after") if i % 2 == 0 else ("after", "before")
        for side in order:
            try:
                result = measure(sides[side], path, args.threads, args.runs, args.backend)
            except ChildFailed as e:
                raise SystemExit(f"revisions: {e}") from None
            results[side].append(result)
        print(f"pair {i + 1}/{args.pairs} done", file=sys.stderr)
    print(f"model {args.model}, {args.backend}, {args.threads} threads, {args.pairs} pairs")
    for key, label in FIGURES:
        before = [r[key] for r in results["before"]]
        after = [r[key] for r in results["after"]]
        ratios = [a / b for a, b in zip(after, before, strict=True)]
        print(
            f"{label}: before {statistics.median(before):.1f}, after {statistics.median(after):.1f}"
            f"; after/before pair by pair {statistics.median(ratios):.3f}x"
            f" ({min(ratios):.2f}–{max(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
