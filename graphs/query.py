"""Queries on an OpGraph that the planner, evaluator, baselines and runtime share: which ops a
stage holds, what crosses its boundary, and where eager attention's core is."""

from __future__ import annotations

from .ir import INPUT, MATMUL, OpGraph


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
    tensor looks the same when hidden == seq (Llama-2-7B at 4096 tokens)."""
    s = graph.seq
    core: list[str] = []
    seen: set[str] = set()
    for n in names:
        node = graph.node(n)
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
