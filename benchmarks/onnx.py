"""herd's ONNX Runtime backend against onnxruntime-genai (Microsoft's LLM runtime on ONNX
Runtime) and herd-ggml, on the same model, machine and threads, in one run.

    python -m benchmarks.onnx [--model smollm2:135m] [--threads 2] [--rounds 3] [--runs 3]
                              [--engines onnxruntime-genai,herd-onnx,herd-ggml]

As benchmarks/compare.py: each engine runs in a fresh child process per round (its cold load
and peak RSS are its own), the engines take turns (A B C, C B A, ...), and every figure is
the median over the rounds of the median of --runs: prefill tok/s on a 256-token prompt,
decode tok/s over 128 greedy tokens, cold load to the first token, peak RSS. Ratios are
herd/onnxruntime-genai; below the table, the same ratios taken round by round.

onnxruntime-genai runs the model benchmarks/ortgenai_model.py makes from the GGUF (made
once, before the rounds, and cached: the GGUF dequantized by transformers, then its model
builder at int4, block 32, accuracy level 4, CPU). Every engine is fed the same token ids
(herd's tokenizer). Threads: onnxruntime-genai's session gets intra_op_num_threads
(a config overlay), herd gets num_thread. herd-onnx is `backend="onnx"`: until herd's ONNX
backend imports, its row says so and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.compare import (
    DECODE_TOKENS,
    PROMPT_TOKENS,
    TEXT,
    _measure,
    _peak_rss_mb,
    _spawn,
    bench_herd,
    combine,
    model_path,
)

PEER = "onnxruntime-genai"
ENGINES = (PEER, "herd-onnx", "herd-ggml")
MAX_LENGTH = 1024  # onnxruntime-genai's KV cache length: herd's num_ctx in bench_herd


def genai_overlay(threads: int) -> str:
    """The genai_config overlay giving the decoder's session `threads` intra-op threads
    (and one inter-op thread: herd's backends run ops one at a time too)."""
    opts = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    return json.dumps({"model": {"decoder": {"session_options": opts}}})


def bench_ortgenai(folder: str, tokens: list[int], threads: int, runs: int) -> dict[str, Any]:
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    config = og.Config(folder)
    config.overlay(genai_overlay(threads))
    model = og.Model(config)

    def generator() -> Any:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=MAX_LENGTH, do_sample=False)
        return og.Generator(model, params)

    first = generator()
    first.append_tokens(tokens[:8])
    first.generate_next_token()
    cold = time.perf_counter() - t0
    state: dict[str, Any] = {}

    def prefill() -> None:
        state["gen"] = generator()  # a fresh sequence, as herd's runner.reset()
        state["gen"].append_tokens(tokens)  # the prompt's forward pass, to its logits

    def decode() -> None:
        gen = state["gen"]
        for _ in range(DECODE_TOKENS):  # greedy: each picks from the last logits, runs one
            gen.generate_next_token()
            gen.get_next_tokens()  # each token read, as a user would

    return _measure(cold, prefill, decode, runs, reset=lambda: None)


def bench_herd_onnx(path: str, threads: int, runs: int) -> dict[str, Any]:
    from herd.ml.registry import available_backends

    if "onnx" not in available_backends():
        return {"skipped": "not available: herd's ONNX backend (backend='onnx') does not "
                "import yet"}  # fmt: skip
    return bench_herd("onnx", path, threads, runs)


def _engine(name: str, path: str, threads: int, runs: int, prep: dict[str, Any]) -> dict:
    if name == PEER:
        result = bench_ortgenai(prep["folder"], prep["tokens"], threads, runs)
    elif name == "herd-onnx":
        result = bench_herd_onnx(path, threads, runs)
    else:
        result = bench_herd("ggml", path, threads, runs)
    if "skipped" not in result:
        result["peak_rss_mb"] = _peak_rss_mb()
    return result


def _prepare(path: str) -> dict[str, Any]:
    from benchmarks.ortgenai_model import ensure
    from herd.gguf import open_gguf
    from herd.tokenizer import from_gguf

    tokens = from_gguf(open_gguf(path)).encode(TEXT)[:PROMPT_TOKENS]
    return {"folder": str(ensure(path)), "tokens": tokens}


def run_round(name: str, path: str, threads: int, runs: int, prep: dict) -> dict[str, Any]:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)  # inherited by the child before numpy/torch load
    return _spawn(_engine, name, path, threads, runs, prep)


COLS = [
    ("prefill_tps", "prefill tok/s", "{:.1f}"),
    ("decode_tps", "decode tok/s", "{:.1f}"),
    ("cold_s", "cold load→1st token s", "{:.2f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
]


def ratio_cell(value: float, peer: dict[str, Any] | None, key: str, fmt: str) -> str:
    """`value`, and value/peer's in brackets where the peer ran."""
    cell = fmt.format(value)
    if peer is None or "skipped" in peer or not peer.get(key):
        return cell
    return f"{cell} ({value / peer[key]:.2f}x {PEER})"


def table(model: str, results: dict[str, dict[str, Any]], threads: int) -> str:
    peer = results.get(PEER)
    lines = [
        f"model {model}, {threads} threads, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}",
        "",
        "| engine | " + " | ".join(c[1] for c in COLS) + " |",
        "|" + "---|" * (len(COLS) + 1),
    ]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} |" + " |" * (len(COLS) - 1))
            continue
        mine = name.startswith("herd")
        cells = [ratio_cell(r[k], peer if mine else None, k, f) for k, _, f in COLS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(rounds: dict[str, list[dict[str, Any]]]) -> list[str]:
    """herd/onnxruntime-genai round by round: median ratio and range, per figure."""
    peer = rounds.get(PEER, [])
    if not peer or any("skipped" in r for r in peer):
        return []
    lines = []
    for name, done in rounds.items():
        if not name.startswith("herd") or not done or any("skipped" in r for r in done):
            continue
        cells = []
        for key, label, _ in COLS:
            ratios = sorted(h[key] / p[key] for h, p in zip(done, peer, strict=False))
            cells.append(
                f"{label} {statistics.median(ratios):.3f}x ({ratios[0]:.2f}–{ratios[-1]:.2f})"
            )
        lines.append(f"{name}/{PEER} per round ({len(done)} rounds): " + ", ".join(cells))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per round (median)")
    ap.add_argument("--rounds", type=int, default=3, help="turns each engine takes")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"from {', '.join(ENGINES)}")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args()
    names = args.engines.split(",")
    if unknown := [n for n in names if n not in ENGINES]:
        ap.error(f"unknown engine {', '.join(unknown)}: one of {', '.join(ENGINES)}")
    path = model_path(args.model)
    print(f"{PEER}: its model from {path}...", file=sys.stderr, flush=True)
    prep = _spawn(_prepare, path)  # torch and the builder stay out of this process
    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    if "skipped" in prep and PEER in rounds:
        rounds[PEER].append(prep)  # reported as skipped, with the reason
    for i in range(args.rounds):
        # odd rounds go in reverse: no engine always runs first (or right after another)
        for name, done in list(rounds.items())[:: 1 if i % 2 == 0 else -1]:
            if done and "skipped" in done[-1]:
                continue
            print(f"round {i + 1}: {name}...", file=sys.stderr, flush=True)
            done.append(run_round(name, path, args.threads, args.runs, prep))
    results = {name: combine(done) for name, done in rounds.items()}
    print(table(args.model, results, args.threads))
    if args.rounds > 1 and (pairs := paired(rounds)):
        print("\n" + "\n".join(pairs))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
