"""Where a model's layers go, and whether it fits: pure functions over byte counts.

Ollama's rules: the input embeddings stay on the CPU; `blk.N.*` live on layer N's
device; the output layer (`output`, `output_norm`, ...) is layer `n_layers` and counts as
a layer for `num_gpu`. Layers are packed onto GPUs from the output layer backwards, most
free memory first. Nothing here touches a device: backends measure, these functions
decide, and the fit check runs before any allocation. `estimate` is the one memory
estimate, from GGUF metadata alone: the server's scheduler checks it before starting a
runner, and `plan` lays the same numbers out over the devices.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from herd.errors import GGUFError, OutOfMemoryError
from herd.gguf import Config, GGUFFile
from herd.gguf.reader import as_int
from herd.ml.base import BackendOptions, DeviceInfo

INPUT_TENSORS = ("token_embd.", "position_embd.", "token_norm_embd.", "token_types.")
OUTPUT_TENSORS = ("output.", "output_norm.", "cls.", "altup_", "per_layer_", "v.", "mm.", "s.")
_BLOCK = re.compile(r"blk\.(\d+)\.")


def tensor_layer(name: str, n_layers: int) -> int | None:
    """The layer a GGUF tensor belongs to: N for `blk.N.*`, `n_layers` for the output
    layer's tensors, None for the input embeddings and anything else (kept on the CPU)."""
    if m := _BLOCK.match(name):
        return int(m.group(1))
    if name.startswith(OUTPUT_TENSORS):
        return n_layers
    return None


def layout(
    n_layers: int,
    layer_bytes: Sequence[int],
    free: Sequence[int],
    num_gpu: int,
    spread: bool = False,
) -> list[int | None]:
    """The GPU (index into `free`) of each layer 0..n_layers, or None for the CPU.

    `layer_bytes[i]`: what layer i needs on its device (weights + KV cache); the last
    entry is the output layer. `free[g]`: what GPU g can give to layers (its compute
    buffer already set aside). `num_gpu`: -1 = as many layers as fit, 0 = none, N = the
    last N layers, placed even where they do not fit (the fit check then says so).
    With -1, when not every layer fits, the output layer is also tried on the CPU and
    whichever choice offloads more repeating layers wins (as Ollama does).
    `spread` (OLLAMA_SCHED_SPREAD; RPC servers): every layer on the GPUs, in contiguous
    runs sized by each one's free memory (GPU 0 the first layers), where that fits.
    """
    assert len(layer_bytes) == n_layers + 1, f"{len(layer_bytes)} sizes for {n_layers} + 1"
    if num_gpu == 0 or not free:
        return [None] * (n_layers + 1)
    if spread and num_gpu < 0 and (even := _spread(layer_bytes, free)) is not None:
        return even
    everything = list(range(n_layers, -1, -1))  # the output layer first
    if num_gpu > 0:
        return _pack(everything[:num_gpu], layer_bytes, free, force=True)
    with_output = _pack(everything, layer_bytes, free, force=False)
    if None not in with_output:
        return with_output
    without = _pack(everything[1:], layer_bytes, free, force=False)
    offloaded = [sum(d is not None for d in p[:n_layers]) for p in (with_output, without)]
    return without if offloaded[1] > offloaded[0] else with_output


def _spread(sizes: Sequence[int], free: Sequence[int]) -> list[int | None] | None:
    """Every layer on the GPUs in contiguous runs, GPU g's run ending where the running
    share of free memory reaches g's (llama.cpp's split for --rpc); None if a run does not
    fit its GPU."""
    total, n = sum(free), len(sizes)
    if total <= 0:
        return None
    placed: list[int | None] = []
    share = 0
    for g, f in enumerate(free):
        share += f
        end = n if g == len(free) - 1 else round(n * share / total)
        placed += [g] * (end - len(placed))
    need = [0] * len(free)
    for i, g in enumerate(placed):
        need[g] += sizes[i]  # type: ignore[index]
    return placed if all(need[g] <= free[g] for g in range(len(free))) else None


def _pack(
    layers: list[int], sizes: Sequence[int], free: Sequence[int], force: bool
) -> list[int | None]:
    """Fill the GPUs, most free memory first, with `layers` in order until one does not
    fit (`force`: put the rest where the most is left anyway)."""
    order = sorted(range(len(free)), key=lambda d: -free[d])
    placed: list[int | None] = [None] * len(sizes)
    left, g = list(free), 0
    for i in layers:
        while g < len(order) and sizes[i] > left[order[g]]:
            g += 1
        if g == len(order):
            if not force:
                break
            dev = max(order, key=lambda d: left[d])  # overflow where the most is left
        else:
            dev = order[g]
        placed[i] = dev
        left[dev] -= sizes[i]
    return placed


@dataclass
class DeviceNeed:
    """What one device must hold, in bytes."""

    name: str
    free: int
    gpu: bool = False
    weights: int = 0
    cache: int = 0
    graph: int = 0
    layers: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.graph


def check_fit(needs: Sequence[DeviceNeed], num_gpu: int) -> None:
    """Raise OutOfMemoryError naming the sizes when a device cannot hold its part."""
    for d in needs:
        if d.total <= d.free:
            continue
        hint = ""
        if d.gpu and num_gpu > 0:
            hint = f" with num_gpu = {num_gpu}; lower num_gpu (-1 picks what fits)"
        elif d.cache > d.weights:
            hint = "; lower num_ctx"
        raise OutOfMemoryError(
            f"model requires more {'memory on ' + d.name if d.gpu else 'system memory'} "
            f"({size(d.total)}: weights {size(d.weights)}, KV cache {size(d.cache)}, compute "
            f"{size(d.graph)}) than is available ({size(d.free)}){hint}"
        )


MAX_LAYERS = 4096  # llama.cpp allows 512; a corrupt count must not size lists
GPU_OVERHEAD = 256 << 20  # per GPU in use: driver context, kernels, allocator slack
# bytes per KV cache element, block scales included (q8_0: 34 bytes per 32, q4_0: 18)
KV_ELEMENT_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 1.0625, "q4_0": 0.5625}


@dataclass(frozen=True)
class Estimate:
    """A model's memory from its GGUF metadata alone, in bytes: what the scheduler checks
    before starting a runner, and what `plan` lays out over the devices."""

    weights: int  # the caller's count: the file's size, or its tensors' bytes
    cache: list[int]  # KV cache per layer 0..n_layers-1
    graph: int  # compute buffer of one forward pass of a full batch

    @property
    def total(self) -> int:
        return self.weights + sum(self.cache) + self.graph


def estimate(
    kv: dict[str, Any],
    weights: int,
    *,
    num_ctx: int,
    num_batch: int,
    kv_cache_type: str = "f16",
    sequences: int = 1,
    n_layers: int | None = None,
) -> Estimate:
    """What a model with metadata `kv` needs for `sequences` x num_ctx cache cells (num_ctx
    capped at the model's context length; 0: weights only) and batches of num_batch.

    The cache is Ollama's estimate (cells x KV heads x (key + value dims) per layer, at
    the cache type's element size); the compute buffer holds the logits, one layer's
    attention scores (composed attention) and a few activations, in F32.
    """
    cfg = Config(kv, str(kv.get("general.architecture", "")))
    if n_layers is None:
        n_layers = cfg.int("block_count", 0)
    if not 0 <= n_layers <= MAX_LAYERS:  # before lists of n_layers are made
        raise GGUFError(
            f"metadata key {cfg.key('block_count')}: {n_layers} layers (0 to {MAX_LAYERS})"
        )
    n_ctx = min(num_ctx, cfg.int("context_length", num_ctx))
    n_head = _largest(cfg, "attention.head_count")
    n_embd = cfg.int("embedding_length", 0)
    cache = [0] * n_layers
    if n_ctx and n_head and n_layers:
        heads = cfg.get("attention.head_count_kv", n_head)
        kv_heads = _per_layer(cfg, "attention.head_count_kv", heads, n_layers)
        kv_heads += [kv_heads[-1] if kv_heads else n_head] * (n_layers - len(kv_heads))
        k_dim = cfg.int("attention.key_length", n_embd // n_head)
        v_dim = cfg.int("attention.value_length", n_embd // n_head)
        per = KV_ELEMENT_BYTES.get(kv_cache_type, 2.0)
        cache = [int(sequences * n_ctx * h * (k_dim + v_dim) * per) for h in kv_heads[:n_layers]]
    n_batch = min(num_batch, n_ctx) if n_ctx else num_batch
    n_ff = _largest(cfg, "feed_forward_length")
    graph = 4 * n_batch * (_vocab_size(cfg) + n_head * n_ctx + 4 * n_embd + 2 * n_ff)
    return Estimate(weights, cache, graph)


def estimate_projector(kv: dict[str, Any], weights: int) -> Estimate:
    """What a projector file (llama.cpp's mmproj: `clip.vision.*` metadata) needs beside
    its text model: its weights, no cache, and the compute buffer of one image's encoding
    in F32: the pixels, a few activations of every patch and one layer's attention
    scores (heads x patches^2), which dominate at Gemma 3's 4096 patches."""
    cfg = Config(kv, str(kv.get("general.architecture", "")))
    size, patch = cfg.int("vision.image_size", 0), cfg.int("vision.patch_size", 0)
    patches = (size // patch) ** 2 if patch else 0
    n_embd = cfg.int("vision.embedding_length", 0)
    n_ff = cfg.int("vision.feed_forward_length", 0)
    heads = cfg.int("vision.attention.head_count", 0)
    channels = cfg.int("vision.num_channels", 3)
    graph = 4 * (channels * size * size + patches * (4 * n_embd + n_ff + heads * patches))
    return Estimate(weights, [], graph)


def _largest(cfg: Config, name: str) -> int:
    """A metadata number that may also be stored per layer (the largest then); 0 if absent."""
    value = cfg.get(name, 0)
    return max(_per_layer(cfg, name, value, 1), default=0)


def _per_layer(cfg: Config, name: str, value: Any, n_layers: int) -> list[int]:
    """A count stored once or per layer, as non-negative ints: GGUFError naming the key for
    anything else (metadata comes from an untrusted file)."""
    values = value if isinstance(value, list) else [value] * n_layers
    out = [as_int(cfg.key(name), v) for v in values]  # GGUFError on a wrong type
    if any(v < 0 for v in out):
        raise GGUFError(f"metadata key {cfg.key(name)}: negative value in {values[:8]}")
    return out


def _vocab_size(cfg: Config) -> int:
    tokens = cfg.get("tokenizer.ggml.tokens", None)
    return len(tokens) if isinstance(tokens, list) else cfg.int("vocab_size", 0)


@dataclass
class Plan:
    """Where a model's tensors go and what each device will hold (CPU need last)."""

    n_layers: int
    layers: list[int | None]  # device of layer 0..n_layers (index into the GPUs, or None)
    gpus: list[int]  # the GPUs in use
    tensors: dict[str, int | None]  # device of each GGUF tensor
    alias_output: bool  # tied embeddings: token_embd copied as output.weight to the GPU
    needs: list[DeviceNeed]
    graph: int  # compute buffer estimate per device that computes

    def device_of(self, layer: int | None) -> int | None:
        return self.layers[layer] if layer is not None and 0 <= layer < len(self.layers) else None


def plan(
    gguf: GGUFFile,
    options: BackendOptions,
    gpus: Sequence[DeviceInfo],
    cpu: DeviceInfo,
    others_on_gpu: bool = False,
) -> Plan:
    """Lay the model out over `gpus` (free memory as probed) and the CPU, and check it
    fits: OutOfMemoryError naming the sizes, before anything is allocated.

    `others_on_gpu`: tensors of no layer (besides the input embeddings) go to the first
    GPU in use instead of the CPU (op tests on a device).
    """
    cfg = Config(gguf.kv, str(gguf.kv.get("general.architecture", "")))
    blocks = [int(m.group(1)) for n in gguf.tensors if (m := _BLOCK.match(n))]
    n_layers = max(cfg.int("block_count", 0), max(blocks, default=-1) + 1)
    if n_layers > MAX_LAYERS:  # a corrupt count or tensor name must not size the lists below
        raise GGUFError(
            f"{gguf.path}: {n_layers} layers (block_count, blk.N names): over {MAX_LAYERS}"
        )
    where = {name: tensor_layer(name, n_layers) for name in gguf.tensors}
    weights = [0] * (n_layers + 1)
    for name, layer in where.items():
        if layer is not None:
            weights[layer] += gguf.tensors[name].nbytes
    embd = gguf.tensors.get("token_embd.weight")
    tied = "output.weight" not in gguf.tensors and embd is not None
    if tied and embd is not None:
        weights[n_layers] += embd.nbytes
    est = estimate(
        gguf.kv,
        sum(t.nbytes for t in gguf.tensors.values()),
        num_ctx=options.num_ctx,
        num_batch=options.num_batch,
        kv_cache_type=options.kv_cache_type,
        n_layers=n_layers,
    )
    cache, graph = [*est.cache, 0], est.graph
    free = [max(0, g.free_memory - graph - GPU_OVERHEAD) for g in gpus]
    need = [w + c for w, c in zip(weights, cache, strict=True)]
    spread = options.sched_spread or bool(options.rpc_servers)  # llama.cpp's --rpc split
    layers = layout(n_layers, need, free, options.num_gpu, spread)

    # a GPU is in use when it holds something (an empty output layer does not count)
    used = sorted({d for d, n in zip(layers, need, strict=True) if d is not None and n})
    if others_on_gpu and not used and gpus and options.num_gpu != 0:
        used = [0]
    layers = [d if d in used else None for d in layers]
    rest = used[0] if used and others_on_gpu else None  # where tensors of no layer go
    tensors: dict[str, int | None] = {}
    for name, layer in where.items():
        if layer is not None:
            tensors[name] = layers[layer]
        else:
            tensors[name] = None if name.startswith(INPUT_TENSORS) else rest
    needs = [
        DeviceNeed(gpus[g].name, gpus[g].free_memory, True, graph=graph + GPU_OVERHEAD)
        for g in used
    ]
    by_gpu = dict(zip(used, needs, strict=True))
    cpu_need = DeviceNeed(cpu.name, cpu.free_memory, graph=graph)
    for name, dev in tensors.items():
        (by_gpu[dev] if dev is not None else cpu_need).weights += gguf.tensors[name].nbytes
    alias = tied and layers[n_layers] is not None
    if alias and embd is not None:
        by_gpu[layers[n_layers]].weights += embd.nbytes
    for i, dev in enumerate(layers):
        d = by_gpu[dev] if dev is not None else cpu_need
        d.cache += cache[i]
        d.layers.append(i)
    needs.append(cpu_need)
    check_fit(needs, options.num_gpu)
    return Plan(n_layers, layers, used, tensors, alias, needs, graph)


def size(n: int) -> str:
    """Bytes for people: 1.5 GiB, 320.0 MiB, 12.0 KiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
