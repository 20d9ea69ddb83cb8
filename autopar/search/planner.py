"""The auto planner: intra-op ILPs per distinct layer, composed into stage tables, and the
inter-op stage DP over (layer ranges x submeshes) — DESIGN §2, §5-§7.

Layer composition. Followers share their leader's layout, so a block whose only activation
input is the residual stream maps an input layout p to an output layout f(p) at an ILP-optimal
cost C(p). A range of layers entered in layout p costs C_i(p) + C_{i+1}(f_i(p)) + ..., exactly
what one ILP over the whole range finds (tests check this), but every distinct
(layer, mesh, layout) is solved once however many layers share it.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autopar.costmodel.compute import ComputeModel
from autopar.costmodel.memory import inflight as inflight_microbatches
from autopar.evaluation.evaluator import evaluate
from autopar.hardware.mesh import Mesh, Submesh, submeshes
from autopar.hardware.presets import load_cluster
from autopar.hardware.specs import Cluster
from autopar.model import ModelSource
from autopar.plan import Plan, PlanError, StagePlan
from autopar.sharding.spec import Spec, is_valid, shard_factor, spec_str
from autopar.sharding.stage_problem import Settings, StageProblem
from graphs.ir import OpGraph
from graphs.query import main_boundary

RECOMPUTE_OPTIONS = ("none", "full")


@dataclass
class LayerSol:
    """An ILP-optimal layer for one (mesh, input layout)."""

    t_s: float                   # forward + backward per microbatch
    fwd_s: float
    sync_s: float                # per step
    param_bytes: float           # weights + grads + optimizer state per device (at the plan's ZeRO)
    param_elems: float
    stash_bytes: float           # per microbatch
    input_bytes: float           # local bytes of the layer's input (kept under full recompute)
    out_spec: Spec | None
    names: dict[int, str]        # position in layer -> strategy name (decision roots)
    status: str
    objective: float


@dataclass
class SearchStats:
    ilps: int = 0
    cache_hits: int = 0
    ilp_time_s: float = 0.0
    trace_time_s: float = 0.0
    table_time_s: float = 0.0
    dp_time_s: float = 0.0
    eval_time_s: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    ilp_vars_before: int = 0
    ilp_vars_after: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def merge(self, other: SearchStats) -> None:
        for k, v in other.__dict__.items():
            if k == "statuses":
                for s, n in v.items():
                    self.statuses[s] = self.statuses.get(s, 0) + n
            else:
                setattr(self, k, getattr(self, k) + v)


def boundary_specs(shape: tuple[int, ...], mesh: Mesh) -> list[Spec]:
    """Layouts a layer boundary tensor may take: replicated, or its batch and/or last (hidden)
    dim split over the mesh axes."""
    nd = len(shape)
    if nd == 0:
        return [()]
    dims = [0] if nd == 1 else [0, nd - 1]
    out = []
    live = mesh.live_axes
    for combo in itertools.product([None] + dims, repeat=len(live)):
        spec = [0] * nd
        for bit, d in zip(live, combo):
            if d is not None:
                spec[d] |= bit
        spec = tuple(spec)
        if (not any(spec) or is_valid(spec, shape, mesh)) and spec not in out:
            out.append(spec)
    return out


class LayerSolver:
    """Solves and caches one layer's ILP per (structure, mesh, input layout)."""

    def __init__(self, graph: OpGraph, cm: ComputeModel, settings: Settings, stats: SearchStats,
                 time_limit_s: float, backend: str, only_names: frozenset[str] | None = None):
        self.only_names = only_names
        self.graph, self.cm, self.settings, self.stats = graph, cm, settings, stats
        self.time_limit_s, self.backend = time_limit_s, backend
        self.cache: dict[tuple, LayerSol] = {}
        n = len(graph.layers)
        self.inputs = [main_boundary(graph, list(graph.layers[i].nodes)) for i in range(n)]
        self.outputs = [self.inputs[i + 1] if i + 1 < n else None for i in range(n)]

    def key(self, li: int, mesh: Mesh, spec: Spec | None, restrict: Spec | None) -> tuple:
        return (self.graph.layers[li].structural_hash, mesh.submesh, mesh.shape, spec, restrict,
                self.outputs[li] is None)

    def solve(self, li: int, mesh: Mesh, spec: Spec | None, restrict: Spec | None = None) -> LayerSol:
        k = self.key(li, mesh, spec, restrict)
        hit = self.cache.get(k)
        if hit is not None:
            self.stats.cache_hits += 1
            return hit
        layer = self.graph.layers[li]
        names = list(layer.nodes)
        src = self.inputs[li]
        out = self.outputs[li]
        boundary = {src: spec} if src is not None and spec is not None else {}
        t0 = time.perf_counter()
        prob = StageProblem(self.graph, names, mesh, self.cm, boundary=boundary,
                            restrict_out={out: restrict} if (restrict is not None and out is not None) else None,
                            only_names=self.only_names)
        res = prob.solve(self.settings, time_limit_s=self.time_limit_s, backend=self.backend)
        self.stats.ilps += 1
        self.stats.ilp_time_s += time.perf_counter() - t0
        self.stats.statuses[res.status] = self.stats.statuses.get(res.status, 0) + 1
        self.stats.ilp_vars_before += res.n_variables_before
        self.stats.ilp_vars_after += res.n_variables
        if res.choice is None:
            sol = LayerSol(math.inf, math.inf, 0, math.inf, 0, math.inf, 0, None, {}, res.status, math.inf)
        else:
            ev = prob.evaluate(res.choice, self.settings)
            assign = prob.assignment(res.choice)
            pos = {n: i for i, n in enumerate(names)}
            chosen = {pos[g.root]: g.strategies[g.root][int(res.choice[gi])].name
                      for gi, g in enumerate(prob.groups) if len(g.strategies[g.root]) > 1 or g.root in pos}
            out_spec = prob.strategy_of(out, assign[out]).out_spec if out is not None else None
            in_bytes = 0.0
            if src is not None:
                in_bytes = self.graph.node(src).out_bytes / (shard_factor(spec, mesh) if spec else 1)
            sol = LayerSol(ev.per_microbatch_s, ev.recompute_fwd_s, ev.sync_s,
                           ev.param_state_bytes(self.settings.zero), ev.param_elems, ev.stash_bytes, in_bytes,
                           out_spec, chosen, res.status, res.objective)
        self.cache[k] = sol
        return sol


@dataclass
class RangeTable:
    """Per (start layer i, end j) on one mesh: the best-by-time start layout's figures."""

    t: np.ndarray            # [L, L+1, P] per microbatch
    rec: np.ndarray          # recompute forward
    sync: np.ndarray
    param: np.ndarray
    stash: np.ndarray
    inputs: np.ndarray       # sum of layer inputs (full recompute stash)
    max_layer_stash: np.ndarray
    starts: list             # start layout per P index (spec or ("embed", q))


def range_table(solver: LayerSolver, mesh: Mesh) -> RangeTable:
    """Figures of every layer range [i, j) entered in every start layout, from the layer
    solutions: a suffix recursion over (layer, layout) states, so each state's layer is looked
    up once and a range's sums are array slices."""
    g = solver.graph
    L = len(g.layers)
    first_in = solver.inputs[1] if L > 1 else None
    shape = g.node(first_in).out_shape if first_in else ()
    specs = boundary_specs(shape, mesh)
    starts: list = [("embed", q) for q in specs] + list(specs)
    P = len(starts)
    K = 7   # t, rec, sync, param, stash, inputs, max layer stash
    tab = np.full((K, L, L + 1, P), np.inf)
    suffix: dict[tuple, np.ndarray] = {}

    def chain(li: int, spec, restrict) -> np.ndarray:
        """(K, L - li) figures of ranges [li, j) for j = li+1..L entered at state (li, spec)."""
        key = (li, spec, restrict)
        hit = suffix.get(key)
        if hit is not None:
            return hit
        # walk forward to the end (or a dead end), then fold back: no deep recursion
        path, cur, r = [], (li, spec), restrict
        while True:
            l, sp = cur
            sol = solver.solve(l, mesh, None, restrict=r) if l == 0 else solver.solve(l, mesh, sp)
            path.append((l, sp, r, sol))
            if not math.isfinite(sol.t_s) or l + 1 >= L or sol.out_spec is None:
                break
            nxt = (l + 1, sol.out_spec, None)
            if nxt in suffix:
                break
            cur, r = (l + 1, sol.out_spec), None
        tail = None
        last_l, _, _, last_sol = path[-1]
        if math.isfinite(last_sol.t_s) and last_l + 1 < L and last_sol.out_spec is not None:
            tail = suffix[(last_l + 1, last_sol.out_spec, None)]
        for l, sp, r, sol in reversed(path):
            n = L - l
            arr = np.full((K, n), np.inf)
            if math.isfinite(sol.t_s):
                v = np.array([sol.t_s, sol.fwd_s, sol.sync_s, sol.param_bytes, sol.stash_bytes, sol.input_bytes,
                              sol.stash_bytes])
                arr[:, 0] = v
                if tail is not None:
                    m = tail.shape[1]
                    arr[:6, 1:1 + m] = v[:6, None] + tail[:6]
                    arr[6, 1:1 + m] = np.maximum(v[6], tail[6])
            suffix[(l, sp, r)] = arr
            tail = arr
        return suffix[key]

    for pi, start in enumerate(starts):
        if isinstance(start, tuple) and start and start[0] == "embed":
            tab[:, 0, 1:, pi] = chain(0, None, start[1])
        else:
            for i in range(1, L):
                tab[:, i, i + 1:, pi] = chain(i, start, None)
    return RangeTable(tab[0], tab[1], tab[2], tab[3], tab[4], tab[5], tab[6], starts)


def _uniform_candidates(rt: RangeTable, sub: Submesh, mi: int, shape, cl: Cluster, L: int, S: int, B: int,
                        schedule: str, mem_cap: float) -> list[tuple]:
    """Equal-layer pipelines of every depth whose stages all use this submesh and logical
    mesh: per stage the start layout and recompute minimising its share of the step."""
    from autopar.evaluation.baselines import split_blocks
    out = []
    if cl.n_gpus % sub.n_devices:
        return out
    depth = cl.n_gpus // sub.n_devices
    if depth > min(S, max(1, L - 2)):
        return out
    ranges = split_blocks(L, depth) if L > 2 else [(0, L)]

    def pick(k, i, j, allowed, v=1):
        s = depth - k
        if v > 1:
            # interleaved: the rank's v chunks share the GPU, each holding its share of the
            # (warm-up + 1) chunk-microbatches in flight
            inflight, cap = inflight_microbatches("interleaved", k, depth, B, v), mem_cap / v
        else:
            inflight, cap = (min(s, B) if schedule == "1f1b" else B), mem_cap
        best = None
        for rc in RECOMPUTE_OPTIONS:
            t = rt.t[i, j] + (rt.rec[i, j] if rc == "full" else 0.0)
            mem = rt.param[i, j] + (inflight * rt.inputs[i, j] + rt.max_layer_stash[i, j] if rc == "full"
                                    else inflight * rt.stash[i, j])
            key = np.where((mem <= cap) & allowed, (B + s - 1) * t + rt.sync[i, j], np.inf)
            p = int(key.argmin())
            if math.isfinite(key[p]) and (best is None or key[p] < best[0]):
                best = (key[p], p, rc, float(t[p]), float(rt.sync[i, j, p]))
        return best

    everywhere = np.ones(len(rt.starts), bool)
    # v = 2: Megatron's interleaved 1F1B, two chunks of layers per GPU (chunk g on rank g % depth)
    virtuals = [1] + ([2] if schedule == "1f1b" and depth >= 2 and B % depth == 0 and 2 * depth <= L - 2 else [])
    for v in virtuals:
        chunks = split_blocks(L, depth * v) if v > 1 else ranges
        for same_layout in (False, True):
            stages, choices, ts, syncs = [], [], [], []
            layout = None
            for g, (i, j) in enumerate(chunks):
                allowed = everywhere
                if same_layout and g > 0:
                    # Megatron's shape: every stage receives the layout the first stage emits
                    allowed = np.array([st == layout for st in rt.starts])
                best = pick(g % depth, i, j, allowed, v)
                if best is None:
                    break
                _, p, rc, t, sync = best
                if g == 0:
                    start = rt.starts[p]
                    layout = start[1] if isinstance(start, tuple) and start and start[0] == "embed" else start
                stages.append((i, j, mi))
                choices.append((shape, rt.starts[p], rc))
                ts.append(t)
                syncs.append(sync)
            else:
                out.append((stages, choices, ts, syncs, v))
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def microbatch_candidates(global_batch: int, n_gpus: int, microbatches: str | int) -> list[int]:
    """First-round microbatch sizes (batch of one pipeline microbatch) to search: every other
    power of two dividing the global batch (1, 4, 16, ...), and the global batch itself; the
    planner then tries the neighbours of the best. A given count of microbatches is used as is."""
    if microbatches != "auto":
        try:
            k = int(microbatches)
        except ValueError:
            raise PlanError(f"--microbatches must be 'auto' or a number (got {microbatches!r})") from None
        if k < 1 or global_batch % k:
            ok = _divisors(global_batch)
            raise PlanError(f"--microbatches {k} does not divide the global batch {global_batch}; "
                            f"valid counts: {ok[:20]}{' ...' if len(ok) > 20 else ''}")
        return [global_batch // k]
    sizes = [d for d in _divisors(global_batch) if d & (d - 1) == 0]
    coarse = sizes[::2]
    if sizes[-1] not in coarse:
        coarse.append(sizes[-1])
    return coarse


def _neighbours(best_mb: int, global_batch: int, done: set[int]) -> list[int]:
    cands = [best_mb // 2] if best_mb % 2 == 0 else []
    return [m for m in cands + [best_mb * 2] if global_batch % m == 0 and m not in done]


def place(stages: list[tuple[int, int, Submesh]], cluster: Cluster) -> list[list[int]]:
    """Concrete device ids for each stage's submesh: whole-node submeshes take whole nodes,
    the (1, 2^k) ones are packed into the rest largest first, each on aligned slots — powers
    of two summing to the free capacity always pack."""
    m = cluster.gpus_per_node
    free_nodes = list(range(cluster.n_nodes))
    ids: list[list[int] | None] = [None] * len(stages)
    for si, (_, _, sub) in enumerate(stages):
        if sub.n_nodes > 1 or sub.gpus_per_node == m:
            take, free_nodes = free_nodes[: sub.n_nodes], free_nodes[sub.n_nodes:]
            ids[si] = [n * m + k for n in take for k in range(m)]
    used = {n: [False] * m for n in free_nodes}
    order = sorted((si for si in range(len(stages)) if ids[si] is None), key=lambda si: -stages[si][2].n_devices)
    for si in order:
        size = stages[si][2].n_devices
        for n in free_nodes:
            slot = next((s for s in range(0, m, size) if not any(used[n][s:s + size])), None)
            if slot is not None:
                for k in range(slot, slot + size):
                    used[n][k] = True
                ids[si] = [n * m + k for k in range(slot, slot + size)]
                break
        if ids[si] is None:
            raise PlanError("could not place the stages' submeshes on the cluster (internal error)")
    return ids  # type: ignore[return-value]


def plan(model: Any, cluster: str | Cluster = "p3.16xlarge", *, nodes: int | None = None,
         gpus_per_node: int | None = None, global_batch: int | None = None, microbatches: str | int = "auto",
         schedule: str = "1f1b", max_stages: int | None = None, dtype: str | None = None, zero: int = 1,
         seq: int | None = None, time_limit_s: float = 10.0, backend: str = "highs",
         progress: bool = False, intra: str = "ilp", workers: int | None = None) -> Plan:
    """Search the best (stage, submesh, logical mesh, sharding) plan; returns it evaluated.

    Each candidate microbatch size is an independent search (its own trace, ILPs and DP); they
    run in `workers` processes (default: one per CPU core). intra="dp" restricts every stage to
    plain data parallelism (Alpa's inter-only ablation)."""
    if intra not in ("ilp", "dp"):
        raise PlanError(f"intra must be 'ilp' or 'dp' (got {intra!r})")
    if schedule not in ("1f1b", "gpipe"):
        raise PlanError(f"the planner's DP models 1f1b and gpipe schedules (got {schedule!r})")
    if zero not in (0, 1, 2, 3):
        raise PlanError(f"zero must be 0, 1, 2 or 3 (got {zero!r})")
    cl = load_cluster(cluster, nodes, gpus_per_node) if not isinstance(cluster, Cluster) else cluster
    dtype = cl.gpu.training_dtype(dtype)
    source = model if isinstance(model, ModelSource) else ModelSource(model, seq=seq, dtype=dtype)
    gb = global_batch or default_global_batch(cl)
    if gb < 1:
        raise PlanError(f"global batch must be >= 1 (got {gb})")
    if source.fixed_batch and gb % source.fixed_batch:
        raise PlanError(f"global batch {gb} is not a multiple of the traced microbatch {source.fixed_batch}")
    sizes = [source.fixed_batch] if source.fixed_batch else microbatch_candidates(gb, cl.n_gpus, microbatches)
    job = _Job(source, cl, gb, schedule, max_stages, dtype, zero, time_limit_s, backend, intra)
    n_workers = max(1, min(len(sizes), workers or os.cpu_count() or 1))
    bar = _Progress(progress, len(sizes) + (2 if microbatches == "auto" and not source.fixed_batch else 0))
    results = _run_searches(job, sizes, n_workers, bar)
    if microbatches == "auto" and not source.fixed_batch:
        # second round: the neighbours of the best first-round size
        scored = [(r[0].predicted["step_time_s"], r[3]["microbatch_size"]) for r in results if r[0] is not None]
        if scored:
            more = _neighbours(min(scored)[1], gb, set(sizes))
            results += _run_searches(job, more, max(1, min(len(more), n_workers)), bar)
    bar.close()
    stats = SearchStats()
    best, least_mem, tried = None, math.inf, []
    for p, st, lm, row in results:
        stats.merge(st)
        least_mem = min(least_mem, lm)
        tried.append(row)
        if p is not None and (best is None or _rank(p) < _rank(best)):
            best = p
    if best is None:
        raise PlanError(no_fit_message(source, cl, least_mem, gb))
    counts = stats.to_dict()
    best.timing = {k: counts.pop(k) for k in list(counts) if k.endswith("_time_s")}
    best.search = {**counts, "microbatch_candidates": tried}
    return best


_JOB = None


def _run_searches(job: _Job, sizes: list[int], n_workers: int, bar) -> list:
    results = []
    if n_workers > 1 and _can_fork():
        import concurrent.futures as cf
        import multiprocessing as mp
        global _JOB
        _JOB = job          # inherited by the forked workers, never pickled
        try:
            with cf.ProcessPoolExecutor(n_workers, mp_context=mp.get_context("fork")) as pool:
                for r in pool.map(_search_job, sizes):
                    results.append(r)
                    bar.advance_batch()
        finally:
            _JOB = None
    else:
        for mb in sizes:
            results.append(job.search(mb))
            bar.advance_batch()
    return results


def _search_job(mb: int):
    return _JOB.search(mb)


def _can_fork() -> bool:
    import multiprocessing as mp
    return "fork" in mp.get_all_start_methods()


@dataclass
class _Job:
    """One planning problem; `search(mb)` does everything for one microbatch size."""

    source: ModelSource
    cl: Cluster
    gb: int
    schedule: str
    max_stages: int | None
    dtype: str
    zero: int
    time_limit_s: float
    backend: str
    intra: str

    def search(self, mb: int):
        cl, schedule, zero = self.cl, self.schedule, self.zero
        stats = SearchStats()
        least_mem = math.inf
        cm = ComputeModel(cl.gpu, self.dtype)
        subs = submeshes(cl)
        only = frozenset({"R", "b@0"}) if self.intra == "dp" else None
        t0 = time.perf_counter()
        graph = self.source.graph(mb)
        stats.trace_time_s += time.perf_counter() - t0
        B = self.gb // mb
        settings = Settings(n_microbatches=B, zero=zero)
        solver = LayerSolver(graph, cm, settings, stats, self.time_limit_s, self.backend, only)
        t0 = time.perf_counter()
        L = len(graph.layers)
        S = min(self.max_stages or L, L, cl.n_gpus)
        cost = np.full((L, L + 1, len(subs), S + 1), np.inf)
        extra = np.zeros((L, L + 1, len(subs)))
        # argmin bookkeeping per (i, j, submesh, s): which logical mesh, start layout, recompute
        arg_mesh = np.full((L, L + 1, len(subs), S + 1), -1)
        arg_start = np.zeros((L, L + 1, len(subs), S + 1), dtype=np.int64)
        arg_rc = np.zeros((L, L + 1, len(subs), S + 1), dtype=np.int64)
        sync_s = np.zeros((L, L + 1, len(subs), S + 1))
        uniform: list[tuple] = []        # (stages, per-stage choices, t per stage, sync per stage)
        best_key = np.full((L, L + 1, len(subs), S + 1), np.inf)
        meshes: list[tuple] = []
        mem_cap = cl.gpu.memory_bytes
        for mi, sub in enumerate(subs):
            for shape in (sub.logical_meshes() if self.intra == "ilp" else [(sub.n_devices, 1)]):
                mesh = Mesh(cl, sub, shape)
                rt = range_table(solver, mesh)
                meshes.append((shape, rt.starts))
                mesh_id = len(meshes) - 1
                uniform.extend(_uniform_candidates(rt, sub, mi, shape, cl, L, S, B, schedule, mem_cap))
                for rci, rc in enumerate(RECOMPUTE_OPTIONS):
                    t = rt.t + (rt.rec if rc == "full" else 0.0)
                    for s in range(1, S + 1):
                        inflight = min(s, B) if schedule == "1f1b" else B
                        if rc == "full":
                            mem = rt.param + inflight * rt.inputs + rt.max_layer_stash
                        else:
                            mem = rt.param + inflight * rt.stash
                        finite = mem[np.isfinite(mem)]
                        if finite.size:
                            least_mem = min(least_mem, float(finite.min()))
                        tt = np.where(mem <= mem_cap, t, np.inf)
                        # An option's share of the step: its microbatches plus the pipeline's
                        # fill and drain (B + s - 1 slots for a stage s from the end, as in
                        # (p - 1 + m) of 1F1B), plus its gradient sync.
                        key = (B + s - 1) * tt + rt.sync
                        pbest = key.argmin(axis=2)
                        kbest = np.take_along_axis(key, pbest[..., None], axis=2)[..., 0]
                        tbest = np.take_along_axis(tt, pbest[..., None], axis=2)[..., 0]
                        better = kbest < best_key[:, :, mi, s]
                        if better.any():
                            best_key[:, :, mi, s] = np.where(better, kbest, best_key[:, :, mi, s])
                            cost[:, :, mi, s] = np.where(better, tbest, cost[:, :, mi, s])
                            arg_mesh[:, :, mi, s] = np.where(better, mesh_id, arg_mesh[:, :, mi, s])
                            arg_start[:, :, mi, s] = np.where(better, pbest, arg_start[:, :, mi, s])
                            arg_rc[:, :, mi, s] = np.where(better, rci, arg_rc[:, :, mi, s])
                            # Gradient sync runs after a stage's last backward. Whether the
                            # earlier stages' remaining backwards hide it depends on the whole
                            # pipeline, which the DP does not see: it charges every stage's
                            # sync once (an upper bound) and the simulator ranks candidates.
                            sync = np.take_along_axis(rt.sync, pbest[..., None], axis=2)[..., 0]
                            sync_s[:, :, mi, s] = np.where(better, sync, sync_s[:, :, mi, s])

        # Point-to-point: a stage ending before the last layer sends its output forward and
        # receives its gradient back, every microbatch. The transfers do not occupy the stage,
        # but they lengthen the pipeline's fill and drain (counted once, like the sync) and
        # the round trip that 1F1B's s microbatches in flight must cover (a share 2*p2p/s of
        # each steady-state period). The neighbour's placement is not known yet: across nodes
        # if the cluster has several.
        link_bw, link_lat = ((cl.inter_link.bandwidth_bytes_per_s / cl.gpus_per_node, cl.inter_link.latency_s)
                             if cl.n_nodes > 1 else (cl.intra_link.bandwidth_bytes_per_s, cl.intra_link.latency_s))
        out_bytes = np.array([graph.node(solver.inputs[j]).out_bytes if j < L and solver.inputs[j] else 0.0
                              for j in range(L + 1)])
        in_flight = np.minimum(np.arange(S + 1), B).clip(min=1) if schedule == "1f1b" else np.full(S + 1, B)
        p2p_of = {}
        for mi, sub in enumerate(subs):
            p2p = np.where(out_bytes > 0, link_lat + out_bytes / (link_bw * sub.n_devices), 0.0)
            p2p_of[mi] = p2p
            extra[:, :, mi] += 2 * p2p[None, :]
            cost[:, :, mi, :] += 2 * p2p[None, :, None] / in_flight[None, None, :]

        # stage_extra has no depth index: take each range's sync at its deepest feasible depth
        # (the largest, so still an upper bound).
        extra += np.where(np.isfinite(cost), sync_s, 0.0).max(axis=3)

        def choice_of(i, j, mi, s):
            shape, starts = meshes[arg_mesh[i, j, mi, s]]
            return shape, starts[arg_start[i, j, mi, s]], RECOMPUTE_OPTIONS[arg_rc[i, j, mi, s]]
        stats.table_time_s += time.perf_counter() - t0

        from solvers.stage_dp import stage_dp
        t0 = time.perf_counter()
        # The DP's closed form ranks pipelines only approximately (the simulator sees fill,
        # drain and transfers exactly), so the best slicing at each bound on the number of
        # stages is a candidate, and the evaluator picks among those the DP rates close.
        sols = {}
        depths = sorted({S} | {d for d in (1, 2, 4, 8, 16, 32, 64) if d < S})
        for depth in depths:
            r = stage_dp(cost, [s.n_devices for s in subs], cl.n_gpus, B, stage_extra=extra, max_stages=depth)
            if math.isfinite(r.total_s):
                sols.setdefault(tuple(r.stages), r)
        # Equal-layer slicings at every pipeline depth with one logical mesh for all stages
        # (the shapes of hand-made 3D plans), each stage's layout, recompute and sharding
        # still ILP-optimal: scored by the DP's formula here, by the simulator below.
        from solvers.stage_dp import StageDPResult
        forced: dict[tuple, list] = {}
        virtual: dict[tuple, int] = {}
        for stages, choices, ts, syncs, v in uniform:
            mi = stages[0][2]
            depth = len(stages) // v
            ts = [t + 2 * float(p2p_of[mi][j]) / max(1, min(depth - k % depth, B))
                  for k, ((i, j, _), t) in enumerate(zip(stages, ts))]
            per_rank = [sum(ts[r::depth]) for r in range(depth)]
            # 1F1B: (B - 1 + depth) periods of the slowest rank; interleaving shrinks the fill
            # and drain to (depth - 1) / v of them.
            total = (B + (depth - 1) / v) * max(per_rank) + sum(syncs) + \
                sum(2 * float(p2p_of[mi][j]) for _, j, _ in stages)
            key = tuple(stages) + tuple(c[0] for c in choices) + (v,)
            if key not in sols:
                sols[key] = StageDPResult(total, list(stages), ts, max(ts), 0, 0.0)
                forced[key] = choices
                virtual[key] = v
        stats.dp_time_s += time.perf_counter() - t0
        best_dp = min((r.total_s for r in sols.values()), default=math.inf)
        row = {"microbatch_size": mb, "n_microbatches": B, "dp_total_s": best_dp}
        if not math.isfinite(best_dp):
            return None, stats, least_mem, row
        t0 = time.perf_counter()
        best = None
        for key, r in sorted(sols.items(), key=lambda kr: kr[1].total_s):
            if r.total_s > 1.5 * best_dp:
                break
            chooser = choice_of
            if key in forced:
                chooser = (lambda ch: (lambda i, j, mi, s, _c={(st[0], st[1]): c for st, c in zip(r.stages, ch)}:
                                       _c[(i, j)]))(forced[key])
            p = _build_plan(self.source, graph, cl, solver, r, chooser, subs, self.gb, mb, schedule, zero,
                            self.dtype, virtual.get(key, 1))
            if best is None or _rank(p) < _rank(best):
                best = p
        stats.eval_time_s += time.perf_counter() - t0
        row["candidates_evaluated"] = sum(1 for r in sols.values() if r.total_s <= 1.5 * best_dp)
        row["candidates"] = len(sols)
        row["predicted_step_time_s"] = best.predicted["step_time_s"]
        if not best.predicted["fits"]:
            return None, stats, least_mem, row
        return best, stats, least_mem, row


def _rank(p: Plan) -> tuple:
    """Plans that fit first, then the fastest."""
    return (not p.predicted["fits"], p.predicted["step_time_s"])


def _build_plan(source, graph, cl, solver, dp, choice_of, subs, gb, mb, schedule, zero, dtype,
                virtual: int = 1) -> Plan:
    n = len(dp.stages) // virtual            # pipeline ranks; chunk k runs on rank k % n
    ranks = [(i, j, subs[mi]) for (i, j, mi) in dp.stages[:n]]
    rank_ids = place(ranks, cl)
    ids = [rank_ids[k % n] for k in range(len(dp.stages))]
    stages = []
    for k, (i, j, mi) in enumerate(dp.stages):
        shape, start, rc = choice_of(i, j, mi, n - k % n)
        sub = subs[mi]
        mesh = Mesh(cl, sub, shape)
        strategies: dict[str, str] = {}
        spec = start[1] if i == 0 else start
        input_spec = "" if i == 0 else spec_str(spec)
        for li in range(i, j):
            sol = solver.solve(li, mesh, None, restrict=spec) if li == 0 else solver.solve(li, mesh, spec)
            nodes = graph.layers[li].nodes
            for pos, name in sol.names.items():
                strategies[nodes[pos]] = name
            spec = sol.out_spec if sol.out_spec is not None else spec
        stages.append(StagePlan(index=k, layers=(i, j), layer_names=[graph.layers[x].name for x in range(i, j)],
                                submesh=(sub.n_nodes, sub.gpus_per_node), device_ids=ids[k], logical_mesh=shape,
                                strategies=strategies, input_spec=input_spec, recompute=rc))
    from autopar.evaluation.baselines import _model_dict, cluster_dict
    label = _auto_label(stages)
    if virtual > 1:
        label = f"{n} ranks x {virtual} chunks, interleaved: " + label.split(": ", 1)[1]
    p = Plan(strategy="auto", config={"kind": "auto", "label": label},
             model=_model_dict(source, graph), cluster=cluster_dict(cl),
             training={"global_batch": gb, "microbatch_size": mb, "n_microbatches": gb // mb, "dtype": dtype,
                       "schedule": "interleaved" if virtual > 1 else schedule, "virtual_stages": virtual,
                       "zero": zero,
                       "optimizer": "adam-mixed-precision"},
             stages=stages)
    return evaluate(p, graph, cl)


def _auto_label(stages: list[StagePlan]) -> str:
    """e.g. "8 stages: 7L@2x4, 6L@2x4 x6, 7L@2x4" (layers @ logical mesh, +rc = recompute)."""
    parts = [f"{s.layers[1] - s.layers[0]}L@{s.logical_mesh[0]}x{s.logical_mesh[1]}"
             + ("+rc" if s.recompute != "none" else "") for s in stages]
    runs: list[list] = []
    for p in parts:
        if runs and runs[-1][0] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return f"{len(stages)} stage{'s' if len(stages) > 1 else ''}: " + ", ".join(
        p if n == 1 else f"{p} x{n}" for p, n in runs)


def default_global_batch(cluster: Cluster) -> int:
    return max(8, 16 * cluster.n_gpus) if cluster.n_gpus > 1 else 16


def no_fit_message(source, cl: Cluster, least_mem: float, gb: int) -> str:
    need = f"{least_mem / 2**30:.1f} GiB" if math.isfinite(least_mem) else "more than any stage can hold"
    return (f"no plan for {source.name} fits in {cl.gpu.memory_bytes / 2**30:.0f} GiB per GPU on {cl.n_gpus} "
            f"{cl.gpu.name} GPUs: the least memory per device any stage needs is {need}. What would help: more "
            f"GPUs (--nodes), a smaller microbatch (--microbatches with more microbatches), or a GPU with more "
            f"memory; recomputation and ZeRO sharding were already considered.")


class _Progress:
    def __init__(self, enabled: bool, n_batches: int):
        self.enabled = enabled
        self.p = None
        if enabled:
            from rich.progress import Progress
            self.p = Progress(transient=True)
            self.p.start()
            self.task = self.p.add_task("planning", total=n_batches)

    def advance_batch(self):
        if self.p:
            self.p.advance(self.task)

    def close(self):
        if self.p:
            self.p.stop()


@dataclass
class StageSolution:
    strategies: dict[str, str]         # decision op -> strategy name
    input_spec: Spec | None            # layout the stage's input arrives in (None: the stage starts the model)
    objective_s: float                 # ILP objective summed over layers (per microbatch, sync amortised)
    stats: SearchStats


def solve_stage(graph: OpGraph, layers: tuple[int, int], mesh: Mesh, cm: ComputeModel, settings: Settings,
                input_spec: Spec | None = None, time_limit_s: float = 30.0, backend: str = "highs") -> StageSolution:
    """The intra-op optimum of one stage, solving each distinct (layer, layout) once and
    composing along the chain of layers. With `input_spec` None the best entry layout is chosen."""
    i, j = layers
    stats = SearchStats()
    solver = LayerSolver(graph, cm, settings, stats, time_limit_s, backend)
    first_in = solver.inputs[max(i, 1)] if len(graph.layers) > 1 else None
    shape = graph.node(first_in).out_shape if first_in else ()
    if i == 0:
        candidates = [("embed", q) for q in boundary_specs(shape, mesh)]
    else:
        candidates = [input_spec] if input_spec is not None else boundary_specs(shape, mesh)
    best = None
    for start in candidates:
        total, spec, names = 0.0, (start[1] if i == 0 else start), {}
        for li in range(i, j):
            sol = solver.solve(0, mesh, None, restrict=spec) if li == 0 else solver.solve(li, mesh, spec)
            if not math.isfinite(sol.objective):
                total = math.inf
                break
            total += sol.objective
            nodes = graph.layers[li].nodes
            names.update({nodes[p]: n for p, n in sol.names.items()})
            spec = sol.out_spec if sol.out_spec is not None else spec
        if best is None or total < best[0]:
            best = (total, start, names)
    total, start, names = best
    return StageSolution(names, None if i == 0 else start, total, stats)
