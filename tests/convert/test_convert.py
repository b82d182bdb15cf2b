"""`herd convert` on tiny random transformers models, one per architecture and quirk set.

Each case (tests/convert/tiny.py) is saved with `save_pretrained` and converted by herd.
The converted file must be
- deterministic: every tensor's sha256 equals the golden;
- right for herd's engine: logits (BERT: embeddings) equal transformers' to 1e-4 relative;
- right for the ecosystem: llama.cpp, given the very same file (same tensor hashes), gave
  logits close to transformers' (goldens from scripts/make_convert_goldens.py);
- right for the tokenizer: herd's ids on the corpus equal llama.cpp's and Hugging Face's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("sentencepiece")

import herd  # noqa: E402
from herd.convert import convert  # noqa: E402
from herd.errors import ConvertError, UnsupportedModelError  # noqa: E402
from herd.gguf import open_gguf  # noqa: E402
from herd.ml import available_backends  # noqa: E402
from herd.tokenizer import from_gguf  # noqa: E402

from .tiny import CASES, CORPUS, GOLDENS, build, hf_logits, input_ids  # noqa: E402

# llama.cpp runs its own kernels (F16 KV cache, fused ops): close, not bit-equal.
LLAMA_CPP_TOL = 1e-2
ENGINE_TOL = 1e-4
# Strings where llama.cpp's WordPiece normalization (first code point of NFD, every mark
# dropped) differs from Hugging Face's (full NFD, only Mn dropped): herd follows llama.cpp.
WPM_NFD_DIVERGENT = ("한국어 텍스트입니다.", "नमस्ते दुनिया, यह हिंदी पाठ है।")


def golden(case: str) -> dict[str, Any]:
    return json.loads((GOLDENS / f"{case}.json").read_text())


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def tensor_sha256(path: Path) -> dict[str, str]:
    import hashlib

    g = open_gguf(path)
    return {n: hashlib.sha256(g.raw(n).tobytes()).hexdigest() for n in g.tensors}


def _converted(name: str, tmp_path_factory: Any) -> tuple[str, Path, Any, Path]:
    tmp = tmp_path_factory.mktemp(name)
    src, model = build(name, tmp / "hf")
    return name, src, model, convert(src, tmp / "model.gguf", "f32")


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request, tmp_path_factory):
    """(name, HF directory, transformers model, converted f32 GGUF)."""
    return _converted(request.param, tmp_path_factory)


def _of(arch: str) -> list[str]:
    return [name for name, c in CASES.items() if c.arch == arch]


@pytest.fixture(scope="module", params=_of("gemma3"), ids=_of("gemma3"))
def gemma_case(request, tmp_path_factory):
    return _converted(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=_of("bert"), ids=_of("bert"))
def bert_case(request, tmp_path_factory):
    return _converted(request.param, tmp_path_factory)


def test_tensors_are_deterministic(case) -> None:
    name, src, _, path = case
    assert tensor_sha256(path) == golden(name)["tensors"]["f32"]


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_quantized_outtypes_are_deterministic(outtype, tmp_path) -> None:
    name = next(iter(CASES))
    src, _ = build(name, tmp_path / "hf")
    path = convert(src, tmp_path / f"{outtype}.gguf", outtype)
    assert tensor_sha256(path) == golden(name)["tensors"][outtype]
    types = {t.type.name for t in open_gguf(path).tensors.values()}
    assert types == {"F32", outtype.upper()}  # norms stay F32, matrices take the outtype


def _herd_output(path: Path, arch: str, ids: list[int], texts: list[str] | None) -> np.ndarray:
    llm = herd.load(path, backend="numpy")
    if arch == "bert":
        return llm.embed(texts or [])
    return llm.logits(ids)


def _hf_embeddings(src: Path, model: Any, texts: list[str]) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    return np.concatenate([hf_logits(model, tok.encode(t).ids) for t in texts])


def test_engine_matches_transformers(case) -> None:
    name, src, model, path = case
    arch = CASES[name].arch
    if arch == "bert":
        texts = golden(name)["texts"]
        ours, ref = _herd_output(path, arch, [], texts), _hf_embeddings(src, model, texts)
    else:
        ids = input_ids(name, model.config.vocab_size)
        ours, ref = _herd_output(path, arch, ids, None), hf_logits(model, ids)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < ENGINE_TOL


def test_llama_cpp_reproduces_transformers_on_herds_file(case) -> None:
    name, src, model, path = case
    g = golden(name)
    assert tensor_sha256(path) == g["tensors"]["f32"]  # llama.cpp read this very file
    if CASES[name].arch == "bert":
        ref = _hf_embeddings(src, model, g["texts"])
        ours = np.asarray(g["embeddings"])
        assert (ours * ref).sum(axis=1).min() > 0.9999
    else:
        ref = hf_logits(model, g["ids"])[g["positions"]]
        assert rel_err(np.asarray(g["logits"]), ref) < LLAMA_CPP_TOL


def test_tokenizer_matches_llama_cpp(case) -> None:
    name, _, _, path = case
    tok = from_gguf(open_gguf(path))
    ours = [tok.encode(s, add_special=True, parse_special=False) for s in CORPUS]
    assert ours == golden(name)["corpus_ids"]


def _hf_ids(src: Path, text: str) -> list[int]:
    if (src / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(src / "tokenizer.json")).encode(text).ids
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    return [sp.bos_id(), *sp.encode(text)]


def test_tokenizer_matches_hugging_face(case) -> None:
    name, src, _, path = case
    tok = from_gguf(open_gguf(path))
    kind = CASES[name].tokenizer
    strings = [s for s in CORPUS if not (kind == "wordpiece" and s in WPM_NFD_DIVERGENT)]
    if kind.startswith("spm"):
        # sentencepiece reads control-token texts (<bos>) as plain text; llama.cpp does not
        kv = open_gguf(path).kv
        control = [
            t
            for t, ty in zip(
                kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"], strict=True
            )
            if ty == 3
        ]
        strings = [s for s in strings if not any(t in s for t in control)]
    # HF's tokenizers split added special tokens out of any text: compare with parsing on
    mismatches = [
        s for s in strings if tok.encode(s, add_special=True, parse_special=True) != _hf_ids(src, s)
    ]
    assert mismatches == []


def test_metadata(case) -> None:
    name, src, model, path = case
    kv = open_gguf(path).kv
    c = CASES[name]
    assert kv["general.architecture"] == c.arch
    assert kv["general.file_type"] == 0  # ALL_F32
    tokens = kv["tokenizer.ggml.tokens"]
    assert len(tokens) == model.config.vocab_size
    expect = {
        "llama3-bpe": ("gpt2", "llama-bpe"),
        "qwen2-bpe": ("gpt2", "qwen2"),
        "spm-llama": ("llama", "default"),
        "spm-gemma": ("llama", "default"),
        "wordpiece": ("bert", "default"),
    }[c.tokenizer]
    assert (kv["tokenizer.ggml.model"], kv["tokenizer.ggml.pre"]) == expect
    if c.tokenizer.endswith("bpe"):
        assert kv["tokenizer.chat_template"].startswith("{% for m in messages %}")
        assert kv["tokenizer.ggml.merges"]
    if c.extra_vocab:
        assert tokens[-1] == f"[PAD{len(tokens) - 1}]"
        assert kv["tokenizer.ggml.token_type"][-1] == 5  # UNUSED
    if name == "llama-rope3-spm":
        assert "rope_freqs.weight" in open_gguf(path).tensors
    if c.arch == "gemma3":
        assert kv["tokenizer.ggml.add_space_prefix"] is False
        assert kv["gemma3.attention.sliding_window_pattern"] == [True] * 5 + [False]
        assert kv["gemma3.final_logit_softcapping"] == pytest.approx(30.0)
    if c.arch == "bert":
        assert kv["bert.pooling_type"] == 1  # mean, from 1_Pooling/config.json
        assert kv["tokenizer.ggml.seperator_token_id"] == tokens.index("[SEP]")


def test_gemma_norms_are_folded(gemma_case) -> None:
    """Gemma's `1 + w` lives in the file, not in forward."""
    name, _, model, path = gemma_case
    from herd.ml import open_backend

    g = open_gguf(path)
    w = open_backend("numpy", g).weight("blk.0.attn_norm.weight").a  # type: ignore[attr-defined]
    hf = model.model.layers[0].input_layernorm.weight.detach().numpy()
    np.testing.assert_array_equal(w, hf + np.float32(1.0))


def test_engine_batch_of_sequences_equals_singles(bert_case) -> None:
    """Encoders see each sequence alone: two texts in one batch = two separate calls."""
    name, _, _, path = bert_case
    llm = herd.load(path, backend="numpy")
    texts = golden(name)["texts"]
    both = llm.embed(texts)
    single = np.concatenate([llm.embed([t]) for t in texts])
    np.testing.assert_allclose(both, single, atol=1e-6)
    dims = llm.embed(texts, dimensions=16)
    assert dims.shape == (len(texts), 16)
    np.testing.assert_allclose(np.linalg.norm(dims, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-bias"])
def test_pre_tokenizer_recognized_without_tokenizers(name, tmp_path, monkeypatch) -> None:
    """Without the `tokenizers` package the pre-tokenizer is recognized by its regexes."""
    src, _ = build(name, tmp_path / "hf")
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # import fails
    kv = open_gguf(convert(src, tmp_path / "m.gguf", "f32")).kv
    assert kv["tokenizer.ggml.pre"] == {"llama-gqa-tied": "llama-bpe", "qwen2-bias": "qwen2"}[name]


def test_unknown_pre_tokenizer_is_refused(tmp_path) -> None:
    src, _ = build("qwen2-bias", tmp_path / "hf")
    doc = json.loads((src / "tokenizer.json").read_text())
    doc["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    (src / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(ConvertError, match=r"BPE pre-tokenizer was not recognized \(chkhsh "):
        convert(src, tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()


# --- qwen3moe: both checkpoint layouts, quantized experts, what is refused ----------------

MOE = "qwen3moe-top2"


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> tuple[Path, Any]:
    """The MoE case as save_pretrained writes it (one matrix per expert), and its model."""
    return build(MOE, tmp_path_factory.mktemp(MOE) / "hf")


def _copy(src: Path, dest: Path, **config: Any) -> Path:
    import shutil

    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, **config}))
    return dest


def _resave(src: Path, state: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, src / "model.safetensors")


def test_moe_fused_checkpoint_converts_like_per_expert(moe_dir, tmp_path) -> None:
    """transformers 5's own layout (`experts.gate_up_proj` (E, 2F, D), `experts.down_proj`
    (E, D, F)) gives the very tensors of the per-expert layout."""
    src, model = moe_dir
    fused = _copy(src, tmp_path / "fused")
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    _resave(fused, state)
    path = convert(fused, tmp_path / "fused.gguf", "f32")
    assert tensor_sha256(path) == golden(MOE)["tensors"]["f32"]


def test_moe_q8_0_keeps_the_router_f32(moe_dir, tmp_path) -> None:
    """As llama.cpp: the router stays F32; quantized experts run on every backend (ggml's
    mul_mat_id takes them as they are) close to the F32 reference."""
    src, model = moe_dir
    path = convert(src, tmp_path / "q8_0.gguf", "q8_0")
    types = {n: t.type.name for n, t in open_gguf(path).tensors.items()}
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert {types[f"blk.1.ffn_{p}_exps.weight"] for p in ("gate", "up", "down")} == {"Q8_0"}
    ids = input_ids(MOE, model.config.vocab_size)
    ref = hf_logits(model, ids)
    for backend in available_backends():
        assert rel_err(herd.load(path, backend=backend).logits(ids), ref) < 0.05, backend


def _without_expert(src: Path) -> None:
    from safetensors.numpy import load_file

    state = load_file(src / "model.safetensors")
    del state["model.layers.1.mlp.experts.3.up_proj.weight"]
    _resave(src, state)


MOE_REFUSED: dict[str, tuple[dict[str, Any], Any, type[Exception], str]] = {
    "norm_topk_prob-false": (
        {"norm_topk_prob": False},
        None,
        UnsupportedModelError,
        r"norm_topk_prob false is not supported: llama\.cpp's qwen3moe always renormalizes",
    ),
    "dense-every-other-layer": (
        {"decoder_sparse_step": 2},
        None,
        UnsupportedModelError,
        r"layers \[0\] have a dense MLP",
    ),
    "mlp_only_layers": (
        {"mlp_only_layers": [1]},
        None,
        UnsupportedModelError,
        r"layers \[1\] have a dense MLP",
    ),
    "missing-expert": (
        {},
        _without_expert,
        ConvertError,
        r"model\.layers\.1\.mlp\.experts\.up_proj: 4 experts in config\.json, but the "
        r"checkpoint lacks experts \[3\]",
    ),
}


@pytest.mark.parametrize("case", list(MOE_REFUSED), ids=list(MOE_REFUSED))
def test_moe_refused(case, moe_dir, tmp_path) -> None:
    config, damage, error, message = MOE_REFUSED[case]
    src = _copy(moe_dir[0], tmp_path / "hf", **config)
    if damage is not None:
        damage(src)
    with pytest.raises(error, match=message):
        convert(src, tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()
