"""The ONNX backend's on-disk cache of optimized sessions (herd.ml.backends.onnx.disk): a
second process compiles nothing, a corrupted entry is rebuilt and never run, and a cache
that cannot be written is no cache."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from herd import envconfig  # noqa: E402
from herd.gguf import open_gguf  # noqa: E402
from herd.ml import BackendOptions, DType, open_backend  # noqa: E402
from herd.ml.backends.onnx import disk  # noqa: E402
from herd.ml.backends.onnx.context import EMBED_BYTES  # noqa: E402
from herd.models import Batch, batch_inputs, load_model  # noqa: E402

PROMPT = [1, 5, 9, 13, 17, 21]

# a child process: greedy tokens of the model on onnx, and what its disk cache did
CHILD = """
import json, sys
from herd import envconfig
from herd.gguf import open_gguf
from herd.ml import BackendOptions, open_backend
from herd.models import load_model
from herd.options import Options
from herd.runner import Runner

class Letters:
    def piece(self, id, special=False):
        return bytes([97 + id % 26])
    def is_eog(self, id):
        return False

g = open_gguf(sys.argv[1])
backend = open_backend("onnx", g, BackendOptions(**envconfig.backend_options()))
model = load_model(g.config(), backend)
runner = Runner(model, backend, Letters(), Options(num_ctx=256), model.context_length)
events = list(runner.generate(PROMPT, Options(temperature=0, num_predict=6)))
cache = backend.disk_cache()
print(json.dumps({"tokens": list(events[-1].tokens), "built": cache.built,
                  "loaded": cache.loaded}))
""".replace("PROMPT", repr(PROMPT))


@pytest.fixture(scope="module")
def tiny_q8_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with its matrices in Q8_0, so sessions hold quantized
    initializers (MatMulNBits) as SmolLM2's do, besides float graph inputs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from gguf import GGMLQuantizationType as Q

    from herd.gguf.quants import quantize
    from herd.gguf.writer import write_gguf

    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    hf = transformers.LlamaForCausalLM(cfg).eval()
    conv = importlib.import_module("herd.models.llama.convert")
    cd = hf.config.to_dict()
    tensors = []
    for name, value in hf.state_dict().items():
        out = conv.tensor(cd, name, value.detach().float().numpy())
        if out is None:
            continue
        a = np.ascontiguousarray(out[1], dtype=np.float32)
        if a.ndim == 2 and a.shape[-1] % 32 == 0:
            tensors.append((out[0], quantize(a, Q.Q8_0), Q.Q8_0))
        else:
            tensors.append((out[0], a, None))
    path = tmp_path_factory.mktemp("tinyq8") / "tiny-q8.gguf"
    return write_gguf(path, "llama", conv.kv(cd), tensors)


def _child(path: Path, cache: Path, **env: str) -> dict:
    full = {**os.environ, "HERD_CACHE": str(cache), **env}
    full.pop("HERD_ONNX_CACHE", None)
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], env=full, capture_output=True,
                         text=True, timeout=300, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _entries(cache: Path) -> list[Path]:
    return sorted((cache / "onnx").glob("*.onnx"))


def test_a_second_process_compiles_nothing(tiny_q8_path: Path, tmp_path: Path) -> None:
    """The first process optimizes its sessions (the prompt's and the decode step's) and
    saves them; the second loads every one from disk, builds none, and decodes the same
    tokens. The entries hold no weights: the Q8_0 matrices are declared, not stored."""
    first = _child(tiny_q8_path, tmp_path)
    assert first["built"] == 2 and first["loaded"] == 0, first
    entries = _entries(tmp_path)
    assert len(entries) == 2
    import onnx

    for e in entries:
        m = onnx.load(str(e), load_external_data=False)
        inits = m.graph.initializer
        # the backend's large initializers (context.EMBED_BYTES) are named, not held
        held = [t.name for t in inits if len(t.raw_data) >= EMBED_BYTES]
        declared = [t.name for t in inits if t.data_location == onnx.TensorProto.EXTERNAL]
        assert held == [] and declared, (e.name, held[:3])
    second = _child(tiny_q8_path, tmp_path)
    assert second["built"] == 0 and second["loaded"] == 2, second
    assert second["tokens"] == first["tokens"]


def _logits(path: Path) -> tuple[np.ndarray, object]:
    g = open_gguf(path)
    # as an entry point opens it: HERD_CACHE and HERD_ONNX_CACHE read by envconfig
    backend = open_backend("onnx", g, BackendOptions(**envconfig.backend_options()))
    model = load_model(g.config(), backend)
    model.cache.init(backend, DType.F16, 1, 256, 64)
    with backend.new_context() as ctx:  # the prompt, as the runner runs it
        b = Batch.single(PROMPT, outputs="all")
        model.cache.start_forward(ctx, b)
        (out,) = ctx.compute(model.forward(ctx, batch_inputs(ctx, b)))
    return out, backend.disk_cache()  # type: ignore[attr-defined]


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache for this test, and no DiskCache counts left from another test."""
    monkeypatch.setenv("HERD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HERD_ONNX_CACHE", raising=False)
    disk._cache_for.cache_clear()
    yield tmp_path / "cache"
    disk._cache_for.cache_clear()


def test_a_loaded_session_computes_what_a_built_one_does(tiny_q8_path: Path, fresh: Path) -> None:
    built, cache = _logits(tiny_q8_path)
    assert (cache.built, cache.loaded) == (1, 0)  # type: ignore[attr-defined]
    loaded, cache = _logits(tiny_q8_path)
    assert (cache.built, cache.loaded) == (1, 1)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(loaded, built)


@pytest.mark.parametrize("how", ["bytes flipped", "digest matches garbage", "side record gone"])
def test_a_corrupted_entry_is_rebuilt_never_run(
    tiny_q8_path: Path, fresh: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """An entry that fails its sha256 side record, or passes it but is no model ORT
    loads, or lost its record, is built again (a log line) and written back whole."""
    want, _ = _logits(tiny_q8_path)
    (entry,) = _entries(fresh.parent / "cache")
    side = entry.with_name(entry.name + ".sha256")
    original = entry.read_bytes()
    blob = bytearray(original)
    if how == "bytes flipped":
        blob[len(blob) // 2] ^= 0xFF
        entry.write_bytes(bytes(blob))
    elif how == "digest matches garbage":
        entry.write_bytes(b"not a model" * 100)
        side.write_text(hashlib.sha256(b"not a model" * 100).hexdigest())
    else:
        side.unlink()
    with caplog.at_level(logging.INFO, logger="herd.ml.backends.onnx.disk"):
        got, cache = _logits(tiny_q8_path)
    assert (cache.built, cache.loaded) == (2, 0)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(got, want)
    if how != "side record gone":  # a missing record is a plain miss
        assert "rebuilding it" in caplog.text
    assert entry.read_bytes() == original  # written back whole
    assert hashlib.sha256(original).hexdigest() == side.read_text()
    _, cache = _logits(tiny_q8_path)  # and the rewritten entry loads
    assert cache.loaded == 1  # type: ignore[attr-defined]


def test_an_unwritable_cache_is_no_cache(
    tiny_q8_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A read-only cache folder: sessions are built as without a cache, one log line."""
    root = tmp_path / "ro"
    (root / "onnx").mkdir(parents=True)
    os.chmod(root / "onnx", 0o555)
    if os.access(root / "onnx", os.W_OK):  # root ignores the mode: a file where it must be
        os.chmod(root / "onnx", 0o755)
        (root / "onnx").rmdir()
        (root / "onnx").write_text("")
    monkeypatch.setenv("HERD_CACHE", str(root))
    disk._cache_for.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="herd.ml.backends.onnx.disk"):
            first, cache = _logits(tiny_q8_path)
            second, _ = _logits(tiny_q8_path)
    finally:
        disk._cache_for.cache_clear()
        os.chmod(root / "onnx", 0o755)
    assert (cache.built, cache.loaded, cache.writable) == (2, 0, False)  # type: ignore[attr-defined]
    assert caplog.text.count("cannot be written") == 1
    np.testing.assert_array_equal(first, second)


def test_the_cache_can_be_turned_off(tiny_q8_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERD_ONNX_CACHE", "0")
    root = disk.cache_root(BackendOptions(**envconfig.backend_options()))
    assert root is None
    assert disk.for_model(tiny_q8_path, ["CPUExecutionProvider"], root) is None


def test_model_digest_is_the_blob_name_or_the_content(tmp_path: Path) -> None:
    blob = tmp_path / ("sha256-" + "ab" * 32)
    blob.write_bytes(b"x")
    assert disk.model_digest(blob, tmp_path) == "ab" * 32
    other = tmp_path / "m.gguf"
    other.write_bytes(b"some model bytes")
    want = hashlib.sha256(b"some model bytes").hexdigest()
    assert disk.model_digest(other, tmp_path / "memo") == want
    assert disk.model_digest(other, tmp_path / "memo") == want  # from the memo
    assert len(list((tmp_path / "memo" / "digests").iterdir())) == 1
