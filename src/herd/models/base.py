"""What every architecture provides, the batch it is given, and the inputs made from it.

A forward pass starts in the runner, not in the model: the runner lets the cache claim
cells for the batch and build its mask (`cache.start_forward`), makes the batch's own
inputs (`batch_inputs`), and only then calls `model.forward(ctx, inputs)`. Everything a
pass takes from the batch is made by those two calls, so a graph backend can rerun the
graph of an earlier pass by recording only them (see `herd.runner.engine`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from herd.gguf import Config
from herd.kvcache.causal import BatchLayout
from herd.ml import Backend, Context, DType, Tensor


@dataclass(frozen=True)
class BatchImage:
    """An encoded image in a batch: its placeholder tokens are rows `row` to
    `row + rows - 1` of the batch (never split between batches), and `embedding` is what
    the model's `Vision.encode` made of it (host memory; the runner caches it by digest)."""

    row: int
    rows: int
    embedding: np.ndarray  # float32, the architecture's shape (Gemma 3: (rows, n_embd))


@dataclass
class Batch:
    """One forward pass worth of tokens, possibly from several sequences.

    `outputs`: indices into the batch of the tokens whose logits are wanted, increasing (a
    sequence's last prompt token, every decode token, or every token for teacher forcing).
    `images`: the encoded images whose placeholder tokens are in the batch, by row.
    """

    tokens: np.ndarray  # (T,) int32
    positions: np.ndarray  # (T,) int32
    sequences: np.ndarray  # (T,) int32
    outputs: np.ndarray  # (N,) int32
    images: list[BatchImage] = field(default_factory=list)

    @property
    def spans(self) -> list[tuple[int, int]]:
        """(first row, rows) of each image's placeholders: a cache built with
        `bidirectional=True` lets the rows of one span see each other (Gemma 3)."""
        return [(im.row, im.rows) for im in self.images]

    @classmethod
    def single(
        cls, tokens: list[int], start: int = 0, seq: int = 0, outputs: str = "last"
    ) -> Batch:
        n = len(tokens)
        outs = np.arange(n) if outputs == "all" else np.array([n - 1])
        return cls(
            np.asarray(tokens, np.int32),
            np.arange(start, start + n, dtype=np.int32),
            np.full(n, seq, np.int32),
            outs.astype(np.int32),
        )


@dataclass(slots=True)
class Inputs:
    """A batch's inputs to one forward pass, made by `batch_inputs`."""

    batch: Batch
    tokens: Tensor  # (T,) I32
    positions: Tensor  # (T,) I32
    outputs: Tensor  # (N,) I32: rows of the batch whose logits are wanted
    # the batch's encoded images, one input each (`Batch.images`' order), and for models
    # whose images take the place of token embeddings, where each row's embedding comes
    # from: row t of the token embeddings, or row T + j of the images' rows stacked
    images: list[Tensor] = field(default_factory=list)
    image_index: Tensor | None = None  # (T,) I32, None without images

    @property
    def rows(self) -> Tensor | None:
        """The rows the last layer keeps: `outputs`, or None where they are every row of
        the batch (a decode step, teacher forcing) and there is nothing to select."""
        return None if len(self.batch.outputs) == len(self.batch.tokens) else self.outputs


def batch_inputs(ctx: Context, batch: Batch) -> Inputs:
    """The batch's token ids, positions, output rows and images as inputs, always in this
    order (a rerun graph is given its inputs in the order they were made)."""
    inputs = Inputs(
        batch,
        ctx.input(batch.tokens, DType.I32),
        ctx.input(batch.positions, DType.I32),
        ctx.input(batch.outputs, DType.I32),
    )
    if batch.images:
        inputs.images = [ctx.input(im.embedding) for im in batch.images]
        index = np.arange(len(batch.tokens), dtype=np.int32)
        stacked = len(batch.tokens)
        for im in batch.images:
            index[im.row : im.row + im.rows] = np.arange(stacked, stacked + im.rows)
            stacked += im.rows
        inputs.image_index = ctx.input(index, DType.I32)
    return inputs


Pixels = Any  # an image as a model's `preprocess` gives it (its own type, NumPy inside)


@runtime_checkable
class Vision(Protocol):
    """A model that takes images (Ollama's MultimodalProcessor), beside `Model`.

    The runner decodes an image's bytes (`herd.models.imageproc.decode`: `ImageError` for
    bytes that are no image or too big), preprocesses it (`preprocess`, CPU only),
    encodes each distinct image once (`encode` in a context of
    its own; the output is kept by the bytes' digest), and puts `image_tokens(pixels)`
    placeholder tokens (`image_token`) in the prompt where the image goes, between the
    two halves of `image_text` (text tokenized with the prompt, special tokens parsed).
    The batch holding the placeholders carries the encoded image (`Batch.images`,
    `Inputs.images`), and `forward` uses it as the architecture needs: Gemma 3 puts its
    rows in place of the placeholders' embeddings, mllama reads it in its cross-attention
    layers.
    """

    vision: Any  # the vision encoder; None where the file has none (a text-only Gemma 3)
    image_token: int
    image_text: tuple[str, str]
    # most images a prompt may hold (0: any); a conversation with more keeps its latest
    max_images: int

    def preprocess(self, image: Any) -> Pixels:
        """The model's input for a decoded RGB image (a `PIL.Image.Image`), exactly as the
        research implementation's image processor makes it."""

    def image_tokens(self, pixels: Pixels) -> int: ...
    def encode(self, ctx: Context, pixels: Pixels) -> Tensor:
        """The encoded image, as `BatchImage.embedding` will hold it once computed."""


class KeptRows(Protocol):
    """A host copy of a sequence's cached rows (`Cache.snapshot`), perhaps of its later
    positions only, built on another's."""

    @property
    def nbytes(self) -> int:
        """The bytes of its own rows."""

    def pieces(self) -> Sequence[KeptRows]:
        """Itself and what it builds on: what holding it holds (`nbytes` each)."""


class Cache(Protocol):
    """A model's KV cache (`herd.kvcache`: `Causal`, `Wrapper`), as the runner and the
    model use it."""

    # runner side
    def init(
        self, backend: Backend, dtype: DType, max_sequences: int, capacity: int, max_batch: int
    ) -> None:
        """Allocate `max_sequences` x `capacity` cells; batches of up to `max_batch`."""

    def start_forward(self, ctx: Context, batch: BatchLayout) -> None:
        """Claim cells for the batch and make this pass's cache inputs (locations, mask)."""

    def view_key(self) -> Hashable:
        """What the pass attends over: passes with equal keys and input shapes share a graph."""

    def remove(self, seq: int, begin: int, end: int | None = None) -> None:
        """Forget positions [begin, end) of a sequence (None: to its end)."""

    def snapshot(self, seq: int, n: int, base: Any = None, start: int = 0) -> KeptRows | None:
        """A host copy of a sequence's positions < n (None: not possible here); with a
        base, a snapshot of a prompt the sequence starts with, of positions start.. only."""

    def restore(self, seq: int, snap: Any, n: int, start: int = 0) -> bool:
        """Make a sequence hold a snapshot's first n positions (with `start`: keep its own
        positions before it, take the snapshot's start..n); False: it holds none."""

    def shareable(self, src: int, n: int) -> int:
        """How many of a sequence's first n positions another may share (`copy_prefix`)."""

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Let dst hold src's first n positions as src's cells (one copy for both)."""

    def used_cells(self) -> int: ...
    def stats(self) -> dict[str, float]:
        """Occupancy figures for /metrics ("cells_used", "cells", ...: `Causal.stats`)."""

    @property
    def size(self) -> int:
        """Cells in all (after `init`)."""

    # model side
    def set_layer(self, layer: int) -> None: ...


@dataclass(frozen=True)
class Projector:
    """A separate projector file (llama.cpp's `mmproj` layout: `general.architecture`
    "clip", the vision encoder and projector alone) opened on a backend of its own: its
    metadata (`config.kv` holds every key, `clip.*` among them) and its weights."""

    config: Config
    backend: Backend


@runtime_checkable
class TakesProjector(Protocol):
    """An architecture that can take its vision part from a projector file
    (`load_model(config, backend, projector=...)`); one without this takes none."""

    @classmethod
    def from_gguf_with_projector(
        cls, config: Config, backend: Backend, projector: Projector
    ) -> Model:
        """The text model bound to `backend`, its vision encoder to `projector.backend`;
        the architecture checks that the projector fits it (projector type, widths)."""


class Model(Protocol):
    """An architecture bound to a backend's weights.

    `forward` returns logits (N, n_vocab) for the batch's output rows; an embedding model
    (`is_embedding`, no cache) returns one vector per sequence of the batch instead.
    """

    config: Config
    backend: Backend
    n_vocab: int
    context_length: int
    is_embedding: bool

    @property
    def cache(self) -> Cache | None:
        """None for embedding models: they encode whole texts each pass."""

    @classmethod
    def from_gguf(cls, config: Config, backend: Backend) -> Model: ...

    def forward(self, ctx: Context, inputs: Inputs) -> Tensor: ...

    def shift(self, ctx: Context, layer: int, key: Tensor, delta: Tensor) -> Tensor:
        """Keys (N, Hkv, D) of `layer` moved by `delta` (N,) positions (re-roped)."""
