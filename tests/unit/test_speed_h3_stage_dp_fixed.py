"""The stage DP's per-call work (sorting the entries, the least figures over depths) against
the previous implementations, kept here as the reference (verbatim): every array to the bit,
and whole searches the same.

The speed-ups: `_Entries.of` permutes what is sorted by time from the time order by the
group sort's permutation alone (not every array from the flat order by the whole
permutation), lays out s, k, the group keys and group starts from the group counts (the
groups come out ascending), and gathers one flat index for j and m; `_least_over_depths`
takes every stretch of depths between bounds in one reduceat (min is exact in any order).
The solve spreads per-entry figures over their cells with np.repeat instead of a gather by
entry (the same values; its reference is test_speed_h2_stage_dp_sparse's dense solve)."""

from __future__ import annotations

import numpy as np
import pytest
from test_speed_h1_stage_dp import _inputs
from test_stage_dp_exact import _planner_shaped_search

import solvers.stage_dp as dp
from solvers.stage_dp import _Entries, _Input, _least_over_depths, _validate, stage_dp_bounds

# ---- the reference: the previous code, verbatim ------------------------------------------------


def reference_entries(inp: _Input) -> _Entries:
    n_layers, n_ends, n_mesh, n_s1 = inp.t.shape
    flat = np.flatnonzero(np.isfinite(inp.t))
    tv = inp.t.ravel()[flat]
    cv_flat = inp.c.ravel()[flat]
    if inp.t.size < 2 ** 31:
        flat = flat.astype(np.int32)     # int32 division is several times faster
    kjm, s = np.divmod(flat, n_s1)
    del flat
    kj, m = np.divmod(kjm, n_mesh)
    del kjm
    k, j = np.divmod(kj, n_ends)
    del kj
    group = s.astype(np.int64) * n_layers + k
    idx = np.int16 if max(n_ends, n_mesh, n_s1) < 2 ** 15 else np.int64
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
    return _Entries(k, j, m, s, tv, cv_flat[order], values, rank, key, group_start, n_layers)


def reference_least(inp: _Input, depth_bounds: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    least: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    t_run = c_run = None
    done = 0
    for b in depth_bounds:
        t_new, c_new = inp.t[..., done:b + 1].min(axis=3), inp.c[..., done:b + 1].min(axis=3)
        t_run = t_new if t_run is None else np.minimum(t_run, t_new)
        c_run = c_new if c_run is None else np.minimum(c_run, c_new)
        least[b], done = (t_run, c_run), b + 1
    return least


# ---- the comparison ---------------------------------------------------------------------------------

FIELDS = ("k", "j", "m", "s", "tv", "cv", "values", "rank", "key", "group_start")


def _identical(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def _compare(inp: _Input, depth_bounds: list[int]) -> int:
    e, r = _Entries.of(inp), reference_entries(inp)
    for name in FIELDS:
        _identical(getattr(e, name), getattr(r, name))
    assert e.n_layers == r.n_layers
    got, want = _least_over_depths(inp, depth_bounds), reference_least(inp, depth_bounds)
    assert list(got) == list(want)
    for b in depth_bounds:
        for g, w in zip(got[b], want[b], strict=True):
            _identical(g, w)
    return int(e.tv.size)


@pytest.mark.parametrize("seed", range(6))
def test_entries_and_least_equal_the_reference_to_the_bit(seed):
    """Random tables with many exact ties, inf cells and extras, bounds below and above L."""
    rng = np.random.default_rng(6100 + seed)
    n_entries = 0
    for _ in range(40):
        args = _inputs(rng)
        inp = _validate(*args)
        bounds = sorted({min(int(b), inp.s_max) for b in rng.integers(1, inp.s_max + 3, 3)} | {inp.s_max})
        n_entries += _compare(inp, bounds)
    assert n_entries > 0


def test_int64_indices_beyond_int16_dims_equal_the_reference():
    """Dims of 2^15 or more keep int64 entry indices and the group sort on int64 keys."""
    rng = np.random.default_rng(8)
    cost = np.full((2, 3, 1, 2 ** 15 + 2), np.inf)
    cost[0, 1:, 0, 1:] = np.round(rng.random((2, 2 ** 15 + 1)) * 8) / 8
    cost[1, 2, 0, 1:] = np.round(rng.random(2 ** 15 + 1) * 8) / 8
    inp = _validate(cost, [1], 1, 4, None, None)
    assert _Entries.of(inp).k.dtype == np.int64
    assert _compare(inp, [1, inp.s_max]) > 0


def test_no_entries_equal_the_reference():
    inp = _validate(np.full((3, 4, 2, 3), np.inf), [1, 2], 2, 4, None, None)
    assert _compare(inp, [1, 2]) == 0


@pytest.mark.parametrize("seed", range(4))
def test_searches_equal_the_reference_on_planner_shaped_tables(monkeypatch, seed):
    """Identical blocks (exact ties everywhere): every array, and whole searches at several
    bounds with the reference pieces swapped in."""
    rng = np.random.default_rng(6200 + seed)
    cost, extra, sizes, n_devices, b, s_max, bounds = _planner_shaped_search(rng, seed)
    assert _compare(_validate(cost, sizes, n_devices, b, extra, s_max), bounds) > 0
    got = stage_dp_bounds(cost, sizes, n_devices, b, bounds, extra)
    with monkeypatch.context() as m:
        m.setattr(dp._Entries, "of", classmethod(lambda cls, inp, keep=None: reference_entries(inp)))
        m.setattr(dp, "_least_over_depths", reference_least)
        want = stage_dp_bounds(cost, sizes, n_devices, b, bounds, extra)
    assert any(np.isfinite(w.total_s) for w in want)
    for g, w in zip(got, want, strict=True):
        assert (g.total_s, g.stages, g.stage_times_s, g.t_max_s, g.n_tmax_tried) == \
            (w.total_s, w.stages, w.stage_times_s, w.t_max_s, w.n_tmax_tried)
