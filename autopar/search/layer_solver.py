"""One layer's intra-op optimum per (mesh, input layout), solved once and reused.

Layer composition. Followers share their leader's layout, so a block whose only activation
input is the residual stream maps an input layout p to an output layout f(p) at an ILP-optimal
cost C(p). A range of layers entered in layout p costs C_i(p) + C_{i+1}(f_i(p)) + ..., exactly
what one ILP over the whole range finds (tests check this), but every distinct
(layer, mesh, layout) is solved once however many layers share it.

Context-parallel alternatives. Each ILP minimises time only, and a sequence split (context
parallelism: `rules.einsum.splits_sequence`) can win a layer by 0.1-0.5% while holding several
times the weight memory, so a table holding only time optima would lose the lean layer that let
a stage fit (gpt-39b on 64 V100 went 59.272 -> 60.085 s when the options were added). So a key
is solved in two variants, `seq_split` True (every option) and False (no sequence split), and
both go to the tables as alternatives (range_table.py, planner.py), like the recompute options.
The False variant costs an ILP only where the True optimum splits a sequence: otherwise that
optimum lies in the smaller space and is optimal there too, and is reused as it is.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from autopar.costmodel.collectives import default_grad_sync_engine
from autopar.costmodel.compute import ComputeModel
from autopar.evaluation.evaluator import (
    EAGER_DEFAULT,
    NO_EAGER,
    ZeroUnits,
    eager_terms,
    fsdp_block_buffer_bytes,
    fsdp_grad_pool_bytes,
    grad_sync_step_s,
    grads_absent_bytes,
    optimizer_step_s,
    stage_dp_sharded,
    zero_layer_collectives,
    zero_priced_per_unit,
    zero_unit_price,
)
from autopar.hardware.mesh import Mesh
from autopar.sharding.rules import is_decision
from autopar.sharding.rules.einsum import splits_sequence
from autopar.sharding.spec import Spec, is_valid, shard_factor
from autopar.sharding.stage_problem import Settings, StageProblem, decision_names
from autopar.sharding.strategy import Strategy
from graphs.ir import OpGraph
from graphs.query import main_boundary

__all__ = ["LayerSol", "LayerSolver", "SearchStats", "StartLayout", "boundary_specs"]


@dataclass
class LayerSol:
    """An ILP-optimal layer for one (mesh, input layout)."""

    t_s: float                   # forward + backward per microbatch
    fwd_s: float
    sync_s: float                # per step, after the stage's last backward: gradient sync and optimizer step
    param_bytes: float           # weights + grads + optimizer state per device (at the plan's ZeRO)
    param_elems: float
    stash_bytes: float           # per microbatch
    input_bytes: float           # local bytes of the layer's input (kept under full recompute)
    out_spec: Spec | None
    names: dict[int, str]        # position in layer -> strategy name (decision roots)
    status: str
    objective: float
    seq_split: bool = False      # some op of the solution splits the sequence (context parallelism)
    # Per group whose parameters may be stored sharded instead of at the plan's ZeRO-1/2 level
    # (StageProblem.storage_groups), under the strategies chosen here: (position of its root
    # in the layer, seconds it adds per microbatch, bytes it adds per device, < 0). Empty unless
    # the solver was asked for it (LayerSolver's sharded_storage), and at ZeRO 0/3 and under
    # the eager recipe (whose terms do not model it).
    storage: tuple[tuple[int, float, float], ...] = ()
    # ZeRO-2/3 per FSDP unit (evaluator.zero_units; empty where it does not apply): t_s, fwd_s
    # and sync_s above price the layer as a block inside a stage, neither its first nor its
    # last; a block's place changes what its collectives hide behind. Per ZeroEnds field, what
    # being the stage's first block, its last, or its only one adds to the layer's time per
    # microbatch, not recomputed (0) and recomputed (1), and what being first adds per step.
    zero_ends: ZeroEnds | None = None
    # eager ZeRO-3: FSDP2's buffers while this block runs (evaluator.fsdp_block_buffer_bytes);
    # a stage holds its largest block's on top of its other working set (memory.stage_working_bytes)
    block_buffer_bytes: float = 0.0
    # eager: the loss's fp32 tensors (EagerTerms.cross_entropy_peak_bytes), once per stage as a
    # working set beside the recomputed layer's, not per microbatch in flight
    loss_peak_bytes: float = 0.0
    # what recomputing the layer rebuilds at once in the backward, as the evaluator counts it
    # (evaluate_stage: the graph's stash, without the eager recipe's fp32 residual stash)
    rebuilt_bytes: float = 0.0
    # eager: FSDP2's gradient pool (evaluator.fsdp_grad_pool_bytes), which raises the stage's
    # memory cap (eager.stage_allocatable_bytes)
    grad_pool_bytes: float = 0.0
    # eager: what a tied head's copy on a stage after the embedding's scales by its share of the
    # stage's parameters (evaluator.tied_copy_elems): weights, grads and optimizer state, and
    # autocast's weight cache (bytes, in param_bytes); the optimizer step (seconds, in sync_s)
    copy_scaled_bytes: float = 0.0
    optimizer_s: float = 0.0
    # eager: whether the layer's own parameters are data-parallel sharded
    # (evaluator.stage_dp_sharded), and where not, what its figures change by in a stage whose
    # other layers' are (per EAGER_ROWS, the fields they add to): the evaluator decides it per stage
    dp_sharded: bool = True
    unsharded_delta: tuple[float, ...] = ()
    # eager: the state absent at a one-microbatch step's activation peak
    # (evaluator.grads_absent_bytes), which raises the cap of a stage without a gradient pool
    grads_absent_bytes: float = 0.0
    param_elems_zero: float = 0.0


# LayerSol.unsharded_delta's order: the fields the eager recipe's stage-wide sharding changes
EAGER_ROWS = ("t_s", "sync_s", "param_bytes", "stash_bytes", "input_bytes", "loss_peak_bytes", "grad_pool_bytes",
              "copy_scaled_bytes", "grads_absent_bytes", "fwd_s")
EAGER_NO_DELTA = (0.0,) * len(EAGER_ROWS)


class ZeroEnds(NamedTuple):
    """LayerSol.zero_ends: seconds a block's place in its stage adds (range_table.py)."""

    first0: float
    first1: float
    last0: float
    last1: float
    only0: float
    only1: float
    first_step: float


def zero_unit_figures(graph: OpGraph, li: int, prob: StageProblem, assign: dict[str, int],
                      zero: int) -> tuple[float, float, float, ZeroEnds]:
    """Layer `li`'s ZeRO-2/3 per FSDP unit as the planner's tables add it up: (per microbatch
    as a block inside a stage, what recomputing it changes of that, per step, the ZeroEnds),
    from the evaluator's own per-layer figures (evaluator.zero_unit_layer)."""

    def d(u: ZeroUnits) -> float:
        return u.fwd_delta_s + u.bwd_delta_s

    z = zero_layer_collectives(graph, li, prob, assign, zero)
    mid0 = zero_unit_price(z)
    if z is None or z.root:
        # no collectives, or a root unit: its place among the blocks does not matter
        return d(mid0), 0.0, mid0.step_delta_s, ZeroEnds(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    at = {(f, la, rc): zero_unit_price(z, first=f, last=la, recomputed=rc)
          for f in (False, True) for la in (False, True) for rc in (False, True)}
    mid = (d(mid0), d(at[False, False, True]))
    ends = ZeroEnds(d(at[True, False, False]) - mid[0], d(at[True, False, True]) - mid[1],
                    d(at[False, True, False]) - mid[0], d(at[False, True, True]) - mid[1],
                    d(at[True, True, False]) - mid[0], d(at[True, True, True]) - mid[1],
                    at[True, False, False].step_delta_s - mid0.step_delta_s)
    return mid[0], mid[1] - mid[0], mid0.step_delta_s, ends


@dataclass(frozen=True)
class StartLayout:
    """How a stage's first layer is entered. A stage that starts inside the model receives its
    input in `spec`. A stage that starts at the embedding (layer 0) has no input; there `spec`
    is the layout the embedding's output is restricted to, so in both cases `spec` is the layout
    the stage's first layer boundary carries. `seq_split` picks the layer solutions: with
    context-parallel options or without (module doc)."""

    spec: Spec
    at_embedding: bool = False
    seq_split: bool = True       # the stage's layers may split the sequence (module doc)


@dataclass
class SearchStats:
    """Counts and summed timings of one search (merged over microbatch sizes and workers)."""

    ilps: int = 0
    ilps_no_seq: int = 0         # of them, layers solved again without sequence splits
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
    """Layouts a layer boundary tensor may take: replicated, or its batch, sequence (dim 1 of
    [b, s, h]: Megatron's sequence parallelism) and/or last (hidden) dim split over the mesh axes."""
    nd = len(shape)
    if nd == 0:
        return [()]
    dims = [0] if nd == 1 else [0, nd - 1] if nd == 2 else [0, 1, nd - 1]
    out = []
    live = mesh.live_axes
    options: list[int | None] = [None, *dims]
    for combo in itertools.product(options, repeat=len(live)):
        masks = [0] * nd
        for bit, d in zip(live, combo):
            if d is not None:
                masks[d] |= bit
        spec = tuple(masks)
        if (not any(spec) or is_valid(spec, shape, mesh)) and spec not in out:
            out.append(spec)
    return out


class LayerSolver:
    """Solves and caches one layer's ILP per (structure, mesh, input layout)."""

    def __init__(self, graph: OpGraph, cm: ComputeModel, settings: Settings, stats: SearchStats,
                 time_limit_s: float, backend: str, only_names: frozenset[str] | None = None,
                 eager: bool = EAGER_DEFAULT, context_parallel: bool = True, sharded_storage: bool = False):
        """`context_parallel` False: the seq_split=False variant is solved directly (every key's
        ILP without sequence splits), the planner without context parallelism; True: that
        variant reuses the full optimum where it splits no sequence (module doc).
        `sharded_storage`: fill LayerSol.storage (the planner's --sharded-storage); off, the
        solutions carry no storage menu, which would cost a sixth of gpt-39b's planning time."""
        self.sharded_storage = sharded_storage
        self.only_names = only_names
        self.context_parallel = context_parallel
        self._no_seq_allowed: dict[tuple, dict[int, set[str]]] = {}
        self.eager = eager
        self.graph, self.cm, self.settings, self.stats = graph, cm, settings, stats
        self.time_limit_s, self.backend = time_limit_s, backend
        self.cache: dict[tuple, LayerSol] = {}
        self._splits_memo: dict[tuple[str, int], tuple[Strategy, bool]] = {}
        n = len(graph.layers)
        self.inputs = [main_boundary(graph, list(graph.layers[i].nodes)) for i in range(n)]
        self.outputs = [self.inputs[i + 1] if i + 1 < n else None for i in range(n)]

    def prices_zero_units(self, mesh: Mesh) -> bool:
        """Whether the layers on `mesh` price ZeRO-2/3 per FSDP unit, as evaluate_stage does
        (LayerSol.zero_ends): not under the eager recipe (its own FSDP2 terms), and not with an
        engine that gathers per tensor (collectives.zero_gathers_per_unit)."""
        return zero_priced_per_unit(self.eager, self.settings.zero, mesh.n_devices,
                                    default_grad_sync_engine(self.eager))

    def identity(self, li: int) -> tuple:
        """Layers with one identity share their solutions on every mesh and layout (the cache
        key less the mesh and layouts)."""
        src = self.inputs[li]
        return (self.graph.layers[li].structural_hash, self.outputs[li] is None, li + 1 == len(self.graph.layers),
                self.graph.node(src).out_shape if src is not None else None)

    def key(self, li: int, mesh: Mesh, spec: Spec | None, restrict: Spec | None, seq_split: bool = True) -> tuple:
        return (self.graph.layers[li].structural_hash, mesh.submesh, mesh.shape, spec, restrict,
                self.outputs[li] is None, seq_split)

    def solve_entered(self, li: int, mesh: Mesh, spec: Spec, seq_split: bool = True) -> LayerSol:
        """Layer `li` entered in `spec`: the embedding has no input, so there `spec` restricts
        its output instead."""
        if li == 0:
            return self.solve(li, mesh, None, restrict=spec, seq_split=seq_split)
        return self.solve(li, mesh, spec, seq_split=seq_split)

    def walk(self, layers: tuple[int, int], mesh: Mesh, start: StartLayout) -> Iterator[tuple[int, LayerSol]]:
        """The layers of a stage in order, each entered in the layout the previous one emits."""
        spec = start.spec
        for li in range(*layers):
            sol = self.solve_entered(li, mesh, spec, start.seq_split)
            yield li, sol
            spec = sol.out_spec if sol.out_spec is not None else spec

    def _allowed_without_seq(self, li: int, mesh: Mesh) -> dict[str, set[str]]:
        """Per decision op of layer `li` that offers a sequence split, the names of its
        strategies that split none (never empty: the replicated layout at least)."""
        layer = self.graph.layers[li]
        k = (layer.structural_hash, mesh.submesh, mesh.shape)
        by_pos = self._no_seq_allowed.get(k)
        if by_pos is None:
            by_pos = {}
            pos_of = {name: pos for pos, name in enumerate(layer.nodes)}
            for name, options in decision_names(self.graph, list(layer.nodes), mesh, self.cm).items():
                node = self.graph.node(name)
                keep = {o for o in options if not splits_sequence(node, o)}
                if len(keep) < len(options):
                    by_pos[pos_of[name]] = keep
            self._no_seq_allowed[k] = by_pos
        return {layer.nodes[pos]: names for pos, names in by_pos.items()}

    def _splits(self, name: str, st: Strategy) -> bool:
        """splits_sequence of node `name` under `st`, once per (node, strategy object): the
        layers of one class share their strategy objects. The entry keeps `st` alive, so its
        id stays its own."""
        k = (name, id(st))
        hit = self._splits_memo.get(k)
        if hit is None:
            hit = self._splits_memo[k] = (st, splits_sequence(self.graph.node(name), st.name))
        return hit[1]

    def solve(self, li: int, mesh: Mesh, spec: Spec | None, restrict: Spec | None = None,
              seq_split: bool = True) -> LayerSol:
        """The layer's optimum entered in `spec` (or, for the embedding, with its output
        restricted to `restrict`); with `seq_split` False, the optimum without sequence splits."""
        k = self.key(li, mesh, spec, restrict, seq_split)
        hit = self.cache.get(k)
        if hit is not None:
            self.stats.cache_hits += 1
            return hit
        allowed: dict[str, set[str]] | None = None
        if not seq_split:
            if self.context_parallel:
                full = self.solve(li, mesh, spec, restrict, True)
                if not full.seq_split:
                    # optimal in the larger space and a member of the smaller: optimal there
                    self.cache[k] = full
                    return full
            allowed = self._allowed_without_seq(li, mesh)
        layer = self.graph.layers[li]
        names = list(layer.nodes)
        src = self.inputs[li]
        out = self.outputs[li]
        boundary = {src: spec} if src is not None and spec is not None else {}
        t0 = time.perf_counter()
        prob = StageProblem(self.graph, names, mesh, self.cm, boundary=boundary,
                            restrict_out={out: restrict} if (restrict is not None and out is not None) else None,
                            only_names=self.only_names, allowed=allowed)
        res = prob.solve(self.settings, time_limit_s=self.time_limit_s, backend=self.backend)
        self.stats.ilps += 1
        self.stats.ilps_no_seq += not seq_split
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
            seq = any(self._splits(g.root, g.strategies[g.root][int(res.choice[gi])])
                      for gi, g in enumerate(prob.groups))
            out_spec: Spec | None
            if out is None:         # the last layer, or a next layer that reads only graph inputs
                out_spec = None if li + 1 == len(self.graph.layers) else ()
            elif out in assign:
                out_spec = prob.strategy_of(out, assign[out]).out_spec
            else:
                # The next layer's input skips this layer (made before it, in a layout this
                # layer's ILP does not see): the chain takes it as replicated.
                out_spec = spec if out == src and spec is not None else (0,) * len(self.graph.node(out).out_shape)
            in_bytes = 0.0
            if src is not None:
                in_bytes = self.graph.node(src).out_bytes / (shard_factor(spec, mesh) if spec else 1)
            zero = self.settings.zero
            engine = default_grad_sync_engine(self.eager)

            def eager_rows(dp_sharded: bool | None) -> tuple[float, ...]:
                """The figures the eager recipe's terms enter (in EAGER_ROWS' order), with the
                stage's data-parallel sharding `dp_sharded` (None: the layer's own), as the
                evaluator adds them to a stage of these layers (compiled per block where the
                runtime compiles them: eager.compiled_per_block)."""
                et = eager_terms(self.graph, (li, li + 1), prob, assign, ev, self.settings.n_microbatches,
                                 zero, self.cm, dp_sharded=dp_sharded) if self.eager else NO_EAGER
                sync = grad_sync_step_s(prob, assign, ev, zero, engine, ev.bwd_s + et.bwd_s)
                return (et.device_s, sync + et.grad_bucket_s, et.held_bytes, et.residual_stash_bytes,
                        et.inputs_fp32_extra_bytes, et.cross_entropy_peak_bytes,
                        fsdp_grad_pool_bytes(ev, zero, mesh.n_devices, dp_sharded=dp_sharded) if self.eager else 0.0,
                        et.param_state_delta_bytes + et.autocast_cache_bytes,
                        grads_absent_bytes(ev, zero, mesh.n_devices, self.settings.n_microbatches, dp_sharded=dp_sharded)
                        if self.eager else 0.0, et.recompute_fwd_s)

            own = eager_rows(None)
            d_s, sync, held, residual, inputs_extra, loss_peak, pool, copy_extra, absent, rerun_s = own
            # A layer whose own parameters are not data-parallel sharded (an embedding split over
            # the vocabulary) runs as FSDP2's bf16 parameters in a stage where another layer's
            # are (evaluator.stage_dp_sharded): what that changes, for the tables to add where
            # its range holds such a layer.
            sharded = stage_dp_sharded(ev)
            unsharded_delta = EAGER_NO_DELTA
            if self.eager and not sharded:
                unsharded_delta = tuple(b - a for a, b in zip(own, eager_rows(True)))
            # ZeRO-2/3 per FSDP unit, where the evaluator prices them so (evaluate_stage)
            unit_s = unit_rec_s = unit_step_s = 0.0
            ends = None
            if self.prices_zero_units(mesh):
                unit_s, unit_rec_s, unit_step_s, ends = zero_unit_figures(self.graph, li, prob, assign, zero)
            optimizer_s = optimizer_step_s(ev, zero, self.cm)
            sol = LayerSol(ev.per_microbatch_s + d_s + unit_s, ev.recompute_fwd_s + unit_rec_s + rerun_s,
                           sync + unit_step_s + optimizer_s,
                           ev.param_state_bytes(zero) + held, ev.param_elems,
                           ev.stash_bytes + residual, in_bytes + inputs_extra,
                           out_spec, chosen, res.status, res.objective, seq,
                           self._storage_menu(prob, res.choice, pos)
                           if self.sharded_storage and not self.eager else (), ends,
                           fsdp_block_buffer_bytes(self.graph, li, prob, assign)
                           if self.eager and zero >= 3 and mesh.n_devices > 1 else 0.0,
                           loss_peak, ev.stash_bytes, pool,
                           ev.param_state_bytes(zero) + copy_extra if self.eager else 0.0,
                           optimizer_s if self.eager else 0.0, sharded, unsharded_delta, absent,
                           ev.param_elems_zero)
        self.cache[k] = sol
        return sol

    def _storage_menu(self, prob: StageProblem, choice, pos: dict[str, int]) -> tuple[tuple[int, float, float], ...]:
        """LayerSol.storage of a solved layer. storage_groups' cost change is the ILP
        objective's, whose step part sharded storage leaves as it is (strategy.sharded_storage_
        cost), so it is the seconds per microbatch the group adds. Only groups rooted at a
        decision op: a root that follows the layer's received input is, in a stage of several
        layers, a member of the previous layer's group, not a unit of its own."""
        out = []
        for gi, (dc, dm) in prob.storage_groups(self.settings).items():
            root = prob.groups[gi].root
            q = int(choice[gi])
            if is_decision(self.graph.node(root)) and dm[q] < 0:
                out.append((pos[root], float(dc[q]), float(dm[q])))
        return tuple(out)
