"""The sharding ILP against brute force on small random instances, and its edges."""

import math

import numpy as np
import pytest

from solvers.ilp import ILPResult, available_backends, solve_brute_force, solve_sharding_ilp


def _random_instance(rng, n_max=8, p_max=4):
    n = int(rng.integers(1, n_max + 1))
    sizes = [int(rng.integers(1, p_max + 1)) for _ in range(n)]
    costs = [rng.random(p) for p in sizes]
    for c in costs:
        c[rng.random(c.size) < 0.15] = np.inf  # forbidden strategies
    edges = []
    for _ in range(int(rng.integers(0, 2 * n + 2))):
        u, v = (int(x) for x in rng.integers(0, n, 2))  # u == v: a self-loop
        kind = rng.random()
        if kind < 0.2:  # separable: folds into node costs
            r = rng.random(sizes[u])[:, None] + rng.random(sizes[v])[None, :]
        elif kind < 0.4:  # layout-like: identical rows/columns, zeros on matches
            out_l = rng.integers(0, 2, sizes[u])
            in_l = rng.integers(0, 2, sizes[v])
            r = np.where(out_l[:, None] == in_l[None, :], 0.0, rng.random())
        else:
            r = rng.random((sizes[u], sizes[v]))
        r = np.array(r, dtype=float)
        r[rng.random(r.shape) < 0.1] = np.inf  # forbidden pairs
        edges.append((u, v, r))
    mem = [rng.random(p) for p in sizes]
    return costs, edges, mem


def _check_choice(res, costs, edges, mem=None, budget=None):
    assert res.choice is not None and res.choice.dtype == np.int64
    assert res.choice.shape == (len(costs),)
    total = sum(c[p] for c, p in zip(costs, res.choice))
    total += sum(r[res.choice[u], res.choice[v]] for u, v, r in edges)
    assert math.isfinite(total)
    assert math.isclose(res.objective, total, rel_tol=1e-12, abs_tol=1e-12)
    if budget is not None:
        assert sum(m[p] for m, p in zip(mem, res.choice)) <= budget * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_ilp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        costs, edges, mem = _random_instance(rng)
        use_mem = rng.random() < 0.5
        budget = float(rng.uniform(0.2, 0.8) * len(costs)) if use_mem else None
        m = mem if use_mem else None
        got = solve_sharding_ilp(costs, edges, m, budget)
        want = solve_brute_force(costs, edges, m, budget)
        assert isinstance(got, ILPResult)
        assert got.status == want.status, (got, want)
        if want.status == "optimal":
            assert math.isclose(got.objective, want.objective, rel_tol=1e-9, abs_tol=1e-12)
            _check_choice(got, costs, edges, mem, budget)
        else:
            assert got.choice is None and got.objective == math.inf
        assert got.n_variables <= got.n_variables_before
        assert got.n_constraints <= got.n_constraints_before


def test_memory_budget_at_the_exact_optimum_is_feasible():
    rng = np.random.default_rng(7)
    for _ in range(30):
        costs, edges, mem = _random_instance(rng, n_max=6)
        free = solve_brute_force(costs, edges)
        if free.status != "optimal":
            continue
        least = solve_brute_force([m.copy() for m in mem], [])  # least-memory choice
        budget = float(sum(m[p] for m, p in zip(mem, least.choice)))
        got = solve_sharding_ilp(costs, edges, mem, budget)
        want = solve_brute_force(costs, edges, mem, budget)
        assert got.status == want.status
        if want.status == "optimal":
            assert math.isclose(got.objective, want.objective, rel_tol=1e-9, abs_tol=1e-12)


def test_infeasible_budget_and_forbidden_pairs():
    costs = [np.array([1.0, 2.0]), np.array([3.0, 1.0])]
    mem = [np.array([5.0, 4.0]), np.array([2.0, 4.0])]
    res = solve_sharding_ilp(costs, [], mem, 5.9)  # least memory is 4 + 2 = 6
    assert res.status == "infeasible" and res.choice is None and res.objective == math.inf
    # every pair forbidden
    res = solve_sharding_ilp(costs, [(0, 1, np.full((2, 2), np.inf))])
    assert res.status == "infeasible"
    # only the diagonal allowed, and the budget rules out the cheaper (1, 1)
    r = np.array([[0.0, np.inf], [np.inf, 0.0]])
    res = solve_sharding_ilp(costs, [(0, 1, r)], mem, 7.0)
    assert res.status == "optimal" and res.choice.tolist() == [0, 0]
    assert res.objective == 4.0


def test_parallel_reversed_and_self_loop_edges_add_up():
    rng = np.random.default_rng(3)
    costs = [rng.random(3), rng.random(4), rng.random(2)]
    edges = [(0, 1, rng.random((3, 4))), (1, 0, rng.random((4, 3))),
             (0, 1, rng.random((3, 4))), (2, 2, rng.random((2, 2))), (1, 2, rng.random((4, 2)))]
    got = solve_sharding_ilp(costs, edges)
    want = solve_brute_force(costs, edges)
    assert math.isclose(got.objective, want.objective, rel_tol=1e-12)


def test_series_parallel_graph_needs_no_solver_without_memory():
    # a chain with residual-style skips melts away under exact elimination
    rng = np.random.default_rng(5)
    n = 9
    costs = [rng.random(4) for _ in range(n)]
    edges = [(i, i + 1, rng.random((4, 4))) for i in range(n - 1)]
    edges += [(i, i + 2, rng.random((4, 4))) for i in range(0, n - 2, 3)]
    res = solve_sharding_ilp(costs, edges)
    assert res.status == "optimal" and res.n_variables == 0
    assert res.n_variables_before == 4 * n + 16 * len(edges)
    full = solve_brute_force(costs, edges)
    assert math.isclose(res.objective, full.objective, rel_tol=1e-12)


def test_time_limit_returns_best_feasible_not_an_exception():
    rng = np.random.default_rng(0)
    n, p = 50, 16
    costs = [rng.random(p) for _ in range(n)]
    edges = []
    for _ in range(100):
        u, v = rng.choice(n, 2, replace=False)
        edges.append((int(u), int(v), rng.random((p, p))))
    mem = [rng.random(p) for _ in range(n)]
    budget = 0.35 * n
    res = solve_sharding_ilp(costs, edges, mem, budget, time_limit_s=0.05)
    assert res.status == "feasible_time_limit", res.status
    _check_choice(res, costs, edges, mem, budget)
    assert res.solve_time_s < 5.0


def test_errors_say_what_is_wrong():
    c = [np.zeros(2), np.zeros(3)]
    with pytest.raises(ValueError, match=r"R.shape"):
        solve_sharding_ilp(c, [(0, 1, np.zeros((3, 2)))])
    with pytest.raises(ValueError, match="out of range"):
        solve_sharding_ilp(c, [(0, 2, np.zeros((2, 3)))])
    with pytest.raises(ValueError, match="NaN"):
        solve_sharding_ilp([np.array([np.nan])], [])
    with pytest.raises(ValueError, match="without node_mem"):
        solve_sharding_ilp(c, [], None, 1.0)
    with pytest.raises(ValueError, match="node_mem"):
        solve_sharding_ilp(c, [], [np.zeros(2), np.zeros(2)], 1.0)
    with pytest.raises(ValueError, match="backend"):
        solve_sharding_ilp(c, [], backend="gurobi-please")


@pytest.mark.parametrize("backend", ["cbc", "auto"])
def test_other_backends_match_brute_force(backend):
    if backend == "cbc" and "cbc" not in available_backends():
        pytest.skip("no CBC in this PuLP installation")
    rng = np.random.default_rng(11)
    for _ in range(6):
        costs, edges, mem = _random_instance(rng)
        budget = float(0.6 * len(costs))
        got = solve_sharding_ilp(costs, edges, mem, budget, backend=backend)
        want = solve_brute_force(costs, edges, mem, budget)
        assert got.status == want.status
        if want.status == "optimal":
            assert math.isclose(got.objective, want.objective, rel_tol=1e-9, abs_tol=1e-12)
            assert got.backend in ("highs", "cbc")


def test_costs_in_seconds_and_memory_in_bytes_are_scaled_safely():
    # tiny objective coefficients and huge memory numbers: solver tolerances are absolute
    rng = np.random.default_rng(2)
    for _ in range(10):
        costs, edges, mem = _random_instance(rng, n_max=6)
        costs = [c * 1e-7 for c in costs]
        edges = [(u, v, r * 1e-7) for u, v, r in edges]
        mem = [m * 1e10 for m in mem]
        budget = 0.5 * len(costs) * 1e10
        got = solve_sharding_ilp(costs, edges, mem, budget)
        want = solve_brute_force(costs, edges, mem, budget)
        assert got.status == want.status
        if want.status == "optimal":
            assert math.isclose(got.objective, want.objective, rel_tol=1e-9, abs_tol=0)


def test_missing_backends_are_reported_clearly(monkeypatch):
    import solvers.ilp as ilp_mod

    costs, edges = [np.array([1.0, 2.0])], []
    monkeypatch.setattr(ilp_mod, "_quiet_highs_base", lambda pulp: None)  # no highspy
    with pytest.raises(ValueError, match="'highs' is not available.*Backends available"):
        solve_sharding_ilp(costs, edges, backend="highs")
    if ilp_mod._cbc_class(ilp_mod._pulp()) is not None:
        assert solve_sharding_ilp(costs, edges, backend="auto").backend == "cbc"
    monkeypatch.setattr(ilp_mod, "_cbc_class", lambda pulp: None)  # PuLP 4: no bundled CBC
    with pytest.raises(ValueError, match="'cbc' is not available"):
        solve_sharding_ilp(costs, edges, backend="auto")
