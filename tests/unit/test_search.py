"""The search's parts against oracles: range tables against walking each range layer by layer,
stage tables and equal-split candidates against brute force over every option, their
closed-form step time against the pipeline simulator, DP candidates against the brute-force
stage DP, and microbatch sizes against their closed form."""

from __future__ import annotations

import itertools
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest

from autopar.costmodel.compute import ComputeModel
from autopar.evaluation.baselines import split_blocks
from autopar.evaluation.pipeline import device_order, simulate
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.plan import PlanError
from autopar.search.candidates import (
    Candidate,
    dp_candidates,
    interleaved_candidates,
    microbatch_candidates,
    microbatch_neighbours,
    uniform_candidates,
    unique,
)
from autopar.search.layer_solver import LayerSolver, SearchStats, StartLayout, boundary_specs
from autopar.search.planner import best_simulated
from autopar.search.range_table import RECOMPUTE_OPTIONS, RangeTable, range_table
from autopar.search.tables import SearchSpace, StageChoice, StageTables, range_classes
from autopar.sharding.stage_problem import Settings
from solvers.stage_dp import stage_dp_brute_force

P3 = load_cluster("p3.16xlarge", 1)
CM = ComputeModel(P3.gpu, P3.gpu.training_dtype())
SPECS = [(0, 0, 0), (1, 0, 0), (0, 0, 2)]      # three boundary layouts of a (batch, seq, hidden) tensor


def peak_inflight(schedule: str, rank: int, depth: int, n_microbatches: int, chunks: int = 1) -> float:
    """Oracle for the microbatches a rank holds: the most forwards not yet matched by their
    backward in the rank's schedule, in whole-stage stashes (a chunk holds 1/chunks)."""
    held = peak = 0
    for kind, _, _ in device_order(schedule, rank, depth, n_microbatches, chunks):
        held += 1 if kind == "F" else -1
        peak = max(peak, held)
    return peak / chunks


def synthetic_table(rng: np.random.Generator, n_layers: int, specs=SPECS) -> RangeTable:
    """Random figures for every range and start layout, inf where a range cannot be entered
    in a start (layer 0 only at the embedding, others only in a plain layout)."""
    starts = [StartLayout(q, at_embedding=True) for q in specs] + [StartLayout(q) for q in specs]
    shape = (n_layers, n_layers + 1, len(starts))
    ok = np.zeros(shape, bool)
    for i, j, p in itertools.product(range(n_layers), range(n_layers + 1), range(len(starts))):
        ok[i, j, p] = j > i and starts[p].at_embedding == (i == 0)

    def arr(lo: float, hi: float) -> np.ndarray:
        return np.where(ok, rng.uniform(lo, hi, shape), np.inf)

    return RangeTable(t=arr(1, 2), rec=arr(0.2, 0.6), sync=arr(0, 3), param=arr(1, 3), stash=arr(0.1, 0.5),
                      inputs=arr(0.01, 0.05), max_layer_stash=arr(0.05, 0.2), starts=starts)


def chained_table(rng: np.random.Generator, n_layers: int, specs=SPECS) -> RangeTable:
    """A table composed from random per-layer figures, as range_tables composes layer
    solutions: a range's figures are its layers' sums (the largest layer stash for
    max_layer_stash), so a range's first k layers are the range [i, i + k) of the table."""
    starts = [StartLayout(q, at_embedding=True) for q in specs] + [StartLayout(q) for q in specs]
    P = len(starts)
    per = {name: rng.uniform(lo, hi, (n_layers, P)) for name, lo, hi in
           (("t", 0.2, 0.4), ("rec", 0.04, 0.12), ("sync", 0, 0.6), ("param", 0.2, 0.6), ("stash", 0.02, 0.1),
            ("inputs", 0.002, 0.01))}
    out = {name: np.full((n_layers, n_layers + 1, P), np.inf) for name in (*per, "max_layer_stash")}
    for i, j, p in itertools.product(range(n_layers), range(n_layers + 1), range(P)):
        if j > i and starts[p].at_embedding == (i == 0):
            for name, v in per.items():
                out[name][i, j, p] = sum(v[i:j, p])
            out["max_layer_stash"][i, j, p] = max(per["stash"][i:j, p])
    return RangeTable(**out, starts=starts)


def options(rt: RangeTable, i: int, j: int, held: float, cap: float, slots: int):
    """Every feasible (key, start index, recompute, t, sync, memory, recompute_layers) of range
    [i, j), by the formulas: each start, and each count k of first layers recomputed (0: none,
    j - i: full), whose figures are the range [i, i + k)'s."""
    out = []
    for k, p in itertools.product(range(j - i + 1), range(len(rt.starts))):
        if k == 0:
            t = rt.t[i, j, p]
            mem = rt.param[i, j, p] + held * rt.stash[i, j, p]
        else:
            t = rt.t[i, j, p] + rt.rec[i, i + k, p]
            with np.errstate(invalid="ignore"):       # inf - inf where the range cannot be entered
                mem = (rt.param[i, j, p] + held * (rt.stash[i, j, p] - rt.stash[i, i + k, p] + rt.inputs[i, i + k, p])
                       + rt.max_layer_stash[i, i + k, p])
        if math.isfinite(t) and mem <= cap:
            out.append((slots * t + rt.sync[i, j, p], p, "full" if k else "none", t, rt.sync[i, j, p], mem,
                        k if 0 < k < j - i else None))
    return out


# ---- range tables ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,sub", [((2, 2), Submesh(1, 4)), ((1, 2), Submesh(1, 2))])
def test_range_table_equals_walking_each_range(shape, sub):
    """Every cell of the suffix recursion equals the range's layers walked one by one, each
    entered in the layout the previous one emits."""
    g = ModelSource("gpt:hidden=64,layers=3,heads=4,seq=32,vocab=128").graph(8)
    mesh = Mesh(P3, sub, shape)
    solver = LayerSolver(g, CM, Settings(n_microbatches=4, zero=1), SearchStats(), 10.0, "highs")
    rt = range_table(solver, mesh)
    L = len(g.layers)
    specs = boundary_specs(g.node(solver.inputs[1]).out_shape, mesh)
    assert rt.starts == [StartLayout(q, True) for q in specs] + [StartLayout(q) for q in specs]
    for (pi, start), i in itertools.product(enumerate(rt.starts), range(L)):
        for j in range(i + 1, L + 1):
            got = [a[i, j, pi] for a in (rt.t, rt.rec, rt.sync, rt.param, rt.stash, rt.inputs, rt.max_layer_stash)]
            if start.at_embedding != (i == 0):
                assert all(x == math.inf for x in got)
                continue
            sums, spec, stash_max = np.zeros(6), start.spec, 0.0
            for li in range(i, j):
                sol = solver.solve(li, mesh, None, restrict=spec) if li == 0 else solver.solve(li, mesh, spec)
                sums += [sol.t_s, sol.fwd_s, sol.sync_s, sol.param_bytes, sol.stash_bytes, sol.input_bytes]
                stash_max = max(stash_max, sol.stash_bytes)
                spec = sol.out_spec if sol.out_spec is not None else spec
            if math.isinf(sums[0]):     # a layout no strategy emits (a split the embedding cannot make)
                assert got[0] == math.inf
                continue
            assert got == pytest.approx([*sums, stash_max], rel=1e-12)


# ---- stage tables ------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_stage_table_cells_are_the_best_option_by_brute_force(schedule):
    rng = np.random.default_rng(1)
    L, S, B, cap = 5, 3, 4, 3.2
    space = SearchSpace(L, S, B, n_gpus=4, schedule=schedule, memory_cap_bytes=cap)
    tables = StageTables(space, n_submeshes=2)
    # composed tables: a stage's time grows with its recomputed layers, as in the planner's
    offered = {0: [((1, 2), chained_table(rng, L)), ((2, 1), chained_table(rng, L))],
               1: [((1, 1), chained_table(rng, L))]}
    for mi, meshes in offered.items():
        for shape, rt in meshes:
            tables.add(mi, shape, rt)
    least = math.inf
    for mi, meshes in offered.items():
        for i, j, s in itertools.product(range(L), range(L + 1), range(1, S + 1)):
            held = peak_inflight(schedule, 0, s, B)
            best = None
            for shape, rt in meshes:
                for opt in options(rt, i, j, held, cap, B + s - 1):
                    if best is None or opt[0] < best[0]:
                        best = (*opt, shape, rt)
                for rc, p in itertools.product(RECOMPUTE_OPTIONS, range(len(rt.starts))):
                    mem = (rt.param[i, j, p] + held * rt.inputs[i, j, p] + rt.max_layer_stash[i, j, p]
                           if rc == "full" else rt.param[i, j, p] + held * rt.stash[i, j, p])
                    least = min(least, mem)
            cell = tables.cell(i, j, mi, s)
            if best is None:
                assert cell["key_s"] == math.inf and cell["t_s"] == math.inf
                continue
            key, p, rc, t, sync, _, layers, shape, rt = best
            assert (cell["key_s"], cell["t_s"], cell["sync_s"]) == pytest.approx((key, t, sync), rel=1e-12)
            assert tables.choice(i, j, mi, s) == StageChoice(shape, rt.starts[p], rc, layers)
    assert tables.least_memory_bytes == pytest.approx(least, rel=1e-12)


def test_range_classes_group_ranges_of_equal_layer_sequences():
    """Oracle: two ranges share a class exactly when both start at the embedding or both
    inside the model, and their layers' identities are equal in order."""
    ids = ["embed", "block", "block", "moe", "block", "block", "moe", "head"]
    cls = range_classes(ids)
    L = len(ids)
    ranges = [(i, j) for i in range(L) for j in range(i + 1, L + 1)]
    for (i, j), (a, b) in itertools.product(ranges, repeat=2):
        same = (i == 0) == (a == 0) and ids[i:j] == ids[a:b]
        assert (cls[i, j] == cls[a, b]) == same
    assert all(cls[i, j] == -1 for i in range(L) for j in range(i + 1))
    assert sorted(set(cls[cls >= 0].tolist())) == list(range(int(cls.max()) + 1))


def test_ranges_of_one_class_have_equal_figures_on_every_mesh():
    """What the class-keyed stage tables rely on: the range tables of a real model agree, to
    the bit, on every range of one class."""
    g = ModelSource("gpt:hidden=64,layers=4,heads=4,seq=32,vocab=128").graph(8)
    solver = LayerSolver(g, CM, Settings(n_microbatches=4, zero=1), SearchStats(), 10.0, "highs")
    L = len(g.layers)
    cls = range_classes([solver.identity(li) for li in range(L)])
    assert int(cls.max()) + 1 < L * (L + 1) // 2          # the blocks make classes shared
    for shape in [(1, 2), (2, 1)]:
        rt = range_table(solver, Mesh(P3, Submesh(1, 2), shape))
        figures = np.stack([rt.t, rt.rec, rt.sync, rt.param, rt.stash, rt.inputs, rt.max_layer_stash])
        first: dict[int, np.ndarray] = {}
        for i, j in zip(*np.nonzero(cls >= 0)):
            want = first.setdefault(int(cls[i, j]), figures[:, i, j])
            assert np.array_equal(figures[:, i, j], want)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_class_keyed_tables_equal_tables_of_every_range(schedule):
    """Range tables that agree within classes give, per range, the cells and DP inputs that
    keying every range separately gives."""
    rng = np.random.default_rng(7)
    L, S, B, cap = 6, 4, 3, 3.2
    ids = ["embed", "block", "block", "block", "block", "head"]
    cls = range_classes(ids)
    reps = {}
    for i, j in zip(*np.nonzero(cls >= 0)):
        reps.setdefault(int(cls[i, j]), (i, j))

    def classed(rt: RangeTable) -> RangeTable:
        """rt with every range's figures those of its class's first range."""
        out = [a.copy() for a in (rt.t, rt.rec, rt.sync, rt.param, rt.stash, rt.inputs, rt.max_layer_stash)]
        for i, j in zip(*np.nonzero(cls >= 0)):
            for a in out:
                a[i, j] = a[reps[int(cls[i, j])]]
        return RangeTable(*out, starts=rt.starts)

    space = SearchSpace(L, S, B, n_gpus=4, schedule=schedule, memory_cap_bytes=cap)
    keyed, every = StageTables(space, 2, cls), StageTables(space, 2)
    for mi, shape in [(0, (1, 2)), (0, (2, 1)), (1, (1, 1))]:
        rt = classed(synthetic_table(rng, L))
        keyed.add(mi, shape, rt)
        every.add(mi, shape, rt)
    for i, j, mi, s in itertools.product(range(L), range(L + 1), range(2), range(S + 1)):
        assert keyed.cell(i, j, mi, s).tolist() == every.cell(i, j, mi, s).tolist()
    p2p = rng.uniform(0, 1, (2, L + 1))
    for a, b in zip(keyed.dp_inputs(p2p), every.dp_inputs(p2p)):
        assert np.array_equal(a, b)
    assert keyed.least_memory_bytes == every.least_memory_bytes


def test_dp_inputs_add_transfers_and_the_deepest_sync():
    rng = np.random.default_rng(2)
    L, S, B = 4, 3, 2
    tables = StageTables(SearchSpace(L, S, B, 2, "1f1b", 1e9), n_submeshes=1)
    tables.add(0, (1, 2), synthetic_table(rng, L))
    p2p = rng.uniform(0, 1, (1, L + 1))
    cost, extra = tables.dp_inputs(p2p)
    c = tables.cell
    for i, j in itertools.product(range(L), range(L + 1)):
        syncs = [c(i, j, 0, s)["sync_s"] for s in range(1, S + 1) if math.isfinite(c(i, j, 0, s)["t_s"])]
        assert extra[i, j, 0] == pytest.approx(2 * p2p[0, j] + max(syncs, default=0.0), rel=1e-12)
        for s in range(1, S + 1):
            assert cost[i, j, 0, s] == pytest.approx(c(i, j, 0, s)["t_s"] + 2 * p2p[0, j] / min(s, B), rel=1e-12)


def test_dp_candidates_are_the_brute_force_optimum_at_each_depth_bound():
    rng = np.random.default_rng(3)
    L, B = 5, 3
    subs = [Submesh(1, 1), Submesh(1, 2)]
    space = SearchSpace(L, 4, B, n_gpus=4, schedule="1f1b", memory_cap_bytes=1e9)
    tables = StageTables(space, n_submeshes=2)
    tables.add(0, (1, 1), synthetic_table(rng, L))
    tables.add(1, (1, 2), synthetic_table(rng, L))
    tables.add(1, (2, 1), synthetic_table(rng, L))
    cost, extra = tables.dp_inputs(np.zeros((2, L + 1)))
    cands = dp_candidates(tables, cost, extra, subs)
    oracle = [stage_dp_brute_force(cost, [1, 2], 4, B, extra, max_stages=bound) for bound in (1, 2, 4)]
    assert {c.stages for c in cands} == {tuple(r.stages) for r in oracle if math.isfinite(r.total_s)}
    for c in cands:
        r = next(r for r in oracle if tuple(r.stages) == c.stages)
        assert c.dp_total_s == pytest.approx(r.total_s, rel=1e-9)
        n = len(c.stages)
        assert c.choices == tuple(tables.choice(i, j, mi, n - k) for k, (i, j, mi) in enumerate(c.stages))
        assert c.origin == "dp" and c.chunks == 1 and c.depth == n


# ---- equal-split and interleaved candidates ------------------------------------------------------

def brute_force_equal_split(rt: RangeTable, space: SearchSpace, depth: int, chunks: int, same_layout: bool):
    """The choices of every chunk jointly, over all options whose chunks on one GPU fit in its
    memory together: the least total key, with (same_layout) rank 0's chunks taking their own
    best that enters its later chunks in the layout chunk 0 emits, and every later chunk entered
    in that layout."""
    ranges = split_blocks(space.n_layers, depth * chunks)
    schedule = "interleaved" if chunks > 1 else space.schedule
    cap = space.memory_cap_bytes
    per_chunk = [options(rt, i, j, peak_inflight(schedule, g % depth, depth, space.n_microbatches, chunks),
                         cap, space.n_microbatches + depth - g % depth - 1)
                 for g, (i, j) in enumerate(ranges)]

    def follows(first, o) -> bool:
        return rt.starts[o[1]] == StartLayout(rt.starts[first[1]].spec)

    def fits(combo) -> bool:
        return all(sum(o[5] for o in combo[r::depth]) <= cap for r in range(depth))

    # rank 0's chunks share one GPU: their bytes add up
    rank0_best = min((sum(o[0] for o in combo) for combo in itertools.product(*per_chunk[::depth])
                      if sum(o[5] for o in combo) <= cap and all(follows(combo[0], o) for o in combo[1:])),
                     default=None)
    best = None
    for combo in itertools.product(*per_chunk):
        if not fits(combo):
            continue
        if same_layout:
            if sum(o[0] for o in combo[::depth]) != rank0_best:
                continue
            if any(not follows(combo[0], o) for o in combo[1:]):
                continue
        total = sum(o[0] for o in combo)
        if best is None or total < best[0]:
            best = (total, combo)
    if best is None:
        return None
    return tuple(StageChoice((1, 2), rt.starts[o[1]], o[2], o[6]) for o in best[1])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunks", [1, 2])
def test_equal_split_choices_match_brute_force(seed, chunks):
    rng = np.random.default_rng(seed)
    L, B = 6, 4                                   # 4 blocks: depth 2, or 2 x 2 chunks
    rt = synthetic_table(rng, L)
    space = SearchSpace(L, max_stages=4, n_microbatches=B, n_gpus=4, schedule="1f1b", memory_cap_bytes=3.4)
    make = interleaved_candidates if chunks > 1 else uniform_candidates
    got = make(rt, 0, Submesh(1, 2), (1, 2), space, np.zeros(L + 1))
    want = [brute_force_equal_split(rt, space, 2, chunks, same) for same in (False, True)]
    assert [c.choices for c in got] == [w for w in want if w is not None]
    for c in got:
        assert c.stages == tuple((i, j, 0) for i, j in split_blocks(L, 2 * chunks))
        assert (c.origin, c.chunks, c.depth) == ("equal", chunks, 2)


@pytest.mark.parametrize("chunks,depth,B", [(1, 2, 4), (1, 4, 3), (2, 2, 4), (2, 4, 8)])
def test_equal_split_step_time_is_the_simulated_makespan(chunks, depth, B):
    """With equal chunks and no sync or transfers, the candidates' closed form is the
    simulated 1F1B (interleaved) makespan."""
    L = 2 + depth * chunks * 2                    # two blocks per chunk
    n_blocks = np.array([[max(0, min(j, L - 1) - max(i, 1)) for j in range(L + 1)] for i in range(L)], float)
    starts = [StartLayout((0, 0, 0), True), StartLayout((0, 0, 0))]
    ok = np.array([[[j > i and s.at_embedding == (i == 0) for s in starts] for j in range(L + 1)] for i in range(L)])

    def arr(x: np.ndarray) -> np.ndarray:
        return np.where(ok, x[..., None], np.inf)

    t_block = 0.3
    zeros = np.zeros_like(n_blocks)
    rt = RangeTable(t=arr(t_block * n_blocks), rec=arr(t_block / 3 * n_blocks), sync=arr(zeros), param=arr(zeros),
                    stash=arr(zeros), inputs=arr(zeros), max_layer_stash=arr(zeros), starts=starts)
    space = SearchSpace(L, max_stages=depth, n_microbatches=B, n_gpus=depth, schedule="1f1b", memory_cap_bytes=1.0)
    make = interleaved_candidates if chunks > 1 else uniform_candidates
    cands = make(rt, 0, Submesh(1, 1), (1, 1), space, np.zeros(L + 1))
    assert cands
    t_chunk = 2 * t_block
    n = depth * chunks
    sim = simulate([t_chunk / 3] * n, [2 * t_chunk / 3] * n, B, "interleaved" if chunks > 1 else "1f1b",
                   [0.0] * (n - 1), chunks=chunks)
    for c in cands:
        assert all(ch.recompute == "none" for ch in c.choices)
        assert c.dp_total_s == pytest.approx(sim.makespan_s, rel=1e-12)


def test_interleaving_is_offered_only_where_the_schedule_allows():
    rng = np.random.default_rng(5)
    L = 6
    rt = synthetic_table(rng, L)

    def offered(B: int, schedule: str = "1f1b", n_gpus: int = 4) -> bool:
        space = SearchSpace(L, 4, B, n_gpus, schedule, 1e9)
        return bool(interleaved_candidates(rt, 0, Submesh(1, 2), (1, 2), space, np.zeros(L + 1)))

    assert offered(4)
    assert not offered(3)                         # microbatches not a multiple of the depth
    assert not offered(4, "gpipe")
    assert not offered(4, n_gpus=2)               # depth 1
    assert not offered(8, n_gpus=8)               # depth 4: 8 chunks for 4 blocks


def test_candidates_with_one_key_are_one_plan():
    a, b = StageChoice((1, 2), StartLayout((0,)), "none"), StageChoice((2, 1), StartLayout((0,)), "full")
    stages = ((0, 2, 0), (2, 4, 0))
    t = (1.0, 1.0)
    dp1 = Candidate(stages, (a, a), t, t, 1.0, "dp")
    dp2 = Candidate(stages, (a, a), t, t, 2.0, "dp")            # the same slicing at another depth bound
    eq1 = Candidate(stages, (a, a), t, t, 3.0, "equal")         # the same plan, proposed as an equal split
    eq2 = Candidate(stages, (a, StageChoice((1, 2), StartLayout((1,)), "full")), t, t, 4.0, "equal")  # other layouts
    eq3 = Candidate(stages, (b, b), t, t, 5.0, "equal")          # other logical mesh
    eq4 = Candidate(stages, (a, a), t, t, 6.0, "equal", chunks=2)
    assert unique([dp1, dp2, eq1, eq2, eq3, eq4]) == [dp1, eq1, eq3, eq4]
    assert eq4.depth == 1
    with pytest.raises(AttributeError):
        dp1.dp_total_s = 0.0                               # type: ignore[misc]


@pytest.mark.parametrize("seed", range(12))
def test_best_simulated_is_the_best_of_simulating_all(seed):
    """Skipping a candidate whose lower bound is no better than the best fitting plan so far
    never loses the best: the result is brute force's (fitting first, then fastest), and
    every skipped candidate's bound is at least the step found."""
    rng = random.Random(seed)
    B = 8
    tight = seed % 2 == 0                         # bounds close to the simulated step: most skipped
    choice = StageChoice((1, 1), StartLayout((0,)), "none")
    plans = {}
    for k in range(12):
        t = rng.uniform(1, 2)
        cand = Candidate(((k, k + 1, 0),), (choice,), (t,), (0.0,), dp_total_s=B * t * rng.uniform(0.95, 1.1),
                         origin="dp")
        step = B * t * (rng.uniform(1.0, 1.01) if tight else rng.uniform(1.0, 3.0))
        plans[cand] = SimpleNamespace(predicted=SimpleNamespace(step_time_s=step, fits=rng.random() < 0.7))
    simulated = []

    def simulate(c):
        simulated.append(c)
        return plans[c]

    best, n = best_simulated(list(plans), simulate, B)
    want = min(plans.values(), key=lambda p: (not p.predicted.fits, p.predicted.step_time_s))
    assert best is want and n == len(simulated) == len(set(simulated))
    skipped = set(plans) - set(simulated)
    assert all(c.step_lower_bound_s(B) >= best.predicted.step_time_s and best.predicted.fits for c in skipped)
    if tight:
        assert skipped


def test_lower_bound_is_the_busiest_rank():
    choice = StageChoice((1, 1), StartLayout((0,)), "none")
    c = Candidate(((0, 1, 0), (1, 2, 0), (2, 3, 0), (3, 4, 0)), (choice,) * 4, (1.0, 2.0, 0.5, 1.0), (0.1, 0.2, 0.3, 0.4),
                  dp_total_s=0.0, origin="equal", chunks=2)
    # ranks: chunks 0 and 2 on rank 0, 1 and 3 on rank 1; the syncs' buckets may hide behind
    # the backward, so they are not part of the bound
    assert c.step_lower_bound_s(4) == pytest.approx(max(4 * 1.5, 4 * 3.0))


# ---- microbatch sizes --------------------------------------------------------------------------

@pytest.mark.parametrize("global_batch", [1, 2, 8, 12, 48, 96, 1024, 1536])
def test_microbatch_candidates_are_every_other_power_of_two_and_the_largest(global_batch):
    k = (global_batch & -global_batch).bit_length() - 1          # 2^k divides the global batch
    want = [4 ** e for e in range(k // 2 + 1)] + ([2 ** k] if k % 2 else [])
    assert microbatch_candidates(global_batch, 8, "auto") == want
    for count in (1, global_batch):
        assert microbatch_candidates(global_batch, 8, count) == [global_batch // count]
        assert microbatch_candidates(global_batch, 8, str(count)) == [global_batch // count]


def test_microbatch_count_must_divide_the_batch():
    with pytest.raises(PlanError, match="does not divide"):
        microbatch_candidates(12, 4, 5)
    with pytest.raises(PlanError, match="'auto' or a number"):
        microbatch_candidates(12, 4, "many")


def test_microbatch_neighbours_are_half_and_double_not_yet_searched():
    assert microbatch_neighbours(4, 64, {1, 4, 16, 64}) == [2, 8]
    assert microbatch_neighbours(16, 64, {1, 4, 16, 64, 8}) == [32]
    assert microbatch_neighbours(3, 12, {3}) == [6]               # odd: no half
    assert microbatch_neighbours(64, 64, {64}) == [32]            # 128 does not divide 64
