"""Embedding lookup: the ids' batch split, the table's vocabulary rows split (Megatron's
vocab-parallel embedding: each device looks up its rows, the output is a partial sum
all-reduced in forward), or its hidden columns split."""

from __future__ import annotations

import itertools

from autopar.costmodel.collectives import ALL_GATHER, ALL_REDUCE, BACKWARD, FORWARD, REDUCE_SCATTER
from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh
from autopar.sharding.rules.common import collective, local_out_bytes, param_terms, strategy_name
from autopar.sharding.strategy import Strategy
from graphs.ir import OpNode


def embedding_strategies(node: OpNode, mesh: Mesh, cm: ComputeModel) -> list[Strategy]:
    ids, w = node.operands[0], node.operands[1]
    has_ids = ids.source is not None
    letters_avail = (["b"] if has_ids and ids.shape else []) + ["v", "h"]
    res = []
    for combo in itertools.product([None, *letters_avail], repeat=len(mesh.live_axes)):
        lt: dict[str, int] = {}
        for bit, ch in zip(mesh.live_axes, combo):
            if ch:
                lt[ch] = lt.get(ch, 0) | bit
        mb, mv, mh = lt.get("b", 0), lt.get("v", 0), lt.get("h", 0)
        if (ids.shape and ids.shape[0] % mesh.factor(mb)) or w.shape[0] % mesh.factor(mv) or w.shape[1] % mesh.factor(mh):
            continue
        ids_spec = tuple([mb] + [0] * (len(ids.shape) - 1)) if ids.shape else ()
        out_spec = tuple([mb] + [0] * (len(node.out_shape) - 2) + [mh]) if len(node.out_shape) >= 2 else (mh,)
        w_spec = (mv, mh)
        out_local = local_out_bytes(node, out_spec, mesh)
        # The table's gradient is a partial sum over the axes splitting the ids.
        params = param_terms(node, {1: w_spec}, {1: mb}, mesh, read_in_backward=())     # needs only the ids
        forward = (collective(ALL_REDUCE, mv, out_local, FORWARD, mesh),) if mv else ()
        in_specs = (ids_spec if has_ids else None, w_spec) + tuple(None for _ in node.operands[2:])
        res.append(Strategy(strategy_name(lt), out_spec, in_specs, cm.memory_bound_s(2 * out_local),
                            cm.memory_bound_s(2 * out_local), forward + params.collectives, params.elems_local,
                            params.elems_zero, out_local, lt))
        rs = _reduce_scatter_variant(node, mesh, res[-1], mv) if mv and len(out_spec) == 3 else None
        if rs is not None:
            res.append(rs)
    return res


def _reduce_scatter_variant(node: OpNode, mesh: Mesh, base: Strategy, mv: int) -> Strategy | None:
    """Vocab-parallel with a reduce-scatter instead of the all-reduce (Megatron's sequence
    parallelism): the output [b, s, h] comes out split on its first free dim over the vocab
    axes, as a row-parallel matmul's reduce-scatter variant does; backward all-gathers its
    gradient (each vocab shard needs every position's)."""
    out_spec = list(base.out_spec)
    shape = node.out_shape
    pos = next((d for d in range(len(shape)) if out_spec[d] == 0 and shape[d] % mesh.factor(mv) == 0), None)
    if pos is None:
        return None
    full_local = base.out_bytes_local
    out_spec[pos] = mv
    colls = tuple(c for c in base.collectives if not (c.kind == ALL_REDUCE and c.phase == FORWARD))
    rs = (collective(REDUCE_SCATTER, mv, full_local, FORWARD, mesh), collective(ALL_GATHER, mv, full_local, BACKWARD, mesh))
    out_local = full_local / mesh.factor(mv)
    # the lookup still writes the whole partial output before the reduce-scatter
    return Strategy(base.name + "+rs:" + strategy_name({"bsh"[pos]: mv}), tuple(out_spec), base.in_specs,
                    base.fwd_s, base.bwd_s, rs + colls,
                    base.param_elems_local, base.param_elems_zero, out_local, base.letters)
