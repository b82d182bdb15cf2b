"""`herd export onnx MODEL -o DIR`: a model's decode step as a standalone ONNX model.

The step is one token (T = 1) against a KV cache of `--num-ctx` cells (rounded up to the
ONNX backend's cache padding): the graph herd's ONNX backend runs for a decode step with
the whole cache attended, its weights written beside it. A prompt is fed token by token.
DIR gets model.onnx, model.onnx.data (the weights) and io.json: every input and output
with its dtype, shape and role, so a program with plain `onnxruntime` can run it:

    step t: token_ids [tok], positions [t], output_rows [0], write_cell [t],
            attention_mask 0 at cells 0..t (within the window, where one is named),
            -inf elsewhere; past_key.L / past_value.L the caller's buffers;
            after the run, present_key.L / present_value.L (the rows written at cell t)
            are stored into past_key.L / past_value.L at cell t.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from herd.errors import BackendError, HerdError, UnsupportedModelError


@click.group("export")
def export_cmd() -> None:
    """Export a model for another runtime."""


@export_cmd.command("onnx")
@click.argument("model")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True,
              help="Folder to write (model.onnx, model.onnx.data, io.json).")  # fmt: skip
@click.option("--num-ctx", default=2048, show_default=True, type=click.IntRange(1, 1 << 20),
              help="KV cache cells of the graph (rounded up to a multiple of 256).")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace DIR when it exists and is not empty.")
def export_onnx_cmd(model: str, out: Path, num_ctx: int, force: bool) -> None:
    """A model's decode step as an ONNX model that plain onnxruntime runs."""
    from herd.cli.format import human_bytes

    io = export_onnx(model, out, num_ctx=num_ctx, force=force)
    size = sum(p.stat().st_size for p in out.iterdir())
    click.echo(f"wrote {out} ({human_bytes(size)}): {io['architecture']}, "
               f"{io['context']} cells, {len(io['inputs'])} inputs", err=True)  # fmt: skip


def export_onnx(model: str, out: Path, *, num_ctx: int = 2048, force: bool = False) -> dict:
    """Export `model` (a store name or a .gguf path) into folder `out`; io.json's content.
    Refused before any work: an unknown model, an `out` that is not empty (unless
    `force`); after capture, an architecture whose step cannot be expressed. Nothing is
    left at `out` unless the whole export was written."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise HerdError(f"{out} exists and is not empty: choose another folder or pass --force")
    path = _model_path(model)
    from herd import envconfig
    from herd.gguf import open_gguf
    from herd.ml import BackendOptions, open_backend

    g = open_gguf(path)
    # the providers and disk cache the user set (HERD_ONNX_*), as a run would use; the
    # cache cells first, as the exported step's caller keeps it and stores rows into it
    options = {**envconfig.backend_options(), "onnx_kv_in_place": False}
    backend = open_backend("onnx", g, BackendOptions(num_ctx=num_ctx, **options))
    try:
        return _export(model, g, backend, out, num_ctx)
    finally:
        backend.close()


def _model_path(model: str) -> Path:
    from herd.store import Store
    from herd.store.facts import is_model_path

    if is_model_path(model):
        path = Path(model).expanduser()
        if not path.is_file():
            raise HerdError(f"{model}: no such file")
        return path
    return Path(Store().resolve(model).model_path)  # ModelNotFoundError: not pulled


def _export(name: str, g: Any, backend: Any, out: Path, num_ctx: int) -> dict:
    import numpy as np  # not at import: the CLI starts without the engine's libraries
    import onnxruntime as ort

    import herd
    from herd.kvcache import Causal, Wrapper
    from herd.ml import DType
    from herd.models import Batch, batch_inputs, load_model

    export = exporter()

    model = load_model(g.config(), backend)
    arch = g.architecture
    if model.is_embedding or model.cache is None:
        raise UnsupportedModelError(f"{name}: an embedding model ({arch}) has no decode step")
    cache = model.cache
    caches = cache.caches if isinstance(cache, Wrapper) else [cache]
    if not all(isinstance(c, Causal) for c in caches):
        raise UnsupportedModelError(
            f"{name}: {arch} keeps a cross-attention cache of encoded images, which the "
            "exported decode step cannot take"
        )
    cache.init(backend, DType.F16, 1, num_ctx, 1)
    size = caches[0].size
    # the cells before the step's taken, so the step attends the whole cache (its range
    # ends at the step's cell, padded): any cell is then a valid write_cell
    before = Batch(np.zeros(size - 1, np.int32), np.arange(size - 1, dtype=np.int32),
                   np.zeros(size - 1, np.int32), np.zeros(0, np.int32))  # fmt: skip
    with backend.new_context() as scratch:
        cache.start_forward(scratch, before)
    step = Batch(np.zeros(1, np.int32), np.array([size - 1], np.int32), np.zeros(1, np.int32),
                 np.zeros(1, np.int32))  # fmt: skip
    with backend.new_context() as ctx:
        cache.start_forward(ctx, step)
        inputs = batch_inputs(ctx, step)
        cap = export.capture(backend, ctx, model.forward(ctx, inputs))
        export.check(cap)
        names = _names(backend, caches, inputs, cap)
    meta = {
        "format": "herd-onnx-decode-step/1",
        "source": name,
        "architecture": arch,
        "herd_version": herd.__version__,
        "onnxruntime": ort.__version__,
        "context": size,
        "vocab": model.n_vocab,
        "step": "one token; feed a prompt token by token (see the herd.cli.export docstring)",
        "caches": [
            {
                "write_cell": _suffix("write_cell", i, caches),
                "mask": _suffix("attention_mask", i, caches),
                "window": c.window,
                "chunk": c.chunk,
                "layers": sorted(c.keys),
            }
            for i, c in enumerate(caches)
        ],  # fmt: skip
    }
    export.replace_dir(lambda tmp: export.write(cap, names, tmp, meta), out)
    return meta | {"inputs": list(names.inputs.values()), "outputs": list(names.outputs.values())}


def _suffix(base: str, i: int, caches: list[Any]) -> str:
    return base if len(caches) == 1 else f"{base}.{i}"


def exporter() -> Any:
    """herd.ml.backends.onnx.export, opened by name as ml/registry opens backends (the CLI
    imports no backend): a clear error where onnxruntime or onnx is missing."""
    import importlib

    try:
        return importlib.import_module("herd.ml.backends.onnx.export")
    except ImportError as e:
        raise BackendError(
            f"herd export onnx needs onnxruntime and onnx ({e.name} is not installed): "
            "pip install -e '.[onnx]'"
        ) from None


def _names(backend: Any, caches: list[Any], inputs: Any, cap: Any) -> Any:
    named: dict[str, dict[str, Any]] = {
        inputs.tokens.name: {"name": "token_ids", "role": "the step's token id"},
        inputs.positions.name: {"name": "positions", "role": "the token's position t"},
        inputs.outputs.name: {"name": "output_rows", "role": "[0]: the row whose logits come out"},
    }  # fmt: skip
    bufs: dict[int, tuple[str, str]] = {}  # cache buffer -> its input, its write cell's
    for i, c in enumerate(caches):
        named[c.locs.name] = {"name": _suffix("write_cell", i, caches),
                              "role": "the cache cell the step writes: t"}  # fmt: skip
        seen = "0 for cells 0..t" + (f" with t - cell < {c.window}" if c.window else "")
        if c.chunk:
            seen += f" and cell >= t - t % {c.chunk}"
        named[c.mask.name] = {"name": _suffix("attention_mask", i, caches),
                              "role": f"(1, cells): {seen}, -inf elsewhere"}  # fmt: skip
        for layer in sorted(c.keys):
            for kind, t in (("key", c.keys[layer]), ("value", c.values[layer])):
                gname = backend.input_name(t.host)
                bufs[id(t.host)] = (f"past_{kind}.{layer}", _suffix("write_cell", i, caches))
                named[gname] = {"name": f"past_{kind}.{layer}",
                                "role": "the caller's cache buffer, zeros at first"}  # fmt: skip
    fixed = exporter().fixed_inputs(cap.plan)
    unknown = [n for n in cap.plan.inputs if n not in named and n not in fixed]
    if unknown:
        raise UnsupportedModelError(f"onnx export: inputs the exporter cannot describe: {unknown}")
    outs: dict[str, dict[str, Any]] = {}
    result_name = cap.plan.outputs[0][0]
    outs[result_name] = {"name": "logits", "role": "(1, vocab) logits of the step's token"}
    for buf, at, _ids_in, _ids_out, _columns in cap.plan.writes:
        if id(buf) not in bufs:
            raise UnsupportedModelError("onnx export: a write to a tensor that is no KV cache")
        past, cell = bufs[id(buf)]
        written = cap.plan.outputs[at][0]
        outs[written] = {"name": past.replace("past_", "present_"),
                         "role": f"the rows written at {cell}: store them into {past} there",
                         "store_into": past, "at": cell}  # fmt: skip
    return exporter().Names(named, outs)
