"""The cost of an applied LoRA adapter on decode: tokens/s with and without one, in one run.

    python -m benchmarks.lora [--model smollm2:135m] [--threads 2] [--rank 16]
                              [--rounds 5] [--tokens 128] [--backend ggml]

The adapter is random (seeded), rank --rank on attn_q, attn_k, attn_v and attn_output of
every layer, its shapes read from the model file (SmolLM2-135M's config: hidden 576, 9
query heads and 3 KV heads of 64), written as a llama.cpp LoRA GGUF. Both models are
loaded once, on the same backend and threads; each round decodes --tokens tokens greedily
after a 64-token prompt, plain then adapted then adapted then plain (ABBA, so drift on a
shared machine falls on both), and the figures are the medians over --rounds. The target
(issue 19): at most 10% slower at rank 16. llama.cpp (llama-cpp-python, as pip builds it)
runs the same file with and without the same adapter GGUF in the same rounds, when
importable: the cost of an adapter in the engine herd is measured against.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PROMPT = "The history of astronomy is the story of how people came to understand the sky. " * 4
TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output")


def make_adapter(model: Path, out: Path, rank: int, seed: int = 0) -> Path:
    from herd.gguf import open_gguf
    from herd.gguf.writer import write_gguf

    g = open_gguf(model)
    rng = np.random.default_rng(seed)
    tensors = []
    for name, info in g.tensors.items():
        if name.startswith("blk.") and name.split(".")[2] in TARGETS:
            n_out, n_in = info.shape
            a = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
            b = (rng.standard_normal((n_out, rank)) * 0.01).astype(np.float32)
            tensors += [(f"{name}.lora_a", a, None), (f"{name}.lora_b", b, None)]
    kv = {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 2.0 * rank}
    return write_gguf(out, g.architecture, kv, tensors)


def decode_tps(llm: Any, tokens: list[int], n: int, threads: int) -> float:
    from herd.models import Batch
    from herd.options import Options

    runner = llm.runner(Options(num_ctx=512, num_thread=threads, num_gpu=0))
    runner.reset()
    logits = runner._compute(Batch.single(tokens, 0))
    token = int(logits[-1].argmax())
    t = time.perf_counter()
    for i in range(n):  # the runner's batch step: graph reuse on decode
        token = int(runner._compute(Batch.single([token], len(tokens) + i))[0].argmax())
    return n / (time.perf_counter() - t)


class LlamaCpp:
    """llama.cpp on the same file, optionally with the same adapter GGUF (`lora_path`)."""

    def __init__(self, model: Path, threads: int, lora: Path | None) -> None:
        from llama_cpp import Llama

        self.llm = Llama(str(model), n_ctx=512, n_batch=512, n_threads=threads,
                         n_threads_batch=threads, n_gpu_layers=0, verbose=False,
                         lora_path=str(lora) if lora else None)  # fmt: skip

    def decode_tps(self, tokens: list[int], n: int) -> float:
        self.llm.reset()
        self.llm.eval(tokens)
        token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
        t = time.perf_counter()
        for _ in range(n):
            self.llm.eval([token])
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
        return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2:135m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--backend", default="ggml")
    args = p.parse_args()

    import herd

    opts = {"num_thread": args.threads, "num_gpu": 0, "num_ctx": 512}
    plain = herd.load(args.model, args.backend, opts)
    tmp = tempfile.TemporaryDirectory()
    model = plain.loaded.source.path
    lora = make_adapter(model, Path(tmp.name) / "lora.gguf", args.rank)
    adapted = herd.load(args.model, args.backend, opts, adapters=[lora])
    tokens = plain.tokenize(PROMPT)[:64]
    for llm in (plain, adapted):  # warm-up: graphs built, pages touched
        decode_tps(llm, tokens, 16, args.threads)
    peers: dict[str, LlamaCpp] = {}
    try:
        peers = {"llama.cpp": LlamaCpp(model, args.threads, None),
                 "llama.cpp+lora": LlamaCpp(model, args.threads, lora)}  # fmt: skip
    except ImportError:
        print("# llama-cpp-python is not installed: herd only (pip install -e '.[bench]')")
    runs: dict[str, list[float]] = {"plain": [], "lora": [], **{k: [] for k in peers}}
    for _ in range(args.rounds):
        for name, llm in (("plain", plain), ("lora", adapted), ("lora", adapted), ("plain", plain)):
            runs[name].append(decode_tps(llm, tokens, args.tokens, args.threads))
        for name in (*peers, *reversed(peers)):
            runs[name].append(peers[name].decode_tps(tokens, args.tokens))
    base, with_lora = statistics.median(runs["plain"]), statistics.median(runs["lora"])
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.threads} threads, {args.backend}, {args.model}, decode {args.tokens} tokens, "
          f"median of {2 * args.rounds} runs each")  # fmt: skip
    print(f"decode tok/s  plain {base:7.1f}   rank-{args.rank} LoRA on q,k,v,o {with_lora:7.1f}"
          f"   lora/plain {with_lora / base:.3f} (target >= 0.90)")  # fmt: skip
    if peers:
        lp, ll = statistics.median(runs["llama.cpp"]), statistics.median(runs["llama.cpp+lora"])
        print(f"llama.cpp     plain {lp:7.1f}   rank-{args.rank} LoRA on q,k,v,o {ll:7.1f}"
              f"   lora/plain {ll / lp:.3f}   herd/llama.cpp plain {base / lp:.2f}x,"
              f" with LoRA {with_lora / ll:.2f}x")  # fmt: skip
    tmp.cleanup()


if __name__ == "__main__":
    main()
