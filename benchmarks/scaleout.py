"""Scale-out by simulation: N herd replicas, prefix-affinity routing vs round-robin.

    python -m benchmarks.scaleout [--replicas 1,2,4,8,16,32,64] [--prefill 343.8]
        [--decode 38.6] [--batch-gain 1.6] [--slots 4] [--chats-per-replica 8]
        [--seconds 300] [--png docs/scaleout.png]

A model, not a measurement of a cluster: each replica serves up to --slots sequences at
once, sharing its speed among them (processor sharing); alone a sequence prefills at
--prefill tok/s and decodes at --decode tok/s, and a full replica gets --batch-gain times
that in all. The defaults are the README's SmolLM2 figures on a 2-core VM (prefill 343.8
tok/s; one chat client 38.6 tok/s, eight 62.0: a gain of 1.6). A replica keeps the KV
cache of its --cached-chats most recent conversations (herd's slots reuse the longest
cached prefix); a turn whose conversation it holds prefills only the new message.

Workload (closed loop, --chats-per-replica x N conversations): a system prompt, then
turns of a user message and an answer, a think time between turns; a conversation ends
after --turns turns and a new one starts. Routers: round-robin, and herd's own
`AffinityTable` (herd.deploy.affinity: longest prefix, hot spots yield past --slack).
Reported per N and router: output tok/s, TTFT p50/p95, and the prefix hit rate of turns
after the first. Writes a PNG (Pillow) of throughput per replica and TTFT p50.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from herd.deploy.affinity import AffinityTable, Key, model_key

DT = 0.02  # simulation step, seconds


@dataclass
class Params:
    prefill: float = 343.8
    decode: float = 38.6
    batch_gain: float = 1.6
    slots: int = 4
    cached_chats: int = 8
    chats_per_replica: int = 8
    system: int = 300  # tokens
    user: int = 60
    answer: int = 64
    turns: int = 4
    think: float = 4.0  # mean seconds between a reply and the next turn
    slack: int = 4
    seconds: float = 300.0
    warmup: float = 60.0


@dataclass
class Turn:
    chat: int
    index: int  # 0 for a conversation's first turn
    context: int  # tokens before this turn's user message
    arrived: float
    prefill_left: float = 0.0  # seconds of lone-sequence work
    decode_left: float = 0.0
    first_token: float | None = None
    hit: bool = False


@dataclass
class Replica:
    running: list[Turn] = field(default_factory=list)
    queue: list[Turn] = field(default_factory=list)
    cache: OrderedDict[int, int] = field(default_factory=OrderedDict)  # chat -> tokens


def _link(chat: int, turn: int) -> str:
    return hashlib.blake2b(f"{chat}:{turn}".encode(), digest_size=8).hexdigest()


def simulate(n: int, router: str, p: Params, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    replicas = [Replica() for _ in range(n)]
    names = [str(i) for i in range(n)]
    table = AffinityTable(slack=p.slack, preloaded=["m"])
    rr = 0
    next_chat = 0
    waiting: list[tuple[float, Turn]] = []  # (time it is sent, turn)
    for _ in range(p.chats_per_replica * n):
        waiting.append((rng.uniform(0, p.think), Turn(next_chat, 0, p.system, 0.0)))
        next_chat += 1
    done: list[Turn] = []
    tokens_out = 0
    t = 0.0
    while t < p.seconds:
        # send the turns whose think time is over
        ready = [w for w in waiting if w[0] <= t]
        waiting = [w for w in waiting if w[0] > t]
        for _, turn in ready:
            turn.arrived = t
            loads = {names[i]: len(r.running) + len(r.queue) for i, r in enumerate(replicas)}
            if router == "round-robin":
                k, rr = rr % n, rr + 1
            else:
                links = [model_key("m"), *(_link(turn.chat, j) for j in range(turn.index + 1))]
                key = Key(tuple(links), tuple(range(len(links))))
                k = int(table.rank(key, loads)[0])
                table.record(key, names[k])
            rep = replicas[k]
            cached = rep.cache.get(turn.chat, 0)
            turn.hit = cached > 0
            prompt = turn.context + p.user
            turn.prefill_left = (prompt - min(cached, prompt)) / p.prefill
            turn.decode_left = p.answer / p.decode
            rep.queue.append(turn)
        # advance every replica by DT, processor sharing among its running sequences
        for rep in replicas:
            while rep.queue and len(rep.running) < p.slots:
                rep.running.append(rep.queue.pop(0))
            k = len(rep.running)
            if not k:
                continue
            gain = 1 + (p.batch_gain - 1) * (k - 1) / max(1, p.slots - 1)
            share = DT * gain / k
            finished = []
            for turn in rep.running:
                work = share
                if turn.prefill_left > 0:
                    used = min(work, turn.prefill_left)
                    turn.prefill_left -= used
                    work -= used
                    if turn.prefill_left <= 0:
                        turn.first_token = t + DT
                if work > 0 and turn.prefill_left <= 0:
                    before = turn.decode_left
                    turn.decode_left = max(0.0, before - work)
                    if t >= p.warmup:
                        tokens_out += round(before * p.decode) - round(turn.decode_left * p.decode)
                    if turn.decode_left <= 0:
                        finished.append(turn)
            for turn in finished:
                rep.running.remove(turn)
                context = turn.context + p.user + p.answer
                rep.cache[turn.chat] = context
                rep.cache.move_to_end(turn.chat)
                while len(rep.cache) > p.cached_chats:
                    rep.cache.popitem(last=False)
                done.append(turn)
                when = t + DT + rng.expovariate(1 / p.think)
                if turn.index + 1 < p.turns:
                    waiting.append((when, Turn(turn.chat, turn.index + 1, context, 0.0)))
                else:
                    waiting.append((when, Turn(next_chat, 0, p.system, 0.0)))
                    next_chat += 1
        t += DT
    measured = [x for x in done if x.arrived >= p.warmup and x.first_token is not None]
    ttft = sorted(x.first_token - x.arrived for x in measured)  # type: ignore[operator]
    later = [x for x in measured if x.index > 0]
    return {
        "tok_s": tokens_out / (p.seconds - p.warmup),
        "ttft_p50": statistics.median(ttft) if ttft else float("nan"),
        "ttft_p95": ttft[int(0.95 * (len(ttft) - 1))] if ttft else float("nan"),
        "hit_rate": sum(x.hit for x in later) / len(later) if later else float("nan"),
    }


# ---------------------------------------------------------------- the plot (Pillow)
def plot(results: dict[str, dict[int, dict[str, float]]], path: Path) -> None:
    from PIL import Image, ImageDraw

    w, h, pad = 1100, 460, 70
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    colors = {"affinity": (31, 119, 180), "round-robin": (214, 39, 40)}
    panels = [
        ("output tok/s per replica", lambda r, n: r["tok_s"] / n),
        ("TTFT p50, s", lambda r, n: r["ttft_p50"]),
    ]
    pw = (w - 3 * pad) // 2
    for i, (title, value) in enumerate(panels):
        x0, y0, x1, y1 = pad + i * (pw + pad), 40, pad + i * (pw + pad) + pw, h - 60
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text((x0, y0 - 22), title, fill="black")
        ns = sorted(next(iter(results.values())))
        top = max(value(results[r][n], n) for r in results for n in ns) * 1.15 or 1.0
        for k in range(5):
            y = y1 - (y1 - y0) * k / 4
            d.line([x0 - 4, y, x0, y], fill="black")
            d.text((x0 - 50, y - 6), f"{top * k / 4:.2f}", fill="black")

        box = (x0, y0, x1, y1)
        for j, n in enumerate(ns):
            x, _ = _xy(box, j, len(ns), 0, top)
            d.text((x - 6, y1 + 8), str(n), fill="black")
        d.text(((x0 + x1) // 2 - 30, y1 + 28), "replicas", fill="black")
        for r, color in colors.items():
            pts = [_xy(box, j, len(ns), value(results[r][n], n), top) for j, n in enumerate(ns)]
            d.line(pts, fill=color, width=3)
            for x, y in pts:
                d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
    for k, (r, color) in enumerate(colors.items()):
        d.rectangle([w - 230, 8 + 16 * k, w - 218, 20 + 16 * k], fill=color)
        d.text((w - 210, 8 + 16 * k), r, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _xy(box: tuple[int, int, int, int], j: int, count: int, v: float, top: float) -> tuple:
    x0, y0, x1, y1 = box
    return (x0 + (x1 - x0) * (j + 0.5) / count, y1 - (y1 - y0) * v / top)


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--replicas", default="1,2,4,8,16,32,64")
    a.add_argument("--prefill", type=float, default=Params.prefill)
    a.add_argument("--decode", type=float, default=Params.decode)
    a.add_argument("--batch-gain", type=float, default=Params.batch_gain)
    a.add_argument("--slots", type=int, default=Params.slots)
    a.add_argument("--cached-chats", type=int, default=Params.cached_chats)
    a.add_argument("--chats-per-replica", type=int, default=Params.chats_per_replica)
    a.add_argument("--turns", type=int, default=Params.turns)
    a.add_argument("--seconds", type=float, default=Params.seconds)
    a.add_argument("--png", type=Path, default=Path("docs/scaleout.png"))
    args = a.parse_args()
    p = Params(
        prefill=args.prefill,
        decode=args.decode,
        batch_gain=args.batch_gain,
        slots=args.slots,
        cached_chats=args.cached_chats,
        chats_per_replica=args.chats_per_replica,
        turns=args.turns,
        seconds=args.seconds,
    )
    ns = [int(x) for x in args.replicas.split(",")]
    results: dict[str, dict[int, dict[str, float]]] = {"affinity": {}, "round-robin": {}}
    print("| replicas | router | tok/s | tok/s per replica | TTFT p50 / p95 s | prefix hits |")
    print("|---|---|---|---|---|---|")
    for n in ns:
        for router in results:
            r = results[router][n] = simulate(n, router, p)
            print(
                f"| {n} | {router} | {r['tok_s']:.1f} | {r['tok_s'] / n:.1f} | "
                f"{r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | {100 * r['hit_rate']:.0f}% |",
                flush=True,
            )
    plot(results, args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
