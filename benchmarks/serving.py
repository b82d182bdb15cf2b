"""Serving: `herd serve` against llama.cpp's llama-server (the engine under Ollama today)
and llama-cpp-python's OpenAI server, same model file, threads and context per sequence.

    python -m benchmarks.serving [--peer llama-server,llama-cpp-python,herd-shared]
                                 [--clients 1,4,8,16] [--scenarios chat,independent,staggered]
                                 [--rounds 3] [--tokens 64] [--turns 2] [--parallel 8]
                                 [--threads 2] [--quick] [--flash-attn default|on|off]

llama-server is built once by scripts/build_llama_server.py (`make llama-server`) from the
llama.cpp source herd's ggml is built from, with the same CPU flags (`--llama-server PATH`
takes another binary). Every server is a child process driven by the same client code
(benchmarks/serving_client.py): OpenAI streamed chats, temperature 0, `--tokens` per reply.
herd runs HERD_NUM_PARALLEL=`--parallel` slots of `--ctx` tokens each, llama-server
`--parallel` slots in `-c parallel*ctx`; llama-cpp-python's server (kept for continuity with
the earlier tables) serves one request at a time.

Scenarios, each with 1, 4, 8 and 16 concurrent clients (more clients than slots queue):
  chat         each client holds a `--turns`-turn conversation under one shared system
               prompt, every turn re-sending the conversation (the realistic case);
  independent  each client sends `--turns` unrelated prompts of 1-4 paragraphs;
  staggered    (not run unless named) the prompts of independent, client i starting
               0.25 x i s after the release: prompts that come while others decode.
Per wave and server: aggregate generated tokens/s (all tokens over the wave's wall time),
time to first token p50/p95 and inter-token latency (gaps between streamed chunks) p50/p95
over all requests. The servers alternate wave by wave (the order flips every round) and
each figure is the best of `--rounds` (the least disturbed run on a shared machine shows
the engine). Every wave has prompts of its own, so it finds only what a server
legitimately shares (the system prompt, the template) in its cache. A second table gives
each server's tok/s over llama-server's round by round and their median: the two ran
back to back, so a spell of the VM weighs on both.

Then the cache's own figure, `--rounds` times for herd and llama-server: two instances of
the server start side by side, one is given 8 concurrent chats that stay cached, and one
client's new conversations then alternate between the fresh twin and the used one
(`--singles` pairs a round). The figure is the median over all pairs of the used twin's
decode rate over the fresh one's, each pair measured back to back: one 64-token reply lasts
half a second, and a single one moves by 15-25% between minutes on this shared VM, more
than the cache's effect (fresh and used runs minutes apart read 0.87x and 1.23x).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.serving_client import SCENARIOS, Wave, chat, single, wave
from benchmarks.serving_servers import SERVERS, Setup, llama_server_binary, start

ANCHOR = "llama-server"
# rates[scenario][clients][server]: the aggregate tok/s of each round, in order (or, in
# `ttfts`, the wave's TTFT p95)
Rates = dict[str, dict[int, dict[str, list[float]]]]


@dataclass
class Cached:
    """One client's decode tok/s in new conversations, pair by pair: on a fresh server and
    on its twin after 8 concurrent chats left their conversations cached."""

    fresh: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [a / f for f, a in zip(self.fresh, self.after, strict=True) if f > 0]


def warm_up(url: str, model: str) -> None:
    chat(url, model, [{"role": "user", "content": "Hello!"}], 4)


def measure_waves(servers: dict[str, tuple[str, str]], args: argparse.Namespace):
    """best[scenario][clients][server]: the wave with the highest aggregate tok/s. Each
    server first serves one unmeasured wave of `--parallel` chats: a server's first
    batches of a kind cost what later ones do not (herd builds their graphs), and a run
    of `--clients 8` alone measured herd's first wave at TTFT p95 0.63 s against 0.45
    later, and llama-server's at 2.73 s against 0.36-0.47."""
    for url, model in servers.values():
        warm_up(url, model)
        wave(url, model, "chat", args.parallel, "warm-up", 1, args.tokens)
    best: dict[str, dict[int, dict[str, Wave]]] = {}
    rates: Rates = {}
    ttfts: Rates = {}
    names = list(servers)
    for take in range(args.rounds):
        order = names if take % 2 == 0 else names[::-1]
        for scenario in args.scenarios:
            for n in args.clients:
                for name in order:
                    url, model = servers[name]
                    w = wave(url, model, scenario, n, f"{take}.{n}", args.turns, args.tokens)
                    print(
                        f"  round {take + 1}, {scenario}, {n} clients, {name}: "
                        f"{w.tokens_per_s:.1f} tok/s, TTFT p95 {w.ttft(0.95):.2f} s",
                        file=sys.stderr,
                        flush=True,
                    )
                    slot = best.setdefault(scenario, {}).setdefault(n, {})
                    if name not in slot or w.tokens_per_s > slot[name].tokens_per_s:
                        slot[name] = w
                    for into, value in ((rates, w.tokens_per_s), (ttfts, w.ttft(0.95))):
                        by_round = into.setdefault(scenario, {}).setdefault(n, {})
                        by_round.setdefault(name, []).append(value)
    return best, rates, ttfts


def paired(by_server: dict[str, list[float]], anchor: str) -> dict[str, list[float]]:
    """Each server's tok/s over the anchor's round by round: the two ran one after the
    other, so a slow or fast spell of a shared VM (minutes long here) weighs on both,
    where the best of each can come from different spells (a first round of
    llama-server's at 168.5 tok/s against 144.8 and 141.9 in its others made herd 0.91x
    by best of 3, while it was ahead in the two later rounds)."""
    base = by_server.get(anchor)
    if not base:
        return {}
    return {
        name: [a / b for a, b in zip(values, base, strict=True)]
        for name, values in by_server.items()
        if name != anchor
    }


def measure_cached(names: list[str], setup: Setup, binary, args: argparse.Namespace):
    """Per server: a fresh instance and a twin that served 8 concurrent chats, one
    client's new conversations alternating between them (the order flips every pair)."""
    out = {name: Cached() for name in names}
    for take in range(args.rounds):
        for name in names if take % 2 == 0 else names[::-1]:
            with start(name, setup, binary) as fresh, start(name, setup, binary) as used:
                warm_up(*fresh)
                warm_up(*used)
                wave(*used, "chat", 8, f"cached {take}", args.turns, args.tokens)
                for i in range(args.singles):
                    tag = f"{take}.{i}"
                    twins = [("fresh", fresh), ("after", used)]
                    for which, (url, model) in twins if i % 2 == 0 else twins[::-1]:
                        rate = single(url, model, f"{which} {tag}", args.single_tokens).decode_rate
                        getattr(out[name], which).append(rate)
            got = out[name]
            print(
                f"  round {take + 1}, {name}: single client, after 8 cached chats / fresh: "
                + ", ".join(f"{r:.2f}x" for r in got.ratios[-args.singles :]),
                file=sys.stderr,
                flush=True,
            )
    return out


# ---- report -------------------------------------------------------------------------------
def machine_line(args: argparse.Namespace) -> str:
    return (
        f"model {args.model}, {args.threads} threads, {args.parallel} slots of {args.ctx} "
        f"tokens, {args.tokens} tokens per reply, {args.turns} requests per client, best of "
        f"{args.rounds}, flash attention {args.flash_attn}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )


def tables(
    best,
    cached: dict[str, Cached],
    args: argparse.Namespace,
    rates: Rates,
    ttfts: Rates | None = None,
) -> str:
    lines = [
        machine_line(args),
        "",
        f"| scenario | clients | server | tok/s | vs {ANCHOR} | TTFT p50 / p95 s | "
        "ITL p50 / p95 ms | tokens per reply |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for scenario, by_clients in best.items():
        for n, by_server in by_clients.items():
            anchor = by_server.get(ANCHOR)
            for name, w in by_server.items():
                ratio = f"{w.tokens_per_s / anchor.tokens_per_s:.2f}x" if anchor else "-"
                lines.append(
                    f"| {scenario} | {n} | {name} | {w.tokens_per_s:.1f} | {ratio} | "
                    f"{w.ttft(0.5):.2f} / {w.ttft(0.95):.2f} | "
                    f"{1000 * w.itl(0.5):.1f} / {1000 * w.itl(0.95):.1f} | {w.mean_tokens:.0f} |"
                )
    ttfts = ttfts or {}
    pairs = [
        (scenario, n, name, ratios, paired(ttfts.get(scenario, {}).get(n, {}), ANCHOR).get(name))
        for scenario, by_clients in rates.items()
        for n, by_server in by_clients.items()
        for name, ratios in paired(by_server, ANCHOR).items()
    ]
    if pairs:
        lines += [
            "",
            f"| scenario | clients | server | tok/s over {ANCHOR}'s, round by round | median | "
            f"TTFT p95 over {ANCHOR}'s, round by round | median |",
            "|---|---|---|---|---|---|---|",
        ]
        for scenario, n, name, ratios, waits in pairs:
            each = ", ".join(f"{r:.2f}x" for r in ratios)
            line = f"| {scenario} | {n} | {name} | {each} | {statistics.median(ratios):.2f}x |"
            if waits:
                line += " " + ", ".join(f"{r:.2f}x" for r in waits)
                line += f" | {statistics.median(waits):.2f}x |"
            else:
                line += " - | - |"
            lines.append(line)
    if cached:
        lines += [
            "",
            "| server | one client, fresh server tok/s (median) | after 8 cached chats tok/s "
            "(median) | after / fresh, pair by pair: median (range) |",
            "|---|---|---|---|",
        ]
        for name, c in cached.items():
            r = c.ratios
            ratio = f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})" if r else "-"
            fresh = statistics.median(c.fresh) if c.fresh else 0.0
            after = statistics.median(c.after) if c.after else 0.0
            lines.append(f"| {name} | {fresh:.1f} | {after:.1f} | {ratio} |")
    return "\n".join(lines)


def raw(best, cached: dict[str, Cached]) -> dict:
    waves = {
        s: {
            n: {
                name: {"wall": w.wall, "requests": [vars(r) for r in w.results]}
                for name, w in by_server.items()
            }
            for n, by_server in by_clients.items()
        }
        for s, by_clients in best.items()
    }
    return {
        "waves": waves,
        "cached": {name: {**vars(c), "ratios": c.ratios} for name, c in cached.items()},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--models", help="store folder (default: HERD_MODELS)")
    ap.add_argument(
        "--peer",
        default=f"{ANCHOR},llama-cpp-python",
        help="servers herd is measured against (llama-server, llama-cpp-python, herd-shared: "
        "herd with HERD_SHARED_PREFIX=1)",
    )
    ap.add_argument("--llama-server", help="llama-server binary (default: the cached build)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", help="default 1,4,8,16")
    ap.add_argument("--scenarios", default="chat,independent")
    ap.add_argument("--tokens", type=int, help="max tokens per reply (default 64)")
    ap.add_argument("--turns", type=int, default=2, help="requests each client sends in a row")
    ap.add_argument("--rounds", type=int, help="best of this many runs (default 3)")
    ap.add_argument("--ctx", type=int, default=2048, help="context per sequence")
    ap.add_argument("--parallel", type=int, default=8, help="slots (herd and llama-server)")
    ap.add_argument(
        "--single-tokens",
        type=int,
        help="reply length of the single-client cache figure (default 128)",
    )
    ap.add_argument(
        "--singles",
        type=int,
        help="fresh/used pairs of new conversations a round for the cache figure (default 4)",
    )
    ap.add_argument("--no-cached", action="store_true", help="skip the single-client figure")
    ap.add_argument("--backend", default="auto", help="herd's backend (auto picks its best)")
    ap.add_argument(
        "--flash-attn",
        choices=("default", "on", "off"),
        default="default",
        help="flash attention for herd and llama-server alike (default: each its own: "
        "herd off on a CPU, llama-server auto, which is on there)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a short check: 1 and 8 clients, 1 round, 32 tokens, unless given",
    )
    ap.add_argument("--json", help="also write the raw numbers here")
    args = ap.parse_args(argv)
    # --quick: 1 and 8 clients, 1 round, 32 tokens (64 alone); options given still count
    short = {"clients": "1,8", "rounds": 1, "tokens": 32, "single_tokens": 64, "singles": 2}
    full = {"clients": "1,4,8,16", "rounds": 3, "tokens": 64, "single_tokens": 128, "singles": 4}
    for name, value in (short if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.clients = [int(n) for n in args.clients.split(",")]
    args.scenarios = args.scenarios.split(",")
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown or min(args.clients) < 1 or min(args.rounds, args.parallel, args.singles) < 1:
        ap.error(f"scenarios are {', '.join(SCENARIOS)}; clients, rounds, parallel, singles >= 1")
    args.servers = ["herd", *[p for p in args.peer.split(",") if p and p != "herd"]]
    unknown = [p for p in args.servers if p not in SERVERS]
    if unknown:  # before any server starts
        ap.error(f"unknown --peer {', '.join(unknown)}; choose from {', '.join(SERVERS[1:])}")
    return args


def main() -> None:
    args = parse_args()
    # On SIGTERM (e.g. from `timeout`) unwind, so that the servers this started stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from herd.store import Store, resolve_or_pull

    store = Store(args.models) if args.models else Store()
    path = Path(resolve_or_pull(args.model, store=store).model_path)
    binary = llama_server_binary(args.llama_server) if ANCHOR in args.servers else None
    with tempfile.TemporaryDirectory(prefix="herd-bench-") as tmp:
        setup = Setup(
            store.root,
            args.model,
            path,
            args.threads,
            args.ctx,
            args.parallel,
            args.backend,
            Path(tmp),
            args.flash_attn,
        )
        with contextlib.ExitStack() as stack:
            servers = {}
            for name in args.servers:
                print(f"starting {name}...", file=sys.stderr, flush=True)
                servers[name] = stack.enter_context(start(name, setup, binary))
            best, rates, ttfts = measure_waves(servers, args)
        cached = {}
        if not args.no_cached:
            names = [n for n in args.servers if n in ("herd", "herd-shared", ANCHOR)]
            cached = measure_cached(names, setup, binary, args)
    print(tables(best, cached, args, rates, ttfts))
    if binary is not None:
        build = binary.parent / "build.txt"
        what = build.read_text().strip() if build.exists() else str(binary)
        print(f"\n{ANCHOR}: {what}")
    if args.json:
        Path(args.json).write_text(json.dumps(raw(best, cached), indent=2))


if __name__ == "__main__":
    main()
