"""Timings of the solvers on synthetic instances of the sizes the planner produces.

    python bench/bench_solvers.py            # everything (~1-2 min on a laptop-class CPU)
    python bench/bench_solvers.py ilp        # one part: ilp | stage | chain | cluster

The instances are synthetic. "layout" ILPs mimic sharding: each strategy has an output and
an input layout (4 kinds), resharding cost depends only on the layout pair (0 on a match),
and sharder strategies cost less compute and memory. "dense" ILPs draw every cost uniformly:
the hardest case for the MIP, far from what the planner sees. Stage-DP "layered" costs grow
with the layers in the stage and shrink with the devices, and a stage that holds too many
layers per device at its 1F1B depth does not fit (inf).
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

import solvers.ilp as ilp
from solvers.chain import chain_min_plus
from solvers.clustering import cluster_ops
from solvers.stage_dp import stage_dp


# ---------------------------------------------------------------------------------- ILP
def layout_ilp(rng, n=30, p=16, n_edges=40):
    shard = np.array([1.0, 2.0, 2.0, 4.0])
    conv = rng.uniform(0.5, 2.0, (4, 4))
    np.fill_diagonal(conv, 0.0)
    out_l = [rng.integers(0, 4, p) for _ in range(n)]
    in_l = [rng.integers(0, 4, p) for _ in range(n)]
    costs, mem = [], []
    for v in range(n):
        work, size = rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5)
        costs.append(work / shard[out_l[v]] * rng.uniform(0.9, 1.1, p)
                     + 0.2 * (out_l[v] != in_l[v]))
        mem.append(size / shard[in_l[v]])
    pairs = [(i, i + 1) for i in range(n - 1)]  # a chain with residual-style skips
    while len(pairs) < n_edges:
        u = int(rng.integers(0, n - 2))
        pairs.append((u, int(rng.integers(u + 2, min(n, u + 6)))))
    edges = [(u, v, rng.uniform(0.1, 1.0) * conv[out_l[u][:, None], in_l[v][None, :]])
             for u, v in pairs]
    return costs, edges, mem


def dense_ilp(rng, n=30, p=16, n_edges=40):
    costs = [rng.random(p) for _ in range(n)]
    edges = []
    for _ in range(n_edges):
        u, v = rng.choice(n, 2, replace=False)
        edges.append((int(u), int(v), rng.random((p, p))))
    return costs, edges, [rng.random(p) for _ in range(n)]


class _Timer:
    """Splits an ILP call into shrinking + PuLP model building, and HiGHS's own run."""

    def __init__(self):
        self.solver_s = 0.0
        self._orig = ilp._fast_highs_class

    def __enter__(self):
        timer, orig = self, self._orig

        def patched(base):
            cls = orig(base)

            class Timed(cls):
                def callSolver(self, lp):
                    t0 = time.perf_counter()
                    super().callSolver(lp)
                    timer.solver_s += time.perf_counter() - t0

            return Timed

        ilp._fast_highs_class = patched
        return self

    def __exit__(self, *exc):
        ilp._fast_highs_class = self._orig


def bench_ilp():
    print("== sharding ILP (solve_sharding_ilp, HiGHS via PuLP) ==")
    ilp.solve_sharding_ilp([np.zeros(2), np.zeros(2)], [(0, 1, np.eye(2))])  # import/warm-up
    cases = [
        ("layout 30x16, 40 edges, no memory", layout_ilp, {}, False, "highs"),
        ("layout 30x16, 40 edges, memory", layout_ilp, {}, True, "highs"),
        ("layout 30x16, 40 edges, memory, CBC", layout_ilp, {}, True, "cbc"),
        ("dense 30x16, 40 edges, no memory", dense_ilp, {}, False, "highs"),
        ("dense 30x16, 40 edges, memory", dense_ilp, {}, True, "highs"),
        ("layout 15x8, 20 edges, memory", layout_ilp, dict(n=15, p=8, n_edges=20), True, "highs"),
        ("layout 120x25, 200 edges, memory", layout_ilp, dict(n=120, p=25, n_edges=200), True,
         "highs"),
    ]
    n_rep = 8
    for name, gen, kw, with_mem, backend in cases:
        if backend not in ilp.available_backends():
            print(f"  {name:40s} skipped: backend {backend} not available")
            continue
        rng = np.random.default_rng(0)
        times, solver, statuses, sizes = [], [], [], []
        reps = 3 if kw.get("n", 30) > 60 else n_rep
        for _ in range(reps):
            costs, edges, mem = gen(rng, **kw)
            budget = 0.8 * sum(float(m.mean()) for m in mem) if with_mem else None
            with _Timer() as t:
                res = ilp.solve_sharding_ilp(costs, edges, mem if with_mem else None, budget,
                                             backend=backend)
            times.append(res.solve_time_s)
            solver.append(t.solver_s)
            statuses.append(res.status)
            sizes.append((res.n_variables_before, res.n_variables))
        med = statistics.median(times)
        ours = statistics.median(a - b for a, b in zip(times, solver)) if backend == "highs" \
            else float("nan")
        print(f"  {name:40s} median {med * 1e3:7.1f} ms  max {max(times) * 1e3:7.1f} ms  "
              f"(outside the solver run: median {ours * 1e3:5.1f} ms)  "
              f"vars {sizes[0][0]} -> {statistics.median(s[1] for s in sizes):.0f} (median)  "
              f"{dict((s, statuses.count(s)) for s in set(statuses))}")


# ---------------------------------------------------------------------------- stage DP
def layered_stage_cost(rng, n_layers, sizes, s_max, layers_per_device=4.0):
    n = np.asarray(sizes, dtype=float)
    work = np.concatenate([[0.0], np.cumsum(rng.uniform(0.5, 1.5, n_layers))])
    i = np.arange(n_layers)[:, None]
    j = np.arange(n_layers + 1)[None, :]
    span = work[None, :] - work[:n_layers, None]
    cost = np.full((n_layers, n_layers + 1, n.size, s_max + 1), np.inf)
    for m in range(n.size):
        base = span / n[m] * (1 + 0.08 * np.log2(n[m]))
        for s in range(1, s_max + 1):
            t = base * rng.uniform(0.95, 1.05, base.shape)
            # weights + s microbatches of activations per device must fit
            t[(j <= i) | ((j - i) * (1.0 + 0.15 * s) / n[m] > layers_per_device)] = np.inf
            cost[:, :, m, s] = t
    return cost


def uniform_stage_cost(rng, n_layers, sizes, s_max):
    cost = rng.random((n_layers, n_layers + 1, len(sizes), s_max + 1))
    cost[rng.random(cost.shape) < 0.3] = np.inf
    return cost


def bench_stage():
    print("== inter-op stage DP (stage_dp) ==")
    p64 = [1, 2, 4, 8, 16, 32, 64]
    p1024 = [2 ** k for k in range(11)]
    cases = [
        (96, 64, p64, 16, 32, "layered"), (96, 64, p64, 16, 4, "layered"),
        (96, 64, p64, 16, 32, "uniform"),
        (98, 1024, p1024, 16, 64, "layered"), (98, 1024, p1024, 32, 64, "layered"),
        (98, 1024, p1024, 16, 64, "uniform"),
    ]
    for n_layers, n_dev, sizes, s_max, b, kind in cases:
        rng = np.random.default_rng(0)
        gen = layered_stage_cost if kind == "layered" else uniform_stage_cost
        cost = gen(rng, n_layers, sizes, s_max)
        res = stage_dp(cost, sizes, n_dev, b)
        print(f"  L={n_layers:3d} D={n_dev:5d} M={len(sizes):2d} S={s_max:2d} B={b:3d} "
              f"{kind:8s}: {res.solve_time_s:6.2f} s  DP solves {res.n_tmax_tried:3d}  "
              f"stages {len(res.stages):2d}  T {res.total_s:.4g}")


# ------------------------------------------------------------------- chain, clustering
def bench_chain():
    print("== chain_min_plus ==")
    rng = np.random.default_rng(0)
    first, layer = rng.random(16), rng.random((16, 16))
    t0 = time.perf_counter()
    for _ in range(100):
        chain_min_plus(first, layer, 100)
    print(f"  P=16, k=100: {(time.perf_counter() - t0) * 10:.2f} ms per call")


def bench_cluster():
    print("== cluster_ops ==")
    rng = np.random.default_rng(0)
    for n_ops, k in [(3000, 96), (10000, 96)]:
        flops = np.tile(rng.random(30) * 1e9, n_ops // 30)
        cuts = np.tile(np.r_[1e6, rng.random(29) * 1e8 + 2e6], n_ops // 30)
        t0 = time.perf_counter()
        cluster_ops(flops, cuts, k)
        print(f"  {n_ops} ops into {k} layers: {(time.perf_counter() - t0) * 1e3:.1f} ms")


def main(argv):
    parts = {"ilp": bench_ilp, "stage": bench_stage, "chain": bench_chain,
             "cluster": bench_cluster}
    wanted = argv or list(parts)
    for name in wanted:
        if name not in parts:
            raise SystemExit(f"unknown part {name!r}; choose from {sorted(parts)}")
        parts[name]()


if __name__ == "__main__":
    main(sys.argv[1:])
