"""`create` from Modelfiles, `show` of the result, and quantization through ggml."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from _store_helpers import write_gguf
from click.testing import CliRunner

from herd.cli.env import CliEnv
from herd.cli.main import cli
from herd.errors import HerdError, ModelfileError
from herd.gguf import open_gguf, quants, writer
from herd.ml import BackendOptions, open_backend
from herd.modelfile import parse
from herd.store import Store
from herd.store import quantize as q
from herd.store.create import create
from herd.store.layout import (
    CONFIG_V1,
    MEDIA_ADAPTER,
    MEDIA_LICENSE,
    MEDIA_MESSAGES,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
)

T = gguf.GGMLQuantizationType

MODELFILE = '''FROM ./tiny.gguf
TEMPLATE """{{ .Prompt }}"""
SYSTEM You are terse.
PARAMETER temperature 0.5
PARAMETER stop <end>
PARAMETER stop <eot>
LICENSE MIT
LICENSE """Second
license"""
MESSAGE user Hi
MESSAGE assistant Hello!
'''


@pytest.fixture
def src(tmp_path: Path) -> Path:
    write_gguf(tmp_path / "tiny.gguf")
    return tmp_path


def blob_text(store: Store, digest: str) -> str:
    return store.blob_path(digest).read_text()


def test_create_from_gguf(src: Path) -> None:
    store = Store(src / "models")
    steps: list[str] = []
    ref = create(
        store, "me/tiny:1", parse(MODELFILE), base_dir=src, progress=lambda s, *a: steps.append(s)
    )
    manifest, _ = store.read_manifest("me/tiny:1")
    assert [x.media_type for x in manifest.layers] == [
        MEDIA_MODEL,
        MEDIA_TEMPLATE,
        MEDIA_SYSTEM,
        MEDIA_LICENSE,
        MEDIA_LICENSE,
        MEDIA_PARAMS,
        MEDIA_MESSAGES,
    ]
    model = manifest.layers[0]
    assert model.from_ == "tiny.gguf"
    assert store.blob_path(model.digest).read_bytes() == (src / "tiny.gguf").read_bytes()
    texts = [blob_text(store, x.digest) for x in manifest.layers[1:]]
    assert texts == [
        "{{ .Prompt }}",
        "You are terse.",
        "MIT",
        "Second\nlicense",
        '{"stop":["\\u003cend\\u003e","\\u003ceot\\u003e"],"temperature":0.5}\n',
        '[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello!"}]\n',
    ]
    assert manifest.config.media_type == CONFIG_V1
    config = json.loads(store.blob_path(manifest.config.digest).read_bytes())
    assert config["model_format"] == "gguf" and config["model_family"] == "llama"
    assert config["file_type"] == "Q4_1" and config["model_type"] == "136"
    assert (ref.template, ref.system, ref.license) == (
        "{{ .Prompt }}",
        "You are terse.",
        ["MIT", "Second\nlicense"],
    )
    assert ref.params == {"stop": ["<end>", "<eot>"], "temperature": 0.5}
    assert ref.messages == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert steps[0] == "gathering model components" and steps[-2:] == [
        "writing manifest",
        "success",
    ]
    # every blob is referenced; nothing temporary is left behind
    assert {p.name for p in store.blobs_dir.iterdir()} == {
        "sha256-" + x.digest[7:] for x in manifest.all_layers()
    }


def test_create_from_model_inherits_and_overrides(src: Path) -> None:
    store = Store(src / "models")
    create(store, "base:1", parse(MODELFILE), base_dir=src)
    text = "FROM base:1\nSYSTEM Be kind.\nPARAMETER temperature 0.9\nLICENSE Extra\n"
    ref = create(store, "derived:1", parse(text), base_dir=src)
    manifest, _ = store.read_manifest("derived:1")
    base, _ = store.read_manifest("base:1")
    assert {x.from_ for x in manifest.layers if x.media_type == MEDIA_MODEL} == {"base:1"}
    assert manifest.layers[0].digest == base.layers[0].digest
    assert ref.system == "Be kind." and ref.template == "{{ .Prompt }}"
    assert ref.license == ["MIT", "Second\nlicense", "Extra"]
    assert ref.params == {"stop": ["<end>", "<eot>"], "temperature": 0.9}
    assert ref.messages == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]


def test_recreate_prunes_old_blobs_and_keeps_shared(src: Path) -> None:
    store = Store(src / "models")
    create(store, "a:1", parse(MODELFILE), base_dir=src)
    create(store, "b:1", parse("FROM ./tiny.gguf\nSYSTEM old"), base_dir=src)
    create(store, "b:1", parse("FROM ./tiny.gguf\nSYSTEM new"), base_dir=src)
    texts = {p.read_bytes() for p in store.blobs_dir.iterdir()}
    assert b"new" in texts and b"old" not in texts
    assert store.resolve("a:1").system == "You are terse."


@pytest.mark.parametrize(
    "text,setup,fragment",
    [
        ("FROM ./nope.gguf", None, "Modelfile:1:6: FROM ./nope.gguf: no such file"),
        ("FROM nosuch:model", None, "FROM nosuch:model: no such file, and no model by that name"),
        ("FROM ./hf", "hf", "no config.json"),
        ("FROM ./notes.gguf", "text", "not a GGUF file"),
        ("FROM ./tiny.gguf\nADAPTER ./gone.gguf", None, "Modelfile:2:9: ADAPTER ./gone.gguf"),
    ],
    ids=["missing-file", "missing-model", "hf-dir", "not-gguf", "missing-adapter"],
)
def test_create_errors_leave_store_unchanged(
    src: Path, text: str, setup: str | None, fragment: str
) -> None:
    if setup == "hf":
        (src / "hf").mkdir()
        (src / "hf" / "model.safetensors").write_bytes(b"{}")
    if setup == "text":
        (src / "notes.gguf").write_text("hello")
    store = Store(src / "models")
    create(store, "keep:1", parse("FROM ./tiny.gguf"), base_dir=src)
    before = sorted(p.name for p in store.blobs_dir.iterdir())
    with pytest.raises(HerdError) as info:
        create(store, "new:1", parse(text), base_dir=src)
    assert fragment in str(info.value)
    assert sorted(p.name for p in store.blobs_dir.iterdir()) == before
    assert [n.model for n in store.names()] == ["keep"]


def test_adapter_layer_round_trips(src: Path) -> None:
    # a LoRA that fits its base (create checks it: tests/unit/test_lora_checks.py)
    z = np.zeros
    writer.write_gguf(src / "base.gguf", "llama", {"llama.embedding_length": 8},
                      [("token_embd.weight", z((16, 8), np.float32), None),
                       ("output.weight", z((16, 8), np.float32), None)])  # fmt: skip
    lora = {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 4.0}
    writer.write_gguf(src / "lora.gguf", "llama", lora,
                      [("output.weight.lora_a", z((2, 8), np.float32), None),
                       ("output.weight.lora_b", z((16, 2), np.float32), None)])  # fmt: skip
    store = Store(src / "models")
    create(store, "with-lora:1", parse("FROM ./base.gguf\nADAPTER ./lora.gguf"), base_dir=src)
    manifest, _ = store.read_manifest("with-lora:1")
    adapter = manifest.layers[1]
    assert (adapter.media_type, adapter.from_) == (MEDIA_ADAPTER, "lora.gguf")
    assert store.blob_path(adapter.digest).read_bytes() == (src / "lora.gguf").read_bytes()
    r = CliRunner().invoke(
        cli,
        ["show", "with-lora:1", "--modelfile"],
        obj=CliEnv(),
        env={"HERD_MODELS": str(src / "models")},
    )
    assert f"ADAPTER {store.blob_path(adapter.digest)}\n" in r.stdout


def test_create_from_hugging_face_folder(src: Path) -> None:
    from convert.handmade import make_dir

    make_dir(src)  # a tiny BERT: src/hf/{config.json, vocab.txt, model.safetensors}
    store = Store(src / "models")
    steps: list[str] = []
    create(
        store,
        "tiny-bert:1",
        parse("FROM ./hf\nPARAMETER num_ctx 16"),
        base_dir=src,
        progress=lambda status, *_: steps.append(status),
    )
    ref = store.resolve("tiny-bert:1")
    g = open_gguf(ref.model_path)
    assert g.kv["general.architecture"] == "bert" and g.kv["general.file_type"] == 1  # F16
    assert ref.config["model_family"] == "bert" and ref.params == {"num_ctx": 16}
    assert "converting model" in steps and steps[-1] == "success"
    assert sorted(p.name for p in store.root.iterdir()) == ["blobs", "manifests"]  # no temp


def test_create_uses_a_stored_blob_in_place(src: Path) -> None:
    store = Store(src / "models")
    create(store, "a:1", parse("FROM ./tiny.gguf"), base_dir=src)
    blob = store.resolve("a:1").model_path
    (src / "link.gguf").symlink_to(blob)
    steps: list[str] = []
    create(
        store,
        "b:1",
        parse("FROM ./link.gguf"),
        base_dir=src,
        progress=lambda status, *_: steps.append(status),
    )
    assert store.resolve("b:1").model_path == blob
    assert not any(s.startswith("copying") for s in steps)
    assert store.read_manifest("b:1")[0].layers[0].from_ == "link.gguf"


def test_bad_template_fails_before_writing(src: Path) -> None:
    from herd.errors import TemplateError

    store = Store(src / "models")
    with pytest.raises(TemplateError):
        create(store, "t:1", parse('FROM ./tiny.gguf\nTEMPLATE "{{ .Prompt"'), base_dir=src)
    assert not store.blobs_dir.exists() or not any(store.blobs_dir.iterdir())


def test_cli_create_and_show(src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(src)
    monkeypatch.setenv("HERD_MODELS", str(src / "models"))
    (src / "Modelfile").write_text(MODELFILE + "PARAMETER mirostat 1\n")
    runner = CliRunner()
    r = runner.invoke(cli, ["create", "tiny"], obj=CliEnv())
    assert r.exit_code == 0, r.output
    assert "warning: parameter mirostat is deprecated" in r.stderr
    r = runner.invoke(cli, ["show", "tiny", "--modelfile"], obj=CliEnv())
    ref = Store().resolve("tiny")
    assert r.stdout == (
        '# Modelfile generated by "herd show"\n'
        "# To build a new Modelfile based on this, replace FROM with:\n"
        f"# FROM tiny:latest\n\nFROM {ref.model_path}\nTEMPLATE {{{{ .Prompt }}}}\n"
        "SYSTEM You are terse.\nPARAMETER stop <end>\nPARAMETER stop <eot>\n"
        'PARAMETER temperature 0.5\nLICENSE MIT\nLICENSE "Second\nlicense"\n'
        "MESSAGE user Hi\nMESSAGE assistant Hello!\n\n"
    )
    # the printed Modelfile builds the same model again
    (src / "Again").write_text(r.stdout)
    assert runner.invoke(cli, ["create", "again", "-f", "Again"], obj=CliEnv()).exit_code == 0
    assert Store().resolve("again").params == ref.params
    for flag, expected in [
        ("--template", "{{ .Prompt }}\n"),
        ("--system", "You are terse.\n"),
        ("--license", "MIT\nSecond\nlicense\n"),
    ]:
        assert runner.invoke(cli, ["show", "tiny", flag], obj=CliEnv()).stdout == expected
    r = runner.invoke(cli, ["show", "tiny", "--system", "--license"], obj=CliEnv())
    assert r.exit_code == 1 and "only one of '--license', '--modelfile'" in r.stderr
    r = runner.invoke(cli, ["create", "bad", "-f", "Nope"], obj=CliEnv())
    assert r.exit_code == 1 and "Nope: no such file" in r.stderr


# ---------------------------------------------------------------- quantization

N_LAYER = 8


def write_f32_model(path: Path, ftype: int = 0, dtype: type = np.float32) -> dict[str, np.ndarray]:
    """A llama-shaped F32 (or F16) GGUF with weights of every category."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(N_LAYER)
    w.add_file_type(ftype)
    arrays = {
        "token_embd.weight": rng.standard_normal((32, 256)),
        "output_norm.weight": np.ones(256),
    }
    for i in range(N_LAYER):
        arrays[f"blk.{i}.attn_norm.weight"] = np.ones(256)
        arrays[f"blk.{i}.attn_q.weight"] = rng.standard_normal((256, 256))
        arrays[f"blk.{i}.attn_v.weight"] = rng.standard_normal((64, 256))
        arrays[f"blk.{i}.ffn_down.weight"] = rng.standard_normal((256, 512))
        arrays[f"blk.{i}.ffn_up.weight"] = rng.standard_normal((512, 256))
    arrays["blk.0.odd.weight"] = rng.standard_normal((4, 96))  # 96: no K-quant block fits
    out = {}
    for name, a in arrays.items():
        a = a.astype(np.float32 if a.ndim == 1 else dtype)
        w.add_tensor(name, a)
        out[name] = a.astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# llama.cpp's mixes on 8 layers: use_more_bits(i, 8) is true for layers 0, 3, 6, 7
MORE = {0, 3, 6, 7}
PLANS = {
    "Q4_K_M": lambda i: {
        "attn_v": T.Q6_K if i in MORE else T.Q4_K,
        "ffn_down": T.Q6_K if i in MORE else T.Q4_K,
        "attn_q": T.Q4_K,
    },
    "Q4_K_S": lambda i: {
        "attn_v": T.Q5_K if i < 4 else T.Q4_K,
        "ffn_down": T.Q5_K if i < 1 else T.Q4_K,
        "attn_q": T.Q4_K,
    },
    "Q5_K_M": lambda i: {
        "attn_v": T.Q6_K if i in MORE else T.Q5_K,
        "ffn_down": T.Q6_K if i in MORE else T.Q5_K,
        "attn_q": T.Q5_K,
    },
    "Q6_K": lambda i: {"attn_v": T.Q6_K, "ffn_down": T.Q6_K, "attn_q": T.Q6_K},
    "Q4_0": lambda i: {"attn_v": T.Q4_0, "ffn_down": T.Q4_0, "attn_q": T.Q4_0},
}


@pytest.mark.parametrize("ftype", list(PLANS))
def test_plan_follows_llama_cpp(tmp_path: Path, ftype: str) -> None:
    write_f32_model(tmp_path / "m.gguf")
    plan = q.plan(open_gguf(tmp_path / "m.gguf"), ftype)
    for i in range(N_LAYER):
        for kind, expected in PLANS[ftype](i).items():
            assert plan[f"blk.{i}.{kind}.weight"] == expected, (i, kind)
    # tied output: token_embd gets the output type; norms stay F32; fallback for odd rows
    assert plan["token_embd.weight"] == T.Q6_K
    assert plan["output_norm.weight"] == plan["blk.3.attn_norm.weight"] == T.F32
    default = q.FILE_TYPES[ftype][1]
    assert plan["blk.0.odd.weight"] == {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}.get(
        default, default
    )


# relative RMS error bounds per type on Gaussian weights (measured ~0.7x of these)
ERROR = {
    T.Q8_0: 0.01,
    T.Q6_K: 0.03,
    T.Q5_K: 0.05,
    T.Q5_0: 0.06,
    T.Q5_1: 0.06,
    T.Q4_K: 0.10,
    T.Q4_0: 0.13,
    T.Q4_1: 0.12,
    T.F16: 0.001,
    T.F32: 0.0,
}


needs_ggml = pytest.mark.skipif(
    importlib.util.find_spec("ggml") is None,
    reason="ggml-python is not installed (quantization kernels)",
)


@needs_ggml
@pytest.mark.parametrize(
    "ftype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K"]
)
def test_create_quantize_numpy_backend_error(tmp_path: Path, ftype: str) -> None:
    original = write_f32_model(tmp_path / "m.gguf")
    store = Store(tmp_path / "models")
    ref = create(store, "q:1", parse("FROM ./m.gguf"), base_dir=tmp_path, quantize_to=ftype.lower())
    g = open_gguf(ref.model_path)
    assert q.file_type_of(g) == ftype and ref.config["file_type"] == ftype
    assert g.kv["general.quantization_version"] == 2
    backend = open_backend("numpy", g, BackendOptions())
    seen = set()
    for name, want in original.items():
        t = g.tensors[name]
        got = np.asarray(backend.weight(name).a, dtype=np.float32)
        rel = float(np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want**2)))
        assert rel <= ERROR[t.type], (name, t.type.name, rel)
        seen.add(t.type)
    assert q.FILE_TYPES[ftype][1] in seen
    # only the quantized model is left: the F32 copy was an intermediate
    assert len([p for p in store.blobs_dir.iterdir()]) == 2


@needs_ggml
def test_quantize_from_f16_and_refusals(tmp_path: Path) -> None:
    write_f32_model(tmp_path / "h.gguf", ftype=1, dtype=np.float16)
    store = Store(tmp_path / "models")
    ref = create(store, "h:1", parse("FROM ./h.gguf"), base_dir=tmp_path, quantize_to="Q4_K")
    assert ref.config["file_type"] == "Q4_K_M"
    with pytest.raises(HerdError, match="only supported for F16, BF16 and F32 models"):
        create(store, "again:1", parse("FROM h:1"), base_dir=tmp_path, quantize_to="q8_0")
    with pytest.raises(HerdError, match="unsupported quantization type 'q3_x'"):
        create(store, "x:1", parse("FROM ./h.gguf"), base_dir=tmp_path, quantize_to="q3_x")
    with pytest.raises(ModelfileError):
        create(store, "x:1", parse("FROM ./none.gguf"), base_dir=tmp_path, quantize_to="q8_0")


@needs_ggml
def test_quantized_file_keeps_metadata_types(tmp_path: Path) -> None:
    write_f32_model(tmp_path / "m.gguf")
    with open(tmp_path / "q.gguf", "wb") as f:
        q.quantize(open_gguf(tmp_path / "m.gguf"), "Q8_0", f.write)
    ref = gguf.GGUFReader(str(tmp_path / "q.gguf"))  # the reference reader accepts it
    src = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    for key, field in src.fields.items():
        if key not in ("general.file_type", "GGUF.kv_count"):
            assert ref.fields[key].types == field.types, key
    assert int(ref.fields["general.file_type"].parts[-1][0]) == int(gguf.LlamaFileType.MOSTLY_Q8_0)


@needs_ggml
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.BF16])
def test_one_quantizer_same_bytes_without_ggml(
    qtype: gguf.GGMLQuantizationType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ggml-python the gguf package quantizes what it can, to ggml's very bytes."""
    rows = np.random.default_rng(0).standard_normal((3, 8, 512)).astype(np.float32)
    by_ggml = quants.quantize(rows, qtype)
    monkeypatch.setattr(quants, "_ggml", lambda: None)
    assert quants.quantize(rows, qtype).tobytes() == by_ggml.tobytes()


def test_quantizer_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = np.zeros((2, 256), np.float32)
    with pytest.raises(HerdError, match="cannot quantize rows of 100 values to Q8_0"):
        quants.quantize(rows[:, :100], T.Q8_0)
    with pytest.raises(HerdError, match="herd cannot quantize to Q8_K"):
        quants.quantize(rows, T.Q8_K)
    monkeypatch.setattr(quants, "_ggml", lambda: None)
    with pytest.raises(HerdError, match="quantizing to Q4_K needs ggml-python"):
        quants.quantize(rows, T.Q4_K)


def test_stream_writer_writes_the_gguf_packages_bytes(tmp_path: Path) -> None:
    """herd's one GGUF writer and the gguf package's GGUFWriter agree byte for byte."""
    rng = np.random.default_rng(0)
    kv = {
        "general.name": "x",
        "a.ints": [1, 2, 3],
        "a.neg": -5,
        "a.flags": [True, False],
        "a.flag": True,
        "a.nested": [[1, 2], [3]],
        "a.strs": ["x", "yé"],
        "a.f": 1.5,
        "a.floats": (0.1, 0.2),
    }
    w = rng.standard_normal((8, 64)).astype(np.float32)
    tensors = [
        ("w", w, None),
        ("h", w.astype(np.float16), None),
        ("q", gguf.quants.quantize(w, T.Q8_0), T.Q8_0),
        ("i", np.arange(5, dtype=np.int32), None),
    ]
    ours = writer.write_gguf(tmp_path / "ours.gguf", "llama", kv, tensors)
    ref = gguf.GGUFWriter(str(tmp_path / "ref.gguf"), "llama")
    for key, value in kv.items():
        vtype, sub = writer._vtype(value)
        array_value = list(value) if vtype == gguf.GGUFValueType.ARRAY else value
        ref.add_key_value(key, array_value, vtype, sub)
    for name, array, raw_type in tensors:
        ref.add_tensor(name, array, raw_dtype=raw_type)
    ref.write_header_to_file()
    ref.write_kv_data_to_file()
    ref.write_tensors_to_file()
    ref.close()
    assert ours.read_bytes() == (tmp_path / "ref.gguf").read_bytes()
