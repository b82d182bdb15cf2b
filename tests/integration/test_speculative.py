"""Speculative decoding on SmolLM2 (the built-in smollm2:135m): greedy output with a draft
or prompt lookup equals greedy output without, token for token, two sequences in one
batch; a draft with another vocabulary is refused at load."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import herd
from herd.errors import DraftError
from herd.gguf import open_gguf
from herd.gguf.writer import write_gguf
from herd.ml import available_backends
from herd.runner.loaded import Loaded

BACKEND = "ggml" if "ggml" in available_backends() else "numpy"
PROMPTS = [
    "Summarize: The cat sat on the mat. The cat was happy on the mat. Summary: The cat",
    "Write a short story about a robot who learns to paint.",
]
N = 32


def _random_llama(smollm2_path: Path, out: Path, swap: int | None = None) -> Path:
    """A one-layer random Llama with SmolLM2's tokenizer (its metadata, small tensors),
    tokens `swap` and `swap + 1` exchanged when given."""
    kv = dict(open_gguf(smollm2_path).kv)
    if swap is not None:
        tokens = list(kv["tokenizer.ggml.tokens"])
        tokens[swap], tokens[swap + 1] = tokens[swap + 1], tokens[swap]
        kv["tokenizer.ggml.tokens"] = tokens
    d, ff, heads, kv_heads = 64, 128, 4, 2
    kv.update({"llama.block_count": 1, "llama.embedding_length": d,
               "llama.feed_forward_length": ff, "llama.attention.head_count": heads,
               "llama.attention.head_count_kv": kv_heads, "llama.rope.dimension_count": d // heads,
               "general.file_type": 0, "general.name": "random draft"})  # fmt: skip
    n_vocab = len(kv["tokenizer.ggml.tokens"])
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (n_vocab, d), "output_norm.weight": (d,),
        "blk.0.attn_norm.weight": (d,), "blk.0.ffn_norm.weight": (d,),
        "blk.0.attn_q.weight": (d, d), "blk.0.attn_k.weight": (d * kv_heads // heads, d),
        "blk.0.attn_v.weight": (d * kv_heads // heads, d), "blk.0.attn_output.weight": (d, d),
        "blk.0.ffn_gate.weight": (ff, d), "blk.0.ffn_up.weight": (ff, d),
        "blk.0.ffn_down.weight": (d, ff),
    }  # fmt: skip
    tensors = [
        (name, (np.ones(s) if name.endswith("norm.weight") else rng.normal(0, 0.1, s)).astype(
            np.float32), None)
        for name, s in shapes.items()
    ]  # fmt: skip
    return write_gguf(out, "llama", kv, tensors)


@pytest.fixture(scope="module")
def random_draft(smollm2_path, tmp_path_factory) -> Path:
    """The same vocabulary as SmolLM2, proposals that are mostly wrong."""
    return _random_llama(smollm2_path, tmp_path_factory.mktemp("draft") / "random-draft.gguf")


def _answers(llm, options, prompts=PROMPTS):
    """Greedy answers to `prompts`, sent at once to one runner with a slot each."""
    opts = llm.defaults.merged({"temperature": 0, "num_predict": N, **options})
    runner = llm.loaded.new_runner(opts, parallel=len(prompts))
    tokens = [llm.tokenize(p) for p in prompts]
    runner.start()
    finals: dict[int, object] = {}
    try:

        def client(i: int) -> None:
            finals[i] = list(runner.generate(tokens[i], opts))[-1]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        runner.stop()
        runner.release_graphs()
    return [finals[i] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def plain(smollm2_path):
    llm = herd.load(smollm2_path, backend=BACKEND)
    try:
        yield [f.tokens for f in _answers(llm, {})]
    finally:
        llm.close()


def test_prompt_lookup_keeps_greedy_output(smollm2_path, plain):
    llm = herd.load(smollm2_path, backend=BACKEND)
    try:
        finals = _answers(llm, {"lookup_ngram": 3})
    finally:
        llm.close()
    assert [f.tokens for f in finals] == plain
    assert finals[0].draft_proposed > 0  # the summary repeats its input: lookup proposes


@pytest.mark.parametrize("which", ["itself", "random"])
def test_draft_keeps_greedy_output(smollm2_path, random_draft, plain, which):
    draft = smollm2_path if which == "itself" else random_draft
    llm = herd.load(smollm2_path, backend=BACKEND, draft=draft)
    try:
        finals = _answers(llm, {})
        single = llm.generate(PROMPTS[1], options={"temperature": 0, "num_predict": N})
    finally:
        llm.close()
    assert [f.tokens for f in finals] == plain
    proposed = sum(f.draft_proposed for f in finals)
    accepted = sum(f.draft_accepted for f in finals)
    assert proposed > 0
    if which == "itself":  # the same model: its guesses are the target's (ties aside)
        assert accepted >= 0.9 * proposed, (accepted, proposed)
    else:  # noise: most guesses are wrong, and k shrinks to 1
        assert accepted <= 0.5 * proposed, (accepted, proposed)
    # the library's final answer reports them; its text is the batched answer's
    assert single["draft_proposed"] > 0 and single["draft_accepted"] <= single["draft_proposed"]


def test_draft_with_another_vocabulary_is_refused(smollm2_path, tmp_path, monkeypatch):
    """A draft whose tokens 1000 and 1001 are swapped: DraftError naming the token, and
    both models are closed again (nothing half loaded)."""
    other = _random_llama(smollm2_path, tmp_path / "other-vocab.gguf", swap=1000)
    closed = []
    close = Loaded.close
    monkeypatch.setattr(Loaded, "close", lambda self: (closed.append(self.name), close(self)))
    with pytest.raises(DraftError, match="token 1000 is"):
        herd.load(smollm2_path, backend=BACKEND, draft=other)
    assert sorted(closed) == sorted([Path(smollm2_path).name, other.name])


# ---- Modelfile DRAFT: a stored model that speculates ---------------------------------------
@pytest.fixture(scope="module")
def plain_stored(test_store, smollm2_path):
    """Greedy answers of the store's smollm2:135m (its parameters: stop strings)."""
    from herd.api import LLM
    from herd.runner.loaded import Source

    ref = test_store.resolve("smollm2:135m")
    llm = LLM(Source(ref.name, ref.model_path, ref.template, ref.system, ref.params), BACKEND)
    try:
        yield [f.tokens for f in _answers(llm, {})]
    finally:
        llm.close()


def _own_store(test_store, root: Path):
    """A store at `root` (HERD_MODELS in these tests) with the test store's models."""
    from herd.store import Store
    from integration.test_server import _copy_store

    _copy_store(test_store.root, root)
    return Store(root)


@pytest.mark.parametrize("which", ["itself", "random"])
def test_modelfile_draft_speculates(test_store, random_draft, plain_stored, tmp_path, which):
    """`DRAFT` (a store name, a GGUF path) at create: `herd.load(name)` loads the draft
    and speculates, greedy output unchanged."""
    from herd.modelfile import parse
    from herd.store.create import create

    store = _own_store(test_store, tmp_path / "models")
    draft = "smollm2:135m" if which == "itself" else str(random_draft)
    ref = create(store, "smol:drafted", parse(f"FROM smollm2:135m\nDRAFT {draft}"),
                 base_dir=tmp_path)  # fmt: skip
    assert ref.draft is not None
    llm = herd.load("smol:drafted", backend=BACKEND)
    try:
        assert llm.loaded.draft is not None and llm.loaded.draft.source.path == ref.draft
        finals = _answers(llm, {})
    finally:
        llm.close()
    assert [f.tokens for f in finals] == plain_stored
    assert sum(f.draft_proposed for f in finals) > 0


def test_modelfile_draft_with_another_vocabulary_is_refused(test_store, smollm2_path, tmp_path):
    """A DRAFT whose tokens 1000 and 1001 are swapped: refused at create, at its line,
    naming the token; the store's files are as they were."""
    from herd.errors import ModelfileError
    from herd.modelfile import parse
    from herd.store.create import create

    store = _own_store(test_store, tmp_path / "models")
    other = _random_llama(smollm2_path, tmp_path / "other-vocab.gguf", swap=1000)
    before = {p: p.read_bytes() if p.is_file() else None for p in store.root.rglob("*")}
    with pytest.raises(ModelfileError, match="token 1000 is") as info:
        create(store, "smol:bad", parse(f"FROM smollm2:135m\nDRAFT {other}"), base_dir=tmp_path)
    assert (info.value.line, info.value.column) == (2, 7)
    after = {p: p.read_bytes() if p.is_file() else None for p in store.root.rglob("*")}
    assert after == before


@pytest.mark.slow
def test_served_model_with_draft(test_store, smollm2_path, random_draft, tmp_path):
    """Through `herd serve`: `/api/create` with Ollama's `draft_files` (the random draft,
    uploaded as a blob) and a Modelfile DRAFT naming the model itself; the `ollama`
    client's greedy answers equal the plain model's, `/api/show`'s modelfile has the
    DRAFT line, and the final response counts the proposals."""
    import hashlib

    import httpx

    from herd.modelfile import parse
    from herd.store import Store
    from herd.store.create import create
    from integration.test_server import _start

    opts = {"temperature": 0, "num_predict": N}
    for server in _start(tmp_path, test_store, {"HERD_BACKEND": BACKEND}):
        data = random_draft.read_bytes()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        r = httpx.post(f"{server.url}/api/blobs/{digest}", content=data, timeout=60)
        assert r.status_code == 201, r.text
        r = httpx.post(f"{server.url}/api/create", timeout=120, json={
            "model": "smol:random", "from": "smollm2:135m", "stream": False,
            "draft_files": {"random-draft.gguf": digest}})  # fmt: skip
        assert r.status_code == 200 and r.json() == {"status": "success"}, r.text
        create(Store(server.store), "smol:self", parse("FROM smollm2:135m\nDRAFT smollm2:135m"),
               base_dir=tmp_path)  # fmt: skip
        client = server.ollama()

        def generate(name: str, url: str = server.url) -> dict:
            body = {"model": name, "prompt": PROMPTS[1], "options": opts, "stream": False}
            return httpx.post(f"{url}/api/generate", json=body, timeout=120).json()

        want = client.generate("smollm2:135m", PROMPTS[0], options=opts).response
        for name in ("smol:random", "smol:self"):
            show = client.show(name)
            assert "\nDRAFT " in show.modelfile, show.modelfile
            assert client.generate(name, PROMPTS[0], options=opts).response == want
            body = generate(name)
            assert body["draft_proposed"] > 0 and body["eval_count"] > 0, body
        assert "draft_proposed" not in generate("smollm2:135m")  # nothing speculated
