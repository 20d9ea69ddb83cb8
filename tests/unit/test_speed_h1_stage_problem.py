"""StageProblem._reshard_matrix against its previous implementation, kept here verbatim as the
reference: every matrix to the bit, on every edge of GPT layers (plain and fused q|k|v) on
meshes of one and two axes, entered in every boundary layout, including the columns where
sequence parallelism's gather replaces a gradient all-reduce (the test checks it meets some).

The speed-ups: those columns are computed once per (needed layout, replaced all-reduce) instead
of once per consumer strategy, each cell's forward and backward seconds come from one cached
lookup, and the per-strategy all-reduce keys are memoised per strategy list."""

from __future__ import annotations

import numpy as np
import pytest
from builders import megatron_gpt

from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.search.layer_solver import boundary_specs
from autopar.sharding import stage_problem as sp
from autopar.sharding.stage_problem import StageProblem, _partial_grad_all_reduce
from graphs.ir import dtype_bytes
from graphs.query import main_boundary

P3 = load_cluster("p3.16xlarge", 2)
CM = ComputeModel(P3.gpu, P3.gpu.training_dtype())


def reference_reshard_matrix(prob: StageProblem, name, j, shape, eb, srcs, dsts, v_sts) -> np.ndarray:
    """The previous StageProblem._reshard_matrix, verbatim."""
    us = list(dict.fromkeys(srcs))
    vs = list(dict.fromkeys(d for d in dsts if d is not None))
    grad = prob._carries_grad(name, j)
    small = np.array([[prob._reshard(shape, eb, a, b) + prob._reshard_backward(shape, eb, a, b, grad)
                       for b in vs] for a in us]).reshape(len(us), len(vs))
    ui = np.array([us.index(a) for a in srcs])
    out = np.zeros((len(srcs), len(dsts)))
    for q, d in enumerate(dsts):
        if d is None:
            continue
        out[:, q] = small[ui, vs.index(d)]
        if _partial_grad_all_reduce(v_sts[q], j) is not None:
            col = [prob._edge_s(name, j, shape, eb, a, d, v_sts[q]) for a in us]
            out[:, q] = np.array(col)[ui]
    return out


def _edges(prob: StageProblem):
    """(name, j, shape, eb, srcs, dsts, v_sts) of every activation edge of the problem."""
    g = prob.graph
    for name in prob.names:
        v = g.node(name)
        v_sts = prob.groups[prob.group_of[name]].strategies[name]
        for j, o in enumerate(v.operands):
            if o.source is None:
                continue
            dsts = [s.in_specs[j] if j < len(s.in_specs) else None for s in v_sts]
            if o.source in prob.inside:
                srcs = [s.out_spec for s in prob.groups[prob.group_of[o.source]].strategies[o.source]]
            else:
                srcs = [prob._boundary_spec(o.source)]
            yield name, j, o.shape, dtype_bytes(o.dtype), srcs, dsts, v_sts


@pytest.mark.parametrize("shape,nodes", [((1, 4), 1), ((2, 2), 1), ((2, 8), 2), ((16, 1), 2)])
@pytest.mark.parametrize("fused", [False, True])
def test_reshard_matrix_equals_the_reference_to_the_bit(shape, nodes, fused):
    g = megatron_gpt(64, 4, 32, 16, layers=2, fused_qkv=fused)
    mesh = Mesh(P3, Submesh(nodes, 8 if nodes > 1 else shape[0] * shape[1]), shape)
    names = list(g.layers[1].nodes)
    src = main_boundary(g, names)
    fused_columns = 0
    for q in boundary_specs(g.node(src).out_shape, mesh):
        sp._PARTIAL_MEMO.clear()
        prob = StageProblem(g, names, mesh, CM, boundary={src: q})
        for name, j, shp, eb, srcs, dsts, v_sts in _edges(prob):
            want = reference_reshard_matrix(prob, name, j, shp, eb, srcs, dsts, v_sts)
            for partial in (None, "memo"):      # computed in place, or handed over as _edge_costs does
                arg = None if partial is None else tuple(
                    None if (ar := _partial_grad_all_reduce(s, j)) is None else (ar.mask, ar.nbytes, ar.time_s)
                    for s in v_sts)
                got = prob._reshard_matrix(name, j, shp, eb, list(srcs), list(dsts), v_sts, arg)
                assert got.shape == want.shape and got.tobytes() == want.tobytes()
            fused_columns += sum(1 for s, d in zip(v_sts, dsts)
                                 if d is not None and _partial_grad_all_reduce(s, j) is not None
                                 and any(prob._edge_s(name, j, shp, eb, a, d, s)
                                         != prob._reshard(shp, eb, a, d) + prob._reshard_backward(
                                             shp, eb, a, d, prob._carries_grad(name, j)) for a in srcs))
    if mesh.n_devices > 1 and not fused:
        assert fused_columns > 0      # the sequence-parallel gather's columns were compared too


def test_memoised_partial_keys_follow_the_strategy_objects():
    """_edge_costs' all-reduce keys are memoised per strategy list; the entry holds the
    strategies, and two problems on one mesh get equal arrays either way."""
    g = megatron_gpt(64, 4, 32, 8, layers=2)
    mesh = Mesh(P3, Submesh(1, 4), (2, 2))
    names = list(g.layers[1].nodes)
    src = main_boundary(g, names)
    q = boundary_specs(g.node(src).out_shape, mesh)[1]
    sp._PARTIAL_MEMO.clear()
    sp._EDGE_MEMO.clear()
    sp._EDGE_FAST.clear()
    first = StageProblem(g, names, mesh, CM, boundary={src: q})
    a = first.ilp_arrays(sp.Settings(n_microbatches=4, zero=1))
    assert sp._PARTIAL_MEMO
    for sts, partial in sp._PARTIAL_MEMO.values():
        assert len(sts) == len(partial)
    sp._EDGE_MEMO.clear()
    sp._EDGE_FAST.clear()
    b = StageProblem(g, names, mesh, CM, boundary={src: q}).ilp_arrays(sp.Settings(n_microbatches=4, zero=1))
    for x, y in zip(a[0], b[0]):
        assert x.tobytes() == y.tobytes()
    for (u1, v1, r1), (u2, v2, r2) in zip(a[1], b[1]):
        assert (u1, v1) == (u2, v2) and r1.tobytes() == r2.tobytes()
