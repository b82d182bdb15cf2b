"""Gemma 3 in llama.cpp's two-file layout: `herd convert --mmproj` writes the text GGUF and
a projector GGUF (clip), herd runs them (`from_gguf_with_projector`) as it runs the single
file, and llama.cpp's own multimodal library (libmtmd, through llama-cpp-python) runs
herd's two files to the same image embeddings and logits.

The tiny random Gemma3ForConditionalGeneration is test_gemma3_vision.py's (a local and a
global layer, 16 soft tokens pooled 2x2 from 8x8 patches, its own image mean and std).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")
pytest.importorskip("skimage")

from herd.convert import convert  # noqa: E402
from herd.errors import ConvertError, WeightError  # noqa: E402
from herd.gguf import open_gguf  # noqa: E402
from herd.gguf.writer import write_gguf  # noqa: E402
from herd.ml import DType, available_backends, open_backend  # noqa: E402
from herd.models import Vision, load_model  # noqa: E402
from herd.models.base import Projector  # noqa: E402
from herd.models.gemma3.mmproj import clip_name  # noqa: E402
from herd.tokenizer import from_gguf  # noqa: E402

from .test_gemma3_vision import (  # noqa: E402
    BOI,
    EOI,
    IMAGE,
    IMAGE_SIZE,
    MEAN,
    PATCH,
    STD,
    TOKENS,
    Herd,
    _batch,
    _build,
    _prompt,
    rel_err,
)

ROOT = Path(__file__).resolve().parents[2]
# herd's single-file keys that a text GGUF must not carry (llama.cpp's text file has none)
VISION_KEYS = ("gemma3.vision.", "gemma3.mm.", "gemma3.image_token_id", "gemma3.boi_token_id")
VISION_KEYS += ("gemma3.eoi_token_id",)
# herd-ggml against llama.cpp: test_convert.py's bound for llama.cpp's logits on herd's
# files, and the real-model tests' ggml bound on |Δ log p| of llama.cpp's top token
LLAMA_CPP_TOL = 1e-2
MAX_DLOGP = 0.02


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Any]:
    """The tiny model converted both ways (F32): one file, and text + projector."""
    tmp = tmp_path_factory.mktemp("gemma3-mmproj")
    model, ids = _build(tmp / "hf")
    single = convert(tmp / "hf", tmp / "single.gguf", "f32")
    text = convert(tmp / "hf", tmp / "text.gguf", "f32", mmproj=tmp / "proj.gguf")
    return {
        "model": model,
        "ids": ids,
        "src": tmp / "hf",
        "single": single,
        "text": text,
        "proj": tmp / "proj.gguf",
    }


def _raw(path: Path) -> dict[str, tuple[tuple[int, ...], str, bytes]]:
    """name -> (shape, tensor type, bytes) of every tensor of a GGUF."""
    g = open_gguf(path)
    return {n: (t.shape, t.type.name, g.raw(n).tobytes()) for n, t in g.tensors.items()}


class TwoFiles(Herd):
    """Herd's test driver on the text file with its projector (each its own backend: the
    runner encodes images on the projector's)."""

    def __init__(self, text: Path, proj: Path, backend: str, cache: DType = DType.F32) -> None:
        g, p = open_gguf(text), open_gguf(proj)
        self.backend = open_backend(backend, g)
        self.projector = Projector(p.config(), open_backend(backend, p))
        self.model = load_model(g.config(), self.backend, projector=self.projector)
        self.model.cache.init(self.backend, cache, 1, 128, 256)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        with self.projector.backend.new_context() as ctx:
            (out,) = ctx.compute(self.model.encode(ctx, pixels))
        return out


def test_text_file_is_the_single_files_text_part(files) -> None:
    single, text = open_gguf(files["single"]), open_gguf(files["text"])
    assert text.kv == {k: v for k, v in single.kv.items() if not k.startswith(VISION_KEYS)}
    ours, theirs = _raw(files["text"]), _raw(files["single"])
    assert set(ours) == {n for n in theirs if not n.startswith(("v.", "mm."))}
    for name, tensor in ours.items():
        assert tensor == theirs[name], name


def test_projector_file_is_llama_cpps_clip_layout(files) -> None:
    kv = open_gguf(files["proj"]).kv
    assert kv["general.architecture"] == "clip" and kv["general.type"] == "mmproj"
    assert not any(k.startswith(("tokenizer.", "gemma3.")) for k in kv)
    expected = {
        "clip.projector_type": "gemma3",
        "clip.has_vision_encoder": True,
        "clip.use_gelu": True,
        "clip.vision.projection_dim": 64,
        "clip.vision.image_size": IMAGE_SIZE,
        "clip.vision.patch_size": PATCH,
        "clip.vision.embedding_length": 32,
        "clip.vision.feed_forward_length": 48,
        "clip.vision.block_count": 2,
        "clip.vision.attention.head_count": 2,
        "clip.vision.projector.scale_factor": 2,  # 8x8 patches -> 4x4 soft tokens
    }
    assert {k: kv[k] for k in expected} == expected
    assert kv["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    assert np.allclose(kv["clip.vision.image_mean"], MEAN)
    assert np.allclose(kv["clip.vision.image_std"], STD)
    ours, theirs = _raw(files["proj"]), _raw(files["single"])
    names = {
        "v.patch_embd.weight",
        "v.patch_embd.bias",
        "v.position_embd.weight",
        "v.post_ln.weight",
        "v.post_ln.bias",
        "mm.input_projection.weight",
        "mm.soft_emb_norm.weight",
    }
    for i in range(2):
        for stem in ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up"):
            names |= {f"v.blk.{i}.{stem}.weight", f"v.blk.{i}.{stem}.bias"}
        names |= {f"v.blk.{i}.ffn_down.weight", f"v.blk.{i}.ffn_down.bias"}
    assert set(ours) == names
    # the same arrays as the single file's v.* / mm.* (the projection (vision, text), the
    # soft-embedding norm with its 1 + w), under llama.cpp's names
    for name, tensor in theirs.items():
        if name.startswith(("v.", "mm.")):
            assert ours[clip_name(name)] == tensor, name
    assert ours["mm.input_projection.weight"][0] == (32, 64)


def test_f16_keeps_llama_cpps_types(files, tmp_path) -> None:
    convert(files["src"], tmp_path / "t.gguf", "f16", mmproj=tmp_path / "p.gguf")
    types = {n: t.type.name for n, t in open_gguf(tmp_path / "p.gguf").tensors.items()}
    assert types["v.patch_embd.weight"] == types["v.position_embd.weight"] == "F32"
    assert types["mm.input_projection.weight"] == types["v.blk.0.attn_q.weight"] == "F16"
    assert types["v.blk.0.ln1.weight"] == types["mm.soft_emb_norm.weight"] == "F32"


def test_cli_writes_both_files(files, tmp_path) -> None:
    from click.testing import CliRunner

    from herd.cli.main import cli

    args = ["convert", str(files["src"]), "-o", str(tmp_path / "t.gguf"), "--outtype", "f32"]
    result = CliRunner().invoke(cli, [*args, "--mmproj", str(tmp_path / "p.gguf"), "-q"])
    assert result.exit_code == 0, result.output
    assert open_gguf(tmp_path / "p.gguf").kv["general.architecture"] == "clip"
    assert _raw(tmp_path / "t.gguf").keys() == _raw(files["text"]).keys()


def test_mmproj_refused_without_a_vision_tower(files, tmp_path) -> None:
    import json

    src = shutil.copytree(files["src"], tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["vision_config"]
    (src / "config.json").write_text(json.dumps({**cfg, **cfg.pop("text_config")}))
    with pytest.raises(ConvertError, match="no vision encoder to write a projector file for"):
        convert(src, tmp_path / "t.gguf", "f32", mmproj=tmp_path / "p.gguf")
    assert not (tmp_path / "t.gguf").exists() and not (tmp_path / "p.gguf").exists()


def test_vision_from_the_projector(files) -> None:
    herd = TwoFiles(files["text"], files["proj"], "numpy")
    model, ids = herd.model, files["ids"]
    assert isinstance(model, Vision) and model.vision is not None
    # the text file has no image keys: the placeholder comes from its vocabulary
    assert model.image_token == ids[IMAGE]
    assert model.image_text == (f"\n\n{BOI}", f"{EOI}\n\n")
    assert model.image_tokens(np.zeros((3, IMAGE_SIZE, IMAGE_SIZE), np.float32)) == TOKENS
    assert all(c.bidirectional for c in model.cache.caches)
    assert model.vcfg.mean == pytest.approx(MEAN) and model.vcfg.std == pytest.approx(STD)
    # the text file alone: a text model
    g = open_gguf(files["text"])
    alone = load_model(g.config(), open_backend("numpy", g))
    assert alone.vision is None and not isinstance(alone, Vision)


@pytest.fixture(scope="module")
def photos() -> list[Any]:
    from PIL import Image
    from skimage import data

    return [Image.fromarray(data.astronaut()), Image.fromarray(data.chelsea())]


@pytest.mark.parametrize("backend", available_backends())
def test_two_files_give_the_single_files_logits(files, photos, backend) -> None:
    """Text + projector and the single file: the same image features and logits for a
    two-image prompt (the same arrays, the same graph: bit for bit on NumPy)."""
    single, two = Herd(files["single"], backend), TwoFiles(files["text"], files["proj"], backend)
    tokens, rows = _prompt(single, files["single"], files["ids"])
    assert _prompt(two, files["text"], files["ids"]) == (tokens, rows)
    pixels = [single.model.preprocess(p) for p in photos]
    np.testing.assert_array_equal(np.stack([two.model.preprocess(p) for p in photos]), pixels)
    ours = [two.encode(p) for p in pixels]
    ref = [single.encode(p) for p in pixels]
    logits = two.forward(_batch(tokens, rows, ours))
    expected = single.forward(_batch(tokens, rows, ref))
    if backend == "numpy":
        np.testing.assert_array_equal(np.stack(ours), np.stack(ref))
        np.testing.assert_array_equal(logits, expected)
    else:
        assert rel_err(np.stack(ours), np.stack(ref)) < 1e-6
        assert rel_err(logits, expected) < 1e-6


def _rewrite(src: Path, dest: Path, kv: dict[str, Any], tensors: dict[str, np.ndarray]) -> Path:
    """The projector `src` with some metadata and tensors replaced."""
    g = open_gguf(src)
    arrays = {n: (g.raw(n).reshape(*t.shape[:-1], -1), t.type) for n, t in g.tensors.items()}
    arrays |= {n: (a, None) for n, a in tensors.items()}
    return write_gguf(dest, "clip", {**g.kv, **kv}, [(n, *a) for n, a in arrays.items()])


def _load(files: dict[str, Any], proj: Path) -> Any:
    g, p = open_gguf(files["text"]), open_gguf(proj)
    projector = Projector(p.config(), open_backend("numpy", p))
    return load_model(g.config(), open_backend("numpy", g), projector=projector)


def test_a_projector_of_another_width_is_refused(files, tmp_path) -> None:
    rng = np.random.default_rng(0)
    narrow = rng.standard_normal((32, 48)).astype(np.float32)
    proj = _rewrite(
        files["proj"],
        tmp_path / "p.gguf",
        {"clip.vision.projection_dim": 48},
        {"mm.input_projection.weight": narrow},
    )
    with pytest.raises(WeightError, match=r"it projects to 48 but the text model's embedding"):
        _load(files, proj)


def test_a_projector_of_another_type_is_refused(files, tmp_path) -> None:
    proj = _rewrite(files["proj"], tmp_path / "p.gguf", {"clip.projector_type": "mlp"}, {})
    with pytest.raises(WeightError, match=r"it is a 'mlp' projector, gemma3 takes 'gemma3'"):
        _load(files, proj)


def test_a_single_file_takes_no_projector(files) -> None:
    g, p = open_gguf(files["single"]), open_gguf(files["proj"])
    projector = Projector(p.config(), open_backend("numpy", p))
    with pytest.raises(WeightError, match="holds its own vision encoder"):
        load_model(g.config(), open_backend("numpy", g), projector=projector)


# ---- llama.cpp --------------------------------------------------------------------------


def _llama_cpp(files: dict[str, Any], prompt: str, image: np.ndarray, tmp: Path) -> Any:
    """scripts/llama_cpp_mtmd.py on herd's two files (a process of its own: llama.cpp's
    ggml never shares one with herd's)."""
    np.save(tmp / "image.npy", image)
    script = ROOT / "scripts" / "llama_cpp_mtmd.py"
    args = [str(files["text"]), str(files["proj"]), prompt, str(tmp / "image.npy")]
    run = subprocess.run(
        [sys.executable, str(script), *args, str(tmp / "out.npz")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return np.load(tmp / "out.npz")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max()
    return x - np.log(np.exp(x).sum())


# llama.cpp writes <start_of_image> and <end_of_image> around its marker; herd's image_text
# has the blank lines of transformers' processor too: the prompt holds them
MTMD_PROMPT = "Describe this photo\n\n<__media__>\n\nin detail"
MTMD_GOLDEN = ROOT / "tests" / "testdata" / "convert" / "gemma3_mtmd.json"


def _mtmd(files: dict[str, Any], photos: list[Any], tmp: Path) -> tuple[Any, np.ndarray]:
    """llama.cpp's tokens, image embeddings and last logits, and the image it was given:
    live where llama-cpp-python (with libmtmd) is installed, else the golden that
    scripts/make_mtmd_goldens.py wrote with it, for this same model (its tensors' sha256
    are checked) and image."""
    try:
        import llama_cpp.mtmd_cpp  # noqa: F401
    except ImportError:
        golden = json.loads(MTMD_GOLDEN.read_text())
        made = {
            f"{path.stem}:{n}": hashlib.sha256(open_gguf(path).raw(n).tobytes()).hexdigest()
            for path in (files["text"], files["proj"])
            for n in open_gguf(path).tensors
        }
        assert golden["prompt"] == MTMD_PROMPT
        assert made == golden["sha256"], "the tiny model changed: scripts/make_mtmd_goldens.py"
        ref = {k: np.asarray(golden[k], np.float32) for k in ("tokens", "image", "logits")}
        return ref, np.asarray(golden["pixels"], np.uint8)
    image = np.asarray(photos[0].resize((IMAGE_SIZE, IMAGE_SIZE)))  # (S, S, 3) uint8
    return _llama_cpp(files, MTMD_PROMPT, image, tmp), image


@pytest.mark.skipif("ggml" not in available_backends(), reason="ggml-python not installed")
def test_llama_cpp_runs_herds_two_files_as_herd_does(files, photos, tmp_path) -> None:
    """libmtmd on herd's text + projector, one photo given as raw RGB already at the
    model's image size (neither side resizes): its image embeddings and the last prompt
    token's logits equal herd-ggml's on the same token sequence."""
    ref, image = _mtmd(files, photos, tmp_path)
    herd = TwoFiles(files["text"], files["proj"], "ggml", DType.F16)  # llama.cpp's cache
    tok = from_gguf(open_gguf(files["text"]))
    before, after = (
        tok.encode(t, add_special=False, parse_special=True) for t in herd.model.image_text
    )
    tokens = tok.encode("Describe this photo", add_special=True, parse_special=False) + before
    row = len(tokens)
    tokens += [herd.model.image_token] * TOKENS + after
    tokens += tok.encode("in detail", add_special=False, parse_special=False)
    theirs = [herd.model.image_token if t == -1 else int(t) for t in ref["tokens"]]
    print("herd     ", tokens)
    print("llama.cpp", theirs)
    assert tokens == theirs

    from PIL import Image

    embedding = herd.encode(herd.model.preprocess(Image.fromarray(image)))
    assert embedding.shape == ref["image"].shape == (TOKENS, 64)
    image_err = rel_err(embedding, ref["image"])
    logits = herd.forward(_batch(tokens, [row], [embedding]))[-1]
    logits_err = rel_err(logits, ref["logits"])
    top = int(ref["logits"].argmax())
    dlogp = abs(_log_softmax(logits)[top] - _log_softmax(ref["logits"])[top])
    print(f"image rel err {image_err:.2e}, logits rel err {logits_err:.2e}, dlogp {dlogp:.2e}")
    assert image_err < LLAMA_CPP_TOL
    assert logits_err < LLAMA_CPP_TOL
    assert int(logits.argmax()) == top and dlogp < MAX_DLOGP
