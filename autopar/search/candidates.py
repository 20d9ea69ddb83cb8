"""What the planner simulates: plan candidates, microbatch sizes, and device placement.

The DP's closed form ranks pipelines only approximately (the simulator sees fill, drain and
transfers exactly), so the search proposes several candidates and the evaluator picks:
  - the DP's optimum at each bound on the number of stages (dp_candidates);
  - equal-layer slicings at every pipeline depth with one logical mesh for all stages, the
    shapes of hand-made 3D plans, each stage's layout, recompute and sharding still
    ILP-optimal (uniform_candidates), and the same as Megatron's interleaved 1F1B with two
    chunks of layers per GPU (interleaved_candidates);
  - each DP optimum interleaved: its stages' device groups (of any sizes) and layer counts
    kept, each group's layers cut into two chunks, one in each pass of the model
    (interleaved_dp_candidates).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from autopar.costmodel.eager import stage_allocatable_bytes
from autopar.costmodel.memory import inflight
from autopar.evaluation.baselines import split_blocks
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.specs import Cluster
from autopar.plan import PlanError, StagePlan
from autopar.search.layer_solver import LayerSolver, StartLayout
from autopar.search.range_table import RECOMPUTE_OPTIONS, RangeTable
from autopar.search.tables import SearchSpace, StageChoice, StageTables, sharded_storage_set, storage_cost_lower_bound
from autopar.sharding.rules.attention import cp_of
from autopar.sharding.spec import spec_str
from graphs.ir import OpGraph
from solvers.stage_dp import stage_dp_bounds

__all__ = ["DP_DEPTH_BOUNDS", "Candidate", "auto_label", "dp_candidates", "interleaved_candidates",
           "interleaved_dp_candidates",
           "microbatch_candidates", "microbatch_neighbours", "place", "stage_plans", "uniform_candidates", "unique"]

# Bounds on the number of stages at which the DP's optimum becomes a candidate (and the
# largest allowed, max_stages).
DP_DEPTH_BOUNDS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Candidate:
    """One plan to simulate. stages[k] = (first layer, end layer, submesh index) and
    choices[k] are stage (chunk) k in pipeline order; chunk k runs on pipeline rank k % depth."""

    stages: tuple[tuple[int, int, int], ...]
    choices: tuple[StageChoice, ...]
    stage_time_s: tuple[float, ...]   # per stage: forward + backward (+ recompute) per microbatch
    stage_sync_s: tuple[float, ...]   # per stage: gradient sync per step
    dp_total_s: float            # the DP's closed-form step time, which orders the simulations
    origin: str                  # "dp" (an optimum of the stage DP), "equal" (an equal-layer slicing), or
                                 # either with sharded storage: "dp-storage", "equal-storage"
    chunks: int = 1              # per pipeline rank: > 1 is interleaved 1F1B

    @property
    def depth(self) -> int:
        """Pipeline ranks."""
        return len(self.stages) // self.chunks

    def step_lower_bound_s(self, n_microbatches: int) -> float:
        """No schedule ends before its busiest rank has run the forward and backward of every
        microbatch on each of its chunks: a lower bound on the simulated step time, given that
        a stage costs what its layers cost (layer composition). The gradient syncs are left
        out: the layers' share of them (evaluator.grad_sync_step_s) estimates the sync's
        buckets beside the backward, and is not a bound on what the evaluator exposes."""
        d = self.depth
        return max(n_microbatches * sum(self.stage_time_s[r::d]) for r in range(d))

    @property
    def key(self) -> tuple:
        """Two candidates with one key are one plan. A DP optimum's choices follow from its
        slicing; equal-layer slicings differ by their logical meshes and chunks too, and the
        first one found is kept (a free choice of layouts before all-stages-alike)."""
        if self.origin == "dp":
            return ("dp", self.stages)
        if self.origin == "dp-storage":
            return (self.origin, self.stages, self.choices)
        return (self.origin, self.stages, tuple(c.logical_mesh for c in self.choices), self.chunks)


def unique(candidates: Iterable[Candidate]) -> list[Candidate]:
    """The first candidate of each key, in order."""
    seen: set[tuple] = set()
    out = []
    for c in candidates:
        if c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out


def dp_candidates(tables: StageTables, cost: np.ndarray, extra: np.ndarray, subs: list[Submesh],
                  origin: str = "dp") -> list[Candidate]:
    """The stage DP's optimum at each bound on the number of stages (DP_DEPTH_BOUNDS below
    max_stages, and max_stages), each slicing once; `origin` "dp-storage" for the tables with
    sharded storage (StageTables.with_sharded_storage), whose choices tell them apart."""
    sp = tables.space
    S = sp.max_stages
    out = []
    bounds = sorted({S} | {d for d in DP_DEPTH_BOUNDS if d < S})
    for r in stage_dp_bounds(cost, [s.n_devices for s in subs], sp.n_gpus, sp.n_microbatches, bounds, extra):
        if math.isfinite(r.total_s):
            n = len(r.stages)
            cells = [tables.cell(i, j, mi, n - k) for k, (i, j, mi) in enumerate(r.stages)]
            out.append(Candidate(tuple(r.stages),
                                 tuple(tables.choice(i, j, mi, n - k) for k, (i, j, mi) in enumerate(r.stages)),
                                 tuple(float(c["t_s"]) for c in cells), tuple(float(c["sync_s"]) for c in cells),
                                 r.total_s, origin))
    return unique(out)


# A stage's sharded-storage menu (StorageItems): per group it may store sharded, (layer offset
# in the stage, position of the group's root in that layer, seconds added per microbatch, bytes
# added per device, < 0); given (first layer, end layer, start index) of a range table.
StorageItems = Callable[[int, int, int], tuple[tuple[int, int, float, float], ...]]


def uniform_candidates(rt: RangeTable, submesh_index: int, sub: Submesh, logical_mesh: tuple[int, int],
                       space: SearchSpace, p2p_s: np.ndarray, storage: StorageItems | None = None) -> list[Candidate]:
    """Equal-layer pipelines whose stages all use this submesh and logical mesh, at the depth
    that fills the cluster: per stage the start layout and recompute minimising its share of
    the step, once freely and once with every stage entered in the layout the first emits.
    With `storage`, only the pipelines where some stage also stores parameter groups sharded
    (origin "equal-storage"; _equal_split)."""
    return _equal_split(rt, submesh_index, sub, logical_mesh, space, p2p_s, chunks=1, storage=storage)


def interleaved_candidates(rt: RangeTable, submesh_index: int, sub: Submesh, logical_mesh: tuple[int, int],
                           space: SearchSpace, p2p_s: np.ndarray, storage: StorageItems | None = None) -> list[Candidate]:
    """uniform_candidates as Megatron's interleaved 1F1B: two chunks of layers per GPU, chunk g
    on rank g % depth, a rank's chunks choosing their options together so that they fit in its
    GPU's memory together. Offered under 1F1B when the depth is at least 2, divides the number
    of microbatches (the schedule needs it) and leaves a block per chunk. `storage`: as in
    uniform_candidates."""
    return _equal_split(rt, submesh_index, sub, logical_mesh, space, p2p_s, chunks=2, storage=storage)


# Whether _equal_split reads a chunk's options once for both its passes (False: once per pass,
# as before: the oracle of tests/unit/test_speed_h10_equal_split.py)
REUSE_OPTIONS = True


def _follows(starts: list[StartLayout]) -> np.ndarray:
    """follows[p0, p]: start p enters its chunk (after the first) in the layout start p0's chunk
    emits (layers of one shape on one mesh emit the layout they are entered in): starts[p] ==
    StartLayout(starts[p0].spec, seq_split=starts[p0].seq_split), by numbering the (spec,
    seq_split) pairs of the starts not at the embedding (the others equal no such layout)
    instead of comparing P^2 dataclasses."""
    ids: dict[tuple, int] = {}
    own = np.array([ids.setdefault((q.spec, q.seq_split), len(ids)) if not q.at_embedding else -1 for q in starts])
    wanted = np.array([ids.get((q.spec, q.seq_split), -2) for q in starts])
    return wanted[:, None] == own[None, :]


def equal_split_depth(n_gpus: int, sub_devices: int, n_layers: int, max_stages: int, n_microbatches: int,
                      schedule: str, chunks: int) -> int | None:
    """The pipeline depth of the equal-layer slicing with `chunks` chunks per rank on
    submeshes of `sub_devices` GPUs (n_gpus // sub_devices ranks), or None where the planner
    offers none: the ranks do not tile the cluster, exceed the stages allowed, or (interleaved)
    the schedule, the microbatches or the layers do not allow `chunks` chunks per rank."""
    if n_gpus % sub_devices:
        return None
    depth = n_gpus // sub_devices
    if depth > min(max_stages, max(1, n_layers - 2)):
        return None
    if chunks > 1 and not (schedule == "1f1b" and depth >= 2 and n_microbatches % depth == 0
                           and chunks * depth <= n_layers - 2):
        return None
    return depth


def _equal_split(rt: RangeTable, mi: int, sub: Submesh, logical_mesh: tuple[int, int], space: SearchSpace,
                 p2p_s: np.ndarray, chunks: int, storage: StorageItems | None = None) -> list[Candidate]:
    """With `storage`, a rank's chunks may also store parameter groups sharded (ZeRO-1/2 stages):
    a joint option recomputing nothing, over the rank's memory cap, faster (by its key) than
    the best that fits, takes the cheapest set of the chunks' groups that brings it under the cap (the covering
    knapsack of tables.sharded_storage_set, each group's seconds weighted by its chunk's slots
    in the key: exact for the options' strategies, as in StageTables.with_sharded_storage), and
    wins where that is still faster. Only pipelines where some chunk stores a group sharded come
    back: those without are the candidates without `storage`, which the planner keeps."""
    L, B, schedule = space.n_layers, space.n_microbatches, space.schedule
    depth = equal_split_depth(space.n_gpus, sub.n_devices, L, space.max_stages, B, schedule, chunks)
    if depth is None:
        return []
    if chunks > 1:
        ranges = split_blocks(L, depth * chunks)
    else:
        ranges = split_blocks(L, depth) if L > 2 else [(0, L)]

    P = len(rt.starts)
    recompute_full = RECOMPUTE_OPTIONS.index("full")

    def options(g: int, i: int, j: int) -> tuple[np.ndarray, ...]:
        """(key, memory, t, sync, gradient pool, loss peak, absent state, held state) of every
        option for chunk g on [i, j): its share of the step, its bytes on the GPU, and what its
        cap depends on (RangeTable.cap_bytes; 0 where the table has none). Option q recomputes
        the chunk's first q // P layers (0: none, all: full) and starts in layout q % P."""
        s = depth - g % depth
        held = inflight("interleaved", g % depth, depth, B, chunks) if chunks > 1 else inflight(schedule, g, depth, B)
        k = np.arange(j - i + 1)
        t = rt.layers_time_s(i, j, k).ravel()
        mem = rt.layers_memory_bytes(i, j, k, held).ravel()
        sync = np.tile(rt.sync[i, j], j - i + 1)
        def each(row: np.ndarray | None) -> np.ndarray:
            return np.tile(row[i, j], j - i + 1) if row is not None else np.zeros_like(t)

        held_state = rt.param[i, j] + (rt.tied_grad[i, j] if rt.tied_grad is not None else 0.0)
        return ((B + s - 1) * t + sync, mem, t, sync, each(rt.pool), each(rt.loss), each(rt.absent),
                np.tile(held_state, j - i + 1))

    def along(c: int, x: np.ndarray) -> np.ndarray:
        """x over one chunk's options, on axis c of the rank's joint (chunks-dimensional) options."""
        return x.reshape((1,) * c + (-1,) + (1,) * (chunks - 1 - c))

    follows = _follows(rt.starts)
    everywhere = np.ones(P, bool)
    def chunk_slots(g: int) -> int:
        return B + depth - g % depth - 1

    sets: dict[tuple, tuple[int, ...] | None] = {}
    items_of: dict[tuple[int, int], tuple[tuple[int, int, float, float], ...]] = {}

    def sharded(gs, opts, key, mem, cap, ok_but_memory, best_key: float):
        """The best joint option storing some groups sharded whose key beats `best_key`:
        (flat index, key, per chunk (seconds added, (layer offset, root position) pairs)), or None."""
        assert storage is not None
        # options recomputing nothing (the first P of each chunk), as in the stage tables
        no_recompute = np.zeros(key.shape, bool)
        no_recompute[(slice(0, P),) * len(gs)] = True
        try_at = np.flatnonzero((ok_but_memory & no_recompute & (mem > cap)
                                 & (key < best_key)).ravel())
        found = None
        for flat in try_at[np.argsort(key.ravel()[try_at], kind="stable")]:
            if key.flat[flat] >= best_key:
                break                           # storage only adds time: no later option can win
            qs = np.unravel_index(flat, key.shape)
            items = []
            for c, (g, q) in enumerate(zip(gs, qs)):
                i, j = ranges[g]
                p = int(q) % P
                menu = items_of.get((g, p))
                if menu is None:
                    menu = items_of[(g, p)] = storage(i, j, p)
                items += [(c, off, pos, dt, dm) for off, pos, dt, dm in menu]
            excess = float(mem.flat[flat]) - float(cap.flat[flat])
            mk = (tuple((chunk_slots(gs[it[0]]), it[3], it[4]) for it in items), excess)
            if not items or key.flat[flat] + storage_cost_lower_bound(
                    [w * dt for w, dt, _ in mk[0]], [-dm for _, _, dm in mk[0]], excess) >= best_key:
                continue                            # cannot win (exact: the bound is below every set)
            if mk not in sets:
                sets[mk] = sharded_storage_set([w * dt for w, dt, _ in mk[0]], [-dm for _, _, dm in mk[0]], excess) \
                    if items and -sum(it[4] for it in items) >= excess else None
            sel = sets[mk]
            if sel is None:
                continue
            k_new = float(key.flat[flat]) + sum(mk[0][x][0] * mk[0][x][1] for x in sel)
            if k_new < best_key:
                best_key = k_new
                per_chunk = [(sum(items[x][3] for x in sel if items[x][0] == c),
                              tuple(sorted((items[x][1], items[x][2]) for x in sel if items[x][0] == c)))
                             for c in range(len(gs))]
                found = (int(flat), k_new, per_chunk)
        return found

    # A chunk's options depend on its index and layers only, so both passes below read the same.
    known: dict[int, tuple[np.ndarray, ...]] = {}

    def options_of(g: int) -> tuple[np.ndarray, ...]:
        hit = known.get(g) if REUSE_OPTIONS else None
        if hit is None:
            hit = known[g] = options(g, *ranges[g])
        return hit

    out = []
    for same_layout in (False, True):
        picked: dict[int, tuple[int, float, float]] = {}   # chunk -> (option, t, sync)
        stored: dict[int, tuple[tuple[int, int], ...]] = {}  # chunk -> its groups stored sharded
        allowed = everywhere                               # over start layouts
        for r in range(depth):
            # A rank's chunks share its GPU: their options are chosen together, under one memory
            # cap on the sum of their bytes (the evaluator's per-GPU peak sums the chunks' stashes
            # and held state; summing their working sets too errs on the safe side).
            gs = range(r, len(ranges), depth)
            opts = [options_of(g) for g in gs]
            key = sum(along(c, o[0]) for c, o in enumerate(opts))
            mem = sum(along(c, o[1]) for c, o in enumerate(opts))
            # the GPU's cap: its chunks' gradient pools, absent and held state added, its largest
            # loss segment (evaluate's per-GPU peak; RangeTable.cap_bytes for one chunk)
            if rt.pool is not None and rt.loss is not None:
                summed = [functools.reduce(np.add, [along(c, o[x]) for c, o in enumerate(opts)]) for x in (4, 6, 7)]
                cap = np.broadcast_to(stage_allocatable_bytes(
                    space.memory_cap_bytes, summed[0],
                    functools.reduce(np.maximum, [along(c, o[5]) for c, o in enumerate(opts)]),
                    summed[1], summed[2]), np.shape(mem))
            else:
                cap = np.full(np.shape(mem), space.memory_cap_bytes)
            ok = np.ones(np.shape(mem), bool)
            starts_of = [np.arange(len(o[0])) % P for o in opts]
            for c in range(chunks):
                ok = ok & along(c, allowed[starts_of[c]])
            if r == 0 and same_layout:
                # Megatron's shape: every later chunk receives the layout the first one emits
                for c in range(1, chunks):
                    pair = follows[starts_of[0][:, None], starts_of[c][None, :]]
                    ok = ok & pair.reshape((len(starts_of[0]),) + (1,) * (c - 1) + (len(starts_of[c]),)
                                           + (1,) * (chunks - 1 - c))
            raw_key = key
            key = np.where(ok & (mem <= cap), key, np.inf)
            flat = int(key.argmin())
            best = float(key.flat[flat])
            added = [0.0] * len(gs)
            if storage is not None:
                found = sharded(gs, opts, raw_key, mem, cap, ok, best)
                if found is not None:
                    flat, best = found[0], found[1]
                    added = [a for a, _ in found[2]]
                    stored.update({g: roots for g, (_, roots) in zip(gs, found[2]) if roots})
            if not math.isfinite(best):
                break
            for c, (g, q) in enumerate(zip(gs, np.unravel_index(flat, key.shape))):
                picked[g] = (int(q), float(opts[c][2][q]) + added[c], float(opts[c][3][q]))
            if r == 0 and same_layout:
                allowed = follows[picked[0][0] % P]
        else:
            if storage is not None and not stored:
                continue                        # the candidate without storage (docstring)
            stages = [(i, j, mi) for i, j in ranges]
            qs = [picked[g] for g in range(len(ranges))]
            choices = []
            for g, ((i, j), (opt, _, _)) in enumerate(zip(ranges, qs)):
                k = opt // P
                choices.append(StageChoice(logical_mesh, rt.starts[opt % P],
                                           RECOMPUTE_OPTIONS[recompute_full if k else 0], k if 0 < k < j - i else None,
                                           stored.get(g, ())))
            ts = [t for _, t, _ in qs]
            syncs = [sync for _, _, sync in qs]
            out.append(Candidate(tuple(stages), tuple(choices), tuple(ts), tuple(syncs),
                                 _pipeline_total_s(ts, syncs, [float(p2p_s[j]) for _, j in ranges], depth, B, chunks),
                                 "equal" if storage is None else "equal-storage", chunks))
    return out


def interleaved_dp_candidates(tables: StageTables, dp: list[Candidate], p2p_s: np.ndarray,
                              subs: list[Submesh], chunks: int = 2) -> list[Candidate]:
    """Each DP optimum (its stages' submeshes of any sizes, its uneven layer counts) as
    interleaved 1F1B: stage r's device group keeps its layers' count, cut into `chunks` near
    equal chunks, chunk c of group r the (c * depth + r)-th of the pipeline, so the c-th pass
    of the model holds part c of every group's layers. A chunk takes the tables' best option
    for its layers with the microbatches its rank holds under the interleaved schedule
    (memory.inflight, rounded up; the evaluator then checks the rank's chunks together).
    Offered under 1F1B when the depth is at least 2, divides the number of microbatches and
    leaves every group a layer per chunk, and only where every group has the same device count:
    interleaving over groups of different sizes runs on runtime.pipeline.P2PPipeline, exact on
    gloo but not yet run on NCCL, where messages between two ranks match in issue order and a
    send may wait for the peer's receive, so `autopar run` refuses it on CUDA and the planner
    does not emit what cannot run there."""
    sp = tables.space
    B, S = sp.n_microbatches, sp.max_stages
    out = []
    for cand in dp:
        depth = cand.depth
        sizes = [j - i for i, j, _ in cand.stages]
        if not (sp.schedule == "1f1b" and cand.chunks == 1 and depth >= 2 and B % depth == 0
                and min(sizes) >= chunks and len({subs[mi].n_devices for _, _, mi in cand.stages}) == 1):
            continue
        parts = [[j - i for i, j in split_blocks(n, chunks)] for n in sizes]
        stages, choices, ts, syncs, p2ps = [], [], [], [], []
        start = 0
        for g in range(depth * chunks):
            c, r = divmod(g, depth)
            mi = cand.stages[r][2]
            i, j = start, start + parts[r][c]
            start = j
            held = min(S, max(1, math.ceil(inflight("interleaved", r, depth, B, chunks))))
            cell = tables.cell(i, j, mi, held)
            if not math.isfinite(float(cell["t_s"])):
                break
            stages.append((i, j, mi))
            choices.append(tables.choice(i, j, mi, held))
            ts.append(float(cell["t_s"]))
            syncs.append(float(cell["sync_s"]))
            p2ps.append(float(p2p_s[mi, j]))
        else:
            out.append(Candidate(tuple(stages), tuple(choices), tuple(ts), tuple(syncs),
                                 _pipeline_total_s(ts, syncs, p2ps, depth, B, chunks), "dp-interleaved", chunks))
    return unique(out)


def _pipeline_total_s(ts: list[float], syncs: list[float], p2p_out_s: list[float], depth: int, B: int,
                      chunks: int) -> float:
    """The DP's formula for a pipeline of `depth` ranks, chunk k on rank k % depth (p2p_out_s[k]:
    one transfer out of chunk k): 1F1B's (B - 1 + depth) periods of the slowest rank, where
    interleaving shrinks the fill and drain to (depth - 1) / chunks of them, plus every
    stage's sync and transfers once; each chunk's transfers also take their share of the
    steady-state period, as in StageTables.dp_inputs."""
    period_s = [t + 2 * p / max(1, min(depth - k % depth, B)) for k, (p, t) in enumerate(zip(p2p_out_s, ts))]
    per_rank = [sum(period_s[r::depth]) for r in range(depth)]
    return (B + (depth - 1) / chunks) * max(per_rank) + sum(syncs) + sum(2 * p for p in p2p_out_s)


def stage_plans(cand: Candidate, graph: OpGraph, solver: LayerSolver, subs: list[Submesh],
                cluster: Cluster) -> list[StagePlan]:
    """The candidate's stages placed on the cluster, each op with its ILP-optimal strategy."""
    n = cand.depth
    rank_ids = place([(i, j, subs[mi]) for (i, j, mi) in cand.stages[:n]], cluster)
    stages = []
    for k, ((i, j, mi), choice) in enumerate(zip(cand.stages, cand.choices)):
        mesh = Mesh(cluster, subs[mi], choice.logical_mesh)
        strategies: dict[str, str] = {}
        for li, sol in solver.walk((i, j), mesh, choice.start):
            nodes = graph.layers[li].nodes
            for pos, name in sol.names.items():
                strategies[nodes[pos]] = name
        stages.append(StagePlan(index=k, layers=(i, j), layer_names=[graph.layers[x].name for x in range(i, j)],
                                submesh=(subs[mi].n_nodes, subs[mi].gpus_per_node), device_ids=rank_ids[k % n],
                                logical_mesh=choice.logical_mesh, strategies=strategies,
                                # () : the first layer reads no earlier tensor (its stage's input, if
                                # any, skips it and arrives replicated: "")
                                input_spec="" if i == 0 or not choice.start.spec else spec_str(choice.start.spec),
                                recompute=choice.recompute, recompute_layers=choice.recompute_layers,
                                sharded_storage=sorted(graph.layers[i + off].nodes[pos]
                                                       for off, pos in choice.sharded_storage)))
    return stages


def _cp_label(st: StagePlan) -> str:
    """"+cp4" where the stage's attention splits the sequence over 4 GPUs (context parallelism)."""
    sizes = set()
    for name in st.strategies.values():
        cp = cp_of(name)
        if cp is not None:
            sizes.add(math.prod(n for k, n in enumerate(st.logical_mesh) if cp[0] & (1 << k)))
    return "".join(f"+cp{n}" for n in sorted(sizes))


def _rc_label(st: StagePlan) -> str:
    """"+rc" for a stage recomputing, "+rc3/7" where it recomputes its first 3 of 7 layers."""
    if st.recompute == "none":
        return ""
    if st.recompute == "full" and st.recompute_layers is not None:
        return f"+rc{st.recompute_layers}/{st.layers[1] - st.layers[0]}"
    return "+rc"


def auto_label(stages: list[StagePlan], chunks: int = 1) -> str:
    """e.g. "8 stages: 7L@2x4, 6L@2x4 x6, 7L@2x4" (layers @ logical mesh, +rc = recompute, +rc3/7 =
    the first 3 of 7 layers recomputed, +cpN = attention split over the sequence on N GPUs), or
    "4 ranks x 2 chunks, interleaved: ..." """
    parts = [f"{s.layers[1] - s.layers[0]}L@{s.logical_mesh[0]}x{s.logical_mesh[1]}" + _cp_label(s)
             + _rc_label(s) for s in stages]
    runs: list[list] = []
    for p in parts:
        if runs and runs[-1][0] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    shapes = ", ".join(p if n == 1 else f"{p} x{n}" for p, n in runs)
    if chunks > 1:
        return f"{len(stages) // chunks} ranks x {chunks} chunks, interleaved: {shapes}"
    return f"{len(stages)} stage{'s' if len(stages) > 1 else ''}: {shapes}"


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


def microbatch_neighbours(best_size: int, global_batch: int, done: set[int]) -> list[int]:
    """Second-round sizes: half and double the best first-round size, where they divide the
    global batch and were not searched yet."""
    halves = [best_size // 2] if best_size % 2 == 0 else []
    return [m for m in halves + [best_size * 2] if global_batch % m == 0 and m not in done]


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
