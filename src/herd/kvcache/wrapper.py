"""A cache per layer type, for models that mix them (Gemma's sliding-window and global
layers; mllama's self-attention and cross-attention layers). Model calls go to the cache
of the current layer's type; runner calls fan out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from herd.kvcache.attend import Keys
from herd.kvcache.causal import BatchLayout, Causal
from herd.kvcache.encoder import Encoder
from herd.kvcache.rows import Snapshot
from herd.ml import Backend, Context, DType, Tensor


@dataclass(frozen=True)
class Snapshots:
    """Each cache's snapshot of one sequence, in `caches` order."""

    parts: tuple[Snapshot, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def pieces(self) -> list[Snapshot]:
        return [piece for p in self.parts for piece in p.pieces()]


class Wrapper:
    def __init__(self, caches: Sequence[Causal | Encoder], layer_types: Sequence[int]) -> None:
        """`layer_types[i]` is the index in `caches` that layer i uses."""
        self.caches, self.layer_types = list(caches), list(layer_types)
        self.current = self.caches[0]

    # runner side
    def init(
        self, backend: Backend, dtype: DType, max_sequences: int, capacity: int, max_batch: int
    ) -> None:
        for cache in self.caches:
            cache.init(backend, dtype, max_sequences, capacity, max_batch)

    def start_forward(self, ctx: Context, batch: BatchLayout) -> None:
        for cache in self.caches:
            cache.start_forward(ctx, batch)

    def remove(self, seq: int, begin: int, end: int | None = None) -> None:
        for cache in self.caches:
            cache.remove(seq, begin, end)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        for cache in self.caches:
            cache.copy_prefix(src, dst, n)

    def shareable(self, src: int, n: int) -> int:
        return min(cache.shareable(src, n) for cache in self.caches)

    def snapshot(
        self, seq: int, n: int, base: Snapshots | None = None, start: int = 0
    ) -> Snapshots | None:
        bases = base.parts if base is not None else (None,) * len(self.caches)
        pairs = zip(self.caches, bases, strict=True)
        parts = [cache.snapshot(seq, n, b, start) for cache, b in pairs]
        kept = [p for p in parts if p is not None]
        return Snapshots(tuple(kept)) if len(kept) == len(parts) else None

    def restore(self, seq: int, snap: Snapshots, n: int, start: int = 0) -> bool:
        pairs = zip(self.caches, snap.parts, strict=True)
        ok = all([cache.restore(seq, part, n, start) for cache, part in pairs])
        if not ok:  # all or nothing
            self.remove(seq, 0, None)
        return ok

    def view_key(self) -> tuple[object, ...]:
        return tuple(cache.view_key() for cache in self.caches)

    def can_resume(self, seq: int, pos: int) -> bool:
        return all(cache.can_resume(seq, pos) for cache in self.caches)

    def seq_length(self, seq: int) -> int:
        return self.caches[0].seq_length(seq)

    def used_cells(self) -> int:
        return self.caches[0].used_cells()

    def stats(self) -> dict[str, float]:
        return self.caches[0].stats()  # the caches see the same batches, laid out alike

    @property
    def size(self) -> int:
        return self.caches[0].size

    # model side
    def set_layer(self, layer: int) -> None:
        self.current = self.caches[self.layer_types[layer]]
        self.current.set_layer(layer)

    def put(self, k: Tensor, v: Tensor) -> None:
        self.current.put(k, v)

    def get(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.current.get()

    def prefix(self) -> tuple[Tensor, Tensor, Tensor] | None:
        return self.current.prefix()

    def blocks(self) -> list[tuple[int, int, Keys, Keys, Tensor]]:
        return self.current.blocks()
