"""Two changes to how a solve works through one depth, each against the previous code, kept
as the reference here:
- it finds the cells the depth wrote by scanning the rows they land in where contributions
  are many (`_SCAN_PER_CONTRIBUTION`); the previous way, the last contribution per cell
  (owner) and a row-major sort, is the other branch, which `_SCAN_PER_CONTRIBUTION = 0`
  always takes;
- it orders the depth's entries by the row they read (`_by_read_row`; the previous order,
  by first layer and time, is the identity here).

Either way the depth makes the same cells in the same order, so at every t_max, in float
mode with and without a cutoff and in feasibility mode, the tops are equal to the bit, so is
every table, and the stages reconstructed are the same; whole searches at several bounds give
the same results with the same number of solves, whichever branch each depth takes (never,
always, or the default mix) and in either entry order."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_speed_h1_stage_dp import _inputs, random_layered_problem
from test_stage_dp_exact import _planner_shaped_search

import solvers.stage_dp as dp
from solvers.stage_dp import _Solver, _validate, stage_dp_bounds

NEVER, ALWAYS = 0, 10 ** 9
READ_ROW = dp._by_read_row


def _as_before(sel, j):
    return sel


# (scan threshold, entry order); the first is the previous code
MODES = [(NEVER, _as_before), (ALWAYS, _as_before), (NEVER, READ_ROW), (ALWAYS, READ_ROW),
         (dp._SCAN_PER_CONTRIBUTION, READ_ROW)]


def _set(m, mode) -> None:
    m.setattr(dp, "_SCAN_PER_CONTRIBUTION", mode[0])
    m.setattr(dp, "_by_read_row", mode[1])


def _tables(tables):
    return None if tables is None else [t.copy() for t in tables]


@pytest.mark.parametrize("seed", range(4))
def test_every_solve_equals_the_reference(monkeypatch, seed):
    n_layers, cost, sizes, n_devices, b, extra, s1 = random_layered_problem(np.random.default_rng(8300 + seed), seed)
    compared = 0
    for max_stages in sorted({1, 2, max(1, s1 // 2), s1 - 1}):
        inp = _validate(cost, sizes, n_devices, b, extra, max_stages)
        ref, got = _Solver(inp), {mode: _Solver(inp) for mode in MODES[1:]}
        cands = ref.candidates()
        for t_max in cands[:: max(1, cands.size // 8)]:
            t_max = float(t_max)
            _set(monkeypatch, MODES[0])
            want_feasible = ref.solve(t_max, True)[1]
            _, free_top = ref.solve(t_max)
            finite = free_top[np.isfinite(free_top)]
            cuts = (np.inf, *((float(finite.min()) * 1.01, float(finite.min())) if finite.size else ()))
            want = [(_tables(tables), top) for tables, top in (ref.solve(t_max, cutoff=c) for c in cuts)]
            for mode, solver in got.items():
                _set(monkeypatch, mode)
                assert solver.solve(t_max, True)[1].tobytes() == want_feasible.tobytes()
                for cut, (want_tables, want_top) in zip(cuts, want, strict=True):
                    got_tables, got_top = solver.solve(t_max, cutoff=cut)
                    assert got_top.tobytes() == want_top.tobytes()
                    if want_tables is None:
                        assert got_tables is None
                        continue
                    assert len(got_tables) == len(want_tables)
                    compared += 1
                    for g, w in zip(got_tables, want_tables, strict=True):
                        assert g.tobytes() == w.tobytes()
                    for depth in np.flatnonzero(np.isfinite(got_top)):
                        assert solver.reconstruct(got_tables, int(depth), t_max) == \
                            ref.reconstruct(want_tables, int(depth), t_max)
    assert compared > 0


def _same(got, want):
    for g, w in zip(got, want, strict=True):
        assert (g.total_s, g.stages, g.stage_times_s, g.t_max_s, g.n_tmax_tried) == \
            (w.total_s, w.stages, w.stage_times_s, w.t_max_s, w.n_tmax_tried)


def _each_mode(monkeypatch, *args):
    out = []
    for mode in MODES:
        with monkeypatch.context() as m:
            _set(m, mode)
            out.append(stage_dp_bounds(*args))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_searches_equal_the_reference(monkeypatch, seed):
    rng = np.random.default_rng(8400 + seed)
    found = 0
    for _ in range(6):
        cost, sizes, n_devices, b, extra, _ = _inputs(rng)
        bounds = sorted({int(x) for x in rng.integers(1, cost.shape[3] + 2, 3)})
        ref, *others = _each_mode(monkeypatch, cost, sizes, n_devices, b, bounds, extra)
        for got in others:
            _same(got, ref)
        found += sum(math.isfinite(r.total_s) for r in ref)
    assert found > 0


@pytest.mark.parametrize("seed", range(3))
def test_searches_equal_the_reference_on_planner_shaped_tables(monkeypatch, seed):
    rng = np.random.default_rng(8500 + seed)
    cost, extra, sizes, n_devices, b, _, bounds = _planner_shaped_search(rng, seed)
    ref, *others = _each_mode(monkeypatch, cost, sizes, n_devices, b, bounds, extra)
    for got in others:
        _same(got, ref)
    assert any(math.isfinite(r.total_s) for r in ref)
