"""Prefix affinity: which replica already holds a request's prompt prefix in its KV cache.

A request's key is a chain of hashes: the model name first, then the prompt's leading
blocks, each hash covering everything before it (the tools, then each message split into
blocks of `block` characters, a message's tail its own block). A chat's next turn resends
the earlier messages verbatim, so its chain starts with the previous turn's chain, and the
replica that served that turn has those tokens cached (herd's runners reuse the longest
cached prefix of a slot).

`AffinityTable.rank` orders replicas, best first:
1. the replicas that served the longest matching chain (at least one block past the
   model), when the match covers at least `min_match` of the prompt;
2. the replicas that hold the model (served it, or preloaded it at start);
3. every replica.
Within each group the least loaded come first. Ties go to the replica with the highest
rendezvous hash of the conversation's first block, so routers that share no state (several
ingress replicas) still send a new chat to the same replica, and new chats spread evenly.
Hot spots: a replica whose load exceeds the least loaded one's by more than `slack`
requests loses its affinity (it drops to group 3), so one long shared prefix (a common
system prompt) can pin at most `slack` extra requests on a replica before others take
them and cache the prefix too.

The table is bounded (least recently used chains are forgotten first) and forgets a
replica when it dies. Nothing here imports Ray: `herd.deploy.ray` wraps it in Ray Serve's
request router.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

BLOCK = 256  # characters per block: about 64 tokens, small enough that one turn fills one
MAX_BLOCKS = 64  # a chain covers the first 64 blocks; deeper prefixes match as deep as that

# routes whose prompt is a conversation, and where its parts are in the request body
CHAT = {"/api/chat", "/v1/chat/completions", "/v1/messages", "/v1/responses"}
PROMPT = {"/api/generate", "/v1/completions"}
EMBED = {"/api/embed", "/api/embeddings", "/v1/embeddings"}


@dataclass(frozen=True)
class Key:
    """A request's hash chain (model first) and how many prompt characters it covers."""

    chain: tuple[str, ...]
    chars: tuple[int, ...]  # characters covered up to each link (0 for the model)

    @property
    def model(self) -> str | None:
        return self.chain[0] if self.chain else None


NO_KEY = Key((), ())


def _h(prev: str, data: str) -> str:
    return hashlib.blake2b(f"{prev}\0{data}".encode(), digest_size=8).hexdigest()


def model_key(model: str) -> str:
    """The first link of every chain for `model` (an untagged name means `:latest`)."""
    name = model.strip().lower()
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return _h("model", name)


def chain(model: str, parts: Iterable[str], block: int = BLOCK) -> Key:
    """The hash chain of `parts` (each split into blocks, its tail a block of its own)."""
    links, chars = [model_key(model)], [0]
    covered = 0
    for part in parts:
        for i in range(0, max(len(part), 1), block):
            if len(links) > MAX_BLOCKS:
                return Key(tuple(links), tuple(chars))
            piece = part[i : i + block]
            covered += len(piece)
            links.append(_h(links[-1], piece))
            chars.append(covered)
    return Key(tuple(links), tuple(chars))


def request_key(path: str, body: bytes, block: int = BLOCK) -> Key:
    """The key of an HTTP request to herd's API; NO_KEY when it names no model."""
    if path not in CHAT | PROMPT | EMBED:
        return NO_KEY
    try:
        req = json.loads(body or b"{}")
    except ValueError:
        return NO_KEY  # the replica answers the 400
    if not isinstance(req, dict) or not isinstance(req.get("model"), str):
        return NO_KEY
    parts = []
    if path in CHAT:
        for field in ("tools", "system", "instructions"):
            if req.get(field):
                parts.append(_canon({field: req[field]}))
        messages = req.get("messages", req.get("input"))
        if isinstance(messages, list):
            parts += [_canon(m) for m in messages]
        elif isinstance(messages, str):
            parts.append(messages)
    elif path in PROMPT:
        if req.get("system"):
            parts.append(_canon({"system": req["system"]}))
        if isinstance(req.get("prompt"), str):
            parts.append(req["prompt"])
    return chain(req["model"], parts, block)


def _canon(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _weight(seed: str, replica: str) -> int:
    """Rendezvous (highest random weight) hashing: a stable order of replicas per seed."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{replica}".encode(), digest_size=8).digest())


class AffinityTable:
    """Chain link -> the replicas that served a request with that link (bounded, LRU)."""

    def __init__(
        self,
        slack: int = 4,
        min_match: float = 0.0,
        capacity: int = 100_000,
        preloaded: Sequence[str] = (),
    ) -> None:
        self.slack, self.min_match, self.capacity = slack, min_match, capacity
        self.preloaded = {model_key(m) for m in preloaded}  # every replica holds these
        self.owners: OrderedDict[str, dict[str, None]] = OrderedDict()

    def record(self, key: Key, replica: str) -> None:
        for link in key.chain:
            owners = self.owners.pop(link, {})
            owners.pop(replica, None)
            owners[replica] = None  # most recent last
            self.owners[link] = owners
        while len(self.owners) > self.capacity:
            self.owners.popitem(last=False)

    def forget(self, replica: str) -> None:
        for owners in self.owners.values():
            owners.pop(replica, None)

    def match(self, key: Key, replicas: Iterable[str]) -> tuple[int, list[str]]:
        """(characters matched, replicas holding the longest matching prefix)."""
        live = set(replicas)
        for depth in range(len(key.chain) - 1, 0, -1):
            owners = [r for r in self.owners.get(key.chain[depth], ()) if r in live]
            if owners:
                return key.chars[depth], owners
        return 0, []

    def rank(self, key: Key, loads: Mapping[str, int]) -> list[str]:
        """Every replica in `loads` (replica -> requests in flight), best first."""
        if not loads:
            return []
        least = min(loads.values())
        seed = key.chain[1] if len(key.chain) > 1 else (key.model or "")

        def order(group: Iterable[str]) -> list[str]:
            ok = [r for r in group if loads[r] <= least + self.slack]
            return sorted(ok, key=lambda r: (loads[r], -_weight(seed, r)))

        matched, owners = self.match(key, loads)
        total = key.chars[-1] if key.chars else 0
        first = order(owners) if matched and matched >= self.min_match * total else []
        if key.model in self.preloaded:
            holders: Iterable[str] = loads
        else:
            holders = [r for r in self.owners.get(key.model or "", ()) if r in loads]
        ranked = first + order(holders) + sorted(loads, key=lambda r: (loads[r], -_weight(seed, r)))
        return list(dict.fromkeys(ranked))
