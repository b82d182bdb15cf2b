"""Conv2d and PatchEmbedding (a vision encoder's first layer) over NCHW images."""

from __future__ import annotations

from herd.ml import Tensor, context_of
from herd.nn.weights import Weights

Pair = int | tuple[int, int]


def _pair(v: Pair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _bias(w: Weights, name: str, n_out: int, bias: bool | None) -> Tensor | None:
    """`bias=None`: use the bias when the file has one."""
    if bias is None:
        return w.optional(f"{name}.bias", (n_out,))
    return w.get(f"{name}.bias", (n_out,)) if bias else None


class Conv2d:
    """x (N, Cin, H, W) -> (N, Cout, OH, OW) with weight (Cout, Cin, KH, KW) and an
    optional bias (Cout,), as torch's nn.Conv2d (zero padding, groups=1)."""

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        stride: Pair = 1,
        padding: Pair = 0,
        dilation: Pair = 1,
    ) -> None:
        self.weight, self.bias = weight, bias
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)

    @classmethod
    def bind(
        cls,
        w: Weights,
        name: str,
        n_out: int,
        n_in: int,
        kernel: Pair,
        *,
        stride: Pair = 1,
        padding: Pair = 0,
        dilation: Pair = 1,
        bias: bool | None = False,
    ) -> Conv2d:
        """`bias=None`: use the bias when the file has one."""
        weight = w.get(f"{name}.weight", (n_out, n_in, *_pair(kernel)))
        return cls(weight, _bias(w, name, n_out, bias), stride, padding, dilation)

    def forward(self, x: Tensor) -> Tensor:
        y = x.conv2d(self.weight, self.stride, self.padding, self.dilation)  # (N, Cout, OH, OW)
        if self.bias is None:
            return y
        # (Cout, 1, 1) broadcasts over each channel's map; a weight joins y's context
        # (only tensors of a context can be reshaped)
        b = context_of(y).attach(self.bias).reshape(self.bias.shape[0], 1, 1)
        return y.add(b)


class PatchEmbedding:
    """Non-overlapping patch x patch squares of an image, each projected to `dim`: a
    convolution with kernel = stride = patch. (C, H, W) or (N, C, H, W) -> rows
    (N * H/patch * W/patch, dim), patches in row-major order (a row of patches, then the
    next), as SigLIP and CLIP flatten them (torch: `conv(x).flatten(2).transpose(1, 2)`)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, patch: int) -> None:
        self.weight, self.bias, self.patch = weight, bias, patch

    @classmethod
    def bind(
        cls,
        w: Weights,
        name: str,
        dim: int,
        channels: int,
        patch: int,
        *,
        bias: bool | None = False,
    ) -> PatchEmbedding:
        """`bias=None`: use the bias when the file has one."""
        weight = w.get(f"{name}.weight", (dim, channels, patch, patch))
        return cls(weight, _bias(w, name, dim, bias), patch)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patches down and across an image of this size."""
        return height // self.patch, width // self.patch

    def forward(self, x: Tensor) -> Tensor:
        if len(x.shape) == 3:
            x = x.reshape(1, *x.shape)
        y = x.conv2d(self.weight, self.patch)  # (N, D, GH, GW)
        n, d, gh, gw = y.shape
        rows = y.permute(0, 2, 3, 1).reshape(n * gh * gw, d)  # (N * GH * GW, D)
        # the bias after flattening: one per row's last axis, not a broadcast over maps
        return rows.add(self.bias) if self.bias is not None else rows
