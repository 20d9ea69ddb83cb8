"""The ILP builder's memoised inputs (StageProblem._member_arrays, _edge_costs): every array
equals, to the bit, the one built op by op from member_cost, _member_mem and _edge_s, whether
it was computed fresh or came from the memo of an earlier problem on the same mesh."""

from __future__ import annotations

import numpy as np
import pytest
from builders import megatron_gpt

from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.search.layer_solver import boundary_specs
from autopar.sharding import stage_problem as sp
from autopar.sharding.stage_problem import Settings, StageProblem
from graphs.ir import dtype_bytes
from graphs.query import main_boundary, stage_nodes

P3 = load_cluster("p3.16xlarge", 2)
CM = ComputeModel(P3.gpu, P3.gpu.training_dtype())


def reference_arrays(prob: StageProblem, st: Settings):
    """ilp_arrays as it was before memoisation: every entry from the one-op cost functions."""
    g = prob.graph
    costs, mems = [], []
    for gi, grp in enumerate(prob.groups):
        k = len(grp.strategies[grp.root])
        cost, mem = np.zeros(k), np.zeros(k)
        for m in grp.members:
            cost += np.array([prob.member_cost(m, s, st).objective_s(st.n_microbatches) for s in grp.strategies[m]])
            mem += np.array([prob._member_mem(m, s, st) for s in grp.strategies[m]])
        cost[prob.forbidden[gi]] = np.inf
        costs.append(cost)
        mems.append(mem)
    edges = []
    for name in prob.names:
        v = g.node(name)
        gv = prob.group_of[name]
        v_sts = prob.groups[gv].strategies[name]
        for j, o in enumerate(v.operands):
            if o.source is None:
                continue
            eb = dtype_bytes(o.dtype)
            need = [s.in_specs[j] if j < len(s.in_specs) else None for s in v_sts]

            def cell(a, q, s):
                return prob._edge_s(name, j, o.shape, eb, a, q, s) if q is not None else 0.0  # noqa: B023

            if o.source not in prob.inside:
                a = prob._boundary_spec(o.source)
                costs[gv] += np.array([cell(a, q, s) for q, s in zip(need, v_sts)])
                continue
            gu = prob.group_of[o.source]
            u_sts = prob.groups[gu].strategies[o.source]
            if gu == gv:
                costs[gv] += np.array([cell(u.out_spec, q, s) for u, q, s in zip(u_sts, need, v_sts)])
                continue
            edges.append((gu, gv, np.array([[cell(u.out_spec, q, s) for q, s in zip(need, v_sts)] for u in u_sts])))
    return costs, edges, mems


def assert_same(got, want):
    (c1, e1, m1), (c2, e2, m2) = got, want
    assert len(c1) == len(c2) and len(e1) == len(e2)
    for a, b in zip(c1, c2):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(m1, m2):
        np.testing.assert_array_equal(a, b)
    for (u1, v1, r1), (u2, v2, r2) in zip(e1, e2):
        assert (u1, v1) == (u2, v2)
        np.testing.assert_array_equal(r1, r2.reshape(r1.shape))


@pytest.mark.parametrize("shape,nodes", [((1, 4), 1), ((2, 2), 1), ((2, 8), 2), ((16, 1), 2)])
@pytest.mark.parametrize("fused", [False, True])
def test_memoised_ilp_arrays_equal_the_op_by_op_build(shape, nodes, fused):
    g = megatron_gpt(64, 4, 32, 16, layers=2, fused_qkv=fused)
    mesh = Mesh(P3, Submesh(nodes, 8 if nodes > 1 else shape[0] * shape[1]), shape)
    st = Settings(n_microbatches=4, zero=1)
    sp._EDGE_MEMO.clear()
    sp._MEMBER_MEMO.clear()
    names = list(g.layers[1].nodes)
    src = main_boundary(g, names)
    specs = boundary_specs(g.node(src).out_shape, mesh)
    assert len(specs) > 3
    # twice over every entry layout: fresh, then from the memo the first round filled
    for _ in range(2):
        for q in specs:
            prob = StageProblem(g, names, mesh, CM, boundary={src: q})
            assert_same(prob.ilp_arrays(st), reference_arrays(prob, st))
    assert sp._EDGE_MEMO and sp._MEMBER_MEMO
    # a whole model (embedding, blocks, loss) and other settings on the same mesh
    whole = StageProblem(g, stage_nodes(g, (0, len(g.layers))), mesh, CM)
    for s in (st, Settings(n_microbatches=8, zero=3), Settings(n_microbatches=1, zero=0, inflight=2)):
        assert_same(whole.ilp_arrays(s), reference_arrays(whole, s))


def test_memoised_arrays_are_read_only_and_solutions_unchanged():
    """The memo hands out shared arrays: they are read-only, and the ILP solved from them
    picks what it picks from freshly built arrays."""
    from solvers.ilp import solve_sharding_ilp
    g = megatron_gpt(64, 4, 32, 8, layers=2)
    mesh = Mesh(P3, Submesh(1, 4), (2, 2))
    st = Settings(n_microbatches=2, zero=1)
    prob = StageProblem(g, stage_nodes(g, (0, len(g.layers))), mesh, CM)
    costs, edges, _ = prob.ilp_arrays(st)
    shared = [r for _, _, r in edges]
    assert shared and not any(r.flags.writeable for r in shared)
    with pytest.raises(ValueError):
        shared[0][0, 0] = 1.0
    fresh = reference_arrays(prob, st)
    a = solve_sharding_ilp(costs, edges)
    b = solve_sharding_ilp(fresh[0], fresh[1])
    assert a.objective == b.objective
    np.testing.assert_array_equal(a.choice, b.choice)
