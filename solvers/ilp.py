"""Intra-op sharding ILP (Alpa's formulation), with exact shrinking before the solve.

Variables: a one-hot binary vector s_v per node (its strategy) and, per edge, continuous
e_uv[p, q] >= 0 tied to the node choices by the marginal constraints
    sum_q e_uv[p, q] = s_u[p],    sum_p e_uv[p, q] = s_v[q].
With s binary and one-hot these force e_uv = outer(s_u, s_v) exactly (row p* of e must sum to
1, every other row to 0, and the column sums pick q*), so e need not be integer.
Objective: sum of node costs + sum of edge costs. Optional constraint: sum of node memory
<= budget.

Shrinking (every step keeps the optimum value; the objective we report is always re-evaluated
on the caller's original arrays):
  * forbidden strategies (inf cost or memory) are dropped; a strategy whose whole row of an
    edge matrix is inf is forbidden too;
  * parallel edges (either direction) are summed into one matrix; self-loops fold into the
    node's cost (only the diagonal can be used);
  * a node with one allowed strategy becomes a constant: its edges fold into the neighbours'
    node costs;
  * an edge whose allowed block is additively separable, R[p, q] = a[p] + b[q] (constant,
    row-only and column-only matrices included), folds into the two node cost vectors;
  * a strategy dominated by another of the same node (<= in cost, memory and every incident
    edge row; ties keep the lower index) is dropped;
  * a strategy that cannot fit the memory budget even with every other node at its least
    memory is dropped; a memory constraint that cannot bind is dropped;
  * identical rows (columns) of an edge matrix share edge variables: the edge variables live
    on (row group, column group) pairs, whose marginals are sums of the node variables in the
    group. Sharding strategies that produce the same output layout give identical rows, so
    this often shrinks a 16 x 16 edge to 4 x 4.

The model is built with PuLP. For the HiGHS backend PuLP's own `HiGHS` solver class is used
with a bulk model upload (the stock one adds columns and rows one at a time, which dominated
the end-to-end time at ~10k variables).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ILPResult", "solve_sharding_ilp", "solve_brute_force", "available_backends"]

_STATUSES = ("optimal", "feasible_time_limit", "infeasible", "no_solution_time_limit")


@dataclass(frozen=True)
class ILPResult:
    choice: np.ndarray | None  # chosen strategy index per node (int64); None if none found
    objective: float  # node + edge cost of `choice` on the original arrays (inf if none)
    status: str  # "optimal" | "feasible_time_limit" | "infeasible" | "no_solution_time_limit"
    solve_time_s: float  # end-to-end wall time of the call (shrinking + model + solver)
    n_variables: int  # after shrinking (0: shrinking alone decided every node)
    n_constraints: int
    n_variables_before: int  # the naive formulation's size
    n_constraints_before: int
    backend: str


# --------------------------------------------------------------------------------------
# input checking and evaluation


def _as_vector(x, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D array, got shape {a.shape}")
    if np.isnan(a).any():
        raise ValueError(f"{what} contains NaN")
    if (a == -np.inf).any():
        raise ValueError(f"{what} contains -inf; use +inf to forbid a strategy")
    return a


def _bad_values(arrays: list[np.ndarray]) -> bool:
    """Whether any of the arrays holds a NaN or -inf: one pass over them all, so that the
    item by item checks (and their messages) run only where one does."""
    if not arrays:
        return False
    flat = np.concatenate([a.ravel() for a in arrays])
    return bool(np.isnan(flat).any() or (flat == -np.inf).any())


def _vectors(xs, what: str) -> list[np.ndarray]:
    """_as_vector of each, checked in one pass where all are well formed."""
    out = [np.asarray(x, dtype=np.float64) for x in xs]
    if any(a.ndim != 1 or a.size == 0 for a in out) or _bad_values(out):
        return [_as_vector(x, f"{what}[{v}]") for v, x in enumerate(xs)]
    return out


def _validate(node_costs, edges, node_mem, mem_budget):
    costs = _vectors(node_costs, "node_costs")
    n = len(costs)
    sizes = [c.size for c in costs]
    checked_edges = []
    for k, edge in enumerate(edges):
        try:
            u, v, r = edge
        except (TypeError, ValueError):
            raise ValueError(f"edges[{k}] must be a (u, v, R) triple") from None
        if not (isinstance(u, (int, np.integer)) and isinstance(v, (int, np.integer))):
            raise ValueError(f"edges[{k}]: node ids must be ints, got {u!r}, {v!r}")
        u, v = int(u), int(v)
        if not (0 <= u < n and 0 <= v < n):
            raise ValueError(f"edges[{k}] = ({u}, {v}, R): node id out of range [0, {n})")
        r = np.asarray(r, dtype=np.float64)
        if r.shape != (sizes[u], sizes[v]):
            raise ValueError(
                f"edges[{k}] = ({u}, {v}, R): R.shape is {r.shape}, expected "
                f"({sizes[u]}, {sizes[v]}) = (len(node_costs[{u}]), len(node_costs[{v}]))")
        checked_edges.append((u, v, r))
    if _bad_values([r for _, _, r in checked_edges]):
        for k, (u, v, r) in enumerate(checked_edges):
            if np.isnan(r).any():
                raise ValueError(f"edges[{k}] = ({u}, {v}, R): R contains NaN")
            if (r == -np.inf).any():
                raise ValueError(f"edges[{k}] = ({u}, {v}, R): R contains -inf")
    mem = None
    budget = None
    if mem_budget is not None:
        if node_mem is None:
            raise ValueError("mem_budget was given without node_mem; pass both or neither")
        budget = float(mem_budget)
        if math.isnan(budget):
            raise ValueError("mem_budget is NaN")
    if node_mem is not None:
        if len(node_mem) != n:
            raise ValueError(f"node_mem has {len(node_mem)} entries, node_costs has {n}")
        mem = _vectors(node_mem, "node_mem")
        for v in range(n):
            if mem[v].size != sizes[v]:
                raise ValueError(f"node_mem[{v}] has {mem[v].size} entries, "
                                 f"node_costs[{v}] has {sizes[v]}")
    return costs, checked_edges, mem, budget


def _naive_size(costs, edges, with_mem: bool) -> tuple[int, int]:
    n_var = sum(c.size for c in costs) + sum(r.size for _, _, r in edges)
    n_con = len(costs) + sum(r.shape[0] + r.shape[1] for _, _, r in edges) + int(with_mem)
    return n_var, n_con


def _evaluate(costs, edges, choice) -> float:
    # Same summation order as the brute force, so equal choices give bit-equal objectives.
    total = 0.0
    for v, c in enumerate(costs):
        total += c[choice[v]]
    for u, v, r in edges:
        total += r[choice[u], choice[v]]
    return float(total)


def _memory(mem, choice) -> float:
    total = 0.0
    for v, m in enumerate(mem):
        total += m[choice[v]]
    return float(total)


# --------------------------------------------------------------------------------------
# shrinking


class _Reduced:
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
        # np.isfinite of each cost vector, kept with it (_set_cost is the only writer from
        # here on): read-only, as callers index with it
        self.mask = [self._finite(c) for c in self.cost]
        self.idx: list[np.ndarray | None] = [None] * n   # flatnonzero of mask[v], when asked
        # edges whose whole matrix is finite: they forbid nothing (_propagate_forbidden)
        self.all_finite = {e: bool(np.isfinite(r).all()) for e, r in self.edges.items()}

    @staticmethod
    def _finite(cost: np.ndarray) -> np.ndarray:
        m = np.isfinite(cost)
        m.flags.writeable = False
        return m

    # -- state helpers
    def oriented(self, v: int, w: int) -> np.ndarray:
        """Edge matrix between v and w with v's strategies as rows."""
        return self.edges[(v, w)] if v < w else self.edges[(w, v)].T

    def is_free(self, v: int) -> bool:
        return self.free[v]

    def allowed(self, v: int) -> np.ndarray:
        return self.mask[v]

    def allowed_idx(self, v: int) -> np.ndarray:
        """np.flatnonzero(self.allowed(v)), kept until v's cost changes; read-only."""
        idx = self.idx[v]
        if idx is None:
            idx = self.idx[v] = self.mask[v].nonzero()[0]
            idx.flags.writeable = False
        return idx

    def _touch(self, v: int) -> None:
        self.ver[v] += 1
        for w in self.adj[v]:
            self.ver[w] += 1

    def _set_cost(self, v: int, cost: np.ndarray) -> None:
        self.cost[v] = cost
        mask = self.mask[v] = self._finite(cost)
        self.idx[v] = None
        self._touch(v)
        if self.is_free(v) and not mask.any():
            self.infeasible = True

    def _forbid(self, v: int, idx) -> None:
        cost = self.cost[v].copy()
        cost[idx] = np.inf
        self._set_cost(v, cost)

    def _drop_edge(self, u: int, v: int) -> None:
        e = (min(u, v), max(u, v))
        del self.edges[e]
        del self.all_finite[e]
        self.adj[u].discard(v)
        self.adj[v].discard(u)
        self._touch(u)
        self._touch(v)

    def _add_edge(self, u: int, v: int, r: np.ndarray) -> None:
        if u > v:
            u, v, r = v, u, r.T
        if (u, v) in self.edges:
            r = self.edges[(u, v)] = self.edges[(u, v)] + r
        else:
            self.edges[(u, v)] = r
            self.adj[u].add(v)
            self.adj[v].add(u)
        self.all_finite[(u, v)] = bool(np.isfinite(r).all())
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
            if self.all_finite[(u, v)]:
                # every row and column of the allowed block holds a finite entry (both
                # nodes are free and feasible here, so the block is not empty)
                continue
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
            allowed = self.allowed_idx(v)
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
            if not self.all_finite[(u, v)] and not np.isfinite(sub).all():
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
            allowed = self.allowed_idx(v)
            k = allowed.size
            if k < 2:
                continue
            cols = [self.cost[v].take(allowed)[:, None]]
            if self.mem_active:
                cols.append(self.mem[v].take(allowed)[:, None])
            rows = allowed[:, None]
            for w in self.adj[v]:
                cols.append(self.oriented(v, w)[rows, self.allowed_idx(w)])  # [allowed][:, allowed(w)]
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
                n1, n2 = self.allowed_idx(w1).size, self.allowed_idx(w2).size
                nv = self.allowed_idx(v).size
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


# --------------------------------------------------------------------------------------
# model construction (pure numbers; PuLP objects are made from these in one go)


@dataclass
class _Model:
    n_vars: int
    obj: np.ndarray  # objective coefficient per variable
    is_int: np.ndarray  # bool per variable
    row_idx: list[list[int]]  # per row: variable indices
    row_val: list[list[float]]  # per row: coefficients
    row_lo: list[float]
    row_hi: list[float]
    node_vars: dict[int, tuple[int, np.ndarray]]  # node -> (first var index, strategy ids)


@functools.lru_cache(maxsize=256)
def _strictly_upper(k: int) -> np.ndarray:
    """[a, b] true where a < b (dominance ties keep the lower index); read-only, shared."""
    m = np.tri(k, k, -1, dtype=bool).T
    m.flags.writeable = False
    return m


def _group_rows(a: np.ndarray) -> tuple[list[int], list[list[int]]]:
    """Identical rows of a small matrix: (representative row per group, members per group).
    Keyed on the raw bytes, which is ~10x faster than np.unique(axis=0) at these sizes."""
    index: dict[bytes, int] = {}
    reps: list[int] = []
    members: list[list[int]] = []
    for i, row in enumerate(a):
        g = index.setdefault(row.tobytes(), len(reps))
        if g == len(reps):
            reps.append(i)
            members.append([])
        members[g].append(i)
    return reps, members


def _build_model(red: _Reduced) -> _Model:
    free = [v for v in range(red.n) if red.is_free(v)]
    obj_parts, int_parts = [], []
    row_idx, row_val, row_lo, row_hi = [], [], [], []
    node_vars = {}
    nxt = 0
    for v in free:
        allowed = np.flatnonzero(red.allowed(v))
        node_vars[v] = (nxt, allowed)
        obj_parts.append(red.cost[v][allowed])
        int_parts.append(np.ones(allowed.size, dtype=bool))
        row_idx.append(list(range(nxt, nxt + allowed.size)))
        row_val.append([1.0] * allowed.size)
        row_lo.append(1.0)
        row_hi.append(1.0)
        nxt += allowed.size
    for (u, v), r in red.edges.items():
        su, au = node_vars[u]
        sv, av = node_vars[v]
        sub = np.ascontiguousarray(r[au][:, av])
        row_reps, row_members = _group_rows(sub)
        rows = sub[row_reps]
        col_reps, col_members = _group_rows(np.ascontiguousarray(rows.T))
        grid = rows[:, col_reps]  # (row groups, column groups)
        ok = np.isfinite(grid)
        n_e = int(ok.sum())
        eid = np.full(grid.shape, -1, dtype=np.int64)
        eid[ok] = np.arange(nxt, nxt + n_e)
        obj_parts.append(grid[ok])
        int_parts.append(np.zeros(n_e, dtype=bool))
        nxt += n_e
        for g, members in enumerate(row_members):
            e = eid[g][ok[g]].tolist()
            row_idx.append(e + [su + k for k in members])
            row_val.append([1.0] * len(e) + [-1.0] * len(members))
            row_lo.append(0.0)
            row_hi.append(0.0)
        for g, members in enumerate(col_members):
            e = eid[:, g][ok[:, g]].tolist()
            row_idx.append(e + [sv + k for k in members])
            row_val.append([1.0] * len(e) + [-1.0] * len(members))
            row_lo.append(0.0)
            row_hi.append(0.0)
    if red.mem_active and node_vars:
        row_idx.append([first + k for first, a in node_vars.values() for k in range(a.size)])
        row_val.append([float(x) for v, (_, a) in node_vars.items() for x in red.mem[v][a]])
        row_lo.append(-np.inf)
        row_hi.append(red.budget_rem)
    obj = np.concatenate(obj_parts) if obj_parts else np.zeros(0)
    is_int = np.concatenate(int_parts) if int_parts else np.zeros(0, dtype=bool)
    return _Model(nxt, obj, is_int, row_idx, row_val, row_lo, row_hi, node_vars)


def _scale(model: _Model) -> None:
    """Bring objective and memory coefficients to O(1): solver tolerances are absolute
    (~1e-7), while costs arrive in seconds (~1e-6) and memory in bytes (~1e10)."""
    if model.obj.size:
        s = float(np.abs(model.obj).max())
        if s > 0:
            model.obj = model.obj / s
    if model.row_hi and model.row_lo[-1] == -np.inf:  # the memory row is last when present
        s = max(max(abs(x) for x in model.row_val[-1]), abs(model.row_hi[-1]))
        if s > 0:
            model.row_val[-1] = [x / s for x in model.row_val[-1]]
            model.row_hi[-1] = model.row_hi[-1] / s


# --------------------------------------------------------------------------------------
# PuLP layer


def _pulp():
    import pulp  # deferred: importing PuLP costs ~0.1 s and the DP solvers do not need it

    return pulp


@functools.cache
def _silence_highs_banner() -> None:
    """HiGHS prints a copyright banner on stdout (fd 1, from C++) when the first Highs
    object of a process is made; that would corrupt a plan written to stdout. Make that
    first object here with fd 1 pointed at /dev/null. Once per process."""
    try:
        import highspy
    except ImportError:
        return
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        highspy.Highs()
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _quiet_highs_base(pulp):
    return _highs_base(pulp)


@functools.cache
def _highs_base(pulp):
    """PuLP's HiGHS class where highspy is there, else None; probed once per process (the
    probe makes a HiGHS object, which cost more than shrinking a typical problem)."""
    base = getattr(pulp, "HiGHS", None)
    if base is None:
        return None
    try:
        if not base().available():
            return None
    except Exception:
        return None
    _silence_highs_banner()
    return base


def _cbc_class(pulp):
    for name in ("PULP_CBC_CMD", "COIN_CMD"):  # PuLP 4 drops the bundled PULP_CBC_CMD
        cls = getattr(pulp, name, None)
        if cls is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if cls(msg=False).available():
                    return cls
        except Exception:
            continue
    return None


def available_backends() -> list[str]:
    """Backends `solve_sharding_ilp` can use in this environment."""
    pulp = _pulp()
    out = []
    if _quiet_highs_base(pulp) is not None:
        out.append("highs")
    if _cbc_class(pulp) is not None:
        out.append("cbc")
    return out


def _no_backend_error(pulp, wanted: str) -> ValueError:
    try:
        listed = pulp.listSolvers(onlyAvailable=True)
    except Exception:
        listed = "unknown"
    return ValueError(
        f"ILP backend {wanted!r} is not available. Backends available here: "
        f"{available_backends() or 'none'} (PuLP {getattr(pulp, '__version__', '?')} solvers "
        f"available: {listed}). Install highspy for 'highs'; 'cbc' needs PuLP's bundled CBC "
        f"(PuLP < 4) or a cbc executable on PATH.")


def _fast_highs_class(base):
    """pulp.HiGHS with a bulk model upload. Falls back to PuLP's own upload if PuLP's
    internals ever change shape (the override only reads what the stock one reads)."""

    class _FastHiGHS(base):
        def buildSolverModel(self, lp):
            try:
                self._bulk_build(lp)
            except (AttributeError, TypeError):
                self.createAndConfigureSolver(lp)
                base.buildSolverModel(self, lp)

        def _bulk_build(self, lp):
            import highspy
            import pulp

            h = lp.solverModel
            inf = highspy.kHighsInf
            variables = lp.variables()
            n = len(variables)
            lo = np.empty(n)
            hi = np.empty(n)
            integer = []
            for i, var in enumerate(variables):
                var.index = i
                lo[i] = -inf if var.lowBound is None else var.lowBound
                hi[i] = inf if var.upBound is None else var.upBound
                if var.cat == pulp.LpInteger and self.mip:
                    integer.append(i)
            cost = np.zeros(n)
            for var, c in lp.objective.items():
                cost[var.index] = c
            h.addCols(n, cost, lo, hi, 0, np.zeros(0, dtype=np.int32),
                      np.zeros(0, dtype=np.int32), np.zeros(0))
            if integer:
                h.changeColsIntegrality(len(integer), np.asarray(integer, dtype=np.int32),
                                        np.ones(len(integer), dtype=np.uint8))
            constraints = list(lp._constraints.values())
            m = len(constraints)
            starts = np.zeros(m, dtype=np.int32)
            index, value = [], []
            rlo = np.empty(m)
            rhi = np.empty(m)
            for i, con in enumerate(constraints):
                con.index = i
                starts[i] = len(index)
                for var, c in con.items():
                    if c != 0:
                        index.append(var.index)
                        value.append(c)
                lb, ub = con.getLb(), con.getUb()
                rlo[i] = -inf if lb is None else lb
                rhi[i] = inf if ub is None else ub
            h.addRows(m, rlo, rhi, len(index), starts, np.asarray(index, dtype=np.int32),
                      np.asarray(value, dtype=np.float64))

    return _FastHiGHS


def _resolve_backend(pulp, backend: str) -> str:
    """The backend `backend` names here ("auto" picks one), raising as _make_solver does
    where it is missing, without making a solver: most problems shrink to nothing and never
    need one."""
    if backend == "auto":
        backend = "highs" if _quiet_highs_base(pulp) is not None else "cbc"
    if backend == "highs":
        if _quiet_highs_base(pulp) is None:
            raise _no_backend_error(pulp, "highs")
        return backend
    if backend == "cbc":
        if _cbc_class(pulp) is None:
            raise _no_backend_error(pulp, "cbc")
        return backend
    raise ValueError(f"unknown ILP backend {backend!r}; use 'highs', 'cbc' or 'auto'")


def _make_solver(pulp, backend: str, time_limit_s: float, mip_gap: float):
    if backend == "auto":
        backend = "highs" if _quiet_highs_base(pulp) is not None else "cbc"
    if backend == "highs":
        base = _quiet_highs_base(pulp)
        if base is None:
            raise _no_backend_error(pulp, "highs")
        # Tight feasibility tolerances: the memory row must hold as the brute force checks it.
        return "highs", _fast_highs_class(base)(
            msg=False, timeLimit=time_limit_s, gapRel=mip_gap, gapAbs=0.0,
            mip_feasibility_tolerance=1e-9, primal_feasibility_tolerance=1e-9)
    if backend == "cbc":
        cls = _cbc_class(pulp)
        if cls is None:
            raise _no_backend_error(pulp, "cbc")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "cbc", cls(msg=False, timeLimit=time_limit_s, gapRel=mip_gap)
    raise ValueError(f"unknown ILP backend {backend!r}; use 'highs', 'cbc' or 'auto'")


def _solve_with_pulp(pulp, model: _Model, solver) -> tuple[str, dict[int, int] | None]:
    """Returns (status, node -> strategy) with the status in _STATUSES terms."""
    prob = pulp.LpProblem("sharding", pulp.LpMinimize)
    make_var = getattr(prob, "add_variable", None)  # PuLP >= 3.3; LpVariable before
    if make_var is None:
        def make_var(name, low, up, cat):
            return pulp.LpVariable(name, low, up, cat)
    binary, cont = pulp.LpBinary, pulp.LpContinuous
    xs = [make_var(f"s{i}", 0, 1, binary) if integer else make_var(f"e{i}", 0, None, cont)
          for i, integer in enumerate(model.is_int.tolist())]
    prob.setObjective(pulp.LpAffineExpression(list(zip(xs, model.obj.tolist()))))
    add = getattr(prob, "addConstraint", None)
    if add is None:  # in case a later PuLP renames it; += (constraint, name) is older still
        def add(con, name):
            nonlocal prob
            prob += con, name
    for k in range(len(model.row_idx)):
        expr = pulp.LpAffineExpression(
            [(xs[i], c) for i, c in zip(model.row_idx[k], model.row_val[k])])
        rhs = model.row_hi[k]
        add(expr == rhs if model.row_lo[k] == rhs else expr <= rhs, f"c{k}")
    t_solve = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PuLP 3.x deprecation chatter about 4.0
        solver.actualSolve(prob)
    t_solve = time.perf_counter() - t_solve
    status = prob.status
    sol_status = getattr(prob, "sol_status", None)
    limit = getattr(solver, "timeLimit", None)
    near_limit = limit is not None and t_solve >= 0.9 * limit
    if status == pulp.LpStatusInfeasible:
        # CBC cut off mid-way through its root LP can print "Infeasible": only trust the
        # verdict when the solver finished well within its time.
        return ("no_solution_time_limit" if near_limit else "infeasible"), None
    if status == pulp.LpStatusOptimal:
        if sol_status is None or sol_status == pulp.LpSolutionOptimal:
            kind = "optimal"
        elif sol_status == pulp.LpSolutionIntegerFeasible:
            kind = "feasible_time_limit"  # stopped early (time) with an incumbent
        else:
            return "no_solution_time_limit", None
        choice = {}
        for v, (first, allowed) in model.node_vars.items():
            vals = [xs[first + k].varValue for k in range(allowed.size)]
            if any(x is None for x in vals):
                return "no_solution_time_limit", None
            choice[v] = int(allowed[int(np.argmax(vals))])
        return kind, choice
    if status == pulp.LpStatusNotSolved and (limit is None or t_solve >= 0.5 * limit):
        return "no_solution_time_limit", None
    # PuLP reports solver errors as "Not Solved" too; one well before the limit is an error
    raise RuntimeError(f"ILP solver returned status {pulp.LpStatus.get(status, status)!r} "
                       f"(solution status {sol_status!r})")


# --------------------------------------------------------------------------------------
# fallback incumbent for time-outs


def _local_search(costs, edges, mem, budget, max_sweeps: int = 50) -> np.ndarray | None:
    """Iterated conditional modes from the least-memory (or least-cost) choice; memory
    feasible moves only. Used only when the solver stops on time."""
    n = len(costs)
    base = [c.copy() for c in costs]
    adj: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(n)]
    for u, v, r in edges:
        if u == v:
            base[u] += np.diag(r)
        else:
            adj[u].append((v, r))
            adj[v].append((u, r.T))
    use_mem = mem is not None and budget is not None
    if use_mem:
        x = np.array([int(np.lexsort((c, m))[0]) for c, m in zip(costs, mem)], dtype=np.int64)
        used = _memory(mem, x)
        if used > budget:
            return None
    else:
        x = np.array([int(np.argmin(c)) for c in costs], dtype=np.int64)
    for _ in range(max_sweeps):
        moved = False
        for v in range(n):
            local = base[v].copy()
            for w, r in adj[v]:
                local += r[:, x[w]]
            if use_mem:
                local[used - mem[v][x[v]] + mem[v] > budget] = np.inf
            best = int(np.argmin(local))
            if local[best] < local[x[v]]:
                if use_mem:
                    used += mem[v][best] - mem[v][x[v]]
                x[v] = best
                moved = True
        if not moved:
            break
    if not np.isfinite(_evaluate(costs, edges, x)):
        return None
    return x


# --------------------------------------------------------------------------------------
# public API


_DECIDED: dict[bytes, tuple[np.ndarray | None, str]] = {}
_DECIDED_BYTES = 0
_DECIDED_MAX_BYTES = 32 << 20   # cleared when full; repeats come within a few hundred problems


def _content_key(backend: str, costs, edges, mem, budget) -> tuple[bytes, int]:
    """The validated problem, exactly, as one bytes object (which the garbage collector does
    not track): a header of every count, size and node id, then every array's bytes, which
    the header splits unambiguously; and its length."""
    header = np.array([len(costs), *(c.size for c in costs), len(edges),
                       *(x for u, v, r in edges for x in (u, v, *r.shape)), mem is not None, budget is not None],
                      dtype=np.int64)
    parts = [backend.encode(), b"\0", header.tobytes(), *(c.tobytes() for c in costs),
             *(r.tobytes() for _, _, r in edges)]
    if mem is not None:
        parts += [m.tobytes() for m in mem]
    if budget is not None:
        parts.append(np.float64(budget).tobytes())
    key = b"".join(parts)
    return key, len(key)


def solve_sharding_ilp(node_costs: Sequence[np.ndarray],
                       edges: Sequence[tuple[int, int, np.ndarray]],
                       node_mem: Sequence[np.ndarray] | None = None,
                       mem_budget: float | None = None,
                       *, time_limit_s: float = 30.0, backend: str = "highs",
                       mip_gap: float = 0.0) -> ILPResult:
    """Least node + edge cost choice of one strategy per node (see module docstring).

    node_costs[v][p]: cost of node v in strategy p (inf = forbidden). edges: (u, v, R) with
    R[p, q] the resharding cost (inf = forbidden pair); parallel edges add up. With both
    node_mem and mem_budget, sum_v node_mem[v][choice[v]] <= mem_budget (held to the
    solver's feasibility tolerance, 1e-9 of the budget; node_mem alone is ignored).

    backend: "highs" (PuLP's HiGHS API, highspy), "cbc" (PuLP's bundled CBC, or a cbc on
    PATH), "auto" (highs, else cbc). mip_gap: relative optimality gap at which the solver
    may stop; the status is still "optimal". The time limit covers the whole call; a
    time-out returns the best feasible choice found (the solver's incumbent or a local-search
    one, whichever is cheaper) with status "feasible_time_limit", or
    "no_solution_time_limit" when neither exists; it never raises. objective is always
    recomputed from the arguments for the returned choice.
    """
    t0 = time.perf_counter()
    _check_limits(time_limit_s, mip_gap)
    costs, edge_list, mem, budget = _validate(node_costs, edges, node_mem, mem_budget)
    return _solve_valid(t0, costs, edge_list, mem, budget, time_limit_s, backend, mip_gap)


def solve_built_ilp(node_costs: list[np.ndarray], edges: list[tuple[int, int, np.ndarray]],
                    *, time_limit_s: float = 30.0, backend: str = "highs") -> ILPResult:
    """solve_sharding_ilp without a memory budget, for arrays the planner built itself
    (StageProblem.ilp_arrays): 1-D float64 cost vectors and (int, int, R) edges with R of
    shape (len(node_costs[u]), len(node_costs[v])), which _validate would hand back as they
    are. Only their values are checked here, in one pass (a NaN or -inf goes on to
    solve_sharding_ilp, which reports it item by item); the result is solve_sharding_ilp's."""
    t0 = time.perf_counter()
    _check_limits(time_limit_s, 0.0)
    if _bad_values([*node_costs, *(r for _, _, r in edges)]):
        return solve_sharding_ilp(node_costs, edges, time_limit_s=time_limit_s, backend=backend)
    return _solve_valid(t0, node_costs, edges, None, None, time_limit_s, backend, 0.0)


def _check_limits(time_limit_s: float, mip_gap: float) -> None:
    if not (time_limit_s > 0):
        raise ValueError(f"time_limit_s must be > 0, got {time_limit_s}")
    if not (0.0 <= mip_gap < 1.0):
        raise ValueError(f"mip_gap must be in [0, 1), got {mip_gap}")


def _solve_valid(t0: float, costs, edge_list, mem, budget, time_limit_s: float, backend: str,
                 mip_gap: float) -> ILPResult:
    """solve_sharding_ilp on validated arrays (_validate's output)."""
    with_mem = budget is not None
    n_var0, n_con0 = _naive_size(costs, edge_list, with_mem)
    pulp = _pulp()
    backend_name, solver = None, None

    def result(choice, status, n_var=0, n_con=0):
        if choice is None:
            objective = math.inf
        else:
            choice = np.asarray(choice, dtype=np.int64)
            objective = _evaluate(costs, edge_list, choice)
        return ILPResult(choice, objective, status, time.perf_counter() - t0, n_var, n_con,
                         n_var0, n_con0, backend_name or backend)

    # Resolve the backend first so that a missing solver is reported even on easy inputs.
    backend_name = _resolve_backend(pulp, backend)

    # A problem that shrinking alone decides has one answer whatever the backend's limits;
    # planners pose the same one again (another entry layout with equal costs), so such
    # answers are remembered by the arrays' exact bytes.
    key, key_bytes = _content_key(backend_name, costs, edge_list, mem if with_mem else None, budget)
    hit = _DECIDED.get(key)
    if hit is not None:
        return result(None if hit[0] is None else hit[0].copy(), hit[1])

    def decided(choice, status):
        global _DECIDED_BYTES
        if _DECIDED_BYTES + key_bytes > _DECIDED_MAX_BYTES:
            _DECIDED.clear()
            _DECIDED_BYTES = 0
        if key_bytes <= _DECIDED_MAX_BYTES // 64:      # a whole model's problem is not kept
            _DECIDED[key] = (None if choice is None else choice.copy(), status)
            _DECIDED_BYTES += key_bytes
        return result(choice, status)

    red = _Reduced(costs, edge_list, mem, budget)
    red.run()
    if red.infeasible:
        return decided(None, "infeasible")
    model = _build_model(red)
    n_var, n_con = model.n_vars, len(model.row_idx)
    choice = red.fixed.copy()
    if n_var == 0:
        red.back_substitute(choice)
        if with_mem and _memory(mem, choice) > budget:
            return decided(None, "infeasible")
        return decided(choice, "optimal")

    _scale(model)
    remaining_s = max(time_limit_s - (time.perf_counter() - t0), 1e-3)
    _, solver = _make_solver(pulp, backend, remaining_s, mip_gap)
    status, picked = _solve_with_pulp(pulp, model, solver)
    if picked is not None:
        for v, p in picked.items():
            choice[v] = p
        red.back_substitute(choice)
        if not np.isfinite(_evaluate(costs, edge_list, choice)):
            raise RuntimeError("internal error: the ILP picked a forbidden strategy pair")
    if status in ("feasible_time_limit", "no_solution_time_limit"):
        fallback = _local_search(costs, edge_list, mem, budget)
        if fallback is not None and (
                picked is None
                or _evaluate(costs, edge_list, fallback) < _evaluate(costs, edge_list, choice)):
            choice, picked, status = fallback, {}, "feasible_time_limit"
    if picked is None:
        return result(None, status, n_var, n_con)
    return result(choice, status, n_var, n_con)


def solve_brute_force(node_costs: Sequence[np.ndarray],
                      edges: Sequence[tuple[int, int, np.ndarray]],
                      node_mem: Sequence[np.ndarray] | None = None,
                      mem_budget: float | None = None) -> ILPResult:
    """Exhaustive oracle over every combination of allowed strategies (small inputs only).
    Ties go to the lexicographically first choice."""
    t0 = time.perf_counter()
    costs, edge_list, mem, budget = _validate(node_costs, edges, node_mem, mem_budget)
    with_mem = budget is not None
    n_var0, n_con0 = _naive_size(costs, edge_list, with_mem)
    allowed = [np.flatnonzero(np.isfinite(c)) for c in costs]
    n_combos = math.prod(a.size for a in allowed)
    if n_combos > 20_000_000:
        raise ValueError(f"brute force over {n_combos} combinations is too large")
    best_val, best = math.inf, None
    combos = itertools.product(*[a.tolist() for a in allowed])
    while n_combos:
        chunk = np.array(list(itertools.islice(combos, 1 << 16)), dtype=np.int64)
        if chunk.size == 0:
            break
        chunk = chunk.reshape(-1, len(costs))
        total = np.zeros(chunk.shape[0])
        for v, c in enumerate(costs):
            total += c[chunk[:, v]]
        for u, v, r in edge_list:
            total += r[chunk[:, u], chunk[:, v]]
        if with_mem:
            used = np.zeros(chunk.shape[0])
            for v, m in enumerate(mem):
                used += m[chunk[:, v]]
            total[~(used <= budget)] = np.inf
        k = int(np.argmin(total))
        if total[k] < best_val:
            best_val, best = float(total[k]), chunk[k].copy()
    status = "optimal" if best is not None else "infeasible"
    return ILPResult(best, best_val, status, time.perf_counter() - t0, n_var0, n_con0,
                     n_var0, n_con0, "brute_force")
