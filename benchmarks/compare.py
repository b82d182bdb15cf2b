"""herd against its peers on the same model, machine and threads, in one run.

    python -m benchmarks.compare [--model smollm2:135m] [--threads 2] [--engines ...]
                                 [--rounds 3] [--num-gpu N]

Each engine runs in its own child process (so peak resident memory and cold load are its
own) and reports: cold load to first token, prefill tokens/s on a 256-token prompt,
decode tokens/s over 128 generated tokens (median of --runs after a warm-up), and peak
RSS. The engines take turns, --rounds times (A B C, C B A, ...), each round a fresh child,
and every figure is the median over the rounds: on a shared machine, load drifts over
minutes, and running one engine's rounds back to back would hand that drift to the ratio.
The table prints herd/peer ratios of the medians; below it, herd/llama.cpp taken round by
round (median and range), which drift on the machine cannot skew. Engines that are not
installed are skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROMPT_TOKENS, DECODE_TOKENS = 256, 128
TEXT = (
    "The history of astronomy is the story of how people came to understand the sky. "
    "Early observers tracked the motion of the sun, the moon and the planets, and built "
    "calendars from their cycles. Later, telescopes revealed moons around Jupiter, phases "
    "of Venus and countless stars in the Milky Way. "
) * 12


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---- engines: each returns a dict of measurements; run inside a child process ----------
def bench_herd(
    backend: str, path: str, threads: int, runs: int, num_gpu: int = 0
) -> dict[str, float]:
    import numpy as np

    from herd.api import LLM
    from herd.models import Batch
    from herd.options import Options
    from herd.runner import Source

    t0 = time.perf_counter()
    opts = {"num_thread": threads, "num_gpu": num_gpu, "num_ctx": 1024}
    llm = LLM(Source(Path(path).name, Path(path)), backend=backend, options=opts)
    tokens = llm.tokenize(TEXT)[:PROMPT_TOKENS]
    runner = llm.runner(Options(num_ctx=1024, num_thread=threads, num_gpu=num_gpu))
    runner.logits(tokens[:8])
    cold = time.perf_counter() - t0

    def forward(batch_tokens: list[int], start: int) -> np.ndarray:
        # the runner's batch step: graph reuse on decode where the backend supports it
        return runner._compute(Batch.single(batch_tokens, start))

    def prefill() -> None:
        runner.reset()
        forward(tokens, 0)

    def decode() -> None:
        token = tokens[-1]
        for i in range(DECODE_TOKENS):
            token = int(forward([token], PROMPT_TOKENS + i)[0].argmax())

    return _measure(cold, prefill, decode, runs, reset=runner.reset)


def _measure(
    cold: float,
    prefill: Callable[[], None],
    decode: Callable[[], None],
    runs: int,
    reset: Callable[[], Any],
) -> dict[str, float]:
    prefill()  # warm-up
    pre = [PROMPT_TOKENS / _timed(prefill) for _ in range(runs)]
    dec = []
    for _ in range(runs):
        reset()
        prefill()
        dec.append(DECODE_TOKENS / _timed(decode))
    return {
        "cold_s": cold,
        "prefill_tps": statistics.median(pre),
        "decode_tps": statistics.median(dec),
    }


def _llama_flash_attn(num_gpu: int) -> bool:
    """As herd: HERD_FLASH_ATTENTION when set (--flash-attn), else on where layers run on a
    GPU, unless this llama.cpp was built without its CUDA kernels for it (gpu_check.sh)."""
    from herd import envconfig

    forced = envconfig.flash_attention()
    if forced is not None:
        return forced
    return num_gpu != 0 and os.environ.get("BENCH_LLAMA_FLASH_ATTN", "1") == "1"


def bench_llama_cpp(path: str, threads: int, runs: int, num_gpu: int = 0) -> dict[str, float]:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(
        path,
        n_ctx=1024,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=num_gpu,  # -1: all, like herd's num_gpu
        flash_attn=_llama_flash_attn(num_gpu),
        verbose=False,
    )
    tokens = llm.tokenize(TEXT.encode())[:PROMPT_TOKENS]
    llm.eval(tokens[:8])
    cold = time.perf_counter() - t0

    def prefill() -> None:
        llm.reset()
        llm.eval(tokens)

    def decode() -> None:
        token = tokens[-1]
        for _ in range(DECODE_TOKENS):
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())

    return _measure(cold, prefill, decode, runs, reset=llm.reset)


def bench_transformers(path: str, threads: int, runs: int, num_gpu: int = 0) -> dict[str, float]:
    """On the CPU whatever num_gpu says (the peer for CPU runs)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(Path(path).parent), gguf_file=Path(path).name, dtype=torch.float32
    ).eval()
    from herd.gguf import open_gguf
    from herd.tokenizer import from_gguf

    tokens = from_gguf(open_gguf(path)).encode(TEXT)[:PROMPT_TOKENS]
    ids = torch.tensor([tokens])
    with torch.no_grad():
        model(ids[:, :8])
    cold = time.perf_counter() - t0
    state: dict[str, Any] = {}

    def prefill() -> None:
        with torch.no_grad():
            out = model(ids, use_cache=True)
        state["past"], state["logits"] = out.past_key_values, out.logits

    def decode() -> None:
        past, token = state["past"], state["logits"][0, -1].argmax()
        with torch.no_grad():
            for _ in range(DECODE_TOKENS):
                out = model(token.view(1, 1), past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[0, -1].argmax()

    return _measure(cold, prefill, decode, runs, reset=lambda: None)


ENGINES: dict[str, Callable[..., dict[str, float]]] = {
    "herd-ggml": lambda p, t, r, g: bench_herd("ggml", p, t, r, g),
    "herd-numpy": lambda p, t, r, g: bench_herd("numpy", p, t, r, g),
    "llama.cpp": bench_llama_cpp,
    "transformers": bench_transformers,
}


def _child(name: str, path: str, threads: int, runs: int, num_gpu: int, queue: Any) -> None:
    try:
        result = ENGINES[name](path, threads, runs, num_gpu)
        result["peak_rss_mb"] = _peak_rss_mb()
        queue.put(result)
    except ImportError as e:
        queue.put({"skipped": f"not installed ({e.name})"})
    except Exception as e:  # a failing engine must not hide the others' numbers
        queue.put({"skipped": f"{type(e).__name__}: {e}"})


def run_engine(name: str, path: str, threads: int, runs: int, num_gpu: int = 0) -> dict[str, Any]:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)  # inherited by the child before numpy/torch load
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, path, threads, runs, num_gpu, queue))
    proc.start()
    proc.join()
    return queue.get() if not queue.empty() else {"skipped": f"crashed (exit {proc.exitcode})"}


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over an engine's rounds (skipped if any round was)."""
    for r in rounds:
        if "skipped" in r:
            return r
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def gpu_name() -> str:
    """The GPU the offloaded layers run on, as ggml names it."""
    try:
        from herd.ml.backends.ggml.devices import probe_devices
    except ImportError:
        return "no ggml"
    gpus = [d.info.name for d in probe_devices() if d.info.kind in ("gpu", "igpu")]
    return ", ".join(gpus) or "no GPU found"


def model_path(name: str) -> str:
    if name.endswith(".gguf"):
        return name
    from herd.api import resolve

    return str(resolve(name).path)


def table(model: str, results: dict[str, dict[str, Any]], threads: int, num_gpu: int = 0) -> str:
    cols = [
        ("prefill_tps", "prefill tok/s"),
        ("decode_tps", "decode tok/s"),
        ("cold_s", "cold load→1st token s"),
        ("peak_rss_mb", "peak RSS MB"),
    ]
    peers = [
        n for n in ("llama.cpp", "transformers") if n in results and "skipped" not in results[n]
    ]
    lines = [
        f"model {model}, {threads} threads, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}"
        + (f", num_gpu {num_gpu} ({gpu_name()})" if num_gpu else ""),
        "",
    ]
    head = "| engine | " + " | ".join(c[1] for c in cols) + " |"
    lines += [head, "|" + "---|" * (len(cols) + 1)]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} |" + " |" * (len(cols) - 1))
            continue
        cells = []
        for key, _ in cols:
            cell = f"{r[key]:.1f}" if key != "cold_s" else f"{r[key]:.2f}"
            if name.startswith("herd"):
                ratios = [f"{r[key] / results[p][key]:.2f}x {p}" for p in peers]
                cell += " (" + ", ".join(ratios) + ")" if ratios else ""
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(rounds: dict[str, list[dict[str, Any]]]) -> str:
    """Each herd engine over llama.cpp round by round (the two ran minutes apart at most, so
    the machine's drift cancels): the median ratio and its range, per figure."""
    peer = rounds.get("llama.cpp", [])
    if not peer or any("skipped" in r for r in peer):
        return ""
    lines = []
    for name, done in rounds.items():
        if not name.startswith("herd") or any("skipped" in r for r in done):
            continue
        cells = []
        for key, label in (
            ("prefill_tps", "prefill"),
            ("decode_tps", "decode"),
            ("cold_s", "cold load"),
            ("peak_rss_mb", "peak RSS"),
        ):
            ratios = sorted(h[key] / p[key] for h, p in zip(done, peer, strict=False))
            cells.append(
                f"{label} {statistics.median(ratios):.3f}x ({ratios[0]:.2f}–{ratios[-1]:.2f})"
            )
        lines.append(f"{name}/llama.cpp per round ({len(peer)} rounds): " + ", ".join(cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per round (median)")
    ap.add_argument("--rounds", type=int, default=3, help="turns each engine takes")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument(
        "--num-gpu",
        type=int,
        default=0,
        help="layers on the GPU for herd (num_gpu) and llama.cpp (n_gpu_layers); -1: all",
    )
    ap.add_argument(
        "--flash-attn",
        choices=("default", "on", "off"),
        default="default",
        help="fused attention for both herd and llama.cpp (default: on where layers run on a "
        "GPU, herd's default)",
    )
    args = ap.parse_args()
    if args.flash_attn != "default":  # read by both engines' children
        os.environ["HERD_FLASH_ATTENTION"] = "1" if args.flash_attn == "on" else "0"
    path = model_path(args.model)
    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in args.engines.split(",")}
    for i in range(args.rounds):
        # odd rounds go in reverse: no engine always runs first (or right after another)
        for name, done in list(rounds.items())[:: 1 if i % 2 == 0 else -1]:
            if done and "skipped" in done[-1]:
                continue
            print(f"round {i + 1}: {name}...", file=sys.stderr, flush=True)
            done.append(run_engine(name, path, args.threads, args.runs, args.num_gpu))
    results = {name: combine(done) for name, done in rounds.items()}
    print(table(args.model, results, args.threads, args.num_gpu))
    if args.rounds > 1 and (pairs := paired(rounds)):
        print("\n" + pairs)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
