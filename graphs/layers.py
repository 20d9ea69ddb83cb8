"""Grouping ops into layers, the unit the pipeline-stage DP slices.

Transformers: layer 0 "embed" (everything before the first block), one layer per block
("block.i", found from the module path "blocks.i.", HF "layers.i." / "h.i." / "layer.i." / "block.i."), and a last
"head" layer (final norm, head, loss). Other graphs: the operator clustering DP of Alpa §5.2
(solvers/clustering.py) splits the op sequence into groups of near-equal FLOPs with small
boundary tensors.

Each layer gets a structural hash over its ops, attrs, shapes and wiring expressed relative to
the layer, so identical blocks hash equal and their costs are computed once.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np

from solvers.clustering import cluster_ops

from .ir import Layer, OpGraph, OpNode

# zoo "blocks.i", HF "layers.i" (Llama, Mistral, ...), "h.i" (GPT-2), "layer.i" (BERT),
# "block.i" (T5)
BLOCK_RE = re.compile(r"(?:^|\.)(?:blocks|layers|layer|block|h)\.(\d+)(?=\.|$)")
DEFAULT_CLUSTERS = 8


def block_of(module_path: str) -> tuple[int, str] | None:
    """(block index, module prefix up to and including the index) of a module path."""
    m = BLOCK_RE.search(module_path)
    if m is None:
        return None
    return int(m.group(1)), module_path[:m.end()]


def assign_layers(graph: OpGraph, n_layers: int | None = None) -> list[Layer]:
    """Set graph.layers and every node's `layer`; returns graph.layers."""
    nodes = list(graph.nodes())
    if not nodes:
        graph.layers = []
        return graph.layers
    blocks = [block_of(n.module_path) for n in nodes]
    if any(b is not None for b in blocks):
        groups, names, prefixes = _transformer_groups(nodes, blocks)
    else:
        groups = _cluster_groups(graph, nodes, n_layers or DEFAULT_CLUSTERS)
        names = [f"cluster.{i}" for i in range(len(groups))]
        prefixes = [""] * len(groups)
    graph.layers = []
    for i, (members, name, prefix) in enumerate(zip(groups, names, prefixes)):
        for n in members:
            n.layer = i
        graph.layers.append(Layer(
            index=i, name=name, nodes=tuple(n.name for n in members),
            structural_hash=structural_hash(members, prefix),
            fwd_flops=float(sum(n.fwd_flops for n in members)),
            param_count=int(sum(n.param_count for n in members))))
    return graph.layers


def _transformer_groups(nodes: list[OpNode], blocks):
    positions = [i for i, b in enumerate(blocks) if b is not None]
    first, last = positions[0], positions[-1]
    order: list[int] = []              # block indices in order of first appearance
    prefix: dict[int, str] = {}
    for b in blocks:
        if b is not None and b[0] not in prefix:
            order.append(b[0])
            prefix[b[0]] = b[1]
    embed: list[OpNode] = []
    head: list[OpNode] = []
    per_block: dict[int, list[OpNode]] = {i: [] for i in order}
    current = order[0]
    for pos, (n, b) in enumerate(zip(nodes, blocks)):
        if b is not None:
            current = b[0]
            per_block[current].append(n)
        elif pos < first:
            embed.append(n)
        elif pos > last:
            head.append(n)
        else:
            per_block[current].append(n)   # glue between blocks belongs to the one before
    groups, names, prefixes = [], [], []
    if embed:
        groups.append(embed); names.append("embed"); prefixes.append("")
    for i in order:
        groups.append(per_block[i]); names.append(f"block.{i}"); prefixes.append(prefix[i])
    if head:
        groups.append(head); names.append("head"); prefixes.append("")
    return groups, names, prefixes


def cut_bytes(graph: OpGraph, nodes: list[OpNode]) -> np.ndarray:
    """cut[i] = bytes of the tensors crossing a cut just before op i (cut[0] = 0)."""
    pos = {n.name: i for i, n in enumerate(nodes)}
    diff = np.zeros(len(nodes) + 1)
    for n in nodes:
        consumers = [pos[c] for c in graph.consumers(n.name)]
        if not consumers:
            continue
        last = max(consumers)
        if last > pos[n.name]:
            # the output is live across every cut between producer and last consumer,
            # counted once however many consumers read it
            diff[pos[n.name] + 1] += n.out_bytes
            diff[last + 1] -= n.out_bytes
    return np.cumsum(diff)[:len(nodes)]


def _cluster_groups(graph: OpGraph, nodes: list[OpNode], n_layers: int) -> list[list[OpNode]]:
    n_layers = max(1, min(n_layers, len(nodes)))
    # a training step runs both passes, so clusters balance forward + backward FLOPs
    flops = np.array([n.fwd_flops + n.bwd_flops for n in nodes], dtype=float)
    cuts = cut_bytes(graph, nodes)
    starts = [int(i) for i in cluster_ops(flops, cuts, n_layers)]
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = list(starts) + [len(nodes)]
    return [nodes[bounds[i]:bounds[i + 1]] for i in range(len(starts))
            if bounds[i + 1] > bounds[i]]


# ---------------------------------------------------------------------------------------

def _relative(name: str, prefix: str) -> str:
    if prefix and name.startswith(prefix):
        return name[len(prefix):]
    return name


def layer_signature(members: list[OpNode], prefix: str = "") -> list:
    """The layer's op sequence with names replaced by positions (see module doc)."""
    local = {n.name: i for i, n in enumerate(members)}
    external: dict[tuple[str, int], int] = {}
    sig = []
    for n in members:
        ops = []
        for o in n.operands:
            if o.source is not None and o.source in local:
                ref = ["local", local[o.source], o.source_index]
            elif o.source is not None:
                ref = ["input", external.setdefault((o.source, o.source_index), len(external))]
            elif o.param is not None:
                ref = ["param", _relative(o.param, prefix), o.owns_param]
            else:
                ref = ["const"]
            ops.append([list(o.shape), o.dtype, ref])
        attrs = {k: v for k, v in n.attrs.items() if k != "input"}
        sig.append([n.op, n.kind, [list(s) for s in n.out_shapes], n.out_dtype, attrs, ops])
    return sig


def structural_hash(members: list[OpNode], prefix: str = "") -> str:
    text = json.dumps(layer_signature(members, prefix), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
