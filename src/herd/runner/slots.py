"""Which slot a new request takes, and what of its prompt the slot holds already: the
slot sharing the longest prefix, its own cells kept for a chat's next turn; what it held
past that prefix parked in the prompt cache, and a longer prefix copied in from the prompt
cache or from a busy slot."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from herd.errors import HerdError
from herd.runner.images import span_start
from herd.runner.prompt_cache import MIN_TOKENS

if TYPE_CHECKING:
    from herd.runner.engine import Runner
    from herd.runner.sequence import Slot

log = logging.getLogger("herd.runner")


def _common(cached: list[int], tokens: list[int]) -> int:
    """How many of tokens, short of the last, start as cached does."""
    n, limit = 0, min(len(cached), len(tokens) - 1)
    while n < limit and cached[n] == tokens[n]:
        n += 1
    return n


def claim_slot(runner: Runner, tokens: list[int]) -> tuple[Slot, int]:
    """The free slot sharing the longest prefix with tokens; stale entries removed. On
    a tie, the slot holding the fewest cells: an empty slot before one whose cached
    prefix another request may still reuse. What the slot held past the shared prefix
    goes to the prompt cache first, and a longer prefix comes back (`_borrow`)."""
    free = [s for s in runner.slots if not s.busy]
    if not free:
        raise HerdError("no free sequence slot")
    slot = max(free, key=lambda s: (_common(s.cached, tokens), -len(s.cached)))
    n = span_start(tokens, _common(slot.cached, tokens))  # an image's rows together
    _park(runner, slot, n)
    n = _borrow(runner, slot, tokens, n)
    if n < len(slot.cached):
        runner.cache.remove(slot.id, n, None)
        del slot.cached[n:]
    slot.busy = True
    return slot, n


def _borrow(runner: Runner, slot: Slot, tokens: list[int], n: int) -> int:
    """Copy into the slot a prefix of tokens longer than its own n, when one is held
    (by at least MIN_TOKENS more): by the prompt cache, or by a slot another request is
    using (its rows copied, not shared: each sequence keeps its own cells, compact).
    The prefix the slot holds now."""
    if runner.prompts is None:
        return n
    kept, key = runner.prompts.longest(tokens, len(tokens) - 1)
    donor = max(
        (s for s in runner.slots if s.busy), key=lambda s: _common(s.cached, tokens), default=None
    )
    lent = 0 if donor is None else _common(donor.cached, tokens)
    if max(kept, lent) - n < MIN_TOKENS:
        return n
    m = span_start(tokens, max(kept, lent))
    if key is not None and kept >= lent:
        snap = runner.prompts.get(key)
    else:
        assert donor is not None
        try:
            snap = runner.cache.snapshot(donor.id, m)
        except MemoryError:  # a saving too: the prefix is computed instead
            log.warning("no host memory to copy a %d-token prefix", m)
            return n
        if snap is None:
            return n
    if not runner.cache.restore(slot.id, snap, m):
        slot.cached = []  # the slot holds nothing now
        return 0
    slot.cached = list(tokens[:m])
    runner.prompts.restored += m
    return m


def _park(runner: Runner, slot: Slot, keep: int) -> None:
    """Copy a slot's cached prompt to the prompt cache before all but its first `keep`
    tokens leave the slot, when that is worth it (`PromptCache.wants`): only what follows
    the longest kept prompt it starts with, under the runner's lock as a new chat waits."""
    if runner.prompts is None or len(slot.cached) - keep < MIN_TOKENS:
        return
    if not runner.prompts.wants(slot.cached):
        return
    base, start = runner.prompts.base(slot.cached)
    try:
        snap = runner.cache.snapshot(slot.id, len(slot.cached), base, start)
    except MemoryError:  # keeping it is a saving, not the request's business
        log.warning("no host memory to keep a %d-token prompt", len(slot.cached))
        return
    if snap is not None:
        runner.prompts.put(slot.cached, snap)
