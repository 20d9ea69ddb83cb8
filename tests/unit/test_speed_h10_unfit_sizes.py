"""memory_floor.cannot_fit skips a microbatch size before its ILPs when no candidate can fit.
Oracles: the full search (SearchJob with prove_unfit=False, the previous code path) finds no
candidate at every size the floor rules out, on small models and memory-tight clusters; every
cell of every range table the full search builds holds at least the floor (per layer solution,
recompute count and held microbatches); the searches with and without the proof return the
same rows and plans; and on gpt-39b / 64 V100s the floor rules out microbatch 1024 (the full
search finds nothing there) and none of the sizes that fit."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from autopar.hardware.mesh import Mesh, searched_meshes, submeshes
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.plan import PlanError
from autopar.search import planner
from autopar.search.candidates import microbatch_candidates
from autopar.search.layer_solver import SearchStats
from autopar.search.memory_floor import cannot_fit, layer_floors, range_floors
from autopar.search.range_table import range_tables

SMALL = "gpt:hidden=256,layers=4,heads=4,seq=128,vocab=1024"


def _cluster(nodes: int, mem_mib: float):
    base = load_cluster("p3.16xlarge", nodes, None)
    return dataclasses.replace(base, gpu=dataclasses.replace(base.gpu, memory_bytes=mem_mib * 2**20))


def _job(src, cl, gb, schedule="1f1b", zero=1, prove=True, storage=False):
    return planner.SearchJob(src, cl, gb, schedule, None, "fp16", zero, 10.0, "highs", "ilp",
                             sharded_storage=storage, prove_unfit=prove)


def _proves(job: planner.SearchJob, graph, solver) -> bool:
    cl = job.cl
    L = len(graph.layers)
    return cannot_fit(graph, solver.inputs, cl, submeshes(cl), lambda sub: searched_meshes(cl, sub), solver.cm,
                      zero=job.zero, schedule=job.schedule, n_microbatches=job.global_batch // graph.batch,
                      max_stages=min(L, cl.n_gpus), cap_bytes=cl.gpu.memory_bytes,
                      sharded_storage=job.sharded_storage and job.zero in (1, 2),
                      identities=[solver.identity(li) for li in range(L)])


def _floors_below_tables(prop: planner.Proposal, cl, zero: int, storage: bool) -> None:
    """Every cell of every range table: memory (any recompute count, several held counts)
    >= the floor on its mesh."""
    graph, solver = prop.graph, prop.solver
    L = len(graph.layers)
    held = np.array([1.0, 1.5, 2.0, 3.0, 7.0])
    for sub in prop.subs:
        for shape in searched_meshes(cl, sub):
            mesh = Mesh(cl, sub, shape)
            floor = range_floors(layer_floors(graph, solver.inputs, mesh, solver.cm, zero, storage), held)
            for rt in range_tables(solver, mesh):
                for i in range(L):
                    for j in range(i + 1, L + 1):
                        live = np.isfinite(rt.t[i, j])
                        if not live.any():
                            continue
                        for k in range(j - i + 1):
                            for x, h in enumerate(held):
                                mem = rt.layers_memory_bytes(i, j, k, h)[live]
                                assert (mem >= floor[x, i, j] * (1 - 1e-12)).all(), (sub, shape, i, j, k, h)


CASES = [  # (nodes, memory MiB, schedule, zero, sharded storage)
    (1, 24, "1f1b", 1, False),
    (1, 40, "gpipe", 3, False),
    (2, 16, "1f1b", 2, True),
]


@pytest.mark.parametrize("nodes,mem,schedule,zero,storage", CASES)
def test_floor_rules_out_only_sizes_the_full_search_cannot_fit(nodes, mem, schedule, zero, storage):
    cl = _cluster(nodes, mem)
    src = ModelSource(SMALL, dtype="fp16")
    gb = 1024
    full = _job(src, cl, gb, schedule, zero, prove=False, storage=storage)
    proven = []
    for size in microbatch_candidates(gb, cl.n_gpus, "auto"):
        prop = full.propose(size, SearchStats())
        if _proves(full, prop.graph, prop.solver):
            proven.append(size)
            assert prop.candidates == [], size          # the full search has nothing to simulate
        _floors_below_tables(prop, cl, zero, storage)
    assert proven                                       # the oracle is not vacuous


def test_a_proven_size_searches_as_before():
    """SearchJob.search with the proof returns the full search's row (and no plan); sizes the
    floor leaves open are searched as before, plan for plan."""
    cl = _cluster(1, 40)
    src = ModelSource(SMALL, dtype="fp16")
    gb = 1024
    for size in (16, 1024):
        old = _job(src, cl, gb, prove=False).search(size)
        new = _job(src, cl, gb).search(size)
        assert new.proven_unfit == (size == 1024)
        assert json.dumps(new.row, sort_keys=True) == json.dumps(old.row, sort_keys=True)
        assert (new.plan is None) == (old.plan is None)
        if old.plan is not None:
            assert json.dumps(new.plan.to_dict(), sort_keys=True) == json.dumps(old.plan.to_dict(), sort_keys=True)
        else:
            assert not math.isfinite(new.row["dp_total_s"])


def test_no_fit_message_unchanged(monkeypatch):
    """Where no size fits, plan's message names the least memory of the full search: the
    proven sizes are searched in full for it."""
    cl = _cluster(1, 4)
    src = ModelSource(SMALL, dtype="fp16")
    proofs = []

    def recorded(*a, **k):
        proofs.append(cannot_fit(*a, **k))
        return proofs[-1]
    monkeypatch.setattr(planner, "cannot_fit", recorded)
    with pytest.raises(PlanError) as new:
        planner.plan(src, cl, global_batch=64, workers=1)
    assert any(proofs)                   # some size was proven not to fit, then searched in full
    monkeypatch.setattr(planner, "cannot_fit", lambda *a, **k: False)
    with pytest.raises(PlanError) as old:
        planner.plan(src, cl, global_batch=64, workers=1)
    assert str(new.value) == str(old.value)


def test_gpt_39b_on_64_v100s():
    """Microbatch 1024 (no candidate in the full search: bench/plan_bench.py's row has no
    dp_total_s) is ruled out; the sizes that plan (1, 2 and 16 checked) are not. 64 and 256 fit
    nowhere either, but the floor cannot show it: the tables hold each layer's time-optimal
    strategies, the floor every strategy (whole model on 64 GPUs, one microbatch held:
    floor 9.9 / 12.2 GiB, least in the tables 32.0 / 39.6 GiB, cap 14.9 GiB)."""
    cl = load_cluster("p3.16xlarge", 8, None)
    dtype = cl.gpu.training_dtype(None)
    src = ModelSource("gpt-39b", dtype=dtype)
    job = planner.SearchJob(src, cl, 1024, "1f1b", None, dtype, 1, 10.0, "highs", "ilp")
    from autopar.costmodel.compute import ComputeModel
    from autopar.search.layer_solver import LayerSolver
    from autopar.sharding.stage_problem import Settings
    for size, unfit in ((1, False), (2, False), (16, False), (1024, True)):
        graph = src.graph(size)
        solver = LayerSolver(graph, ComputeModel(cl.gpu, dtype), Settings(n_microbatches=1024 // size, zero=1),
                             SearchStats(), 10.0, "highs")
        assert _proves(job, graph, solver) == unfit, size


def test_most_held_never_below_a_fitting_count():
    """cannot_fit reads a cell as fitting at depth s where its most fitting held count is at
    least the depth's: every count whose floor (base + h * kept) is within the limit passes."""
    from autopar.search.memory_floor import _most_held
    rng = np.random.default_rng(0)
    base = np.concatenate([rng.uniform(0, 2e10, 2000), [np.inf, 0.0, 1.6e10, 1.6e10]])
    kept = np.concatenate([rng.choice([0.0, 1e6, 3.3e8, 2e9], 2000), [0.0, 0.0, 0.0, 1e9]])
    limit = 1.6e10
    most = _most_held(base, kept, limit)
    for h in (1.0, 1.5, 2.0, 3.0, 7.0, 64.0, 1024.0):
        fits = base + h * kept <= limit
        assert (most[fits] >= h).all()
