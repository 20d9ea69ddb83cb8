"""The stage DP's input checking and entry sorting against their previous implementations,
kept here as the reference (what changed, verbatim): every array to the bit (the entries in
the same order), and the same error for malformed input.

The speed-ups: `_Entries.of` sorts the entries from the arrays' own (k, j, m, s) order instead
of a transposed (s, k, j, m) copy (ties of time within one (s, k) group are in (j, m) order in
both, so the stable sorts give one order), divides int32 indices, and gathers cv by flat index;
`_validate` checks NaN and negatives in one pass and drops a write that changed nothing (t and
extra are >= 0, so c = t + extra is already inf wherever t is)."""

from __future__ import annotations

import numpy as np
import pytest
from test_stage_dp_exact import reference_device_bounds

from solvers.stage_dp import _checked_cost, _checked_extra, _Entries, _Input, _mask_unusable, _validate, stage_dp_bounds

# ---- the reference: the previous code, verbatim where it changed -------------------------------------------


def reference_validate(stage_cost, submesh_devices, n_devices, n_microbatches, stage_extra,
                       max_stages) -> _Input:
    # the argument checks and the masking are unchanged and shared (_checked_cost,
    # _checked_extra, _mask_unusable); what changed is verbatim here: the value checks, and
    # how c and t are made inf together
    t, sizes = _checked_cost(stage_cost, submesh_devices, n_devices, n_microbatches)
    if np.isnan(t).any():
        raise ValueError("stage_cost contains NaN")
    if (t < 0).any():
        raise ValueError("stage_cost contains negative times")
    extra, s_max = _checked_extra(stage_extra, max_stages, t.shape)
    _mask_unusable(t, sizes, n_devices, s_max)
    c = t + extra[..., None]
    t[~np.isfinite(c)] = np.inf
    c[~np.isfinite(t)] = np.inf
    return _Input(t, c, sizes, int(n_devices), int(n_microbatches), s_max)


def reference_entries(inp: _Input) -> _Entries:
    n_layers, n_ends, n_mesh, n_s1 = inp.t.shape
    t_skjm = np.ascontiguousarray(inp.t.transpose(3, 0, 1, 2))
    flat = np.flatnonzero(np.isfinite(t_skjm))
    tv = t_skjm.ravel()[flat]
    del t_skjm
    group, jm = np.divmod(flat, n_ends * n_mesh)
    del flat
    idx = np.int16 if max(n_ends, n_mesh, n_s1) < 2 ** 15 else np.int64
    j, m = np.divmod(jm, n_mesh)
    s, k = np.divmod(group, n_layers)
    s, k, j, m = s.astype(idx), k.astype(idx), j.astype(idx), m.astype(idx)
    by_t = np.argsort(tv, kind="stable")
    sorted_t = tv[by_t]
    new_value = np.ones(tv.size, dtype=bool)
    new_value[1:] = sorted_t[1:] != sorted_t[:-1]
    values = sorted_t[new_value]
    rank = np.empty(tv.size, dtype=np.int64)
    rank[by_t] = np.cumsum(new_value) - 1
    small = group.astype(np.int16) if n_s1 * n_layers < 2 ** 15 else group
    order = by_t[np.argsort(small[by_t], kind="stable")]
    k, j, m, s, tv, group, rank = k[order], j[order], m[order], s[order], tv[order], group[order], rank[order]
    key = group * max(1, values.size) + rank
    group_start = np.searchsorted(group, np.arange(n_s1 * n_layers + 1))
    return _Entries(k, j, m, s, tv, inp.c[k, j, m, s], values, rank, key, group_start, n_layers)


# ---- the comparison ---------------------------------------------------------------------------------


def _identical(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def _inputs(rng: np.random.Generator):
    """Random tables: many exact ties (coarse values, equal rows over depths, as 1F1B tables
    have), inf cells, inf and zero extras, oversized submeshes, bounds below and above L."""
    n_layers = int(rng.integers(1, 10))
    sizes = [[1, 2, 4, 8], [1, 2, 4], [2, 4], [1, 3], [2, 6, 20], [1, 8, 32, 64]][int(rng.integers(0, 6))]
    n_devices = int(rng.choice([1, 2, 4, 8, 12, 16, 40]))
    s1 = int(rng.integers(2, 12))
    cost = rng.random((n_layers, n_layers + 1, len(sizes), s1))
    if rng.random() < 0.5:
        cost = np.round(cost * 4) / 4
    if rng.random() < 0.5:       # the same time at every depth (only memory differs)
        cost[:] = cost[..., :1]
    cost[rng.random(cost.shape) < float(rng.choice([0.0, 0.2, 0.7]))] = np.inf
    extra = None
    if rng.random() < 0.7:
        extra = rng.random((n_layers, n_layers + 1, len(sizes))) * float(rng.choice([0.0, 0.3]))
        extra[rng.random(extra.shape) < 0.1] = np.inf
    max_stages = None if rng.random() < 0.4 else int(rng.integers(1, s1 + 3))
    return cost, sizes, n_devices, int(rng.choice([1, 4, 64])), extra, max_stages


@pytest.mark.parametrize("seed", range(6))
def test_validate_and_entries_equal_the_reference_to_the_bit(seed):
    rng = np.random.default_rng(1500 + seed)
    for _ in range(60):
        args = _inputs(rng)
        got, want = _validate(*args), reference_validate(*args)
        _identical(got.t, want.t)
        _identical(got.c, want.c)
        _identical(got.sizes, want.sizes)
        assert (got.n_devices, got.b, got.s_max) == (want.n_devices, want.b, want.s_max)
        e, r = _Entries.of(got), reference_entries(want)
        for name in ("k", "j", "m", "s", "tv", "cv", "values", "rank", "key", "group_start"):
            _identical(getattr(e, name), getattr(r, name))
        assert e.n_layers == r.n_layers


def test_int64_indices_beyond_int16_dims_equal_the_reference():
    """Dims of 2^15 or more keep int64 entry indices (and the group sort on int64 keys)."""
    rng = np.random.default_rng(7)
    cost = np.full((1, 2, 1, 2 ** 15 + 2), np.inf)
    cost[0, 1, 0, 1:] = np.round(rng.random(2 ** 15 + 1) * 8) / 8
    args = (cost, [1], 1, 4, None, None)
    got, want = _validate(*args), reference_validate(*args)
    e, r = _Entries.of(got), reference_entries(want)
    assert e.k.dtype == np.int64
    for name in ("k", "j", "m", "s", "tv", "cv", "values", "rank", "key", "group_start"):
        _identical(getattr(e, name), getattr(r, name))


@pytest.mark.parametrize("bad,message", [(np.nan, "NaN"), (-1.0, "negative")])
def test_malformed_costs_raise_the_reference_error(bad, message):
    cost = np.ones((2, 3, 2, 3))
    cost[1, 2, 0, 1] = bad
    for check in (_validate, reference_validate):
        with pytest.raises(ValueError, match=message):
            check(cost, [1, 2], 2, 1, None, None)
    cost[0, 1, 1, 2] = np.nan           # both: NaN is reported first, as before
    for check in (_validate, reference_validate):
        with pytest.raises(ValueError, match="NaN"):
            check(cost, [1, 2], 2, 1, None, None)


def test_results_unchanged_on_inf_extras():
    """An inf extra makes its cells unusable in t as well as c (the write the new _validate
    does with copyto): the DP never picks them."""
    rng = np.random.default_rng(3)
    cost = rng.random((4, 5, 2, 5))
    extra = np.zeros((4, 5, 2))
    extra[0, 4, :] = np.inf         # the one-stage slicings are unusable
    res = stage_dp_bounds(cost, [1, 2], 2, 4, [1, 4], extra)
    assert not np.isfinite(res[0].total_s)      # one stage on 2 devices: only (0, 4) covers it
    assert np.isfinite(res[1].total_s) and res[1].stages != [(0, 4, 1)]


# ---- rows no prefix of at most s_max - depth stages reaches are skipped -----------------------------


def _layered(rng: np.random.Generator, n_layers: int, sizes: list[int], s1: int) -> np.ndarray:
    """Planner-shaped costs: time grows with a stage's layers, shrinks with its devices, and
    a stage too big for its devices at a 1F1B depth does not fit."""
    n = np.asarray(sizes, dtype=float)
    work = np.concatenate([[0.0], np.cumsum(rng.uniform(0.5, 1.5, n_layers))])
    i = np.arange(n_layers)[:, None]
    j = np.arange(n_layers + 1)[None, :]
    span = work[None, :] - work[:n_layers, None]
    cost = np.full((n_layers, n_layers + 1, n.size, s1), np.inf)
    cap = float(rng.choice([2.0, 4.0, 8.0]))
    for m in range(n.size):
        for s in range(1, s1):
            t = span / n[m] * rng.uniform(0.95, 1.05, span.shape)
            t[(j <= i) | ((j - i) * (1.0 + 0.15 * s) / n[m] > cap)] = np.inf
            cost[:, :, m, s] = np.round(t, 2)       # coarse: exact ties
    return cost


def random_layered_problem(rng: np.random.Generator, seed: int):
    """A random planner-shaped stage-DP problem, (n_layers, cost, sizes, n_devices, b, extra, s1)
    with s1 - 1 the most stages; `seed` picks the device sizes and whether there is an extra."""
    n_layers = int(rng.integers(3, 9))
    sizes = [[1, 2, 4, 8], [1, 2, 4, 8, 16], [2, 4, 8], [1, 3, 6]][seed % 4]
    n_devices = int(rng.choice([8, 12, 16, 24]))
    s1 = int(rng.integers(3, n_layers + 2))
    cost = _layered(rng, n_layers, sizes, s1)
    extra = np.round(rng.random((n_layers, n_layers + 1, len(sizes))) * 0.2, 2) if seed % 2 else None
    b = int(rng.choice([1, 4, 32]))
    return n_layers, cost, sizes, n_devices, b, extra, s1


def _brute_reach(ok: np.ndarray, p: int) -> np.ndarray:
    """Rows k that some slicing of [0, k) into at most p stages, each allowed by ok, reaches."""
    import itertools
    n_layers = ok.shape[0]
    out = np.zeros(n_layers + 1, dtype=bool)
    out[0] = True
    for k in range(1, n_layers + 1):
        for n in range(1, p + 1):
            for cuts in itertools.combinations(range(1, k), n - 1):
                b = (0, *cuts, k)
                if all(ok[x, y] for x, y in zip(b, b[1:])):
                    out[k] = True
    return out


@pytest.mark.parametrize("seed", range(4))
def test_prefix_reach_equals_brute_force(seed):
    from solvers.stage_dp import _Solver
    rng = np.random.default_rng(40 + seed)
    for _ in range(10):
        n_layers = int(rng.integers(2, 8))
        sizes = [1, 2, 4, 8]
        cost = _layered(rng, n_layers, sizes, int(rng.integers(2, 7)))
        solver = _Solver(_validate(cost, sizes, 8, 4, None, None))
        for t_max in solver.candidates()[::3]:
            reach = solver._prefix_reach(float(t_max))
            ok = solver.t_best <= t_max
            assert 1 <= len(reach) <= max(1, solver.inp.s_max)
            for p in range(solver.inp.s_max):
                got = reach[min(p, len(reach) - 1)]
                np.testing.assert_array_equal(got, _brute_reach(ok, p))


@pytest.mark.parametrize("seed", range(8))
def test_skipping_unreachable_rows_leaves_every_computed_cell_unchanged(monkeypatch, seed):
    """The solver without the skip (_prefix_reach answering "every row", the previous
    behaviour) is the reference: at every t_max, in float mode with and without a cutoff and
    in feasibility mode, the tops are equal to the bit, every row the pruned solve computes
    holds the reference's cells, and the reconstructed stages are the same; and whole
    searches at several bounds give the same results and the same number of solves."""
    from solvers.stage_dp import _Solver
    n_layers, cost, sizes, n_devices, b, extra, s1 = random_layered_problem(np.random.default_rng(900 + seed), seed)
    skipped = 0
    for max_stages in sorted({1, 2, max(1, s1 // 2), s1 - 1}):
        inp = _validate(cost, sizes, n_devices, b, extra, max_stages)
        pruned, full = _Solver(inp), _Solver(inp)
        every = [np.ones(n_layers + 1, dtype=bool)]
        full._prefix_reach = lambda t_max, every=every: every      # the previous solver
        for t_max in pruned.candidates()[:: max(1, pruned.candidates().size // 15)]:
            t_max = float(t_max)
            _, free_top = full.solve(t_max)
            finite = free_top[np.isfinite(free_top)]
            # no cutoff, and one just above the optimum (as the search sets it)
            for cut in (np.inf, *((float(finite.min()) * 1.01,) if finite.size else ())):
                want_tables, want_top = full.solve(t_max, cutoff=cut)
                got_tables, got_top = pruned.solve(t_max, cutoff=cut)
                assert got_top.tobytes() == want_top.tobytes()
                if got_tables is None:          # no device count fits: neither solved
                    assert want_tables is None
                    continue
                reach = pruned._prefix_reach(t_max)
                # each row's device window (solve's lo..hi): cells outside it are values of
                # useless suffixes whose presence depends on how rows are blocked together
                prefix, suffix = pruned.device_bounds(t_max)
                lo = np.minimum(suffix, pruned.n_d)
                hi = np.where(np.isfinite(prefix), pruned.d_top - np.minimum(prefix, pruned.n_d), -1)
                lo[0] = max(lo[0], pruned.d_top)
                for depth in range(1, len(got_tables)):
                    rows = reach[min(inp.s_max - depth, len(reach) - 1)]
                    skipped += int((~rows[:n_layers]).sum())
                    for k in np.flatnonzero(rows[:n_layers]):
                        if lo[k] <= hi[k]:
                            a, z = int(lo[k]), int(hi[k]) + 1
                            assert got_tables[depth][k, a:z].tobytes() == want_tables[depth][k, a:z].tobytes()
                if np.isfinite(got_top).any():
                    depth = int(np.argmin(got_top))
                    assert pruned.reconstruct(got_tables, depth, t_max) == full.reconstruct(want_tables, depth, t_max)
            _, got_f = pruned.solve(t_max, feasibility_only=True)
            _, want_f = full.solve(t_max, feasibility_only=True)
            assert got_f.tobytes() == want_f.tobytes()
    assert skipped > 0
    # whole searches, against the solver without the skip
    bounds = sorted({1, 2, max(1, s1 // 2), s1 - 1})
    got = stage_dp_bounds(cost, sizes, n_devices, b, bounds, extra)
    monkeypatch.setattr(_Solver, "_prefix_reach", lambda self, t_max: [np.ones(self.n_layers + 1, dtype=bool)])
    want = stage_dp_bounds(cost, sizes, n_devices, b, bounds, extra)
    for g, w in zip(got, want):
        assert (g.total_s, g.stages, g.stage_times_s, g.t_max_s, g.n_tmax_tried) == \
            (w.total_s, w.stages, w.stage_times_s, w.t_max_s, w.n_tmax_tried)


# ---- device bounds ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_device_bounds_equal_the_reference_to_the_bit(seed):
    from solvers.stage_dp import _device_bounds, _DeviceBounds
    rng = np.random.default_rng(70 + seed)
    for _ in range(30):
        n_layers = int(rng.integers(1, 12))
        options = [[1, 2, 4, 8], [8, 4, 2, 1], [3, 1, 3, 2], [5]]
        units = np.asarray(options[int(rng.integers(0, len(options)))], dtype=np.int64)
        t_rel = np.round(rng.random((n_layers, n_layers + 1, units.size)) * 4) / 4
        t_rel[rng.random(t_rel.shape) < 0.3] = np.inf
        bounds = _DeviceBounds(t_rel, units)
        for t_max in (*np.unique(t_rel[np.isfinite(t_rel)]), -1.0, np.inf):
            want = reference_device_bounds(t_rel, units, float(t_max))
            for got in (bounds(float(t_max)), _device_bounds(t_rel, units, float(t_max))):
                _identical(got[0], want[0])
                _identical(got[1], want[1])
