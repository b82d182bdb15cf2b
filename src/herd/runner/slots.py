"""Which slot a new request takes, and what of its prompt the slot holds already: the
slot sharing the longest prefix, its own cells kept for a chat's next turn; what it held
past that prefix parked in the prompt cache; a longer prefix shared from another slot's
cells (one copy of a common system prompt), and more copied in from the prompt cache or
from a busy slot."""

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
    """Give the slot a prefix of tokens longer than its own n, when one is held (by at
    least MIN_TOKENS more). Another slot's cells first: shared, not copied (`_share`).
    Then the prompt cache's rows, or a busy slot's copied where they cannot be shared,
    for what follows. The prefix the slot holds now."""
    n = _share(runner, slot, tokens, n)
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
    start = n  # the slot keeps what it holds (shared or its own), takes the rest
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
    if not runner.cache.restore(slot.id, snap, m, start):
        slot.cached = []  # the slot holds nothing now
        return 0
    slot.cached = list(tokens[:m])
    runner.prompts.restored += m - start
    return m


def _share(runner: Runner, slot: Slot, tokens: list[int], n: int) -> int:
    """Let the slot share the longest prefix of tokens that another slot holds, at least
    MIN_TOKENS longer than its own n: the other's cells, one copy of a common system
    prompt for every slot that starts with it, attended by each as a piece of its own
    (`Causal.prefix`). Not where attention is fused (flash attention keeps no log-sum-exp
    to merge the piece by), and only where the runner was asked to (HERD_SHARED_PREFIX,
    `envconfig.shared_prefix`). The prefix the slot holds now."""
    if not runner.shared_prefix or runner.backend.cache_config().flash_attention:
        return n
    donors = [(_common(s.cached, tokens), s) for s in runner.slots if s is not slot and s.cached]
    held, donor = max(donors, key=lambda d: d[0], default=(0, slot))
    if held - n < MIN_TOKENS:
        return n
    shared = span_start(tokens, runner.cache.shareable(donor.id, held))
    if shared - n < MIN_TOKENS:
        return n
    runner.cache.copy_prefix(donor.id, slot.id, shared)
    slot.cached = list(tokens[:shared])
    runner.prompts_shared += shared
    return shared


def park_idle(runner: Runner, slot: Slot) -> None:
    """Copy the conversation of a slot idle for a while to the prompt cache, a spare while
    the slot holds it, so that a new chat taking the slot later does not wait for the
    copy: 8 new chats claiming slots one after another under the runner's lock spent
    1.3-3.9 ms each on it (~20 ms of the burst's TTFT, traced in `herd serve`)."""
    slot.parked = slot.ended
    _park(runner, slot, 0, spare=True)


def _park(runner: Runner, slot: Slot, keep: int, spare: bool = False) -> None:
    """Copy a slot's cached prompt to the prompt cache before all but its first `keep`
    tokens leave the slot, when that is worth it (`PromptCache.wants`): only what follows
    the longest kept prompt it starts with, under the runner's lock as a new chat waits
    (unless the runner kept it while idle, `park_idle`)."""
    if runner.prompts is None or len(slot.cached) - keep < MIN_TOKENS:
        return
    if not runner.prompts.wants(slot.cached):
        if not spare:  # kept already (a spare, while idle): the only copy from now on
            runner.prompts.refresh(slot.cached)
        return
    base, start = runner.prompts.base(slot.cached)
    try:
        snap = runner.cache.snapshot(slot.id, len(slot.cached), base, start)
    except MemoryError:  # keeping it is a saving, not the request's business
        log.warning("no host memory to keep a %d-token prompt", len(slot.cached))
        return
    if snap is not None:
        runner.prompts.put(slot.cached, snap, spare)
