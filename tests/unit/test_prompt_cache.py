"""The prompt cache: prompts that leave the slots are kept in host memory and written back
into a slot for a later prompt that starts with them, giving the tokens computing them
gives."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_runner import LetterTokenizer

from herd.gguf import open_gguf
from herd.ml import available_backends, open_backend
from herd.models import load_model
from herd.options import Options
from herd.runner import Runner
from herd.runner.prompt_cache import MIN_TOKENS, PromptCache

GREEDY = Options(temperature=0, num_predict=8)
rng = np.random.default_rng(7)
SYSTEM = rng.integers(3, 60, 48).tolist()  # a "system prompt" longer than MIN_TOKENS
CHAT_A = SYSTEM + rng.integers(3, 60, 12).tolist()
CHAT_B = SYSTEM + rng.integers(3, 60, 9).tolist()
OTHER = rng.integers(3, 60, 40).tolist()  # shares nothing with the chats


def make(path, backend="numpy", parallel=1, prompt_cache=2**26, cache_type="f16", shared=False):
    g = open_gguf(path)
    be = open_backend(backend, g)
    model = load_model(g.config(), be)
    return Runner(model, be, LetterTokenizer(), Options(num_ctx=256), model.context_length,
                  parallel=parallel, cache_type=cache_type, prompt_cache=prompt_cache,
                  shared_prefix=shared)  # fmt: skip


def run(runner, tokens):
    return list(runner.generate(tokens, GREEDY))[-1]


def logprobs(runner, tokens) -> np.ndarray:
    """The log-probability of each greedy token (where random tiny models give the same
    tokens from rows that differ a little, these differ)."""
    events = list(runner.generate(tokens, GREEDY, logprobs=0))
    return np.array([lp["logprob"] for e in events for lp in e.logprobs])


def _backend(name: str) -> None:
    if name not in available_backends():
        pytest.skip(f"{name} not installed (pip install -e '.[{name}]')")


@pytest.mark.parametrize("backend", ["numpy", "ggml", "mlx", "onnx"])
def test_a_prompt_pushed_out_of_its_slot_comes_back_from_host_memory(tiny_llama_path, backend):
    """One slot: chat A, then an unrelated prompt takes the slot (A's rows go to host
    memory), then chat B under A's system prompt gets those rows back instead of computing
    them, and answers as a server that never had A does."""
    _backend(backend)
    computed = make(tiny_llama_path, backend, prompt_cache=0)
    fresh = run(computed, CHAT_B)
    expected = logprobs(computed, CHAT_B)  # the same prefix, kept in the slot this time
    runner = make(tiny_llama_path, backend)
    run(runner, CHAT_A)
    run(runner, OTHER)
    assert len(runner.prompts) == 1 and runner.prompts.stored > 0
    got = run(runner, CHAT_B)
    assert got.prompt_cached_count == len(SYSTEM)  # restored, not computed
    assert got.prompt_eval_count == len(CHAT_B) - len(SYSTEM)
    assert got.tokens == fresh.tokens
    assert runner.kv_stats()["prompt_cache_restored"] == len(SYSTEM)
    run(runner, OTHER)  # CHAT_B's rows out, and back in for the same prompt
    np.testing.assert_allclose(logprobs(runner, CHAT_B), expected, rtol=1e-4, atol=1e-5)


def test_without_a_prompt_cache_the_prefix_is_computed_again(tiny_llama_path):
    runner = make(tiny_llama_path, prompt_cache=0)
    run(runner, CHAT_A)
    run(runner, OTHER)
    assert runner.prompts is None
    assert run(runner, CHAT_B).prompt_eval_count == len(CHAT_B)


def test_a_conversation_resumes_from_host_memory(tiny_llama_path):
    """The next turn of a conversation whose slot was taken: everything it had, generated
    tokens included, comes back; the answer is the one of a slot that kept it."""
    kept = make(tiny_llama_path, prompt_cache=0)
    first = run(kept, CHAT_A)
    turn = CHAT_A + list(first.tokens) + [40, 41]
    expected = run(kept, turn)
    runner = make(tiny_llama_path)
    run(runner, CHAT_A)
    run(runner, OTHER)
    got = run(runner, turn)
    assert got.prompt_cached_count == len(CHAT_A) + len(first.tokens) - 1
    assert got.tokens == expected.tokens


def test_an_idle_runner_keeps_its_slots_conversations_before_a_new_chat_needs_the_slot(
    tiny_llama_path, monkeypatch
):
    """A slot idle for PARK_IDLE is copied to the prompt cache while the runner has
    nothing to compute, so a new prompt that takes the slot copies nothing under the lock
    (8 such claims in a burst spent ~20 ms there); the copy then serves a later chat
    under the same system prompt, whose answer is a fresh server's. A chat's next turn,
    sooner than that, is not copied."""
    from herd.runner import engine

    monkeypatch.setattr(engine, "PARK_IDLE", 0.05)
    fresh = run(make(tiny_llama_path, prompt_cache=0), CHAT_B)
    runner = make(tiny_llama_path)
    copies = []
    snapshot = runner.cache.snapshot
    monkeypatch.setattr(
        runner.cache, "snapshot", lambda *a, **k: copies.append(a) or snapshot(*a, **k)
    )
    runner.start()
    try:
        run(runner, CHAT_A)
        deadline = time.monotonic() + 10
        while not len(runner.prompts) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(runner.prompts) == 1 and len(copies) == 1  # kept while idle
        time.sleep(0.2)
        assert len(copies) == 1  # once, not at every idle turn of the loop
        run(runner, OTHER)  # takes the slot: nothing left to copy
        assert len(copies) == 1
        got = run(runner, CHAT_B)
        assert got.prompt_cached_count == len(SYSTEM)  # restored from the idle copy
        assert got.tokens == fresh.tokens
    finally:
        runner.stop()
    monkeypatch.setattr(engine, "PARK_IDLE", 60.0)
    runner = make(tiny_llama_path)
    runner.start()
    try:
        first = run(runner, CHAT_A)
        time.sleep(0.2)
        run(runner, CHAT_A + list(first.tokens) + [40, 41])  # the next turn, in its slot
        assert len(runner.prompts) == 0
    finally:
        runner.stop()


def test_a_spare_copy_goes_first_until_its_slot_is_taken():
    """A copy kept while its slot still holds the prompt is the first to go under
    pressure; once the slot is taken it is the only copy, and counts as just used."""
    a, b, c, d = ([i] * 40 for i in (1, 2, 3, 4))
    cache = PromptCache(limit=300)
    cache.put(a, Rows(100))
    cache.put(b, Rows(100), spare=True)
    cache.put(c, Rows(100))
    cache.put(d, Rows(100))  # over the budget: the spare goes, not a (the oldest)
    assert cache.longest(b, 40) == (0, None) and cache.longest(a, 40)[0] == 40
    cache = PromptCache(limit=300)
    cache.put(a, Rows(100))
    cache.put(b, Rows(100), spare=True)
    cache.refresh(b)  # b's slot was taken: b is the most recently used
    cache.put(c, Rows(100))
    cache.put(d, Rows(100))
    assert cache.longest(a, 40) == (0, None) and cache.longest(b, 40)[0] == 40


@pytest.mark.parametrize("path", ["host memory", "graph"])
def test_restored_rows_are_the_rows_that_left(smollm2_path, monkeypatch, path):
    """The snapshot of a restored slot equals the one taken before it left, on every
    cache type herd offers: copied as bytes where the cache is in host memory, and through
    a pass of row gathers where it is not (a GPU's: F16 rows kept as F16, quantized ones
    through their dequantized values, which quantize to the same blocks)."""
    _backend("ggml")
    from herd.ml.backends.ggml.backend import GGMLBackend

    if path == "graph":
        monkeypatch.setattr(GGMLBackend, "host_view", lambda self, t: None)
    for cache_type in ("f16", "q8_0", "q4_0"):
        runner = make(smollm2_path, "ggml", parallel=2, cache_type=cache_type)
        run(runner, CHAT_A)
        slot = runner.slots[0]
        n = len(slot.cached)
        before = runner.cache.snapshot(slot.id, n)
        assert before is not None and before.raw == (path == "host memory")
        kept = copy.deepcopy(before)
        runner.reset()
        run(runner, OTHER)  # written over the cells the snapshot was taken from
        assert runner.slots[0].cached[: len(OTHER)] == OTHER
        for layer in before.keys:  # a copy, not a view of the cache
            np.testing.assert_array_equal(before.keys[layer], kept.keys[layer])
            np.testing.assert_array_equal(before.values[layer], kept.values[layer])
        assert runner.cache.restore(1, before, n)
        after = runner.cache.snapshot(1, n)
        for layer in before.keys:
            np.testing.assert_array_equal(after.keys[layer], before.keys[layer], cache_type)
            np.testing.assert_array_equal(after.values[layer], before.values[layer], cache_type)


@pytest.mark.parametrize("path", ["host memory", "graph"])
def test_a_chat_under_a_kept_system_prompt_keeps_only_what_follows_it(
    smollm2_path, monkeypatch, path
):
    """Chat B, under chat A's system prompt, leaves its slot after A did: only B's rows
    past the system prompt are copied, the rest are A's kept rows, and restored B is the
    B that left, byte for byte, on every cache type."""
    _backend("ggml")
    from herd.ml.backends.ggml.backend import GGMLBackend

    if path == "graph":
        monkeypatch.setattr(GGMLBackend, "host_view", lambda self, t: None)
    for cache_type in ("f16", "q8_0", "q4_0"):
        runner = make(smollm2_path, "ggml", cache_type=cache_type)
        run(runner, CHAT_A)
        run(runner, OTHER)  # A's rows to host memory, whole
        (a,) = [e.snap for e in runner.prompts.entries.values()]
        assert a.start == 0 and a.base is None
        assert run(runner, CHAT_B).prompt_cached_count == len(SYSTEM)
        held = list(runner.slots[0].cached)
        whole = runner.cache.snapshot(runner.slots[0].id, len(held))
        run(runner, OTHER)  # B's rows out: built on A's
        kept = {tuple(e.tokens): e.snap for e in runner.prompts.entries.values()}
        b = kept[tuple(held)]
        assert b.start == len(SYSTEM) and b.base is a and b.length == len(held)
        per_row = whole.nbytes // len(held)
        assert b.nbytes == per_row * (len(held) - len(SYSTEM)) < whole.nbytes
        assert len(kept) == 3  # A, OTHER (out as B came) and B: each one's rows once
        assert runner.prompts.stored == sum(snap.nbytes for snap in kept.values())
        runner.reset()  # forgets the kept prompts, not the snapshots held here
        assert runner.cache.restore(0, b, len(held))
        after = runner.cache.snapshot(0, len(held))
        for layer in whole.keys:
            np.testing.assert_array_equal(after.keys[layer], whole.keys[layer], cache_type)
            np.testing.assert_array_equal(after.values[layer], whole.values[layer], cache_type)


def test_a_conversation_built_on_a_kept_prompt_resumes_with_its_answer(gemma3_path):
    """Gemma 3's two caches keep and restore a conversation built on a kept system prompt
    together: its next turn answers as in a slot that never lost it."""
    _backend("ggml")
    kept = make(gemma3_path, "ggml", prompt_cache=0)
    first = run(kept, CHAT_B)
    turn = CHAT_B + list(first.tokens) + [40, 41]
    expected = run(kept, turn)
    runner = make(gemma3_path, "ggml")
    for prompt in (CHAT_A, OTHER, CHAT_B):
        run(runner, prompt)
    held = tuple(runner.slots[0].cached)
    run(runner, OTHER)  # B leaves, built on A's rows in both caches
    (b,) = [e.snap for e in runner.prompts.entries.values() if tuple(e.tokens) == held]
    assert [part.start for part in b.parts] == [len(SYSTEM)] * 2
    got = run(runner, turn)
    assert got.prompt_cached_count == len(CHAT_B) + len(first.tokens) - 1
    assert got.tokens == expected.tokens


def test_gemma3_sliding_and_global_caches_restore_together(gemma3_path):
    """Gemma 3's two caches (sliding-window and global layers) are kept and restored as
    one: a restored prefix answers as a computed one."""
    _backend("ggml")
    fresh = run(make(gemma3_path, "ggml", prompt_cache=0), CHAT_B)
    runner = make(gemma3_path, "ggml")
    run(runner, CHAT_A)
    run(runner, OTHER)
    got = run(runner, CHAT_B)
    assert got.prompt_cached_count == len(SYSTEM)
    assert got.tokens == fresh.tokens


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "copied"])
def test_a_prefix_held_by_a_busy_slot_is_shared_not_computed(tiny_llama_path, smollm2_path, shared):
    """Chat B arrives while chat A, under the same system prompt, is still answering in
    the other slot: B takes the system prompt as A's cells, one copy for both (or, where
    the cache cannot share them, as a copy of A's rows), and answers as if it had
    computed them. Shared, on a model of float weights: SmolLM2's Q8_0 products quantize
    their inputs, and a prefix attended apart sums its softmax in another order, a
    rounding those quantizations carry to ~0.1 in a log-probability after 30 layers (as
    its float products on NumPy differ from ggml's by 0.18); float weights show what the
    attention gives, 3e-8 from computing the prefix. A copy's rows sit as computed ones
    would: SmolLM2's logits are then the same to the bit."""
    _backend("ggml")
    path = tiny_llama_path if shared else smollm2_path
    fresh = logprobs(make(path, "ggml", prompt_cache=0), CHAT_B)
    runner = make(path, "ggml", parallel=2, shared=shared)
    # no batch thread: the steps run inline, so A is still answering when B arrives (a
    # thread may decode A to its end before B's request gets the runner's lock)
    answering = runner.generate(CHAT_A, Options(temperature=0, num_predict=150))
    next(answering)  # A's prompt is in its slot's cells, and A is still decoding
    assert runner.slots[0].busy and len(runner.slots[0].cached) >= len(CHAT_A)
    events = list(runner.generate(CHAT_B, GREEDY, logprobs=0))
    assert events[-1].prompt_cached_count == len(SYSTEM)
    got = np.array([lp["logprob"] for e in events for lp in e.logprobs])
    stats = runner.kv_stats()
    answering.close()
    assert len(runner.prompts) == 0
    if shared:
        assert runner.prompts_shared == len(SYSTEM) and runner.prompts.restored == 0
        assert stats["cells_shared"] == len(SYSTEM) and stats["shared_tokens"] == len(SYSTEM)
    else:
        assert runner.prompts.restored == len(SYSTEM) and stats["cells_shared"] == 0
    np.testing.assert_allclose(got, fresh, rtol=1e-5, atol=1e-5)


def test_a_prompt_without_memory_to_keep_it_is_dropped_and_the_request_goes_on(
    smollm2_path, monkeypatch
):
    """Keeping a prompt is a saving: a refused map falls back to NumPy's memory, and with
    no memory at all the new request is answered as without a prompt cache and nothing
    is kept."""
    _backend("ggml")
    import mmap

    import herd.kvcache.rows as rows

    expected = run(make(smollm2_path, "ggml", prompt_cache=0), OTHER).tokens
    runner = make(smollm2_path, "ggml")
    run(runner, CHAT_A)

    def refused(*a, **k):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", refused)
    before = runner.cache.snapshot(runner.slots[0].id, len(runner.slots[0].cached))
    assert before is not None and before.raw  # the map refused: NumPy's memory instead

    def no_memory(arrays):
        raise MemoryError

    monkeypatch.setattr(rows, "_copies", no_memory)
    assert run(runner, OTHER).tokens == expected
    assert len(runner.prompts) == 0


def test_a_prefix_without_memory_to_copy_it_is_computed(smollm2_path, monkeypatch):
    """Copying a busy slot's prefix (where it cannot be shared) is a saving too: with no
    host memory for the copy, the prefix is computed and the answer is the same."""
    _backend("ggml")
    import herd.kvcache.rows as rows

    fresh = run(make(smollm2_path, "ggml", prompt_cache=0), CHAT_B).tokens
    runner = make(smollm2_path, "ggml", parallel=2)
    answering = runner.generate(CHAT_A, Options(temperature=0, num_predict=150))
    next(answering)  # A holds the system prompt in its slot, and is still decoding

    def no_memory(arrays):
        raise MemoryError

    monkeypatch.setattr(rows, "_copies", no_memory)
    got = run(runner, CHAT_B)
    answering.close()
    assert got.prompt_cached_count == 0 and got.tokens == fresh


def test_short_prompts_are_not_kept(tiny_llama_path):
    runner = make(tiny_llama_path)
    run(runner, SYSTEM[: MIN_TOKENS // 2])
    run(runner, OTHER)
    assert len(runner.prompts) == 0


def test_reset_forgets_kept_prompts(tiny_llama_path):
    runner = make(tiny_llama_path)
    run(runner, CHAT_A)
    run(runner, OTHER)
    runner.reset()
    assert len(runner.prompts) == 0 and runner.prompts.stored == 0


class Rows:
    def __init__(self, nbytes: int, base: Rows | None = None) -> None:
        self.nbytes, self.base = nbytes, base

    def pieces(self) -> list[Rows]:
        return [self] + (self.base.pieces() if self.base else [])


def test_the_cache_keeps_the_longest_prompts_within_its_budget():
    cache = PromptCache(limit=300)
    a = list(range(40))
    cache.put(a, Rows(100))
    cache.put(a + [7] * 10, Rows(120))  # covers a: a goes
    assert len(cache) == 1 and cache.stored == 120
    assert not cache.wants(a)  # a prefix of a kept prompt
    assert cache.longest(a + [9], 100) == (40, 1)
    b, c = [5] * 40, [6] * 40
    cache.put(b, Rows(100))
    cache.get(1)  # a's extension used: b is now the least recently used
    cache.put(c, Rows(100))  # 320 > 300: b leaves
    assert cache.longest(b, 40) == (0, None)
    assert cache.longest(c, 10) == (10, 3)
    assert cache.stored == 220
    cache.put(list(range(100, 200)), Rows(301))  # larger than the whole budget: not kept
    assert len(cache) == 2
    assert not PromptCache(0).wants(a)  # a budget of 0 keeps nothing


def test_rows_another_kept_prompt_builds_on_stay_until_it_goes():
    """A kept prompt's rows count against the budget once, and stay while a kept prompt
    built on them does: the least recently used prompt that others build on goes after
    them, since its going would free nothing."""
    cache = PromptCache(limit=300)
    system, a, b = list(range(40)), list(range(50)), list(range(40)) + [9] * 10
    cache.put(a, Rows(100))
    on_a = Rows(30, base=cache.entries[0].snap)
    cache.put(b, on_a)  # b shares a's first 40: its rows past them only
    assert cache.stored == 130
    assert cache.base(b + [1]) == (on_a, 50)
    rows_a = cache.entries[0].snap
    assert cache.base(system + [7] * 10) in [(rows_a, 40), (on_a, 40)]  # both give 40
    assert cache.base([5] * 50) == (None, 0)  # shares nothing
    cache.put([6] * 40, Rows(150))  # 280 fits
    cache.get(1)  # b used: a, then [6] * 40 the least recently
    cache.put([7] * 40, Rows(60))  # 340: not a (b holds its rows), [6] * 40 goes
    assert cache.longest([6] * 40, 40) == (0, None)
    assert len(cache) == 3 and cache.stored == 100 + 30 + 60
    assert cache.longest(a, 50) == (50, 0)  # a's own prompt is still kept
    cache.put([8] * 40, Rows(150))  # 340: b goes (30 freed), then a (100)
    assert len(cache) == 2 and cache.stored == 60 + 150
    assert cache.longest(a, 50) == (0, None)


@settings(max_examples=200, deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 3), min_size=32, max_size=40), max_size=12),
    asks=st.lists(st.tuples(st.lists(st.integers(0, 3), max_size=44), st.integers(0, 50))),
)
def test_the_longest_kept_prefix_is_the_one_a_scan_of_every_prompt_finds(prompts, asks):
    """The kept prompts in the tokens' order: the longest shared prefix found next to a
    prompt's place is the longest of all; no kept prompt is a prefix of another."""
    cache = PromptCache(limit=10**9)
    for prompt in prompts:
        cache.put(prompt, Rows(1))
    kept = [e.tokens for e in cache.entries.values()]
    for a in kept:
        assert not any(b != a and b[: len(a)] == a for b in kept)

    def common(a, b):
        m = min(len(a), len(b))
        return next((i for i in range(m) if a[i] != b[i]), m)

    for ask, limit in asks:
        n, key = cache.longest(ask, limit)
        want = max((common(e, ask[:limit]) for e in kept), default=0)
        assert n == want
        assert key is None if n == 0 else common(cache.entries[key].tokens, ask[:limit]) == n
    assert cache.stored == len(kept)


@settings(max_examples=200, deadline=None)
@given(
    puts=st.lists(
        st.tuples(st.lists(st.integers(0, 2), min_size=32, max_size=38), st.integers(1, 5)),
        max_size=20,
    )
)
def test_what_is_held_is_counted_once_and_stays_within_the_budget(puts):
    """Prompts kept on the rows of others, under a small budget: the bytes counted are
    those of every row held by a kept prompt or one it builds on, each once, and never
    more than the budget."""
    cache = PromptCache(limit=12)
    for prompt, nbytes in puts:
        base, _ = cache.base(prompt)
        cache.put(prompt, Rows(nbytes, base))
        held = {id(p): p.nbytes for e in cache.entries.values() for p in e.snap.pieces()}
        assert cache.stored == sum(held.values()) <= cache.limit


@pytest.mark.parametrize(
    ("value", "want"),
    [(None, 2**30), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("0", 0), ("lots", 2**30)],
)
def test_the_budget_is_herd_prompt_cache(monkeypatch, value, want):
    """HERD_PROMPT_CACHE: a size with an optional unit, 0 for none; unset or unreadable,
    1 GiB."""
    from herd import envconfig

    monkeypatch.delenv("HERD_PROMPT_CACHE", raising=False)
    if value is not None:
        monkeypatch.setenv("HERD_PROMPT_CACHE", value)
    assert envconfig.prompt_cache() == want
