"""A proof, before any layer ILP, that a microbatch size can offer the simulator no candidate:
no pipeline the search could propose fits the GPU's memory (issue 15: gpt-39b on 64 V100s
spent about a third of its CPU on microbatch sizes whose stage tables end up with no fitting
pipeline).

What the search offers. Every candidate of a microbatch size (planner.SearchJob.propose) is
made of cells of the range tables: a DP optimum (and its interleaving, derived from it) chains
cells [i, j) on submesh m at depth s (s stages from it to the end) that fit, over submeshes of
exactly n_gpus devices and at most max_stages stages; an equal-layer candidate is a chain of
such cells (one chunk per rank: the DP's chains) or, interleaved, per rank the sum of its two
chunks' memories against the cap (candidates._equal_split). A cell's memory, with its first k
layers recomputed and h microbatches held (RangeTable.layers_memory_bytes; outside the eager
recipe), is

    sum_l param_l + h * (sum_{l < i+k} input_l + sum_{l >= i+k} stash_l) + [k > 0] max_{l < i+k} stash_l

over the layer solutions of its chain (each the ILP's optimum for its mesh and entry layout),
where stash_l is the layer's StageProblem.evaluate stash (the member ops' saved outputs plus
the received inputs it keeps), param_l its Evaluation.param_state_bytes and input_l its entry
tensor's local bytes.

The floor. Per layer and logical mesh of n devices, whatever strategies and entry layout:
  - param_l >= P_l: the least param_state_bytes of each decision op over every strategy its
    rule offers (a layer solution picks one of them, or one of a subset: the sequence-split and
    inter-only filters), summed; followers' parameters counted as 0. With sharded storage
    offered, each strategy's least over the plan's ZeRO level and ZeRO-3 (the option it adds).
  - stash_l >= S_l: per decision op the least saved bytes over its strategies; per follower and
    per received input kept, its saved bytes / n; and
  - input_l >= I_l: the entry tensor's bytes / n.
The last two use that a tensor's local copy (strategy.out_bytes_local, rules.common.
local_out_bytes, LayerSolver.solve's input bytes) is its bytes over the layout's shard factor,
and that a layout splits over each mesh axis at most once (spec.is_valid), so the factor is at
most n. With a_l = min(I_l, S_l) <= min(input_l, stash_l) and h >= 1:
  - k = 0: h * sum stash_l >= h * sum a_l + sum (S_l - a_l);
  - k > 0: h * (...) >= h * sum a_l, and the max is at least the first layer's stash >= S_i;
so every cell's memory is at least
    floor(i, j, h) = sum P_l + h * sum a_l + min(S_i, sum (S_l - a_l))     (layers [i, j))
(each term >= 0), on the cell's mesh, and the least over a submesh's meshes bounds the cell.

The proof. `cannot_fit` says True only when (1) no chain of stages covers the layers with at
most max_stages stages on at most n_gpus devices, each stage on a submesh at depth s whose
floor at the tables' held count (memory.inflight of the first of s stages) exceeds no cap,
and (2) for every interleaved equal-layer slicing the planner would offer (the conditions of
candidates._equal_split), on every logical mesh, some rank's chunks' floors, summed at the
rank's held count, exceed the cap. A cell whose floor exceeds the cap does not fit (the table
leaves it inf), so (1) leaves the DP no finite optimum and the one-chunk equal-layer slicings
no fitting rank (they are such chains), and (2) leaves the interleaved ones none: the size
then has no candidate, exactly as its full search would find (an empty candidate list, the
same row). The cap is compared with a relative margin (1e-9) far above the rounding of the
tables' sums in another order. The eager recipe (its caps and working sets) is not covered:
there `cannot_fit` says False.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import numpy as np

from autopar.costmodel.compute import ComputeModel
from autopar.costmodel.memory import inflight, param_state_bytes
from autopar.evaluation.baselines import split_blocks
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.specs import Cluster
from autopar.search.candidates import equal_split_depth
from autopar.sharding.rules import is_decision
from autopar.sharding.stage_problem import _decision_cached, _sig_of, saved_tensors
from graphs.ir import OpGraph, dtype_bytes, numel

__all__ = ["MARGIN", "cannot_fit", "floor_terms", "layer_floors", "range_floors"]

MARGIN = 1e-9       # relative: a floor must exceed the cap by more than rounding


def layer_floors(graph: OpGraph, inputs: Sequence[str | None], mesh: Mesh, cm: ComputeModel, zero: int,
                 sharded_storage: bool = False, identities: Sequence[Hashable] | None = None,
                 memo: dict | None = None) -> np.ndarray:
    """[3, L]: per layer P_l, S_l and I_l (module doc) on `mesh`. `inputs`: each layer's input
    node (LayerSolver.inputs); layers of one identity (LayerSolver.identity) are worked out once.
    `memo` keeps each decision op's least figures per (op signature, mesh) between calls."""
    n = mesh.n_devices
    L = len(graph.layers)
    memo = {} if memo is None else memo
    out = np.zeros((3, L))
    done: dict[Hashable, int] = {}
    for li in range(L):
        ident = identities[li] if identities is not None else None
        if ident is not None and ident in done:
            out[:, li] = out[:, done[ident]]
            continue
        names = list(graph.layers[li].nodes)
        saved, outside = saved_tensors(graph, names)
        p = s = 0.0
        for name in names:
            node = graph.node(name)
            w = saved.get(name, 0.0)
            if is_decision(node):
                key = _sig_of(node)[0]
                mk = (key, mesh.submesh, mesh.shape, w)
                hit = memo.get(mk)
                if hit is None:
                    sts = _decision_cached(key, mesh, cm)
                    levels = (zero, 3) if sharded_storage and zero in (1, 2) else (zero,)
                    hit = memo[mk] = (min(param_state_bytes(st.param_elems_local, st.param_elems_zero, z)
                                          for st in sts for z in levels),
                                      min(w * st.out_bytes_local for st in sts))
                p += hit[0]
                s += hit[1]
            elif w and node.out_shapes:
                s += w * sum(numel(q) for q in node.out_shapes) * dtype_bytes(node.out_dtype) / n
        for src, w in outside.items():
            s += w * graph.node(src).out_bytes / n
        src_in = inputs[li]
        out[:, li] = (p, s, graph.node(src_in).out_bytes / n if src_in is not None else 0.0)
        if ident is not None:
            done[ident] = li
    return out


def floor_terms(floors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(base, kept), each [L, L+1], from layer_floors' [3, L]: floor(i, j, h) of the module doc
    is base[i, j] + h * kept[i, j] (base = sum P + min(S_i, sum (S - a)), kept = sum a; both
    >= 0); base is inf where j <= i."""
    P, S, I = floors
    L = len(P)
    a = np.minimum(I, S)

    def cum(x: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(x)])
    cp, ca, cx = cum(P), cum(a), cum(S - a)
    i = np.arange(L)[:, None]
    j = np.arange(L + 1)[None, :]
    valid = j > i
    jj = np.where(valid, j, i + 1)
    # the differences of non-decreasing sums: >= 0 (clipped against rounding below 0)
    base = np.maximum(cp[jj] - cp[i], 0.0) + np.minimum(S[:, None], np.maximum(cx[jj] - cx[i], 0.0))
    kept = np.maximum(ca[jj] - ca[i], 0.0)
    return np.where(valid, base, np.inf), np.where(valid, kept, 0.0)


def range_floors(floors: np.ndarray, held: np.ndarray) -> np.ndarray:
    """[H, L, L+1]: floor(i, j, h) of the module doc for each held count h of `held`, from
    layer_floors' [3, L]; inf where j <= i."""
    base, kept = floor_terms(floors)
    return base[None] + np.asarray(held, dtype=np.float64)[:, None, None] * kept[None]


def _most_held(base: np.ndarray, kept: np.ndarray, limit: float) -> np.ndarray:
    """Per cell, the most microbatches held at which its floor is within `limit` (-inf: none,
    inf: any), rounded up by a relative 1e-12 so that no count whose floor is within the limit
    is left out."""
    with np.errstate(divide="ignore", invalid="ignore"):
        most = np.where(kept > 0, (limit - base) / kept, np.where(base <= limit, np.inf, -np.inf))
        most = np.where(np.isnan(most), -np.inf, most)
        return np.where(np.isfinite(most), most + np.abs(most) * 1e-12, most)


def cannot_fit(graph: OpGraph, inputs: Sequence[str | None], cl: Cluster, subs: Sequence[Submesh],
               meshes_of: Callable[[Submesh], Sequence[tuple[int, int]]], cm: ComputeModel, *, zero: int,
               schedule: str, n_microbatches: int, max_stages: int, cap_bytes: float,
               sharded_storage: bool = False, identities: Sequence[Hashable] | None = None) -> bool:
    """Whether no candidate of this microbatch size can fit (module doc: a proof, never a
    guess). `meshes_of(submesh)`: the logical meshes the planner builds tables for;
    max_stages: SearchSpace.max_stages; cap_bytes: SearchSpace.memory_cap_bytes (outside the
    eager recipe)."""
    L, N, B, S = len(graph.layers), cl.n_gpus, n_microbatches, max_stages
    limit = cap_bytes * (1 + MARGIN) if cap_bytes >= 0 else cap_bytes * (1 - MARGIN)
    depth_held = np.array([inflight(schedule, 0, s, B) for s in range(1, S + 1)])
    # the interleaved equal-layer slicings candidates._equal_split offers (equal_split_depth): (submesh index, depth)
    inter: dict[int, list[int]] = {}
    for mi, sub in enumerate(subs):
        d = equal_split_depth(N, sub.n_devices, L, S, B, schedule, 2)
        if d is not None:
            inter.setdefault(mi, []).append(d)
    memo: dict = {}
    # per submesh and cell, the most microbatches held at which some mesh's floor is within the cap
    most = np.full((len(subs), L, L + 1), -np.inf)
    for mi, sub in enumerate(subs):
        for shape in meshes_of(sub):
            floors = layer_floors(graph, inputs, Mesh(cl, sub, shape), cm, zero, sharded_storage, identities, memo)
            base, kept = floor_terms(floors)
            np.maximum(most[mi], _most_held(base, kept, limit), out=most[mi])
            for d in inter.get(mi, []):
                ranges = split_blocks(L, 2 * d)
                if all(sum(base[i, j] + inflight("interleaved", r, d, B, 2) * kept[i, j] for i, j in ranges[r::d])
                       <= limit for r in range(d)):
                    return False        # an interleaved slicing on this mesh may fit
    # (1): the least devices that cover [i, L) with s stages, the one at i at depth s
    devices = np.array([sub.n_devices for sub in subs], dtype=np.float64)
    reach = np.full(L + 1, np.inf)
    reach[L] = 0.0
    for s in range(1, S + 1):
        cell = np.where(most >= depth_held[s - 1], devices[:, None, None], np.inf).min(axis=0)
        nxt = np.full(L + 1, np.inf)
        nxt[:L] = (cell + reach[None, :]).min(axis=1)
        if nxt[0] <= N:
            return False
        reach = nxt
        if not np.isfinite(reach).any():
            break
    return True
