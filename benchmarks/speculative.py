"""Speculative decoding's speed: decode tokens/s with and without it, in one run.

    python -m benchmarks.speculative [--model smollm2:135m] [--threads 2] [--rounds 3]
                                     [--tokens 128] [--draft MODEL_OR_GGUF]

Two prompts (SmolLM2's chat template): a summarising one, whose answer repeats its input
(prompt lookup's case), and a free-writing one. Greedy decoding of --tokens tokens, herd on
ggml: plain, prompt lookup (`lookup_ngram` 3), and with --draft a draft model (the model
as its own draft is a correctness case: it costs a second model's passes for nothing).
llama.cpp's prompt-lookup decoding through llama-cpp-python (`LlamaPromptLookupDecoding`,
max_ngram_size 3, num_pred_tokens 10) and its plain decoding run in the same process on the
same token ids and threads, when importable. Every figure is the median over --rounds,
the engines taking turns each round; herd's acceptance is draft_accepted / draft_proposed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any

import herd
from herd.runner import Request, prepare

ARTICLE = (
    "The city council met on Tuesday to discuss the new bus routes. The council agreed "
    "that the number 12 bus will run every ten minutes from Monday to Friday, and every "
    "twenty minutes at weekends. The number 7 bus will stop at the hospital and the "
    "train station. Tickets will cost two dollars for adults and one dollar for children."
)
PROMPTS = {
    "summarise": f"Repeat this text word for word:\n\n{ARTICLE}",
    "free": "Write a story about a dragon who wants to become a baker.",
}


def herd_run(llm: Any, tokens_in: list[int], options: dict[str, Any]) -> tuple[float, str]:
    opts = llm.defaults.merged(options)
    # a fresh runner (and cache) each run, so every run prefills the same
    runner = llm.loaded.new_runner(opts)
    try:
        final = list(runner.generate(tokens_in, opts))[-1]
    finally:
        runner.release_graphs()
    rate = final.eval_count / (final.eval_duration / 1e9)
    acc = (
        f"{final.draft_accepted}/{final.draft_proposed}"
        f" ({final.draft_accepted / final.draft_proposed:.0%})"
        if final.draft_proposed
        else "-"
    )
    return rate, acc


def llama_cpp_run(llama: Any, tokens_in: list[int], n: int) -> float:
    llama.reset()
    t0 = first = None
    count = 0
    t0 = time.perf_counter()
    for _ in llama.create_completion(tokens_in, max_tokens=n, temperature=0.0, stream=True):
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return (count - 1) / (end - (first or t0)) if count > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--draft", default=None)
    args = ap.parse_args()
    base = {"temperature": 0, "num_predict": args.tokens, "num_thread": args.threads}
    llm = herd.load(args.model, backend="ggml", options={"num_thread": args.threads})
    engines: dict[str, Any] = {
        "herd": lambda t: herd_run(llm, t, base),
        "herd+lookup": lambda t: herd_run(llm, t, {**base, "lookup_ngram": 3}),
    }
    if args.draft:
        drafted = herd.load(args.model, backend="ggml", options={"num_thread": args.threads},
                            draft=args.draft)  # fmt: skip
        engines["herd+draft"] = lambda t: herd_run(drafted, t, base)
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        kw = dict(model_path=str(llm.source.path), n_ctx=4096, n_threads=args.threads,
                  verbose=False, logits_all=False)  # fmt: skip
        plain = Llama(**kw)
        lookup = Llama(
            **kw, draft_model=LlamaPromptLookupDecoding(max_ngram_size=3, num_pred_tokens=10)
        )
        engines["llama.cpp"] = lambda t: (llama_cpp_run(plain, t, args.tokens), "-")
        engines["llama.cpp+lookup"] = lambda t: (llama_cpp_run(lookup, t, args.tokens), "?")
    except ImportError as e:
        print(f"# llama-cpp-python not importable ({e}): llama.cpp rows skipped")
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, {os.cpu_count()} cpus, threads {args.threads}, "
          f"{args.tokens} tokens greedy, median of {args.rounds}")  # fmt: skip
    for name, text in PROMPTS.items():
        tokens = prepare(llm.loaded, Request(prompt=text)).tokens
        rates: dict[str, list[float]] = {e: [] for e in engines}
        accs: dict[str, str] = {}
        order = list(engines)
        for r in range(args.rounds):
            for e in order if r % 2 == 0 else order[::-1]:
                rate, acc = engines[e](tokens)
                rates[e].append(rate)
                accs[e] = acc
        for e in engines:
            med = statistics.median(rates[e])
            ref = statistics.median(rates["llama.cpp" if e.startswith("llama") else "herd"])
            print(f"{name:10s} {e:17s} {med:7.1f} tok/s  x{med / ref:4.2f} vs plain  "
                  f"accepted {accs[e]}")  # fmt: skip


if __name__ == "__main__":
    main()
