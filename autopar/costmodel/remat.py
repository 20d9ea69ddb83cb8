"""What a compiled region keeps for its backward: the least bytes to save so that every tensor
the backward reads is either saved or recomputable in the backward from saved tensors.

torch.compile's AOTAutograd splits a region into forward and backward graphs by a minimum cut
(torch/_functorch/partitioners.py `min_cut_rematerialization_partition`): a tensor the
backward reads comes either from the forward (saved) or from ops replayed in the backward,
which may replay only recomputable ops (pointwise ops and views, fused into the backward's
kernels) whose own inputs are saved or recomputable. Ops it will not replay are the region's
inputs, compute-bound ops (matmuls, attention), random ops, and any op whose output a
compute-bound backward op reads whole ("materialized in the backward": a linear's input, read
by its weight gradient's matmul, is saved, not rebuilt). The cut is a max flow: each tensor is an
edge in -> out of capacity its bytes, data dependencies and the source's links to the ops that
cannot be replayed are infinite, and each tensor the backward reads links to the sink. The
cut's edges are the saved tensors.

Measured on one H200 (bench/truth/saved_activations.py): a gpt-1.3b block at 4 x 1024 tokens
saves 272 MiB compiled (320 eager), a Llama block 504 MiB (720); this cut over the op graph
gives both to the byte (evaluator.compiled_block_stash_delta_bytes)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import networkx as nx

_SOURCE, _SINK = "__source__", "__sink__"


def min_saved_bytes(bytes_of: Mapping[str, float], edges: Iterable[tuple[str, str]],
                    fixed: Iterable[str], needed: Iterable[str]) -> float:
    """The least total bytes_of[v] over a set S of tensors such that every tensor in `needed`
    is available to the backward, where v is available if v is in S, or v is not in `fixed`
    and every u with (u, v) in `edges` (v's inputs) is available. `fixed`: tensors the backward
    cannot recompute (region inputs, compute-bound ops' outputs, ...). Tensors absent from
    `bytes_of` cost nothing to save (none is read)."""
    g = nx.DiGraph()
    for v, b in bytes_of.items():
        g.add_edge(("in", v), ("out", v), capacity=float(b))
    for u, v in edges:
        g.add_edge(("out", u), ("in", v))           # no capacity attribute: infinite
    for v in fixed:
        g.add_edge(_SOURCE, ("in", v))
    targets = [v for v in needed]
    for v in targets:
        g.add_edge(("out", v), _SINK)
    if not targets or _SOURCE not in g:
        return 0.0
    value, _ = nx.minimum_cut(g, _SOURCE, _SINK)
    return float(value)
