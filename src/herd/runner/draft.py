"""A draft model for speculative decoding: a small model with the target's vocabulary that
proposes the next k tokens of each sequence (`herd.runner.speculate` verifies them).

The draft runs in a `Runner` of its own (its own KV cache, the same number of slots, one
per target slot). Before proposing, a slot catches up with what the target's slot holds
plus its pending token: the longest prefix its cache shares with that is kept (so after
the target rejected proposals only the dropped cells go, and a new request reuses its
prompt's prefix as the target does) and the rest is computed, in chunks of the draft's
batch. Then k passes of one token per proposing sequence, all sequences in one batch.

The vocabularies must match token for token (`check_vocab`): a proposal is a token id, and
an id means the same text to both models or the proposals are noise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from typing import Protocol

import numpy as np

from herd.errors import DraftError
from herd.gguf import GGUFFile
from herd.models import Batch
from herd.runner.engine import Runner
from herd.runner.sequence import Sequence, finite
from herd.sample import transforms as t

log = logging.getLogger("herd.runner")


class _Model(Protocol):  # herd.runner.loaded.Loaded, which imports this module
    name: str
    gguf: GGUFFile

    @property
    def n_vocab(self) -> int: ...

    @property
    def is_embedding(self) -> bool: ...


def check_draft(target: _Model, draft: _Model) -> None:
    """DraftError unless `draft` can draft for `target`: a generating model whose tokens
    are the target's, id for id."""
    if draft.is_embedding:
        raise DraftError(f"the draft model {draft.name} is an embedding model: it cannot draft")
    if target.n_vocab != draft.n_vocab:
        raise DraftError(
            f"the draft model {draft.name} has {draft.n_vocab} tokens, {target.name} "
            f"{target.n_vocab}: a draft must use its target's vocabulary"
        )
    ours = target.gguf.kv.get("tokenizer.ggml.tokens")
    theirs = draft.gguf.kv.get("tokenizer.ggml.tokens")
    if ours is None or theirs is None:
        raise DraftError("the draft or its target has no token list to compare")
    if list(ours) != list(theirs):
        at = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
        raise DraftError(
            f"the draft model {draft.name}'s token {at} is {theirs[at]!r}, {target.name}'s "
            f"is {ours[at]!r}: a draft must use its target's vocabulary"
        )


class Drafter:
    """Proposals from a draft model's runner (`draft`), whose slots mirror the target's."""

    def __init__(self, draft: Runner) -> None:
        self.runner = draft

    def propose(self, wanted: Seq[tuple[Sequence, int]]) -> None:
        """Up to k proposals (and their draft distributions) into each sequence's
        `spec.tokens` / `spec.q`. A failed draft pass costs only the proposals: its
        slots are forgotten and the target decodes one token at a time this step."""
        try:
            self._propose(wanted)
        except Exception:
            log.exception("the draft model failed; decoding without proposals this step")
            for seq, _ in wanted:
                assert seq.spec is not None
                seq.spec.tokens, seq.spec.q = [], []
                slot = self.runner.slots[seq.slot.id]
                self.runner.cache.remove(slot.id, 0, None)
                slot.cached = []

    def _propose(self, wanted: Seq[tuple[Sequence, int]]) -> None:
        draft = self.runner
        feeds: list[tuple[Sequence, list[int], int]] = []  # seq, tokens to feed, k
        for seq, k in wanted:
            context = seq.slot.cached + seq.pending
            k = min(k, draft.num_ctx - len(context))
            if k <= 0 or any(x < 0 for x in context):  # no room; image rows: no draft
                continue
            slot = draft.slots[seq.slot.id]
            n, limit = 0, min(len(slot.cached), len(context) - 1)
            while n < limit and slot.cached[n] == context[n]:
                n += 1
            if n < len(slot.cached):
                draft.cache.remove(slot.id, n, None)
                del slot.cached[n:]
            feeds.append((seq, context[n:], k))
        # catch up: every sequence's missing tokens, in batches; each one's last row
        last: dict[int, np.ndarray] = {}
        todo = [(seq, feed) for seq, feed, _ in feeds]
        while todo:
            room, parts, rest = draft.num_batch, [], []
            for seq, feed in todo:
                if room <= 0:
                    rest.append((seq, feed))
                    continue
                take = feed[:room]
                room -= len(take)
                parts.append((seq, take))
                if len(take) < len(feed):
                    rest.append((seq, feed[len(take) :]))
            rows = self._run(parts)
            done = {id(s) for s, _ in rest}
            last.update(
                {id(s): r for (s, _), r in zip(parts, rows, strict=True) if id(s) not in done}
            )
            todo = rest
        # then one token per pass for every sequence still proposing
        going = [(seq, k, last[id(seq)]) for seq, _, k in feeds]
        while going:
            for seq, _, row in going:
                self._pick(seq, row)
            more = [(s, k) for s, k, _ in going if s.spec is not None and len(s.spec.tokens) < k]
            if not more:
                break
            rows = self._run([(s, [s.spec.tokens[-1]]) for s, _ in more if s.spec is not None])
            going = [(s, k, r) for (s, k), r in zip(more, rows, strict=True)]

    def _pick(self, seq: Sequence, row: np.ndarray) -> None:
        """The draft's next token from its row: greedy, or drawn from its q."""
        spec = seq.spec
        assert spec is not None
        finite(row)
        if spec.draft_sampler is None:
            token, q = t.greedy(row), None
        else:
            q = spec.draft_sampler.distribution(row, seq.history + spec.tokens)
            ids, probs = q
            token = (
                int(ids[0]) if len(ids) == 1 else int(ids[t.draw(probs, spec.draft_sampler.rng)])
            )
        spec.tokens.append(token)
        spec.q.append(q)

    def _run(self, parts: list[tuple[Sequence, list[int]]]) -> list[np.ndarray]:
        """One draft pass: each sequence's tokens appended to its draft slot; the logits
        row of each part's last token."""
        draft = self.runner
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[int] = []
        outputs: list[int] = []
        for seq, take in parts:
            slot = draft.slots[seq.slot.id]
            start = len(slot.cached)
            tokens += take
            positions += range(start, start + len(take))
            seqs += [slot.id] * len(take)
            slot.cached += take
            outputs.append(len(tokens) - 1)
        batch = Batch(
            np.array(tokens, np.int32),
            np.array(positions, np.int32),
            np.array(seqs, np.int32),
            np.array(outputs, np.int32),
        )
        return list(np.array(draft._compute(batch)))
