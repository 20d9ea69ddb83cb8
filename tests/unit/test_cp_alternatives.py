"""Context-parallel alternatives in the planner (search/layer_solver.py, range_table.py,
planner.py): every layer key keeps its optimum without sequence splits beside the full one, and
the planner with sequence splits is never worse than the planner without them."""

from __future__ import annotations

import math

import pytest

import autopar
from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.search.layer_solver import LayerSolver, SearchStats, StartLayout, boundary_specs
from autopar.search.range_table import range_table, range_tables
from autopar.sharding.rules import decision_strategies
from autopar.sharding.rules.einsum import splits_sequence
from autopar.sharding.stage_problem import Settings, StageProblem
from graphs.ir import ATTENTION, MATMUL
from graphs.query import main_boundary

MODEL = "llama:hidden={h},layers={l},heads=16,kv_heads=2,seq={s},vocab=512,ffn={f}"
SETTINGS = Settings(n_microbatches=4)


def _solver(batch: int, mesh_shape: tuple[int, int], context_parallel: bool = True):
    g = ModelSource(MODEL.format(h=1024, l=2, s=16384, f=2048)).graph(batch)
    cl = load_cluster("dgx-h100", 1)
    mesh = Mesh(cl, Submesh(1, mesh_shape[0] * mesh_shape[1]), mesh_shape)
    cm = ComputeModel(cl.gpu, "bf16")
    return g, mesh, cm, LayerSolver(g, cm, SETTINGS, SearchStats(), 10.0, "highs", context_parallel=context_parallel)


def _seq_by_name(name: str) -> bool:
    """An independent reading of the llama block's sequence splits: its linears are
    "bsk,nk->bsn" and its sdpa splits "s", so a split sequence is an "s@" before any suffix."""
    return "s@" in name.split("+")[0].split(":")[0]


def _keys(g, mesh):
    """Every (layer, entry layout) of the model's blocks on `mesh`."""
    return [(li, q) for li in range(1, len(g.layers))
            for q in boundary_specs(g.node(main_boundary(g, list(g.layers[li].nodes))).out_shape, mesh)]


@pytest.mark.parametrize("batch,shape", [(1, (1, 4)), (2, (2, 4)), (2, (1, 8))])
def test_lean_solution_is_the_optimum_without_sequence_splits(batch, shape):
    """For each key: the lean solution splits no sequence, costs no less than the full optimum,
    is the full optimum itself where that splits no sequence, and equals the optimum of the
    layer's ILP with every "s@" strategy removed (an independent filter, solved here)."""
    g, mesh, cm, solver = _solver(batch, shape)
    seen_seq = 0
    for li, q in _keys(g, mesh):
        full = solver.solve(li, mesh, q)
        lean = solver.solve(li, mesh, q, seq_split=False)
        assert not lean.seq_split
        assert not any(_seq_by_name(n) for n in lean.names.values())
        assert full.seq_split == any(_seq_by_name(n) for n in full.names.values())
        if not math.isfinite(full.objective):
            continue
        assert lean.objective >= full.objective * (1 - 1e-9)
        if not full.seq_split:
            assert lean is full
            continue
        seen_seq += 1
        names = list(g.layers[li].nodes)
        src = solver.inputs[li]
        probe = StageProblem(g, names, mesh, cm, boundary={src: q})
        allowed = {grp.root: {s.name for s in grp.strategies[grp.root] if not _seq_by_name(s.name)}
                   for grp in probe.groups if g.node(grp.root).kind in (MATMUL, ATTENTION)}
        oracle = StageProblem(g, names, mesh, cm, boundary={src: q}, allowed=allowed).solve(SETTINGS)
        assert oracle.status == "optimal"
        assert lean.objective == pytest.approx(oracle.objective, rel=1e-9, abs=1e-12)
    assert seen_seq > 0 or batch == 2 and shape == (2, 4)   # the (1, 4) and (1, 8) cases really split


def test_splits_sequence_reads_the_names():
    g, mesh, cm, _ = _solver(1, (1, 4))
    for name in g.layers[1].nodes:
        node = g.node(name)
        if node.kind in (MATMUL, ATTENTION):
            for st in decision_strategies(node, mesh, cm):
                assert splits_sequence(node, st.name) == _seq_by_name(st.name), st.name


def test_lean_table_equals_the_table_without_context_parallelism():
    """The lean range table (built from the full one's clean states) has the figures of the
    table a solver without context parallelism builds from scratch."""
    g, mesh, cm, solver = _solver(1, (1, 4))
    full, lean = range_tables(solver, mesh)
    assert full.uses_seq_split and lean is not full
    assert all(s.seq_split for s in full.starts) and not any(s.seq_split for s in lean.starts)
    *_, plain = _solver(1, (1, 4), context_parallel=False)
    ref = range_table(plain, mesh, seq_split=False)
    for a, b in ((lean.t, ref.t), (lean.param, ref.param), (lean.stash, ref.stash), (lean.sync, ref.sync)):
        assert a == pytest.approx(b, rel=1e-9)
    # a stage walked from a lean start uses lean solutions only
    for _, sol in solver.walk((1, len(g.layers)), mesh, StartLayout(lean.starts[-1].spec, seq_split=False)):
        assert not sol.seq_split


# gpus, global batch, model (hidden, layers, seq, ffn): the first three plan context parallelism
# and are strictly faster with it; the last plans none and ties.
CASES = [(4, 1, (1024, 4, 32768, 2048)), (8, 2, (512, 4, 65536, 1024)), (4, 2, (2048, 4, 16384, 4096)),
         (4, 4, (1024, 4, 32768, 2048))]


@pytest.mark.parametrize("gpus,gb,dims", CASES)
def test_plan_with_context_parallelism_is_never_worse(gpus, gb, dims):
    h, l, s, f = dims
    model = MODEL.format(h=h, l=l, s=s, f=f)
    kw = dict(nodes=1, gpus_per_node=gpus, global_batch=gb, workers=1)
    cluster = "dgx-h100" if gpus == 4 and gb == 1 else "p3.16xlarge"
    with_cp = autopar.plan(model, cluster, **kw)
    without = autopar.plan(model, cluster, context_parallel=False, **kw)
    assert with_cp.predicted.fits and without.predicted.fits
    assert with_cp.predicted.step_time_s <= without.predicted.step_time_s * (1 + 1e-12)
    assert without.search["ilps_no_seq"] == without.search["ilps"]
    uses_cp = "+cp" in with_cp.config.label
    assert not any("+cp" in c for c in without.config.label.split(","))
    if gb < gpus:
        assert uses_cp and with_cp.predicted.step_time_s < without.predicted.step_time_s
