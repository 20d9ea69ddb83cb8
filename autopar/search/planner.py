"""The auto planner — DESIGN §2, §5-§7: per microbatch size, intra-op ILPs per distinct layer
(layer_solver.py) composed into range tables (range_table.py) and the stage DP's tables
(tables.py); the DP's optima and the equal-layer shapes are candidates (candidates.py), and the
pipeline simulator (evaluation/evaluator.py) picks the best.

Context parallelism cannot make a plan worse. LayerSolver keeps, per key, the time optimum over
every option and the one without sequence splits (layer_solver.py), and a mesh whose table
uses a sequence split anywhere gets a second range table from the latter. Let N be this
planner with context parallelism off (context_parallel=False: every layer solved without
sequence splits) and W the planner with it. Per microbatch size:
  - W's no-sequence-split tables equal N's tables: the layer solutions are optima of the same
    ILPs (where the full optimum splits no sequence it is one; up to the choice among optima
    of equal time, which the ILP solver makes);
  - W's candidates are N's (the DP over those tables and their equal-layer slicings, kept
    apart from the rest so that `unique` does not merge them with a CP slicing of the same
    layers) plus those of the tables holding both alternatives;
  - W simulates N's candidates first, then the rest against that best; a candidate is skipped
    only when its lower bound cannot beat the best so far (exact), so W's best per size is the
    least of a superset: no worse than N's.
Over microbatch sizes: the first round searches the same sizes, and the second round searches
the neighbours of W's best size and of the best size without sequence splits (N's best size),
so W searches every size N searches and takes the least: W's plan <= N's plan."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import dataclasses
import functools
import gc
import math
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from autopar.costmodel.compute import ComputeModel
from autopar.costmodel.eager import allocatable_bytes
from autopar.evaluation.evaluator import EAGER_DEFAULT, evaluate
from autopar.hardware.mesh import Mesh, Submesh, searched_meshes, submeshes
from autopar.hardware.presets import load_cluster
from autopar.hardware.specs import Cluster
from autopar.model import ModelSource, model_source
from autopar.plan import ClusterInfo, ModelInfo, Plan, PlanConfig, PlanError, Training
from autopar.search.candidates import (
    Candidate,
    auto_label,
    dp_candidates,
    interleaved_candidates,
    interleaved_dp_candidates,
    microbatch_candidates,
    microbatch_neighbours,
    stage_plans,
    uniform_candidates,
    unique,
)
from autopar.search.layer_solver import LayerSolver, SearchStats
from autopar.search.memory_floor import cannot_fit
from autopar.search.range_table import range_tables
from autopar.search.tables import SearchSpace, StageTables, boundary_p2p_s, range_classes, storage_items
from autopar.sharding.stage_problem import Settings
from autopar.validation import check_training
from graphs.ir import OpGraph

__all__ = ["Proposal", "SearchJob", "SearchResult", "best_simulated", "default_global_batch", "no_fit_message", "plan"]

# A candidate is skipped only when its lower bound, less this relative margin, is no better than
# the best fitting plan simulated so far. The tables and the evaluator sum the same per-op costs
# in another order (they agree to about 1e-15), so the margin keeps rounding from skipping a
# candidate that ties the bound; tests/integration/test_planner.py checks the bound against the
# simulator for every candidate.
BOUND_MARGIN = 1e-9


def plan(model: Any, cluster: str | Cluster = "p3.16xlarge", *, nodes: int | None = None,
         gpus_per_node: int | None = None, global_batch: int | None = None, microbatches: str | int = "auto",
         schedule: str = "1f1b", max_stages: int | None = None, dtype: str | None = None, zero: int = 1,
         seq: int | None = None, example_inputs: Any = None, time_limit_s: float = 10.0, backend: str = "highs",
         progress: bool = False, intra: str = "ilp", workers: int | None = None, eager: bool = EAGER_DEFAULT,
         context_parallel: bool = True, sharded_storage: bool = False) -> Plan:
    """Search the best (stage, submesh, logical mesh, sharding) plan; returns it evaluated.

    Each candidate microbatch size is an independent search (its own trace, ILPs and DP); they
    run in `workers` processes (default: one per CPU core). intra="dp" restricts every stage to
    plain data parallelism (Alpa's inter-only ablation). `example_inputs` trace an nn.Module or
    fx.GraphModule; their batch is then the only microbatch size (a UserWarning says so).
    context_parallel=False leaves sequence splits out of every layer (the space before context
    parallelism; the module doc proves the plan with them is no worse). sharded_storage=True
    offers per-group sharded storage in ZeRO-1/2 stages (StageTables.with_sharded_storage; the
    plan is no worse, but gpt-39b plans about 5x slower, so it is off by default)."""
    if intra not in ("ilp", "dp"):
        raise PlanError(f"intra must be 'ilp' or 'dp' (got {intra!r})")
    if schedule not in ("1f1b", "gpipe"):
        raise PlanError(f"the planner's DP models 1f1b and gpipe schedules (got {schedule!r})")
    cl = load_cluster(cluster, nodes, gpus_per_node) if not isinstance(cluster, Cluster) else cluster
    check_training(global_batch, cl.n_gpus, microbatches)     # bounds that keep the search finite
    dtype = cl.gpu.training_dtype(dtype)
    with _fewer_collections():       # the first trace, serial before the workers fork
        source = model_source(model, seq=seq, dtype=dtype, example_inputs=example_inputs)
    global_batch = global_batch if global_batch is not None else default_global_batch(cl)
    Training.split(global_batch, global_batch, dtype=dtype, schedule=schedule, zero=zero)  # checks the settings
    if source.fixed_batch and global_batch % source.fixed_batch:
        raise PlanError(f"global batch {global_batch} is not a multiple of the traced microbatch {source.fixed_batch}")
    second_round = microbatches == "auto" and not source.fixed_batch
    sizes = [source.fixed_batch] if source.fixed_batch else microbatch_candidates(global_batch, cl.n_gpus, microbatches)
    job = SearchJob(source, cl, global_batch, schedule, max_stages, dtype, zero, time_limit_s, backend, intra, eager,
                    context_parallel, sharded_storage)
    n_workers = max(1, min(len(sizes), workers or os.cpu_count() or 1))
    bar = _Progress(progress, len(sizes) + (2 if second_round else 0))
    with _fewer_collections(), _small_pages():
        second = functools.partial(_second_sizes, sizes=sizes, global_batch=global_batch) if second_round else None
        results = _run_searches(job, sizes, second, n_workers, bar)
    bar.close()
    stats = SearchStats()
    best: Plan | None = None
    for r in results:
        stats.merge(r.stats)
        if r.plan is not None and (best is None or _rank(r.plan) < _rank(best)):
            best = r.plan
    if best is None:
        if any(r.proven_unfit for r in results):
            # the message names the least memory any stage needs: search the sizes proven not
            # to fit (SearchJob.prove_unfit) in full for it
            exact = dataclasses.replace(job, prove_unfit=False)
            results = [exact.search(r.row["microbatch_size"]) if r.proven_unfit else r for r in results]
        least_memory_bytes = min((r.least_memory_bytes for r in results), default=math.inf)
        raise PlanError(no_fit_message(source, cl, least_memory_bytes, global_batch))
    counts = stats.to_dict()
    best.timing = {k: counts.pop(k) for k in list(counts) if k.endswith("_time_s")}
    best.search = {**counts, "microbatch_candidates": [r.row for r in results]}
    return best


@contextlib.contextmanager
def _fewer_collections():
    """A search builds many long-lived cache entries (strategies, ILP inputs, range tables); at
    the default thresholds the collector rescans them again and again (gpt-39b: 2.7 s of ~23 s,
    1.0 s with these). Forked workers inherit the setting. The first trace (model_source, in
    the planning process before the workers fork) builds many objects too, over torch's heap:
    gpt-39b's start to the fork, 97 collections taking 0.39-0.57 s of 1.04-1.60 s, 2 taking
    0.03-0.04 s of 0.71-0.92 s with these (alternated runs, shared 2-core machine)."""
    old = gc.get_threshold()
    gc.set_threshold(50_000, 20, 20)
    try:
        yield
    finally:
        gc.set_threshold(*old)


@contextlib.contextmanager
def _small_pages():
    """NumPy asks the kernel for huge pages on every array of 4 MiB or more; with the kernel's
    defrag setting "madvise" (a common default) each such fault may compact memory first, and
    the search allocates many large short-lived arrays (the stage DP's inputs, the range
    tables): 1T GPT at one microbatch size, system CPU 5.0 -> 3.4 s. Only the page size
    changes, never a value. Forked workers inherit the setting."""
    setter = getattr(getattr(getattr(np, "_core", None), "multiarray", None), "_set_madvise_hugepage", None)
    if setter is None:
        yield
        return
    old = setter(False)
    try:
        yield
    finally:
        setter(old)


class SearchResult(NamedTuple):
    plan: Plan | None                # the best plan that fits, for one microbatch size
    stats: SearchStats
    least_memory_bytes: float        # the least any stage option needs (for the no-fit message)
    row: dict[str, Any]              # the plan file's search.microbatch_candidates entry
    no_seq_step_s: float = math.inf  # the best fitting step without sequence splits (inf: none fits)
    proven_unfit: bool = False       # skipped: memory_floor proved that no candidate fits (least_memory_bytes inf)


# The job a forked pool worker runs, set once per worker by the pool's initializer and never in
# the planning process. ProcessPoolExecutor calls a module-level function per task, so the job
# must live in the worker between tasks; handing it over through the initializer under fork
# copies the parent's memory instead of pickling the job (its ModelSource may hold an nn.Module
# or a traced graph).
_WORKER_JOB: SearchJob | None = None


def _init_worker(job: SearchJob) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job
    _tables_from_the_heap()


def _tables_from_the_heap() -> None:
    """glibc serves an allocation above its mmap threshold (128 KiB, raised as such chunks are
    freed, to 32 MiB at most) with fresh pages, each faulted in and zeroed by the kernel, and unmaps it on free. A range
    table's array is above it for deep models (the 405B shape: about 38 MiB, 108 tables per
    microbatch size), so every table paid its page faults again. A pool worker lives for one
    search only, so there the threshold (and the heap's trim threshold, lest the freed top be
    returned at once) is raised for good, and a table reuses the heap a freed one left: the
    405B shape at one microbatch size (B=512), system CPU 2.6, 3.0 -> 1.5, 1.2 s, peak RSS
    1.62 -> 1.67 GB; its whole headline run (bench/plan_bench.py, shared 2-core machine),
    system CPU 27.2, 24.3 -> 8.3, 6.9 s, peak RSS 2.27, 2.30 -> 2.39-2.49 GiB, user CPU within
    the load's noise (238.0, 257.3 -> 223.6, 255.8, 261.5 s). Only where memory comes from
    changes, never a value; elsewhere than glibc nothing happens."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3            # glibc's malloc.h
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, 1 << 30)


def _search_in_worker(microbatch_size: int) -> SearchResult:
    assert _WORKER_JOB is not None
    return _WORKER_JOB.search(microbatch_size)


def _run_searches(job: SearchJob, sizes: list[int], second: Callable[[list[SearchResult]], list[int]] | None,
                  n_workers: int, bar: _Progress) -> list[SearchResult]:
    """Round one's results (in `sizes` order), then round two's, whose sizes `second` picks
    from round one's results (_second_sizes; None: no second round). Each result depends only
    on the job and its size, so which process runs it and when cannot change it.

    One pool runs both rounds. Round two used to wait for the last of round one and then run
    alone (gpt-39b: one size, 2.2 s of one core, the other idle). Instead, a worker that frees
    up while round one still has sizes queued first runs the round-two sizes that round one's
    results so far pick (a guess: the sizes are the neighbours of the best so far), once a
    finished size above that best did worse (so the results so far have turned). Round two's
    sizes are then picked from all of round one's results, as before: a guessed size that is
    not among them is dropped (its result and its counts), a missing one is run then. A wrong
    guess costs time, never the plan."""
    def second_sizes(first: list[SearchResult]) -> list[int]:
        return second(first) if second is not None else []

    if n_workers <= 1 or "fork" not in mp.get_all_start_methods():
        first = []
        for size in sizes:
            first.append(job.search(size))
            bar.advance_batch()
        results = list(first)
        for size in second_sizes(first):
            results.append(job.search(size))
            bar.advance_batch()
        return results
    futures: dict[int, cf.Future[SearchResult]] = {}

    def done_first() -> list[SearchResult]:
        return [futures[s].result() for s in sizes if s in futures and futures[s].done()]

    counted: set[int] = set()

    def advance() -> None:
        for size, f in futures.items():
            if f.done() and size not in counted:
                counted.add(size)
                bar.advance_batch()

    # The workers are forked: the collector would otherwise walk (and so copy, page by page)
    # every object inherited from this process, torch's among them, in each worker.
    gc.freeze()
    with contextlib.ExitStack() as stack:
        stack.callback(gc.unfreeze)
        pool = stack.enter_context(cf.ProcessPoolExecutor(n_workers, mp_context=mp.get_context("fork"),
                                                          initializer=_init_worker, initargs=(job,)))
        queued = list(sizes)
        while len(done_first()) < len(sizes):
            while sum(not f.done() for f in futures.values()) < n_workers:
                first = done_first()
                guess = [m for m in second_sizes(first) if m not in futures] if _turned(first) else []
                if guess:
                    size = guess[0]
                elif queued:
                    size = queued.pop(0)
                else:
                    break
                futures[size] = pool.submit(_search_in_worker, size)
            cf.wait([f for f in futures.values() if not f.done()], return_when=cf.FIRST_COMPLETED)
            advance()
        first = done_first()
        more = second_sizes(first)
        for size in more:
            if size not in futures:
                futures[size] = pool.submit(_search_in_worker, size)
        for size, f in futures.items():
            if size not in sizes and size not in more:
                f.cancel()      # a guessed size that round two does not search, if not started yet
        results = first
        for size in more:
            results.append(futures[size].result())
            advance()
    return results


def _best_size(first: list[SearchResult]) -> int | None:
    """The microbatch size of the fastest fitting plan among `first` (None: none fits)."""
    scored = [(r.plan.predicted.step_time_s, r.row["microbatch_size"]) for r in first if r.plan is not None]
    return min(scored)[1] if scored else None


def _second_sizes(first: list[SearchResult], sizes: list[int], global_batch: int) -> list[int]:
    """Round two's sizes from round one's results (in `sizes` order): the neighbours of the
    best size, and of the best size without sequence splits."""
    best_size = _best_size(first)
    if best_size is None:
        return []
    more = microbatch_neighbours(best_size, global_batch, set(sizes))
    # and around the best size without sequence splits, so that every size the planner
    # without context parallelism searches is searched (module doc)
    lean = [(r.no_seq_step_s, r.row["microbatch_size"]) for r in first if math.isfinite(r.no_seq_step_s)]
    if lean:
        more += microbatch_neighbours(min(lean)[1], global_batch, set(sizes) | set(more))
    return more


def _turned(first: list[SearchResult]) -> bool:
    """Whether some finished size above the best fitting size so far planned a slower step
    (or none that fits): the sign that the best so far is round one's best (_run_searches)."""
    best_size = _best_size(first)
    if best_size is None:
        return False
    return any(r.row["microbatch_size"] > best_size for r in first)


@dataclass(frozen=True)
class Proposal:
    """What one microbatch size offers the simulator."""

    microbatch_size: int
    graph: OpGraph
    solver: LayerSolver              # its cache holds every layer solution the candidates use
    subs: list[Submesh]
    candidates: list[Candidate]
    n_no_seq: int                    # candidates[:n_no_seq] use no sequence split (planner doc)
    least_memory_bytes: float        # the least any stage option needs (for the no-fit message)
    model: ModelInfo                 # the graph as each candidate's plan names it (summed once)
    proven_unfit: bool = False       # no tables built: memory_floor.cannot_fit proved no candidate fits


@dataclass(frozen=True)
class SearchJob:
    """One planning problem; `search(microbatch_size)` does everything for one microbatch size."""

    source: ModelSource
    cl: Cluster
    global_batch: int
    schedule: str
    max_stages: int | None
    dtype: str
    zero: int
    time_limit_s: float
    backend: str
    intra: str
    eager: bool = EAGER_DEFAULT      # cost as the eager PyTorch recipe (evaluator.evaluate's eager)
    context_parallel: bool = True    # offer sequence splits (plan's context_parallel)
    sharded_storage: bool = False    # offer per-group sharded storage (plan's sharded_storage)
    # skip a microbatch size that memory_floor.cannot_fit proves has no fitting candidate
    # (before its ILPs): its result is the full search's, but for least_memory_bytes (inf)
    prove_unfit: bool = True

    def search(self, microbatch_size: int) -> SearchResult:
        """The best plan for one microbatch size."""
        stats = SearchStats()
        prop = self.propose(microbatch_size, stats)
        B = self.global_batch // microbatch_size
        best_dp = min((c.dp_total_s for c in prop.candidates), default=math.inf)
        row: dict[str, Any] = {"microbatch_size": microbatch_size, "n_microbatches": B, "dp_total_s": best_dp}
        if not math.isfinite(best_dp):
            return SearchResult(None, stats, prop.least_memory_bytes, row, proven_unfit=prop.proven_unfit)
        t0 = time.perf_counter()
        def simulate(c: Candidate) -> Plan:
            return self.simulate(prop, c)
        # the candidates without sequence splits first (none where no lean stage fits)
        lean, evaluated = best_simulated(prop.candidates[:prop.n_no_seq], simulate, B) if prop.n_no_seq else (None, 0)
        best, more = best_simulated(prop.candidates[prop.n_no_seq:], simulate, B, incumbent=lean)
        stats.eval_time_s += time.perf_counter() - t0
        row["candidates_evaluated"] = evaluated + more
        row["candidates"] = len(prop.candidates)
        row["predicted_step_time_s"] = best.predicted.step_time_s
        return SearchResult(best if best.predicted.fits else None, stats, prop.least_memory_bytes, row,
                            lean.predicted.step_time_s if lean is not None and lean.predicted.fits else math.inf)

    def propose(self, microbatch_size: int, stats: SearchStats) -> Proposal:
        """Trace, solve the layers, fill the tables and collect the candidates."""
        cl = self.cl
        subs = submeshes(cl)
        t0 = time.perf_counter()
        graph = self.source.graph(microbatch_size)
        stats.trace_time_s += time.perf_counter() - t0
        B = self.global_batch // microbatch_size
        only = frozenset({"R", "b@0"}) if self.intra == "dp" else None
        solver = LayerSolver(graph, ComputeModel(cl.gpu, self.dtype), Settings(n_microbatches=B, zero=self.zero),
                             stats, self.time_limit_s, self.backend, only, eager=self.eager,
                             context_parallel=self.context_parallel,
                             sharded_storage=self.sharded_storage and self.zero in (1, 2))
        t0 = time.perf_counter()
        L = len(graph.layers)
        space = SearchSpace(L, min(self.max_stages or L, L, cl.n_gpus), B, cl.n_gpus, self.schedule,
                            allocatable_bytes(cl.gpu.memory_bytes, cl.n_gpus) if self.eager
                            else cl.gpu.memory_bytes)
        identities = [solver.identity(li) for li in range(L)]
        storage_offered = self.sharded_storage and self.zero in (1, 2)
        if self.prove_unfit and not self.eager and cannot_fit(
                graph, solver.inputs, cl, subs,
                (lambda sub: searched_meshes(cl, sub)) if self.intra == "ilp" else (lambda sub: [(sub.n_devices, 1)]),
                solver.cm, zero=self.zero, schedule=self.schedule, n_microbatches=B, max_stages=space.max_stages,
                cap_bytes=space.memory_cap_bytes, sharded_storage=storage_offered, identities=identities):
            # no candidate can fit (memory_floor's proof): the full search would end with none
            stats.table_time_s += time.perf_counter() - t0
            return Proposal(microbatch_size, graph, solver, subs, [], 0, math.inf,
                            ModelInfo.of(graph, self.source.name, self.source.loadable), proven_unfit=True)
        classes = range_classes(identities)
        tables = StageTables(space, len(subs), classes)          # every option
        lean_tables = StageTables(space, len(subs), classes)     # without sequence splits
        p2p_s = boundary_p2p_s(cl, graph, solver.inputs, subs)
        equal_split: list[Candidate] = []
        lean_equal_split: list[Candidate] = []
        cp_ids = []         # tables.meshes entries whose layers split a sequence somewhere
        # (submesh, tables.meshes index, range table, mesh), kept only for sharded storage: the
        # range tables are the search's largest arrays (about 7 GB for a 1T GPT at one microbatch
        # size, each faulted in fresh) and are otherwise read only by the loop that builds them
        entries = []
        # Sharded storage is offered to candidates of its own, after those without it (whose
        # search is as before), so the option set only grows (StageTables.with_sharded_storage)
        storage = self.sharded_storage and self.zero in (1, 2) and not self.eager
        storage_split: list[Candidate] = []
        for mi, sub in enumerate(subs):
            # A (d, 1) mesh repeating (1, d) (mesh.searched_meshes) would add range tables equal
            # to (1, d)'s (up to the order of start layouts) after them: it could win no cell (a
            # cell keeps the first of equal options), and its equal-split candidates would tie
            # (1, d)'s, which are simulated first. Leaving it out cannot change the plan
            # (tests/unit/test_speed_h7_mirror_meshes.py keeps the full list as the oracle).
            for shape in (searched_meshes(cl, sub) if self.intra == "ilp" else [(sub.n_devices, 1)]):
                mesh = Mesh(cl, sub, shape)
                rt, lean_rt = range_tables(solver, mesh, self.context_parallel)
                # the lean table first: a cell keeps the first of equal options
                tables.add(mi, shape, lean_rt)
                if storage:
                    entries.append((mi, len(tables.meshes) - 1, lean_rt, mesh))
                if rt is not lean_rt:
                    tables.add(mi, shape, rt)
                    cp_ids.append(len(tables.meshes) - 1)
                    if storage:
                        entries.append((mi, len(tables.meshes) - 1, rt, mesh))
                lean_tables.add(mi, shape, lean_rt)
                lean_equal_split += uniform_candidates(lean_rt, mi, sub, shape, space, p2p_s[mi])
                lean_equal_split += interleaved_candidates(lean_rt, mi, sub, shape, space, p2p_s[mi])
                if rt is not lean_rt:
                    equal_split += uniform_candidates(rt, mi, sub, shape, space, p2p_s[mi])
                    equal_split += interleaved_candidates(rt, mi, sub, shape, space, p2p_s[mi])
                if storage:
                    for table in ([lean_rt] if rt is lean_rt else [lean_rt, rt]):
                        items = functools.partial(storage_items, solver, mesh, table, chains={})
                        storage_split += uniform_candidates(table, mi, sub, shape, space, p2p_s[mi], items)
                        storage_split += interleaved_candidates(table, mi, sub, shape, space, p2p_s[mi], items)
        cost, extra = tables.dp_inputs(p2p_s)
        # the DP over a second set of tables with sharded storage (None where it wins no cell)
        storage_tables = tables.with_sharded_storage(entries, solver) if storage else None
        stats.table_time_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        # Where no cell keeps a context-parallel option, every cell holds what the lean tables'
        # does (the lean options keep their order), so the DP would find the same candidates.
        keeps_cp = bool(cp_ids) and bool(np.isin(tables.class_cells["mesh"], cp_ids).any())
        all_dp = dp_candidates(tables, cost, extra, subs)
        lean_dp = dp_candidates(lean_tables, *lean_tables.dp_inputs(p2p_s), subs) if keeps_cp else all_dp
        # each DP optimum also interleaved, its device groups (of any sizes) kept
        lean_cands = unique(lean_dp + lean_equal_split + interleaved_dp_candidates(lean_tables, lean_dp, p2p_s, subs))
        seen = {(c.key, c.choices) for c in lean_cands}
        all_il = interleaved_dp_candidates(tables, all_dp, p2p_s, subs) if keeps_cp else []
        rest = [c for c in unique((all_dp if keeps_cp else []) + equal_split + all_il) if (c.key, c.choices) not in seen]
        if storage_tables is not None:
            # an optimum storing nothing sharded ties an optimum of the tables without storage
            rest += [c for c in dp_candidates(storage_tables, *storage_tables.dp_inputs(p2p_s), subs, "dp-storage")
                     if any(ch.sharded_storage for ch in c.choices)]
        rest += unique(storage_split)
        stats.dp_time_s += time.perf_counter() - t0
        return Proposal(microbatch_size, graph, solver, subs, lean_cands + rest, len(lean_cands),
                        tables.least_memory_bytes, ModelInfo.of(graph, self.source.name, self.source.loadable))

    def simulate(self, prop: Proposal, cand: Candidate) -> Plan:
        """The candidate as a plan, placed on the cluster and evaluated by the simulator."""
        graph, microbatch_size = prop.graph, prop.microbatch_size
        stages = stage_plans(cand, graph, prop.solver, prop.subs, self.cl)
        training = Training.split(self.global_batch, microbatch_size, dtype=self.dtype,
                                  schedule="interleaved" if cand.chunks > 1 else self.schedule,
                                  virtual_stages=cand.chunks, zero=self.zero)
        p = Plan(strategy="auto", config=PlanConfig("auto", auto_label(stages, cand.chunks)),
                 model=prop.model, cluster=ClusterInfo.of(self.cl),
                 training=training, stages=stages)
        return evaluate(p, graph, self.cl, eager=self.eager)


def best_simulated(candidates: list[Candidate], simulate: Callable[[Candidate], Plan],
                   n_microbatches: int, incumbent: Plan | None = None) -> tuple[Plan, int]:
    """The best simulated plan of all candidates (and `incumbent`, a plan simulated before),
    and how many were simulated. They are simulated in the order of the DP's estimate; one
    whose lower bound on the step (Candidate.step_lower_bound_s) is no better than the best
    fitting plan so far cannot win and is skipped."""
    best: Plan | None = incumbent
    evaluated = 0
    for cand in sorted(candidates, key=lambda c: c.dp_total_s):
        if (best is not None and best.predicted.fits
                and cand.step_lower_bound_s(n_microbatches) * (1 - BOUND_MARGIN) >= best.predicted.step_time_s):
            continue
        p = simulate(cand)
        evaluated += 1
        if best is None or _rank(p) < _rank(best):
            best = p
    if best is None:
        raise ValueError("no candidates to simulate")
    return best, evaluated


def _rank(p: Plan) -> tuple:
    """Plans that fit first, then the fastest."""
    return (not p.predicted.fits, p.predicted.step_time_s)


def default_global_batch(cluster: Cluster) -> int:
    return max(8, 16 * cluster.n_gpus) if cluster.n_gpus > 1 else 16


def no_fit_message(source: ModelSource, cl: Cluster, least_mem: float, global_batch: int) -> str:
    need = f"{least_mem / 2**30:.1f} GiB" if math.isfinite(least_mem) else "more than any stage can hold"
    return (f"no plan for {source.name} fits in {cl.gpu.memory_bytes / 2**30:.0f} GiB per GPU on {cl.n_gpus} "
            f"{cl.gpu.name} GPUs: the least memory per device any stage needs is {need}. What would help: more "
            f"GPUs (--nodes), a smaller microbatch (--microbatches with more microbatches), or a GPU with more "
            f"memory; recomputation and ZeRO sharding were already considered.")


class _Progress:
    def __init__(self, enabled: bool, n_batches: int):
        self.p = None
        if enabled:
            from rich.progress import Progress  # deferred: rich is only needed for the progress bar
            self.p = Progress(transient=True)
            self.p.start()
            self.task = self.p.add_task("planning", total=n_batches)

    def advance_batch(self) -> None:
        if self.p:
            self.p.advance(self.task)

    def close(self) -> None:
        if self.p:
            self.p.stop()
