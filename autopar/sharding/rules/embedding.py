"""Embedding lookup: the ids' batch split, the table's vocabulary rows split (Megatron's
vocab-parallel embedding: each device looks up its rows, the output is a partial sum
all-reduced in forward), or its hidden columns split."""

from __future__ import annotations

import itertools

from autopar.costmodel.collectives import ALL_REDUCE, FORWARD
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
    return res
