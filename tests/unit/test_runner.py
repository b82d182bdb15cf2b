"""The runner on a tiny random model: batching, prefix reuse, context limits, cancel, stops;
and the request pipeline in front of it (prompt, tokens, the context-length check)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_grammar import JsonTokenizer

from herd.errors import CapabilityError, ContextLengthError, HerdError
from herd.gguf import open_gguf
from herd.ml import open_backend
from herd.models import load_model
from herd.options import Options
from herd.runner import Request, Runner, Source, prepare, prepare_embed
from herd.template import go_builtin


class LetterTokenizer:
    """Token i is one letter; no token ends generation unless told to."""

    def __init__(self, eog: int = -1) -> None:
        self.eog = eog

    def piece(self, id: int, special: bool = False) -> bytes:
        return bytes([97 + id % 26])

    def is_eog(self, id: int) -> bool:
        return id == self.eog


def make_runner(path, parallel=1, num_ctx=256, tokenizer=None, backend="numpy") -> Runner:
    g = open_gguf(path)
    backend = open_backend(backend, g)
    model = load_model(g.config(), backend)
    return Runner(
        model,
        backend,
        tokenizer or LetterTokenizer(),
        Options(num_ctx=num_ctx),
        model.context_length,
        parallel=parallel,
    )


GREEDY = Options(temperature=0, num_predict=12)
PROMPTS = [[1, 5, 9, 13, 17, 21], [2, 4, 8, 16, 32], [3, 7, 11]]


def run(runner, tokens, options=GREEDY, **kw):
    events = list(runner.generate(tokens, options, **kw))
    return events[-1], "".join(e.text for e in events)


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_concurrent_sequences_match_running_alone(tiny_llama_path, backend):
    """Three clients at once, decoded in one batch: each gets the tokens it gets alone
    (on MLX too: its batches go through the same runner)."""
    from herd.ml import available_backends

    if backend not in available_backends():
        pytest.skip(f"{backend} not installed (pip install -e '.[{backend}]')")
    alone = [run(make_runner(tiny_llama_path, backend=backend), p)[0].tokens for p in PROMPTS]
    runner = make_runner(tiny_llama_path, parallel=3, backend=backend)
    runner.start()
    try:
        results: dict[int, tuple[int, ...]] = {}

        def client(i: int) -> None:
            results[i] = run(runner, PROMPTS[i])[0].tokens

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        runner.stop()
    assert [results[i] for i in range(3)] == alone


def test_prefix_is_reused_across_requests(tiny_llama_path):
    runner = make_runner(tiny_llama_path)
    first, _ = run(runner, PROMPTS[0])
    assert first.prompt_eval_count == len(PROMPTS[0])
    follow_up = PROMPTS[0] + list(first.tokens) + [40, 41]
    second, _ = run(runner, follow_up)
    # the last sampled token was never fed to the model, so it is computed now with the 2 new
    assert second.prompt_eval_count == 3
    fresh, _ = run(make_runner(tiny_llama_path), follow_up)
    assert second.tokens == fresh.tokens


def test_num_predict_and_stop_strings(tiny_llama_path):
    runner = make_runner(tiny_llama_path)
    final, text = run(runner, PROMPTS[1], Options(temperature=0, num_predict=5))
    assert final.done_reason == "length" and final.eval_count == 5 and len(text) == 5
    stop = text[2]
    final, cut = run(
        make_runner(tiny_llama_path),
        PROMPTS[1],
        Options(temperature=0, num_predict=5, stop=(stop,)),
    )
    assert final.done_reason == "stop" and cut == text[: text.index(stop)]


def test_end_of_generation_token_stops(tiny_llama_path):
    first = run(make_runner(tiny_llama_path), PROMPTS[2])[0].tokens
    final, _ = run(
        make_runner(tiny_llama_path, tokenizer=LetterTokenizer(eog=first[3])), PROMPTS[2]
    )
    assert final.done_reason == "stop" and final.tokens == first[:3]


class OneTextTokenizer(LetterTokenizer):
    """Every token reads as one letter, with a space on either side by turns."""

    def piece(self, id: int, special: bool = False) -> bytes:
        return b" z" if id % 2 else b"z "


def test_a_model_stuck_on_one_text_is_stopped(tiny_llama_path):
    """Ollama ends an answer at the 31st repeat of one token's text (spaces stripped),
    without that token: 31 tokens of "z" may come, the 32nd ends the answer."""
    runner = make_runner(tiny_llama_path, tokenizer=OneTextTokenizer())
    final, text = run(runner, PROMPTS[0], Options(temperature=0, num_predict=31))
    assert final.done_reason == "length" and final.eval_count == 31
    final, text = run(runner, PROMPTS[0], Options(temperature=0, num_predict=100))
    assert final.done_reason == "stop" and final.eval_count == 31
    assert text.replace(" ", "") == "z" * 31


def test_context_shift_keeps_generating(tiny_llama_path):
    runner = make_runner(tiny_llama_path, num_ctx=16)
    final, _ = run(runner, PROMPTS[0], Options(temperature=0, num_predict=40))
    assert final.done_reason == "length" and final.eval_count == 40
    final, _ = run(
        make_runner(tiny_llama_path, num_ctx=16),
        PROMPTS[0],
        Options(temperature=0, num_predict=40),
        shift=False,
    )
    assert final.done_reason == "length" and final.eval_count < 16


def test_long_prompt_is_truncated_or_rejected(tiny_llama_path):
    prompt = list(np.arange(40) % 60)
    final, _ = run(make_runner(tiny_llama_path, num_ctx=16), prompt, Options(num_predict=1))
    assert final.prompt_eval_count == 15
    # truncate: false is turned away by the request pipeline, before the runner
    loaded = FakeLoaded(defaults=Options(num_ctx=16))
    with pytest.raises(HerdError, match="exceeds the context length"):
        prepare(loaded, Request(prompt="x" * 40, raw=True, truncate=False))
    assert len(prepare(loaded, Request(prompt="x" * 14, raw=True, truncate=False)).tokens) == 15


def test_closing_the_stream_frees_the_slot(tiny_llama_path):
    runner = make_runner(tiny_llama_path)
    stream = runner.generate(PROMPTS[0], Options(temperature=0, num_predict=100))
    next(stream)
    stream.close()
    runner.step()
    assert not runner.slots[0].busy and not runner.active
    assert run(runner, PROMPTS[1])[0].done


def test_teacher_forced_logits_match_decode(tiny_llama_path):
    runner = make_runner(tiny_llama_path)
    final, _ = run(runner, PROMPTS[0])
    logits = runner.logits(PROMPTS[0] + list(final.tokens))
    greedy = logits[len(PROMPTS[0]) - 1 : -1].argmax(-1)
    assert tuple(greedy) == final.tokens


@pytest.mark.parametrize("backend_name", ["ggml", "mlx"])
def test_reused_decode_graphs_cross_the_padding_boundary(tiny_llama_path, backend_name):
    """ggml reruns the decode graph while the attended range is unchanged (MLX replays
    its recorded ops); 70 steps cross the 32-cell padding twice and must give exactly the
    tokens of building every graph."""
    from herd.ml import available_backends

    if backend_name not in available_backends():
        pytest.skip(f"{backend_name} not installed (pip install -e '.[{backend_name}]')")
    g = open_gguf(tiny_llama_path)
    backend = open_backend(backend_name, g)
    model = load_model(g.config(), backend)
    model.cache.padding = 32  # the default (128) would not be crossed within this context
    results = []
    for reuse in (True, False):
        runner = Runner(
            model,
            backend,
            LetterTokenizer(),
            Options(num_ctx=256),
            model.context_length,
            reuse_graphs=reuse,
        )
        results.append(run(runner, PROMPTS[0], Options(temperature=0, num_predict=70))[0])
    assert results[0].tokens == results[1].tokens and len(results[0].tokens) == 70


def test_a_prompt_of_the_same_shape_reruns_the_kept_prompt_graph(tiny_llama_path):
    """Two prompts of one length from an empty cache: the second reruns the first one's
    graph (llama.cpp reuses its graphs alike) and gives the tokens of a freshly built one."""
    from herd.ml import available_backends

    if "ggml" not in available_backends():
        pytest.skip("ggml-python not installed (pip install -e '.[ggml]')")
    g = open_gguf(tiny_llama_path)
    backend = open_backend("ggml", g)
    model = load_model(g.config(), backend)
    builds = 0
    forward = model.forward

    def counted(ctx, batch):
        nonlocal builds
        builds += 1
        return forward(ctx, batch)

    model.forward = counted  # type: ignore[method-assign]
    second = [40, 3, 22, 7, 11, 30]
    results = []
    for reuse in (True, False):
        runner = Runner(
            model,
            backend,
            LetterTokenizer(),
            Options(num_ctx=256),
            model.context_length,
            reuse_graphs=reuse,
        )
        run(runner, PROMPTS[0], Options(temperature=0, num_predict=1))
        runner.reset()
        before = builds
        results.append(run(runner, second, Options(temperature=0, num_predict=4))[0].tokens)
        if reuse:  # the prompt's graph was kept, then the decode graph's
            assert builds == before + 1
    assert results[0] == results[1] and len(results[0]) == 4


def test_released_graphs_are_built_again(tiny_llama_path):
    """release_graphs (LLM.close, a runner replaced) frees the kept graphs; the runner
    still works after, building new ones."""
    from herd.ml import available_backends

    if "ggml" not in available_backends():
        pytest.skip("ggml-python not installed (pip install -e '.[ggml]')")
    g = open_gguf(tiny_llama_path)
    backend = open_backend("ggml", g)
    model = load_model(g.config(), backend)
    runner = Runner(model, backend, LetterTokenizer(), Options(num_ctx=256), model.context_length)
    first = run(runner, PROMPTS[0])[0].tokens
    assert set(runner.graphs.kept) == {"prompt", "decode"}
    runner.release_graphs()
    assert runner.graphs.kept == {}
    runner.reset()
    assert run(runner, PROMPTS[0])[0].tokens == first


@pytest.mark.parametrize("backend_name", ["numpy", "ggml"])
def test_long_prompts_attend_in_blocks_with_the_same_logits(
    tiny_llama_path, monkeypatch, backend_name
):
    """A prompt longer than a block attends block by block, each block of queries over
    only the cells it may see: the logits are those of attending in one piece."""
    import herd.kvcache.causal as causal
    from herd.ml import available_backends

    if backend_name not in available_backends():
        pytest.skip("ggml-python not installed (pip install -e '.[ggml]')")
    g = open_gguf(tiny_llama_path)
    backend = open_backend(backend_name, g)
    model = load_model(g.config(), backend)
    tokens = [int(t) for t in np.random.default_rng(3).integers(0, 64, 150)]
    runner = Runner(
        model, backend, LetterTokenizer(), Options(num_ctx=256, num_batch=150), model.context_length
    )
    out = {}
    for block in (32, 10**6):
        monkeypatch.setattr(causal, "BLOCK", block)
        out[block] = runner.logits(tokens)
        if block == 32:  # 5 blocks, each over the cells its rows see (in 16s)
            blocks = model.cache._blocks
            assert blocks[:2] == [(0, 32, 0, 32, 0), (32, 64, 0, 64, 0)] and len(blocks) == 5
        else:
            assert model.cache._blocks == []
    np.testing.assert_allclose(out[32], out[10**6], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_type", ["f16", "q8_0", "q4_0"])
def test_kv_cache_types(smollm2_path, monkeypatch, cache_type):
    """HERD_KV_CACHE_TYPE's values on the built-in model (quantized cache rows need head
    sizes in whole 32-element blocks, which real models have)."""
    import herd

    monkeypatch.setenv("HERD_KV_CACHE_TYPE", cache_type)
    llm = herd.load(smollm2_path)
    out = llm.generate(
        "The capital of France is", raw=True, options={"temperature": 0, "num_predict": 6}
    )
    assert out["eval_count"] == 6 and "Paris" in out["response"]


def test_unknown_kv_cache_type_is_a_clear_error(tiny_llama_path):
    g = open_gguf(tiny_llama_path)
    backend = open_backend("numpy", g)
    model = load_model(g.config(), backend)
    with pytest.raises(HerdError, match="unknown KV cache type 'q9'"):
        Runner(model, backend, LetterTokenizer(), Options(), model.context_length, cache_type="q9")


# ---- the request pipeline ---------------------------------------------------------------
class FakeLoaded:
    """What the pipeline uses of a loaded model; a token per character, [1] for BOS."""

    def __init__(self, template: Any = None, system: str | None = None,
                 defaults: Options | None = None, is_embedding: bool = False) -> None:  # fmt: skip
        self.name, self.template, self.defaults = "m", template, defaults or Options()
        self.source = Source("m", Path("m.gguf"), system=system)
        self.is_embedding, self.context_length, self.n_vocab = is_embedding, 512, 1 << 21
        self.tokenizer = JsonTokenizer()  # for grammars
        self.calls: list[tuple[str, bool, bool]] = []

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[
            int]:  # fmt: skip
        self.calls.append((text, add_special, parse_special))
        return [1] * add_special + [ord(c) for c in text]


CHATML = go_builtin("chatml")
HI = [{"role": "user", "content": "hi"}]


def _chatml(*turns: tuple[str, str]) -> str:
    body = "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns)
    return body + "<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("template", "system", "request_", "text"),
    [
        (CHATML, None, Request(prompt="hi"), _chatml(("user", "hi"))),
        (CHATML, "S", Request(prompt="hi"), _chatml(("system", "S"), ("user", "hi"))),
        (CHATML, "S", Request(prompt="hi", system="T"), _chatml(("system", "T"), ("user", "hi"))),
        (CHATML, "S", Request(prompt="hi", system=""), _chatml(("user", "hi"))),
        (CHATML, "S", Request(prompt="<b>hi", raw=True), "<b>hi"),
        (None, "S", Request(prompt="hi"), "hi"),
        (CHATML, "S", Request(messages=HI), _chatml(("system", "S"), ("user", "hi"))),
        (CHATML, "S", Request(messages=[{"role": "system", "content": "T"}, *HI]),
         _chatml(("system", "T"), ("user", "hi"))),
        (None, None, Request(messages=[{"role": "system", "content": "T"}, *HI]), "T\nhi"),
    ],
    ids=["generate", "model-system", "own-system", "no-system", "raw", "no-template", "chat",
         "chat-own-system", "chat-no-template"],
)  # fmt: skip
def test_prompt_rules(template, system, request_, text):
    """System message, template and raw: one set of rules for the library and the server."""
    loaded = FakeLoaded(template, system)
    prepared = prepare(loaded, request_)
    assert prepared.text == text
    assert loaded.calls == [(text, True, True)]  # BOS/EOS; special tokens parsed
    assert prepared.tokens == [1] + [ord(c) for c in text] and prepared.parser is None


def test_context_continues_without_bos():
    loaded = FakeLoaded()
    prepared = prepare(loaded, Request(prompt="ab", raw=True, context=[7, 8], want_context=True))
    assert prepared.tokens == [7, 8, 97, 98] and loaded.calls == [("ab", False, True)]
    from herd.runner import Event, finish

    final = finish(prepared, Event(done=True, done_reason="stop", tokens=(5,), eval_count=1))
    assert final["context"] == [7, 8, 97, 98, 5] and final["done_reason"] == "stop"
    assert "context" not in finish(prepare(loaded, Request(prompt="ab", raw=True)), Event())


def test_format_turns_thinking_off_and_capabilities_are_checked():
    qwen3 = FakeLoaded(go_builtin("qwen3"))
    thinks = prepare(qwen3, Request(messages=HI, think=True))
    assert thinks.parser is not None and thinks.text.endswith("<|im_start|>assistant\n")
    json_only = prepare(qwen3, Request(messages=HI, think=True, format="json"))
    assert json_only.parser is None and json_only.text.endswith("<think>\n\n</think>\n\n")
    cannot = [(Request(messages=HI, think=True), "thinking"),
              (Request(messages=HI, tools=[{"type": "function"}]), "tools")]  # fmt: skip
    for request_, what in cannot:
        with pytest.raises(CapabilityError, match=f'"m" does not support {what}'):
            prepare(FakeLoaded(go_builtin("gemma3")), request_)
    with pytest.raises(CapabilityError, match='"m" does not support generate'):
        prepare(FakeLoaded(is_embedding=True), Request(prompt="hi"))


def test_embedding_inputs_are_cut_keeping_the_last_token():
    loaded = FakeLoaded(is_embedding=True)
    long = "x" * 600 + "!"
    inputs, count = prepare_embed(loaded, ["ab", long], truncate=True)
    assert inputs[0] == [1, 97, 98] and count == 3 + 602
    assert len(inputs[1]) == 512 and inputs[1][-1] == ord("!")
    with pytest.raises(ContextLengthError, match="exceeds the context length"):
        prepare_embed(loaded, [long], truncate=False)
    with pytest.raises(CapabilityError, match='"m" does not support embeddings'):
        prepare_embed(FakeLoaded(), ["ab"], truncate=True)


def test_a_new_prompt_takes_an_empty_slot_before_a_cached_prefix(tiny_llama_path):
    """Two free slots, neither sharing a prefix with a new prompt: it goes to the empty
    one, so the first conversation's cached prefix is still there for its next turn."""
    runner = make_runner(tiny_llama_path, parallel=2)
    options = Options(temperature=0, num_predict=4)
    first, other = [1, 5, 9, 13, 1, 5, 9], [2, 4, 8, 16, 32]
    list(runner.generate(first, options))
    list(runner.generate(other, options))
    again = list(runner.generate(first + [13], options))[-1]
    assert again.prompt_cached_count == len(first)
    assert sorted(len(s.cached) > 0 for s in runner.slots) == [True, True]
