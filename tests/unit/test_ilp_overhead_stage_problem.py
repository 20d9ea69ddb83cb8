"""StageProblem's second-level memos (ilp_arrays keyed by strategy ids, the per (graph, names)
structure, evaluate's edge seconds): every array and every score equals, to the bit, the one
built op by op from the one-op cost functions (test_stage_problem_memo.reference_arrays), with
the memos cold, warm, and after a graph of the same names was rebuilt; entry restrictions and
allowed strategy sets included."""

from __future__ import annotations

import pytest
from builders import megatron_gpt
from test_stage_problem_memo import CM, P3, assert_same, reference_arrays

from autopar.hardware.mesh import Mesh, Submesh
from autopar.search.layer_solver import boundary_specs
from autopar.sharding import stage_problem as sp
from autopar.sharding.stage_problem import Settings, StageProblem, decision_names, saved_tensors
from graphs.ir import dtype_bytes
from graphs.query import main_boundary, stage_nodes


def _clear() -> None:
    for memo in (sp._EDGE_MEMO, sp._EDGE_FAST, sp._MEMBER_MEMO, sp._EDGE_FWD_BWD, sp._KEEP, sp._STRUCTURE_MEMO):
        memo.clear()


def reference_evaluate_edges(prob: StageProblem, choice) -> list[tuple[float, float]]:
    """Every edge's (forward, backward) seconds under `choice`, computed fresh."""
    out = []
    for name in prob.names:
        v = prob.graph.node(name)
        gi = prob.group_of[name]
        st = prob.groups[gi].strategies[name][int(choice[gi])]
        for j, o in enumerate(v.operands):
            if o.source is None or j >= len(st.in_specs) or st.in_specs[j] is None:
                continue
            if o.source in prob.inside:
                gu = prob.group_of[o.source]
                src = prob.groups[gu].strategies[o.source][int(choice[gu])].out_spec
            else:
                src = prob._boundary_spec(o.source)
            out.append(prob._edge_fwd_bwd_fresh_s(name, j, o.shape, dtype_bytes(o.dtype), src, st.in_specs[j], st))
    return out


def _problems(g, mesh):
    names = list(g.layers[1].nodes)
    src = main_boundary(g, names)
    out = main_boundary(g, list(g.layers[2].nodes))
    specs = boundary_specs(g.node(src).out_shape, mesh)
    allowed = {n: set(opts[:2]) for n, opts in decision_names(g, names, mesh, CM).items() if len(opts) > 2}
    for q in specs:
        yield StageProblem(g, names, mesh, CM, boundary={src: q})
        yield StageProblem(g, names, mesh, CM, boundary={src: q}, restrict_out={out: q}, allowed=allowed)
    yield StageProblem(g, stage_nodes(g, (0, len(g.layers))), mesh, CM)


@pytest.mark.parametrize("shape,nodes", [((2, 2), 1), ((2, 8), 2)])
def test_arrays_and_scores_equal_fresh_ones_cold_and_warm(shape, nodes):
    mesh = Mesh(P3, Submesh(nodes, 8 if nodes > 1 else shape[0] * shape[1]), shape)
    st = Settings(n_microbatches=4, zero=1)
    _clear()
    cold = megatron_gpt(64, 4, 32, 16, layers=3)
    rebuilt = megatron_gpt(64, 4, 32, 16, layers=3)     # same names, new node and strategy objects
    solved = 0
    for g in (cold, cold, rebuilt):                     # memos cold, warm, warm for another graph
        for prob in _problems(g, mesh):
            got = prob.ilp_arrays(st)
            assert_same(got, reference_arrays(prob, st))
            res = prob.solve(st)
            if res.choice is None:
                continue
            solved += 1
            edges = reference_evaluate_edges(prob, res.choice)
            n = 0
            for name in prob.names:
                v = prob.graph.node(name)
                gi = prob.group_of[name]
                s = prob.groups[gi].strategies[name][int(res.choice[gi])]
                for j, o in enumerate(v.operands):
                    if o.source is None or j >= len(s.in_specs) or s.in_specs[j] is None:
                        continue
                    src = (prob.groups[prob.group_of[o.source]].strategies[o.source][int(res.choice[prob.group_of[o.source]])].out_spec
                           if o.source in prob.inside else prob._boundary_spec(o.source))
                    assert prob._edge_fwd_bwd_s(name, j, o.shape, dtype_bytes(o.dtype), src, s.in_specs[j], s) == edges[n]
                    n += 1
            # the memoised structure is what saved_tensors computes now
            assert (prob.saved, prob.saved_outside) == saved_tensors(prob.graph, prob.names)
    assert solved > 10 and sp._EDGE_FAST and sp._EDGE_FWD_BWD and sp._STRUCTURE_MEMO
    # every strategy id a key holds names a strategy kept alive, so no id can be reused
    for key in sp._EDGE_FWD_BWD:
        assert key[-1] in sp._KEEP
    for key in sp._EDGE_FAST:
        ids = key[-1] + (key[-2] if key[0] != sp._ROW else ())
        assert all(i in sp._KEEP and id(sp._KEEP[i]) == i for i in ids)


def test_structure_memo_is_per_graph_object():
    """Two graphs with the same names but other shapes never share a structure entry."""
    _clear()
    a = megatron_gpt(64, 4, 32, 16, layers=2)
    b = megatron_gpt(64, 4, 32, 8, layers=2)
    names = list(a.layers[1].nodes)
    assert names == list(b.layers[1].nodes)
    mesh = Mesh(P3, Submesh(1, 4), (2, 2))
    pa = StageProblem(a, names, mesh, CM)
    pb = StageProblem(b, names, mesh, CM)
    assert pa._operands != pb._operands          # the operand shapes differ
    assert all(oa.shape_key == tuple(a.node(oa.name).operands[oa.j].shape) for oa in pa._operands)
    assert all(ob.shape_key == tuple(b.node(ob.name).operands[ob.j].shape) for ob in pb._operands)
    st = Settings(n_microbatches=2)
    assert_same(pa.ilp_arrays(st), reference_arrays(pa, st))
    assert_same(pb.ilp_arrays(st), reference_arrays(pb, st))
