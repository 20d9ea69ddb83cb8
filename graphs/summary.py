"""summarize(graph): the numbers `autopar inspect` prints."""

from __future__ import annotations

from .ir import OpGraph


def summarize(graph: OpGraph) -> dict:
    layers = [{
        "index": L.index, "name": L.name, "nodes": len(L.nodes), "params": L.param_count,
        "fwd_flops": L.fwd_flops, "structural_hash": L.structural_hash,
    } for L in graph.layers]
    kinds: dict[str, list[int]] = {}
    for L in graph.layers:
        kinds.setdefault(L.structural_hash, []).append(L.index)
    op_hist: dict[str, int] = {}
    for n in graph.nodes():
        op_hist[n.op] = op_hist.get(n.op, 0) + 1
    tokens = graph.batch * graph.seq
    fwd = graph.fwd_flops
    return {
        "name": graph.name,
        "batch": graph.batch,
        "seq": graph.seq,
        "dtype": graph.meta.get("dtype"),
        "meta": dict(graph.meta),
        "params": graph.param_count,
        "param_bytes": graph.param_bytes,
        "forward_flops": fwd,
        "backward_flops": graph.bwd_flops,
        "forward_flops_per_token": fwd / tokens if tokens else None,
        "nodes": len(graph),
        "edges": graph.g.number_of_edges(),
        "layers": len(graph.layers),
        "layer_table": layers,
        # layers with equal structural hash, i.e. the distinct layers a solver has to cost
        "distinct_layer_kinds": len(kinds),
        "layer_kinds": [{"structural_hash": h, "layers": idx} for h, idx in kinds.items()],
        "op_kind_histogram": graph.kind_histogram(),
        "op_histogram": dict(sorted(op_hist.items())),
        "unsupported": [{"name": name, "op": graph.node(name).op,
                         "target": graph.node(name).target,
                         "module_path": graph.node(name).module_path}
                        for name in graph.unsupported],
    }
