"""Gemma 3 with images: a tiny random `Gemma3ForConditionalGeneration`, converted by
`herd convert` into one GGUF (Ollama's layout), run by herd against transformers.

The quirks switched on: a text config with logit soft-capping (which transformers'
Gemma3ForConditionalGeneration, unlike its CausalLM, never applies), a local
(sliding-window 8) and a global layer, 16 soft tokens per image pooled from an 8x8 patch
grid (a 2x2 window), two images in one prompt (their placeholder spans longer than the
window: the window still applies to the earlier image tokens, not the later ones), a
projector norm with `1 + w`, SigLIP LayerNorms without, a token table padded past the
image tokens, and a preprocessor with its own mean and std (read back from the GGUF).
The pixels are real photographs (scikit-image's), through herd's preprocessing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")
pytest.importorskip("skimage")

from herd.convert import convert  # noqa: E402
from herd.gguf import Config, open_gguf  # noqa: E402
from herd.ml import BackendOptions, DType, available_backends, open_backend  # noqa: E402
from herd.models import Batch, BatchImage, Vision, batch_inputs, load_model  # noqa: E402
from herd.tokenizer import from_gguf  # noqa: E402

from .tiny import randomize, write_tokenizer  # noqa: E402

TOL = 1e-4  # every backend; ggml with its exact GELU and F32 attention in the encoder
EXTRA = {"ggml": {"exact_gelu": True, "exact_attention": True}}
# ggml's default tanh GELU reads an F16 table and its encoder attends with F16 K/V, as
# llama.cpp's: the text models' bound
TABLE_GELU_TOL = 3e-3

IMAGE_SIZE, PATCH, TOKENS = 56, 7, 16  # 8x8 patches pooled 2x2 into 4x4 soft tokens
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
BOI, EOI, IMAGE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"


def _add_image_tokens(dest: Path, n_pieces: int) -> dict[str, int]:
    """Gemma's image tokens after the SentencePiece pieces, as added special tokens."""
    ids = {BOI: n_pieces, EOI: n_pieces + 1, IMAGE: n_pieces + 2}
    path = dest / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for text, i in ids.items():
        config["added_tokens_decoder"][str(i)] = {"content": text, "special": True}
    path.write_text(json.dumps(config, indent=1))
    return ids


def _build(dest: Path) -> tuple[Any, dict[str, int]]:
    import transformers

    dest.mkdir(parents=True)
    ids = _add_image_tokens(dest, write_tokenizer("spm-gemma", dest))
    text = transformers.Gemma3TextConfig(
        vocab_size=ids[IMAGE] + 5,  # a few padding rows, as the real 262208
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=30.0,
        max_position_embeddings=256,
    )
    vision = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        vision_use_head=False,
    )
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=TOKENS,
        boi_token_index=ids[BOI],
        eoi_token_index=ids[EOI],
        image_token_index=ids[IMAGE],
    )
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    randomize(model, 15)
    model.save_pretrained(dest)
    transformers.Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=MEAN, image_std=STD
    ).save_pretrained(dest)
    return model, ids


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Any, dict[str, int], Path, Path]:
    """(transformers model, image token ids, HF directory, converted F32 GGUF)."""
    tmp = tmp_path_factory.mktemp("gemma3-vision")
    model, ids = _build(tmp / "hf")
    return model, ids, tmp / "hf", convert(tmp / "hf", tmp / "model.gguf", "f32")


@pytest.fixture(scope="module")
def photos() -> list[Any]:
    from PIL import Image
    from skimage import data

    return [Image.fromarray(data.astronaut()), Image.fromarray(data.chelsea())]


@pytest.fixture(params=available_backends())
def backend(request) -> str:
    return request.param


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


class Herd:
    """The converted model on one backend, driven as the runner drives it."""

    def __init__(
        self, path: Path, backend: str, extra: dict | None = None, sequences: int = 1
    ) -> None:
        gguf = open_gguf(path)
        self.backend = open_backend(backend, gguf, BackendOptions(**(extra or {})))
        self.model = load_model(gguf.config(), self.backend)
        self.model.cache.init(self.backend, DType.F32, sequences, 128, 256)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        with self.backend.new_context() as ctx:
            (out,) = ctx.compute(self.model.encode(ctx, pixels))
        return out

    def forward(self, batch: Batch) -> np.ndarray:
        with self.backend.new_context() as ctx:
            self.model.cache.start_forward(ctx, batch)
            (out,) = ctx.compute(self.model.forward(ctx, batch_inputs(ctx, batch)))
        return out


def _pixels(photos: list[Any], herd: Herd) -> np.ndarray:
    """(2, 3, S, S): herd's preprocessing of the photos, with the GGUF's size, mean and
    std (test_preprocess_uses_the_files_size_mean_and_std compares it with transformers')."""
    return np.stack([herd.model.preprocess(p) for p in photos])


def _prompt(herd: Herd, path: Path, ids: dict[str, int]) -> tuple[list[int], list[int]]:
    """Token ids of text, then each of two images' spans as the runner makes them (the
    model's image_text around the placeholders), then text; and the first row of each
    image's placeholders."""
    tok = from_gguf(open_gguf(path))
    before, after = (
        tok.encode(t, add_special=False, parse_special=True) for t in herd.model.image_text
    )
    assert before[-1] == ids[BOI] and after[0] == ids[EOI]
    tokens = tok.encode("Describe these two photos", add_special=True, parse_special=False)
    rows = []
    for i in range(2):
        tokens += before
        rows.append(len(tokens))
        tokens += [ids[IMAGE]] * TOKENS + after
        tokens += tok.encode(["and compare", "with this one"][i], add_special=False)
    return tokens, rows


def _hf_logits(model: Any, tokens: list[int], pixels: np.ndarray, image_id: int) -> np.ndarray:
    import torch

    ids = torch.tensor([tokens])
    with torch.no_grad():
        out = model(
            input_ids=ids,
            pixel_values=torch.from_numpy(pixels),
            token_type_ids=(ids == image_id).long(),
        )
    return out.logits[0].float().numpy()


def _batch(tokens: list[int], rows: list[int], embeddings: list[np.ndarray]) -> Batch:
    batch = Batch.single(tokens, outputs="all")
    batch.images = [BatchImage(r, TOKENS, e) for r, e in zip(rows, embeddings, strict=True)]
    return batch


def test_metadata_and_tensors_are_ollamas(converted) -> None:
    model, ids, _, path = converted
    g = open_gguf(path)
    kv = g.kv
    assert kv["general.architecture"] == "gemma3"
    assert kv["gemma3.vision.block_count"] == 2
    assert kv["gemma3.vision.embedding_length"] == 32
    assert kv["gemma3.vision.feed_forward_length"] == 48
    assert kv["gemma3.vision.attention.head_count"] == 2
    assert kv["gemma3.vision.image_size"] == IMAGE_SIZE
    assert kv["gemma3.vision.patch_size"] == PATCH
    assert kv["gemma3.vision.num_channels"] == 3
    assert kv["gemma3.mm.tokens_per_image"] == TOKENS
    assert np.allclose(kv["gemma3.vision.image_mean"], MEAN)
    assert np.allclose(kv["gemma3.vision.image_std"], STD)
    assert (kv["gemma3.image_token_id"], kv["gemma3.boi_token_id"]) == (ids[IMAGE], ids[BOI])
    assert kv["gemma3.eoi_token_id"] == ids[EOI]
    assert kv["gemma3.attention.sliding_window_pattern"] == [True, False]
    # transformers' Gemma3ForConditionalGeneration ignores the text config's soft-capping
    assert "gemma3.final_logit_softcapping" not in kv
    tokens = kv["tokenizer.ggml.tokens"]
    assert len(tokens) == model.config.text_config.vocab_size  # the text model's, padded
    assert [tokens[ids[t]] for t in (BOI, EOI, IMAGE)] == [BOI, EOI, IMAGE]
    names = set(g.tensors)
    for name in (
        "v.patch_embedding.weight",
        "v.patch_embedding.bias",
        "v.position_embedding.weight",
        "v.blk.1.attn_q.bias",
        "v.blk.1.attn_output.weight",
        "v.blk.1.layer_norm2.bias",
        "v.blk.1.mlp.fc2.weight",
        "v.post_layernorm.weight",
        "mm.mm_input_projection.weight",
        "mm.mm_soft_emb_norm.weight",
        "blk.1.ffn_down.weight",
    ):
        assert name in names, name
    backend = open_backend("numpy", g)

    def w(name: str) -> np.ndarray:
        return backend.weight(name).a  # type: ignore[attr-defined]

    mm = model.model.multi_modal_projector
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    # the projector's Gemma3RMSNorm folds 1 + w; SigLIP's LayerNorms stay as they are
    np.testing.assert_array_equal(
        w("mm.mm_soft_emb_norm.weight"),
        sd["model.multi_modal_projector.mm_soft_emb_norm.weight"] + 1,
    )
    np.testing.assert_array_equal(
        w("v.post_layernorm.weight"), sd["model.vision_tower.post_layernorm.weight"]
    )
    np.testing.assert_array_equal(
        w("mm.mm_input_projection.weight"), mm.mm_input_projection_weight.detach().numpy()
    )


def test_vision_protocol_only_with_the_vision_tower(converted) -> None:
    _, ids, _, path = converted
    g = open_gguf(path)
    model = load_model(g.config(), open_backend("numpy", g))
    assert isinstance(model, Vision) and model.vision is not None
    assert model.image_token == ids[IMAGE]
    assert model.image_text == ("\n\n<start_of_image>", "<end_of_image>\n\n")
    assert model.image_tokens(np.zeros((3, IMAGE_SIZE, IMAGE_SIZE), np.float32)) == TOKENS
    assert all(c.bidirectional for c in model.cache.caches)
    # the same file read as text-only (no vision keys): no Vision, plain causal caches
    text_kv = {k: v for k, v in g.kv.items() if not k.startswith("gemma3.vision.")}
    text = load_model(Config(text_kv, "gemma3"), open_backend("numpy", g))
    assert text.vision is None and not isinstance(text, Vision)
    assert not any(c.bidirectional for c in text.cache.caches)


def test_preprocess_uses_the_files_size_mean_and_std(converted, photos) -> None:
    import transformers

    _, _, src, path = converted
    herd = Herd(path, "numpy")
    ref = transformers.Gemma3ImageProcessorPil.from_pretrained(src)(
        images=photos, return_tensors="np"
    )["pixel_values"]
    ours = np.stack([herd.model.preprocess(p) for p in photos])
    assert ours.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_encode_matches_transformers(converted, photos, backend) -> None:
    import torch

    model, _, _, path = converted
    herd = Herd(path, backend, EXTRA.get(backend))
    pixels = _pixels(photos, herd)
    with torch.no_grad():
        ref = model.get_image_features(torch.from_numpy(pixels)).pooler_output.numpy()
    assert ref.shape == (2, TOKENS, 64)
    for i in range(2):
        ours = herd.encode(pixels[i])
        assert ours.shape == (TOKENS, 64)
        assert rel_err(ours, ref[i]) < TOL, (backend, i)


def test_prompt_with_two_images_matches_transformers(converted, photos, backend) -> None:
    model, ids, _, path = converted
    herd = Herd(path, backend, EXTRA.get(backend))
    pixels = _pixels(photos, herd)
    tokens, rows = _prompt(herd, path, ids)
    ref = _hf_logits(model, tokens, pixels, ids[IMAGE])
    ours = herd.forward(_batch(tokens, rows, [herd.encode(p) for p in pixels]))
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < TOL, backend
    # the image tokens see each other: with a causal mask only, the logits differ
    causal = _hf_logits_causal(model, tokens, pixels)
    assert rel_err(causal, ref) > 100 * TOL


def _hf_logits_causal(model: Any, tokens: list[int], pixels: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), pixel_values=torch.from_numpy(pixels))
    return out.logits[0].float().numpy()


def test_cached_decode_after_images_equals_recompute(converted, photos, backend) -> None:
    """The prompt with its images in one batch, then text token by token from the cache,
    equals the whole sequence in one pass (and transformers' logits)."""
    model, ids, _, path = converted
    extra = EXTRA.get(backend)
    herd = Herd(path, backend, extra)
    pixels = _pixels(photos, herd)
    embeddings = [herd.encode(p) for p in pixels]
    tokens, rows = _prompt(herd, path, ids)
    more = [5, 77, 301, 42]
    full = herd.forward(_batch(tokens + more, rows, embeddings))
    step = Herd(path, backend, extra)
    prompt = Batch.single(tokens)
    prompt.images = _batch(tokens, rows, embeddings).images
    out = [step.forward(prompt)[0]]
    for i, t in enumerate(more):
        out.append(step.forward(Batch.single([t], len(tokens) + i))[0])
    assert rel_err(np.stack(out), full[len(tokens) - 1 :]) < TOL
    ref = _hf_logits(model, tokens + more, pixels, ids[IMAGE])
    assert rel_err(full, ref) < TOL


def test_batch_of_two_conversations_equals_two_singles(converted, photos, backend) -> None:
    """Two sequences in one batch, each with its own image (their spans at different rows
    and positions), give each sequence's logits alone."""
    model, ids, _, path = converted
    extra = EXTRA.get(backend)
    herd = Herd(path, backend, extra, sequences=2)
    embeddings = [herd.encode(p) for p in _pixels(photos, herd)]
    tokens, rows = _prompt(herd, path, ids)
    a, rows_a = tokens[: rows[1] - 3], rows[:1]  # the first image only
    start = rows[0] + TOKENS  # after the first image: the second, at other positions
    b, rows_b = tokens[start:], [rows[1] - start]
    alone = [
        Herd(path, backend, extra).forward(_batch(t, r, [e]))
        for t, r, e in ((a, rows_a, embeddings[0]), (b, rows_b, embeddings[1]))
    ]
    both = Batch(
        np.array(a + b, np.int32),
        np.array(list(range(len(a))) + list(range(len(b))), np.int32),
        np.array([0] * len(a) + [1] * len(b), np.int32),
        np.arange(len(a) + len(b), dtype=np.int32),
        [
            BatchImage(rows_a[0], TOKENS, embeddings[0]),
            BatchImage(len(a) + rows_b[0], TOKENS, embeddings[1]),
        ],
    )
    out = herd.forward(both)
    assert rel_err(out[: len(a)], alone[0]) < TOL
    assert rel_err(out[len(a) :], alone[1]) < TOL


@pytest.mark.skipif("ggml" not in available_backends(), reason="ggml-python not installed")
def test_ggml_default_gelu_within_its_table_error(converted, photos) -> None:
    """herd's default ggml path (the table GELU, as llama.cpp runs), encoder included."""
    model, ids, _, path = converted
    herd = Herd(path, "ggml")
    pixels = _pixels(photos, herd)
    tokens, rows = _prompt(herd, path, ids)
    ours = herd.forward(_batch(tokens, rows, [herd.encode(p) for p in pixels]))
    assert rel_err(ours, _hf_logits(model, tokens, pixels, ids[IMAGE])) < TABLE_GELU_TOL


def test_text_only_batch_on_a_vision_file(converted, backend) -> None:
    """Without images the vision file is the text model: transformers' logits for ids."""
    model, ids, _, path = converted
    tok_ids = [2, 40, 41, 300, 12, 99, 7, 123, 55, 8, 300, 17]
    import torch

    with torch.no_grad():
        ref = model(input_ids=torch.tensor([tok_ids])).logits[0].numpy()
    ours = Herd(path, backend, EXTRA.get(backend)).forward(Batch.single(tok_ids, outputs="all"))
    assert rel_err(ours, ref) < TOL


# (image features, logits) bounds: the text model's Q8_0 matrices alone move this tiny
# random model's logits ~7%; the encoder and projector stay within 1%
OUTTYPE_TOL = {"f16": (0.01, 0.01), "q8_0": (0.02, 0.1)}


@pytest.mark.parametrize("outtype", list(OUTTYPE_TOL))
def test_smaller_outtypes_run_close_to_transformers(converted, photos, outtype, tmp_path) -> None:
    """F16 and Q8_0 files: the vision tower and the projector are never quantized
    (Ollama's rule for `v.*` and `mm.*`), the text model's matrices take the outtype;
    outputs stay close on every backend."""
    import torch

    model, ids, src, _ = converted
    path = convert(src, tmp_path / f"{outtype}.gguf", outtype)
    types = {n: t.type.name for n, t in open_gguf(path).tensors.items()}
    assert {types["v.blk.0.attn_q.weight"], types["v.patch_embedding.weight"]} == {"F16"}
    assert types["mm.mm_input_projection.weight"] == "F16"
    assert types["blk.0.attn_q.weight"] == outtype.upper()
    image_tol, logits_tol = OUTTYPE_TOL[outtype]
    for backend in available_backends():
        herd = Herd(path, backend, EXTRA.get(backend))
        pixels = _pixels(photos, herd)
        embeddings = [herd.encode(p) for p in pixels]
        with torch.no_grad():
            features = model.get_image_features(torch.from_numpy(pixels)).pooler_output
        assert rel_err(np.stack(embeddings), features.numpy()) < image_tol, backend
        tokens, rows = _prompt(herd, path, ids)
        ours = herd.forward(_batch(tokens, rows, embeddings))
        ref = _hf_logits(model, tokens, pixels, ids[IMAGE])
        assert rel_err(ours, ref) < logits_tol, backend


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mm_tokens_per_image": 15}, r"mm_tokens_per_image 15 does not pool a 8x8 patch grid"),
        ({"vision_config": {"hidden_act": "relu"}}, r"vision hidden_act 'relu' is not supported"),
    ],
    ids=["tokens-not-a-square", "activation"],
)
def test_refused_configs(converted, tmp_path, change, message) -> None:
    import shutil

    from herd.errors import UnsupportedModelError

    src = shutil.copytree(converted[2], tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=message):
        convert(src, tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()


def test_create_quantize_leaves_the_vision_tower_and_projector(converted) -> None:
    """`herd create --quantize` (the store's quantizer) keeps `v.*` and `mm.*` as they are,
    as Ollama's quantizer does, and quantizes the text model's matrices."""
    from herd.store.quantize import plan

    g = open_gguf(converted[3])
    types = plan(g, "Q8_0")
    vision = [n for n in g.tensors if n.startswith(("v.", "mm."))]
    assert vision and all(types[n] == g.tensors[n].type for n in vision)
    assert types["blk.0.attn_q.weight"].name == "Q8_0"
