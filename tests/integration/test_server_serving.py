"""One model, many users, on a real `herd serve` with 8 sequence slots (NumPy backend, the
oracle: a batched row is bit-identical to a single one): concurrent greedy chats, the
prefix cache across chat turns, and token log-probabilities on both APIs.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from integration.test_server import MODEL, Server, _start

ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

GREEDY = {"num_predict": 8, "temperature": 0}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, test_store: object
) -> Iterator[Server]:
    yield from _start(tmp_path_factory.mktemp("serving"), test_store, {"HERD_NUM_PARALLEL": "8"})


# ---------------------------------------------------------------- the prefix cache
def _prompt_tokens(server: Server, messages: list[dict]) -> list[int]:
    """The tokens the runner computes for a chat: the store's template, the GGUF's tokenizer."""
    from herd.gguf import open_gguf
    from herd.store import Store
    from herd.template import select_template
    from herd.tokenizer import from_gguf

    ref = Store(server.store).resolve(MODEL)
    g = open_gguf(ref.model_path)
    text = select_template(g.kv, ref.template).render(messages, add_generation_prompt=True)
    return from_gguf(g).encode(text, add_special=True, parse_special=True)


def test_second_turn_computes_only_the_new_tokens(server: Server) -> None:
    client = server.ollama()
    # a system message no other test sends: only "<|im_start|>system\n" can be cached
    history = [
        {"role": "system", "content": "You are Zebulon, a tersely spoken lighthouse keeper."},
        {"role": "user", "content": "Name a color of the rainbow."},
    ]
    first = client.chat(MODEL, history, options=GREEDY)
    turn1 = _prompt_tokens(server, history)
    assert first.prompt_eval_count >= len(turn1) - 4  # computed (nearly) all of it
    history += [
        {"role": "assistant", "content": first.message.content},
        {"role": "user", "content": "And another one?"},
    ]
    body = {"model": MODEL, "messages": history, "options": GREEDY, "stream": False}
    second = httpx.post(f"{server.url}/api/chat", json=body, timeout=120).json()
    turn2 = _prompt_tokens(server, history)
    assert turn2[: len(turn1)] == turn1
    # Ollama's count is the whole prompt; only what follows the first turn's prompt (the
    # answer, the new user turn) is computed, the rest is herd's prompt_cached_count
    assert second["prompt_eval_count"] == len(turn2)
    computed = second["prompt_eval_count"] - second["prompt_cached_count"]
    assert 0 < computed <= len(turn2) - len(turn1)
    assert computed < len(turn2) // 2


# ---------------------------------------------------------------- continuous batching
def test_eight_concurrent_chats_match_alone(server: Server) -> None:
    prompts = [f"Write the number {i} in words, then {i + 1}." for i in range(8)]

    def ask(p: str) -> str:
        chat = server.ollama().chat(MODEL, [{"role": "user", "content": p}], options=GREEDY)
        assert chat.eval_count == GREEDY["num_predict"] or chat.done_reason == "stop"
        return chat.message.content

    alone = {p: ask(p) for p in prompts}
    together: dict[str, str] = {}
    start = threading.Barrier(len(prompts))

    def worker(p: str) -> None:
        start.wait()
        together[p] = ask(p)

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert together == alone
    assert len(set(alone.values())) > 1  # eight different answers, not one repeated


# ---------------------------------------------------------------- logprobs
def _check_logprobs(entries: list[dict], text: str, top: int) -> None:
    """Greedy: every token is its row's most likely one; alternatives sorted, log-probs;
    the tokens' bytes spell the text."""
    assert entries, "no logprobs"
    for e in entries:
        assert e["logprob"] <= 0
        assert bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]
        alts = e["top_logprobs"]
        assert len(alts) == top
        values = [a["logprob"] for a in alts]
        assert values == sorted(values, reverse=True)
        assert math.isclose(e["logprob"], values[0], abs_tol=1e-6)
        assert alts[0]["token"] == e["token"]
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6
    spelled = b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8", "replace")
    assert spelled.startswith(text) or text.startswith(spelled)


def _same(a: list[dict], b: list[dict]) -> bool:
    """Equal tokens, log-probs within 1e-3 (a cached prefix computes in other chunks)."""
    return len(a) == len(b) and all(
        x["token"] == y["token"]
        and math.isclose(x["logprob"], y["logprob"], abs_tol=1e-3)
        and _same(x.get("top_logprobs", []), y.get("top_logprobs", []))
        for x, y in zip(a, b, strict=True)
    )


def _post(server: Server, path: str, body: dict) -> dict:
    r = httpx.post(f"{server.url}{path}", json={"stream": False, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_logprobs_ollama_api(server: Server) -> None:
    opts = {"num_predict": 6, "temperature": 0}
    ask = {
        "model": MODEL,
        "prompt": "The capital of France is",
        "options": opts,
        "logprobs": True,
        "top_logprobs": 3,
    }
    whole = _post(server, "/api/generate", ask)
    _check_logprobs(whole["logprobs"], whole["response"], 3)
    assert len(whole["logprobs"]) == whole["eval_count"]
    # streamed: each token's entry arrives with its piece; together the same list
    with httpx.stream("POST", f"{server.url}/api/generate", json=ask, timeout=120) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    streamed = [e for line in lines for e in line.get("logprobs", [])]
    assert _same(streamed, whole["logprobs"])
    chat = _post(
        server,
        "/api/chat",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hi."}],
            "options": opts,
            "logprobs": True,
            "top_logprobs": 2,
        },
    )
    _check_logprobs(chat["logprobs"], chat["message"]["content"], 2)
    # the official client reads them too
    client = server.ollama()
    got = client.chat(
        MODEL, [{"role": "user", "content": "Say hi."}], options=opts, logprobs=True, top_logprobs=2
    )
    assert [lp.token for lp in got.logprobs] == [e["token"] for e in chat["logprobs"]]
    # logprobs alone: the chosen token's, no alternatives; none unless asked
    alone = _post(server, "/api/generate", {**ask, "top_logprobs": 0})
    assert alone["logprobs"] and all("top_logprobs" not in e for e in alone["logprobs"])
    assert "logprobs" not in _post(server, "/api/generate", {**ask, "logprobs": False})
    for bad in (-1, 21):
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(MODEL, "Hi", options=opts, logprobs=True, top_logprobs=bad)
        assert e.value.status_code == 400 and "top_logprobs" in e.value.error


def test_logprobs_openai_api(server: Server) -> None:
    client = server.openai()
    messages = [{"role": "user", "content": "Say hello."}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=4
    )
    content = whole.choices[0].logprobs.content
    _check_logprobs([c.model_dump() for c in content], whole.choices[0].message.content, 4)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=6,
            temperature=0,
            logprobs=True,
            top_logprobs=4,
            stream=True,
        )
    )
    streamed = [
        lp
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for lp in c.choices[0].logprobs.content
    ]
    assert _same([s.model_dump() for s in streamed], [c.model_dump() for c in content])
    plain = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=3, temperature=0
    )
    assert plain.choices[0].logprobs is None
    done = client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, logprobs=2
    )
    entries = done.choices[0].logprobs.model_dump()["content"]
    _check_logprobs(entries, done.choices[0].text, 2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=2, logprobs=True, top_logprobs=25
        )
