"""`herd export onnx`: the exported decode step, run by a loop written here with plain
onnxruntime and NumPy (no herd), greedy-decodes herd's own tokens; bad input is a clear
error and leaves no folder behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from herd.cli.export import export_onnx  # noqa: E402
from herd.cli.main import cli  # noqa: E402
from herd.errors import ModelNotFoundError, UnsupportedModelError  # noqa: E402
from herd.gguf import open_gguf  # noqa: E402
from herd.ml import BackendOptions, open_backend  # noqa: E402
from herd.models import load_model  # noqa: E402
from herd.options import Options  # noqa: E402
from herd.runner import Runner  # noqa: E402

PROMPT = [1, 5, 9, 13, 17, 21]
STEPS = 8

# A consumer that knows only onnxruntime, NumPy and io.json: the prompt fed token by
# token, then greedy tokens; the written cache rows stored back after each run.
LOOP = r"""
import json, sys
import numpy as np
import onnxruntime as ort

folder, prompt, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
io = json.load(open(f"{folder}/io.json"))
sess = ort.InferenceSession(f"{folder}/{io['model']}", providers=["CPUExecutionProvider"])
cells = io["context"]
np_type = {"float32": np.float32, "float16": np.float16, "int32": np.int32}
past = {i["name"]: np.zeros(i["shape"], np_type[i["dtype"]])
        for i in io["inputs"] if i["name"].startswith("past_")}
masks = {c["mask"]: c for c in io["caches"]}
outs = [o["name"] for o in io["outputs"]]
tokens, generated = list(prompt), []
for t in range(len(prompt) + steps - 1):
    feed = dict(past)
    feed["token_ids"] = np.array([tokens[t]], np.int32)
    feed["positions"] = np.array([t], np.int32)
    feed["output_rows"] = np.array([0], np.int32)
    for c in io["caches"]:
        feed[c["write_cell"]] = np.array([t], np.int32)
        cell = np.arange(cells)
        seen = cell <= t
        if c["window"]:
            seen &= t - cell < c["window"]
        feed[c["mask"]] = np.where(seen, 0, -np.inf).astype(np.float32)[None, :]
    got = dict(zip(outs, sess.run(outs, feed)))
    for o in io["outputs"]:
        if "store_into" in o:
            past[o["store_into"]][t] = got[o["name"]][0]
    if t >= len(prompt) - 1:
        nxt = int(np.argmax(got["logits"][0]))
        generated.append(nxt)
        tokens.append(nxt)
print(json.dumps(generated))
"""


class Letters:
    def piece(self, id: int, special: bool = False) -> bytes:
        return bytes([97 + id % 26])

    def is_eog(self, id: int) -> bool:
        return False


def _herd_greedy(
    path: Path, backend_name: str, num_batch: int = 512, options: BackendOptions | None = None
) -> list[int]:
    g = open_gguf(path)
    backend = open_backend(backend_name, g, options)
    model = load_model(g.config(), backend)
    options = Options(num_ctx=256, num_batch=num_batch)
    runner = Runner(model, backend, Letters(), options, model.context_length)
    events = list(runner.generate(PROMPT, Options(temperature=0, num_predict=STEPS)))
    return list(events[-1].tokens)


def _plain_onnxruntime(folder: Path) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", LOOP, str(folder), json.dumps(PROMPT), str(STEPS)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_exported_step_decodes_herds_tokens(tiny_llama_path: Path, tmp_path: Path) -> None:
    """The tiny Llama exported with a 256-cell cache: a loop with no herd import gets the
    greedy tokens herd's ONNX backend and its NumPy oracle get."""
    out = tmp_path / "export"
    result = CliRunner().invoke(
        cli, ["export", "onnx", str(tiny_llama_path), "-o", str(out), "--num-ctx", "256"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["io.json", "model.onnx", "model.onnx.data"]
    io = json.loads((out / "io.json").read_text())
    names = {i["name"]: i for i in io["inputs"]}
    assert names["past_key.0"]["shape"] == [256, 2, 8] and names["past_key.0"]["dtype"] == "float16"
    assert {o["name"] for o in io["outputs"]} == {"logits"} | {
        f"present_{k}.{i}" for k in ("key", "value") for i in range(2)
    }
    want = _herd_greedy(tiny_llama_path, "numpy")
    assert _herd_greedy(tiny_llama_path, "onnx") == want
    assert _plain_onnxruntime(out) == want


def test_smollm2_exported_decodes_herds_tokens(smollm2_path: Path, tmp_path: Path) -> None:
    """SmolLM2 (Q4_1 and Q8_0 kept in their blocks): the exported step's greedy tokens
    are herd's ONNX backend's fed the prompt as the loop feeds it, a token a pass (a
    6-token pass rounds differently and tips a near tie at the 6th token), with the
    cache as the export keeps it (cells first, F16: an F32 cache tips that tie too)."""
    out = tmp_path / "smollm2"
    export_onnx(str(smollm2_path), out, num_ctx=256)
    cells_first = BackendOptions(onnx_kv_in_place=False)
    assert _plain_onnxruntime(out) == _herd_greedy(smollm2_path, "onnx", 1, cells_first)


def test_gemma3_exported_decodes_herds_tokens(gemma3_path: Path, tmp_path: Path) -> None:
    """Gemma 3 (Q4_K, Q5_0, Q6_K and Q8_0, all kept in their blocks; sliding-window layers):
    the same as SmolLM2's. Its weights go into model.onnx.data as blocks, its tied
    embedding table once for the gather and the head: float32 Q5_0 or Q6_K layers or a
    second copy of the table (462 MB) would make the file larger than the GGUF's 4/3."""
    out = tmp_path / "gemma3"
    export_onnx(str(gemma3_path), out, num_ctx=256)
    assert (out / "model.onnx.data").stat().st_size < gemma3_path.stat().st_size * 4 / 3
    cells_first = BackendOptions(onnx_kv_in_place=False)
    assert _plain_onnxruntime(out) == _herd_greedy(gemma3_path, "onnx", 1, cells_first)


def test_unknown_model_name(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        export_onnx("no-such-model:7b", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    result = CliRunner().invoke(cli, ["export", "onnx", "no-such-model:7b", "-o", "x"])
    assert result.exit_code == 1 and result.output.startswith("Error: ")


def test_a_folder_that_is_not_empty_needs_force(tiny_llama_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(cli, ["export", "onnx", str(tiny_llama_path), "-o", str(out)])
    assert result.exit_code == 1 and "not empty" in result.output and "--force" in result.output
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    export_onnx(str(tiny_llama_path), out, num_ctx=256, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["io.json", "model.onnx", "model.onnx.data"]


def test_an_op_the_exporter_cannot_express(
    tiny_llama_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache written at cells the graph computes (here: the write cell plus zero, made
    in the graph): the caller could not know where to store the rows. A clear error, and
    no folder, not even a partial one."""
    from herd.kvcache import Causal

    put = Causal.put

    def computed_cells(self: Causal, k: object, v: object) -> None:
        self.locs = self.locs.add(self.locs.scale(0.0)).cast(self.locs.dtype)
        put(self, k, v)

    monkeypatch.setattr(Causal, "put", computed_cells)
    with pytest.raises(UnsupportedModelError, match="cells the graph computes"):
        export_onnx(str(tiny_llama_path), tmp_path / "out", num_ctx=256)
    assert list(tmp_path.iterdir()) == []


def test_an_embedding_model_has_no_step(tmp_path: Path) -> None:
    """A BERT-style encoder (no KV cache) is refused before anything is written."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from parity.harness import hf_to_gguf

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64)  # fmt: skip
    path = hf_to_gguf(transformers.BertModel(cfg).eval(), "bert", tmp_path / "bert.gguf")
    with pytest.raises(UnsupportedModelError, match="no decode step"):
        export_onnx(str(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_io_json_names_every_graph_input(tiny_llama_path: Path, tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "e"
    export_onnx(str(tiny_llama_path), out, num_ctx=256)
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    io = json.loads((out / "io.json").read_text())
    assert [i.name for i in m.graph.input] == [i["name"] for i in io["inputs"]]
    assert all(i.get("role") for i in io["inputs"] + io["outputs"])
    weights = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert weights and all(t.external_data[0].value == "model.onnx.data" for t in weights)
    assert np.isfinite(io["context"]) and io["context"] == 256
