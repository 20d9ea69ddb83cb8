"""StageProblem._reshard_matrix after its plain columns (no sequence-parallel gather into a
partial sum) were copied from the layout matrix in one indexing, the sources and layouts found
by dict: the previous implementation, verbatim below, is the reference, to the bit, on every
edge of GPT layers (plain and fused q|k|v) on meshes of one and two axes, entered in every
boundary layout (the edges of test_speed_h1_stage_problem, which also checks that the fused
columns are met)."""

from __future__ import annotations

import numpy as np
import pytest
from builders import megatron_gpt
from test_speed_h1_stage_problem import CM, P3, _edges

from autopar.hardware.mesh import Mesh, Submesh
from autopar.search.layer_solver import boundary_specs
from autopar.sharding import stage_problem as sp
from autopar.sharding.stage_problem import StageProblem, _partial_grad_all_reduce, _round_trip_by_id
from graphs.query import main_boundary


def previous_reshard_matrix(prob: StageProblem, name, j, shape, eb, srcs, dsts, v_sts, partial=None) -> np.ndarray:
    """partial: _edge_costs' per-strategy gradient all-reduce key (computed here if None)."""
    us = list(dict.fromkeys(srcs))
    vs = list(dict.fromkeys(d for d in dsts if d is not None))
    grad = prob._carries_grad(name, j)
    shape_key, ctx = tuple(shape), prob._context
    small = np.array([[_round_trip_by_id(shape_key, eb, tuple(a), tuple(b), grad, ctx)
                       for b in vs] for a in us]).reshape(len(us), len(vs))
    if partial is None:
        partial = tuple(None if (ar := _partial_grad_all_reduce(s, j)) is None else (ar.mask, ar.nbytes, ar.time_s)
                        for s in v_sts)
    ui = np.array([us.index(a) for a in srcs])
    out = np.zeros((len(srcs), len(dsts)))
    # A column with sequence parallelism's gather depends on its strategy only through
    # the all-reduce that gather replaces (_gather_into_partial_s reads its mask, bytes
    # and seconds), so consumers that need one layout and replace one all-reduce share it.
    fused_cols: dict[tuple, np.ndarray] = {}
    for q, d in enumerate(dsts):
        if d is None:
            continue
        ar = partial[q]
        if ar is None:
            out[:, q] = small[ui, vs.index(d)]
            continue
        ck = (d, *ar)
        col = fused_cols.get(ck)
        if col is None:
            col = fused_cols[ck] = np.array([prob._edge_s(name, j, shape, eb, a, d, v_sts[q]) for a in us])[ui]
        out[:, q] = col
    return out


@pytest.mark.parametrize("shape,nodes", [((1, 4), 1), ((2, 2), 1), ((2, 8), 2), ((16, 1), 2)])
@pytest.mark.parametrize("fused", [False, True])
def test_reshard_matrix_equals_the_previous_to_the_bit(shape, nodes, fused):
    g = megatron_gpt(64, 4, 32, 16, layers=2, fused_qkv=fused)
    mesh = Mesh(P3, Submesh(nodes, 8 if nodes > 1 else shape[0] * shape[1]), shape)
    names = list(g.layers[1].nodes)
    src = main_boundary(g, names)
    n = 0
    for q in boundary_specs(g.node(src).out_shape, mesh):
        sp._PARTIAL_MEMO.clear()
        prob = StageProblem(g, names, mesh, CM, boundary={src: q})
        for name, j, shp, eb, srcs, dsts, v_sts in _edges(prob):
            partial = tuple(None if (ar := _partial_grad_all_reduce(s, j)) is None else (ar.mask, ar.nbytes, ar.time_s)
                            for s in v_sts)
            for arg in (None, partial):
                want = previous_reshard_matrix(prob, name, j, shp, eb, list(srcs), list(dsts), v_sts, arg)
                got = prob._reshard_matrix(name, j, shp, eb, list(srcs), list(dsts), v_sts, arg)
                assert got.shape == want.shape and got.tobytes() == want.tobytes()
                n += 1
    assert n > 20
