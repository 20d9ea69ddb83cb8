"""The inter-op stage DP against exhaustive enumeration."""

import math

import numpy as np
import pytest

from solvers.stage_dp import StageDPResult, stage_dp, stage_dp_bounds, stage_dp_brute_force

MESH_OPTIONS = [[1, 2, 4, 8], [1, 2, 4], [2, 4], [1, 3], [2, 4, 8], [1, 2, 3, 4], [4]]


def _check_result(res, cost, sizes, n_devices, b, extra):
    assert isinstance(res, StageDPResult)
    n_layers = cost.shape[0]
    assert res.stages[0][0] == 0 and res.stages[-1][1] == n_layers
    assert all(s[1] == t[0] for s, t in zip(res.stages, res.stages[1:]))
    assert sum(sizes[m] for _, _, m in res.stages) == n_devices
    n = len(res.stages)
    times = [cost[i, j, m, n - q] for q, (i, j, m) in enumerate(res.stages)]
    assert res.stage_times_s == pytest.approx(times, rel=1e-12)
    assert res.t_max_s == max(times)
    ex = 0.0 if extra is None else sum(extra[i, j, m] for i, j, m in res.stages)
    assert math.isclose(res.total_s, sum(times) + ex + (b - 1) * max(times), rel_tol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_stage_dp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        n_layers = int(rng.integers(1, 7))
        sizes = MESH_OPTIONS[int(rng.integers(0, len(MESH_OPTIONS)))]
        n_devices = int(rng.integers(1, 9))
        s_max = int(rng.integers(1, 7))
        cost = rng.random((n_layers, n_layers + 1, len(sizes), s_max + 1))
        cost[rng.random(cost.shape) < 0.25] = np.inf  # memory-infeasible entries
        if rng.random() < 0.3:  # many equal values
            cost = np.round(cost * 4) / 4
        extra = rng.random((n_layers, n_layers + 1, len(sizes))) * 0.3 \
            if rng.random() < 0.5 else None
        b = int(rng.integers(1, 12))
        max_stages = int(rng.integers(1, 7)) if rng.random() < 0.3 else None
        got = stage_dp(cost, sizes, n_devices, b, extra, max_stages)
        want = stage_dp_brute_force(cost, sizes, n_devices, b, extra, max_stages)
        if math.isinf(want.total_s):
            assert got.total_s == math.inf and got.stages == []
            continue
        assert math.isclose(got.total_s, want.total_s, rel_tol=1e-12), (got, want)
        _check_result(got, cost, sizes, n_devices, b, extra)
        if max_stages is not None:
            assert len(got.stages) <= max_stages


def test_depth_matters_under_1f1b():
    # 2 layers, submeshes of 1 and 2 devices, 2 devices: one 2-device stage, or two 1-device
    # stages whose first holds 2 microbatches in flight (depth s = 2)
    cost = np.full((2, 3, 2, 3), np.inf)
    cost[0, 2, 1, 1] = 3.0  # one stage on both devices
    cost[0, 1, 0, 1] = 1.0  # layer 0 alone fits only as a last stage ...
    cost[1, 2, 0, 1] = 1.0
    res = stage_dp(cost, [1, 2], 2, 4)
    assert res.stages == [(0, 2, 1)] and res.total_s == 3.0 + 3 * 3.0
    cost[0, 1, 0, 2] = 1.0  # ... until it also fits with 2 microbatches in flight
    res = stage_dp(cost, [1, 2], 2, 4)
    assert res.stages == [(0, 1, 0), (1, 2, 0)] and res.total_s == 2.0 + 3 * 1.0


def test_all_devices_must_be_used():
    cost = np.zeros((1, 2, 2, 2))
    res = stage_dp(cost, [2, 4], 3, 2)  # 3 devices cannot be covered by 2 or 4
    assert res.total_s == math.inf and res.stages == [] and res.t_max_s == math.inf
    res = stage_dp(cost, [2, 4], 4, 2)
    assert res.stages == [(0, 1, 1)]


def test_medium_instance_agrees_with_brute_force():
    rng = np.random.default_rng(42)
    n_layers, sizes, s_max = 7, [1, 2, 4], 4
    cost = rng.random((n_layers, n_layers + 1, len(sizes), s_max + 1))
    cost[rng.random(cost.shape) < 0.3] = np.inf
    for b in (1, 2, 8, 64):
        got = stage_dp(cost, sizes, 8, b)
        want = stage_dp_brute_force(cost, sizes, 8, b)
        assert math.isclose(got.total_s, want.total_s, rel_tol=1e-12)


def test_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="4-D"):
        stage_dp(np.zeros((2, 3, 1)), [1], 1, 1)
    with pytest.raises(ValueError, match="L\\+1"):
        stage_dp(np.zeros((2, 2, 1, 2)), [1], 1, 1)
    with pytest.raises(ValueError, match="submesh_devices"):
        stage_dp(np.zeros((2, 3, 2, 2)), [1], 1, 1)
    with pytest.raises(ValueError, match="n_microbatches"):
        stage_dp(np.zeros((2, 3, 1, 2)), [1], 1, 0)
    with pytest.raises(ValueError, match="stage_extra"):
        stage_dp(np.zeros((2, 3, 1, 2)), [1], 1, 1, stage_extra=np.zeros((2, 3)))


def _layered_cost(rng, n_layers, sizes, s_max, layers_per_device):
    """Costs shaped like the planner's: time grows with the layers in a stage and shrinks
    with its devices; too many layers per device at a 1F1B depth do not fit."""
    n = np.asarray(sizes, dtype=float)
    work = np.concatenate([[0.0], np.cumsum(rng.uniform(0.5, 1.5, n_layers))])
    i = np.arange(n_layers)[:, None]
    j = np.arange(n_layers + 1)[None, :]
    span = work[None, :] - work[:n_layers, None]
    cost = np.full((n_layers, n_layers + 1, n.size, s_max + 1), np.inf)
    for m in range(n.size):
        for s in range(1, s_max + 1):
            t = span / n[m] * (1 + 0.08 * np.log2(n[m])) * rng.uniform(0.95, 1.05, span.shape)
            t[(j <= i) | ((j - i) * (1.0 + 0.15 * s) / n[m] > layers_per_device)] = np.inf
            cost[:, :, m, s] = t
    return cost


def test_planner_shaped_costs_match_brute_force():
    # the t_max search (window, probes, pruned walk) is exercised here: many candidates
    for seed in range(30):
        rng = np.random.default_rng(seed)
        n_layers, sizes = int(rng.integers(4, 9)), [1, 2, 4, 8]
        n_devices, s_max = int(rng.choice([4, 6, 8])), int(rng.integers(2, 5))
        cost = _layered_cost(rng, n_layers, sizes, s_max, float(rng.choice([1.0, 2.0, 4.0])))
        extra = rng.random((n_layers, n_layers + 1, 4)) * 0.1 if rng.random() < 0.5 else None
        for b in (1, 2, 16, 64):
            got = stage_dp(cost, sizes, n_devices, b, extra)
            want = stage_dp_brute_force(cost, sizes, n_devices, b, extra)
            assert got.total_s == pytest.approx(want.total_s, rel=1e-12), (seed, b)
            if math.isfinite(want.total_s):
                _check_result(got, cost, sizes, n_devices, b, extra)


def test_bounds_share_the_work_and_match_one_call_per_bound_and_brute_force():
    """stage_dp_bounds gives, at every bound, stage_dp's result (the same stages on ties)
    and brute force's optimum."""
    for seed in range(12):
        rng = np.random.default_rng(100 + seed)
        n_layers, sizes = int(rng.integers(3, 8)), [1, 2, 4]
        n_devices, s_max = int(rng.choice([4, 6, 8])), int(rng.integers(2, 6))
        cost = _layered_cost(rng, n_layers, sizes, s_max, float(rng.choice([1.0, 2.0, 4.0])))
        if seed % 3 == 0:
            cost = np.round(cost * 4) / 4                       # ties
        extra = rng.random((n_layers, n_layers + 1, 3)) * 0.1 if seed % 2 else None
        bounds = sorted({int(x) for x in rng.integers(1, s_max + 2, 3)})
        for b in (1, 4, 32):
            got = stage_dp_bounds(cost, sizes, n_devices, b, bounds, extra)
            for bound, r in zip(bounds, got):
                one = stage_dp(cost, sizes, n_devices, b, extra, bound)
                assert (r.total_s, r.stages) == (one.total_s, one.stages)
                want = stage_dp_brute_force(cost, sizes, n_devices, b, extra, bound)
                assert r.total_s == pytest.approx(want.total_s, rel=1e-12)
    with pytest.raises(ValueError, match="bounds"):
        stage_dp_bounds(np.zeros((1, 2, 1, 2)), [1], 1, 1, [0])
    assert stage_dp_bounds(np.zeros((1, 2, 1, 2)), [1], 1, 1, []) == []


def _dense_top(cost, sizes, n_devices, extra, t_max):
    """F(s, 0, D) for every depth s by the plain recurrence over every (k, d), no windows:
    F(s, k, d) = min over (j, m) with t <= t_max of c[k, j, m, s] + F(s - 1, j, d - n_m)."""
    n_layers, _, n_mesh, n_s1 = cost.shape
    c = cost + (0.0 if extra is None else extra[..., None])
    prev = np.full((n_layers + 1, n_devices + 1), np.inf)
    prev[n_layers, 0] = 0.0
    top = [np.inf]
    for s in range(1, n_s1):
        cur = np.full_like(prev, np.inf)
        for k in range(n_layers):
            for j in range(k + 1, n_layers + 1):
                for m in range(n_mesh):
                    u = sizes[m]
                    if cost[k, j, m, s] <= t_max and u <= n_devices:
                        cur[k, u:] = np.minimum(cur[k, u:], c[k, j, m, s] + prev[j, :n_devices + 1 - u])
        top.append(cur[0, n_devices])
        prev = cur
    return np.array(top)


@pytest.mark.parametrize("seed", range(8))
def test_dp_tables_equal_the_dense_recurrence_at_every_t_max(seed):
    """The solver's device windows (least devices before and after a layer) and their
    narrowing to the cells an entry can reach leave F(s, 0, D) unchanged: against the plain
    recurrence over every device count, at many t_max, with sparse submesh sizes (rows of
    the tables are finite at a few device counts only) and wide windows."""
    from solvers.stage_dp import _Solver, _validate
    rng = np.random.default_rng(7 + seed)
    n_layers, s_max = int(rng.integers(3, 7)), int(rng.integers(2, 6))
    sizes = [[1, 2, 4, 8, 16, 32], [1, 8, 32], [2, 6, 20], [1, 4, 16, 64]][seed % 4]
    n_devices = int(rng.choice([24, 40, 48, 64]))
    cost = _layered_cost(rng, n_layers, sizes, s_max, float(rng.choice([4.0, 8.0, 16.0])))
    extra = rng.random((n_layers, n_layers + 1, len(sizes))) * 0.1 if seed % 2 else None
    solver = _Solver(_validate(cost, sizes, n_devices, 4, extra, None))
    cands = solver.candidates()
    assert cands.size > 5
    for t_max in cands[:: max(1, cands.size // 12)]:
        _, top = solver.solve(float(t_max))
        want = _dense_top(cost, sizes, n_devices, extra, float(t_max))
        np.testing.assert_allclose(top, want[: top.size], rtol=1e-12)
        _, feasible = solver.solve(float(t_max), feasibility_only=True)
        np.testing.assert_array_equal(np.isfinite(feasible), np.isfinite(want[: feasible.size]))
