"""The Python API and the `herd` command end to end on the built-in SmolLM2 (NumPy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import herd
from herd.gguf.writer import write_gguf

DATA = Path(__file__).parent.parent / "testdata"
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return herd.load(smollm2_path, backend="numpy")


def test_generate_result_has_ollamas_fields(llm):
    out = llm.generate("The capital of France is", options=GREEDY, raw=True)
    for key in (
        "model",
        "created_at",
        "response",
        "done",
        "done_reason",
        "context",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ):
        assert key in out, key
    assert out["done"] and out["done_reason"] in ("stop", "length") and out["response"]
    prompt = llm.tokenize("The capital of France is")
    assert out["context"][: len(prompt)] == prompt
    assert len(out["context"]) == len(prompt) + out["eval_count"]


def test_streamed_chunks_join_to_the_whole_answer(llm):
    whole = llm.generate("Once upon a time", options=GREEDY, raw=True)["response"]
    parts = list(llm.generate("Once upon a time", options=GREEDY, raw=True, stream=True))
    assert parts[-1]["done"] and not any(p["done"] for p in parts[:-1])
    assert "".join(p["response"] for p in parts) == whole


def test_greedy_generation_follows_llama_cpp(llm):
    """NumPy is fp32, llama.cpp quantizes activations: the first tokens must agree (with
    llama.cpp's goldens of any CPU kernel set)."""
    golden = json.loads(sorted(DATA.glob("greedy_smollm2.*.json"))[0].read_text())
    for case in golden["cases"]:
        out = llm.generate(case["prompt"], raw=True, options={"temperature": 0, "num_predict": 8})
        ours = out["context"][len(case["prompt_ids"]) :]
        assert out["context"][: len(case["prompt_ids"])] == case["prompt_ids"]
        assert ours[:4] == case["generated"][:4], case


def test_chat_uses_the_template_and_keeps_history(llm):
    first = llm.chat([{"role": "user", "content": "Say hello."}], options=GREEDY)
    assert first["message"]["role"] == "assistant" and first["message"]["content"]
    second = llm.chat(
        [
            {"role": "user", "content": "Say hello."},
            first["message"],
            {"role": "user", "content": "Again."},
        ],
        options=GREEDY,
    )
    # the second turn re-sends the first: only the new tokens are computed (Ollama's count
    # is the whole prompt; the reused part is prompt_cached_count)
    assert second["prompt_eval_count"] - second["prompt_cached_count"] < 30


def test_logits_are_one_row_per_token(llm):
    ids = llm.tokenize("Hello world, hello herd.")
    logits = llm.logits(ids)
    assert logits.shape == (len(ids), 49152) and logits.dtype == np.float32


def test_stop_option(llm):
    out = llm.generate(
        "1, 2, 3, 4, 5,", raw=True, options={"temperature": 0, "num_predict": 20, "stop": ["8"]}
    )
    assert "8" not in out["response"] and out["done_reason"] == "stop"


# ---- the command line, as a user runs it ------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# `herd run <name>` starts a background `herd serve` when none answers: give it a port of
# its own, and stop it when this module is done
CLI_HOST = f"127.0.0.1:{_free_port()}"
OWN_STORE_HOST = f"127.0.0.1:{_free_port()}"  # a server over a test's own store


@pytest.fixture(scope="module", autouse=True)
def _stop_background_server():
    yield
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.info["cmdline"][-2:] == ["herd", "serve"] and proc.environ().get(
                "HERD_HOST"
            ) in (CLI_HOST, OWN_STORE_HOST):
                proc.terminate()
                proc.wait(15)
        except (psutil.Error, TypeError):
            continue


def herd_cli(*args: str, stdin: str | None = None, store: Path | None = None, host: str = CLI_HOST):
    env = dict(os.environ, HERD_BACKEND="numpy", HERD_HOST=host)
    if store is not None:
        env["HERD_MODELS"] = str(store)
    return subprocess.run(
        [sys.executable, "-m", "herd", *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def bounded_store(smollm2_path, tmp_path_factory) -> Path:
    """A store holding SmolLM2 with its answer bounded by the Modelfile: with Ollama's
    defaults (num_predict -1, a random seed) a sampled answer may never end, shifting the
    context as Ollama's does ("- A\n- B\n..." once ran past these tests' 300 s)."""
    root = tmp_path_factory.mktemp("bounded")
    modelfile = root / "Modelfile"
    modelfile.write_text(f"FROM {smollm2_path}\nPARAMETER num_predict 32\nPARAMETER seed 7\n")
    store = root / "models"
    r = herd_cli("create", "bounded", "-f", str(modelfile), store=store, host=OWN_STORE_HOST)
    assert r.returncode == 0, r.stderr
    return store


def test_cli_run_answers_a_prompt(bounded_store):
    r = herd_cli(
        "run", "bounded", "Say hi in three words.", store=bounded_store, host=OWN_STORE_HOST
    )  # a server over its own store, not the other tests'
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_cli_run_reads_stdin(bounded_store):
    r = herd_cli("run", "bounded", stdin="What is 2+2?", store=bounded_store, host=OWN_STORE_HOST)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_unknown_architecture_is_a_clear_error(tmp_path):
    path = write_gguf(
        tmp_path / "odd.gguf",
        "mamba9",
        {"general.architecture": "mamba9"},
        [("token_embd.weight", np.zeros((4, 4), np.float32), None)],
    )
    r = herd_cli("run", str(path), "hi")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: unsupported architecture 'mamba9'; supported: "), r.stderr
    assert "llama" in last.split("supported: ")[1]
