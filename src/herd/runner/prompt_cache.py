"""The prompt cache: the KV rows of prompts that left the slots, kept in host memory.

A slot keeps its tokens after a request, but with more conversations than slots every slot
is soon taken by other prompts, and a shared system prompt is computed again for each new
conversation. Before a slot's cells are dropped for a prompt that shares little with them,
the runner copies them here (`Cache.snapshot`); a new request whose prompt starts with a
kept one gets those rows written back into its slot (`Cache.restore`) instead of computing
them: a copy of some MB against a forward pass over every token. This is llama-server's
host prompt cache (`--cache-ram`), least recently used first out, within a byte budget
(HERD_PROMPT_CACHE).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from herd.models.base import KeptRows

# prompts shorter than this are not worth a copy: computing them costs about as much
MIN_TOKENS = 32


@dataclass
class Entry:
    tokens: np.ndarray  # int64, the prompt the rows are of
    snap: KeptRows  # the cache's snapshot (`Causal.snapshot`)


class PromptCache:
    def __init__(self, limit: int) -> None:
        """`limit`: bytes of host memory the kept rows may take."""
        self.limit = limit
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self._next = 0
        self.stored = 0  # bytes held
        self.restored = 0  # tokens given back to slots so far

    def __len__(self) -> int:
        return len(self.entries)

    def longest(self, tokens: list[int], limit: int) -> tuple[int, int | None]:
        """(length, key) of the kept prompt sharing the longest prefix with tokens, at
        most `limit` of them; (0, None) when none does."""
        if not self.entries or limit <= 0:
            return 0, None
        want = np.asarray(tokens[:limit], dtype=np.int64)
        best, best_key = 0, None
        for key, entry in self.entries.items():
            m = min(len(want), len(entry.tokens))
            differ = np.flatnonzero(entry.tokens[:m] != want[:m])
            n = int(differ[0]) if len(differ) else m
            if n > best:
                best, best_key = n, key
        return best, best_key

    def get(self, key: int) -> KeptRows:
        """The snapshot kept under key, now the most recently used."""
        self.entries.move_to_end(key)
        return self.entries[key].snap

    def base(self, tokens: list[int]) -> tuple[KeptRows | None, int]:
        """The kept rows a snapshot of tokens can build on, and how many of its positions
        they give: a conversation under a kept system prompt copies what follows it only
        (a third of its rows, in the serving benchmark's chats)."""
        n, key = self.longest(tokens, len(tokens))
        if key is None or n < MIN_TOKENS:
            return None, 0
        return self.entries[key].snap, n

    def wants(self, tokens: list[int]) -> bool:
        """Whether a prompt is worth keeping: long enough, and not a prefix of one kept."""
        if len(tokens) < MIN_TOKENS or self.limit <= 0:
            return False
        n, _ = self.longest(tokens, len(tokens))
        return n < len(tokens)

    def put(self, tokens: list[int], snap: KeptRows) -> None:
        """Keep a prompt's rows; kept prompts that are prefixes of it go (it covers them),
        then the least recently used until everything held fits: the rows of every kept
        prompt and of those they build on, which stay while one builds on them."""
        if snap.nbytes > self.limit:
            return
        arr = np.asarray(tokens, dtype=np.int64)
        for key in [
            k
            for k, e in self.entries.items()
            if len(e.tokens) <= len(arr) and np.array_equal(e.tokens, arr[: len(e.tokens)])
        ]:
            del self.entries[key]
        self.entries[self._next] = Entry(arr, snap)
        self._next += 1
        self.stored = self._held()
        while self.entries and self.stored > self.limit:
            del self.entries[next(iter(self.entries))]
            self.stored = self._held()

    def _held(self) -> int:
        """The bytes of the rows the kept prompts hold, shared ones once."""
        pieces = {id(p): p.nbytes for e in self.entries.values() for p in e.snap.pieces()}
        return sum(pieces.values())

    def clear(self) -> None:
        self.entries.clear()
        self.stored = 0

    def stats(self) -> dict[str, float]:
        return {
            "prompt_cache_bytes": self.stored,
            "prompt_cache_prompts": len(self.entries),
            "prompt_cache_restored": self.restored,
        }
