"""range_tables sums its ranges layer by layer, every state of a layer in one array operation,
after walking the chains state by state (range_tables.build). The previous implementation, an
array per state folded back along its chain, is the reference: on a real solver (with and
without context parallelism, the eager recipe, ZeRO-3 priced per FSDP unit) and on a solver
drawing its layer solutions at random (dead layers, sequence splits, chains that end early,
next layouts no start enters), every table equals the reference's bit for bit, and the solver
is asked the same questions in the same order (so its counts and caches end alike)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.search.layer_solver import (
    EAGER_NO_DELTA,
    EAGER_ROWS,
    LayerSol,
    LayerSolver,
    SearchStats,
    StartLayout,
    ZeroEnds,
    boundary_specs,
)
from autopar.search.range_table import (
    ABSENT,
    DELTA,
    NO_ENDS,
    POOL,
    TIED_GRAD,
    RangeTable,
    _add_block_ends,
    _add_sharded_stage_deltas,
    _add_tied_copies,
    range_tables,
)
from autopar.sharding.spec import Spec
from autopar.sharding.stage_problem import Settings

MODEL = "llama:hidden=1024,layers=3,heads=16,kv_heads=2,seq=16384,vocab=512,ffn=2048"
FIELDS = ("t", "rec", "sync", "param", "stash", "inputs", "max_layer_stash", "rec_last", "loss", "block", "pool",
          "absent", "tied_grad")


def previous_range_tables(solver, mesh: Mesh, context_parallel: bool = True) -> tuple[RangeTable, RangeTable]:
    """range_tables as it was before its sums were taken layer by layer (a chain array per
    state, folded back state by state), verbatim."""
    g = solver.graph
    L = len(g.layers)
    # Each layer is entered only in layouts of its own input: clustered (non-transformer) layers
    # take inputs of different shapes and ranks, so one shape's layouts do not fit them all.
    by_shape: dict[tuple, list[Spec]] = {}       # the blocks' inputs share one shape
    in_specs = [by_shape.get(shape) or by_shape.setdefault(shape, boundary_specs(shape, mesh))
                for shape in (tuple(g.node(s).out_shape) if s else () for s in solver.inputs)]
    specs = in_specs[1] if L > 1 else [()]
    plain = list(dict.fromkeys(q for i in range(1, L) for q in in_specs[i]))
    # Rows: t, rec, sync, param, stash, inputs, loss peak, and under the eager recipe FSDP2's
    # gradient pool, what a tied head's copy scales (bytes, optimizer seconds) and the layers'
    # changes in a data-parallel sharded stage (the rows POOL.. below), summed over a range's
    # layers; then its largest layer stash and block buffers, and under the eager recipe
    # whether some layer's parameters are data-parallel sharded.
    eager = solver.eager
    n_sum = DELTA + len(EAGER_ROWS) if eager else 7
    K = n_sum + (3 if eager else 2)
    # ZeRO-2/3 per FSDP unit: one more row, per column the index of that layer's ZeroEnds in
    # `ends` (kept per column, not summed)
    units = solver.prices_zero_units(mesh)
    n_ends = 1 if units else 0
    ends: list[ZeroEnds] = []
    clean: dict[tuple, bool] = {}             # state -> its full chain splits no sequence
    full_suffix: dict[tuple, np.ndarray] = {}

    # Layers with one class have one LayerSolver.key on a mesh, layout and variant.
    classes: dict[tuple, int] = {}
    layer_class = [classes.setdefault((li == 0, g.layers[li].structural_hash, solver.outputs[li] is None), len(classes))
                   for li in range(L)]
    vectors: dict[int, tuple[LayerSol, np.ndarray]] = {}

    def figures(sol: LayerSol) -> np.ndarray:
        """A layer solution's K figures (the solver hands the same object to every layer of
        one identity, so this is made once per solution; the entry keeps it alive)."""
        hit = vectors.get(id(sol))
        if hit is None:
            own: tuple[float, ...] = ()
            if units:
                ends.append(sol.zero_ends or NO_ENDS)
                own = (float(len(ends) - 1),)
            hit = vectors[id(sol)] = (sol, np.array([sol.t_s, sol.fwd_s, sol.sync_s, sol.param_bytes,
                                                     sol.stash_bytes, sol.input_bytes, sol.loss_peak_bytes,
                                                     *((sol.grad_pool_bytes, sol.copy_scaled_bytes, sol.optimizer_s,
                                                        sol.grads_absent_bytes, sol.param_elems, sol.param_elems_zero,
                                                        0.0, *(sol.unsharded_delta or EAGER_NO_DELTA))
                                                       if eager else ()),
                                                     sol.rebuilt_bytes, sol.block_buffer_bytes,
                                                     *((float(sol.dp_sharded),) if eager else ()), *own]))
        return hit[1]

    def build(seq_split: bool, suffix: dict[tuple, np.ndarray], reuse: bool) -> RangeTable:
        def known(state: tuple) -> bool:
            if state in suffix:
                return True
            if reuse and clean.get(state):
                suffix[state] = full_suffix[state]
                return True
            return False

        sols: dict[tuple, LayerSol] = {}

        def solve(li: int, spec: Spec | None, restrict: Spec | None) -> LayerSol:
            """solver.solve, remembered here by layer class (LayerSolver.key on this mesh and
            variant, without building it for every state; the stats count as before)."""
            k = (layer_class[li], spec if li else None, restrict)
            sol = sols.get(k)
            if sol is None:
                sol = sols[k] = solver.solve(li, mesh, spec if li else None, restrict, seq_split)
            else:
                solver.stats.cache_hits += 1      # what solver.solve counts for a repeat
            return sol

        def chain(li: int, spec: Spec | None, restrict: Spec | None) -> np.ndarray:
            """(K, L - li) figures of ranges [li, j) for j = li+1..L entered at state (li, spec)."""
            key = (li, spec, restrict)
            if known(key):
                return suffix[key]
            # walk forward to the end (or a dead end), then fold back: no deep recursion
            path = []
            cur_l, cur_spec, r = li, spec, restrict
            while True:
                sol = solve(cur_l, cur_spec, r)
                path.append((cur_l, cur_spec, r, sol))
                if not math.isfinite(sol.t_s) or cur_l + 1 >= L or sol.out_spec is None:
                    break
                if known((cur_l + 1, sol.out_spec, None)):
                    break
                cur_l, cur_spec, r = cur_l + 1, sol.out_spec, None
            tail = None
            tail_clean = True
            last_l, _, _, last_sol = path[-1]
            if math.isfinite(last_sol.t_s) and last_l + 1 < L and last_sol.out_spec is not None:
                nxt = (last_l + 1, last_sol.out_spec, None)
                tail, tail_clean = suffix[nxt], clean.get(nxt, True)
            for l, sp, r, sol in reversed(path):
                if math.isfinite(sol.t_s):
                    v = figures(sol)
                    if tail is not None and tail.shape[1] == L - l - 1:
                        arr = np.empty((K + n_ends, L - l))      # every column is written below
                    else:
                        arr = np.full((K + n_ends, L - l), np.inf)
                    arr[:, 0] = v
                    if tail is not None:
                        m = tail.shape[1]
                        np.add(v[:n_sum, None], tail[:n_sum], out=arr[:n_sum, 1:1 + m])
                        np.maximum(v[n_sum:K, None], tail[n_sum:K], out=arr[n_sum:K, 1:1 + m])
                        arr[K:, 1:1 + m] = tail[K:]
                else:
                    arr = np.full((K + n_ends, L - l), np.inf)
                suffix[(l, sp, r)] = arr
                tail_clean = tail_clean and not sol.seq_split
                if not reuse:
                    clean[(l, sp, r)] = tail_clean
                tail = arr
            return suffix[key]

        starts = ([StartLayout(q, True, seq_split) for q in specs]
                  + [StartLayout(q, False, seq_split) for q in plain])
        tab = np.full((K + n_ends, L, L + 1, len(starts)), np.inf)
        uses_seq = False
        for pi, start in enumerate(starts):
            if start.at_embedding:
                tab[:, 0, 1:, pi] = chain(0, None, start.spec)
                uses_seq |= not clean.get((0, None, start.spec), True)
            else:
                for i in range(1, L):
                    if start.spec in in_specs[i]:
                        tab[:, i, i + 1:, pi] = chain(i, start.spec, None)
                        uses_seq |= not clean.get((i, start.spec, None), True)
        rec_last = _add_block_ends(tab, K, np.array(ends, dtype=np.float64).reshape(-1, len(ZeroEnds._fields))) if units else None
        if eager:
            _add_sharded_stage_deltas(tab, n_sum + 2)
            _add_tied_copies(tab, g, solver.settings.zero)
        # the eager working set beside the recomputed layer's, and the gradient pool (none
        # outside the eager recipe)
        return RangeTable(tab[0], tab[1], tab[2], tab[3], tab[4], tab[5], tab[n_sum], starts, uses_seq and seq_split,
                          rec_last, tab[6] if eager else None, tab[n_sum + 1] if eager else None,
                          tab[POOL] if eager else None, tab[ABSENT] if eager else None,
                          tab[TIED_GRAD] if eager else None)

    if not context_parallel:
        lean = build(False, {}, False)
        return lean, lean
    full = build(True, full_suffix, False)
    return full, (build(False, {}, True) if full.uses_seq_split else full)


def _same(a: RangeTable, b: RangeTable) -> None:
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert x.shape == y.shape, f
            assert np.array_equal(x.view(np.int64), y.view(np.int64)), f      # bit for bit, inf included
    assert a.starts == b.starts and a.uses_seq_split == b.uses_seq_split


class RandomSolver:
    """What range_tables reads of a LayerSolver, on a real graph, with each key's layer solution
    drawn at random when first asked (so two instances with one seed answer alike only where
    they are asked alike): some layers fit no strategy, some solutions split the sequence, some
    chains end early (no next layout) or go on in a layout that no start enters. As the real
    solver, the solution without sequence splits is the full one where that splits none."""

    def __init__(self, real: LayerSolver, seed: int, eager: bool, units: bool):
        self.graph, self.inputs, self.outputs = real.graph, real.inputs, real.outputs
        self.settings = real.settings
        self.eager, self.units = eager, units
        self.stats = SearchStats()
        self.rng = np.random.default_rng(seed)
        self.cache: dict[tuple, LayerSol] = {}
        self.asked: list[tuple] = []

    def prices_zero_units(self, mesh: Mesh) -> bool:
        return self.units

    def solve(self, li: int, mesh: Mesh, spec: Spec | None, restrict: Spec | None = None,
              seq_split: bool = True) -> LayerSol:
        self.asked.append((li, spec, restrict, seq_split))
        k = (self.graph.layers[li].structural_hash, spec, restrict, self.outputs[li] is None, seq_split)
        hit = self.cache.get(k)
        if hit is not None:
            self.stats.cache_hits += 1
            return hit
        if not seq_split:
            full = self.solve(li, mesh, spec, restrict, True)
            if not full.seq_split:
                self.cache[k] = full
                return full
        self.stats.ilps += 1
        rng = self.rng
        L = len(self.graph.layers)
        if rng.random() < 0.08:
            sol = LayerSol(math.inf, math.inf, 0, math.inf, 0, math.inf, 0, None, {}, "infeasible", math.inf)
        else:
            if li + 1 == L or rng.random() < 0.05:
                out_spec = None
            elif rng.random() < 0.1:
                out_spec = (int(rng.integers(4, 8)), 0, 0)          # a layout no start enters
            else:
                nxt = boundary_specs(tuple(self.graph.node(self.inputs[li + 1]).out_shape), mesh)
                out_spec = nxt[int(rng.integers(len(nxt)))]
            x = [float(v) for v in rng.random(32) * 10.0 ** rng.integers(-3, 10, 32)]
            sol = LayerSol(x[0], x[1], x[2], x[3], x[4], x[5], x[6], out_spec, {}, "optimal", x[7],
                           seq_split and bool(rng.random() < 0.5), (),
                           ZeroEnds(*x[8:15]) if self.units and rng.random() < 0.9 else None,
                           x[15], x[16], x[17], x[18], x[19], x[20], bool(rng.random() < 0.7),
                           tuple(x[21:21 + len(EAGER_ROWS)]) if rng.random() < 0.5 else (), x[29], x[28])
        self.cache[k] = sol
        return sol


def _real_solver(eager: bool = False, zero: int = 1, context_parallel: bool = True) -> LayerSolver:
    g = ModelSource(MODEL).graph(1)
    cm = ComputeModel(load_cluster("dgx-h100", 1).gpu, "bf16")
    return LayerSolver(g, cm, Settings(n_microbatches=4, zero=zero), SearchStats(), 10.0, "highs", eager=eager,
                       context_parallel=context_parallel)


MESHES = ((1, 4), (2, 2), (2, 4))


@pytest.mark.parametrize("eager,zero,context_parallel", [(False, 1, True), (False, 1, False), (True, 3, True),
                                                         (False, 3, True)])
def test_range_tables_equal_the_previous_implementation(eager, zero, context_parallel):
    cl = load_cluster("dgx-h100", 1)
    new, old = _real_solver(eager, zero, context_parallel), _real_solver(eager, zero, context_parallel)
    for shape in MESHES:
        mesh = Mesh(cl, Submesh(1, shape[0] * shape[1]), shape)
        got, want = range_tables(new, mesh, context_parallel), previous_range_tables(old, mesh, context_parallel)
        assert (got[0] is got[1]) == (want[0] is want[1])
        _same(got[0], want[0])
        _same(got[1], want[1])
        assert np.isfinite(got[0].t).any()
    assert new.stats.to_dict() | {"ilp_time_s": 0} == old.stats.to_dict() | {"ilp_time_s": 0}
    assert list(new.cache) == list(old.cache)        # asked in the same order


@pytest.mark.parametrize("seed", range(12))
def test_range_tables_on_random_layer_solutions(seed):
    """Each seed draws its own variant (eager recipe, FSDP units, context parallelism) and
    model depth; the cases together reach every path of the build (checked below)."""
    rng = np.random.default_rng(1000 + seed)
    eager, units, cp = bool(seed % 2), bool(seed // 2 % 2), seed % 3 != 2
    model = MODEL.replace("layers=3", f"layers={int(rng.integers(1, 7))}")
    g = ModelSource(model).graph(1)
    cm = ComputeModel(load_cluster("dgx-h100", 1).gpu, "bf16")
    real = LayerSolver(g, cm, Settings(n_microbatches=4, zero=3 if units else 1), SearchStats(), 10.0, "highs")
    cl = load_cluster("dgx-h100", 1)
    for shape in MESHES:
        mesh = Mesh(cl, Submesh(1, shape[0] * shape[1]), shape)
        new, old = RandomSolver(real, seed, eager, units), RandomSolver(real, seed, eager, units)
        got, want = range_tables(new, mesh, cp), previous_range_tables(old, mesh, cp)
        assert new.asked == old.asked
        assert new.stats.to_dict() == old.stats.to_dict()
        assert (got[0] is got[1]) == (want[0] is want[1])
        _same(got[0], want[0])
        _same(got[1], want[1])


def test_the_random_cases_reach_every_path():
    """Shared lean chains, chains in a layout no start enters, dead layers and sequence splits
    all occur in test_range_tables_on_random_layer_solutions' draws."""
    seen = {"lean shares": 0, "unentered": 0, "dead": 0, "seq": 0}
    g = ModelSource(MODEL.replace("layers=3", "layers=5")).graph(1)
    cm = ComputeModel(load_cluster("dgx-h100", 1).gpu, "bf16")
    real = LayerSolver(g, cm, Settings(n_microbatches=4), SearchStats(), 10.0, "highs")
    cl = load_cluster("dgx-h100", 1)
    for seed in range(12):
        mesh = Mesh(cl, Submesh(1, 8), (2, 4))
        solver = RandomSolver(real, seed, False, False)
        full, lean = range_tables(solver, mesh, True)
        sols = list(solver.cache.values())
        starts = {q.spec for q in full.starts}
        seen["unentered"] += any(s.out_spec is not None and s.out_spec not in starts for s in sols)
        seen["dead"] += any(not math.isfinite(s.t_s) for s in sols)
        seen["seq"] += any(s.seq_split for s in sols)
        # a lean cell equal to the full one where both are finite: a chain shared
        both = np.isfinite(full.t) & np.isfinite(lean.t)
        seen["lean shares"] += full is not lean and bool((full.t[both] == lean.t[both]).any())
    assert all(seen.values()), seen
