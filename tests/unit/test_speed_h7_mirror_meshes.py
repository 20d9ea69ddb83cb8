"""The planner leaves out each (d, 1) logical mesh that repeats (1, d) (mesh.searched_meshes).
Oracles: the search over every logical mesh (the previous code) finds the same plan, and the
range tables of a left-out mesh equal those of its mirror bit for bit (up to the order of start
layouts); a mesh with two live axes is kept because its mirror's tables differ."""

from __future__ import annotations

import numpy as np
import pytest

from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh, mesh_axes, searched_meshes, submeshes
from autopar.hardware.presets import load_cluster
from autopar.model import model_source
from autopar.search import planner
from autopar.search.layer_solver import LayerSolver, SearchStats, StartLayout
from autopar.search.range_table import RangeTable, range_tables
from autopar.sharding.stage_problem import Settings

FIELDS = ("t", "rec", "sync", "param", "stash", "inputs", "max_layer_stash", "rec_last", "loss", "block")


def _swap(start: StartLayout) -> StartLayout:
    """The start layout with mesh axes 0 and 1 relabelled (bits above the axes kept)."""
    swapped = tuple((m & ~3) | ((m & 1) << 1) | ((m & 2) >> 1) for m in start.spec)
    return StartLayout(swapped, start.at_embedding, start.seq_split)


def _equal_relabelled(a: RangeTable, b: RangeTable) -> bool:
    """b is a with the mesh axes swapped: every figure bit for bit, start layouts matched."""
    where = {s: k for k, s in enumerate(b.starts)}
    if len(a.starts) != len(b.starts) or any(_swap(s) not in where for s in a.starts):
        return False
    perm = [where[_swap(s)] for s in a.starts]
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        if x is None or y is None:
            if (x is None) != (y is None):
                return False
            continue
        if not np.array_equal(x, y[..., perm], equal_nan=True):
            return False
    return a.uses_seq_split == b.uses_seq_split


@pytest.mark.parametrize("name,nodes", [("p3.16xlarge", 8), ("dgx-h100", 3), ("dgx-a100", 1)])
def test_only_single_axis_mirrors_are_left_out(name, nodes):
    cl = load_cluster(name, nodes, None)
    for sub in submeshes(cl):
        every = sub.logical_meshes()
        kept = searched_meshes(cl, sub)
        dropped = [s for s in every if s not in kept]
        assert kept == [s for s in every if s in kept]          # the order is kept
        # (1, d)'s one axis and (d, 1)'s are laid on the same devices, so on the same link
        assert dropped == ([(sub.n_devices, 1)] if sub.n_devices > 1 else [])
        for d0, d1 in dropped:
            a0, a1, both = mesh_axes(cl, sub, (d0, d1))
            m0, m1, m_both = mesh_axes(cl, sub, (d1, d0))
            assert (a0, a1, both) == (m1, m0, m_both)
            assert (d1, d0) in kept and every.index((d1, d0)) < every.index((d0, d1))


def _tables(model: str, cluster: str, nodes: int, size: int, zero: int, eager: bool):
    cl = load_cluster(cluster, nodes, None)
    dtype = cl.gpu.training_dtype(None)
    graph = model_source(model, dtype=dtype).graph(size)
    solver = LayerSolver(graph, ComputeModel(cl.gpu, dtype), Settings(n_microbatches=8, zero=zero), SearchStats(),
                         10.0, "highs", None, eager=eager, context_parallel=True, sharded_storage=False)
    return cl, solver


@pytest.mark.parametrize("model,cluster,nodes,zero,eager,two_axis_differ", [
    ("gpt:hidden=512,layers=3,heads=8,seq=256,vocab=1024", "p3.16xlarge", 2, 1, False, True),
    # this one's 2x4 and 4x2 happen to price alike; the single-axis mirrors must anyway
    ("llama:hidden=256,layers=2,heads=4,kv_heads=2,ffn=512,seq=512,vocab=1024", "dgx-h100", 2, 3, True, False),
])
def test_left_out_tables_equal_their_mirrors(model, cluster, nodes, zero, eager, two_axis_differ):
    cl, solver = _tables(model, cluster, nodes, 2, zero, eager)
    checked = 0
    for sub in submeshes(cl):
        for d0, d1 in (s for s in sub.logical_meshes() if s not in searched_meshes(cl, sub)):
            mine = range_tables(solver, Mesh(cl, sub, (d0, d1)))
            mirror = range_tables(solver, Mesh(cl, sub, (d1, d0)))
            assert _equal_relabelled(mirror[0], mine[0]) and _equal_relabelled(mirror[1], mine[1])
            checked += 1
    assert checked == len(submeshes(cl)) - 1                     # every submesh but (1, 1)
    if not two_axis_differ:
        return
    # why a mesh with two live axes keeps its mirror (mesh.searched_meshes)
    sub = next(s for s in submeshes(cl) if s.n_devices == 8 and s.n_nodes == 1)
    two_by_four = range_tables(solver, Mesh(cl, sub, (2, 4)))[0]
    four_by_two = range_tables(solver, Mesh(cl, sub, (4, 2)))[0]
    assert not _equal_relabelled(two_by_four, four_by_two)


def _without_search(p) -> dict:
    d = p.to_dict()
    d.pop("search")
    return d


CASES = [
    ("gpt:hidden=512,layers=4,heads=8,seq=256,vocab=1024", "p3.16xlarge", 2, dict(zero=1)),
    ("gpt:hidden=512,layers=4,heads=8,seq=256,vocab=1024", "dgx-a100", 1, dict(zero=0, eager=True)),
    ("llama:hidden=256,layers=3,heads=4,kv_heads=2,ffn=512,seq=512,vocab=1024", "dgx-h100", 2,
     dict(zero=3, eager=False, context_parallel=False)),
    # two more (about 6 s each on a busy 2-core machine): `-m slow`
    pytest.param("llama:hidden=256,layers=3,heads=4,kv_heads=2,ffn=512,seq=512,vocab=1024", "p3.16xlarge", 2,
                 dict(zero=2, eager=True), marks=pytest.mark.slow),
    pytest.param("moe:hidden=128,layers=2,heads=4,seq=128,vocab=512,experts=4", "dgx-h100", 1,
                 dict(zero=1, eager=False, sharded_storage=True), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("model,cluster,nodes,kw", CASES)
def test_plan_equals_the_search_over_every_logical_mesh(monkeypatch, model, cluster, nodes, kw):
    skipped = planner.plan(model, cluster, nodes=nodes, global_batch=16, workers=1, **kw)
    with monkeypatch.context() as m:
        m.setattr(planner, "searched_meshes", lambda cl, sub: sub.logical_meshes())
        every = planner.plan(model, cluster, nodes=nodes, global_batch=16, workers=1, **kw)
    assert _without_search(skipped) == _without_search(every)
    assert skipped.search["ilps"] < every.search["ilps"]         # the left-out meshes were searched before
