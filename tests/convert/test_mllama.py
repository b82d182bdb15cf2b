"""mllama (Llama 3.2 Vision): a tiny random `MllamaForConditionalGeneration`, converted by
`herd convert` into one GGUF (Ollama's layout), run by herd against transformers.

The quirks switched on: four tiles at most (the eight canvases of up to 4 tiles), a real
photograph (scikit-image's) through herd's preprocessing onto a 2x1 canvas, so the
encoder runs two padding tiles; 28-pixel tiles of 7-pixel patches (17 tokens a tile,
padded to 24); intermediate features from two local layers; cross-attention layers in the
middle and last of four text layers, with GQA and Llama 3 rope scaling; gates large
enough to matter; text before the `<|image|>` token (transformers lets it attend to every
state, padding tiles included, and zeroes only the MLP half) and after it (its own tiles
only).

transformers 4.5x and 5.x take the intermediate features from the local layers' outputs,
one layer later than the release code (transformers 4.45), Meta's reference and Ollama,
which take their inputs; herd follows the release, and the reference here is put back to
it (`_release_intermediate_features`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("skimage")

from herd.convert import convert  # noqa: E402
from herd.gguf import open_gguf  # noqa: E402
from herd.ml import BackendOptions, DType, available_backends, open_backend  # noqa: E402
from herd.models import Batch, BatchImage, Vision, batch_inputs, load_model  # noqa: E402

from .tiny import randomize, write_tokenizer  # noqa: E402

TOL = 1e-4
IMAGE_SIZE, PATCH, TILES = 28, 7, 4
N_POS = (IMAGE_SIZE // PATCH) ** 2 + 1  # 17 tokens a tile
RATIOS = [[h, w] for h in range(1, TILES + 1) for w in range(1, TILES + 1) if h * w <= TILES]


def _build(dest: Path) -> Any:
    import torch
    import transformers

    dest.mkdir(parents=True)
    n_vocab = write_tokenizer("llama3-bpe", dest)
    text = dict(
        vocab_size=n_vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        cross_attention_layers=[1, 3],
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "rope_theta": 500000.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=1,
    )
    vision = dict(
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        max_num_tiles=TILES,
        hidden_size=32,
        intermediate_size=48,
        attention_heads=4,
        num_hidden_layers=3,
        num_global_layers=1,
        intermediate_layers_indices=[0, 2],
        vision_output_dim=32 * 3,
        supported_aspect_ratios=RATIOS,
    )
    config = transformers.MllamaConfig(
        text_config=text, vision_config=vision, image_token_index=n_vocab
    )
    model = transformers.MllamaForConditionalGeneration(config).eval()
    randomize(model, 32)
    rng = np.random.default_rng(33)
    with torch.no_grad():  # gates that matter (tanh of 0.5 to 1.2, either sign)
        for name, p in model.named_parameters():
            if name.endswith(("gate", "gate_attn", "gate_ffn")):
                value = rng.uniform(0.5, 1.2) * rng.choice([-1.0, 1.0])
                p.fill_(float(value))
    model.save_pretrained(dest)
    return model


def _release_intermediate_features(self: Any, hidden_states: Any, attention_mask: Any = None):
    """MllamaVisionEncoder.forward as released (transformers 4.45): hidden_states[i] is
    the input of layer i."""
    from transformers.modeling_outputs import BaseModelOutput

    states = (hidden_states,)
    for layer in self.layers:
        hidden_states = layer(hidden_states, attention_mask=attention_mask)
        states += (hidden_states,)
    return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=states)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Any, Path]:
    """(transformers model, converted F32 GGUF)."""
    from transformers.models.mllama import modeling_mllama

    tmp = tmp_path_factory.mktemp("mllama")
    model = _build(tmp / "hf")
    mp = pytest.MonkeyPatch()
    mp.setattr(modeling_mllama.MllamaVisionEncoder, "forward", _release_intermediate_features)
    yield model, convert(tmp / "hf", tmp / "model.gguf", "f32")
    mp.undo()


@pytest.fixture(scope="module")
def photo() -> Any:
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut()).crop((0, 100, 512, 356))  # 512 x 256: 1 x 2


@pytest.fixture(params=available_backends())
def backend(request) -> str:
    return request.param


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


class Herd:
    """The converted model on one backend, driven as the runner drives it."""

    def __init__(self, path: Path, backend: str, sequences: int = 1) -> None:
        gguf = open_gguf(path)
        # the encoder's attention in F32 on ggml (its default casts K/V to F16, as
        # llama.cpp's clip does: ~2e-4)
        options = BackendOptions(exact_attention=backend == "ggml")
        self.backend = open_backend(backend, gguf, options)
        self.model = load_model(gguf.config(), self.backend)
        self.model.cache.init(self.backend, DType.F32, sequences, 128, 128)

    def encode(self, pixels: Any) -> np.ndarray:
        with self.backend.new_context() as ctx:
            (out,) = ctx.compute(self.model.encode(ctx, pixels))
        return out

    def forward(self, batch: Batch) -> np.ndarray:
        with self.backend.new_context() as ctx:
            self.model.cache.start_forward(ctx, batch)
            (out,) = ctx.compute(self.model.forward(ctx, batch_inputs(ctx, batch)))
        return out


def _hf_pixels(tiles: Any) -> dict[str, Any]:
    import torch

    pixels, mask = tiles.padded(TILES)
    return {
        "pixel_values": torch.from_numpy(pixels)[None, None],
        "aspect_ratio_ids": torch.tensor([[tiles.aspect_ratio_id]]),
        "aspect_ratio_mask": torch.from_numpy(mask)[None, None],
    }


def _hf_logits(model: Any, tokens: list[int], tiles: Any | None, image: int) -> np.ndarray:
    import torch
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    kwargs: dict[str, Any] = {}
    if tiles is not None:
        mask = convert_sparse_cross_attention_mask_to_dense(
            [get_cross_attention_token_mask(tokens, image)], [[tiles.n_tiles]], TILES, len(tokens)
        )
        kwargs = {**_hf_pixels(tiles), "cross_attention_mask": torch.from_numpy(mask)}
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), **kwargs)
    return out.logits[0].float().numpy()


def _prompt(image: int, n_vocab: int) -> tuple[list[int], int]:
    """Tokens with text before and after one <|image|>, and the image token's row."""
    rng = np.random.default_rng(7)
    before = [int(t) for t in rng.integers(2, n_vocab, 5)]
    after = [int(t) for t in rng.integers(2, n_vocab, 9)]
    return [0, *before, image, *after], 1 + len(before)


def test_metadata_and_tensors_are_ollamas(converted) -> None:
    model, path = converted
    g = open_gguf(path)
    kv = g.kv
    assert kv["general.architecture"] == "mllama"
    assert kv["mllama.attention.cross_attention_layers"] == [1, 3]
    assert kv["mllama.block_count"] == 4
    assert kv["mllama.vision.block_count"] == 3
    assert kv["mllama.vision.global.block_count"] == 1
    assert kv["mllama.vision.intermediate_layers_indices"] == [0, 2]
    assert kv["mllama.vision.max_num_tiles"] == TILES
    assert kv["mllama.vision.image_size"] == IMAGE_SIZE
    assert kv["mllama.vision.patch_size"] == PATCH
    names = set(g.tensors)
    for name in (
        "token_embd.weight",
        "output.weight",
        "rope_freqs.weight",
        "blk.0.attn_q.weight",
        "blk.1.cross_attn_q_proj.weight",
        "blk.1.cross_attn_k_norm.weight",
        "blk.1.cross_attn_attn_gate",
        "blk.3.cross_attn_mlp_gate",
        "v.patch_embd.weight",
        "v.class_embd",
        "v.position_embd.weight",
        "v.position_embd.gate",
        "v.tile_position_embd.weight",
        "v.tile_position_embd.gate",
        "v.pre_tile_position_embd.gate",
        "v.post_tile_position_embd.weight",
        "v.pre_ln.bias",
        "v.blk.2.ffn_up.bias",
        "v.global.blk.0.attn_gate",
        "v.global.blk.0.ffn_gate",
        "mm.0.weight",
        "mm.0.bias",
    ):
        assert name in names, name
    assert "blk.1.attn_q.weight" not in names
    backend = open_backend("numpy", g)

    def w(name: str) -> np.ndarray:
        return backend.weight(name).a  # type: ignore[attr-defined]

    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    gate = sd["model.vision_model.gated_positional_embedding.gate"]
    # Ollama stores the vision gates through their tanh, the text gates raw
    np.testing.assert_allclose(w("v.position_embd.gate"), 1 - np.tanh(gate), rtol=1e-6)
    np.testing.assert_allclose(w("v.tile_position_embd.gate"), np.tanh(gate), rtol=1e-6)
    np.testing.assert_array_equal(
        w("blk.1.cross_attn_attn_gate"),
        sd["model.language_model.layers.1.cross_attn_attn_gate"],
    )
    assert w("token_embd.weight").shape == (model.config.text_config.vocab_size + 8, 32)


def test_vision_protocol(converted, photo) -> None:
    model, path = converted
    g = open_gguf(path)
    herd = load_model(g.config(), open_backend("numpy", g))
    assert isinstance(herd, Vision)
    assert herd.image_token == model.config.image_token_index
    assert herd.image_text == ("", "")
    tiles = herd.preprocess(photo)
    assert (tiles.aspect_ratio, tiles.pixels.shape) == ((1, 2), (2, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert herd.image_tokens(tiles) == 1


def test_encode_matches_transformers(converted, photo, backend) -> None:
    import torch

    model, path = converted
    herd = Herd(path, backend)
    tiles = herd.model.preprocess(photo)
    with torch.no_grad():
        inner = model.model.vision_model(**_hf_pixels(tiles)).last_hidden_state
        ref = model.model.multi_modal_projector(inner).reshape(-1, 32).numpy()
    ours = herd.encode(tiles)
    assert ours.shape == (TILES * N_POS + 1, 32)
    assert ours[-1, 0] == tiles.n_tiles * N_POS  # the states of the image's own tiles
    assert rel_err(ours[:-1], ref) < TOL, backend


def test_prompt_matches_transformers(converted, photo, backend) -> None:
    model, path = converted
    herd = Herd(path, backend)
    tiles = herd.model.preprocess(photo)
    tokens, row = _prompt(herd.model.image_token, herd.model.n_vocab)
    ref = _hf_logits(model, tokens, tiles, herd.model.image_token)
    batch = Batch.single(tokens, outputs="all")
    batch.images = [BatchImage(row, 1, herd.encode(tiles))]
    ours = herd.forward(batch)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < TOL, backend
    # the image matters: without it the logits after it differ
    assert rel_err(_hf_logits(model, tokens, None, 0)[row:], ref[row:]) > 100 * TOL


def test_cached_decode_equals_recompute(converted, photo, backend) -> None:
    """A prompt, then decode steps one token at a time reading the encoder cache, equal
    transformers on the whole sequence."""
    model, path = converted
    herd = Herd(path, backend)
    tiles = herd.model.preprocess(photo)
    tokens, row = _prompt(herd.model.image_token, herd.model.n_vocab)
    steps = [5, 17, 42]
    ref = _hf_logits(model, tokens + steps, tiles, herd.model.image_token)
    batch = Batch.single(tokens)
    batch.images = [BatchImage(row, 1, herd.encode(tiles))]
    out = [herd.forward(batch)[0]]
    for i, t in enumerate(steps):
        out.append(herd.forward(Batch.single([t], start=len(tokens) + i))[0])
    ours = np.stack(out)
    assert rel_err(ours, ref[len(tokens) - 1 :]) < TOL, backend


def test_prompt_without_image_skips_cross_attention(converted, backend) -> None:
    model, path = converted
    herd = Herd(path, backend)
    tokens = _prompt(2, herd.model.n_vocab)[0]
    ref = _hf_logits(model, tokens, None, 0)
    ours = herd.forward(Batch.single(tokens, outputs="all"))
    assert rel_err(ours, ref) < TOL, backend


def _concat(batches: list[Batch]) -> Batch:
    """One batch of single-sequence batches, sequence i from batches[i]."""
    rows, images = 0, []
    for b in batches:
        images += [BatchImage(im.row + rows, im.rows, im.embedding) for im in b.images]
        rows += len(b.tokens)
    outputs = np.cumsum([len(b.tokens) for b in batches]) - 1
    return Batch(
        np.concatenate([b.tokens for b in batches]),
        np.concatenate([b.positions for b in batches]),
        np.concatenate([np.full(len(b.tokens), i, np.int32) for i, b in enumerate(batches)]),
        outputs.astype(np.int32),
        images,
    )


def test_batch_of_conversations_equals_singles(converted, photo, backend) -> None:
    """Three sequences in one batch, two with different images and one without, then a
    decode step of all three: each as when run alone (each slot keeps its own image)."""
    from PIL import Image
    from skimage import data

    _, path = converted
    herd = Herd(path, backend, sequences=3)
    image = herd.model.image_token
    cat = Image.fromarray(data.chelsea())  # 451 x 300: another canvas
    prompts = []
    for picture, seed in ((photo, 1), (cat, 2), (None, 3)):
        rng = np.random.default_rng(seed)
        text = [int(t) for t in rng.integers(2, herd.model.n_vocab, 6 + seed)]
        batch = Batch.single([0, *text[:2], image, *text[2:]] if picture else [0, *text])
        if picture is not None:
            batch.images = [BatchImage(3, 1, herd.encode(herd.model.preprocess(picture)))]
        prompts.append(batch)
    steps = [Batch.single([9 + i], start=len(b.tokens)) for i, b in enumerate(prompts)]
    singles = []
    for prompt, step in zip(prompts, steps, strict=True):
        alone = Herd(path, backend)
        singles.append(np.concatenate([alone.forward(prompt), alone.forward(step)]))
    together = [herd.forward(_concat(prompts)), herd.forward(_concat(steps))]
    for i, single in enumerate(singles):
        ours = np.stack([together[0][i], together[1][i]])
        assert rel_err(ours, single) < TOL, (backend, i)


def test_encoder_cache_follows_removal_and_prefix_copies(converted, photo) -> None:
    """An image removed with its token is forgotten; a prefix copied with it brings its
    keys and values to the other slot, whose decode then equals the source's."""
    _, path = converted
    herd = Herd(path, "numpy", sequences=2)
    tokens, row = _prompt(herd.model.image_token, herd.model.n_vocab)
    batch = Batch.single(tokens)
    batch.images = [BatchImage(row, 1, herd.encode(herd.model.preprocess(photo)))]
    herd.forward(batch)
    cache = herd.model.cache
    cache.copy_prefix(0, 1, len(tokens))
    step = len(tokens)
    a = herd.forward(Batch.single([11], start=step, seq=0))
    b = herd.forward(Batch.single([11], start=step, seq=1))
    # the same values at other cells: BLAS may sum them in another order there (seen as
    # 7e-7 on an AVX-512 machine), while keys not brought along would differ by O(1)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    encoder = herd.model.encoder
    assert encoder.used_cells() == 2 * TILES * N_POS
    cache.remove(1, row + 1)  # the text after the image: the image stays
    assert encoder.image_pos[1] == row
    cache.remove(1, row)  # the image token itself
    assert encoder.image_pos[1] == -1 and encoder.used_cells() == TILES * N_POS


def test_one_image_per_sequence_and_batch(converted, photo) -> None:
    _, path = converted
    herd = Herd(path, "numpy")
    image = herd.model.image_token
    embedding = herd.encode(herd.model.preprocess(photo))
    batch = Batch.single([0, image, 5, image, 6])
    batch.images = [BatchImage(1, 1, embedding), BatchImage(3, 1, embedding)]
    with pytest.raises(ValueError, match="one image per sequence"):
        herd.forward(batch)
