"""The stage DP against its previous implementation, kept here as the reference: the same
optimum and the same stages (ties included) at every bound on the depth, on random tables, on
planner-shaped tables of identical blocks (many exact ties), and with sparse submesh sizes;
and StageTables.add and dp_inputs against their previous implementations, to the bit.

The reference is solvers/stage_dp.py before the speed-ups of issue 15 (a mask over every entry
per solve, np.unique of the candidates per bound, one feasibility search per bound, fresh
tables per solve, chunks up to twice a row's window), verbatim but for the parts it shares
with the module unchanged: input checking and result assembly."""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass

import numpy as np
import pytest

from autopar.costmodel.memory import inflight
from autopar.search.range_table import RECOMPUTE_OPTIONS
from autopar.search.tables import SearchSpace, StageTables, range_classes
from solvers.stage_dp import (
    StageDPResult,
    _Best,
    _empty_result,
    _final,
    _Input,
    _limited,
    _total,
    _validate,
    stage_dp,
    stage_dp_bounds,
)
from tests.unit.test_search import synthetic_table

# ---- the reference: the previous solver, verbatim ----------------------------------------------


@dataclass
class _Entries:
    """Every usable entry (k, j, m, s) with its time tv and cost cv, ordered by (s, k, t): the
    entries of a bound on the depth are then a prefix, and those allowed at a given t_max a
    mask away, still grouped by (s, k)."""

    k: np.ndarray
    j: np.ndarray
    m: np.ndarray
    s: np.ndarray
    tv: np.ndarray
    cv: np.ndarray

    @classmethod
    def of(cls, inp: _Input) -> _Entries:
        n_layers, n_ends, n_mesh, n_s1 = inp.t.shape
        flat = np.flatnonzero(np.isfinite(inp.t))
        tv = inp.t.ravel()[flat] if inp.t.flags.c_contiguous else inp.t[np.isfinite(inp.t)]
        k, j, m, s = np.unravel_index(flat, inp.t.shape)
        order = np.lexsort((tv, k, s))
        idx = np.int16 if max(n_ends, n_mesh, n_s1) < 2 ** 15 else np.int64
        k, j, m, s = k[order].astype(idx), j[order].astype(idx), m[order].astype(idx), s[order].astype(idx)
        return cls(k, j, m, s, tv[order], inp.c.ravel()[flat[order]] if inp.c.flags.c_contiguous
                   else inp.c[k, j, m, s])

    def up_to_depth(self, s_max: int) -> _Entries:
        n = int(np.searchsorted(self.s, s_max, side="right"))
        return _Entries(self.k[:n], self.j[:n], self.m[:n], self.s[:n], self.tv[:n], self.cv[:n])


def reference_device_bounds(t_rel: np.ndarray, units: np.ndarray, t_max: float) -> tuple[np.ndarray, np.ndarray]:
    """The device bounds as the reference solver computes them (the stage DP's before its
    speed-ups; test_speed_h1_stage_dp.py checks the fast ones against it to the bit)."""
    n_layers = t_rel.shape[0]
    step = np.where(t_rel <= t_max, units.astype(np.float64), np.inf).min(axis=2)  # (L, L+1)
    prefix = np.full(n_layers + 1, np.inf)
    prefix[0] = 0.0
    for j in range(1, n_layers + 1):
        prefix[j] = np.min(prefix[:j] + step[:j, j])
    suffix = np.full(n_layers + 1, np.inf)
    suffix[n_layers] = 0.0
    for k in range(n_layers - 1, -1, -1):
        suffix[k] = np.min(step[k, k + 1:] + suffix[k + 1:])
    return prefix, suffix


class _Solver:
    def __init__(self, inp: _Input, entries: _Entries | None = None):
        self.inp = inp
        n_layers = inp.t.shape[0]
        self.n_layers = n_layers
        usable = inp.sizes <= inp.n_devices
        g = int(np.gcd.reduce(inp.sizes[usable])) if usable.any() else 1
        # Only multiples of g are reachable: count devices in units of g.
        self.feasible_units = inp.n_devices % g == 0
        self.units = inp.sizes // g
        self.d_top = inp.n_devices // g
        self.n_d = self.d_top + 1
        e = (entries or _Entries.of(inp)).up_to_depth(inp.s_max)
        self.k, self.j, self.m, self.s, self.tv, self.cv = e.k, e.j, e.m, e.s, e.tv, e.cv
        self.t_rel = inp.t.min(axis=3)  # (L, L+1, M), best depth: for the device bounds
        # least sum (t + extra) of any slicing of layers [0, k), devices and depths relaxed
        best = inp.c.min(axis=(2, 3))
        self.prefix_cost = np.full(n_layers + 1, np.inf)
        self.prefix_cost[0] = 0.0
        for end in range(1, n_layers + 1):
            self.prefix_cost[end] = np.min(self.prefix_cost[:end] + best[:end, end])
        self.n_solves = 0

    def candidates(self) -> np.ndarray:
        return np.unique(self.tv)

    def device_bounds(self, t_max: float) -> tuple[np.ndarray, np.ndarray]:
        """Least devices (units) that layers [0, k) (prefix[k]) and [k, L) (suffix[k]) need
        with every stage within t_max, depths relaxed. A DP state (k, d) with
        d < suffix[k] or d > D - prefix[k] lies on no complete solution."""
        return reference_device_bounds(self.t_rel, self.units, t_max)

    def solve(self, t_max: float, feasibility_only: bool = False, cutoff: float = math.inf):
        """The DP at t_max. Returns (tables, top) with top[s] = F(s, 0, D) (float mode) or
        (None, top) with top[s] = 0 / inf for feasible / not (feasibility mode, ~8x cheaper:
        booleans instead of floats).

        cutoff (float mode): only solutions with sum (t + extra) < cutoff are wanted; a
        state whose suffix cost plus a lower bound on any prefix before it reaches cutoff
        is dropped. top is then exact where it is below cutoff and inf elsewhere."""
        self.n_solves += 1
        n_layers, n_d, d_top = self.n_layers, self.n_d, self.d_top
        top = np.full(self.inp.s_max + 1, np.inf)
        prefix, suffix = self.device_bounds(t_max)
        if not suffix[0] <= d_top:
            return None, top
        # Column window of row k: only d in [lo[k], hi[k]] can be on a solution; row 0 (no
        # stage before it) only needs d = D.
        lo = np.minimum(suffix, n_d).astype(np.int64)
        hi = np.where(np.isfinite(prefix), d_top - np.minimum(prefix, n_d), -1).astype(np.int64)
        lo[0] = max(lo[0], d_top)
        ok = self.tv <= t_max
        k, j, m, s, cv = self.k[ok], self.j[ok], self.m[ok], self.s[ok], self.cv[ok]
        live_k = lo <= hi
        keep = live_k[k] & live_k[j]
        k, j, m, s, cv = k[keep], j[keep], m[keep], s[keep], cv[keep]
        s_bounds = np.searchsorted(s, np.arange(self.inp.s_max + 2))
        if feasibility_only:
            g_prev = np.zeros((n_layers + 1, n_d), dtype=bool)
            g_prev[n_layers, 0] = True
            pad_value: bool | float = False
        else:
            g_prev = np.full((n_layers + 1, n_d), np.inf)
            g_prev[n_layers, 0] = 0.0
            pad_value = np.inf
        # padded[j, pad + d] = g_prev[j, d], pad_value left of it; its sliding windows give
        # windows[j, pad - u, d] = g_prev[j, d - u] without copying, so the gathers below copy
        # contiguous row slices instead of indexing element by element
        pad = int(self.units[self.units <= d_top].max(initial=0))
        padded = np.empty((n_layers + 1, pad + n_d), dtype=g_prev.dtype)
        padded[:, :pad] = pad_value
        windows = np.lib.stride_tricks.sliding_window_view(padded, n_d, axis=1)
        offset = pad - np.minimum(self.units, pad)   # units beyond d_top have no entries
        tables = [g_prev]
        for depth in range(1, self.inp.s_max + 1):
            e0, e1 = s_bounds[depth], s_bounds[depth + 1]
            g_cur = np.zeros_like(g_prev) if feasibility_only else np.full_like(g_prev, np.inf)
            finite = g_prev if feasibility_only else np.isfinite(g_prev)
            live_rows = np.any(finite, axis=1)
            kk, jj, mm, cc = k[e0:e1], j[e0:e1], m[e0:e1], cv[e0:e1]
            useful = live_rows[jj]  # entries that lead into a solvable rest
            if useful.any():
                kk, jj, mm, cc = kk[useful], jj[useful], mm[useful], cc[useful]
                padded[:, pad:] = g_prev
                shift = offset[mm]
                starts = np.flatnonzero(np.r_[True, kk[1:] != kk[:-1]])
                # An entry (k, j, m) reaches only d = d' + units[m] for the finite cells d' of
                # row j: each k-group's window shrinks to the span of its entries' reaches.
                # Within a row's own window the cells cut off were inf (False) anyway, and no
                # in-window cell reads an out-of-window one, so F and the stages found are
                # unchanged (tests: the dense recurrence, brute force).
                first = finite.argmax(axis=1)
                last = n_d - 1 - finite[:, ::-1].argmax(axis=1)
                reach_lo = np.minimum.reduceat(first[jj] + self.units[mm], starts)
                reach_hi = np.maximum.reduceat(last[jj] + self.units[mm], starts)
                g_lo = np.maximum(lo[kk[starts]], reach_lo)
                g_hi = np.minimum(hi[kk[starts]], reach_hi)
                empty = g_lo > g_hi          # one cell (inf, computed as such) keeps the groups aligned
                g_hi[empty] = g_lo[empty] = lo[kk[starts]][empty]
                for g0, g1, w0, w1 in _chunks(starts, kk.size, g_lo, g_hi):
                    e0, e1 = starts[g0], (starts[g1] if g1 < starts.size else kk.size)
                    vals = windows[jj[e0:e1], shift[e0:e1], w0:w1]
                    rows = kk[starts[g0:g1]]
                    at = starts[g0:g1] - e0
                    # Cells outside a row's own window get values too: those are costs of
                    # real (if useless) suffixes, so they can never undercut the optimum.
                    if feasibility_only:
                        g_cur[rows, w0:w1] = np.logical_or.reduceat(vals, at, axis=0)
                    else:
                        vals += cc[e0:e1, None]
                        g_cur[rows, w0:w1] = np.minimum.reduceat(vals, at, axis=0)
            if not feasibility_only and cutoff < math.inf:
                g_cur[g_cur + self.prefix_cost[:, None] >= cutoff] = np.inf
            tables.append(g_cur)
            if feasibility_only:
                top[depth] = 0.0 if g_cur[0, d_top] else np.inf
            else:
                top[depth] = g_cur[0, d_top]
            g_prev = g_cur
            if not (g_cur if feasibility_only else np.isfinite(g_cur)).any():
                break  # every deeper table builds on this one: all empty too
        return (None if feasibility_only else tables), top

    def reconstruct(self, tables, depth: int, t_max: float) -> list[tuple[int, int, int]]:
        inp = self.inp
        stages = []
        k, d = 0, self.d_top
        for s in range(depth, 0, -1):
            g_prev = tables[s - 1]
            # every (j, m) from (k, d) under t_max, added exactly as the DP added it
            rest = np.full((self.n_layers + 1, len(self.units)), np.inf)
            for q, u in enumerate(self.units):
                if u <= d:
                    rest[:, q] = g_prev[:, d - u]
            c = np.where(inp.t[k, :, :, s] <= t_max, inp.c[k, :, :, s], np.inf)
            total = c + rest
            j, m = np.unravel_index(int(np.argmin(total)), total.shape)
            stages.append((k, int(j), int(m)))
            k, d = int(j), d - int(self.units[m])
        return stages


def _chunks(starts: np.ndarray, n_entries: int, lo: np.ndarray, hi: np.ndarray,
            max_elems: int = 1 << 21):
    """Split consecutive k-groups (entries starts[g]..starts[g+1], column window
    [lo[g], hi[g]]) into blocks computed over the union of their windows: one numpy call per
    block instead of per row, while the union stays close to the rows' own widths."""
    n_groups = starts.size
    ends = np.r_[starts[1:], n_entries]
    g0 = 0
    while g0 < n_groups:
        w0, w1 = int(lo[g0]), int(hi[g0]) + 1
        own = w1 - w0
        g1 = g0 + 1
        while g1 < n_groups:
            n0, n1 = min(w0, int(lo[g1])), max(w1, int(hi[g1]) + 1)
            if (n1 - n0) > max(64, 2 * own) or (ends[g1] - starts[g0]) * (n1 - n0) > max_elems:
                break
            w0, w1, own = n0, n1, max(own, int(hi[g1]) + 1 - int(lo[g1]))
            g1 += 1
        yield g0, g1, w0, w1
        g0 = g1


def _relaxed_sum(inp: _Input) -> float:
    """Lower bound on sum_i (t_i + extra_i): best slicing with each stage at its cheapest
    submesh and depth, devices ignored (an O(L^2) shortest path)."""
    n_layers = inp.c.shape[0]
    best = inp.c.min(axis=(2, 3))  # (L, L+1)
    f = np.full(n_layers + 1, np.inf)
    f[n_layers] = 0.0
    for k in range(n_layers - 1, -1, -1):
        f[k] = np.min(best[k, k + 1:] + f[k + 1:])
    return float(f[0])


def _t_lower_bound(inp: _Input) -> float:
    """Every layer lies in some stage, so max_i t_i >= max_l min over stages covering l."""
    n_layers = inp.t.shape[0]
    best = inp.t.min(axis=(2, 3))  # (L, L+1)
    lb = 0.0
    for layer in range(n_layers):
        lb = max(lb, float(best[:layer + 1, layer + 1:].min()))
    return lb


def _search(solver: _Solver, t0: float) -> StageDPResult:
    """The t_max search of stage_dp on one solver."""
    inp = solver.inp
    if not solver.feasible_units or solver.tv.size == 0:
        return _empty_result(t0, 0)
    cands = solver.candidates()
    b = inp.b

    best = _Best()

    def solve_at(t_max: float, t_low: float = -math.inf):
        """DP at t_max; records the best T. Returns (F, actual max t) or (inf, None).
        Knowing every solution's max stage time is >= t_low, solutions that cannot beat the
        best T are pruned inside the DP, and then (inf, None) also means "none better"."""
        cutoff = best.total - (b - 1) * t_low if math.isfinite(t_low) else math.inf
        tables, top = solver.solve(t_max, cutoff=cutoff)
        depth = int(np.argmin(top))
        f = float(top[depth])
        if not math.isfinite(f):
            return math.inf, None
        stages = solver.reconstruct(tables, depth, t_max)
        total, _, t_actual = _total(inp, stages)
        if total < best.total:
            best.total, best.stages = total, stages
        return f, t_actual

    # 1. smallest feasible t_max: gallop up from a lower bound, then bisect, on the
    #    cheap feasibility-only DP.
    def feasible(idx: int) -> bool:
        return bool(np.isfinite(solver.solve(float(cands[idx]), True)[1]).any())

    last = cands.size - 1
    probe = int(np.searchsorted(cands, _t_lower_bound(inp), side="left"))
    # The device bound alone is a necessary condition and ~100x cheaper than a DP:
    # bisect on it first to start the gallop near the answer.
    hi_idx = last + 1
    lo_idx = probe
    while lo_idx < hi_idx:
        mid = (lo_idx + hi_idx) // 2
        if solver.device_bounds(float(cands[mid]))[1][0] <= solver.d_top:
            hi_idx = mid
        else:
            lo_idx = mid + 1
    probe = lo_idx
    a, step = probe - 1, 1  # cands[a] is known infeasible (or below every candidate)
    while True:
        if probe > last:
            return _empty_result(t0, solver.n_solves)
        if feasible(probe):
            break
        if probe == last:
            return _empty_result(t0, solver.n_solves)
        a, probe, step = probe, min(probe + step, last), step * 2
    z = probe
    # Bisect to 0.1 %: candidates are dense, and whatever lies between cands[a] and
    # cands[z] is still visited by the walk below when it matters.
    while z - a > 1 and (a < 0 or cands[z] - cands[a] > 1e-3 * cands[z]):
        mid = (a + z) // 2
        if feasible(mid):
            z = mid
        else:
            a = mid
    t_low = float(cands[a + 1])  # so every solution's max stage time is >= t_low
    if b == 1:
        # No bubble term: T = F, least with every entry allowed. A solution at cands[z]
        # seeds the pruning of that (dense, so otherwise costly) solve.
        solve_at(float(cands[z]))
        solve_at(float(cands[-1]), t_low)
        return _final(inp, best.stages, solver, t0)
    # 2. branch and bound over the candidates above cands[a]. An interval of candidates
    #    [lo, hi] whose F is known to be >= f (F at a t_max above hi: F only grows as t_max
    #    falls) holds no solution better than
    #        lb = (B-1) cands[lo] + max(cands[lo], f, F_relaxed)
    #    (F_relaxed: the least sum of stage costs ignoring devices; a sum is at least its
    #    largest term). The interval of least lb is split first: a DP at its middle
    #    candidate gives F there and its solution's actual largest stage time t', F is
    #    constant on [t', middle], and what is left is two intervals, below t' (F >= the F
    #    found) and above the middle (the parent's f). An interval whose lb reaches the
    #    best T is dropped, and then every later one (they come in order of lb).
    f_relaxed = _relaxed_sum(inp)

    def bound(lo: int, f: float) -> float:
        t = float(cands[lo])
        return (b - 1) * t + max(t, f, f_relaxed)

    def index_of(t: float) -> int:
        return int(np.searchsorted(cands, t, side="left"))

    intervals: list[tuple[float, int, int, float]] = []

    def push(lo: int, hi: int, f: float) -> None:
        lo = max(lo, dead_above)
        if lo <= hi:
            heapq.heappush(intervals, (bound(lo, f), lo, hi, f))

    # a DP under the cutoff that finds nothing means nothing at or below its t_max can win:
    # candidates up to dead_above - 1 are done
    dead_above = a + 1
    f_z, t_z = solve_at(float(cands[z]), t_low)
    if t_z is None:
        dead_above = z + 1
    else:
        push(a + 1, index_of(t_z) - 1, f_z)
    push(z + 1, last, -math.inf)
    while intervals:
        lb, lo, hi, f_above = heapq.heappop(intervals)
        if lb >= best.total:
            break
        # (B-1) t + max(t, F_relaxed) < T_best  <=>  t below both bounds
        top = min((best.total - f_relaxed) / (b - 1), best.total / b)
        hi = min(hi, int(np.searchsorted(cands, top, side="left")) - 1)
        if lo < dead_above or lo > hi:
            push(lo, hi, f_above)      # what is left of it after a better T or a dead DP
            continue
        mid = (lo + hi) // 2
        f, t_actual = solve_at(float(cands[mid]), t_low)
        if t_actual is None:
            dead_above = max(dead_above, mid + 1)
        else:
            push(lo, index_of(t_actual) - 1, f)
        push(mid + 1, hi, f_above)
    return _final(inp, best.stages, solver, t0)


def reference_stage_dp(stage_cost, submesh_devices, n_devices, n_microbatches, stage_extra=None,
                       max_stages=None):
    t0 = time.perf_counter()
    inp = _validate(stage_cost, submesh_devices, n_devices, n_microbatches, stage_extra, max_stages)
    return _search(_Solver(inp), t0)


def reference_stage_dp_bounds(stage_cost, submesh_devices, n_devices, n_microbatches, bounds,
                              stage_extra=None):
    t0 = time.perf_counter()
    inp = _validate(stage_cost, submesh_devices, n_devices, n_microbatches, stage_extra, max(bounds))
    entries = _Entries.of(inp)
    return [_search(_Solver(_limited(inp, int(b)), entries), t0) for b in bounds]


def reference_dp_inputs(tables: StageTables, p2p_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """StageTables.dp_inputs before issue 15: per submesh, over every range."""
    sp = tables.space
    cls = tables.range_class
    cost = tables.class_cells["t_s"][cls]
    extra = np.zeros(cost.shape[:3])
    in_flight = np.array([1.0] + [inflight(sp.schedule, 0, s, sp.n_microbatches)
                                  for s in range(1, sp.max_stages + 1)])
    for mi, p2p in enumerate(p2p_s):
        extra[:, :, mi] += 2 * p2p[None, :]
        cost[:, :, mi, :] += 2 * p2p[None, :, None] / in_flight[None, None, :]
    extra += np.where(np.isfinite(cost), tables.class_cells["sync_s"][cls], 0.0).max(axis=3)
    return cost, extra


def reference_add(tables: StageTables, submesh_index: int, logical_mesh: tuple[int, int], rt) -> None:
    """StageTables.add before issue 15."""
    sp = tables.space
    B, S = sp.n_microbatches, sp.max_stages
    tables.meshes.append((logical_mesh, rt.starts))
    mesh_id = len(tables.meshes) - 1
    at = (tables.rep_i, tables.rep_j)
    held = np.array([inflight(sp.schedule, 0, s, B) for s in range(1, S + 1)])[:, None, None]
    slots = np.arange(B, B + S, dtype=np.float64)[:, None, None]
    sync = rt.sync[at]
    cells = tables.class_cells[:-1, submesh_index, 1:].T
    for rci, rc in enumerate(RECOMPUTE_OPTIONS):
        t = rt.time_s(rc, at)
        mem = rt.memory_bytes(rc, held, at)
        finite = mem[np.isfinite(mem)]
        if finite.size:
            tables.least_memory_bytes = min(tables.least_memory_bytes, float(finite.min()))
        tt = np.where(mem <= sp.memory_cap_bytes, t, np.inf)
        key = slots * tt + sync
        pbest = key.argmin(axis=2)[..., None]
        kbest = np.take_along_axis(key, pbest, axis=2)[..., 0]
        better = kbest < cells["key_s"]
        if better.any():
            np.copyto(cells["key_s"], kbest, where=better)
            np.copyto(cells["t_s"], np.take_along_axis(tt, pbest, axis=2)[..., 0], where=better)
            np.copyto(cells["sync_s"], np.take_along_axis(np.broadcast_to(sync, key.shape), pbest, axis=2)[..., 0],
                      where=better)
            np.copyto(cells["mesh"], mesh_id, where=better)
            np.copyto(cells["start"], pbest[..., 0], where=better)
            np.copyto(cells["recompute"], rci, where=better)


# ---- the tests ----------------------------------------------------------------------------------


def _same(got, want) -> None:
    """Bit-identical optimum and identical stages (the tie the reference picked)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.total_s == w.total_s or (math.isinf(g.total_s) and math.isinf(w.total_s)), (g, w)
        assert g.stages == w.stages, (g, w)
        assert g.stage_times_s == w.stage_times_s and g.t_max_s == w.t_max_s


def _random_input(rng: np.random.Generator):
    n_layers = int(rng.integers(1, 9))
    sizes = [[1, 2, 4, 8], [1, 2, 4], [2, 4], [1, 3], [2, 4, 8], [1, 2, 3, 4], [4], [1, 8, 32],
             [2, 6, 20]][int(rng.integers(0, 9))]
    n_devices = int(rng.choice([1, 2, 4, 6, 8, 12, 16, 24, 40]))
    s_max = int(rng.integers(1, 9))
    cost = rng.random((n_layers, n_layers + 1, len(sizes), s_max + 1))
    cost[rng.random(cost.shape) < float(rng.choice([0.1, 0.25, 0.6]))] = np.inf
    if rng.random() < 0.5:  # many equal values: ties between slicings
        cost = np.round(cost * 4) / 4
    extra = rng.random((n_layers, n_layers + 1, len(sizes))) * 0.3 if rng.random() < 0.5 else None
    if extra is not None and rng.random() < 0.3:
        extra = np.round(extra * 4) / 4
    b = int(rng.choice([1, 2, 3, 8, 64]))
    return cost, sizes, n_devices, b, extra


@pytest.mark.parametrize("seed", range(8))
def test_bounds_equal_the_reference_on_random_tables(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(40):
        cost, sizes, n_devices, b, extra = _random_input(rng)
        bounds = sorted({int(x) for x in rng.integers(1, 9, size=int(rng.integers(1, 5)))})
        if rng.random() < 0.3:
            bounds = bounds[::-1]
        got = stage_dp_bounds(cost, sizes, n_devices, b, bounds, extra)
        _same(got, reference_stage_dp_bounds(cost, sizes, n_devices, b, bounds, extra))
        one = int(rng.choice(bounds))
        _same([stage_dp(cost, sizes, n_devices, b, extra, one)],
              [reference_stage_dp(cost, sizes, n_devices, b, extra, one)])


def _planner_shaped(rng: np.random.Generator, n_blocks: int, sizes: list[int], n_devices: int, b: int,
                    seq: bool):
    """Stage tables of an embedding, identical blocks and a head, as the planner fills them
    (range classes, so equal ranges have equal figures to the bit: exact ties everywhere)."""
    n_layers = n_blocks + 2
    ids = ["embed"] + ["block"] * n_blocks + ["head"]
    space = SearchSpace(n_layers, min(n_layers, n_devices), b, n_devices, "1f1b", 3.0)
    tables = StageTables(space, len(sizes), range_classes(ids))
    cls = tables.range_class
    for mi in range(len(sizes)):
        for shape in ((1, 1), (2, 1)) if seq else ((1, 1),):
            rt = synthetic_table(rng, n_layers)
            # one figure per class, scaled down with the submesh's devices
            for a in (rt.t, rt.rec, rt.sync, rt.param, rt.stash, rt.inputs, rt.max_layer_stash):
                for c in range(int(cls.max()) + 1):
                    at = np.nonzero(cls == c)
                    a[at] = a[at[0][0], at[1][0]]
            for a in (rt.t, rt.rec, rt.param, rt.stash):
                a /= sizes[mi]
            tables.add(mi, shape, rt)
    p2p = np.round(rng.uniform(0, 0.2, (len(sizes), n_layers + 1)), 2)
    p2p[:, -1] = 0.0
    return tables, p2p


def _planner_shaped_search(rng: np.random.Generator, seed: int):
    """A stage-DP search on _planner_shaped tables over clusters whose device windows are wide:
    (cost, extra, sizes, n_devices, b, s_max, depth bounds)."""
    sizes = [[1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 32], [2, 4, 8]][seed % 3]
    n_devices = [32, 64, 24][seed % 3]
    b = int(rng.choice([2, 8, 64]))
    tables, p2p = _planner_shaped(rng, int(rng.integers(3, 8)), sizes, n_devices, b, seq=seed % 2 == 1)
    cost, extra = tables.dp_inputs(p2p)
    s_max = tables.space.max_stages
    bounds = sorted({s_max} | {d for d in (1, 2, 4, 8) if d < s_max})
    return cost, extra, sizes, n_devices, b, s_max, bounds


@pytest.mark.parametrize("seed", range(6))
def test_bounds_equal_the_reference_on_planner_shaped_tables(seed):
    rng = np.random.default_rng(200 + seed)
    sizes = [[1, 2, 4, 8], [1, 2, 4, 8, 16], [2, 4, 8]][seed % 3]
    n_devices = int(rng.choice([8, 16, 24]))
    b = int(rng.choice([2, 8, 32]))
    tables, p2p = _planner_shaped(rng, int(rng.integers(3, 9)), sizes, n_devices, b, seq=seed % 2 == 1)
    cost, extra = tables.dp_inputs(p2p)
    ref_cost, ref_extra = reference_dp_inputs(tables, p2p)
    assert np.array_equal(cost, ref_cost) and np.array_equal(extra, ref_extra)
    s_max = tables.space.max_stages
    bounds = sorted({s_max} | {d for d in (1, 2, 4, 8, 16) if d < s_max})
    got = stage_dp_bounds(cost, sizes, n_devices, b, bounds, extra)
    _same(got, reference_stage_dp_bounds(cost, sizes, n_devices, b, bounds, extra))
    assert any(math.isfinite(r.total_s) for r in got)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_add_equals_the_reference_to_the_bit(schedule):
    rng = np.random.default_rng(9)
    L, S, B = 6, 5, 3
    ids = ["e", "b", "b", "b", "b", "h"]
    for cap in (0.5, 2.5, 4.0, np.inf):       # nothing fits, some cells fit, all fit
        space = SearchSpace(L, S, B, 4, schedule, float(cap))
        got = StageTables(space, 2, range_classes(ids), layer_recompute=False)
        want = StageTables(space, 2, range_classes(ids), layer_recompute=False)
        for mi, shape in [(0, (1, 2)), (1, (1, 1)), (0, (2, 1)), (1, (1, 1))]:
            rt = synthetic_table(rng, L)
            if rng.random() < 0.5:      # equal keys across meshes: the first one stays
                rt = synthetic_table(np.random.default_rng(1), L)
            got.add(mi, shape, rt)
            reference_add(want, mi, shape, rt)
        assert got.class_cells.tobytes() == want.class_cells.tobytes()
        assert got.least_memory_bytes == want.least_memory_bytes
        assert got.meshes == want.meshes


def test_wider_cluster_equals_the_reference():
    """A wider cluster (many cutoffs and device windows): still the reference's optimum and
    stages."""
    rng = np.random.default_rng(11)
    for seed in range(2):
        sizes = [1, 2, 4, 8, 16]
        tables, p2p = _planner_shaped(rng, 5 + seed, sizes, 32, int(rng.choice([4, 64])), seq=True)
        cost, extra = tables.dp_inputs(p2p)
        bounds = [1, 2, 4, 8]
        got = stage_dp_bounds(cost, sizes, 32, tables.space.n_microbatches, bounds, extra)
        _same(got, reference_stage_dp_bounds(cost, sizes, 32, tables.space.n_microbatches, bounds, extra))


def test_dp_inputs_equal_the_reference_to_the_bit():
    rng = np.random.default_rng(5)
    for n_sub, schedule in ((1, "1f1b"), (3, "gpipe"), (2, "1f1b")):
        L, S, B = 6, 4, 3
        space = SearchSpace(L, S, B, 4, schedule, float(rng.uniform(2.0, 4.0)))
        tables = StageTables(space, n_sub, range_classes(["e", "b", "b", "b", "b", "h"]))
        for mi in range(n_sub):
            tables.add(mi, (1, 1), synthetic_table(rng, L))
        p2p = rng.uniform(0, 1, (n_sub, L + 1))
        for got, want in zip(tables.dp_inputs(p2p), reference_dp_inputs(tables, p2p)):
            assert got.shape == want.shape and np.array_equal(got, want)
