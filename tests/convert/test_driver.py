"""The conversion driver on hand-made directories: readers, bad input, atomic output.

Everything here is written with NumPy and JSON (a tiny BERT with a vocab.txt), so these
tests need neither torch nor transformers, except the PyTorch-checkpoint ones.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from herd.cli.main import cli
from herd.convert import convert
from herd.convert.readers import read_tensors
from herd.errors import ConvertError, UnsupportedModelError
from herd.gguf import open_gguf

from .handmade import CFG, bert_tensors, make_dir, write_safetensors


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def sha_by_tensor(path: Path) -> dict[str, str]:
    g = open_gguf(path)
    return {n: hashlib.sha256(g.raw(n).tobytes()).hexdigest() for n in g.tensors}


# --- it converts ------------------------------------------------------------------------


def test_vocab_txt_bert_converts(tmp_path: Path, out_dir: Path) -> None:
    path = convert(make_dir(tmp_path), out_dir / "m.gguf", "f32")
    g = open_gguf(path)
    assert g.kv["tokenizer.ggml.model"] == "bert"
    assert g.kv["tokenizer.ggml.tokens"][:8] == [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "\u2581hello",
        "\u2581world",
        "s",
    ]
    kv = g.kv
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.seperator_token_id"]) == (2, 3)
    assert "position_ids" not in " ".join(g.tensors) and "pooler" not in " ".join(g.tensors)
    src = bert_tensors()
    w = g.raw("blk.0.ffn_up.weight").view(np.float32).reshape(16, 8)
    np.testing.assert_array_equal(w, src["encoder.layer.0.intermediate.dense.weight"])
    assert list(out_dir.iterdir()) == [path]  # no temp files left


def test_sharded_safetensors_equal_one_file(tmp_path: Path, out_dir: Path) -> None:
    one = convert(make_dir(tmp_path / "a"), out_dir / "one.gguf", "f32")
    src = make_dir(tmp_path / "b")
    tensors = bert_tensors()
    (src / "model.safetensors").unlink()
    names = list(tensors)
    parts = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, part in parts.items():
        write_safetensors(src / file, {n: tensors[n] for n in part})
    index = {"weight_map": {n: f for f, part in parts.items() for n in part}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    two = convert(src, out_dir / "two.gguf", "f32")
    assert sha_by_tensor(one) == sha_by_tensor(two)
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConvertError, match="model-00002-of-00002.safetensors"):
        convert(src, out_dir / "three.gguf", "f32")
    assert not (out_dir / "three.gguf").exists()


def test_bf16_weights(tmp_path: Path, out_dir: Path) -> None:
    tensors = bert_tensors()
    w = tensors["encoder.layer.0.output.dense.weight"]
    bf16 = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncated to bfloat16
    tensors["encoder.layer.0.output.dense.weight"] = bf16
    src = make_dir(tmp_path, tensors, dtypes={"encoder.layer.0.output.dense.weight": "BF16"})
    g = open_gguf(convert(src, out_dir / "f32.gguf", "f32"))
    got = g.raw("blk.0.ffn_down.weight").view(np.float32).reshape(w.shape)
    np.testing.assert_array_equal(got, (bf16.astype(np.uint32) << 16).view(np.float32))
    g = open_gguf(convert(src, out_dir / "bf16.gguf", "bf16"))
    assert g.tensors["blk.0.ffn_down.weight"].type.name == "BF16"
    assert g.raw("blk.0.ffn_down.weight").view(np.uint16).reshape(w.shape).tolist() == bf16.tolist()


@pytest.mark.parametrize(
    "outtype,matrix", [("f32", "F32"), ("f16", "F16"), ("bf16", "BF16"), ("q8_0", "F16")]
)
def test_outtypes(outtype: str, matrix: str, tmp_path: Path, out_dir: Path) -> None:
    """Norms, biases and position tables stay F32; Q8_0 needs rows of 32 (else F16)."""
    g = open_gguf(convert(make_dir(tmp_path), out_dir / "m.gguf", outtype))
    types = {n: t.type.name for n, t in g.tensors.items()}
    assert types["blk.0.attn_q.weight"] == matrix
    assert types["blk.0.attn_q.bias"] == "F32"
    assert types["blk.0.attn_output_norm.weight"] == "F32"
    assert types["position_embd.weight"] == "F32"
    assert types["token_types.weight"] == "F32"


def test_pytorch_bin_equals_safetensors(tmp_path: Path, out_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    st = convert(make_dir(tmp_path / "a"), out_dir / "st.gguf", "f32")
    src = make_dir(tmp_path / "b")
    (src / "model.safetensors").unlink()
    state = {n: torch.from_numpy(a) for n, a in bert_tensors().items()}
    # a transposed view and a tensor sharing storage with another: stride and offset paths
    w = state["encoder.layer.0.intermediate.dense.weight"]
    state["encoder.layer.0.intermediate.dense.weight"] = w.T.contiguous().T
    torch.save(state, src / "pytorch_model.bin")
    assert sha_by_tensor(convert(src, out_dir / "bin.gguf", "f32")) == sha_by_tensor(st)


def test_pytorch_bin_with_code_is_refused(tmp_path: Path, out_dir: Path) -> None:
    src = make_dir(tmp_path)
    (src / "model.safetensors").unlink()
    # a pickle that would call os.system("true") when loaded by plain pickle
    payload = b"cposix\nsystem\n(Vtrue\ntR."
    with zipfile.ZipFile(src / "pytorch_model.bin", "w") as z:
        z.writestr("archive/data.pkl", payload)
    with pytest.raises(ConvertError, match=r"pytorch_model.bin: refusing to unpickle posix.system"):
        convert(src, out_dir / "m.gguf")
    assert list(out_dir.iterdir()) == []


# --- bad input: clear errors, nothing written ---------------------------------------------


def _tensors_without(name: str) -> dict[str, np.ndarray]:
    t = bert_tensors()
    del t[name]
    return t


def _tensors_with(name: str, value: np.ndarray) -> dict[str, np.ndarray]:
    return {**bert_tensors(), name: value}


BAD = {
    "missing-tensor": (
        lambda root: make_dir(root, _tensors_without("encoder.layer.0.output.dense.weight")),
        ConvertError,
        r"missing tensors blk\.0\.ffn_down\.weight \(looked in model\.safetensors\)",
    ),
    "extra-tensor": (
        lambda root: make_dir(
            root, _tensors_with("encoder.layer.0.extra.weight", np.zeros(8, np.float32))
        ),
        ConvertError,
        r"model\.safetensors: tensor encoder\.layer\.0\.extra\.weight is not part "
        r"of a BertModel",
    ),
    "extra-layer": (
        lambda root: make_dir(
            root,
            _tensors_with("encoder.layer.1.output.dense.weight", np.zeros((8, 16), np.float32)),
        ),
        ConvertError,
        r"model\.safetensors: tensor encoder\.layer\.1\.output\.dense\.weight "
        r"\(GGUF blk\.1\.ffn_down\.weight\) is not part of this model's config",
    ),
    "wrong-shape": (
        lambda root: make_dir(
            root,
            _tensors_with("encoder.layer.0.output.dense.weight", np.zeros((16, 8), np.float32)),
        ),
        ConvertError,
        r"model\.safetensors: tensor encoder\.layer\.0\.output\.dense\.weight has "
        r"shape \[16, 8\], but config\.json implies \[8, 16\]",
    ),
    "unsupported-dtype": (
        lambda root: make_dir(
            root, _tensors_with("encoder.layer.0.output.dense.weight", np.zeros((8, 16), np.int8))
        ),
        ConvertError,
        r"model\.safetensors: tensor encoder\.layer\.0\.output\.dense\.weight has "
        r"dtype I8",
    ),
    "unknown-architecture": (
        lambda root: make_dir(root, cfg={**CFG, "architectures": ["FooForCausalLM"]}),
        UnsupportedModelError,
        r"unsupported architecture 'FooForCausalLM'; herd converts .*"
        r"BertModel.*LlamaForCausalLM",
    ),
    "no-architecture": (
        lambda root: make_dir(root, cfg={k: v for k, v in CFG.items() if k != "architectures"}),
        UnsupportedModelError,
        r"unsupported architecture None",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input(case: str, tmp_path: Path, out_dir: Path) -> None:
    make, error, message = BAD[case]
    src = make(tmp_path)
    with pytest.raises(error, match=message):
        convert(src, out_dir / "m.gguf")
    assert list(out_dir.iterdir()) == []


def test_truncated_safetensors(tmp_path: Path, out_dir: Path) -> None:
    src = make_dir(tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:-100])
    n = struct.unpack("<Q", data[:8])[0]
    header = sorted(json.loads(data[8 : 8 + n]).items(), key=lambda kv: kv[1]["data_offsets"])
    cut = next(
        name
        for name, info in header  # the first tensor the cut reaches
        if 8 + n + info["data_offsets"][1] > len(data) - 100
    )
    with pytest.raises(ConvertError, match=rf"model\.safetensors: truncated file: tensor {cut} "):
        convert(src, out_dir / "m.gguf")
    (src / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(ConvertError, match="model.safetensors: not a safetensors file"):
        convert(src, out_dir / "m.gguf")
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    "remove,message",
    [
        ("config.json", r"no config\.json \(not a Hugging Face model directory\)"),
        ("model.safetensors", r"no model weights"),
        ("vocab.txt", r"no tokenizer"),
    ],
    ids=["config", "weights", "tokenizer"],
)
def test_missing_files(remove: str, message: str, tmp_path: Path, out_dir: Path) -> None:
    src = make_dir(tmp_path)
    (src / remove).unlink()
    with pytest.raises(ConvertError, match=message):
        convert(src, out_dir / "m.gguf")
    assert list(out_dir.iterdir()) == []


def test_interrupted_conversion_leaves_nothing(tmp_path: Path, out_dir: Path) -> None:
    calls = []

    def progress(i: int, n: int, name: str, qtype: str, shape: tuple[int, ...]) -> None:
        calls.append(name)
        if i == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(make_dir(tmp_path), out_dir / "m.gguf", progress=progress)
    assert len(calls) == 3 and list(out_dir.iterdir()) == []


def test_bad_outtype(tmp_path: Path, out_dir: Path) -> None:
    with pytest.raises(ConvertError, match="unknown outtype 'q4_k'"):
        convert(make_dir(tmp_path), out_dir / "m.gguf", "q4_k")


def test_reader_lists_tensors_lazily(tmp_path: Path) -> None:
    refs = read_tensors(make_dir(tmp_path))
    ref = refs["encoder.layer.0.output.dense.weight"]
    assert (ref.file.name, ref.shape, ref.dtype) == ("model.safetensors", (8, 16), "F32")
    np.testing.assert_array_equal(ref.load(), bert_tensors()["encoder.layer.0.output.dense.weight"])
    with pytest.raises(ConvertError, match="embeddings.position_ids has dtype I64"):
        refs["embeddings.position_ids"].load()


# --- the CLI ------------------------------------------------------------------------------


def test_cli_convert(tmp_path: Path, out_dir: Path) -> None:
    src = make_dir(tmp_path)
    result = CliRunner().invoke(
        cli, ["convert", str(src), "-o", str(out_dir / "m.gguf"), "--outtype", "f32"]
    )
    assert result.exit_code == 0, result.output
    assert "blk.0.ffn_up.weight" in result.output and "wrote" in result.output
    assert open_gguf(out_dir / "m.gguf").kv["general.file_type"] == 0


def test_cli_convert_error_is_one_line(tmp_path: Path, out_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["convert", str(tmp_path), "-o", str(out_dir / "m.gguf")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path}: no config.json (not a Hugging Face model directory)"
    ]
    assert list(out_dir.iterdir()) == []
