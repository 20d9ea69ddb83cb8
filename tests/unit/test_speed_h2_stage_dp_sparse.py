"""The stage DP's sparse solve against the dense one it replaced, kept here as the reference
(`DenseSolver`: the previous `_Solver._table` and `_Solver.solve`, and `_chunks`, verbatim).

The sparse solve makes, per depth, only the finite cells within each row's device window,
from the finite cells of the depth before (a few percent of the cells a dense row gather
read); the dense one also made cells outside the windows, which no in-window cell and no
reconstruction reads. So at every t_max, with and without a cutoff and in feasibility mode,
the tops are equal to the bit, every in-window cell of every table is, and the stages
reconstructed are the same; whole searches at several bounds give the same results with the
same number of solves."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_speed_h1_stage_dp import _layered
from test_stage_dp_exact import _planner_shaped_search

import solvers.stage_dp as dp
from solvers.stage_dp import _row_major, _Solver, _validate, stage_dp_bounds

# ---- the reference: the previous dense solve, verbatim ------------------------------------------


class DenseSolver(_Solver):
    def _table(self, depth: int) -> np.ndarray:
        """The float table of this depth, all inf."""
        while len(self._tables) <= depth:
            self._tables.append(np.full((self.n_layers + 1, self.n_d), np.inf))
            self._written.append([])
        table = self._tables[depth]
        for rows in self._written[depth]:
            table[rows] = np.inf
        self._written[depth] = []
        return table

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
        live_k = lo <= hi
        k_live = np.flatnonzero(live_k[:n_layers])
        prefix_reach = self._prefix_reach(t_max)
        prune = not feasibility_only and cutoff < math.inf
        # padded[j, pad + d] = g_prev[j, d], pad_value left of it: its sliding windows give
        # windows[j, pad - u, d] = g_prev[j, d - u] without copying, so the gathers below copy
        # contiguous row slices instead of indexing element by element. Feasibility tables are
        # not kept: each is its own padded (zeroed, so cheap) array. Float tables are kept for
        # reconstruct; their live rows are copied into one padded buffer.
        pad = int(self.units[self.units <= d_top].max(initial=0))
        offset = pad - np.minimum(self.units, pad)   # units beyond d_top have no entries
        if feasibility_only:
            padded = np.zeros((n_layers + 1, pad + n_d), dtype=bool)
            g_prev = padded[:, pad:]
            g_prev[n_layers, 0] = True
        else:
            padded = np.full((n_layers + 1, pad + n_d), np.inf)
            g_prev = np.full((n_layers + 1, n_d), np.inf)
            g_prev[n_layers, 0] = 0.0
        tables = [g_prev]
        # per row of g_prev: has a finite cell, first and last finite column, least value
        live_rows = np.zeros(n_layers + 1, dtype=bool)
        live_rows[n_layers] = True
        first = np.zeros(n_layers + 1, dtype=np.int64)
        last = np.zeros(n_layers + 1, dtype=np.int64)
        row_min = np.full(n_layers + 1, np.inf)
        row_min[n_layers] = 0.0
        for depth in range(1, self.inp.s_max + 1):
            if feasibility_only:
                windows = np.lib.stride_tricks.sliding_window_view(padded, n_d, axis=1)
                padded = np.zeros((n_layers + 1, pad + n_d), dtype=bool)
                g_cur = padded[:, pad:]
            else:
                # rows that are not live are never read: stale copies there are harmless
                padded[live_rows, pad:] = g_prev[live_rows]
                windows = np.lib.stride_tricks.sliding_window_view(padded, n_d, axis=1)
                g_cur = self._table(depth)
                tables.append(g_cur)
            # entries allowed at t_max (a prefix of each (depth, k) group), from a row that
            # can be on a solution into a row with a solvable rest
            # a row k > 0 at this depth is on a solution only if at most s_max - depth
            # stages can cover the layers before it
            reach = prefix_reach[min(self.inp.s_max - depth, len(prefix_reach) - 1)]
            k_rows = k_live[reach[k_live]]
            sel = self.entries.allowed(depth, k_rows, t_max)
            jj = self.j[sel]
            useful = live_rows[jj]
            useful &= live_k[jj]
            if prune:
                # an entry whose every cell reaches the cutoff only makes cells that are
                # dropped anyway (float rounding is monotone, so the test is exact)
                useful &= (self.cv[sel] + row_min[jj]) + self.prefix_cost[self.k[sel]] < cutoff
            sel = sel[useful]
            next_live = np.zeros(n_layers + 1, dtype=bool)
            if sel.size:
                kk, jj, mm, cc = self.k[sel], self.j[sel], self.m[sel], self.cv[sel]
                shift = offset[mm]
                starts = np.flatnonzero(np.r_[True, kk[1:] != kk[:-1]])
                # An entry (k, j, m) reaches only d = d' + units[m] for the finite cells d' of
                # row j: each k-group's window shrinks to the span of its entries' reaches.
                # Within a row's own window the cells cut off were inf (False) anyway, and no
                # in-window cell reads an out-of-window one, so F and the stages found are
                # unchanged (tests: the dense recurrence, brute force).
                umm = self.units[mm]
                reach_lo = np.minimum.reduceat(first[jj] + umm, starts)
                reach_hi = np.maximum.reduceat(last[jj] + umm, starts)
                k_rows = kk[starts]
                g_lo = np.maximum(lo[k_rows], reach_lo)
                g_hi = np.minimum(hi[k_rows], reach_hi)
                empty = g_lo > g_hi          # one cell (inf, computed as such) keeps the groups aligned
                g_hi[empty] = g_lo[empty] = lo[k_rows][empty]
                for g0, g1, w0, w1 in _chunks(starts, kk.size, g_lo, g_hi):
                    c0, c1 = starts[g0], (starts[g1] if g1 < starts.size else kk.size)
                    vals = windows[jj[c0:c1], shift[c0:c1], w0:w1]
                    rows = k_rows[g0:g1]
                    at = starts[g0:g1] - c0
                    # Cells outside a row's own window get values too: those are costs of
                    # real (if useless) suffixes, so they can never undercut the optimum.
                    if feasibility_only:
                        block = np.logical_or.reduceat(vals, at, axis=0)
                        finite = block
                    else:
                        vals += cc[c0:c1, None]
                        block = np.minimum.reduceat(vals, at, axis=0)
                        if prune:
                            block[block + self.prefix_cost[rows, None] >= cutoff] = np.inf
                        finite = np.isfinite(block)
                        row_min[rows] = block.min(axis=1)
                    g_cur[rows, w0:w1] = block
                    if not feasibility_only:
                        self._written[depth].append(rows)
                    any_row = finite.any(axis=1)
                    next_live[rows] = any_row
                    first[rows] = w0 + finite.argmax(axis=1)
                    last[rows] = w1 - 1 - finite[:, ::-1].argmax(axis=1)
            if feasibility_only:
                top[depth] = 0.0 if g_cur[0, d_top] else np.inf
            else:
                top[depth] = g_cur[0, d_top]
            live_rows = next_live
            g_prev = g_cur
            if not live_rows.any():
                break  # every deeper table builds on this one: all empty too
        return (None if feasibility_only else tables), top


def _chunks(starts: np.ndarray, n_entries: int, lo: np.ndarray, hi: np.ndarray,
            merge_elems: int = 2048, max_elems: int = 1 << 21):
    """Split consecutive k-groups (entries starts[g]..starts[g+1], column window
    [lo[g], hi[g]]) into blocks computed over the union of their windows: one numpy call per
    block instead of per row. A group joins the block while that adds at most merge_elems
    cells beyond the group's own (about what a numpy call costs in cells)."""
    n_groups = starts.size
    sizes = np.diff(np.r_[starts, n_entries]).tolist()
    lo_l = lo.tolist()
    hi_l = (hi + 1).tolist()
    g0 = 0
    while g0 < n_groups:
        w0, w1, n = lo_l[g0], hi_l[g0], sizes[g0]
        g1 = g0 + 1
        while g1 < n_groups:
            n0, n1, nn = min(w0, lo_l[g1]), max(w1, hi_l[g1]), n + sizes[g1]
            cells = nn * (n1 - n0)
            if cells - n * (w1 - w0) - sizes[g1] * (hi_l[g1] - lo_l[g1]) > merge_elems or cells > max_elems:
                break
            w0, w1, n = n0, n1, nn
            g1 += 1
        yield g0, g1, w0, w1
        g0 = g1


# ---- the comparison ---------------------------------------------------------------------------------


def _windows(solver: _Solver, t_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Each row's device window, as solve computes it."""
    prefix, suffix = solver.device_bounds(t_max)
    lo = np.minimum(suffix, solver.n_d)
    hi = np.where(np.isfinite(prefix), solver.d_top - np.minimum(prefix, solver.n_d), -1)
    lo[0] = max(lo[0], solver.d_top)
    return lo.astype(np.int64), hi.astype(np.int64)


def _compare_solves(inp) -> int:
    """Every solve of the search's kinds at spread t_max values; returns how many in-window
    finite cells were compared (so that a test can require some)."""
    sparse, dense = _Solver(inp), DenseSolver(inp)
    n_finite = 0
    cands = sparse.candidates()
    for t_max in cands[:: max(1, cands.size // 12)]:
        t_max = float(t_max)
        _, free_top = dense.solve(t_max)
        finite = free_top[np.isfinite(free_top)]
        # no cutoff, one just above the optimum (as the search sets it) and one below it
        cuts = (np.inf, *((float(finite.min()) * 1.01, float(finite.min()) * 0.999) if finite.size else ()))
        for cut in cuts:
            want_tables, want_top = dense.solve(t_max, cutoff=cut)
            got_tables, got_top = sparse.solve(t_max, cutoff=cut)
            assert got_top.tobytes() == want_top.tobytes()
            if got_tables is None:              # no device count fits: neither solved
                assert want_tables is None
                continue
            lo, hi = _windows(sparse, t_max)
            for depth in range(1, len(want_tables)):
                for k in np.flatnonzero(lo <= hi):
                    a, z = int(lo[k]), int(hi[k]) + 1
                    want = want_tables[depth][k, a:z]
                    # the sparse solve stops at the first depth with no in-window cell
                    got = got_tables[depth][k, a:z] if depth < len(got_tables) else np.full(z - a, np.inf)
                    assert got.tobytes() == want.tobytes()
                    n_finite += int(np.isfinite(want).sum())
            if np.isfinite(got_top).any():
                depth = int(np.argmin(got_top))
                assert sparse.reconstruct(got_tables, depth, t_max) == dense.reconstruct(want_tables, depth, t_max)
        _, got_f = sparse.solve(t_max, feasibility_only=True)
        _, want_f = dense.solve(t_max, feasibility_only=True)
        assert got_f.tobytes() == want_f.tobytes()
    return n_finite


def _same_searches(monkeypatch, cost, sizes, n_devices, b, bounds, extra) -> None:
    got = stage_dp_bounds(cost, sizes, n_devices, b, bounds, extra)
    with monkeypatch.context() as m:
        m.setattr(dp, "_Solver", DenseSolver)
        want = stage_dp_bounds(cost, sizes, n_devices, b, bounds, extra)
    for g, w in zip(got, want, strict=True):
        assert (g.total_s, g.stages, g.stage_times_s, g.t_max_s, g.n_tmax_tried) == \
            (w.total_s, w.stages, w.stage_times_s, w.t_max_s, w.n_tmax_tried)


@pytest.mark.parametrize("seed", range(8))
def test_sparse_solves_equal_the_dense_reference_to_the_bit(monkeypatch, seed):
    rng = np.random.default_rng(4100 + seed)
    n_layers = int(rng.integers(3, 9))
    # powers of two up to a wide cluster (sparse, far-apart columns), and odd sizes
    sizes = [[1, 2, 4, 8, 16, 32, 64], [1, 2, 4, 8], [2, 4, 8, 24], [1, 3, 6]][seed % 4]
    n_devices = int(rng.choice([24, 48, 96] if seed % 4 == 0 else [8, 12, 16, 24]))
    s1 = int(rng.integers(3, n_layers + 2))
    cost = _layered(rng, n_layers, sizes, s1)
    extra = np.round(rng.random((n_layers, n_layers + 1, len(sizes))) * 0.2, 2) if seed % 2 else None
    b = int(rng.choice([1, 4, 32]))
    bounds = sorted({1, 2, max(1, s1 // 2), s1 - 1})
    n_finite = sum(_compare_solves(_validate(cost, sizes, n_devices, b, extra, s)) for s in bounds)
    assert n_finite > 0
    _same_searches(monkeypatch, cost, sizes, n_devices, b, bounds, extra)


@pytest.mark.parametrize("seed", range(4))
def test_sparse_searches_equal_the_dense_reference_on_planner_shaped_tables(monkeypatch, seed):
    """Identical blocks (exact ties everywhere), on clusters whose device windows are wide."""
    rng = np.random.default_rng(4200 + seed)
    cost, extra, sizes, n_devices, b, s_max, bounds = _planner_shaped_search(rng, seed)
    _same_searches(monkeypatch, cost, sizes, n_devices, b, bounds, extra)
    assert _compare_solves(_validate(cost, sizes, n_devices, b, extra, s_max)) > 0


@pytest.mark.parametrize("n_d,n_layers", [(50, 7), (2 ** 15 + 3, 4)])
def test_row_major_order_equals_a_sort(n_d, n_layers):
    """Distinct cells grouped by ascending row, columns in any order: the radix path (16-bit
    columns and rows) and the comparison-sort path both give the sorted order."""
    rng = np.random.default_rng(n_d)
    rows = np.sort(rng.integers(0, n_layers + 1, 300))
    cells = np.unique(rows * n_d + rng.integers(0, n_d, 300))
    cells = np.concatenate([rng.permutation(cells[(cells // n_d) == r]) for r in range(n_layers + 1)])
    assert not np.array_equal(cells, np.sort(cells))
    order = _row_major(cells, n_d, n_layers)
    assert cells[order].tobytes() == np.sort(cells).tobytes()
