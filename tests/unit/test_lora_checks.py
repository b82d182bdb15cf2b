"""LoRA adapters that do not fit their model: refused at create and at load, naming the
tensor, with nothing written to the store and nothing left loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from herd.errors import AdapterError, HerdError, ModelfileError
from herd.gguf import open_gguf
from herd.gguf.lora import check_lora, open_lora
from herd.gguf.writer import write_gguf
from herd.ml import BackendOptions, DType, open_backend
from herd.modelfile import parse
from herd.models import Batch, batch_inputs, load_model
from herd.nn.lora import Adapted, combine
from herd.runner.adapters import adapted, check_bound
from herd.store import Store
from herd.store.create import create

LORA_KV = {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 8.0}
RNG = np.random.default_rng(0)


def f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def lora(path: Path, tensors: dict[str, np.ndarray], arch: str = "llama", **kv) -> Path:
    return write_gguf(path, arch, {**LORA_KV, **kv}, [(n, a, None) for n, a in tensors.items()])


def pair(base: str, rank: int, n_in: int, n_out: int) -> dict[str, np.ndarray]:
    return {f"{base}.lora_a": f32(rank, n_in), f"{base}.lora_b": f32(n_out, rank)}


@pytest.fixture
def base(tiny_llama_path: Path) -> Path:
    """The tiny llama of conftest (hidden 32, ff 64, 4 heads of 8, 2 KV heads, vocab 64)."""
    return tiny_llama_path


BAD = {
    "other-arch": (dict(pair("blk.0.attn_q.weight", 4, 32, 32)), {"arch": "qwen2"},
                   "an adapter for 'qwen2' models, but the base model is 'llama'"),
    "no-such-tensor": (pair("blk.7.attn_q.weight", 4, 32, 32), {},
                       "blk.7.attn_q.weight.lora_a adapts blk.7.attn_q.weight, which the base"),
    "a-input-dim": (pair("blk.0.ffn_down.weight", 4, 32, 32), {},
                    "blk.0.ffn_down.weight.lora_a [4, 32] and blk.0.ffn_down.weight.lora_b"),
    "b-output-dim": (pair("blk.1.attn_k.weight", 4, 32, 32), {},
                     "do not fit blk.1.attn_k.weight [16, 32]"),
    "not-an-adapter": (pair("blk.0.attn_q.weight", 4, 32, 32), {"general.type": "model"},
                       "not an adapter: its general.type is 'model'"),
    "not-lora": (pair("blk.0.attn_q.weight", 4, 32, 32), {"adapter.type": "control_vector"},
                 "adapter.type is 'control_vector'; herd applies 'lora'"),
    "half-pair": ({"blk.0.attn_v.weight.lora_a": f32(4, 32)}, {},
                  "blk.0.attn_v.weight has no blk.0.attn_v.weight.lora_b"),
    "rank-mismatch": ({"blk.0.attn_q.weight.lora_a": f32(4, 32),
                       "blk.0.attn_q.weight.lora_b": f32(32, 3)}, {}, "disagree on the rank"),
    "stray-tensor": ({**pair("blk.0.attn_q.weight", 4, 32, 32), "blk.0.attn_q.weight": f32(32, 32)},
                     {}, "tensor blk.0.attn_q.weight is neither a .lora_a nor a .lora_b"),
    "embeddings": (pair("token_embd.weight", 4, 32, 64), {},
                   "token_embd.weight is not one"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_refused_at_load_naming_it(base: Path, tmp_path: Path, case: str) -> None:
    tensors, kv, fragment = BAD[case]
    kv = dict(kv)
    arch = kv.pop("arch", "llama")
    path = lora(tmp_path / "bad.gguf", tensors, arch, **kv)
    backend = open_backend("numpy", open_gguf(base), BackendOptions())
    with pytest.raises(AdapterError) as info:
        adapted(backend, open_gguf(base), [(path, 1.0)])
    assert fragment in str(info.value)
    assert "bad.gguf" in str(info.value)


@pytest.mark.parametrize("case", ["other-arch", "no-such-tensor", "a-input-dim", "not-lora"])
def test_bad_adapter_refused_at_create_store_unchanged(
    base: Path, tmp_path: Path, case: str
) -> None:
    tensors, kv, fragment = BAD[case]
    kv = dict(kv)
    arch = kv.pop("arch", "llama")
    lora(tmp_path / "bad.gguf", tensors, arch, **kv)
    (tmp_path / "base.gguf").symlink_to(base)
    store = Store(tmp_path / "models")
    create(store, "keep:1", parse("FROM ./base.gguf"), base_dir=tmp_path)
    before = sorted(p.name for p in store.blobs_dir.iterdir())
    with pytest.raises(ModelfileError) as info:
        create(store, "new:1", parse("FROM ./base.gguf\nADAPTER ./bad.gguf"), base_dir=tmp_path)
    assert f"Modelfile:2:9: ADAPTER ./bad.gguf: bad.gguf: {fragment}"[:40] in str(info.value)
    assert fragment in str(info.value)
    assert sorted(p.name for p in store.blobs_dir.iterdir()) == before
    assert [n.model for n in store.names()] == ["keep"]


def test_a_good_adapter_passes_both_checks(base: Path, tmp_path: Path) -> None:
    path = lora(tmp_path / "ok.gguf", {**pair("blk.0.attn_q.weight", 4, 32, 32),
                                       **pair("blk.1.ffn_down.weight", 2, 64, 32)})  # fmt: skip
    f = open_lora(path)
    check_lora(f, open_gguf(base))
    assert sorted(f.pairs) == ["blk.0.attn_q.weight", "blk.1.ffn_down.weight"]
    assert f.scale(f.pairs["blk.0.attn_q.weight"], 0.5) == pytest.approx(0.5 * 8.0 / 4)


def test_weight_the_model_does_not_bind_as_linear_is_refused(base: Path, tmp_path: Path) -> None:
    """A 2-D tensor the base file has but the architecture never binds through
    `Linear.bind` would silently stay unadapted: refused after binding, named."""
    g = open_gguf(base)
    tensors = [(t.name, g.raw(t.name).view(np.float32).reshape(t.shape), None) for t in g]
    extra = write_gguf(tmp_path / "extra.gguf", "llama", dict(g.kv),
                       [*tensors, ("blk.0.unused.weight", f32(8, 32), None)])  # fmt: skip
    path = lora(tmp_path / "ok.gguf", pair("blk.0.unused.weight", 2, 32, 8))
    backend = open_backend("numpy", open_gguf(extra), BackendOptions())
    wrapped = adapted(backend, open_gguf(extra), [(path, 1.0)])
    load_model(open_gguf(extra).config(), wrapped)
    assert wrapped.unused() == ["blk.0.unused.weight"]
    with pytest.raises(AdapterError, match="does not apply adapters to blk.0.unused.weight"):
        check_bound(wrapped, "llama")


def test_combined_adapters_are_the_sum_of_each(base: Path) -> None:
    """Two adapters on one weight become one pair (A stacked, scale * B side by side)
    whose product is the sum of each adapter's scaled product, on the backend too."""
    a1, b1, a2, b2 = f32(4, 32), f32(32, 4), f32(2, 32), f32(32, 2)
    a, b = combine([(a1, b1, 0.5), (a2, b2, -2.0)])
    np.testing.assert_allclose(b @ a, 0.5 * b1 @ a1 - 2.0 * b2 @ a2, rtol=1e-5, atol=1e-5)
    g = open_gguf(base)
    wrapped = Adapted(open_backend("numpy", g, BackendOptions()),
                      {"blk.0.attn_q.weight": [(a1, b1, 0.5), (a2, b2, -2.0)]})  # fmt: skip
    model = load_model(g.config(), wrapped)
    assert wrapped.unused() == []
    q = model.blk[0].attn.attn_q
    x = f32(3, 32)
    with wrapped.new_context() as ctx:
        (y,) = ctx.compute(q.forward(ctx.input(x)))
    w = g.raw("blk.0.attn_q.weight").view(np.float32).reshape(32, 32)
    want = x @ w.T + x @ (0.5 * b1 @ a1 - 2.0 * b2 @ a2).T
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_no_adapters_is_the_plain_model(base: Path) -> None:
    """An `Adapted` backend without adapters binds exactly the base model."""
    g = open_gguf(base)
    plain = load_model(g.config(), open_backend("numpy", g, BackendOptions()))
    wrapped = load_model(g.config(), Adapted(open_backend("numpy", g, BackendOptions()), {}))
    outs = []
    for model in (plain, wrapped):
        model.cache.init(model.backend, DType.F32, 1, 64, 64)
        batch = Batch.single([1, 2, 3], outputs="all")
        with model.backend.new_context() as ctx:
            model.cache.start_forward(ctx, batch)
            outs.append(ctx.compute(model.forward(ctx, batch_inputs(ctx, batch)))[0])
    np.testing.assert_array_equal(outs[0], outs[1])


def test_herd_error_types() -> None:
    assert issubclass(AdapterError, HerdError)
