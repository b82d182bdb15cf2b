"""Speculative decoding on tiny random models: the acceptance rule keeps the target's
distribution, prompt lookup's proposals, greedy output unchanged by speculation (prompt
lookup, a draft model, several sequences in one batch), the sampled output's distribution
against the target's exact one, and a draft with another vocabulary refused."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from test_runner import LetterTokenizer, make_runner

from herd.errors import DraftError
from herd.options import Options
from herd.runner.draft import Drafter, check_draft
from herd.runner.speculate import K_MAX, K_MIN, PAUSE_MAX, Speculation, accept, lookup
from herd.sample import Sampler

BACKENDS = ["numpy", "ggml"]


def _backend(name: str) -> str:
    from herd.ml import available_backends

    if name not in available_backends():
        pytest.skip(f"{name} not installed (pip install -e '.[{name}]')")
    return name


# ---- the acceptance rule ------------------------------------------------------------------
def _empirical(draws: list[int], n: int) -> np.ndarray:
    return np.bincount(draws, minlength=n)[:n] / len(draws)


P_IDS = np.array([3, 0, 5, 1, 4], np.intp)  # a target over 6 ids (2 impossible), any order
P = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
DENSE_P = np.zeros(6)
DENSE_P[P_IDS] = P


@pytest.mark.parametrize(
    "q",
    [
        (np.array([0, 1, 2, 3, 4, 5]), np.array([0.05, 0.05, 0.3, 0.1, 0.3, 0.2])),  # wide
        (np.array([2, 5]), np.array([0.5, 0.5])),  # mostly where p is not
        (P_IDS, P),  # the target itself: everything accepted
    ],
)
def test_rule_turns_draws_from_q_into_draws_from_p(q):
    """x ~ q, then the rule: the kept token is distributed as p (Leviathan et al.'s
    theorem), within a total-variation distance of 0.015 over 40000 draws (the sampling
    error is ~0.004); the acceptance rate is sum(min(p, q))."""
    rng = np.random.default_rng(0)
    n = 40000
    xs = rng.choice(q[0], size=n, p=q[1])
    out, kept = [], 0
    for x in xs:
        ok, token = accept((P_IDS, P), int(x), q, rng)
        out.append(token)
        kept += ok
    tv = 0.5 * np.abs(_empirical(out, 6) - DENSE_P).sum()
    assert tv < 0.015, tv
    dense_q = np.zeros(6)
    dense_q[q[0]] = q[1]
    assert abs(kept / n - np.minimum(DENSE_P, dense_q).sum()) < 0.015


@pytest.mark.parametrize("x", [3, 1, 2])  # likely, unlikely, impossible under p
def test_point_mass_proposal_keeps_p(x):
    """A proposal without a distribution (prompt lookup): accepted with probability p(x),
    else a draw from p without x; the kept token is distributed as p."""
    rng = np.random.default_rng(1)
    out = [accept((P_IDS, P), x, None, rng) for _ in range(40000)]
    tv = 0.5 * np.abs(_empirical([t for _, t in out], 6) - DENSE_P).sum()
    assert tv < 0.015, tv
    assert abs(np.mean([ok for ok, _ in out]) - DENSE_P[x]) < 0.015


def test_greedy_target_accepts_only_its_argmax():
    rng = np.random.default_rng(2)
    p = (np.array([7]), np.ones(1))
    assert accept(p, 7, None, rng) == (True, 7)
    assert accept(p, 3, None, rng) == (False, 7)
    assert accept(p, 3, (np.array([3, 7]), np.array([0.9, 0.1])), rng) == (False, 7)


def test_sampler_distribution_is_what_sample_draws():
    """`Sampler.distribution` (the rule's p) against `sample`'s draws, with every
    transform on: penalties, top_k, temperature, top_p, min_p."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal(50).astype(np.float32) * 2
    history = [1, 2, 2, 7]
    kw = dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repeat_penalty=1.3)
    ids, probs = Sampler(**kw, seed=0).distribution(logits, history)
    assert abs(probs.sum() - 1) < 1e-12 and len(set(ids.tolist())) == len(ids)
    sampler = Sampler(**kw, seed=5)
    draws = [sampler.sample(logits, history) for _ in range(20000)]
    dense = np.zeros(50)
    dense[ids] = probs
    assert 0.5 * np.abs(_empirical(draws, 50) - dense).sum() < 0.02
    greedy = Sampler(temperature=0).distribution(logits, history)
    assert greedy[0].tolist() == [int(np.argmax(logits))] and greedy[1].tolist() == [1.0]


def test_k_adapts_within_bounds():
    spec = Speculation(k=4, lookup=2)
    spec.update(4, 4)
    assert spec.k == 6
    for _ in range(10):
        spec.update(spec.k, spec.k)
    assert spec.k == K_MAX
    for _ in range(30):
        spec.update(spec.k, 0)
    assert spec.k == K_MIN
    full = 4 + 6 + 8 + 10 + 12 + 14 + 16 * 5
    assert (spec.proposed, spec.accepted) == (full + sum(range(1, 17)) + 14, full)


def test_fully_rejected_steps_back_off_and_an_acceptance_resets():
    spec = Speculation(k=4, lookup=2)
    sat_out = []
    for _ in range(5):  # five fully rejected steps: pauses of 1, 2, 4, 8, 16 steps
        spec.update(spec.k, 0)
        n = 0
        while spec.sits_out():
            n += 1
        sat_out.append(n)
    assert sat_out == [1, 2, 4, 8, 16]
    for _ in range(3):
        spec.update(spec.k, 0)
        while spec.sits_out():
            pass
    assert spec.pause == PAUSE_MAX
    spec.update(1, 1)  # one accepted proposal: no pause, and the next rejection starts at 1
    assert not spec.sits_out()
    spec.update(spec.k, 0)
    assert spec.sits_out() and not spec.sits_out()


# ---- prompt lookup ------------------------------------------------------------------------
def test_lookup_takes_what_followed_the_latest_longest_match():
    # the bigram (3, 4) occurred twice: the later occurrence is followed by 9, 9, 1
    tokens = [3, 4, 5, 6, 3, 4, 9, 9, 1, 2, 3, 4]
    assert lookup(tokens, 2, 3) == [9, 9, 1]
    assert lookup(tokens, 2, 10) == [9, 9, 1, 2, 3, 4]  # up to the end
    # no earlier (2, 7): the unigram 7 matches; nothing matches at all: no proposals
    assert lookup([7, 8, 2, 7], 2, 2) == [8, 2]
    assert lookup([1, 2, 3], 3, 4) == []
    assert lookup([5], 2, 4) == []
    # a longer match wins over a more recent shorter one
    assert lookup([1, 2, 3, 8, 0, 2, 3, 5, 1, 2, 3], 3, 1) == [8]


# ---- greedy: the same tokens with and without speculation ---------------------------------
GREEDY = Options(temperature=0, num_predict=24)
PROMPTS = [
    [1, 5, 9, 13, 1, 5, 9, 13, 1, 5, 9],
    [2, 4, 8, 16, 32, 2, 4, 8],
    [3, 7, 11, 3, 7],
]


def _run(runner, prompt, options):
    events = list(runner.generate(prompt, options))
    return events[-1]


def _batched(runner, prompts, options):
    """Each prompt by its own client, all at once: decoded in shared batches."""
    runner.start()
    try:
        finals = {}

        def client(i):
            finals[i] = _run(runner, prompts[i], options)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [finals[i] for i in range(len(prompts))]
    finally:
        runner.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_lookup_keeps_greedy_output(tiny_llama_path, backend):
    backend = _backend(backend)
    plain = [_run(make_runner(tiny_llama_path, backend=backend), p, GREEDY) for p in PROMPTS]
    options = Options(temperature=0, num_predict=24, lookup_ngram=3)
    spec = _batched(make_runner(tiny_llama_path, 3, backend=backend), PROMPTS, options)
    assert [f.tokens for f in spec] == [f.tokens for f in plain]
    assert sum(f.draft_proposed for f in spec) > 0  # it did speculate
    assert all(f.draft_accepted <= f.draft_proposed for f in spec)
    assert all(f.eval_count == len(f.tokens) for f in spec)


def _with_draft(target: Path, draft: Path, parallel=1, backend="numpy", num_ctx=256):
    runner = make_runner(target, parallel, num_ctx=num_ctx, backend=backend)
    runner.draft = Drafter(make_runner(draft, parallel, num_ctx=num_ctx, backend=backend))
    return runner


@pytest.fixture(scope="module")
def other_tiny_llama(tmp_path_factory) -> Path:
    """Another tiny random Llama with the same 64-token vocabulary: a draft that is
    mostly wrong."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from parity.harness import hf_to_gguf

    torch.manual_seed(7)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    return hf_to_gguf(model, "llama", tmp_path_factory.mktemp("draft") / "draft.gguf")


@pytest.mark.parametrize("backend", BACKENDS)
def test_draft_keeps_greedy_output(tiny_llama_path, other_tiny_llama, backend):
    """The model as its own draft (nearly all accepted) and another tiny model (mostly
    rejected), three sequences in one batch: the tokens of plain greedy decoding."""
    backend = _backend(backend)
    plain = [_run(make_runner(tiny_llama_path, backend=backend), p, GREEDY) for p in PROMPTS]
    for draft, least in ((tiny_llama_path, 0.9), (other_tiny_llama, 0.0)):
        runner = _with_draft(tiny_llama_path, draft, 3, backend)
        spec = _batched(runner, PROMPTS, GREEDY)
        assert [f.tokens for f in spec] == [f.tokens for f in plain], draft
        proposed = sum(f.draft_proposed for f in spec)
        accepted = sum(f.draft_accepted for f in spec)
        assert proposed > 0 and accepted >= least * proposed, (draft, accepted, proposed)
        # a second request in the same slots reuses the prefixes (target's and draft's)
        again = _run(runner, PROMPTS[0], GREEDY)
        assert again.tokens == plain[0].tokens and again.prompt_cached_count > 0


def test_draft_with_a_short_context_still_matches(tiny_llama_path, other_tiny_llama):
    """Proposals never run past the context: with a small one and shifting, the output
    is plain greedy decoding's."""
    options = Options(temperature=0, num_predict=60, num_keep=2)
    plain = _run(make_runner(tiny_llama_path, num_ctx=32), PROMPTS[0], options)
    for draft in (tiny_llama_path, other_tiny_llama):
        spec = _run(_with_draft(tiny_llama_path, draft, num_ctx=32), PROMPTS[0], options)
        assert spec.tokens == plain.tokens
    lookup_opts = Options(temperature=0, num_predict=60, num_keep=2, lookup_ngram=2)
    spec = _run(make_runner(tiny_llama_path, num_ctx=32), PROMPTS[0], lookup_opts)
    assert spec.tokens == plain.tokens


def test_stops_limits_and_eog_inside_accepted_proposals(tiny_llama_path):
    """num_predict and an end-of-generation token that fall among accepted proposals end
    the answer where plain decoding ends it, and the slot's cells mirror its tokens."""
    plain = _run(make_runner(tiny_llama_path), PROMPTS[0], Options(temperature=0, num_predict=40))
    eog = plain.tokens[17]
    tok = LetterTokenizer(eog=eog)
    for n in (5, 13, 40):
        options = Options(temperature=0, num_predict=n)
        want = _run(make_runner(tiny_llama_path, tokenizer=tok), PROMPTS[0], options)
        runner = make_runner(tiny_llama_path, tokenizer=tok)
        runner.draft = Drafter(make_runner(tiny_llama_path))
        got = _run(runner, PROMPTS[0], options)
        assert got.tokens == want.tokens and got.done_reason == want.done_reason
        slot = runner.slots[0]
        assert runner.cache.seq_length(slot.id) == len(slot.cached)
        assert slot.cached == (PROMPTS[0] + list(got.tokens))[: len(slot.cached)]


# ---- sampled: the target's distribution ---------------------------------------------------
@pytest.fixture(scope="module")
def peaked_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny random Llamas over 12 tokens with large weights (peaked, unlike each
    other's distributions): a target and a draft whose proposals are often wrong."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from parity.harness import hf_to_gguf

    out = []
    for seed in (11, 12):
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(
            vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
            initializer_range=0.6,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg).eval()
        path = tmp_path_factory.mktemp("peaked") / f"m{seed}.gguf"
        out.append(hf_to_gguf(model, "llama", path))
    return out[0], out[1]


@pytest.mark.parametrize("how", ["draft", "lookup"])
def test_sampled_tokens_follow_the_targets_distribution(peaked_pair, how):
    """Sampling (temperature 1, no truncation) over many seeds: the second answer token,
    the first that speculation decides, is distributed as the target's exact marginal
    sum_t1 p(t1) p(t2 | t1) (teacher-forced logits), within a total-variation distance of
    0.05 over 2500 runs (the sampling error is ~0.02), while the draft's own marginal is
    far from it (so a rule that kept the draft's tokens would fail)."""
    target, draft = peaked_pair
    prompt = [*range(12), 1, 2, 3, 1, 2]  # every token occurs: lookup always proposes
    runner = make_runner(target, num_ctx=64)
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, num_predict=3, draft_num_predict=3)

    def marginal(path) -> np.ndarray:
        r = make_runner(path, num_ctx=64)
        first = Sampler(temperature=1.0, top_k=0, top_p=1.0).distribution(r.logits(prompt)[-1])
        p1 = np.zeros(12)
        p1[first[0]] = first[1]
        out = np.zeros(12)
        for t1 in range(12):
            ids, probs = Sampler(temperature=1.0, top_k=0, top_p=1.0).distribution(
                r.logits(prompt + [t1])[-1]
            )
            out[ids] += p1[t1] * probs
        return out

    exact = marginal(target)
    if how == "draft":
        runner.draft = Drafter(make_runner(draft, num_ctx=64))
        assert 0.5 * np.abs(marginal(draft) - exact).sum() > 0.2
    else:
        kw["lookup_ngram"] = 2
    seconds, proposed = [], 0
    for seed in range(2500):
        final = _run(runner, prompt, Options(**kw, seed=seed))
        seconds.append(final.tokens[1])
        proposed += final.draft_proposed
    assert proposed > 2500
    tv = 0.5 * np.abs(_empirical(seconds, 12) - exact).sum()
    assert tv < 0.05, tv


# ---- a draft that cannot draft ------------------------------------------------------------
class _Fake:
    def __init__(self, name, tokens, embedding=False):
        self.name, self.n_vocab, self.is_embedding = name, len(tokens), embedding
        self.gguf = type("G", (), {"kv": {"tokenizer.ggml.tokens": tokens}})()


def test_check_draft_refuses_another_vocabulary():
    target = _Fake("target", ["a", "b", "c"])
    check_draft(target, _Fake("draft", ["a", "b", "c"]))
    with pytest.raises(DraftError, match="2 tokens, target 3"):
        check_draft(target, _Fake("draft", ["a", "b"]))
    with pytest.raises(DraftError, match="token 1 is 'x', target's is 'b'"):
        check_draft(target, _Fake("draft", ["a", "x", "c"]))
    with pytest.raises(DraftError, match="embedding model"):
        check_draft(target, _Fake("draft", ["a", "b", "c"], embedding=True))
