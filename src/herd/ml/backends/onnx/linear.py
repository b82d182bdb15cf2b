"""Block-quantized linears of one pass (MatMulNBits), those reading the same x merged.

A decode step of a small model is mostly per-node overhead: SmolLM2 135M ran ~2000 ONNX
nodes a token. Linears that read the same activations (attention's q, k and v; the
feed-forward's gate and up) become one MatMulNBits over their weights stacked along N, its
output split after (`quant.concat`): as ORT's own fused QKV / gate-up, without the model
knowing. Merging happens while recording: the second linear on an x replaces the first's
nodes (at their place, before anything reads them) by the merged ones, whose Split makes
every member's output there. Stacked weights are made once per backend and set of names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from onnx import helper

from herd.ml.backends.onnx import quant

if TYPE_CHECKING:
    from herd.ml.backends.onnx.context import OnnxContext
    from herd.ml.backends.onnx.tensor import OnnxTensor


@dataclass
class _Group:
    """Linears of one x so far: their weights, output names and the nodes now in the graph."""

    names: list[str]
    nbs: list[quant.NBits]
    outs: list[str]
    nodes: list[Any]
    inits: list[str]


# per context: x's graph value -> its group; per backend: names -> stacked weights
_groups: WeakKeyDictionary[Any, dict[str, _Group]] = WeakKeyDictionary()
_stacked: WeakKeyDictionary[Any, dict[tuple[str, ...], quant.NBits]] = WeakKeyDictionary()


def _form(nb: quant.NBits) -> tuple[object, ...]:
    return (nb.k, nb.bits, nb.block_size, nb.offsets is None, nb.zero_points is None)


def record(
    ctx: OnnxContext, x: str, w: OnnxTensor, rank: int = 0, level: int = quant.ACCURACY_LEVEL
) -> str:
    """The graph value of x @ w.T for a weight w kept in blocks (w.q); `rank`: x's, where
    known (0: any)."""
    out = ctx.g.fresh()
    groups = _groups.setdefault(ctx, {})
    group = groups.get(x)
    if group is None or _form(group.nbs[0]) != _form(w.q) or w.wname in group.names:
        nodes, inits = quant.matmul_nbits_node("q:" + w.wname, x, out, w.q, level, rank == 2)
        ctx._quantized(nodes, inits)
        groups[x] = _Group([w.wname], [w.q], [out], nodes, [n for n, _ in inits])
        return out
    group.names.append(w.wname)
    group.nbs.append(w.q)
    group.outs.append(out)
    key = tuple(group.names)
    per_backend = _stacked.setdefault(ctx.backend, {})
    nb = per_backend.get(key)
    if nb is None:
        nb = per_backend[key] = quant.concat(group.nbs)
        start = 0
        for name, m in zip(group.names, group.nbs, strict=True):  # held once: views now
            ctx.backend.keep_blocks(name, quant.part(nb, start, m.n))
            start += m.n
    p = "q:" + "+".join(key)
    both = p + ".out"
    nodes, inits = quant.matmul_nbits_node(p, x, both, nb, level, rank == 2)
    split = ctx.g.const([m.n for m in group.nbs])
    nodes.append(helper.make_node("Split", [both, split], list(group.outs), name=p + ".parts",
                                  axis=-1))  # fmt: skip
    g = ctx.g
    at = next(i for i, node in enumerate(g.nodes) if node is group.nodes[0])
    g.nodes[at : at + len(group.nodes)] = []
    _forget(ctx, group.inits)
    n0 = len(g.nodes)
    ctx._quantized(nodes, inits)
    added = g.nodes[n0:]
    del g.nodes[n0:]
    g.nodes[at:at] = added
    group.nodes, group.inits = added, [n for n, _ in inits]
    return out


def _forget(ctx: OnnxContext, names: list[str]) -> None:
    """Drop the replaced nodes' large initializers, which nothing reads any more (the small
    ones are embedded constants, left to ORT's optimizer)."""
    g = ctx.g
    gone = {n for n in names if n in g.externals}
    for n in gone:
        del g.externals[n]
    g._declared[:] = [t for t in g._declared if t.name not in gone]
