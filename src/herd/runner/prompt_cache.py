"""The prompt cache: the KV rows of prompts that left the slots, kept in host memory.

A slot keeps its tokens after a request, but with more conversations than slots every slot
is soon taken by other prompts, and a shared system prompt is computed again for each new
conversation. Before a slot's cells are dropped for a prompt that shares little with them,
the runner copies them here (`Cache.snapshot`); a new request whose prompt starts with a
kept one gets those rows written back into its slot (`Cache.restore`) instead of computing
them: a copy of some MB against a forward pass over every token. This is llama-server's
host prompt cache (`--cache-ram`), least recently used first out, within a byte budget
(HERD_PROMPT_CACHE). A prompt that starts with a kept one is kept as its rows past that
one's only, built on them (`PromptCache.base`).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from herd.models.base import KeptRows

# prompts shorter than this are not worth a copy: computing them costs about as much
MIN_TOKENS = 32


@dataclass
class Entry:
    tokens: tuple[int, ...]  # the prompt the rows are of
    snap: KeptRows  # the cache's snapshot (`Causal.snapshot`)


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many tokens a and b start with alike."""
    m = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:m]) != np.asarray(b[:m]))
    return int(differ[0]) if len(differ) else m


class PromptCache:
    def __init__(self, limit: int) -> None:
        """`limit`: bytes of host memory the kept rows may take."""
        self.limit = limit
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        # (tokens, key) in the tokens' order: the kept prompt sharing the longest prefix
        # with any prompt sorts next to it, found in log(n) steps; a scan of every entry
        # took ~2.4 µs each under the runner's lock, three times per new request
        self._sorted: list[tuple[tuple[int, ...], int]] = []
        self._held: dict[int, list] = {}  # id -> [snapshot piece, kept prompts holding it]
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
        want = tuple(tokens[:limit])
        at = bisect_left(self._sorted, (want,))
        best, best_key = 0, None
        for kept, key in self._sorted[max(at - 1, 0) : at + 1]:
            n = _common(kept, want)
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

    def refresh(self, tokens: list[int]) -> None:
        """The kept prompt that covers tokens (they are it or its prefix), if any, becomes
        the most recently used: its slot was just taken, and it is the only copy now."""
        n, key = self.longest(tokens, len(tokens))
        if key is not None and n == len(tokens):
            self.entries.move_to_end(key)

    def put(self, tokens: list[int], snap: KeptRows, spare: bool = False) -> None:
        """Keep a prompt's rows; a kept prompt that is a prefix of it goes (it covers it),
        then the least recently used until everything held fits: the rows of every kept
        prompt and of those they build on, which stay while one builds on them. `spare`:
        a copy of a prompt its slot still holds (kept while the runner was idle), the first
        to go until that slot is taken (`refresh`)."""
        if snap.nbytes > self.limit or len(tokens) < MIN_TOKENS or self.limit <= 0:
            return
        n, key = self.longest(tokens, len(tokens))
        if n == len(tokens):  # a prefix of a kept prompt (`wants`): covered by it
            return
        # no kept prompt is a prefix of another, so one at most is of tokens: the one
        # sharing the longest prefix with them, if it shares all of its own
        if key is not None and n == len(self.entries[key].tokens):
            self._remove(key)
        entry = Entry(tuple(tokens), snap)
        self.entries[self._next] = entry
        if spare:
            self.entries.move_to_end(self._next, last=False)
        insort(self._sorted, (entry.tokens, self._next))
        self._next += 1
        for piece in snap.pieces():
            held = self._held.setdefault(id(piece), [piece, 0])
            held[1] += 1
            self.stored += piece.nbytes if held[1] == 1 else 0
        while self.entries and self.stored > self.limit:
            self._remove(self._evictable())

    def _evictable(self) -> int:
        """The least recently used kept prompt whose going frees memory: one that others
        build on goes after them (its rows would stay, and its own prompt be lost)."""
        for key, entry in self.entries.items():
            if any(self._held[id(p)][1] == 1 for p in entry.snap.pieces()):
                return key
        return next(iter(self.entries))

    def _remove(self, key: int) -> None:
        entry = self.entries.pop(key)
        del self._sorted[bisect_left(self._sorted, (entry.tokens, key))]
        for piece in entry.snap.pieces():
            held = self._held[id(piece)]
            held[1] -= 1
            if not held[1]:
                del self._held[id(piece)]
                self.stored -= piece.nbytes

    def clear(self) -> None:
        self.entries.clear()
        self._sorted.clear()
        self._held.clear()
        self.stored = 0

    def stats(self) -> dict[str, float]:
        return {
            "prompt_cache_bytes": self.stored,
            "prompt_cache_prompts": len(self.entries),
            "prompt_cache_restored": self.restored,
        }
