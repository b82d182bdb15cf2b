"""What one step of the batch loop computes: which sequences' tokens go in the batch, how
many of a prompt's, and in which rows.

Decoding sequences come first: each has one token (and its speculative proposals) to feed,
and a long prompt must not hold their next token back. Prompts share what room is left, in
the runner's rotating order (fair between slots), at most `prefill` tokens of them in a
step while others decode (chunked prefill, as llama-server's ubatch and vLLM's token
budget; by default what room the batch has left): a 2,000-token prompt is then a few steps
of up to `num_batch` tokens, between which every other sequence gets its token, instead of
one step of seconds that stalls them all.

The rows are then laid out in slot order, whatever order the room was shared in: the
cache plans a block of queries per sequence (`herd.kvcache.causal`), and a decode step
whose sequences come in the same order has the last one's shapes, so its graph is rerun
instead of built again (the runner's rotation made every step's layout new).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from herd.models import Batch, BatchImage
from herd.runner.emit import finish
from herd.runner.images import batch_images, fits
from herd.runner.sequence import Sequence

if TYPE_CHECKING:
    from herd.runner.engine import Runner


@dataclass
class Part:
    """One sequence's rows in the batch."""

    seq: Sequence
    take: list[int]  # the tokens fed (image rows by their keys), proposals excluded
    extra: list[int]  # speculative proposals after them
    start: int  # position of the first


@dataclass
class Step:
    batch: Batch
    owners: list[Sequence]  # sequences sampling this step, in the order of their rows
    members: list[Sequence] = field(default_factory=list)  # every sequence in the batch


def plan_step(runner: Runner, active: list[Sequence], prefill: int) -> Step | None:
    """The batch of this step (None: nothing to feed), the sequences' pending tokens moved
    into their slots' cached ones. `prefill`: most prompt tokens while others decode."""
    decoding = [s for s in active if len(s.pending) == 1]
    prompting = [s for s in active if len(s.pending) > 1]
    parts: list[Part] = []
    used = prompt_used = 0
    for seq in decoding + prompting:
        room = runner.num_batch - used
        if seq in prompting and decoding:
            room = min(room, prefill - prompt_used)
        if room <= 0:
            if seq in prompting:
                break
            continue
        part = _take(runner, seq, room, used == 0)
        if part is None:
            continue
        parts.append(part)
        used += len(part.take) + len(part.extra)
        if seq in prompting:
            prompt_used += len(part.take)
    if not parts:
        return None
    return _layout(runner, sorted(parts, key=lambda p: p.seq.slot.id))


def _take(runner: Runner, seq: Sequence, room: int, first: bool) -> Part | None:
    """What of seq's pending tokens fit `room` (`first`: the batch is empty so far)."""
    slot = seq.slot
    if len(slot.cached) + 1 > runner.num_ctx:  # context full while generating
        if not seq.shift:
            finish(seq, "length")
            return None
        runner._shift(slot, seq.options.num_keep)
    take = seq.pending[: fits(seq.pending, room, first, seq.images)]
    if not take:  # an image longer than the room: a batch of its own next
        return None
    extra: list[int] = []
    if seq.spec is not None:  # proposals follow a decoding token, room allowing
        extra = seq.spec.tokens[: room - len(take)] if take == seq.pending else []
        seq.spec.tokens, seq.spec.q = extra, seq.spec.q[: len(extra)]
    part = Part(seq, take, extra, len(slot.cached))
    seq.pending = seq.pending[len(take) :]
    slot.cached += take + extra  # proposals: a row for each, after the last token's
    return part


def _layout(runner: Runner, parts: list[Part]) -> Step:
    tokens: list[int] = []
    positions: list[int] = []
    seqs: list[int] = []
    outputs: list[int] = []
    owners: list[Sequence] = []
    images: list[BatchImage] = []
    for part in parts:
        seq = part.seq
        if seq.images:
            images += batch_images(part.take, len(tokens), seq.images)
        fed = part.take + part.extra
        tokens += fed
        positions += range(part.start, part.start + len(fed))
        seqs += [seq.slot.id] * len(fed)
        if not seq.pending:  # its last token's row samples, then each proposal's
            outputs += range(len(tokens) - 1 - len(part.extra), len(tokens))
            owners.append(seq)
    ids = np.array(tokens, np.int32)
    if images:
        assert runner.vision is not None
        ids = np.where(ids < 0, np.int32(runner.vision.image_token), ids)
    batch = Batch(
        ids,
        np.array(positions, np.int32),
        np.array(seqs, np.int32),
        np.array(outputs, np.int32),
        images,
    )
    return Step(batch, owners, [p.seq for p in parts])
