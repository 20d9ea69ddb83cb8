"""Graph inputs (token ids, targets) split on their batch dim or not, and the fallback for ops
without a rule: run whole on every device."""

from __future__ import annotations

from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh
from autopar.sharding.rules.common import local_out_bytes, param_terms, strategy_name
from autopar.sharding.spec import is_valid
from autopar.sharding.strategy import Strategy
from graphs.ir import OpNode


def input_strategies(node: OpNode, mesh: Mesh) -> list[Strategy]:
    shape = node.out_shape
    if not shape:
        return [Strategy("R", (), ())]
    res = []
    for m in (0, *(x for x in (1, 2, 3) if all(mesh.factor(b) > 1 for b in (1, 2) if x & b))):
        spec = (m,) + (0,) * (len(shape) - 1)
        if m and not is_valid(spec, shape, mesh):
            continue
        res.append(Strategy(strategy_name({"b": m}), spec, (), out_bytes_local=local_out_bytes(node, spec, mesh)))
    return res


def replicated_strategy(node: OpNode, mesh: Mesh, cm: ComputeModel) -> Strategy:
    """Ops without a rule run whole on every device (inputs gathered by the edges)."""
    in_specs = tuple(tuple(0 for _ in o.shape) if (o.source is not None or o.is_param) else None
                     for o in node.operands)
    params = param_terms(node, {i: tuple(0 for _ in o.shape) for i, o in enumerate(node.operands) if o.is_param},
                         {}, mesh)
    return Strategy("R", tuple(0 for _ in node.out_shape), in_specs,
                    cm.memory_bound_s(node.fwd_bytes, node.fwd_flops) if (node.fwd_bytes or node.fwd_flops) else 0.0,
                    cm.memory_bound_s(node.bwd_bytes, node.bwd_flops) if (node.bwd_bytes or node.bwd_flops) else 0.0,
                    params.collectives, params.elems_local, params.elems_zero, node.out_bytes)
