"""The planner's memory check under the eager recipe is the evaluator's (issue 15): a stage the
evaluator says fits is one the tables offer, and only such a stage. The evaluator's per-GPU
peak (evaluate) holds FSDP2's gradient pool outside the allocator's reserve fraction and at least
one loss segment over the allocation; the tables compare each stage's memory with the cap
eager.stage_allocatable_bytes derives from them (RangeTable.cap_bytes)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from autopar.costmodel import eager
from autopar.costmodel.compute import ComputeModel
from autopar.costmodel.memory import inflight
from autopar.evaluation.evaluator import evaluate, evaluate_stage
from autopar.hardware.mesh import Mesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.search.candidates import Candidate
from autopar.search.layer_solver import SearchStats
from autopar.search.planner import SearchJob
from autopar.search.range_table import range_tables
from autopar.search.tables import StageChoice


def test_stage_cap_is_the_inverse_of_the_device_peak():
    """Closed form: at the cap, device_peak_bytes is the capacity, for a pool and a loss
    segment under and over the reserve; without either it is allocatable_bytes."""
    capacity, n = 80 * 2**30, 4
    w = eager.CUBLAS_WORKSPACE_BYTES
    for expandable in (True, False):           # autopar run's allocator, and the default segments
        cap = eager.allocatable_bytes(capacity, n, expandable)
        assert eager.stage_allocatable_bytes(cap, expandable=expandable) == cap
        for pool, loss in ((4e9, 0.0), (0.0, 2e10), (4e9, 1e9), (4e9, 3e10)):
            a = float(eager.stage_allocatable_bytes(cap, pool, loss, expandable=expandable))
            seg = eager.loss_segment_bytes(loss)
            assert eager.device_peak_bytes(a + w, True, n, pool, seg, expandable) == pytest.approx(capacity, rel=1e-12)
    cap = eager.allocatable_bytes(capacity, n)
    # the pool raises the cap by pool f / (1 + f); a large loss segment lowers it
    f = eager.reserve_fraction(expandable=True)
    assert eager.stage_allocatable_bytes(cap, 4e9) == pytest.approx(cap + 4e9 * f / (1 + f))
    assert eager.stage_allocatable_bytes(cap, 0.0, 1e11) < cap
    # state absent at the activation peak raises the cap where no pool holds it, while what stays
    # held must fit alone; with a pool neither counts (evaluate reads the pools' peak)
    assert eager.stage_allocatable_bytes(cap, 0.0, 0.0, 2e9, cap - 1) == pytest.approx(cap + 2e9)
    assert eager.stage_allocatable_bytes(cap, 0.0, 0.0, 2e9, cap + 1) == -math.inf
    for held in (0.0, cap + 1e9):
        assert eager.stage_allocatable_bytes(cap, 4e9, 0.0, 2e9, held) == eager.stage_allocatable_bytes(cap, 4e9)


MODEL = "gpt:hidden=64,layers=4,heads=4,seq=32,vocab=128"


def _plans(job, prop, cl):
    """(plan, [(range table, i, j, p, k, microbatches held)] per stage) of every one-stage plan on
    all four GPUs and every two-stage plan (two GPUs each) cut after layer 2 or 4, under each
    logical mesh and start layout the tables hold, with k of the first layers recomputed for
    k in {0, 1, all} per stage (the tied head's stage holds the embedding's copy there)."""
    L = len(prop.graph.layers)
    tables = {}
    for mi, sub in enumerate(prop.subs):
        if sub.n_devices in (2, 4):
            for shape in sub.logical_meshes():
                tables[(mi, shape)] = range_tables(prop.solver, Mesh(cl, sub, shape))[0]
    four = next(mi for mi, s in enumerate(prop.subs) if s.n_devices == 4)
    two = next(mi for mi, s in enumerate(prop.subs) if s.n_devices == 2)

    def options(mi, i, j):
        for (m, shape), rt in tables.items():
            if m != mi:
                continue
            for p, start in enumerate(rt.starts):
                if start.at_embedding != (i == 0) or not math.isfinite(rt.t[i, j, p]):
                    continue
                for k in sorted({0, 1, j - i}):
                    yield rt, p, k, StageChoice(shape, start, "full" if k else "none", k if 0 < k < j - i else None)

    slicings = [((0, L, four),), ((0, 2, two), (2, L, two)), ((0, 4, two), (4, L, two))]
    for stages in slicings:
        per_stage = [list(options(mi, i, j)) for i, j, mi in stages]
        if len(stages) == 1:
            combos = [(o,) for o in per_stage[0]]
        else:    # each option of each stage once, beside the other stage's first option
            combos = [(o, per_stage[1][0]) for o in per_stage[0]] + [(per_stage[0][0], o) for o in per_stage[1][1:]]
        for combo in combos:
            cand = Candidate(stages, tuple(c for *_, c in combo), (0.0,) * len(stages), (0.0,) * len(stages),
                             0.0, "dp", 1)
            plan = job.simulate(prop, cand)
            B = plan.training.n_microbatches
            cells = [(rt, i, j, p, k, inflight("1f1b", s, len(stages), B))
                     for s, ((i, j, _), (rt, p, k, _)) in enumerate(zip(stages, combo))]
            yield plan, cells


def _job(zero: int, global_batch: int = 16):
    cl = load_cluster("p3.16xlarge", 1, 4)
    job = SearchJob(ModelSource(MODEL), cl, global_batch, "1f1b", None, cl.gpu.training_dtype(None), zero, 10.0,
                    "highs", "ilp", eager=True)
    return cl, job, job.propose(2, SearchStats())


def _stage_results(plan, graph, cl):
    cm = ComputeModel(cl.gpu, plan.training.dtype)
    return [evaluate_stage(graph, cl, st, plan.training, cm, eager=True)
            for st in plan.stages]


def _held(r) -> float:
    """What a stage holds through the step (evaluate's `held`), with a tied embedding's gradient."""
    return r.param_state_bytes + r.ddp_bucket_bytes + r.autocast_cache_bytes + r.fsdp_root_bytes + r.tied_grad_bytes


def _same_memory(plan, cells, results) -> bool:
    """Whether the tables price every stage's memory, gradient pool, loss working set, absent
    and held state as the evaluator does."""
    return all(float(rt.layers_memory_bytes(i, j, k, held)[p]) == pytest.approx(st.memory.total_bytes, rel=1e-9)
               and rt.pool[i, j, p] == pytest.approx(r.grad_pool_bytes, rel=1e-9, abs=1e-3)
               and rt.loss[i, j, p] == pytest.approx(r.cross_entropy_peak_bytes, rel=1e-9, abs=1e-3)
               and rt.absent[i, j, p] == pytest.approx(r.grads_absent_bytes, rel=1e-9, abs=1e-3)
               and rt.param[i, j, p] + rt.tied_grad[i, j, p] == pytest.approx(_held(r), rel=1e-9)
               for st, r, (rt, i, j, p, k, held) in zip(plan.stages, results, cells))


# (1, 16) and (3, 2) add 6 s each on a busy 2-core machine: `-m slow`
@pytest.mark.parametrize("zero,global_batch", [(3, 16), pytest.param(1, 16, marks=pytest.mark.slow),
                                               pytest.param(3, 2, marks=pytest.mark.slow), (0, 2)])
def test_tables_offer_a_stage_exactly_where_the_evaluator_fits_it(zero, global_batch):
    """Oracle: the evaluator. For a grid of eager plans of a tied GPT on four GPUs (one stage
    on all four, or two of two, every logical mesh and start layout, some recompute counts),
    at GPU capacities just over and just under each plan's predicted peak: each stage's memory
    (the evaluator's) is within the cap its gradient pool and loss give
    (eager.stage_allocatable_bytes of the planner's cap, allocatable_bytes) if and only if the
    evaluator says the plan fits; and where the tables' memory, pool and loss are the
    evaluator's (the test below: not yet everywhere), the tables' own check
    (RangeTable.cap_bytes; least_recompute_layers, the DP's per-cell
    answer) agrees too. ZeRO-3 holds FSDP2's gradient pool (where the planner refused plans
    that fit, issue 15); ZeRO-1 as `autopar run` runs it on FSDP2 too. One microbatch per
    step (global batch 2): the gradients are absent at the activation peak, which a stage
    without a pool may fill (ZeRO-0, and ZeRO-3's one-GPU stages)."""
    cl, job, prop = _job(zero, global_batch)
    checked = same = pooled = absent = 0
    for plan, cells in _plans(job, prop, cl):
        peak = plan.predicted.peak_memory_bytes
        results = _stage_results(plan, prop.graph, cl)
        alike = _same_memory(plan, cells, results)
        for capacity in (peak * (1 + 1e-7), peak * (1 - 1e-7)):
            small = replace(cl, gpu=replace(cl.gpu, memory_bytes=capacity))
            fits = evaluate(plan, prop.graph, small, eager=True).predicted.fits
            assert fits == (capacity > peak)
            cap = eager.allocatable_bytes(capacity, cl.n_gpus)
            # the rule: each stage's memory within the cap its pool, loss, absent and held state give
            # DDP's first buckets (step 2) fill part of what is absent at the activation peak
            assert all(st.memory.total_bytes <= eager.stage_allocatable_bytes(
                cap, r.grad_pool_bytes, r.cross_entropy_peak_bytes, r.grads_absent_bytes - r.ddp_rebuild_bytes,
                _held(r))
                for st, r in zip(plan.stages, results)) == fits, plan.config.label
            checked += 1
            if not alike:
                continue
            caps = [float(rt.cap_bytes(cap, (i, j))[p]) for rt, i, j, p, _, _ in cells]
            offered = all(float(rt.layers_memory_bytes(i, j, k, held)[p]) <= c
                          for (rt, i, j, p, k, held), c in zip(cells, caps))
            assert offered == fits, (plan.config.label, capacity > peak)
            # the DP's per-cell answer agrees: a stage that fits with k layers recomputed has a
            # least fitting count of at most k; without recomputation, 0 exactly where it fits
            for (rt, i, j, p, k, held), c in zip(cells, caps):
                least = int(rt.least_recompute_layers(np.array([i]), np.array([j]), np.array([held]), cap)[0, 0, p])
                own = float(rt.layers_memory_bytes(i, j, k, held)[p]) <= c
                assert not own or 0 <= least <= k
                assert k != 0 or (least == 0) == own
            same += 1
        pooled += any(rt.pool is not None and rt.pool[i, j, p] > 0 for rt, i, j, p, _, _ in cells)
        absent += any(r.grads_absent_bytes > 0 and r.grad_pool_bytes == 0 for r in results)
    assert checked >= 100 and same >= 50
    assert (pooled > 0) == (zero >= 1)
    # credited where no pool holds the gradients: ZeRO-0 (the grid's ZeRO-3 stages span GPUs)
    assert (absent > 0) == (global_batch == 2 and zero == 0)


@pytest.mark.xfail(strict=True, reason="a recomputed layer's working set (max_layer_stash) is its stash as a "
                   "problem of its own, where the evaluator counts it with the stage's saved flags: a boundary "
                   "tensor is the embedding's stash in the stage and the next layer's alone (4-8 KiB here)")
def test_tables_price_every_eager_stage_as_the_evaluator():
    """Oracle: the evaluator. Every stage of the grid above, as the tables price its memory."""
    cl, job, prop = _job(3)
    assert all(_same_memory(plan, cells, _stage_results(plan, prop.graph, cl)) for plan, cells in _plans(job, prop, cl))


def test_gpt_1_3b_zero3_recomputes_the_evaluators_least_layers():
    """Oracle: the evaluator. gpt-1.3b on four V100s, 4 microbatches of 16, eager ZeRO-3, one
    stage on a 2x2 mesh (issue 15's case: the planner recomputed 16 of 26 layers, 2.460 s, where
    the evaluator accepts 15, 2.435 s, with the default segments' reserve): for every start
    layout, the tables' least count of recomputed layers (least_recompute_layers) is the
    evaluator's, that count fitting and one fewer not; and `plan` finds the plan recomputing the
    least, 14 with expandable segments' smaller reserve (autopar run's allocator)."""
    import autopar

    cl = load_cluster("p3.16xlarge", 1, 4)
    src = ModelSource("gpt-1.3b")
    job = SearchJob(src, cl, 64, "1f1b", None, cl.gpu.training_dtype(None), 3, 10.0, "highs", "ilp", eager=True)
    prop = job.propose(16, SearchStats())
    L = len(prop.graph.layers)
    mi = next(m for m, s in enumerate(prop.subs) if s.n_devices == 4)
    rt = range_tables(prop.solver, Mesh(cl, prop.subs[mi], (2, 2)))[0]
    cap = eager.allocatable_bytes(cl.gpu.memory_bytes, cl.n_gpus)
    held = inflight("1f1b", 0, 1, 4)

    def fits(p: int, k: int) -> bool:
        c = StageChoice((2, 2), rt.starts[p], "full" if k else "none", k if 0 < k < L else None)
        return job.simulate(prop, Candidate(((0, L, mi),), (c,), (0.0,), (0.0,), 0.0, "dp", 1)).predicted.fits

    counts = []
    for p, start in enumerate(rt.starts):
        if not start.at_embedding or not math.isfinite(rt.t[0, L, p]):
            continue
        k = int(rt.least_recompute_layers(np.array([0]), np.array([L]), np.array([held]), cap)[0, 0, p])
        if k < 0:
            assert not fits(p, L)
            continue
        assert fits(p, k) and (k == 0 or not fits(p, k - 1)), (start.spec, k)
        counts.append(k)
    assert min(counts) == 14
    got = autopar.plan(src, cl, global_batch=64, microbatches=4, zero=3, eager=True, workers=1)
    assert got.stages[0].recompute_layers == 14
    # 2.435 s before FSDP2's casts of its shards, for each of the 8 gathers a step, replaced
    # autocast's one copy of the weights (eager.fsdp_weight_cast_params); 2.456 s recomputing 15;
    # 2.431 s before COMM_OVERLAP_SLOWDOWN's refit under the memory-bound kinds (0.565 -> 0.501:
    # FSDP2's hidden gathers slow the compute less; a V100 has no profile, so only that moves);
    # 2.426 s before the recomputation reran only what torch's checkpoint reruns (each block up to
    # its last saved tensor, plus autocast's weight casts again; stage_problem.checkpoint_roles);
    # 2.325 s before the eager kernels were priced by kind (the GPU's idle per block in every
    # stage, the bias gradients' sums, the fp32 norms and residual adds kernel by kernel; a
    # V100 has no profile, so every kind prices at its streaming bandwidth) and
    # COMM_OVERLAP_SLOWDOWN's refit (0.501 -> 0.521)
    assert got.predicted.step_time_s == pytest.approx(2.361, abs=5e-4)
