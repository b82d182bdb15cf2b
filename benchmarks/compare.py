"""herd against its peers on the same model, machine and threads, in one run.

    python -m benchmarks.compare [--model smollm2:135m] [--threads 2] [--engines ...]
                                 [--rounds 3] [--num-gpu N] [--mlx-dtype float32]

Each engine runs in its own child process (so peak resident memory and cold load are its
own) and reports: cold load to first token, prefill tokens/s on a 256-token prompt,
decode tokens/s over 128 generated tokens (median of --runs after a warm-up), and peak
RSS. The engines take turns, --rounds times (A B C, C B A, ...), each round a fresh child,
and every figure is the median over the rounds: on a shared machine, load drifts over
minutes, and running one engine's rounds back to back would hand that drift to the ratio.
The table prints herd/peer ratios of the medians; below it, herd/peer taken round by round
(median and range), which drift on the machine cannot skew. Engines that are not
installed are skipped with the reason.

Engines: herd-ggml (alias herd), herd-numpy, herd-mlx (herd's backends), and the peers
llama.cpp, transformers and mlx-lm. All read the same GGUF and the same token ids (herd's
tokenizer); mlx-lm runs a model made from that GGUF by benchmarks/mlx_model.py (dequantized,
then re-quantized by mlx-lm to 4 bits in groups of 32; made once, before the rounds, and
cached), and generates with its own `generate_step`.

MLX has no thread setting: on the CPU each op runs on its stream's one thread, and the Linux
wheel's BLAS is netlib's reference one (single-threaded), so mlx-lm uses one core whatever
--threads says; herd-mlx cuts each large weight's rows over --threads CPU streams (its own
way round that), and ggml and llama.cpp use --threads. The MLX engines' device: MLX's
default (Metal on Apple silicon, the GPU with mlx[cuda], else the CPU) unless --num-gpu 0
forces the CPU; --num-gpu unset still means the CPU for herd-ggml and llama.cpp, as before.
On a Mac, `--engines herd-mlx,mlx-lm` runs both on Metal with no other flag (with
`--num-gpu -1`, herd-ggml joins them on Metal).
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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; bytes on macOS
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---- engines: each returns a dict of measurements; run inside a child process ----------
def bench_herd(
    backend: str, path: str, threads: int, runs: int, num_gpu: int = 0
) -> dict[str, Any]:
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

    result: dict[str, Any] = _measure(cold, prefill, decode, runs, reset=runner.reset)
    if backend == "mlx":  # where it ran: Metal, a CUDA GPU or the CPU
        result["device"] = llm.backend.devices()[0].name  # the one in use comes first
    return result


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


def bench_mlx_lm(
    path: str, threads: int, runs: int, num_gpu: int | None, folder: str, tokens: list[int]
) -> dict[str, Any]:
    """mlx-lm on the model benchmarks/mlx_model.py made from this GGUF, fed the others'
    token ids (both from `prepare_mlx_lm`: herd's tokenizer stays out of mlx-lm's RSS).
    Prefill: `generate_step` with max_tokens=0, the prompt's forward pass and its first
    token, as the others'; decode: `generate_step` on from the last prompt token, timed to
    its 128th token. Threads: MLX has no setting (the module docstring says more)."""
    import mlx.core as mx

    if num_gpu == 0:  # before mlx_lm.generate makes its stream on the default device
        mx.set_default_device(mx.cpu)
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    prompt = mx.array(tokens)
    t0 = time.perf_counter()
    model, _ = load(folder)
    for _ in generate_step(prompt[:8], model, max_tokens=0):
        pass  # max_tokens=0 yields nothing: it runs the prompt and evaluates the 1st token
    cold = time.perf_counter() - t0
    state: dict[str, Any] = {}

    def prefill() -> None:
        state["cache"] = make_prompt_cache(model)
        for _ in generate_step(prompt, model, max_tokens=0, prompt_cache=state["cache"]):
            pass

    def decode() -> None:
        steps = generate_step(
            prompt[-1:], model, max_tokens=DECODE_TOKENS, prompt_cache=state["cache"]
        )
        for _ in steps:  # greedy (its default sampler); each token read, as a user would
            pass

    def reset() -> None:
        # decode leaves the step after its last token in flight (generate_step overlaps
        # each step with the previous token's read): let it finish outside the timings
        mx.synchronize()

    result: dict[str, Any] = _measure(cold, prefill, decode, runs, reset=reset)
    result["device"] = _mlx_device(mx)
    return result


def _mlx_device(mx: Any) -> str:
    """MLX's default device as herd's MLX backend names it: "cpu (AMD EPYC)", "gpu (...)"."""
    kind = mx.default_device().type.name
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    return f"{kind} ({info['device_name']})" if info.get("device_name") else kind


def _gpu(num_gpu: int | None, default: int) -> int:
    return default if num_gpu is None else num_gpu


# (path, threads, runs, num_gpu) -> measurements; num_gpu None: --num-gpu not given
ENGINES: dict[str, Callable[..., dict[str, Any]]] = {
    "herd-ggml": lambda p, t, r, g: bench_herd("ggml", p, t, r, _gpu(g, 0)),
    "herd-numpy": lambda p, t, r, g: bench_herd("numpy", p, t, r, _gpu(g, 0)),
    # unset: herd's default, -1 (all layers on MLX's default device: the CPU here)
    "herd-mlx": lambda p, t, r, g: bench_herd("mlx", p, t, r, _gpu(g, -1)),
    "llama.cpp": lambda p, t, r, g: bench_llama_cpp(p, t, r, _gpu(g, 0)),
    "transformers": lambda p, t, r, g: bench_transformers(p, t, r, _gpu(g, 0)),
    "mlx-lm": bench_mlx_lm,
}
ALIASES = {"herd": "herd-ggml"}
PEERS = ("llama.cpp", "mlx-lm", "transformers")


def _guarded(queue: Any, fn: Callable[..., Any], *args: Any) -> None:
    """Run fn in this child and put what it returns, or why it could not, on the queue."""
    try:
        queue.put(fn(*args))
    except ImportError as e:
        queue.put({"skipped": f"not installed ({e.name or e})"})
    except Exception as e:  # a failing engine must not hide the others' numbers
        queue.put({"skipped": f"{type(e).__name__}: {e}"})


def _engine(
    name: str, path: str, threads: int, runs: int, num_gpu: int | None, prepared: dict[str, Any]
) -> dict[str, Any]:
    result = ENGINES[name](path, threads, runs, num_gpu, **prepared)
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def _spawn(fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_guarded, args=(queue, fn, *args))
    proc.start()
    proc.join()
    return queue.get() if not queue.empty() else {"skipped": f"crashed (exit {proc.exitcode})"}


def run_engine(
    name: str,
    path: str,
    threads: int,
    runs: int,
    num_gpu: int | None = None,
    prepared: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One round of one engine in a fresh child; `prepared`: extra arguments (mlx-lm's)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)  # inherited by the child before numpy/torch load
    return _spawn(_engine, name, path, threads, runs, num_gpu, prepared or {})


def _make_mlx_model(path: str, dtype: str) -> dict[str, Any]:
    from contextlib import redirect_stdout

    from benchmarks.mlx_model import ensure
    from herd.gguf import open_gguf
    from herd.tokenizer import from_gguf

    with redirect_stdout(sys.stderr):  # mlx_lm.convert's progress: not in the table
        folder = ensure(path, dtype)
    return {
        "folder": str(folder),
        "tokens": from_gguf(open_gguf(path)).encode(TEXT)[:PROMPT_TOKENS],
    }


def prepare_mlx_lm(path: str, dtype: str) -> dict[str, Any]:
    """bench_mlx_lm's arguments: its model for this GGUF, made (or found in the cache) in a
    child of its own before the rounds (converting is not mlx-lm's load time, and torch
    stays out of this process), and the prompt's token ids as herd's tokenizer reads them."""
    print(f"mlx-lm: its model from {path} ({dtype})...", file=sys.stderr, flush=True)
    return _spawn(_make_mlx_model, path, dtype)


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over an engine's rounds (skipped if any round was); labels
    such as the device, the first round's."""
    for r in rounds:
        if "skipped" in r:
            return r
    return {
        k: statistics.median(r[k] for r in rounds) if isinstance(v, float | int) else v
        for k, v in rounds[0].items()
    }


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


def table(
    model: str, results: dict[str, dict[str, Any]], threads: int, num_gpu: int | None = None
) -> str:
    cols = [
        ("prefill_tps", "prefill tok/s"),
        ("decode_tps", "decode tok/s"),
        ("cold_s", "cold load→1st token s"),
        ("peak_rss_mb", "peak RSS MB"),
    ]
    peers = [n for n in PEERS if n in results and "skipped" not in results[n]]
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
        label = f"{name} ({r['device']})" if "device" in r else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(rounds: dict[str, list[dict[str, Any]]]) -> str:
    """Each herd engine over each peer that ran (llama.cpp, mlx-lm) round by round (the two
    ran minutes apart at most, so the machine's drift cancels): the median ratio and its
    range, per figure."""
    lines = []
    for peer_name in ("llama.cpp", "mlx-lm"):
        peer = rounds.get(peer_name, [])
        if peer and not any("skipped" in r for r in peer):
            lines += _paired_with(rounds, peer_name, peer)
    return "\n".join(lines)


def _paired_with(
    rounds: dict[str, list[dict[str, Any]]], peer_name: str, peer: list[dict[str, Any]]
) -> list[str]:
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
        lines.append(f"{name}/{peer_name} per round ({len(peer)} rounds): " + ", ".join(cells))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per round (median)")
    ap.add_argument("--rounds", type=int, default=3, help="turns each engine takes")
    ap.add_argument(
        "--engines", default=",".join(ENGINES), help=f"from {', '.join([*ENGINES, *ALIASES])}"
    )
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument(
        "--num-gpu",
        type=int,
        default=None,
        help="layers on the GPU for herd (num_gpu) and llama.cpp (n_gpu_layers); -1: all; "
        "0 also puts mlx-lm on the CPU. Unset: 0 for ggml, herd-numpy and llama.cpp, MLX's "
        "default device for herd-mlx and mlx-lm",
    )
    ap.add_argument(
        "--mlx-dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="mlx-lm model's dtype (scales, norms, activations); herd's MLX scales: float32",
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
    names = [ALIASES.get(n, n) for n in args.engines.split(",")]
    if unknown := [n for n in names if n not in ENGINES]:
        ap.error(f"unknown engine {', '.join(unknown)}: one of {', '.join(ENGINES)}")
    path = model_path(args.model)
    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    prepared: dict[str, dict[str, Any]] = {}
    if "mlx-lm" in rounds:
        prepared["mlx-lm"] = made = prepare_mlx_lm(path, args.mlx_dtype)
        if "skipped" in made:
            rounds["mlx-lm"].append(made)  # reported as skipped, with the reason
    for i in range(args.rounds):
        # odd rounds go in reverse: no engine always runs first (or right after another)
        for name, done in list(rounds.items())[:: 1 if i % 2 == 0 else -1]:
            if done and "skipped" in done[-1]:
                continue
            print(f"round {i + 1}: {name}...", file=sys.stderr, flush=True)
            extra = prepared.get(name)
            done.append(run_engine(name, path, args.threads, args.runs, args.num_gpu, extra))
    results = {name: combine(done) for name, done in rounds.items()}
    print(table(args.model, results, args.threads, args.num_gpu))
    if args.rounds > 1 and (pairs := paired(rounds)):
        print("\n" + pairs)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
