"""No request can take a model away from everyone: token ids out of the vocabulary,
non-finite logits, an exception in one request, a pass that fails, an engine thread that
dies, a runner process that stops answering. Each ends the request it concerns with a
typed error; the engine, the runner process and the server go on (or are replaced)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from herd.errors import InvalidTokenError, NonFiniteError, RunnerError
from herd.gguf.writer import write_gguf
from herd.ml import available_backends
from herd.options import Options
from herd.runner import Request, Runner, Source, prepare
from herd.runner.faults import EXIT_ENGINE_DEAD, Watchdog
from herd.runner.loaded import Loaded
from herd.runner.serve import Child
from herd.server import runner_process
from herd.server.runner_process import RunnerProcess

# SentencePiece pieces: the specials, the word boundary, and one per ASCII character, so
# any ASCII text tokenizes (a character a token)
TOKENS = ["<unk>", "<s>", "</s>", "\u2581", "\n", *map(chr, range(32, 127))]
VOCAB, D, EOS = len(TOKENS), 32, 2
GREEDY = Options(temperature=0, num_predict=8)


def write_chat_model(path: Path, poison: bool = False, context_length: int = 256) -> Path:
    """A random 2-layer Llama with a tokenizer (`TOKENS`), fast on any backend.
    Its end-of-sequence token's logit is 0, so greedy answers run to num_predict;
    `poison` puts a NaN in the output weights (every logits row has a NaN)."""
    rng = np.random.default_rng(0)
    w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    output = w(VOCAB, D)
    output[EOS] = 0.0  # its logit 0, below the largest of the others: greedy never ends
    if poison:
        output[7, 3] = np.nan
    tensors = [
        ("token_embd.weight", w(VOCAB, D), None),
        ("output_norm.weight", 1 + w(D), None),
        ("output.weight", output, None),
    ]
    for i in range(2):
        p = f"blk.{i}."
        tensors += [
            (p + "attn_norm.weight", 1 + w(D), None),
            (p + "attn_q.weight", w(D, D), None),
            (p + "attn_k.weight", w(16, D), None),
            (p + "attn_v.weight", w(16, D), None),
            (p + "attn_output.weight", w(D, D), None),
            (p + "ffn_norm.weight", 1 + w(D), None),
            (p + "ffn_gate.weight", w(64, D), None),
            (p + "ffn_up.weight", w(64, D), None),
            (p + "ffn_down.weight", w(D, 64), None),
        ]
    kv = {
        "llama.block_count": 2,
        "llama.embedding_length": D,
        "llama.feed_forward_length": 64,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.context_length": context_length,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": EOS,
    }
    return write_gguf(path, "llama", kv, tensors)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chat_model(tmp_path_factory.mktemp("faults") / "chat.gguf")


@pytest.fixture(scope="module")
def poisoned_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chat_model(tmp_path_factory.mktemp("poison") / "nan.gguf", poison=True)


def loaded(path: Path, backend: str = "numpy") -> Loaded:
    return Loaded(Source("m", path), backend)


def runner(path: Path, parallel: int = 1, backend: str = "numpy") -> Runner:
    return loaded(path, backend).new_runner(Options(num_ctx=128), parallel)


def answer(r: Runner, tokens: list[int], options: Options = GREEDY) -> tuple[int, ...]:
    return list(r.generate(tokens, options))[-1].tokens


BAD_IDS = [-1, VOCAB, 10**9, 2**31, 2**63]


# ---- token ids ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", BAD_IDS)
def test_token_ids_outside_the_vocabulary_are_refused(model_path: Path, bad: int) -> None:
    r = runner(model_path)
    with pytest.raises(
        InvalidTokenError, match=rf"token id {bad} at position 2 .*0 to {VOCAB - 1}\)"
    ):
        answer(r, [1, 5, bad])
    with pytest.raises(InvalidTokenError):
        r.logits([1, bad])
    assert not r.slots[0].busy and len(answer(r, [1, 5, 9])) == 8  # it goes on serving


def test_a_requests_context_is_checked_in_the_pipeline(model_path: Path) -> None:
    m = loaded(model_path)
    with pytest.raises(InvalidTokenError, match=r"^context: token id -1 at position 1 "):
        prepare(m, Request(prompt="t5", context=[3, -1]))
    assert prepare(m, Request(prompt="t5", context=[3, VOCAB - 1])).tokens[:2] == [3, VOCAB - 1]


@pytest.mark.skipif("ggml" not in available_backends(), reason="ggml-python not installed")
def test_bad_token_ids_never_reach_ggml(model_path: Path) -> None:
    """ggml's row lookup aborts the process (GGML_ASSERT) on an id out of range: the
    check must come first. In a child process, so a regression fails this test only."""
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_runner_faults import runner, answer, BAD_IDS
from pathlib import Path
r = runner(Path({str(model_path)!r}), backend="ggml")
for bad in BAD_IDS:
    try:
        answer(r, [1, bad])
    except Exception as e:
        print(type(e).__name__)
print(len(answer(r, [1, 5, 9])))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["InvalidTokenError"] * len(BAD_IDS) + ["8"]


# ---- non-finite values, exceptions in one request -------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "ggml"])
def test_non_finite_logits_end_the_request(poisoned_path: Path, backend: str) -> None:
    if backend not in available_backends():
        pytest.skip(f"{backend} not installed")
    r = runner(poisoned_path, backend=backend)
    for options in (GREEDY, Options(temperature=0.8, seed=1, num_predict=8)):
        with pytest.raises(NonFiniteError, match="the model produced non-finite values"):
            answer(r, [1, 5, 9], options)
        assert not r.slots[0].busy and r.slots[0].cached == []  # nothing kept of it


class FailingGrammar:
    """A constraint that raises (a bug) at its `after`-th mask."""

    def __init__(self, after: int) -> None:
        self.calls, self.after, self.done = 0, after, False

    def mask(self, logits: np.ndarray, out: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls >= self.after:
            raise KeyError("injected")
        np.copyto(out, logits)
        return out

    def accept(self, token: int) -> None:
        pass


def test_an_exception_in_one_request_leaves_the_others_running(model_path: Path) -> None:
    alone = answer(runner(model_path), [1, 7, 11])
    r = runner(model_path, parallel=2)
    r.start()
    try:
        results: dict[str, Any] = {}

        def client(name: str, tokens: list[int], **kw: Any) -> None:
            try:
                results[name] = list(r.generate(tokens, GREEDY, **kw))[-1].tokens
            except Exception as e:
                results[name] = e

        bad = {"grammar": FailingGrammar(3)}
        threads = [
            threading.Thread(target=client, args=("bad", [1, 5, 9]), kwargs=bad),
            threading.Thread(target=client, args=("good", [1, 7, 11])),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert isinstance(results["bad"], RunnerError)
        assert "KeyError" in str(results["bad"]) and "injected" in str(results["bad"])
        assert results["good"] == alone
        assert r.failure is None and answer(r, [1, 7, 11]) == alone  # still serving
    finally:
        r.stop()


def test_a_failed_pass_fails_its_sequences_and_the_engine_goes_on(model_path: Path) -> None:
    r = runner(model_path)
    compute = r._compute
    r._compute = lambda batch: (_ for _ in ()).throw(MemoryError("injected"))  # type: ignore[method-assign]
    with pytest.raises(RunnerError, match="MemoryError: injected"):
        answer(r, [1, 5, 9])
    r._compute = compute  # type: ignore[method-assign]
    assert len(answer(r, [1, 5, 9])) == 8


# ---- the engine thread dies: requests fail, the watchdog ends the process -------------------
def test_engine_death_fails_requests_and_the_watchdog_exits(model_path: Path) -> None:
    r = runner(model_path)
    r.start()
    sent: list[dict[str, object]] = []
    exits: list[int] = []
    dog = Watchdog(r, sent.append, exits.append, interval=0.02)
    dog.start()
    try:
        time.sleep(0.1)
        assert exits == [] and {"op": "alive"} in sent  # healthy: heartbeats
        step = r.step

        def dies() -> bool:
            step()
            raise SystemError("injected")

        r.step = dies  # type: ignore[method-assign]
        with pytest.raises(RunnerError, match="engine stopped: SystemError"):
            answer(r, [1, 5, 9], Options(temperature=0, num_predict=1000))
        with pytest.raises(RunnerError, match="engine stopped"):  # and every later one
            answer(r, [1, 5, 9])
        deadline = time.monotonic() + 5
        while not exits and time.monotonic() < deadline:
            time.sleep(0.01)
        assert exits == [EXIT_ENGINE_DEAD]
    finally:
        dog.stop()


def test_watchdog_ends_a_runner_whose_step_is_stuck(model_path: Path) -> None:
    r = runner(model_path)
    exits: list[int] = []
    dog = Watchdog(r, lambda m: None, exits.append, interval=0.02, step_limit=1.0)
    r.step_started = time.monotonic() - 2.0  # a step that began 2 s ago and never ended
    dog.start()
    dog._thread.join(5)
    assert exits == [EXIT_ENGINE_DEAD]


# ---- the runner process ----------------------------------------------------------------------
def test_runner_process_answers_bad_requests_and_stays_up(model_path: Path) -> None:
    """Over the pipe: a context with ids out of the vocabulary, non-integer ids, a
    malformed line; each is that request's error (or a log line), the next one is served."""
    out = io.StringIO()
    child = Child(out, exit=lambda code: pytest.fail(f"runner exited with {code}"))
    child.load({"name": "m", "path": str(model_path), "backend": "numpy", "options": {}})
    ask = {"op": "completion", "prompt": "t5", "options": {"num_predict": 3, "temperature": 0}}
    for i, context in enumerate([[-1], [VOCAB], [10**9], [2**63], [1.5], "x"]):
        child.handle({**ask, "id": i, "context": context}, threading.Event())
    child.serve(io.StringIO('{"op": "completion"}\nnot json\n[]\n'))
    child.handle({**ask, "id": 9}, threading.Event())
    child.watchdog.stop()  # type: ignore[union-attr]
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    errors = [m for m in replies if "error" in m]
    types = [m["type"] for m in errors]
    assert types == ["InvalidTokenError"] * 4 + ["BadRequestError"] * 2
    assert all("vocabulary" in m["error"] for m in errors[:4])
    assert [m["done_reason"] for m in replies if m.get("id") == 9 and m.get("done")] == ["length"]


async def _silent_runner(model_path: Path) -> str:
    proc = RunnerProcess("m", lambda p: None, silence_s=1.5)
    await proc.start({"name": "m", "path": str(model_path), "backend": "numpy"}, 60)
    try:
        ask = {"op": "completion", "prompt": "t5", "options": {"num_predict": 2}}
        assert [m async for m in proc.request(ask)][-1]["done"]
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGSTOP)  # frozen: no heartbeat, no answer
        t0 = time.monotonic()
        with pytest.raises(RunnerError) as e:
            async for _ in proc.request(ask):
                pass
        assert time.monotonic() - t0 < 10
        assert proc.proc is not None
        assert await asyncio.wait_for(proc.proc.wait(), 5) == -signal.SIGKILL
        return str(e.value)
    finally:
        await proc.kill()


def test_server_fails_requests_of_a_runner_that_stops_answering(model_path: Path) -> None:
    assert runner_process.SILENCE_S >= 10  # the default leaves slow machines room
    message = asyncio.run(_silent_runner(model_path))
    assert "stopped responding" in message


def test_a_prompt_cancelled_midway_frees_its_slot_and_cells(model_path: Path) -> None:
    """A client gone mid-prompt: its slot and the cells computed so far are free at the
    next step."""
    r = loaded(model_path).new_runner(Options(num_ctx=128, num_batch=4), 1)
    prompt = [1, *range(10, 40)]
    cancelled = threading.Event()
    with r.lock:  # what generate hands the batch loop
        seq = r._new_sequence(prompt, GREEDY, cancelled, True)
    r.incoming.put(seq)
    r.step()  # 4 of the 31 prompt tokens
    assert seq.pending and r.slots[0].busy and r.cache.used_cells() == 4
    cancelled.set()
    r.step()
    assert seq.done and not r.slots[0].busy and not r.active
    assert r.cache.used_cells() == 0 and r.slots[0].cached == []
    other = [1, 50, 51, 52]
    assert len(answer(r, other)) == 8
    assert r.cache.used_cells() == len(other) + 8 - 1
