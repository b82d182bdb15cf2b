"""The client side of benchmarks/serving.py: one code path drives every server.

A request is an OpenAI streamed chat (`/v1/chat/completions`, temperature 0, the same
`max_tokens`); its figures are the time to the first content chunk, the gaps between
content chunks (inter-token latency, as vLLM's serving benchmark measures it) and the
generated tokens (the usage chunk's count when the server sends one, else the chunks).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

TOPICS = [
    "a lighthouse keeper",
    "a lost robot",
    "a dragon who bakes bread",
    "a city under the sea",
    "a clockmaker's apprentice",
    "a comet",
    "a talking cat",
    "the last library on Earth",
]
# One system prompt for every conversation of the chat scenario: the prefix a server can
# keep once for all its slots (~250 tokens with SmolLM2's tokenizer).
SYSTEM = (
    "You are Quill, the writing assistant of a small publishing team. You help the team's "
    "authors draft, continue and polish short fiction for young readers. Follow the house "
    "rules: write in plain, vivid English; keep sentences short; prefer concrete details "
    "over abstractions; never include violence beyond what a picture book would show; give "
    "each character a name and one memorable trait; end every scene with a small surprise. "
    "When the author asks for a continuation, keep the names, the setting and the tone of "
    "what came before, and do not repeat earlier sentences. When the author asks for a "
    "title, answer with the title alone. When the author asks a question about the craft "
    "of writing, answer it in at most three sentences and give one example. If a request "
    "is unclear, make a reasonable choice and say which one you made in a single short "
    "sentence at the end. Do not mention these rules, and do not apologise."
)
FOLLOW_UPS = ["Continue the story with a twist.", "Now give it a title.", "Make it shorter."]
DOCUMENT = (
    "The history of astronomy is the story of how people came to understand the sky. "
    "Early observers tracked the motion of the sun, the moon and the planets, and built "
    "calendars from their cycles. Later, telescopes revealed moons around Jupiter, phases "
    "of Venus and countless stars in the Milky Way. Spectroscopy showed what stars are "
    "made of, and photography let astronomers measure their light precisely. "
)


@dataclass
class Result:
    ttft: float  # seconds to the first content chunk
    tokens: int
    elapsed: float
    gaps: list[float] = field(default_factory=list)  # seconds between content chunks

    @property
    def decode_rate(self) -> float:
        """Tokens/s after the first: the decode speed one client sees."""
        spent = self.elapsed - self.ttft
        return (self.tokens - 1) / spent if self.tokens > 1 and spent > 0 else 0.0


def percentile(values: list[float], q: float) -> float:
    """The q-th quantile (0..1), interpolated between the closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def sse_data(line: str) -> dict | None:
    """The JSON payload of one server-sent-events line; None for anything else (comments,
    blank keep-alives, other fields, the closing `[DONE]`)."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == "[DONE]":
        return None
    value = json.loads(payload)
    return value if isinstance(value, dict) else None


_local = threading.local()  # .http: the calling client thread's httpx.Client


def new_client() -> httpx.Client:
    return httpx.Client(timeout=600, limits=httpx.Limits(max_keepalive_connections=0))


def chat(url: str, model: str, messages: list[dict], max_tokens: int) -> tuple[Result, str]:
    """One streamed chat completion: its timing, token count and text."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    http = getattr(_local, "http", None)
    if http is None:  # outside a wave: a client of its own, made before the clock starts
        with new_client() as own:
            return _stream(own, url, body)
    return _stream(http, url, body)


def _stream(http: httpx.Client, url: str, body: dict) -> tuple[Result, str]:
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage, text = None, []
    with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            msg = sse_data(line)
            if msg is None:
                continue
            if msg.get("usage"):
                usage = msg["usage"].get("completion_tokens")
            for choice in msg.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    stamps.append(time.perf_counter() - t0)
                    text.append(piece)
    elapsed = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    tokens = usage if usage is not None else len(stamps)
    return Result(stamps[0] if stamps else elapsed, tokens, elapsed, gaps), "".join(text)


@dataclass
class Wave:
    clients: int
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.results) / self.wall if self.wall else 0.0

    def ttft(self, q: float) -> float:
        return percentile([r.ttft for r in self.results], q)

    def itl(self, q: float) -> float:
        return percentile([g for r in self.results for g in r.gaps], q)

    @property
    def mean_tokens(self) -> float:
        return sum(r.tokens for r in self.results) / max(1, len(self.results))


# ---- scenarios: what one client sends, given (client index, the wave's tag) ------------
Conversation = Callable[[str, str, int, str, int, int], list[Result]]


def chat_conversation(url: str, model: str, i: int, tag: str, turns: int, tokens: int):
    """(a) A multi-turn chat under the shared system prompt: each turn re-sends the
    conversation so far (what a chat UI does), so its prefix can come from the cache."""
    topic = TOPICS[i % len(TOPICS)]
    ask = f"Chat {tag}.{i}: tell me a story about {topic}."
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}]
    out = []
    for turn in range(turns):
        result, answer = chat(url, model, messages, tokens)
        out.append(result)
        follow = FOLLOW_UPS[turn % len(FOLLOW_UPS)]
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": follow}]
    return out


def independent_prompts(url: str, model: str, i: int, tag: str, turns: int, tokens: int):
    """(b) Unrelated one-shot prompts of different lengths (1 to 4 paragraphs), each
    different from its first word on, so that nothing but the template is shared."""
    out = []
    for k in range(turns):
        topic = TOPICS[(i + k) % len(TOPICS)]
        context = DOCUMENT * (1 + (i + k) % 4)
        ask = f"Request {tag}-{i}-{k}. {context}\n\nNow write a story about {topic}."
        out.append(chat(url, model, [{"role": "user", "content": ask}], tokens)[0])
    return out


# Arrivals in `staggered`: client i starts i x STAGGER s after the wave's release
STAGGER = 0.25


def staggered_prompts(url: str, model: str, i: int, tag: str, turns: int, tokens: int):
    """(c) The prompts of (b), client i starting i x STAGGER s after the others' release:
    requests that come while others decode, as real traffic does. In (a) and (b) every
    client starts at once and every reply has the same length, so a server that computes
    each burst of prompts before it decodes keeps all its sequences in step, and its
    streams never wait for another's prompt; here they do."""
    time.sleep(i * STAGGER)  # its own tag: none of (b)'s prompts of the same round cached
    return independent_prompts(url, model, i, f"staggered {tag}", turns, tokens)


SCENARIOS: dict[str, Conversation] = {
    "chat": chat_conversation,
    "independent": independent_prompts,
    "staggered": staggered_prompts,
}


def wave(
    url: str, model: str, scenario: str, clients: int, tag: str, turns: int, tokens: int
) -> Wave:
    """`clients` threads released at once, each running one conversation of the scenario;
    the wall time runs from the release to the last reply's end. Every prompt carries `tag`
    (give each wave its own), so a wave finds none of an earlier one's conversations cached,
    only what all share: the system prompt, the template."""
    run = SCENARIOS[scenario]
    out = Wave(clients)
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        # each client's HTTP client (as an OpenAI client object holds one) made before the
        # release: a new one per request cost 20-36 ms of CPU for its TLS context, 8 of
        # them at once on the servers' two cores, inside the measured time. A connection
        # per request still (loopback: ~0.1 ms): llama-server closed kept-alive ones
        # under a new request now and then ("Server disconnected without sending a
        # response"), which a retry would hide inside the timings
        with new_client() as http:
            _local.http = http
            start.wait()
            try:
                results = run(url, model, i, tag, turns, tokens)
                with lock:
                    out.results.extend(results)
            except Exception as e:  # re-raised below, in the caller's thread
                errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    out.wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return out


def single(url: str, model: str, tag: str, tokens: int) -> Result:
    """One new conversation under the shared system prompt, alone on the server."""
    ask = f"Solo {tag}: tell me a long story about {TOPICS[0]}."
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}]
    return chat(url, model, messages, tokens)[0]
