"""The stage DP's tables: per cell (first layer i, end layer j, submesh m, stages s from this one
to the end) the best way to run layers [i, j) as one stage on submesh m, over every logical mesh,
start layout and recompute option, and the arrays solvers.stage_dp reads."""

from __future__ import annotations

import copy
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from autopar.costmodel.memory import inflight
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.specs import Cluster
from autopar.search.layer_solver import LayerSolver, StartLayout
from autopar.search.range_table import RECOMPUTE_OPTIONS, RangeTable
from graphs.ir import OpGraph

__all__ = ["CELL", "SearchSpace", "StageChoice", "StageTables", "boundary_p2p_s", "distinct_ranges", "range_classes",
           "sharded_storage_set", "storage_items"]


@dataclass(frozen=True)
class SearchSpace:
    """The pipeline being searched for one microbatch size."""

    n_layers: int
    max_stages: int
    n_microbatches: int
    n_gpus: int
    schedule: str                # "1f1b" or "gpipe"
    memory_cap_bytes: float      # per GPU


@dataclass(frozen=True)
class StageChoice:
    """What a stage runs with, besides its layers and submesh."""

    logical_mesh: tuple[int, int]
    start: StartLayout
    recompute: str               # one of RECOMPUTE_OPTIONS
    # with "full": how many of the stage's first layers are recomputed, the rest keeping their
    # activations (Megatron's --recompute-method block); None: all of them
    recompute_layers: int | None = None
    # the groups whose parameters are stored sharded in a ZeRO-1/2 stage, as (layer offset in
    # the stage, position of the group's root in that layer) (StageTables.with_sharded_storage)
    sharded_storage: tuple[tuple[int, int], ...] = ()


# One record per cell. key_s ranks the options of a cell: a stage's share of the step, its
# microbatches plus the pipeline's fill and drain (B + s - 1 slots for a stage s from the end,
# as in (p - 1 + m) of 1F1B), plus its gradient sync. t_s is what the DP sums (per microbatch);
# mesh indexes StageTables.meshes, start that mesh's start layouts, recompute RECOMPUTE_OPTIONS;
# recompute_layers is the k of a stage recomputing its first k layers only (0: all or none).
# storage indexes StageTables.storage_sets (-1: every parameter at the plan's ZeRO level).
CELL = np.dtype([("key_s", "f8"), ("t_s", "f8"), ("sync_s", "f8"), ("mesh", "i8"), ("start", "i8"),
                 ("recompute", "i8"), ("recompute_layers", "i8"), ("storage", "i8")])


class StageTables:
    """Filled one logical mesh at a time (`add`); `choice` reads a cell back as a StageChoice
    and `dp_inputs` gives stage_dp its cost and extra arrays.

    Cells are kept per range class (range_classes): ranges of one class have equal figures on
    every mesh, so a model of identical blocks has O(L) classes where it has O(L^2) ranges."""

    def __init__(self, space: SearchSpace, n_submeshes: int, range_class: np.ndarray | None = None,
                 layer_recompute: bool = True):
        """`layer_recompute` False offers only none and full recomputation per stage (the space
        before per-layer recomputation)."""
        self.space = space
        self.layer_recompute = layer_recompute
        L, S = space.n_layers, space.max_stages
        if range_class is None:
            range_class = distinct_ranges(L)
        if range_class.shape != (L, L + 1):
            raise ValueError(f"range_class must have shape (L, L+1) = {(L, L + 1)}, got {range_class.shape}")
        self.range_class = range_class
        n_classes = int(range_class.max()) + 1
        # the first range [i, j) of each class stands for all of them
        flat = range_class.ravel()
        valid = np.flatnonzero(flat >= 0)
        classes, first = np.unique(flat[valid], return_index=True)
        if not np.array_equal(classes, np.arange(n_classes)):
            raise ValueError("range_class must number its classes 0, 1, ... without gaps")
        self.rep_i, self.rep_j = np.unravel_index(valid[first], range_class.shape)
        # one more row, never filled (inf), for the empty and reversed ranges (class -1)
        self.class_cells = np.empty((n_classes + 1, n_submeshes, S + 1), CELL)
        self.class_cells["key_s"] = np.inf
        self.class_cells["t_s"] = np.inf
        self.class_cells["sync_s"] = 0.0
        self.class_cells["mesh"] = -1
        self.class_cells["start"] = 0
        self.class_cells["recompute"] = 0
        self.class_cells["recompute_layers"] = 0
        self.class_cells["storage"] = -1
        self.storage_sets: list[tuple[tuple[int, int], ...]] = []
        self.meshes: list[tuple[tuple[int, int], list[StartLayout]]] = []
        self.least_memory_bytes = math.inf     # over every cell and option, fitting or not
        # per depth s = 1..S (axis 0): microbatches held by the first stage of s, and the
        # B + s - 1 slots of the key
        self._held = np.array([inflight(space.schedule, 0, s, space.n_microbatches) for s in range(1, S + 1)])[:, None, None]
        # the distinct counts, ascending, and per depth its count's row (_add_layers)
        counts, rows = np.unique(self._held.ravel(), return_inverse=True)
        self._held_counts = (counts[:, None, None], rows.reshape(-1))
        self._slots = np.arange(space.n_microbatches, space.n_microbatches + S, dtype=np.float64)[:, None, None]

    def cell(self, i: int, j: int, submesh_index: int, stages_to_end: int) -> np.void:
        """The CELL record of layers [i, j) on a submesh, s stages from it to the end."""
        return self.class_cells[self.range_class[i, j], submesh_index, stages_to_end]

    def add(self, submesh_index: int, logical_mesh: tuple[int, int], rt: RangeTable) -> None:
        """Offer every cell of one logical mesh on submesh `submesh_index`; a cell keeps the
        option with the least key_s (the first one on ties)."""
        if self.layer_recompute:
            self._add_layers(submesh_index, logical_mesh, rt)
            return
        sp = self.space
        self.meshes.append((logical_mesh, rt.starts))
        mesh_id = len(self.meshes) - 1
        at = (self.rep_i, self.rep_j)
        held, slots = self._held, self._slots                        # B + s - 1 for s = 1..S
        sync = rt.sync[at]                                          # (U, P)
        cells = self.class_cells[:-1, submesh_index, 1:].T         # (S, U) view
        n_u, n_p = sync.shape[0], sync.shape[1]
        for rci, rc in enumerate(RECOMPUTE_OPTIONS):
            t = rt.time_s(rc, at)                                    # (U, P)
            mem = rt.memory_bytes(rc, held, at)                      # (S, U, P)
            self._note_least_memory(mem)
            tt = np.where(mem <= rt.cap_bytes(sp.memory_cap_bytes, at), t, np.inf)
            key = slots * tt + sync
            pbest, flat, kbest = _first_least(key)
            better = kbest < cells["key_s"]
            if better.any():
                np.copyto(cells["key_s"], kbest, where=better)
                np.copyto(cells["t_s"], tt.ravel()[flat], where=better)
                np.copyto(cells["sync_s"], sync.ravel()[flat % (n_u * n_p)], where=better)
                np.copyto(cells["mesh"], mesh_id, where=better)
                np.copyto(cells["start"], pbest, where=better)
                np.copyto(cells["recompute"], rci, where=better)

    def _note_least_memory(self, mem: np.ndarray) -> None:
        """Keep the least finite memory of any cell, for the no-fit message (NaN or -inf would
        hide it from min)."""
        least = mem.min(initial=math.inf)
        if math.isnan(least) or least == -math.inf:
            finite = mem[np.isfinite(mem)]
            least = finite.min() if finite.size else math.inf
        if least < math.inf:
            self.least_memory_bytes = min(self.least_memory_bytes, float(least))

    def _add_layers(self, submesh_index: int, logical_mesh: tuple[int, int], rt: RangeTable) -> None:
        """`add` with every count k of recomputed first layers (0 <= k <= the stage's layers):
        per (depth, range, start) the least k that fits, which is the fastest that fits
        (RangeTable.least_recompute_layers), then the start with the least key."""
        self.meshes.append((logical_mesh, rt.starts))
        mesh_id = len(self.meshes) - 1
        at = (self.rep_i, self.rep_j)
        held = self._held_counts[0]
        # the no-fit message's least memory, over no and full recomputation as before: memory
        # grows with the microbatches held (rounding is monotone too), so the least is at the
        # fewest held
        for mem in (rt.memory_bytes("none", held[0], at), rt.memory_bytes("full", held[0], at)):
            self._note_least_memory(mem)
        cells = self.class_cells[:-1, submesh_index, 1:].T         # (S, U) view
        kbest, t_best, sync_best, pbest, layers = self._best_options(rt)
        better = kbest < cells["key_s"]
        if better.any():
            n = (self.rep_j - self.rep_i)[None, :]
            np.copyto(cells["key_s"], kbest, where=better)
            np.copyto(cells["t_s"], t_best, where=better)
            np.copyto(cells["sync_s"], sync_best, where=better)
            np.copyto(cells["mesh"], mesh_id, where=better)
            np.copyto(cells["start"], pbest, where=better)
            np.copyto(cells["recompute"], RECOMPUTE_OPTIONS.index("full") * (layers > 0), where=better)
            np.copyto(cells["recompute_layers"], np.where(layers < n, layers, 0), where=better)

    def _best_options(self, rt: RangeTable) -> tuple[np.ndarray, ...]:
        """_add_layers' best option of `rt` per (depth, range class): its key, t, sync, start
        and count of recomputed layers, each (S, U). They depend only on the table and on what
        the arguments of the memo's key say (the planner offers one table to two stage tables
        of one space and classes, every option and without sequence splits), so the second
        offer reads the first's."""
        # depths holding as many microbatches (1F1B's s >= B) have equal memory: each count of
        # held microbatches is worked out once, and its rows shared
        held, depth_row = self._held_counts
        memo_key = (self.rep_i.tobytes(), self.rep_j.tobytes(), held.tobytes(), depth_row.tobytes(),
                    self._slots.tobytes(), float(self.space.memory_cap_bytes))
        hit = rt._best.get(memo_key)
        if hit is not None:
            return hit
        at = (self.rep_i, self.rep_j)
        sync = rt.sync[at]                                          # (U, P)
        n_s, n_u, n_p = len(depth_row), sync.shape[0], sync.shape[1]
        fin, least = rt.least_recompute_cells(self.rep_i, self.rep_j, held, self.space.memory_cap_bytes)  # (H, F)
        row, c = np.nonzero(least >= 0)                            # the options that fit
        n_of = np.bincount(depth_row, minlength=len(held))         # depths per held row
        # Where few options fit (the 405B shape at one microbatch size on small submeshes: 2% of
        # the (depth, range, start) cells) only they are priced; else every cell is. Every
        # option that does not fit has the key inf, unless its sync is NaN or -inf: then only
        # the argmin over every cell takes it as it would (a NaN first).
        with np.errstate(invalid="ignore"):
            odd_sync = bool((np.isnan(sync) | (sync == -np.inf)).any())
        if 8 * int(n_of[row].sum()) < n_s * n_u * n_p and not odd_sync:
            out = self._fitting_best(rt, sync, fin, least, row, c, n_of)
            if out is not None:
                rt._best[memo_key] = out
                return out
        k = np.full((len(held), n_u * n_p), -1)
        k[:, fin] = least
        k = k.reshape(len(held), n_u, n_p)
        tt = rt.chosen_time_s(self.rep_i, self.rep_j, k)           # (H, U, P)
        if not np.array_equal(depth_row, np.arange(len(held))):
            tt, k = tt[depth_row], k[depth_row]                    # (S, U, P)
        key = self._slots * tt + sync
        pbest, flat, kbest = _first_least(key)
        out = rt._best[memo_key] = (kbest, tt.ravel()[flat], sync.ravel()[flat % (n_u * n_p)], pbest, k.ravel()[flat])
        return out

    def _fitting_best(self, rt: RangeTable, sync: np.ndarray, fin: np.ndarray, least: np.ndarray, row: np.ndarray,
                      c: np.ndarray, n_of: np.ndarray) -> tuple[np.ndarray, ...] | None:
        """_best_options from the options that fit alone (least[row, c] >= 0: held row, cell
        fin[c]; n_of: depths per held row), the same arrays as the argmin over every cell;
        None where some option's key is not a number below inf (the argmin then decides)."""
        held, depth_row = self._held_counts
        n_s, n_u, n_p = len(depth_row), sync.shape[0], sync.shape[1]
        k = least[row, c]
        u, p = fin[c] // n_p, fin[c] % n_p
        tt = rt.t[self.rep_i[u], self.rep_j[u], p]
        some = k > 0
        tt[some] = rt.recomputed_time_s(tt[some], self.rep_i[u[some]], self.rep_j[u[some]], p[some], k[some])
        by_row = np.argsort(depth_row, kind="stable")             # the depths, grouped by their row
        first = np.cumsum(n_of) - n_of
        n = n_of[row]
        e = np.repeat(np.arange(len(row)), n)                      # option per (option, depth)
        s = by_row[np.repeat(first[row], n) + np.arange(len(e)) - np.repeat(np.cumsum(n) - n, n)]
        u, p, k, tt = u[e], p[e], k[e], tt[e]
        key = self._slots.reshape(-1)[s] * tt + sync[u, p]
        if not np.isfinite(key).all():
            return None
        # per (depth, range): the least key, and of its options the first start
        g = s * n_u + u
        least_key = np.full(n_s * n_u, np.inf)
        np.minimum.at(least_key, g, key)
        tie = np.flatnonzero(key == least_key[g])
        pick = np.full(n_s * n_u, len(key) * n_p)
        np.minimum.at(pick, g[tie], p[tie] * len(key) + tie)       # the least start, then its option
        won = np.flatnonzero(pick < len(key) * n_p)
        x = pick[won] % len(key)
        kbest, t_best, layers = np.full(n_s * n_u, np.inf), np.full(n_s * n_u, np.inf), np.full(n_s * n_u, -1)
        sync_best = np.tile(sync[:, 0], n_s)
        pbest = np.zeros(n_s * n_u, np.intp)
        kbest[won], t_best[won], sync_best[won], pbest[won], layers[won] = key[x], tt[x], sync[u[x], p[x]], p[x], k[x]
        return tuple(a.reshape(n_s, n_u) for a in (kbest, t_best, sync_best, pbest, layers))

    def choice(self, i: int, j: int, submesh_index: int, stages_to_end: int) -> StageChoice:
        cell = self.cell(i, j, submesh_index, stages_to_end)
        logical_mesh, starts = self.meshes[int(cell["mesh"])]
        layers = int(cell["recompute_layers"])
        storage = int(cell["storage"])
        return StageChoice(logical_mesh, starts[int(cell["start"])], RECOMPUTE_OPTIONS[int(cell["recompute"])],
                           layers or None, self.storage_sets[storage] if storage >= 0 else ())

    def with_sharded_storage(self, entries: Sequence[tuple[int, int, RangeTable, Mesh]],
                             solver: LayerSolver) -> StageTables | None:
        """A copy of these tables where a stage may also store some parameter groups sharded
        (ZeRO-3) in its ZeRO-1/2 stage, recomputing nothing; None where no cell changes.
        `entries`: (submesh index, StageTables.meshes index, range table, mesh) of every
        logical mesh added.

        The option of a cell (range, submesh, depth) entered in start p on a mesh keeps the
        layers' time-optimal strategies (the range table's chain) and adds the cheapest set of
        groups whose sharding brings the stage under the cap: min sum dt_g subject to
        sum saved_g >= memory - cap, a 0/1 knapsack over the stage's groups (LayerSol.storage),
        solved exactly (sharded_storage_set). A group's added time and saved bytes do not
        depend on the other groups' storage (each op is priced on its own,
        strategy.sharded_storage_cost, and its bytes are its own), so the set's figures are
        the sums, and the set is optimal for those strategies at that budget. It is tried only
        where it can win: the stage does not fit without recomputation, and its time without
        recomputation beats the cell's best (sharded storage only adds time). A cell takes
        it only when strictly better, so tables where it never wins are unchanged and the
        option set only grows: the DP over the copy is no worse than over these tables."""
        sp = self.space
        new = copy.copy(self)
        new.class_cells = self.class_cells.copy()
        new.storage_sets = list(self.storage_sets)
        at = (self.rep_i, self.rep_j)
        held = self._held                                    # (S, 1, 1)
        slots = self._slots
        changed = False
        chains: dict[tuple[int, int], tuple[tuple[int, int, float, float], ...]] = {}
        sets: dict[tuple, tuple[int, ...] | None] = {}
        for mi, mesh_id, rt, mesh in entries:
            t, sync = rt.t[at], rt.sync[at]                                   # (U, P)
            with np.errstate(invalid="ignore"):
                key0 = slots * t + sync                                       # (S, U, P)
                mem0 = rt.memory_bytes("none", held, at)
            cap = np.broadcast_to(rt.cap_bytes(sp.memory_cap_bytes, at), t.shape)   # (U, P)
            cells = new.class_cells[:-1, mi, 1:].T                           # (S, U) view
            chains.clear()
            walks: dict = {}
            try_at = np.isfinite(key0) & (key0 < cells["key_s"][:, :, None]) & (mem0 > cap)
            for s, u, p in zip(*np.nonzero(try_at)):
                if not key0[s, u, p] < cells["key_s"][s, u]:
                    continue                        # beaten by an option written in this pass
                i, j = int(self.rep_i[u]), int(self.rep_j[u])
                items = chains.get((u, p))
                if items is None:
                    items = chains[(u, p)] = storage_items(solver, mesh, rt, i, j, p, walks)
                excess = float(mem0[s, u, p]) - float(cap[u, p])
                if not items or -sum(it[3] for it in items) < excess:
                    continue
                slot_s = float(slots[s, 0, 0])
                if key0[s, u, p] + slot_s * storage_cost_lower_bound(
                        [it[2] for it in items], [-it[3] for it in items], excess) >= cells["key_s"][s, u]:
                    continue                        # cannot win (exact: the bound is below every set)
                mk = (items, excess)
                if mk not in sets:
                    sets[mk] = sharded_storage_set([it[2] for it in items], [-it[3] for it in items], excess)
                picked = sets[mk]
                if picked is None:
                    continue
                dt = sum(items[g][2] for g in picked)
                tt = float(t[u, p]) + dt
                key = float(slots[s, 0, 0]) * tt + float(sync[u, p])
                if key < cells["key_s"][s, u]:
                    new.storage_sets.append(tuple(sorted((items[g][0], items[g][1]) for g in picked)))
                    cells[s, u] = (key, tt, sync[u, p], mesh_id, p, 0, 0, len(new.storage_sets) - 1)
                    changed = True
        return new if changed else None

    def dp_inputs(self, p2p_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """stage_dp's stage_cost [L, L+1, M, S+1] and stage_extra [L, L+1, M].

        Point-to-point (p2p_s[m, j]: one transfer out of a stage ending at j on submesh m): a
        stage ending before the last layer sends its output forward and receives its gradient
        back, every microbatch. The transfers do not occupy the stage, but they lengthen the
        pipeline's fill and drain (counted once in extra, like the sync) and the round trip
        that 1F1B's s microbatches in flight must cover (a share 2*p2p/s of each steady-state
        period, in cost).

        Gradient sync runs after a stage's last backward. Whether the earlier stages' remaining
        backwards hide it depends on the whole pipeline, which the DP does not see: extra
        charges every stage's sync once (an upper bound) and the simulator ranks candidates.
        extra has no depth index, so each range takes its sync at its deepest feasible depth
        (the largest, so still an upper bound)."""
        sp = self.space
        cls = self.range_class          # class -1 reads the last, never-filled row
        t_s = self.class_cells["t_s"]
        # s = 0 is no stage (cost inf there); 1 keeps the division finite
        in_flight = np.array([1.0] + [inflight(sp.schedule, 0, s, sp.n_microbatches)
                                      for s in range(1, sp.max_stages + 1)])
        p2p_jm = np.ascontiguousarray(np.asarray(p2p_s, dtype=np.float64).T)      # (L+1, M)
        cost = t_s[cls]
        cost += 2 * p2p_jm[None, :, :, None] / in_flight
        # a finite p2p keeps a cell finite, so the sync maximum only needs the classes' cells:
        # computed per class and then spread, not over every range
        sync_max = np.where(np.isfinite(t_s), self.class_cells["sync_s"], 0.0).max(axis=2)
        extra = np.broadcast_to(2 * p2p_jm, cost.shape[:3]) + sync_max[cls]
        return cost, extra


def distinct_ranges(n_layers: int) -> np.ndarray:
    """[L, L+1] range classes with every range [i, j), j > i, its own class (-1 elsewhere)."""
    ends = np.arange(n_layers + 1)[None, :]
    starts = np.arange(n_layers)[:, None]
    ok = ends > starts
    out = np.full((n_layers, n_layers + 1), -1, np.int64)
    out[ok] = np.arange(int(ok.sum()))
    return out


def range_classes(identities: Sequence[Hashable]) -> np.ndarray:
    """[L, L+1] range classes: ranges [i, j) and [i', j') share a class when both start at the
    embedding or both inside the model (i, i' >= 1) and their layers have equal identities in
    order (LayerSolver.identity); -1 where j <= i. The range tables compose a range's figures
    from its layers' solutions alone (range_table.py), so one class has one set of figures on
    every mesh, to the bit."""
    n_layers = len(identities)
    out = np.full((n_layers, n_layers + 1), -1, np.int64)
    ids: dict[tuple, int] = {}
    for i in range(n_layers - 1, -1, -1):
        for j in range(i + 1, n_layers + 1):
            # the class of [i, j) is (layer i, class of [i+1, j)), and a range at 0 is marked
            key = (i == 0, identities[i], int(out[i + 1, j]) if j > i + 1 else -1)
            out[i, j] = ids.setdefault(key, len(ids))
    return out


def boundary_p2p_s(cluster: Cluster, graph: OpGraph, layer_inputs: list[str | None],
                   subs: list[Submesh]) -> np.ndarray:
    """[M, L+1]: one point-to-point transfer of the activation leaving a stage that ends before
    layer j (0 at j = L and where no tensor crosses), sent by submesh m. The neighbour's
    placement is not known yet: across nodes if the cluster has several, each GPU of the
    sender's submesh sending its share over its slice of the node's link."""
    if cluster.n_nodes > 1:
        link_bw = cluster.inter_link.bandwidth_bytes_per_s / cluster.gpus_per_node
        link_lat = cluster.inter_link.latency_s
    else:
        link_bw, link_lat = cluster.intra_link.bandwidth_bytes_per_s, cluster.intra_link.latency_s
    out_bytes = np.array([graph.node(src).out_bytes if src else 0.0 for src in layer_inputs] + [0.0])
    return np.array([np.where(out_bytes > 0, link_lat + out_bytes / (link_bw * sub.n_devices), 0.0)
                     for sub in subs])


def storage_items(solver: LayerSolver, mesh: Mesh, rt: RangeTable, i: int, j: int, p: int,
                  chains: dict | None = None) -> tuple[tuple[int, int, float, float], ...]:
    """The groups a stage of layers [i, j) entered in rt.starts[p] may store sharded, under the
    layers' strategies in the range table's chain: (layer offset, root position, seconds added
    per microbatch, bytes added per device) from LayerSol.storage. `chains` keeps each walk
    from (i, p) to the last layer, of which [i, j) is the first j - i layers (one walk per
    start, not per range)."""
    if chains is None:
        chains = {}
    full = chains.get((i, p))
    if full is None:
        out = []
        for li, sol in solver.walk((i, len(solver.graph.layers)), mesh, rt.starts[p]):
            if not math.isfinite(sol.t_s):
                break           # the range table's chain ends here too (range_table.chain)
            out += [(li - i, pos, dt, dm) for pos, dt, dm in sol.storage]
        full = chains[(i, p)] = tuple(out)
    return tuple(it for it in full if it[0] < j - i)


# Branch-and-bound nodes a covering knapsack may visit before giving up (sharded_storage_set).
STORAGE_SEARCH_NODES = 2_000


def storage_cost_lower_bound(cost_s: Sequence[float], saved_bytes: Sequence[float], need_bytes: float) -> float:
    """The LP relaxation of sharded_storage_set's knapsack (the cheapest bytes first, the last
    group fractionally): at most the least cost of any set that covers `need_bytes` (inf where
    none does), so an option whose time plus this cannot win is skipped without the search."""
    total, need = 0.0, float(need_bytes)
    for g in sorted(range(len(cost_s)), key=lambda g: cost_s[g] / saved_bytes[g]):
        if need <= 0:
            break
        take = min(1.0, need / saved_bytes[g])
        total += take * cost_s[g]
        need -= take * saved_bytes[g]
    return total if need <= 1e-9 * max(1.0, abs(need_bytes)) else math.inf


def sharded_storage_set(cost_s: Sequence[float], saved_bytes: Sequence[float], need_bytes: float) -> tuple[int, ...] | None:
    """The groups to store sharded: the set of least summed cost (>= 0 each) whose saved bytes
    (> 0 each) reach `need_bytes`, a 0/1 covering knapsack; None where even all of them do not.
    Exact: depth-first branch and bound over classes of equal (cost, bytes) groups (a stage of
    identical layers has few classes of many groups; which of a class's groups are taken does
    not matter, only how many), by cost per byte, a branch cut when its cost plus its LP
    relaxation's (the cheapest bytes first, the last class taken fractionally), a lower bound
    on any completion, is no less than the best set found. A search that would visit more than
    STORAGE_SEARCH_NODES nodes gives up (None): the option is then not offered, which never
    makes a plan worse, and the tests check it is not reached on their cases."""
    if sum(saved_bytes) < need_bytes:
        return None
    members: dict[tuple[float, float], list[int]] = {}
    for g, cw in enumerate(zip(cost_s, saved_bytes)):
        members.setdefault((float(cw[0]), float(cw[1])), []).append(g)
    classes = sorted(members, key=lambda cw: cw[0] / cw[1])
    n = len(classes)
    c = [cw[0] for cw in classes]
    w = [cw[1] for cw in classes]
    count = [len(members[cw]) for cw in classes]
    best_cost = math.inf
    best: list[int] = []
    taken: list[int] = [0] * n
    nodes = 0

    def relaxed(k: int, need: float) -> float:
        """Least cost of covering `need` with classes k.. taken fractionally (inf: they cannot)."""
        total = 0.0
        for q in range(k, n):
            if w[q] * count[q] >= need:
                return total + c[q] * need / w[q]
            total += c[q] * count[q]
            need -= w[q] * count[q]
        return math.inf

    def search(k: int, cost: float, need: float) -> None:
        nonlocal best_cost, best, nodes
        nodes += 1
        if nodes > STORAGE_SEARCH_NODES:
            return
        if need <= 0:
            if cost < best_cost:
                best_cost, best = cost, taken[:k] + [0] * (n - k)
            return
        if k == n or cost + relaxed(k, need) >= best_cost:
            return
        for m in range(min(count[k], math.ceil(need / w[k])), -1, -1):
            taken[k] = m
            search(k + 1, cost + m * c[k], need - m * w[k])
        taken[k] = 0

    search(0, 0.0, float(need_bytes))
    if not math.isfinite(best_cost) or nodes > STORAGE_SEARCH_NODES:
        return None
    return tuple(sorted(g for q, cw in enumerate(classes) for g in members[cw][:best[q]]))


def _first_least(key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cell of an (S, U, P) key array: the first start with the least key, the flat index
    of that entry, and the key, read through flat indices (take_along_axis builds an index grid
    per call)."""
    n_s, n_u, n_p = key.shape
    pbest = key.argmin(axis=2)
    flat = (np.arange(n_s * n_u) * n_p).reshape(n_s, n_u) + pbest
    return pbest, flat, key.ravel()[flat]
