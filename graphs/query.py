"""Queries on an OpGraph that the planner, evaluator, baselines and runtime share: which ops a
stage holds, what crosses its boundary, where eager attention's core is, and which matmuls are
fused projections whose output is cut into parts."""

from __future__ import annotations

import re

from .annotate import is_unfused_attention
from .ir import INPUT, MATMUL, VIEW, OpGraph, OpNode


def stage_nodes(graph: OpGraph, layers: tuple[int, int]) -> list[str]:
    out: list[str] = []
    for li in range(layers[0], layers[1]):
        out.extend(graph.layers[li].nodes)
    return out


def boundary_inputs(graph: OpGraph, names: list[str]) -> list[str]:
    """Producers outside `names` whose outputs the set reads, graph inputs excluded."""
    inside = set(names)
    seen: dict[str, None] = {}
    for n in names:
        for o in graph.node(n).operands:
            if o.source is not None and o.source not in inside and graph.node(o.source).kind != INPUT:
                seen[o.source] = None
    return list(seen)


def main_boundary(graph: OpGraph, names: list[str]) -> str | None:
    """The boundary tensor a stage receives from the previous one (the largest, if several)."""
    b = boundary_inputs(graph, names)
    return max(b, key=lambda s: graph.node(s).out_bytes) if b else None


def attention_core(graph: OpGraph, names: list[str]) -> list[str]:
    """The ops of eager attention's core, what selective recomputation drops and reruns: an
    activation x activation matmul producing [.., s, s] scores (QK^T), and the ops that carry
    those scores on (scale, mask, softmax, dropout). Shape alone is not enough: a [b, s, h]
    tensor looks the same when hidden == seq (Llama-2-7B at 4096 tokens). An unfused attention
    traced as one op (attn=unfused, graphs/zoo/attention.py) is its own core: it keeps its
    scores, and the op's output is what the rest of the block reads."""
    s = graph.seq
    core: list[str] = []
    seen: set[str] = set()
    for n in names:
        node = graph.node(n)
        if is_unfused_attention(node):
            core.append(n)
            continue
        shape = node.out_shape
        if not (s > 1 and len(shape) >= 3 and shape[-1] == s and shape[-2] == s):
            continue
        if node.kind == MATMUL:
            starts = not any(o.is_param for o in node.operands) and sum(o.source is not None for o in node.operands) >= 2
        else:
            starts = any(o.source in seen for o in node.operands)
        if starts:
            core.append(n)
            seen.add(n)
    return core


# ---- fused projections ------------------------------------------------------------------------

_SPLITS = ("split", "chunk", "split_with_sizes", "tensor_split", "unbind")
_SLICE_RE = re.compile(r"slice\((-?\d+|None),(-?\d+|None),(-?\d+|None)\)")


def slice_bounds(node: OpNode) -> tuple[int, int, int] | None:
    """(dim, start, stop) when a view takes the contiguous range [start, stop) of one dim of its
    input (x[..., a:b], narrow, aten slice) and keeps every other dim whole; else None."""
    if node.kind != VIEW or "index" not in node.attrs or not node.operands:
        return None
    shape = node.operands[0].shape
    if node.op in ("slice", "narrow"):
        args = node.attrs["index"]
        dim = node.attrs.get("dim", 0)
        if not isinstance(args, list) or not args or not 0 <= dim < len(shape):
            return None
        start = args[0] if args[0] is not None else 0
        if node.op == "narrow":
            stop = start + (args[1] if len(args) > 1 else 0)
        else:
            stop = args[1] if len(args) > 1 and args[1] is not None else shape[dim]
            if len(args) > 2 and args[2] not in (None, 1):
                return None
        return _range_of(dim, start, stop, shape[dim])
    items = node.attrs["index"]
    items = items if isinstance(items, list) else [items]
    if any(not isinstance(x, str) for x in items) or items.count("...") > 1:
        return None
    if "..." in items:
        i = items.index("...")
        items = items[:i] + ["slice(None,None,None)"] * (len(shape) - len(items) + 1) + items[i + 1:]
    cut = []
    for d, text in enumerate(items):
        m = _SLICE_RE.fullmatch(text)
        if m is None or d >= len(shape):
            return None
        start, stop, step = (None if g == "None" else int(g) for g in m.groups())
        if step not in (None, 1):
            return None
        r = _range_of(d, start or 0, shape[d] if stop is None else stop, shape[d])
        if r is None:
            return None
        if (r[1], r[2]) != (0, shape[d]):
            cut.append(r)
    return cut[0] if len(cut) == 1 else None


def _range_of(dim: int, start: int, stop: int, size: int) -> tuple[int, int, int] | None:
    start = min(max(start + size if start < 0 else start, 0), size)
    stop = min(max(stop + size if stop < 0 else stop, 0), size)
    return (dim, start, stop) if start < stop else None


def fused_parts(graph: OpGraph, name: str) -> tuple[int, tuple[int, ...]] | None:
    """(output dim, part sizes) when a matmul's output along its last dim is only ever cut into
    parts: a fused q|k|v or gate|up projection. The output may pass through views that keep that
    dim whole (addmm's [b*s, n] -> [b, s, n], a permute) before one split / chunk along it, or be
    read only by slices that tile it. None for anything else (a NeoX-style reshape that splits
    the dim into [heads, 3*d] keeps the heads major: a plain split already serves it)."""
    node = graph.node(name)
    if node.kind != MATMUL or len(node.out_shapes) != 1 or not node.out_shape:
        return None
    out_dim = len(node.out_shape) - 1
    cur, dim = node, out_dim
    while True:
        readers = graph.consumers(cur.name)
        if not readers:
            return None
        nodes = [graph.node(r) for r in readers]
        if len(nodes) == 1 and nodes[0].op in _SPLITS:
            sizes = nodes[0].attrs.get("sizes")
            if nodes[0].attrs.get("dim") != dim or not sizes or len(sizes) < 2:
                return None
            return out_dim, tuple(int(x) for x in sizes)
        bounds = [slice_bounds(n) for n in nodes]
        if all(b is not None for b in bounds):
            cuts = sorted({(b[1], b[2]) for b in bounds if b is not None})
            if any(b is None or b[0] != dim for b in bounds) or len(cuts) < 2:
                return None
            edges = [0]
            for a, b in cuts:
                if a != edges[-1]:
                    return None
                edges.append(b)
            if edges[-1] != cur.out_shape[dim]:
                return None
            return out_dim, tuple(b - a for a, b in cuts)
        if len(nodes) != 1:
            return None
        kept = _kept_dim(nodes[0], dim, cur.out_shape)
        if kept is None:
            return None
        cur, dim = nodes[0], kept


def _kept_dim(view: OpNode, dim: int, in_shape: tuple[int, ...]) -> int | None:
    """Where a view puts input dim `dim` when it keeps it whole and alone, else None."""
    if view.kind != VIEW or "index" in view.attrs or len(view.out_shapes) != 1:
        return None
    perm = view.attrs.get("perm")
    if perm is not None:
        return list(perm).index(dim) if dim in perm else None
    for in_dims, out_dims in view.attrs.get("dim_groups", []):
        if list(in_dims) == [dim] and len(out_dims) == 1 and view.out_shape[out_dims[0]] == in_shape[dim]:
            return out_dims[0]
    if view.out_shape == in_shape and not view.attrs.get("dim_groups"):
        return dim          # contiguous / clone
    return None


def mark_fused_projections(graph: OpGraph) -> None:
    """Set attrs["fused_parts"] = [dim, [sizes]] on every matmul whose output is cut into parts
    (`fused_parts`): the sharding rules then offer to split that dim per part."""
    for node in graph.nodes():
        if node.kind == MATMUL:
            found = fused_parts(graph, node.name)
            if found is not None:
                node.attrs["fused_parts"] = [found[0], list(found[1])]
