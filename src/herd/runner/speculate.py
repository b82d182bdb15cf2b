"""Speculative decoding: a sequence proposes k tokens, the target model verifies them all
in one batch, and the standard rejection rule keeps the output distribution the target's.

Where proposals come from:
    prompt lookup  (`lookup_ngram` N > 0) the tokens that followed the most recent earlier
                   occurrence of the sequence's last n-gram (prompt + answer so far),
                   trying n = N down to 1; no model, no distribution (a point mass)
    a draft model  (`herd.runner.draft.Drafter`, a load-time `draft`) k tokens decoded by
                   the small model: greedy when the request is, else drawn from its own
                   distribution q under the request's sampler settings

How they are verified (`verify`): the step feeds `[last token] + proposals` and takes a
logits row at every position; row i gives the target's distribution p (herd's sampler
transforms: penalties, top_k, temperature, top_p, min_p) after proposal i - 1. Proposal
x is accepted with probability min(1, p(x) / q(x)); the first rejected one is replaced by
a draw from norm(max(0, p - q)) and the rest are dropped; when all are accepted, the last
row gives one more token (Leviathan et al. 2023, Chen et al. 2023). Greedy sampling makes
p a point mass, so this is "accept while the proposal is the argmax". Every kept token
goes through the runner's one-token path (`herd.runner.emit`: grammar, EOG, stops, logprobs,
`num_predict`), and cells of dropped proposals leave the KV cache and `Slot.cached`.

k adapts per sequence (Hugging Face's assisted-generation heuristic): it starts at
`draft_num_predict`, grows by 2 after a step that accepted every proposal and shrinks by
1 after one that did not, within 1..16. A step that accepted nothing also makes the
sequence sit out the next 1, 2, 4, ... 32 steps (doubling while it goes on, reset by any
acceptance): where the answer does not follow its input, verifying proposals that are
all rejected costs a wider batch every step (free writing with prompt lookup ran at 0.61x
plain decode without this). A sequence with a grammar (`format`) or images
does not speculate; `draft_num_predict` 0 turns speculation off.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from herd.options import Options
from herd.runner.emit import emit
from herd.runner.sequence import Sequence, finite
from herd.sample import Sampler
from herd.sample import transforms as t

if TYPE_CHECKING:
    from herd.runner.engine import Runner

K_MIN, K_MAX = 1, 16
PAUSE_MAX = 32  # steps a sequence sits out after proposals that were all rejected
Dist = tuple[t.Ids, t.Probs]  # a distribution as (ids, probabilities summing to 1)


@dataclass
class Speculation:
    """One sequence's speculation: how many tokens to propose next, and the counts."""

    k: int
    lookup: int  # longest n-gram prompt lookup matches; 0: the draft model proposes
    draft_sampler: Sampler | None = None  # the draft's draws (None: greedy)
    proposed: int = 0
    accepted: int = 0
    pause: int = 0  # steps to sit out after the last fully rejected step
    idle: int = 0  # of them, still to sit out
    tokens: list[int] = field(default_factory=list)  # this step's proposals
    q: list[Dist | None] = field(default_factory=list)  # their draft distributions

    def update(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        self.k = min(self.k + 2, K_MAX) if accepted == proposed else max(self.k - 1, K_MIN)
        if proposed and not accepted:
            self.pause = min(max(2 * self.pause, 1), PAUSE_MAX)
            self.idle = self.pause
        elif accepted:
            self.pause = 0

    def sits_out(self) -> bool:
        """Whether this step goes without proposals (after fully rejected ones)."""
        if self.idle > 0:
            self.idle -= 1
            return True
        return False


def speculation(options: Options, sampler: Sampler, has_draft: bool) -> Speculation | None:
    """A new sequence's speculation, or None when it does not speculate."""
    if options.draft_num_predict <= 0 or sampler.grammar is not None:
        return None
    if options.lookup_ngram > 0:
        return Speculation(min(options.draft_num_predict, K_MAX), options.lookup_ngram)
    if not has_draft:
        return None
    draft = None
    if sampler.temperature > 0:  # the draft draws with the request's settings, own history
        draft = Sampler(**{**options.sampler_kwargs(), "seed": -1}, rng=sampler.rng)
    return Speculation(min(options.draft_num_predict, K_MAX), 0, draft)


def lookup(tokens: Seq[int], ngram: int, k: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the last n tokens,
    for the longest n <= `ngram` that occurs earlier; [] when none does."""
    arr = np.asarray(tokens, np.int64)
    size = len(arr)
    for n in range(min(ngram, size - 1), 0, -1):
        # windows starting at 0 .. size-n-1: each is followed by at least one token
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == arr[size - n :]).all(axis=1))
        if len(hits):
            at = int(hits[-1]) + n
            return [int(x) for x in arr[at : at + k]]
    return []


def accept(p: Dist, token: int, q: Dist | None, rng: np.random.Generator) -> tuple[bool, int]:
    """The rejection rule for one proposal: (True, token) with probability
    min(1, p(token) / q(token)), else (False, a draw from norm(max(0, p - q))). `q` None
    is a point mass on `token` (prompt lookup): accepted with probability p(token), else
    a draw from p without it."""
    ids, probs = p
    p_x = float(probs[ids == token].sum())
    q_x = 1.0 if q is None else float(q[1][q[0] == token].sum())
    if p_x >= q_x or (q_x > 0 and rng.random() * q_x < p_x):
        return True, token
    if q is None:
        rest = np.where(ids == token, 0.0, probs)
    else:
        q_at = np.zeros(len(ids))
        _, at_p, at_q = np.intersect1d(ids, q[0], assume_unique=True, return_indices=True)
        q_at[at_p] = q[1][at_q]
        rest = np.maximum(probs - q_at, 0.0)
    if not rest.sum() > 0:  # only by rounding (p == q): p itself
        rest = probs
    return False, int(ids[t.draw(rest, rng)])


def draw(p: Dist, rng: np.random.Generator) -> int:
    ids, probs = p
    return int(ids[0]) if len(ids) == 1 else int(ids[t.draw(probs, rng)])


def propose(runner: Runner, seqs: Seq[Sequence]) -> None:
    """This step's proposals of each decoding sequence that speculates, within what its
    context and the batch have room for."""
    wanted: list[tuple[Sequence, int]] = []
    for seq in seqs:
        spec = seq.spec
        if spec is None:
            continue
        spec.tokens, spec.q = [], []
        if seq.done or len(seq.pending) != 1 or not seq.generated or spec.sits_out():
            continue
        room = min(runner.num_ctx - len(seq.slot.cached) - 1, runner.num_batch - 1)
        k = min(spec.k, room)
        if k <= 0:
            continue
        if spec.lookup:
            spec.tokens = lookup(seq.history, spec.lookup, k)
            spec.q = [None] * len(spec.tokens)
        else:
            wanted.append((seq, k))
    if wanted and runner.draft is not None:
        runner.draft.propose(wanted)


def verify(runner: Runner, seq: Sequence, rows: np.ndarray) -> None:
    """Accept or replace the sequence's proposals given the target's rows (one per fed
    position: its last token, then each proposal), emitting each kept token; then drop the
    cells of the proposals that were not kept."""
    spec = seq.spec
    assert spec is not None
    proposals, qs = spec.tokens, spec.q
    rng = seq.sampler.rng
    sampled, accepted = 0, 0
    for i, row in enumerate(rows):
        finite(row)
        p = seq.sampler.distribution(row, seq.history)
        if i < len(proposals):
            ok, token = accept(p, proposals[i], qs[i], rng)
        else:
            ok, token = False, draw(p, rng)
        sampled = i + 1
        accepted += ok and i < len(proposals)
        if not emit(runner.tokenizer, seq, token, row) or not ok:
            break
    spec.update(len(proposals), accepted)
    spec.tokens, spec.q = [], []
    # the cells kept: up to the input of the last token sampled (as without speculation)
    slot = seq.slot
    keep = len(slot.cached) - len(rows) + sampled
    if keep < len(slot.cached):
        runner.cache.remove(slot.id, keep, None)
        del slot.cached[keep:]
