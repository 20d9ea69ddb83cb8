"""solvers/ilp.py's shrinking after its bookkeeping was cut (each node's allowed mask and
its indices kept with its cost vector, edges whose whole matrix is finite skipped by the
forbidden-row pass and the separable test's finiteness check), and solve_built_ilp, the
planner's entry that checks only the values of arrays it built. The previous _Reduced,
verbatim below, is the reference: on random instances (forbidden strategies and pairs,
self-loops, parallel edges, memory budgets) and on the ILPs a real layer solver poses (every
layer, entry layout and mesh of a small model, with and without a binding memory budget),
the shrunk problem is the same to the bit (costs, edges, fixed and eliminated nodes, the
elimination log), and solve_built_ilp returns solve_sharding_ilp's result."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from test_solvers_ilp import _random_instance

import solvers.ilp as ilp
from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.search.layer_solver import LayerSolver, SearchStats, boundary_specs
from autopar.sharding.stage_problem import Settings, StageProblem
from solvers.ilp import solve_built_ilp, solve_sharding_ilp

_strictly_upper = ilp._strictly_upper


class _PreviousReduced:
    """The problem after exact shrinking; costs/edges keep full size, inf = dropped.

    Every mutation bumps a version counter of the nodes it affects (and their neighbours),
    and each step only revisits nodes/edges whose versions moved since it last looked, so
    the fixpoint costs little more than one pass."""

    elim_log: list[tuple[int, tuple[int, ...], np.ndarray]]
    edges: dict[tuple[int, int], np.ndarray]
    adj: list[set[int]]
    seen: dict[str, dict]

    def __init__(self, costs, edges, mem, budget):
        n = len(costs)
        self.n = n
        self.cost = [c.copy() for c in costs]
        self.mem_active = budget is not None and mem is not None
        self.mem = [m.copy() for m in mem] if self.mem_active else None
        self.budget_rem = budget if self.mem_active else None
        if self.mem_active:
            # Memory sums are taken in a different order here than in the final check, so
            # pruning keeps a little slack; it only ever prunes less than it could.
            scale = abs(budget) + sum(float(np.abs(m[np.isfinite(m)]).max(initial=0.0))
                                      for m in mem)
            self.mem_tol = 1e-12 * scale
        if self.mem_active:
            for v in range(n):
                self.cost[v][~np.isfinite(self.mem[v])] = np.inf
        self.fixed = np.full(n, -1, dtype=np.int64)
        self.eliminated = np.zeros(n, dtype=bool)
        self.free = [True] * n  # neither fixed nor eliminated (a list: read per node per step)
        self.elim_log = []
        self.edges = {}
        self.adj = [set() for _ in range(n)]
        for u, v, r in edges:
            if u == v:  # a self-loop can only ever use its diagonal
                self.cost[u] = self.cost[u] + np.diag(r)
                continue
            if u > v:
                u, v, r = v, u, r.T
            if (u, v) in self.edges:
                self.edges[(u, v)] = self.edges[(u, v)] + r
            else:
                self.edges[(u, v)] = r.copy()
                self.adj[u].add(v)
                self.adj[v].add(u)
        self.infeasible = False
        self.ver = [1] * n
        self.seen = {k: {} for k in ("forbid", "fix", "sep", "dom", "elim")}

    # -- state helpers
    def oriented(self, v: int, w: int) -> np.ndarray:
        """Edge matrix between v and w with v's strategies as rows."""
        return self.edges[(v, w)] if v < w else self.edges[(w, v)].T

    def is_free(self, v: int) -> bool:
        return self.free[v]

    def allowed(self, v: int) -> np.ndarray:
        return np.isfinite(self.cost[v])

    def _touch(self, v: int) -> None:
        self.ver[v] += 1
        for w in self.adj[v]:
            self.ver[w] += 1

    def _set_cost(self, v: int, cost: np.ndarray) -> None:
        self.cost[v] = cost
        self._touch(v)
        if self.is_free(v) and not np.isfinite(cost).any():
            self.infeasible = True

    def _forbid(self, v: int, idx) -> None:
        cost = self.cost[v].copy()
        cost[idx] = np.inf
        self._set_cost(v, cost)

    def _drop_edge(self, u: int, v: int) -> None:
        del self.edges[(min(u, v), max(u, v))]
        self.adj[u].discard(v)
        self.adj[v].discard(u)
        self._touch(u)
        self._touch(v)

    def _add_edge(self, u: int, v: int, r: np.ndarray) -> None:
        if u > v:
            u, v, r = v, u, r.T
        if (u, v) in self.edges:
            self.edges[(u, v)] = self.edges[(u, v)] + r
        else:
            self.edges[(u, v)] = r
            self.adj[u].add(v)
            self.adj[v].add(u)
        self._touch(u)
        self._touch(v)

    def _stale_nodes(self, step: str) -> list[int]:
        seen = self.seen[step]
        free, ver = self.free, self.ver
        return [v for v in range(self.n) if free[v] and seen.get(v) != ver[v]]

    def _stale_edges(self, step: str) -> list[tuple[int, int]]:
        seen = self.seen[step]
        return [e for e in self.edges if seen.get(e) != (self.ver[e[0]], self.ver[e[1]])]

    # -- the fixpoint
    def run(self) -> None:
        if not all(np.isfinite(c).any() for c in self.cost):
            self.infeasible = True
            return
        for _ in range(10_000):  # every productive pass removes something; a backstop only
            changed = self._propagate_forbidden()
            changed |= self._fix_single()
            changed |= self._fold_separable()
            changed |= self._memory_prune()
            changed |= self._dominance()
            if not self.mem_active:
                changed |= self._eliminate()
            if self.infeasible or not changed:
                return

    def _propagate_forbidden(self) -> bool:
        """A strategy whose row of an edge matrix is all inf is forbidden."""
        changed = False
        for (u, v) in self._stale_edges("forbid"):
            if self.infeasible:
                break
            if (u, v) not in self.edges:
                continue
            self.seen["forbid"][(u, v)] = (self.ver[u], self.ver[v])
            au, av = self.allowed(u), self.allowed(v)
            fin = np.isfinite(self.edges[(u, v)][au][:, av])
            dead_rows = ~fin.any(axis=1)
            dead_cols = ~fin.any(axis=0)
            if dead_rows.any():
                self._forbid(u, np.flatnonzero(au)[dead_rows])
                changed = True
            if dead_cols.any():
                self._forbid(v, np.flatnonzero(av)[dead_cols])
                changed = True
        return changed

    def _fix_single(self) -> bool:
        """A node with one allowed strategy is a constant; its edges fold into neighbours."""
        changed = False
        for v in self._stale_nodes("fix"):
            if self.infeasible:
                break
            self.seen["fix"][v] = self.ver[v]
            allowed = np.flatnonzero(self.allowed(v))
            if allowed.size != 1:
                continue
            p = int(allowed[0])
            self.fixed[v] = p
            self.free[v] = False
            for w in list(self.adj[v]):
                row = self.oriented(v, w)[p]
                self._drop_edge(v, w)
                self._set_cost(w, self.cost[w] + row)
            if self.mem_active:
                self.budget_rem -= self.mem[v][p]
            changed = True
        return changed

    def _fold_separable(self) -> bool:
        """R[p, q] = a[p] + b[q] on the allowed block needs no edge variables."""
        changed = False
        for (u, v) in self._stale_edges("sep"):
            if self.infeasible:
                break
            if (u, v) not in self.edges:
                continue
            self.seen["sep"][(u, v)] = (self.ver[u], self.ver[v])
            au, av = self.allowed(u), self.allowed(v)
            sub = self.edges[(u, v)][au][:, av]
            if not np.isfinite(sub).all():
                continue
            a = sub[:, 0]
            b = sub[0, :] - sub[0, 0]
            resid = sub - a[:, None] - b[None, :]
            if np.abs(resid).max() <= 1e-12 * max(1.0, float(np.abs(sub).max())):
                self._drop_edge(u, v)
                cu, cv = self.cost[u].copy(), self.cost[v].copy()
                cu[au] += a
                cv[av] += b
                self._set_cost(u, cu)
                self._set_cost(v, cv)
                changed = True
        return changed

    def _memory_prune(self) -> bool:
        """Drop strategies that cannot fit even with every other node at its least memory;
        drop the constraint itself once it cannot bind."""
        if not self.mem_active or self.infeasible:
            return False
        free = [v for v in range(self.n) if self.is_free(v)]
        masks = {v: self.allowed(v) for v in free}
        lo = {v: float(self.mem[v][masks[v]].min()) for v in free}
        lo_total = sum(lo.values())
        tol = self.mem_tol
        if lo_total > self.budget_rem + tol:
            self.infeasible = True
            return False
        if sum(float(self.mem[v][masks[v]].max()) for v in free) <= self.budget_rem - tol:
            self.mem_active = False
            for v in free:
                self._touch(v)  # dominance no longer needs to look at memory
            return True
        changed = False
        for v in free:
            too_big = masks[v] & (self.mem[v] + (lo_total - lo[v]) > self.budget_rem + tol)
            if too_big.any():
                self._forbid(v, too_big)
                changed = True
        return changed

    def _dominance(self) -> bool:
        """Drop a strategy when another of the same node is no worse in cost, memory and
        every incident edge row (ties keep the lower index). All nodes are judged on the
        same state: a dominated strategy loses for every choice of the neighbours, including
        those pruned at the same time, so simultaneous removal is safe."""
        removals = []
        for v in self._stale_nodes("dom"):
            if self.infeasible:
                break
            self.seen["dom"][v] = self.ver[v]
            allowed = np.flatnonzero(self.allowed(v))
            k = allowed.size
            if k < 2:
                continue
            cols = [self.cost[v][allowed][:, None]]
            if self.mem_active:
                cols.append(self.mem[v][allowed][:, None])
            for w in self.adj[v]:
                cols.append(self.oriented(v, w)[allowed][:, self.allowed(w)])
            m = np.concatenate(cols, axis=1)
            le = (m[:, None, :] <= m[None, :, :]).all(axis=2)  # le[a, b]: a no worse than b
            # a better than b somewhere, given le[a, b], is not le[b, a] (m holds no NaN:
            # inputs are checked, and sums of finite and +inf stay so): one comparison, not two
            dom = le & (~le.T | _strictly_upper(k))
            dead = dom.any(axis=0)
            if dead.any():
                removals.append((v, allowed[dead]))
        for v, idx in removals:
            self._forbid(v, idx)
        return bool(removals)

    def _eliminate(self) -> bool:
        """Exact variable elimination, valid only without a binding memory constraint:
        a node with one neighbour folds min_p(cost + R) into it; a node with two neighbours
        becomes one edge between them (min over its strategy of the path cost). Op graphs
        of transformer layers are nearly series-parallel, so most of the graph melts away."""
        changed = False
        for v in self._stale_nodes("elim"):
            if self.infeasible:
                break
            if not self.is_free(v):
                continue
            self.seen["elim"][v] = self.ver[v]
            nbrs = sorted(self.adj[v])
            if len(nbrs) == 1:
                (w,) = nbrs
                total = self.cost[v][:, None] + self.oriented(v, w)  # (P_v, P_w)
                best = np.argmin(total, axis=0)
                self.eliminated[v] = True
                self.free[v] = False
                self._drop_edge(v, w)
                self._set_cost(w, self.cost[w] + total[best, np.arange(total.shape[1])])
                self.elim_log.append((v, (w,), best))
                changed = True
            elif len(nbrs) == 2:
                w1, w2 = nbrs
                n1, n2 = int(self.allowed(w1).sum()), int(self.allowed(w2).sum())
                nv = int(self.allowed(v).sum())
                if (w1, w2) not in self.edges and n1 * n2 > nv * (n1 + n2 + 1):
                    continue  # the new edge would be bigger than what it replaces
                total = (self.oriented(w1, v)[:, :, None] + self.cost[v][None, :, None]
                         + self.oriented(v, w2)[None, :, :])  # (P_w1, P_v, P_w2)
                best = np.argmin(total, axis=1)
                via = np.take_along_axis(total, best[:, None, :], axis=1)[:, 0, :]
                self.eliminated[v] = True
                self.free[v] = False
                self._drop_edge(v, w1)
                self._drop_edge(v, w2)
                self._add_edge(w1, w2, via)
                self.elim_log.append((v, (w1, w2), best))
                changed = True
        return changed

    def back_substitute(self, choice: np.ndarray) -> None:
        for v, deps, best in reversed(self.elim_log):
            choice[v] = best[tuple(int(choice[w]) for w in deps)]



def _same_state(new: ilp._Reduced, old: _PreviousReduced) -> None:
    assert new.infeasible == old.infeasible
    if old.infeasible:
        return
    assert new.mem_active == old.mem_active and new.budget_rem == old.budget_rem
    assert len(new.cost) == len(old.cost)
    for a, b in zip(new.cost, old.cost):
        assert a.tobytes() == b.tobytes()
    assert list(new.edges) == list(old.edges)
    for k, r in old.edges.items():
        assert new.edges[k].shape == r.shape and new.edges[k].tobytes() == r.tobytes()
    assert new.adj == old.adj
    np.testing.assert_array_equal(new.fixed, old.fixed)
    np.testing.assert_array_equal(new.eliminated, old.eliminated)
    assert len(new.elim_log) == len(old.elim_log)
    for (v, deps, best), (v2, deps2, best2) in zip(new.elim_log, old.elim_log):
        assert (v, deps) == (v2, deps2) and best.tobytes() == best2.tobytes()
    # the kept masks and indices mirror the costs they were taken from
    for v, c in enumerate(new.cost):
        np.testing.assert_array_equal(new.allowed(v), np.isfinite(c))
        np.testing.assert_array_equal(new.allowed_idx(v), np.flatnonzero(np.isfinite(c)))
    assert new.all_finite == {e: bool(np.isfinite(r).all()) for e, r in new.edges.items()}


def _check(costs, edges, mem=None, budget=None) -> bool:
    args = ilp._validate(costs, edges, mem, budget)
    new, old = ilp._Reduced(*args), _PreviousReduced(*args)
    new.run()
    old.run()
    _same_state(new, old)
    return not old.infeasible


def _same_result(a: ilp.ILPResult, b: ilp.ILPResult) -> None:
    assert (a.choice is None) == (b.choice is None)
    if a.choice is not None:
        assert a.choice.dtype == b.choice.dtype and a.choice.tolist() == b.choice.tolist()
    assert (a.objective, a.status, a.n_variables, a.n_constraints, a.n_variables_before, a.n_constraints_before,
            a.backend) == (b.objective, b.status, b.n_variables, b.n_constraints, b.n_variables_before,
                           b.n_constraints_before, b.backend)


def test_shrinking_equals_the_previous_on_random_instances():
    rng = np.random.default_rng(1111)
    feasible = with_budget = 0
    for i in range(600):
        costs, edges, mem = _random_instance(rng, n_max=10, p_max=5)
        if i % 3 == 0:
            # the planner's kind: no inf anywhere in the edges
            edges = [(u, v, np.where(np.isfinite(r), r, 1.0)) for u, v, r in edges]
        feasible += _check(costs, edges)
        lo = sum(float(m.min()) for m in mem)
        hi = sum(float(m.max()) for m in mem)
        with_budget += _check(costs, edges, mem, lo + rng.random() * (hi - lo))
    assert feasible > 300 and with_budget > 200


def test_solve_built_ilp_is_solve_sharding_ilp():
    rng = np.random.default_rng(1112)
    for _ in range(200):
        costs, edges, _ = _random_instance(rng)
        ilp._DECIDED.clear()
        got = solve_built_ilp(costs, edges, time_limit_s=10.0)
        ilp._DECIDED.clear()
        _same_result(got, solve_sharding_ilp(costs, edges, time_limit_s=10.0))


def test_solve_built_ilp_reports_bad_values_as_solve_sharding_ilp_does():
    costs = [np.array([1.0, 2.0]), np.array([1.0, np.nan])]
    with pytest.raises(ValueError, match=r"node_costs\[1\] contains NaN"):
        solve_built_ilp(costs, [(0, 1, np.zeros((2, 2)))])
    with pytest.raises(ValueError, match=r"edges\[0\] = \(0, 1, R\): R contains -inf"):
        solve_built_ilp(costs[:1] * 2, [(0, 1, np.array([[0.0, -np.inf], [1.0, 1.0]]))])
    with pytest.raises(ValueError, match="time_limit_s must be > 0"):
        solve_built_ilp(costs[:1], [], time_limit_s=0.0)


MODEL = "llama:hidden=1024,layers=2,heads=16,kv_heads=2,seq=4096,vocab=512,ffn=2048"


@functools.cache
def _layer_ilps() -> list[tuple]:
    """Every layer's ILP arrays on three meshes, in every entry layout of its input."""
    g = ModelSource(MODEL).graph(2)
    cm = ComputeModel(load_cluster("dgx-h100", 1).gpu, "bf16")
    solver = LayerSolver(g, cm, Settings(n_microbatches=4), SearchStats(), 10.0, "highs")
    cl = load_cluster("dgx-h100", 1)
    out = []
    for shape in ((1, 4), (2, 2), (2, 4)):
        mesh = Mesh(cl, Submesh(1, shape[0] * shape[1]), shape)
        for li, layer in enumerate(g.layers):
            src = solver.inputs[li]
            specs = boundary_specs(tuple(g.node(src).out_shape), mesh) if src is not None else [None]
            for spec in specs:
                prob = StageProblem(g, list(layer.nodes), mesh, cm, boundary={src: spec} if spec is not None else {})
                out.append(prob.ilp_arrays(Settings(n_microbatches=4)))
    return out


def test_shrinking_equals_the_previous_on_layer_ilps():
    ilps = _layer_ilps()
    assert len(ilps) > 60
    for costs, edges, mem in ilps:
        assert _check(costs, edges)
        lo = sum(float(m.min()) for m in mem)
        hi = sum(float(m.max()) for m in mem)
        if hi > lo:
            _check(costs, edges, mem, (lo + hi) / 2)


def test_solve_built_ilp_on_layer_ilps():
    for costs, edges, _ in _layer_ilps():
        ilp._DECIDED.clear()
        got = solve_built_ilp(costs, edges, time_limit_s=10.0)
        ilp._DECIDED.clear()
        want = solve_sharding_ilp(costs, edges, time_limit_s=10.0)
        _same_result(got, want)
        assert got.status == "optimal"
