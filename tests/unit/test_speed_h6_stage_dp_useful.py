"""The stage DP keeps only the entries that can lie on a complete pipeline (`_useful_entries`),
against the previous behaviour, kept here as the reference: every finite entry sorted, and
the t_max candidates read from them (`_Entries.candidates`).

An entry (k, j, m, s) is useful when a chain of s - 1 finite entries leads from layer j to
the end and a chain of finite entries of depths s_max .. s + 1 leads from layer 0 to k
(devices and t_max relaxed). The others write rows that no chain leaves (empty at every
t_max) or rows that nothing on the way to row 0 reads; the 1T GPT keeps about a third of its
7.3M entries. The candidates still come from every finite entry (`_candidate_times`), so the
search probes the same t_max values. Checked here: the mask against brute force over every
slicing; the candidates to the bit; at every t_max, in float mode with and without a cutoff
and in feasibility mode, the tops to the bit and the same stages reconstructed; whole
searches at several bounds with the same results and the same number of solves."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from test_speed_h1_stage_dp import _inputs, random_layered_problem
from test_stage_dp_exact import _planner_shaped_search

import solvers.stage_dp as dp
from solvers.stage_dp import _candidate_times, _Entries, _Solver, _useful_entries, _validate, stage_dp, stage_dp_bounds


def _brute_useful(t: np.ndarray, s_max: int) -> np.ndarray:
    """Every finite entry on some slicing of the layers into at most s_max stages whose
    stages each have a finite entry (any submesh) at their 1F1B depth."""
    n_layers = t.shape[0]
    finite = np.isfinite(t)
    out = np.zeros(t.shape, dtype=bool)
    for n in range(1, min(s_max, n_layers) + 1):
        for cuts in itertools.combinations(range(1, n_layers), n - 1):
            bounds = (0, *cuts, n_layers)
            stages = [(i, j, n - q) for q, (i, j) in enumerate(zip(bounds[:-1], bounds[1:]))]
            if all(finite[i, j, :, s].any() for i, j, s in stages):
                for i, j, s in stages:
                    out[i, j, :, s] |= finite[i, j, :, s]
    return out


@pytest.mark.parametrize("seed", range(4))
def test_useful_entries_equal_brute_force(seed):
    rng = np.random.default_rng(7100 + seed)
    kept = dropped = 0
    for _ in range(40):
        inp = _validate(*_inputs(rng))
        if inp.t.shape[0] > 7:
            continue
        got = _useful_entries(inp)
        np.testing.assert_array_equal(got, _brute_useful(inp.t, inp.s_max))
        kept += int(got.sum())
        dropped += int(np.isfinite(inp.t).sum() - got.sum())
    assert kept > 0 and dropped > 0


@pytest.mark.parametrize("seed", range(4))
def test_candidate_times_equal_the_reference_to_the_bit(seed):
    rng = np.random.default_rng(7200 + seed)
    for _ in range(40):
        inp = _validate(*_inputs(rng))
        bounds = sorted({min(int(b), inp.s_max) for b in rng.integers(1, inp.s_max + 3, 3)} | {inp.s_max})
        got = _candidate_times(inp, bounds)
        every = _Entries.of(inp)
        for b in bounds:
            want = every.up_to_depth(b).candidates()
            assert got[b].dtype == want.dtype and got[b].tobytes() == want.tobytes()


def _solvers(cost, sizes, n_devices, b, extra, max_stages):
    inp = _validate(cost, sizes, n_devices, b, extra, max_stages)
    kept = _Solver(inp, _Entries.of(inp, _useful_entries(inp)), None,
                   _candidate_times(inp, [inp.s_max])[inp.s_max])
    return kept, _Solver(inp)       # the reference: every finite entry


@pytest.mark.parametrize("seed", range(8))
def test_every_solve_equals_the_reference(seed):
    n_layers, cost, sizes, n_devices, b, extra, s1 = random_layered_problem(np.random.default_rng(7300 + seed), seed)
    solved = dropped = 0
    for max_stages in sorted({1, 2, max(1, s1 // 2), s1 - 1}):
        kept, full = _solvers(cost, sizes, n_devices, b, extra, max_stages)
        dropped += full.tv.size - kept.tv.size
        assert kept.candidates().tobytes() == full.candidates().tobytes()
        cands = kept.candidates()
        for t_max in cands[:: max(1, cands.size // 12)]:
            t_max = float(t_max)
            assert kept.solve(t_max, True)[1].tobytes() == full.solve(t_max, True)[1].tobytes()
            _, free_top = full.solve(t_max)
            finite = free_top[np.isfinite(free_top)]
            for cut in (np.inf, *((float(finite.min()) * 1.01, float(finite.min())) if finite.size else ())):
                want_tables, want_top = full.solve(t_max, cutoff=cut)
                got_tables, got_top = kept.solve(t_max, cutoff=cut)
                assert got_top.tobytes() == want_top.tobytes()
                for depth in np.flatnonzero(np.isfinite(got_top)):
                    assert kept.reconstruct(got_tables, int(depth), t_max) == \
                        full.reconstruct(want_tables, int(depth), t_max)
                    solved += 1
    assert solved > 0 and dropped > 0


def _same(got, want):
    for g, w in zip(got, want, strict=True):
        assert (g.total_s, g.stages, g.stage_times_s, g.t_max_s, g.n_tmax_tried) == \
            (w.total_s, w.stages, w.stage_times_s, w.t_max_s, w.n_tmax_tried)


def _reference(monkeypatch, fn, *args):
    """fn with every finite entry kept and the candidates read from the entries."""
    with monkeypatch.context() as m:
        m.setattr(dp, "_useful_entries", lambda inp: np.isfinite(inp.t))
        m.setattr(dp, "_candidate_times", lambda inp, bounds: dict.fromkeys(bounds))
        return fn(*args)


@pytest.mark.parametrize("seed", range(6))
def test_searches_equal_the_reference(monkeypatch, seed):
    rng = np.random.default_rng(7400 + seed)
    found = 0
    for _ in range(12):
        cost, sizes, n_devices, b, extra, max_stages = _inputs(rng)
        got = stage_dp(cost, sizes, n_devices, b, extra, max_stages)
        _same([got], [_reference(monkeypatch, stage_dp, cost, sizes, n_devices, b, extra, max_stages)])
        s_max = cost.shape[3] - 1
        bounds = sorted({int(x) for x in rng.integers(1, s_max + 3, 3)})
        got_b = stage_dp_bounds(cost, sizes, n_devices, b, bounds, extra)
        _same(got_b, _reference(monkeypatch, stage_dp_bounds, cost, sizes, n_devices, b, bounds, extra))
        found += sum(math.isfinite(r.total_s) for r in got_b)
    assert found > 0


@pytest.mark.parametrize("seed", range(4))
def test_searches_equal_the_reference_on_planner_shaped_tables(monkeypatch, seed):
    rng = np.random.default_rng(7500 + seed)
    cost, extra, sizes, n_devices, b, _, bounds = _planner_shaped_search(rng, seed)
    got = stage_dp_bounds(cost, sizes, n_devices, b, bounds, extra)
    _same(got, _reference(monkeypatch, stage_dp_bounds, cost, sizes, n_devices, b, bounds, extra))
    assert any(math.isfinite(r.total_s) for r in got)
