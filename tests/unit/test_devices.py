"""Device layout, offload and the memory check, on any machine.

`layout` is a pure function over byte counts: table tests. The ggml backend is then
driven with an injected device probe: only the CPU (everything stays there), a CPU that
reports too little memory (OutOfMemoryError before anything is allocated), and a stand-in
"GPU" that is really a second CPU backend, so weight copies, per-layer KV placement and
the scheduler's split graphs run here and must give the CPU-only logits exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from herd import envconfig
from herd.errors import OutOfMemoryError
from herd.gguf import open_gguf
from herd.gguf.writer import write_gguf
from herd.ml import BackendOptions, DeviceInfo, DType, available_backends, open_backend
from herd.ml.layout import DeviceNeed, check_fit, layout, plan, tensor_layer
from herd.models import Batch, batch_inputs, load_model

MiB = 1 << 20


# ---- layout: (n_layers, per-layer bytes with the output layer last, free per GPU, num_gpu)
@pytest.mark.parametrize(
    ("n_layers", "sizes", "free", "num_gpu", "want"),
    [
        (3, [10, 10, 10, 5], [], -1, [None] * 4),
        (3, [10, 10, 10, 5], [100], 0, [None] * 4),
        (3, [10, 10, 10, 5], [100], -1, [0, 0, 0, 0]),
        (3, [10, 10, 10, 5], [26], -1, [None, 0, 0, 0]),  # packed from the output backwards
        (3, [10, 10, 10, 5], [100], 2, [None, None, 0, 0]),  # the output layer counts
        (3, [10, 10, 10, 5], [100], 9, [0, 0, 0, 0]),
        (3, [10, 10, 10, 5], [1], 2, [None, None, 0, 0]),  # explicit: placed anyway
        (3, [10, 10, 10, 5], [20, 30], -1, [0, 1, 1, 1]),  # most free first, then the next
        (3, [10, 10, 10, 5], [4], -1, [None] * 4),
        # a big output layer that does not fit: leaving it on the CPU offloads more blocks
        (3, [10, 10, 10, 50], [30], -1, [0, 0, 0, None]),
        # ... but not when the blocks would not gain from it
        (3, [10, 10, 10, 5], [16], -1, [None, None, 0, 0]),
    ],
    ids=[
        "no-gpu",
        "num_gpu-0",
        "all-fit",
        "partial",
        "explicit-2",
        "explicit-more-than-layers",
        "explicit-over-capacity",
        "two-gpus",
        "nothing-fits",
        "output-stays-on-cpu",
        "output-first",
    ],
)
def test_layout(n_layers: int, sizes: list[int], free: list[int], num_gpu: int, want: list[Any]):
    assert layout(n_layers, sizes, free, num_gpu) == want


# spread (OLLAMA_SCHED_SPREAD, RPC servers): contiguous runs sized by free memory
@pytest.mark.parametrize(
    ("sizes", "free", "num_gpu", "want"),
    [
        ([10] * 4, [100, 100], -1, [0, 0, 1, 1]),  # packed, all would sit on one
        ([10] * 5, [100, 100], -1, [0, 0, 1, 1, 1]),
        ([10] * 4, [300, 100], -1, [0, 0, 0, 1]),  # by free memory
        ([10] * 4, [100, 100, 100, 100], -1, [0, 1, 2, 3]),
        ([10] * 4, [15, 100], -1, [0, 1, 1, 1]),
        ([30, 5, 5, 5], [30, 30], -1, [1, 0, 0, 0]),  # a run does not fit: packed instead
        ([10] * 4, [100, 100], 2, [None, None, 0, 0]),  # an explicit num_gpu packs
    ],
    ids=["even", "odd", "by-memory", "four", "small", "does-not-fit", "explicit"],
)
def test_layout_spread(sizes: list[int], free: list[int], num_gpu: int, want: list[Any]):
    assert layout(len(sizes) - 1, sizes, free, num_gpu, spread=True) == want


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("blk.0.attn_q.weight", 0),
        ("blk.11.ffn_down.weight", 11),
        ("output.weight", 12),
        ("output_norm.weight", 12),
        ("token_embd.weight", None),
        ("rope_freqs.weight", None),
    ],
)
def test_tensor_layer(name: str, want: int | None):
    assert tensor_layer(name, 12) == want


def test_fit_check_names_the_sizes():
    need = DeviceNeed("CUDA0", 100 * MiB, True, weights=80 * MiB, cache=30 * MiB, graph=5 * MiB)
    sizes = r"\(115.0 MiB: weights 80.0 MiB, KV cache 30.0 MiB, compute 5.0 MiB\)"
    with pytest.raises(
        OutOfMemoryError, match=rf"CUDA0 {sizes} than is available \(100.0 MiB\) with num_gpu = 3"
    ):
        check_fit([need], 3)
    check_fit([DeviceNeed("cpu", 200 * MiB, weights=80 * MiB)], -1)


# ---- the ggml backend with injected devices ---------------------------------------------
needs_ggml = pytest.mark.skipif(
    "ggml" not in available_backends(), reason="ggml-python not installed"
)
N_LAYERS, D, VOCAB = 4, 64, 96


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-layer Llama with tied embeddings, written by hand (no torch)."""
    rng = np.random.default_rng(0)
    w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    tensors = [("token_embd.weight", w(VOCAB, D), None), ("output_norm.weight", 1 + w(D), None)]
    for i in range(N_LAYERS):
        p = f"blk.{i}."
        tensors += [
            (p + "attn_norm.weight", 1 + w(D), None),
            (p + "attn_q.weight", w(D, D), None),
            (p + "attn_k.weight", w(32, D), None),
            (p + "attn_v.weight", w(32, D), None),
            (p + "attn_output.weight", w(D, D), None),
            (p + "ffn_norm.weight", 1 + w(D), None),
            (p + "ffn_gate.weight", w(128, D), None),
            (p + "ffn_up.weight", w(128, D), None),
            (p + "ffn_down.weight", w(D, 128), None),
        ]
    kv = {
        "llama.block_count": N_LAYERS,
        "llama.embedding_length": D,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.context_length": 256,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
    }
    return write_gguf(tmp_path_factory.mktemp("dev") / "tiny.gguf", "llama", kv, tensors)


def _probe(cpu_free: int | None = None, gpu_free: list[int] | None = None) -> Any:
    """Devices as the backend will see them: the real CPU (its free memory overridden)
    and stand-in GPUs that run on a second CPU backend."""
    from herd.ml.backends.ggml.devices import Device, probe_devices

    def probe() -> list[Device]:
        cpu = next(d for d in probe_devices() if d.info.kind == "cpu")
        if cpu_free is not None:
            cpu = Device(
                DeviceInfo(cpu.info.name, "cpu", cpu.info.total_memory, cpu_free), cpu.handle
            )
        gpus = [
            Device(DeviceInfo(f"FakeGPU{i}", "gpu", 1 << 30, free), cpu.handle)
            for i, free in enumerate(gpu_free or [])
        ]
        return [*gpus, cpu]

    return probe


def _open(path: Path, num_gpu: int, **options: Any) -> Any:
    options.setdefault("flash_attention", False)
    return open_backend("ggml", open_gguf(path), BackendOptions(1, num_gpu, 256, **options))


def _logits(backend: Any, path: Path) -> np.ndarray:
    """A 20-token prompt, then 4 decode steps: their last-position logits stacked."""
    model = load_model(open_gguf(path).config(), backend)
    model.cache.init(backend, DType.F16, 1, 256, 64)
    ids = [int(i) for i in np.random.default_rng(1).integers(0, VOCAB, 24)]
    rows = []
    for start, chunk in ((0, ids[:20]), *((i, [ids[i]]) for i in range(20, 24))):
        with backend.new_context() as ctx:
            batch = Batch.single(chunk, start)
            model.cache.start_forward(ctx, batch)
            rows.append(ctx.compute(model.forward(ctx, batch_inputs(ctx, batch)))[0][-1])
    return np.stack(rows)


@needs_ggml
@pytest.mark.parametrize("num_gpu", [-1, 0, 3])
def test_cpu_only_keeps_everything_on_the_cpu(tiny_llama: Path, num_gpu: int):
    backend = _open(tiny_llama, num_gpu, device_probe=_probe())
    assert backend.plan.layers == [None] * (N_LAYERS + 1) and not backend.gpus
    assert not backend.cache_config().flash_attention
    assert [d.kind for d in backend.devices()] == ["cpu"]
    assert _logits(backend, tiny_llama).shape == (5, VOCAB)
    backend.close()


@needs_ggml
@pytest.mark.parametrize(
    ("num_gpu", "gpu_free", "on_gpu"),
    [(-1, [1 << 30], 5), (2, [1 << 30], 2), (-1, [1 << 30, 1 << 30], 5), (-1, [0], 0)],
    ids=["all", "last-two", "two-gpus", "no-room"],
)
def test_offload_gives_the_cpu_logits(
    tiny_llama: Path, num_gpu: int, gpu_free: list[int], on_gpu: int
):
    want = _logits(_open(tiny_llama, 0), tiny_llama)
    backend = _open(tiny_llama, num_gpu, device_probe=_probe(gpu_free=gpu_free))
    placed = backend.plan.layers
    assert sum(d is not None for d in placed) == on_gpu
    assert placed[: N_LAYERS + 1 - on_gpu] == [None] * (N_LAYERS + 1 - on_gpu)
    assert backend.has_weight("output.weight") == (placed[-1] is not None)  # tied, copied
    np.testing.assert_array_equal(_logits(backend, tiny_llama), want)
    backend.close()


@needs_ggml
def test_graph_reuse_across_the_scheduler(tiny_llama: Path):
    """rerun after other graphs went through the scheduler re-places its own."""
    backend = _open(tiny_llama, -1, device_probe=_probe(gpu_free=[1 << 30]))
    w = backend.weight("blk.0.ffn_up.weight")
    xs = [np.random.default_rng(s).standard_normal((3, D)).astype(np.float32) for s in range(3)]
    with backend.new_context() as ctx:
        got = [ctx.compute(ctx.input(xs[0]).linear(w).silu())[0]]
        with backend.new_context() as other:
            other.compute(other.input(xs[1]).linear(w))
        got += [ctx.rerun(xs[1])[0], ctx.rerun(xs[2])[0]]
    up = open_gguf(tiny_llama).raw("blk.0.ffn_up.weight").view(np.float32).reshape(128, D)
    for g, x in zip(got, xs, strict=True):
        y = x @ up.T
        np.testing.assert_allclose(g, y / (1 + np.exp(-y)), rtol=1e-5, atol=1e-5)
    backend.close()


@needs_ggml
def test_flash_attention_is_on_with_layers_on_a_gpu(tiny_llama: Path):
    on_gpu = open_backend(
        "ggml",
        open_gguf(tiny_llama),
        BackendOptions(1, -1, device_probe=_probe(gpu_free=[1 << 30])),
    )
    assert on_gpu.cache_config().flash_attention
    on_gpu.close()


@needs_ggml
@pytest.mark.parametrize(
    ("env", "gpu", "want"),
    [
        ({}, False, False),
        ({"HERD_FLASH_ATTENTION": "1"}, False, True),
        ({"OLLAMA_FLASH_ATTENTION": "true"}, False, True),
        ({"HERD_FLASH_ATTENTION": "0"}, True, False),
        ({"HERD_FLASH_ATTENTION": "false", "OLLAMA_FLASH_ATTENTION": "1"}, False, False),
    ],
)
def test_flash_attention_follows_the_environment(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], gpu: bool, want: bool
):
    """HERD_FLASH_ATTENTION (else Ollama's OLLAMA_FLASH_ATTENTION) forces it on or off: the
    entry points read it and pass it on as `BackendOptions.flash_attention`."""
    for name in ("HERD_FLASH_ATTENTION", "OLLAMA_FLASH_ATTENTION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    probe = _probe(gpu_free=[1 << 30] if gpu else [])
    options = BackendOptions(1, -1, flash_attention=envconfig.flash_attention(), device_probe=probe)
    backend = open_backend("ggml", open_gguf(tiny_llama), options)
    config = backend.cache_config()
    assert config.flash_attention is want
    # what the KV cache then does: fused attention reads V rows, and F16 masks
    assert config.v_transposed is not want
    assert config.mask_dtype == (DType.F16 if want else DType.F32)
    backend.close()


@needs_ggml
def test_model_that_does_not_fit_is_refused_before_loading(tiny_llama: Path):
    with pytest.raises(OutOfMemoryError, match=r"system memory \(.*\) than is available \(1.0 KiB"):
        _open(tiny_llama, 0, device_probe=_probe(cpu_free=1024))
    with pytest.raises(OutOfMemoryError, match="FakeGPU0 .* with num_gpu = 5"):
        _open(tiny_llama, 5, device_probe=_probe(gpu_free=[300 * 1024]))


@needs_ggml
def test_kv_cache_that_does_not_fit_is_refused_before_allocating(tiny_llama: Path):
    backend = _open(tiny_llama, 0, device_probe=_probe(cpu_free=64 * MiB))
    too_big = r"F16 tensor \(1000000, 2, 32\) \(layer 3\) needs 122.1 MiB on .* 64.0 MiB is"
    with pytest.raises(OutOfMemoryError, match=too_big):
        backend.alloc((1_000_000, 2, 32), DType.F16, layer=3)
    assert backend.alloc((16, 2, 32), DType.F16, layer=3).shape == (16, 2, 32)
    backend.close()


def test_fit_check_plans_the_configured_kv_cache_type(tiny_llama: Path):
    """The fit check sizes the KV cache as `kv_cache_type` stores it: q4_0 takes 4.5 bits
    an element (block scales included) where f16 takes 16, so a model that only fits with
    the smaller cache is refused with f16 and loads with q4_0."""
    gguf = open_gguf(tiny_llama)

    def cpu_need(cache_type: str, free: int = 1 << 40) -> DeviceNeed:
        options = BackendOptions(1, 0, 256, kv_cache_type=cache_type)
        return plan(gguf, options, [], DeviceInfo("cpu", "cpu", 1 << 40, free)).needs[-1]

    f16, q4 = cpu_need("f16"), cpu_need("q4_0")
    assert q4.cache == pytest.approx(f16.cache * 4.5 / 16, rel=1e-3)
    assert (q4.weights, q4.graph) == (f16.weights, f16.graph)
    free = (q4.total + f16.total) // 2
    assert cpu_need("q4_0", free).total == q4.total
    with pytest.raises(OutOfMemoryError, match=r"system memory .* KV cache"):
        cpu_need("f16", free)
