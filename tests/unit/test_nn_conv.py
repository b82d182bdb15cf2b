"""nn.Conv2d and nn.PatchEmbedding on every backend against torch's nn.Conv2d.

Weights come from a tiny GGUF, bound by name as models bind them; torch runs on the same
values (F16 ones as stored) in float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from gguf import GGUFWriter
from gpu import NUM_GPU

from herd.errors import WeightError
from herd.gguf import GGUFFile
from herd.gguf.reader import open_gguf
from herd.ml import BackendOptions, DType, available_backends, open_backend
from herd.nn import Conv2d, PatchEmbedding, Weights

torch = pytest.importorskip("torch")

F32 = np.float32


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(F32)


TENSORS = {  # name -> (values, stored as F16)
    "conv.weight": (rand(5, 3, 3, 4, seed=1), False),
    "conv.bias": (rand(5, seed=2), False),
    "patch.weight": (rand(16, 3, 14, 14, seed=3), False),
    "patch.bias": (rand(16, seed=4), False),
    "patch16.weight": (rand(16, 3, 14, 14, seed=5), True),
}


def stored(name: str) -> np.ndarray:
    """The values as the file holds them, float64 (what torch is given)."""
    w, half = TENSORS[name]
    return (w.astype(np.float16) if half else w).astype(np.float64)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> GGUFFile:
    path = tmp_path_factory.mktemp("conv") / "conv.gguf"
    writer = GGUFWriter(str(path), "test")
    for name, (w, half) in TENSORS.items():
        writer.add_tensor(name, w.astype(np.float16) if half else w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return open_gguf(path)


@pytest.fixture(scope="module", params=available_backends())
def backend(request: pytest.FixtureRequest, gguf_file: GGUFFile) -> Any:
    b = open_backend(request.param, gguf_file, BackendOptions(num_thread=1, num_gpu=NUM_GPU))
    yield b
    b.close()


def forward(backend: Any, module: Any, x: np.ndarray) -> np.ndarray:
    with backend.new_context() as ctx:
        return ctx.compute(module.forward(ctx.input(x, DType.F32)))[0]


def close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "bias"),
    [(1, 0, 1, True), ((2, 1), 1, (1, 2), None), (2, (0, 2), 1, False)],
)
def test_conv2d_matches_torch(
    backend: Any, stride: Any, padding: Any, dilation: Any, bias: bool | None
) -> None:
    """A batch of two through a non-square kernel; `bias=None` finds the file's bias."""
    conv = Conv2d.bind(
        Weights(backend),
        "conv",
        5,
        3,
        (3, 4),
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=bias,
    )
    assert (conv.bias is not None) == (bias is not False)
    ref = torch.nn.Conv2d(3, 5, (3, 4), stride, padding, dilation, bias=conv.bias is not None)
    ref = ref.double()
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(stored("conv.weight")))
        if ref.bias is not None:
            ref.bias.copy_(torch.from_numpy(stored("conv.bias")))
        x = rand(2, 3, 10, 13, seed=6)
        want = ref(torch.from_numpy(x).double()).numpy()
    close(forward(backend, conv, x), want)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("patch", (3, 28, 42)), ("patch", (2, 3, 42, 28)), ("patch16", (1, 3, 28, 28))],
)
def test_patch_embedding_matches_torch(backend: Any, name: str, shape: tuple[int, ...]) -> None:
    """Rows in torch's `conv(x).flatten(2).transpose(1, 2)` order, images one after the
    other; a single (C, H, W) image is a batch of one."""
    emb = PatchEmbedding.bind(Weights(backend), name, 16, 3, 14, bias=None)
    assert (emb.bias is not None) == (name == "patch")
    ref = torch.nn.Conv2d(3, 16, 14, 14, bias=emb.bias is not None).double()
    x = rand(*shape, seed=7)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(stored(f"{name}.weight")))
        if ref.bias is not None:
            ref.bias.copy_(torch.from_numpy(stored(f"{name}.bias")))
        xb = torch.from_numpy(x.reshape(-1, *x.shape[-3:])).double()
        want = ref(xb).flatten(2).transpose(1, 2).reshape(-1, 16).numpy()
    got = forward(backend, emb, x)
    assert emb.grid(*shape[-2:]) == (shape[-2] // 14, shape[-1] // 14)
    close(got, want)


def test_bind_checks_the_kernel_shape(backend: Any) -> None:
    with pytest.raises(WeightError, match=r"conv.weight: expected \(5, 3, 4, 3\)"):
        Conv2d.bind(Weights(backend), "conv", 5, 3, (4, 3))
    with pytest.raises(WeightError, match="patch16.bias: missing"):
        PatchEmbedding.bind(Weights(backend), "patch16", 16, 3, 14, bias=True)
