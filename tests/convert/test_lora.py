"""LoRA adapters: a PEFT adapter converted by herd, applied at run time.

The tiny Llama and its adapters (tests/convert/lora_case.py: random A and B, rank != alpha,
q/k/v/o and the MLP) are the reference's own: herd's logits must equal transformers + PEFT
(PEFT applying the adapters, several at once with `set_scale`) for a whole prompt and for
cached decode steps, on every backend; llama.cpp, given herd's converted files (the same
tensor hashes), gave logits close to herd's (goldens from scripts/make_lora_goldens.py);
and `herd create` with ADAPTER naming the PEFT folder makes a model whose logits are the
adapted ones when loaded by name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("tokenizers")

import herd  # noqa: E402
from herd.convert import convert  # noqa: E402
from herd.convert.lora import convert_lora  # noqa: E402
from herd.errors import ConvertError  # noqa: E402
from herd.gguf import open_gguf  # noqa: E402
from herd.ml import DType, available_backends  # noqa: E402
from herd.modelfile import parse  # noqa: E402
from herd.models import Batch, batch_inputs  # noqa: E402
from herd.store import Store  # noqa: E402
from herd.store.create import create  # noqa: E402

from . import lora_case as lc  # noqa: E402
from .tiny import GOLDENS, hf_logits  # noqa: E402

TOL = {"numpy": 1e-4, "ggml": 1e-3, "mlx": 1e-4, "onnx": 1e-4}  # as tests/parity
LLAMA_CPP_TOL = 5e-3  # llama.cpp's own kernels (F16 KV cache): close, not equal
CASES = {"one": {"one": 1.0}, "both": dict(lc.SCALES)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    src, model = lc.base(tmp / "base")
    peft_dirs = {n: lc.adapter(model, n, tmp / n) for n in lc.ADAPTERS}
    return SimpleNamespace(
        tmp=tmp,
        src=src,
        model=model,
        gguf=convert(src, tmp / "base.gguf", "f32"),
        peft=peft_dirs,
        loras={n: convert_lora(d, tmp / f"{n}.gguf", src) for n, d in peft_dirs.items()},
        ids=lc.ids(model.config.vocab_size),
    )


def run(llm, ids: list[int], split: int | None = None) -> np.ndarray:
    """Logits of every row: one pass, or `ids[:split]` then one decode step per token."""
    model = llm.model
    model.cache.init(llm.backend, DType.F32, 1, 128, 128)
    batches = (
        [Batch.single(ids, outputs="all")]
        if split is None
        else [Batch.single(ids[:split], 0, outputs="all")]
        + [Batch.single([t], i) for i, t in enumerate(ids[split:], split)]
    )
    rows = []
    for batch in batches:
        with llm.backend.new_context() as ctx:
            model.cache.start_forward(ctx, batch)
            (out,) = ctx.compute(model.forward(ctx, batch_inputs(ctx, batch)))
        rows.append(out)
    return np.concatenate(rows)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", available_backends())
def test_logits_match_peft(tiny, backend: str, case: str) -> None:
    scales = CASES[case]
    ref = hf_logits(lc.peft_model(tiny.model, {n: tiny.peft[n] for n in scales}, scales), tiny.ids)
    base = hf_logits(tiny.model, tiny.ids)
    assert rel_err(base, ref) > 0.1  # the adapters change the answer: the check can fail
    llm = herd.load(tiny.gguf, backend, adapters=[(tiny.loras[n], s) for n, s in scales.items()])
    try:
        assert rel_err(run(llm, tiny.ids), ref) < TOL[backend]
        assert rel_err(run(llm, tiny.ids, split=12), ref) < TOL[backend]  # cached decode
    finally:
        llm.loaded.close()


def test_converted_adapter_matches_llama_cpp_goldens(tiny) -> None:
    golden = json.loads((GOLDENS / "lora.json").read_text())
    for name, path in [("base", tiny.gguf), *tiny.loras.items()]:
        g = open_gguf(path)
        got = {n: hashlib.sha256(g.raw(n).tobytes()).hexdigest() for n in g.tensors}
        assert got == golden["tensors"][name], f"{name}: not the file llama.cpp ran"
    assert golden["ids"] == [int(i) for i in tiny.ids]
    rows = golden["positions"]
    base = np.asarray(golden["cases"]["base"]["logits"])
    for case, data in golden["cases"].items():
        scales = data["scales"]
        want = np.asarray(data["logits"])
        if scales:
            assert rel_err(base, want) > 0.1  # llama.cpp applied the adapters
        llm = herd.load(
            tiny.gguf, "numpy", adapters=[(tiny.loras[n], s) for n, s in scales.items()]
        )
        try:
            assert rel_err(run(llm, tiny.ids)[rows], want) < LLAMA_CPP_TOL, case
        finally:
            llm.loaded.close()


def test_base_gguf_gives_the_same_adapter_as_the_hf_folder(tiny) -> None:
    """`--base` a GGUF (config read back from its metadata) or the HF folder: same bytes."""
    out = convert_lora(tiny.peft["one"], tiny.tmp / "one-from-gguf.gguf", tiny.gguf)
    a, b = open_gguf(out), open_gguf(tiny.loras["one"])
    assert sorted(a.tensors) == sorted(b.tensors)
    assert all(a.raw(n).tobytes() == b.raw(n).tobytes() for n in a.tensors)
    assert a.kv["adapter.lora.alpha"] == 16.0 and a.kv["general.type"] == "adapter"


def test_rslora_scale_is_folded(tiny, tmp_path: Path) -> None:
    """PEFT's rsLoRA scale (alpha / sqrt(rank)) is not llama.cpp's alpha / rank: folded
    into B, alpha written as 0, and the logits still equal PEFT's."""
    import shutil

    import peft

    d = tmp_path / "rs"
    shutil.copytree(tiny.peft["one"], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    out = convert_lora(d, tmp_path / "rs.gguf", tiny.src)
    assert open_gguf(out).kv["adapter.lora.alpha"] == 0.0
    ref = hf_logits(peft.PeftModel.from_pretrained(lc.copy_of(tiny.model), d).eval(), tiny.ids)
    llm = herd.load(tiny.gguf, "numpy", adapters=[out])
    try:
        assert rel_err(run(llm, tiny.ids), ref) < TOL["numpy"]
    finally:
        llm.loaded.close()


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (lambda c: {**c, "use_dora": True}, "a DoRA adapter"),
        (lambda c: {**c, "peft_type": "IA3"}, "peft_type 'IA3'"),
        (lambda c: {**c, "lora_alpha": "x"}, "lora_alpha is 'x'"),
    ],
)
def test_unsupported_peft_configs_refused(tiny, tmp_path: Path, edit, fragment: str) -> None:
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(tiny.peft["one"], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps(edit(cfg)))
    with pytest.raises(ConvertError, match=fragment):
        convert_lora(d, tmp_path / "out.gguf", tiny.src)
    assert not (tmp_path / "out.gguf").exists()


def test_create_with_peft_adapter_then_load_by_name(tiny, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from herd.cli.env import CliEnv
    from herd.cli.main import cli

    models = tmp_path / "models"
    store = Store(models)
    mf = f"FROM {tiny.gguf}\nADAPTER {tiny.peft['one']}\n"
    create(store, "tiny-lora:1", parse(mf), base_dir=tmp_path)
    ref = hf_logits(lc.peft_model(tiny.model, {"one": tiny.peft["one"]}, {}), tiny.ids)
    llm = herd.load("tiny-lora:1", "numpy")
    try:
        assert rel_err(run(llm, tiny.ids), ref) < TOL["numpy"]
    finally:
        llm.loaded.close()
    # show --modelfile names the adapter layer, and creating from that text round-trips it
    r = CliRunner().invoke(cli, ["show", "tiny-lora:1", "--modelfile"], obj=CliEnv(),
                           env={"HERD_MODELS": str(models)})  # fmt: skip
    assert r.exit_code == 0, r.output
    manifest, _ = store.read_manifest("tiny-lora:1")
    (adapter,) = [x for x in manifest.layers if x.media_type.endswith("adapter")]
    assert f"ADAPTER {store.blob_path(adapter.digest)}\n" in r.stdout
    text = "\n".join(line for line in r.stdout.splitlines() if not line.startswith("#"))
    create(store, "again:1", parse(text), base_dir=tmp_path)
    again, _ = store.read_manifest("again:1")
    assert [x.digest for x in again.layers if x.media_type.endswith("adapter")] == [adapter.digest]


def test_api_create_with_a_peft_adapter(tiny, tmp_path: Path) -> None:
    """`/api/create` with `adapters` naming the uploaded files of a PEFT folder converts it
    (the same tensors as `herd convert`); one for another model is a 400 naming the tensor."""
    from starlette.testclient import TestClient

    from herd import envconfig
    from herd.server.app import Settings, create_app

    store = Store(tmp_path / "models")
    app = create_app(Settings(store, envconfig.host(), memory_limit=2**40))
    client = TestClient(app, base_url="http://localhost")

    def upload(path: Path) -> str:
        digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        assert client.post(f"/api/blobs/{digest}", content=path.read_bytes()).status_code < 300
        return digest

    files = {"base.gguf": upload(tiny.gguf)}
    adapter = {p.name: upload(p) for p in sorted(tiny.peft["one"].iterdir()) if p.is_file()}
    body = {"model": "api-lora:1", "files": files, "adapters": adapter, "stream": False}
    r = client.post("/api/create", json=body)
    assert r.status_code == 200 and r.json()["status"] == "success", r.text
    manifest, _ = store.read_manifest("api-lora:1")
    (layer,) = [x for x in manifest.layers if x.media_type.endswith("adapter")]
    got, want = open_gguf(store.blob_path(layer.digest)), open_gguf(tiny.loras["one"])
    assert sorted(got.tensors) == sorted(want.tensors)
    assert all(got.raw(n).tobytes() == want.raw(n).tobytes() for n in got.tensors)
    # without its adapter_config.json, or for another model: 400, nothing created
    only = {k: v for k, v in adapter.items() if k.endswith(".safetensors")}
    r = client.post("/api/create", json={**body, "model": "x:1", "adapters": only})
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]
    other = lc.adapter(lc.copy_of(tiny.model), "two", tmp_path / "two")
    cfg = json.loads((other / "adapter_config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.numpy import load_file, save_file

    ts = load_file(other / "adapter_model.safetensors")
    key = next(k for k in ts if "layers.0.self_attn.q_proj.lora_A" in k)
    ts[key] = np.zeros((ts[key].shape[0], 7), np.float32)  # A's input dim no longer fits
    save_file(ts, bad / "adapter_model.safetensors")
    wrong = {p.name: upload(p) for p in sorted(bad.iterdir())}
    r = client.post("/api/create", json={**body, "model": "y:1", "adapters": wrong})
    assert r.status_code == 400, r.text
    assert "q_proj.lora_A.weight [4, 7]" in r.json()["error"]
    assert [n.model for n in store.names()] == ["api-lora"]
