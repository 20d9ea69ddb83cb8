"""Alpa's inter-op stage DP (DESIGN.md section 6).

Pipeline latency with B microbatches: T = sum_i (t_i + extra_i) + (B - 1) * max_i t_i.
For a fixed bound t_max on every stage time,
    F(s, k, d) = least sum (t + extra) of slicing layers k..L into s stages on exactly d
                 devices, every t <= t_max,
    F(s, k, d) = min_{j > k, m} c[k, j, m, s] + F(s - 1, j, d - n_m),   F(0, L, 0) = 0,
where the stage starting at k has s stages from it to the end (its 1F1B depth), and
T(t_max) = min_s F(s, 0, D) + (B - 1) * t_max. The optimum is the least T over the
candidate t_max values (the distinct stage times).

Search over t_max. F(t_max) is a non-increasing step function, so T is minimised at the
left end of a step. Each DP solve at t_max also returns its solution's actual largest stage
time t' <= t_max, and F is constant on [t', t_max]: every candidate in between is skipped
(this is the dedupe of candidates that do not change the answer).
  1. The least feasible t_max, to 0.1 %: bisect on a device-count bound (no DP), then
     gallop + bisect with a feasibility-only DP on booleans. Solve F there: a first T.
  2. Branch and bound over the candidates above the infeasible one: any solution with max
     stage time t in a stretch of candidates [lo, hi] costs >= (B-1) t_lo + max(t_lo, f,
     F_relaxed), where f is F at a t_max above hi (F only grows as t_max falls) and
     F_relaxed the least sum of stage costs ignoring devices. Stretches are split at their
     middle candidate in order of that bound, the DP there covering [t', middle], until the
     least bound reaches the best T. (A walk down F one step at a time needed 67 DP solves
     for a 1T GPT on 3072 GPUs, whose F has many tiny steps; this needs 26.)
Inside step 2 the DP drops states that cannot beat T_best (suffix cost + least prefix
cost + (B-1) t_low >= T_best), so deep pipelines die early. At depth s a solve computes only
the rows k whose layers [0, k) at most s_max - s stages within t_max can cover (_prefix_reach;
at the last depth, row 0 alone): the rows it computes never read the others, so their cells,
F and the stages found are unchanged. Each DP solve only touches
entries with t <= t_max, grouped by (s, k), restricted to the device counts that can lie on
a complete solution, and works on finite cells only (the tables are sparse): each entry reads
the finite cells of its row j that land in row k's device window, vectorised over all
(entry, cell) pairs of a depth; device counts are in units of gcd(submesh sizes). B = 1 (no bubble): after step 1, one solve with every entry allowed,
pruned by the T found in step 1. stage_dp_bounds runs the search at several bounds on the
number of stages, checking the input and sorting its entries once (only those that can lie on
a complete pipeline of at most the deepest bound's stages: _useful_entries; the t_max
candidates still come from every finite entry), deepest bound first: a
feasibility solve tells the least feasible depth at its t_max, which answers the step-1 probes
of every shallower search that it decides (feasibility is monotone in t_max and in the bound).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["StageDPResult", "stage_dp", "stage_dp_bounds", "stage_dp_brute_force"]


@dataclass(frozen=True)
class StageDPResult:
    total_s: float  # T = sum_i (t_i + extra_i) + (B-1) * max_i t_i ; inf if none feasible
    stages: list[tuple[int, int, int]]  # (layer_start, layer_end_exclusive, submesh_index)
    stage_times_s: list[float]  # t_i per stage (per microbatch)
    t_max_s: float
    n_tmax_tried: int  # DP solves run
    solve_time_s: float


# --------------------------------------------------------------------------------------
# input checking


@dataclass
class _Input:
    t: np.ndarray  # (L, L+1, M, S+1) stage time; inf where unusable
    c: np.ndarray  # t + extra, same shape
    sizes: np.ndarray  # devices per submesh option
    n_devices: int
    b: int
    s_max: int


def _validate(stage_cost, submesh_devices, n_devices, n_microbatches, stage_extra,
              max_stages) -> _Input:
    t, sizes = _checked_cost(stage_cost, submesh_devices, n_devices, n_microbatches)
    # one pass over the (large) array where it is well formed: NaN and negatives both fail >= 0
    if not (t >= 0).all():
        if np.isnan(t).any():
            raise ValueError("stage_cost contains NaN")
        raise ValueError("stage_cost contains negative times")
    extra, s_max = _checked_extra(stage_extra, max_stages, t.shape)
    _mask_unusable(t, sizes, n_devices, s_max)
    c = t + extra[..., None]
    # t and extra are >= 0 (no NaN, no -inf), so c is inf where t is, and after this t is inf
    # where c is: each is inf exactly where the other is.
    np.copyto(t, np.inf, where=np.isinf(c))
    return _Input(t, c, sizes, int(n_devices), int(n_microbatches), s_max)


def _checked_cost(stage_cost, submesh_devices, n_devices, n_microbatches) -> tuple[np.ndarray, np.ndarray]:
    """A float64 copy of stage_cost (we write inf into it) and the submesh sizes as int64, after
    checking every shape and count (not the cost's values)."""
    t = np.array(stage_cost, dtype=np.float64)
    if t.ndim != 4:
        raise ValueError(f"stage_cost must be 4-D (L, L+1, M, S+1), got shape {t.shape}")
    n_layers, n_ends, n_mesh, n_s1 = t.shape
    if n_layers < 1 or n_ends != n_layers + 1:
        raise ValueError(f"stage_cost shape {t.shape}: second axis must be L+1 = "
                         f"{n_layers + 1} (layer_end exclusive), got {n_ends}")
    if n_s1 < 2:
        raise ValueError(f"stage_cost shape {t.shape}: last axis is S+1 and needs S >= 1")
    sizes = np.asarray(submesh_devices)
    if sizes.shape != (n_mesh,):
        raise ValueError(f"submesh_devices has {sizes.size} entries, stage_cost has "
                         f"M = {n_mesh} submesh options")
    if not np.issubdtype(sizes.dtype, np.integer) and not np.all(sizes == np.round(sizes)):
        raise ValueError(f"submesh_devices must be integers, got {submesh_devices!r}")
    sizes = sizes.astype(np.int64)
    if (sizes < 1).any():
        raise ValueError(f"submesh_devices must be >= 1, got {sizes.tolist()}")
    if isinstance(n_devices, bool) or int(n_devices) != n_devices or n_devices < 1:
        raise ValueError(f"n_devices must be a positive int, got {n_devices!r}")
    if isinstance(n_microbatches, bool) or int(n_microbatches) != n_microbatches \
            or n_microbatches < 1:
        raise ValueError(f"n_microbatches must be a positive int, got {n_microbatches!r}")
    return t, sizes


def _checked_extra(stage_extra, max_stages, cost_shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """stage_extra as an (L, L+1, M) array (zeros when None), and the deepest pipeline allowed."""
    n_layers, n_ends, n_mesh, n_s1 = cost_shape
    if stage_extra is None:
        extra = np.zeros((n_layers, n_ends, n_mesh))
    else:
        extra = np.asarray(stage_extra, dtype=np.float64)
        if extra.shape != (n_layers, n_ends, n_mesh):
            raise ValueError(f"stage_extra must have shape (L, L+1, M) = "
                             f"{(n_layers, n_ends, n_mesh)}, got {extra.shape}")
        if np.isnan(extra).any() or (extra < 0).any():
            raise ValueError("stage_extra contains NaN or negative values")
    s_max = n_s1 - 1
    if max_stages is not None:
        if isinstance(max_stages, bool) or int(max_stages) != max_stages or max_stages < 1:
            raise ValueError(f"max_stages must be a positive int, got {max_stages!r}")
        s_max = min(s_max, int(max_stages))
    return extra, min(s_max, n_layers)


def _mask_unusable(t: np.ndarray, sizes: np.ndarray, n_devices: int, s_max: int) -> None:
    """Set t to inf where an entry cannot be used: empty or reversed layer ranges, the unused
    s = 0 slot, depths beyond s_max, and submeshes larger than the cluster."""
    n_layers, n_ends = t.shape[:2]
    i_idx = np.arange(n_layers)[:, None]
    j_idx = np.arange(n_ends)[None, :]
    t[~(j_idx > i_idx)] = np.inf
    t[..., 0] = np.inf
    t[..., s_max + 1:] = np.inf
    t[:, :, sizes > n_devices, :] = np.inf


def _limited(inp: _Input, max_stages: int) -> _Input:
    """The same input with at most max_stages stages: views of the depths 0..max_stages (no
    copy), exactly what _validate gives with that max_stages."""
    s_max = min(inp.s_max, max_stages)
    return _Input(inp.t[..., :s_max + 1], inp.c[..., :s_max + 1], inp.sizes, inp.n_devices, inp.b, s_max)


@dataclass
class _Entries:
    """Every usable entry (k, j, m, s) with its time tv and cost cv, ordered by (s, k, t): the
    entries of a bound on the depth are then a prefix, and those allowed at a given t_max a
    prefix of each (s, k) group.

    values are the distinct entry times, ascending, and rank[e] the index of tv[e] there;
    key[e] = group * values.size + rank[e] with group = s * L + k is ascending, so one
    searchsorted gives every group's allowed prefix at a t_max; group g's entries are
    group_start[g]..group_start[g + 1]."""

    k: np.ndarray
    j: np.ndarray
    m: np.ndarray
    s: np.ndarray
    tv: np.ndarray
    cv: np.ndarray
    values: np.ndarray
    rank: np.ndarray
    key: np.ndarray
    group_start: np.ndarray
    n_layers: int

    @classmethod
    def of(cls, inp: _Input, keep: np.ndarray | None = None) -> _Entries:
        """The entries where keep (a boolean array of inp.t's shape, within its finite
        cells) is set; every finite entry without it."""
        n_layers, n_ends, n_mesh, n_s1 = inp.t.shape
        # The entries in the arrays' own (k, j, m, s) order: the sorts below are stable, and
        # ties of time within one (s, k) group are then in (j, m) order, as in any flat order
        # with (j, m) inner to (s, k): the order of a lexsort of the (k, j, m, s) flat order by
        # (s, k, t). (A transposed (s, k, j, m) copy gave the same order and cost a pass over
        # the whole array.)
        flat = np.flatnonzero(np.isfinite(inp.t) if keep is None else keep)
        tv = inp.t.ravel()[flat]
        cv_flat = inp.c.ravel()[flat]
        if inp.t.size < 2 ** 31:
            flat = flat.astype(np.int32)     # int32 division is several times faster
        n_groups = n_s1 * n_layers
        group = (flat % n_s1) * n_layers + flat // (n_ends * n_mesh * n_s1)     # s * L + k
        idx = np.int16 if max(n_ends, n_mesh, n_s1) < 2 ** 15 else np.int64
        # stable by t, then stable by group (a radix sort when groups fit in 16 bits): the
        # (s, k, t) order. What is sorted by t is permuted from the t order by by_group (not
        # gathered from the flat order by the whole permutation), and what only depends on
        # the group is laid out from the group counts, as the groups come out ascending.
        by_t = np.argsort(tv, kind="stable")
        sorted_t = tv[by_t]
        new_value = np.ones(tv.size, dtype=bool)
        new_value[1:] = sorted_t[1:] != sorted_t[:-1]
        values = sorted_t[new_value]
        rank_by_t = np.cumsum(new_value) - 1
        small = group.astype(np.int16) if n_groups < 2 ** 15 else group
        by_group = np.argsort(small[by_t], kind="stable")
        order = by_t[by_group]
        tv, rank = sorted_t[by_group], rank_by_t[by_group]
        counts = np.bincount(group, minlength=n_groups)
        group_start = np.zeros(n_groups + 1, dtype=np.int64)
        np.cumsum(counts, out=group_start[1:])
        all_groups = np.arange(n_groups)
        s = np.repeat((all_groups // n_layers).astype(idx), counts)
        k = np.repeat((all_groups % n_layers).astype(idx), counts)
        j, m = np.divmod((flat[order] // n_s1) % (n_ends * n_mesh), n_mesh)
        key = np.repeat(all_groups * max(1, values.size), counts) + rank
        return cls(k, j.astype(idx), m.astype(idx), s, tv, cv_flat[order], values, rank, key, group_start, n_layers)

    def up_to_depth(self, s_max: int) -> _Entries:
        n = int(np.searchsorted(self.s, s_max, side="right"))
        return _Entries(self.k[:n], self.j[:n], self.m[:n], self.s[:n], self.tv[:n], self.cv[:n],
                        self.values, self.rank[:n], self.key[:n], self.group_start, self.n_layers)

    def candidates(self) -> np.ndarray:
        """The distinct times of these entries, ascending (np.unique of tv)."""
        seen = np.zeros(self.values.size, dtype=bool)
        seen[self.rank] = True
        return self.values[seen]

    def allowed(self, depth: int, rows: np.ndarray, t_max: float) -> np.ndarray:
        """Indices of the entries at this depth, starting at one of rows, with tv <= t_max,
        in entry order."""
        r = int(np.searchsorted(self.values, t_max, side="right")) - 1
        groups = depth * self.n_layers + rows
        g0 = self.group_start[groups]
        g1 = np.searchsorted(self.key, groups * max(1, self.values.size) + r, side="right")
        n = g1 - g0
        keep = n > 0
        g0, n = g0[keep], n[keep]
        if not n.size:
            return np.zeros(0, dtype=np.int64)
        ends = np.cumsum(n)
        # concatenated ranges g0[i] .. g0[i] + n[i]
        return np.arange(int(ends[-1])) + np.repeat(g0 - (ends - n), n)


def _total(inp: _Input, stages) -> tuple[float, list[float], float]:
    times = [float(inp.t[i, j, m, len(stages) - q]) for q, (i, j, m) in enumerate(stages)]
    costs = [float(inp.c[i, j, m, len(stages) - q]) for q, (i, j, m) in enumerate(stages)]
    t_max = max(times)
    return sum(costs) + (inp.b - 1) * t_max, times, t_max


def _empty_result(t0, n_tried) -> StageDPResult:
    return StageDPResult(math.inf, [], [], math.inf, n_tried, time.perf_counter() - t0)


# --------------------------------------------------------------------------------------
# the DP at one t_max


_NO_TABLE = np.full((0, 0), np.inf)
# A depth finds the cells it wrote by scanning the rows they land in where those rows hold at
# most this many cells per contribution (a scan reads a cell in about a third of the time the
# per-contribution dedupe and sort take per contribution; measured on the 1T GPT's tables).
_SCAN_PER_CONTRIBUTION = 3


@dataclass
class _Best:
    """The least pipeline latency T found so far, and its stages."""

    total: float = math.inf   # in the unit of stage_cost
    stages: list[tuple[int, int, int]] | None = None


class _Solver:
    def __init__(self, inp: _Input, entries: _Entries | None = None,
                 least: tuple[np.ndarray, np.ndarray] | None = None, times: np.ndarray | None = None):
        """least: (inp.t.min(axis=3), inp.c.min(axis=3)) where the caller has them. entries:
        every finite entry (None: sorted here), or only those _useful_entries keeps, and then
        times: the distinct times of every finite entry of depth <= inp.s_max (the t_max
        candidates, which the kept entries alone may lack: _candidate_times)."""
        self.inp = inp
        n_layers = inp.t.shape[0]
        self.n_layers = n_layers
        # Only multiples of the gcd of the sizes are reachable: count devices in its units.
        self.units, self.d_top, self.feasible_units = _units(inp)
        self.n_d = self.d_top + 1
        e = (entries or _Entries.of(inp)).up_to_depth(inp.s_max)
        self.entries = e
        self._times = times
        self.k, self.j, self.m, self.s, self.tv, self.cv = e.k, e.j, e.m, e.s, e.tv, e.cv
        t_rel, c_rel = least if least is not None else (inp.t.min(axis=3), inp.c.min(axis=3))
        self.t_rel = t_rel  # (L, L+1, M), best depth: for the device bounds
        self._device_bounds = _DeviceBounds(t_rel, self.units)
        self.t_best = t_rel.min(axis=2)    # (L, L+1): best submesh and depth
        self.c_best = best = c_rel.min(axis=2)
        # least sum (t + extra) of any slicing of layers [0, k), devices and depths relaxed
        self.prefix_cost = np.full(n_layers + 1, np.inf)
        self.prefix_cost[0] = 0.0
        for end in range(1, n_layers + 1):
            self.prefix_cost[end] = np.min(self.prefix_cost[:end] + best[:end, end])
        self.n_solves = 0
        # Float tables of every depth, kept from solve to solve: refilling the rows a solve
        # wrote is cheaper than fresh arrays (page faults on every allocation), and the tables
        # a solve returns are only read before the next solve.
        self._tables: list[np.ndarray] = []
        self._written: list[np.ndarray] = []   # per depth: the flat cells the last solve wrote
        self._owner: np.ndarray | None = None

    def _table(self, depth: int) -> np.ndarray:
        """The float table of this depth, all inf."""
        while len(self._tables) <= depth:
            self._tables.append(np.full((self.n_layers + 1, self.n_d), np.inf))
            self._written.append(np.zeros(0, dtype=np.int64))
        table = self._tables[depth]
        table.ravel()[self._written[depth]] = np.inf
        return table

    def candidates(self) -> np.ndarray:
        return self.entries.candidates() if self._times is None else self._times

    def device_bounds(self, t_max: float) -> tuple[np.ndarray, np.ndarray]:
        """Least devices (units) that layers [0, k) (prefix[k]) and [k, L) (suffix[k]) need
        with every stage within t_max, depths relaxed. A DP state (k, d) with
        d < suffix[k] or d > D - prefix[k] lies on no complete solution."""
        return self._device_bounds(t_max)

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
        # The tables are sparse (a few percent of the cells a dense row gather reads are
        # finite), so each depth works on the finite cells of the one before, in row-major
        # order: row j's are cells[row_start[j]:row_start[j + 1]] (columns cell_col, values
        # cell_val). Only cells within their
        # row's window [lo, hi] are made. The cells of a row's window read only cells of the
        # rows' windows they come from (an entry (k, j, m) within t_max has units[m] at least
        # the least units of [k, j), so D - prefix[j] >= D - prefix[k] - units[m]; below
        # suffix[j] no cell is finite), and reconstruct reads only such cells: F, the tables
        # within the windows and the stages found are those of the dense recurrence (tests:
        # the dense implementation, brute force).
        row_start = np.zeros(n_layers + 2, dtype=np.int64)
        row_start[n_layers + 1] = 1
        cells = np.array([n_layers * n_d], dtype=np.int64)    # flat (row-major) indices
        cell_col = np.zeros(1, dtype=np.int64)
        cell_val = np.zeros(1)
        live_rows = np.zeros(n_layers + 1, dtype=bool)
        live_rows[n_layers] = True
        row_min = np.full(n_layers + 1, np.inf)
        row_min[n_layers] = 0.0
        tables: list[np.ndarray] = []
        if not feasibility_only:
            g0 = self._table(0)
            g0[n_layers, 0] = 0.0
            self._written[0] = np.array([n_layers * n_d], dtype=np.int64)
            tables = [g0]
        # owner[cell]: the contribution that a scatter below wrote last there; only read where
        # just written, so never reset
        if self._owner is None:
            self._owner = np.empty((n_layers + 1) * n_d, dtype=np.int64)
        owner = self._owner
        for depth in range(1, self.inp.s_max + 1):
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
            sel = _by_read_row(sel, self.j)
            g_cur = _NO_TABLE    # feasibility mode keeps no float tables
            if not feasibility_only:
                g_cur = self._table(depth)
                tables.append(g_cur)
            # Each entry (k, j, m) reads the cells of row j that land in row k's window
            # (row j's cells are in column order: a range found by two searches).
            jj = self.j[sel].astype(np.int64)
            kk = self.k[sel].astype(np.int64)
            um = self.units[self.m[sel]]
            row_key = jj * n_d
            first_cell = np.searchsorted(cells, row_key + np.clip(lo[kk] - um, 0, n_d))
            n_per = np.searchsorted(cells, row_key + np.clip(hi[kk] - um, -1, n_d - 1), side="right")
            n_per -= first_cell
            np.maximum(n_per, 0, out=n_per)
            ends = np.cumsum(n_per)
            n_in = int(ends[-1]) if ends.size else 0
            if n_in:
                # one contribution per (entry, cell it reads), in entry order (by the row j
                # read): the cell d of row j gives d + units[m] of row k
                # per-entry figures spread over the entry's cells by np.repeat (sequential
                # copies, cheaper than gathering them by each contribution's entry)
                pos = np.arange(n_in) + np.repeat(first_cell - (ends - n_per), n_per)
                flat = cell_col[pos] + np.repeat(kk * n_d + um, n_per)
                # The cells written, each once, in row-major order: where contributions are
                # many against the rows they land in (rows k_first..k_last), a scan
                # of those rows; else the last contribution per cell (owner) and a sort. Either
                # gives the same cells.
                k_first, k_last = int(kk.min()), int(kk.max())
                base, span = k_first * n_d, (k_last - k_first + 1) * n_d
                scan = span <= _SCAN_PER_CONTRIBUTION * n_in
                if feasibility_only:
                    if scan:
                        mark = np.zeros(span, dtype=bool)
                        mark[flat - base] = True
                        cells = np.flatnonzero(mark) + base
                    else:
                        ids = np.arange(n_in)
                        owner[flat] = ids
                        cells = flat[owner[flat] == ids]
                else:
                    # g + c as the dense recurrence adds them, the least per cell
                    val = cell_val[pos] + np.repeat(self.cv[sel], n_per)
                    g_flat = g_cur.ravel()
                    np.minimum.at(g_flat, flat, val)
                    if scan:
                        # the table is inf outside what this depth wrote; a cell whose sum
                        # overflowed to inf is dropped below in either way
                        cells = np.flatnonzero(np.isfinite(g_flat[base:base + span])) + base
                    else:
                        win = np.flatnonzero(val == g_flat[flat])
                        owner[flat[win]] = win
                        cells = flat[win[owner[flat[win]] == win]]   # each touched cell once
                    self._written[depth] = cells
                    new_val = g_flat[cells]
                    keep = np.isfinite(new_val)
                    if prune:
                        rows_of = cells // n_d
                        dropped = new_val + self.prefix_cost[rows_of] >= cutoff
                        g_flat[cells[dropped]] = np.inf
                        keep &= ~dropped
                    cells, cell_val = cells[keep], new_val[keep]
                if not scan:
                    # row-major (columns ascending within each row) for the searches
                    order = _row_major(cells, n_d, n_layers)
                    cells = cells[order]
                    if not feasibility_only:
                        cell_val = cell_val[order]
                rows_of = cells // n_d
                cell_col = cells - rows_of * n_d
                counts = np.bincount(rows_of, minlength=n_layers + 1)
                row_start = np.zeros(n_layers + 2, dtype=np.int64)
                np.cumsum(counts, out=row_start[1:])
                live_rows = counts > 0
                if not feasibility_only:
                    row_min = np.full(n_layers + 1, np.inf)
                    if cells.size:
                        row_min[live_rows] = np.minimum.reduceat(cell_val, row_start[:-1][live_rows])
                # row 0's window is the one column d_top, and rows come in order
                reached = bool(cells.size) and int(cells[0]) == d_top
                if feasibility_only:
                    top[depth] = 0.0 if reached else np.inf
                else:
                    top[depth] = g_cur[0, d_top]
            else:
                live_rows = np.zeros(n_layers + 1, dtype=bool)
            if not live_rows.any():
                break  # every deeper table builds on this one: all empty too
        return (None if feasibility_only else tables), top

    def _prefix_reach(self, t_max: float) -> list[np.ndarray]:
        """reach[p][k]: layers [0, k) can be covered by at most p stages each within t_max
        (on any submesh at any depth: a relaxation), for p = 0, 1, ... until it stops
        growing (the last entry then holds for every longer p) or p = s_max - 1.

        A DP state at depth s and row k > 0 is on a solution of at most s_max stages only
        if reach[s_max - s][k]: the stages before it number at most s_max - s. solve()
        computes only such rows. The rows it skips are never read by the rows it computes
        (an entry (k, j) within t_max has j reachable in one stage more than k), so every
        computed cell, the tops and the reconstructed stages are unchanged; the skipped
        ones are rows of the last depths that only an over-deep pipeline could use (at the
        last depth, row 0 alone)."""
        n_layers = self.n_layers
        ok = self.t_best <= t_max                  # (L, L+1): [i, j) fits as one stage
        reach = np.zeros(n_layers + 1, dtype=bool)
        reach[0] = True
        out = [reach]
        for _ in range(self.inp.s_max - 1):
            more = reach | ok[reach[:n_layers]].any(axis=0)
            if np.array_equal(more, reach):
                break
            out.append(more)
            reach = more
        return out

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


def _by_read_row(sel: np.ndarray, j: np.ndarray) -> np.ndarray:
    """These entries ordered by the row they read (stable: a radix sort of 16-bit rows where
    they fit). A depth's results do not depend on the order of its entries (a minimum per
    cell; its cells come out row-major either way), and the row's cells are then searched
    and gathered in memory order, not at random: the two window searches take about half
    the time (1T GPT: DP call set -11%)."""
    return sel[np.argsort(j[sel], kind="stable")] if sel.size > 1 else sel


def _row_major(cells: np.ndarray, n_d: int, n_layers: int) -> np.ndarray:
    """The order that sorts these distinct flat cells (row * n_d + column): two stable
    radix sorts on 16-bit columns, then rows, where they fit (several times faster than a
    comparison sort)."""
    if n_d < 2 ** 15 and n_layers < 2 ** 15:
        rows = cells // n_d
        by_col = np.argsort((cells - rows * n_d).astype(np.int16), kind="stable")
        return by_col[np.argsort(rows.astype(np.int16)[by_col], kind="stable")]
    return np.argsort(cells)


def _units(inp: _Input) -> tuple[np.ndarray, int, bool]:
    """Submesh sizes and the cluster in units of the gcd of the usable sizes (only multiples
    of it are reachable), and whether the cluster is a whole number of units."""
    usable = inp.sizes <= inp.n_devices
    g = int(np.gcd.reduce(inp.sizes[usable])) if usable.any() else 1
    return inp.sizes // g, inp.n_devices // g, inp.n_devices % g == 0


class _DeviceBounds:
    """_Solver.device_bounds on t_rel (L, L+1, M), the least stage time over depths.

    The figures are unit counts (small integers) or inf, so every sum and minimum below is
    exact whatever the order: this is the plain recurrence, arranged for speed (the times
    of one submesh contiguous, the columns of the least-units matrix contiguous, reductions
    by method rather than through np.min's dispatch)."""

    def __init__(self, t_rel: np.ndarray, units: np.ndarray):
        self.n_layers = t_rel.shape[0]
        self.t_by_mesh = np.ascontiguousarray(t_rel.transpose(2, 0, 1))     # (M, L, L+1)
        self.units = units.astype(np.float64)
        # most units first, so that the fewest units that fit are written last
        self.order = np.argsort(-self.units, kind="stable").tolist()

    def __call__(self, t_max: float) -> tuple[np.ndarray, np.ndarray]:
        n_layers = self.n_layers
        step = np.full(self.t_by_mesh.shape[1:], np.inf)    # least units of one stage [i, j)
        for m in self.order:
            step[self.t_by_mesh[m] <= t_max] = self.units[m]
        step_t = np.ascontiguousarray(step.T)
        prefix = np.full(n_layers + 1, np.inf)
        prefix[0] = 0.0
        for j in range(1, n_layers + 1):
            prefix[j] = (prefix[:j] + step_t[j, :j]).min()
        suffix = np.full(n_layers + 1, np.inf)
        suffix[n_layers] = 0.0
        for k in range(n_layers - 1, -1, -1):
            suffix[k] = (step[k, k + 1:] + suffix[k + 1:]).min()
        return prefix, suffix


def _device_bounds(t_rel: np.ndarray, units: np.ndarray, t_max: float) -> tuple[np.ndarray, np.ndarray]:
    """_Solver.device_bounds on t_rel (L, L+1, M), the least stage time over depths."""
    return _DeviceBounds(t_rel, units)(t_max)


def _relaxed_sum(best: np.ndarray) -> float:
    """Lower bound on sum_i (t_i + extra_i): best slicing with each stage at its cheapest
    submesh and depth (best: (L, L+1), inp.c.min(axis=(2, 3))), devices ignored (an O(L^2)
    shortest path)."""
    n_layers = best.shape[0]
    f = np.full(n_layers + 1, np.inf)
    f[n_layers] = 0.0
    for k in range(n_layers - 1, -1, -1):
        f[k] = np.min(best[k, k + 1:] + f[k + 1:])
    return float(f[0])


def _t_lower_bound(best: np.ndarray) -> float:
    """Every layer lies in some stage, so max_i t_i >= max_l min over stages covering l
    (best: (L, L+1), inp.t.min(axis=(2, 3)))."""
    n_layers = best.shape[0]
    lb = 0.0
    for layer in range(n_layers):
        lb = max(lb, float(best[:layer + 1, layer + 1:].min()))
    return lb


# --------------------------------------------------------------------------------------
# public API


def stage_dp(stage_cost: np.ndarray, submesh_devices: Sequence[int], n_devices: int,
             n_microbatches: int, stage_extra: np.ndarray | None = None,
             max_stages: int | None = None) -> StageDPResult:
    """Optimal pipeline slicing of L layers into stages on submeshes using exactly
    n_devices (see module docstring). stage_cost[i, j, m, s]: per-microbatch time of layers
    [i, j) on submesh m with s stages from it to the end inclusive (inf = infeasible)."""
    t0 = time.perf_counter()
    inp = _validate(stage_cost, submesh_devices, n_devices, n_microbatches, stage_extra,
                    max_stages)
    return _search(_Solver(inp, _Entries.of(inp, _useful_entries(inp)), None,
                           _candidate_times(inp, [inp.s_max])[inp.s_max]), t0)


def stage_dp_bounds(stage_cost: np.ndarray, submesh_devices: Sequence[int], n_devices: int,
                    n_microbatches: int, bounds: Sequence[int],
                    stage_extra: np.ndarray | None = None) -> list[StageDPResult]:
    """stage_dp at each bound on the number of stages (its max_stages), the same results as
    one call per bound; the input is checked and its entries sorted once for all of them."""
    t0 = time.perf_counter()
    for b in bounds:
        if isinstance(b, bool) or int(b) != b or b < 1:
            raise ValueError(f"bounds must be positive ints, got {b!r}")
    if not bounds:
        return []
    inp = _validate(stage_cost, submesh_devices, n_devices, n_microbatches, stage_extra,
                    max(bounds))
    least = _least_over_depths(inp, sorted({min(int(b), inp.s_max) for b in bounds}))
    # No solution at any bound when even the deepest bound with every entry allowed needs
    # more devices than there are (the search would stop there before any DP solve): skip
    # sorting the entries.
    units, d_top, whole = _units(inp)
    if not whole or not _device_bounds(least[inp.s_max][0], units, math.inf)[1][0] <= d_top:
        return [_empty_result(t0, 0) for _ in bounds]
    entries = _Entries.of(inp, _useful_entries(inp))
    times = _candidate_times(inp, list(least))
    # deepest bound first: its feasibility solves see every depth and answer most probes of
    # the shallower searches
    known = _Feasibility()
    out: dict[int, StageDPResult] = {}
    for b in sorted({int(b) for b in bounds}, reverse=True):
        depth = min(b, inp.s_max)
        out[b] = _search(_Solver(_limited(inp, b), entries, least[depth], times[depth]), t0, known)
        t0 = time.perf_counter()
    return [out[int(b)] for b in bounds]


def _least_over_depths(inp: _Input, depth_bounds: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The least time and cost over depths 0..b of every (range, submesh), for each bound b
    (ascending, at most s_max): the minimum of each stretch of depths between bounds, then a
    running minimum over the stretches (min is exact, so these equal each bound's own). One
    reduceat over the depths axis, not a reduction per stretch: each of those loops over
    the (range, submesh) rows with a short inner loop."""
    starts = [0] + [b + 1 for b in depth_bounds[:-1]]
    t_run, c_run = (np.minimum.accumulate(np.minimum.reduceat(a[..., :inp.s_max + 1], starts, axis=3), axis=3)
                    for a in (inp.t, inp.c))
    return {b: (np.ascontiguousarray(t_run[..., i]), np.ascontiguousarray(c_run[..., i]))
            for i, b in enumerate(depth_bounds)}


def _useful_entries(inp: _Input) -> np.ndarray:
    """The finite entries (k, j, m, s) that can lie on a complete pipeline of at most s_max
    stages, as a boolean array of inp.t's shape: row j at depth s - 1 can hold a finite
    cell (a chain of s - 1 finite entries leads from layer j to the end, s = 1: j = L),
    and row k at depth s can be read on the way to row 0 (k = 0, or a finite entry of
    depth s + 1 ends at k and starts in such a row).

    The others never change a cell a solve reads: an entry into a row j that no chain
    leaves writes nothing (row j is empty at every t_max), and a row k that no chain reads
    is read by no entry of a readable row, nor by reconstruct (it follows finite entries
    from row 0). So solve's tops, the cells of every readable row and the stages found are
    those of all finite entries (test_speed_h6_stage_dp_useful keeps them all as its
    reference); the 1T GPT's tables keep about a third of their entries. Devices and t_max
    are relaxed here: a solve's row windows and reachability prune the rest."""
    finite = np.isfinite(inp.t)
    n_layers, s_max = inp.t.shape[0], inp.s_max
    # any[k, j, s]: some submesh holds a finite entry; only depths 1..s_max are finite
    any_mesh = finite.any(axis=2)
    leaves = np.zeros((s_max + 1, n_layers + 1), dtype=bool)     # leaves[s, j]: chain of s to L
    leaves[0, n_layers] = True
    for depth in range(1, s_max + 1):
        leaves[depth, :n_layers] = any_mesh[:, leaves[depth - 1], depth].any(axis=1)
    read = np.zeros((s_max + 1, n_layers + 1), dtype=bool)       # read[s, k]: on a way to row 0
    read[:, 0] = True
    for depth in range(s_max - 1, 0, -1):
        read[depth, 1:] |= any_mesh[read[depth + 1, :n_layers], 1:, depth + 1].any(axis=0)
    useful = np.zeros(any_mesh.shape, dtype=bool)                 # (L, L+1, S+1)
    useful[:, :, 1:s_max + 1] = read[1:, :n_layers].T[:, None, :] & leaves[:-1].T[None, :, :]
    finite &= useful[:, :, None, :]
    return finite


def _candidate_times(inp: _Input, depth_bounds: list[int]) -> dict[int, np.ndarray]:
    """The distinct times of every finite entry of depth <= b, ascending, for each bound b
    (ascending, at most s_max): what _Entries.candidates gives on every finite entry, here
    where the entries kept are fewer. Each stretch of depths between bounds is made unique
    once (the first of each run of equal values, as candidates takes) and the stretches are
    merged."""
    out: dict[int, np.ndarray] = {}
    done, merged = 0, np.zeros(0)
    for b in depth_bounds:
        stretch = inp.t[..., done + 1:b + 1]
        times = stretch[np.isfinite(stretch)]
        # a stable sort (timsort) merges the runs that a submesh's times over depths often
        # form: twice as fast as np.unique's quicksort on the 1T GPT's tables
        times.sort(kind="stable")
        distinct = np.ones(times.size, dtype=bool)
        np.not_equal(times[1:], times[:-1], out=distinct[1:])
        merged = np.union1d(merged, times[distinct])
        out[b], done = merged, b
    return out


class _Feasibility:
    """Feasibility answers of earlier solves on one input, at any bound on the depth: per
    t_max solved, the least depth with a solution (inf: none) and the deepest depth tried.
    A solution of depth f within t' is one within any t >= t', so at t a depth <= b is
    feasible where some t' <= t had f' <= b, and infeasible where some t' >= t had f' > b
    with depths up to b tried. Only exact answers: a search asking here takes the same path
    as one solving every probe."""

    def __init__(self) -> None:
        self.solved: list[tuple[float, float, int]] = []   # (t_max, least feasible depth, depths tried)

    def add(self, t_max: float, top: np.ndarray) -> None:
        feasible = np.flatnonzero(np.isfinite(top))
        self.solved.append((t_max, float(feasible[0]) if feasible.size else math.inf, top.size - 1))

    def lookup(self, t_max: float, bound: int) -> bool | None:
        for t, least, tried in self.solved:
            if t <= t_max and least <= bound:
                return True
            if t >= t_max and least > bound and tried >= bound:
                return False
        return None


def _search(solver: _Solver, t0: float, known: _Feasibility | None = None) -> StageDPResult:
    """The t_max search of stage_dp on one solver; known: feasibility answers to share with
    searches on the same input."""
    inp = solver.inp
    cands = solver.candidates()
    # no finite entry at all (the kept entries may be none while some are finite: the search
    # then probes, and every solve is infeasible, as before they were dropped)
    if not solver.feasible_units or cands.size == 0:
        return _empty_result(t0, 0)
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
        t_max = float(cands[idx])
        if known is not None:
            answer = known.lookup(t_max, inp.s_max)
            if answer is not None:
                return answer
        top = solver.solve(t_max, True)[1]
        if known is not None:
            known.add(t_max, top)
        return bool(np.isfinite(top).any())

    last = cands.size - 1
    probe = int(np.searchsorted(cands, _t_lower_bound(solver.t_best), side="left"))
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
    f_relaxed = _relaxed_sum(solver.c_best)

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


def _final(inp: _Input, stages, solver, t0) -> StageDPResult:
    if stages is None:
        return _empty_result(t0, solver.n_solves)
    total, times, t_max = _total(inp, stages)
    return StageDPResult(total, stages, times, t_max, solver.n_solves, time.perf_counter() - t0)


def stage_dp_brute_force(stage_cost: np.ndarray, submesh_devices: Sequence[int],
                         n_devices: int, n_microbatches: int,
                         stage_extra: np.ndarray | None = None,
                         max_stages: int | None = None) -> StageDPResult:
    """Oracle: every slicing into contiguous stages x every submesh assignment that uses
    exactly n_devices. Small inputs only."""
    t0 = time.perf_counter()
    inp = _validate(stage_cost, submesh_devices, n_devices, n_microbatches, stage_extra,
                    max_stages)
    n_layers, _, n_mesh, _ = inp.t.shape
    best_t, best_stages = math.inf, None
    for n_stages in range(1, inp.s_max + 1):
        for cuts in itertools.combinations(range(1, n_layers), n_stages - 1):
            bounds = (0, *cuts, n_layers)
            ranges = list(zip(bounds[:-1], bounds[1:]))
            for mesh in itertools.product(range(n_mesh), repeat=n_stages):
                if sum(int(inp.sizes[m]) for m in mesh) != inp.n_devices:
                    continue
                stages = [(i, j, m) for (i, j), m in zip(ranges, mesh)]
                total, _, _ = _total(inp, stages)
                if total < best_t:
                    best_t, best_stages = total, stages
    if best_stages is None:
        return _empty_result(t0, 0)
    total, times, t_max = _total(inp, best_stages)
    return StageDPResult(total, best_stages, times, t_max, 0, time.perf_counter() - t0)
