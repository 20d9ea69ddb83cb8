"""One evaluator for every plan, searched or hand-made (DESIGN §2, §4, §6).

Per stage: the intra-op cost of its ops under the plan's strategies (the same function the ILP
minimises), recomputation, memory per device. Across stages: point-to-point transfers, the
pipeline schedule simulated op by op, gradient synchronisation and the optimizer step.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Any

from autopar.costmodel import eager as eager_mod
from autopar.costmodel.collectives import (
    ALL_GATHER,
    ALL_REDUCE,
    BACKWARD,
    FORWARD,
    GRAD_SYNC,
    REDUCE_SCATTER,
    STEP,
    ZERO,
    all_reduce_s,
    all_reduce_share_s,
    collective_s,
    comm_overlap_s,
    default_grad_sync_engine,
    fill_buckets,
    grad_bucket_bytes,
    grad_reduce_factor,
    grad_sync_overlaps,
    overlapped_sync_s,
    p2p_s,
    zero_gathers_per_unit,
)
from autopar.costmodel.compute import LOSS_KERNELS, ComputeModel
from autopar.costmodel.memory import (
    activation_bytes,
    inflight,
    stage_working_bytes,
    stash_after_recompute,
    working_after_recompute,
)
from autopar.costmodel.remat import min_saved_bytes
from autopar.evaluation.pipeline import Schedule, simulate
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.specs import Cluster
from autopar.plan import Plan, PlanError, Prediction, StageMemory, StagePlan, Training
from autopar.sharding.rules.common import GRAD_BYTES
from autopar.sharding.rules.einsum import splits_sequence
from autopar.sharding.spec import parse_spec, shard_factor
from autopar.sharding.stage_problem import (
    NOT_RERUN,
    RERUN,
    Evaluation,
    Settings,
    StageProblem,
    checkpoint_roles,
    saved_tensors,
    stage_layers_key,
)
from graphs.annotate import is_unfused_attention
from graphs.ir import ELEMENTWISE, INPUT, LOSS, MATMUL, NORM, OUTPUT, VIEW, OpGraph
from graphs.query import attention_core, main_boundary, stage_nodes

RECOMPUTE = ("none", "selective", "full")
# Whether plans are costed as the eager PyTorch recipe (autopar/costmodel/eager.py) unless a
# caller says otherwise: the one default of the evaluator, the 3D baselines, the planner and the
# CLI, so that they judge a plan alike. Off: on the published Megatron-style runs the recipe's
# terms make time and memory errors worse (bench/calibration/FINDINGS.md section 8).
EAGER_DEFAULT = False
# Per graph (weakly held, so it goes with the graph): stage key -> (problem, choice, evaluation).
_STAGE_CACHE: weakref.WeakKeyDictionary[OpGraph, dict] = weakref.WeakKeyDictionary()


@dataclass
class StageResult:
    plan: StagePlan
    ev: Evaluation
    fwd_s: float
    bwd_s: float
    stash_bytes: float          # per microbatch in flight, after recomputation
    working_bytes: float        # transient peak on top of stashes (recomputed layer)
    param_state_bytes: float
    sync_s: float               # per step: the gradient sync's collectives (ZeRO-2: the weight gather), all of them
    optimizer_s: float
    boundary_bytes: float       # global bytes of the tensor sent to the next stage per microbatch
    recompute_flops: float = 0.0   # forward FLOPs rerun per microbatch (global, all devices)
    # Eager-step terms (autopar.costmodel.eager), per microbatch unless noted; the device's
    # fwd_s / bwd_s above include the cross-entropy and gradient-accumulation ones.
    host_fwd_s: float = 0.0
    host_bwd_s: float = 0.0
    embedding_s: float = 0.0       # device time of the embedding layer's ops (fwd + bwd)
    head_loss_s: float = 0.0       # final norm, LM head, fp32 cross-entropy (fwd + bwd)
    op_comm_s: float = 0.0         # exposed communication inside the ops (resharding, tensor parallel, ZeRO-3)
    comm_overlap_s: float = 0.0    # compute slowed by the collectives hidden behind it (FSDP2, tp_comm_overlap)
    precision_casts_s: float = 0.0  # autocast weight copies, fp32 gradient casts and accumulation
    grad_bucket_s: float = 0.0     # per step: DDP's copy of the gradients into its buckets
    ddp_bucket_bytes: float = 0.0
    ddp_rebuild_bytes: float = 0.0   # step 2's activation peak: DDP's first buckets beside the rebuilt ones
    autocast_cache_bytes: float = 0.0
    cross_entropy_peak_bytes: float = 0.0   # fp32 loss tensors live at the loss backward
    grads_absent_bytes: float = 0.0  # state below param_state_bytes at the activation peak (eager)
    tied_grad_bytes: float = 0.0     # end of the backward: a tied embedding's gradient being accumulated
    fsdp_root_bytes: float = 0.0     # FSDP2's unsharded root weights and gradients (fwd + bwd)
    fsdp_block_bytes: float = 0.0    # FSDP2's per-block backward buffers and prefetch (transient)
    grad_pool_bytes: float = 0.0     # FSDP2's sharded gradients, in the reduce-scatter stream's pool
    # Pipelines (eager, eager.py "pipelines"): a tied head's copy on this stage (local parameters,
    # in the state and optimizer above). What the schedule adds to the stage's own ops (set by
    # `evaluate`; not in fwd_s / bwd_s, which are the ops', as the planner's stage cells are):
    # per microbatch the copy's casts and accumulation, and per step the schedule's gradient
    # scaling and the tied gradients' all-reduce.
    tied_copy_params: float = 0.0
    pipeline_fwd_s: float = 0.0
    pipeline_bwd_s: float = 0.0
    gpu_idle_s: float = 0.0         # of fwd_s + bwd_s: the GPU's idle between the blocks' kernels
    grad_scale_s: float = 0.0
    tied_sync_s: float = 0.0
    # ZeRO 0/1: the gradient sync's buckets (`grad_sync_buckets`), as (share of the stage's last
    # backward done when the bucket's last gradient is made, seconds of its all-reduce); they
    # run beside that backward, and `evaluate` exposes what it does not cover. Empty: sync_s is
    # all exposed after the backward (ZeRO-2's weight gather).
    sync_buckets: tuple[tuple[float, float], ...] = ()


def _recomputed_flops(graph: OpGraph, names, early_stop: bool) -> float:
    """Forward FLOPs full recomputation reruns among `names` (Evaluation.recompute_s)."""
    roles = checkpoint_roles(graph)
    rerun = (RERUN,) if early_stop else (RERUN, NOT_RERUN)
    return sum(graph.node(n).fwd_flops for n in names if roles.get(n, RERUN) in rerun)


def evaluate_stage(graph: OpGraph, cluster: Cluster, st: StagePlan, training: Training,
                   cm: ComputeModel, eager: bool = EAGER_DEFAULT, grad_sync: str | None = None,
                   zero_autocast: bool = False, compiled: bool | None = None,
                   loss: str = "fused", checkpoint_early_stop: bool = True,
                   tp_comm_overlap: bool = False) -> StageResult:
    """The stage's costs; its StagePlan comes back as a copy carrying the per-op records.
    grad_sync: the engine whose gradient buckets it runs (collectives.GRAD_SYNC_ENGINES; None:
    the eager recipe's or the default's, collectives.default_grad_sync_engine).
    zero_autocast: the eager recipe's ZeRO stages run autocast over FSDP2's bf16 parameters (as
    bench/truth's fsdp2 rows did, eager.autocast_over_bf16_params), not as `autopar run` does
    (the same bf16 parameters without autocast, eager.fsdp_bf16_params).
    compiled: whether the eager recipe runs the stage's blocks compiled (None: where `autopar
    run` compiles them, eager.compiled_per_block, by the stage's tensor parallelism and engine). loss: the default model's loss kernel (compute.LOSS_KERNELS; the eager
    recipe prices its own). tp_comm_overlap: the blocks' tensor-parallel collectives run beside
    their linears' GEMMs (`tp_overlap_hidden_s`)."""
    names = stage_nodes(graph, st.layers)
    sub = Submesh(*st.submesh)
    if sub.n_devices != len(st.device_ids):
        raise PlanError(f"stage {st.index}: submesh {st.submesh} has {sub.n_devices} devices but "
                        f"{len(st.device_ids)} device ids are given")
    mesh = Mesh(cluster, sub, (st.logical_mesh[0], st.logical_mesh[1]))
    per_graph = _STAGE_CACHE.setdefault(graph, {})
    layers = (st.layers[0], st.layers[1])
    bsrc = _boundary_of(per_graph, graph, layers, names)
    boundary = {}
    if bsrc is not None:
        spec = parse_spec(st.input_spec) if st.input_spec else tuple(0 for _ in graph.node(bsrc).out_shape)
        if len(spec) != len(graph.node(bsrc).out_shape):
            raise PlanError(f"stage {st.index}: input_spec {st.input_spec!r} does not fit the boundary tensor "
                            f"{bsrc} of shape {graph.node(bsrc).out_shape}")
        boundary[bsrc] = spec
    zero = training.zero
    # Grids of hand-made plans evaluate the same stage under many schedules and recompute
    # settings: the stage's ILP-side cost does not depend on them, so it is computed once.
    sharded_roots = frozenset(st.sharded_storage)
    if sharded_roots and eager:
        # eager_terms prices FSDP2's blocks and state at the stage's one ZeRO level
        raise PlanError(f"stage {st.index}: the eager recipe's terms do not model per-op sharded storage "
                        "(sharded_storage); evaluate without eager")
    key = (tuple(st.layers), sub, mesh.shape, tuple(sorted(boundary.items())),
           tuple(sorted(st.strategies.items())), zero, cluster, id(cm.gpu), cm.dtype, sharded_roots)
    hit = per_graph.get(key)
    settings = Settings(n_microbatches=training.n_microbatches, zero=zero)
    where = (sub, mesh.shape, cluster, id(cm.gpu), cm.dtype, settings)
    if hit is None:
        hit = per_graph[key] = _posed(graph, layers, names, mesh, cm, boundary, st.strategies, settings,
                                      sharded_roots, where, per_graph, st.index)
    prob, choice, ev, assign, shape_key = hit

    fwd, bwd, rec_flops = ev.fwd_s, ev.bwd_s, 0.0
    layer_inputs = max_layer_stash = core_stash = 0.0
    n_layers = st.layers[1] - st.layers[0]
    n_rc = n_layers if st.recompute_layers is None else st.recompute_layers
    if st.recompute == "full" and not 0 <= n_rc <= n_layers:
        raise PlanError(f"stage {st.index}: recompute_layers {n_rc} is not 0 to the stage's {n_layers} layers")
    partial = st.recompute == "full" and n_rc < n_layers
    rc_stash = rc_inputs_fp32 = 0.0    # the recomputed layers' stash and fp32 input extra (partial)
    rc_eager_s = 0.0                   # partial: the eager terms' recomputed forward (EagerTerms.recompute_fwd_s)
    if st.recompute == "full":
        # Keep each recomputed layer's input; rerun those layers' forward during backward, one
        # layer at a time, so one layer's activations are live on top of the stashes. With only
        # the first n_rc layers recomputed (Megatron's block method), the rest keep theirs.
        per_layer = []
        for li in range(st.layers[0], st.layers[0] + n_rc):
            lnames = list(graph.layers[li].nodes)
            src = _boundary_of(per_graph, graph, (li, li + 1), lnames)
            if src is not None:
                node = graph.node(src)
                spec_idx = assign.get(src)
                spec = (prob.strategy_of(src, spec_idx).out_spec if spec_idx is not None else boundary.get(src, ()))
                layer_inputs += node.out_bytes / (shard_factor(spec, mesh) if spec else 1)
            per_layer.append(sum(prob.saved.get(n, 0.0) * prob.strategy_of(n, assign[n]).out_bytes_local
                                 for n in lnames))
        max_layer_stash = max(per_layer) if per_layer else 0.0
        if not partial:
            bwd += ev.recompute_s(checkpoint_early_stop)
            rec_flops = _recomputed_flops(graph, names, checkpoint_early_stop)
        elif n_rc:
            # the recomputed layers as a stage of their own under the same strategies: their
            # forward and stash are the stage's first layers' (layer composition, layer_solver.py)
            pre_layers = (st.layers[0], st.layers[0] + n_rc)
            pre_names = stage_nodes(graph, pre_layers)
            pkey = ("recomputed", *key, n_rc)
            phit = per_graph.get(pkey)
            if phit is None:
                pprob, _, pev, passign, _ = _posed(graph, pre_layers, pre_names, mesh, cm, boundary, st.strategies,
                                                settings, sharded_roots, where, per_graph, None)
                phit = per_graph[pkey] = (pprob, pev, passign)
            pprob, pev, passign = phit
            bwd += pev.recompute_s(checkpoint_early_stop)
            rec_flops = _recomputed_flops(graph, pre_names, checkpoint_early_stop)
            rc_stash = pev.stash_bytes
            if eager:
                pterms = eager_terms(graph, pre_layers, pprob, passign, pev, training.n_microbatches, zero, cm,
                                     zero_autocast, compiled)
                rc_stash += pterms.residual_stash_bytes
                rc_inputs_fp32 = pterms.inputs_fp32_extra_bytes
                rc_eager_s = pterms.recompute_fwd_s
    elif st.recompute == "selective":
        core = attention_core(graph, names)
        dropped = [n for n in core if prob.saved.get(n)]
        core_stash = sum(prob.saved[n] * _core_kept_bytes(graph, prob, n, assign[n]) for n in dropped)
        if dropped:
            # Rebuilding the dropped scores reruns the whole attention core (QK^T, scale, mask,
            # softmax, dropout), not only the ops whose outputs were kept.
            bwd += sum(prob.strategy_of(n, assign[n]).fwd_s for n in core)
            rec_flops = sum(graph.node(n).fwd_flops for n in core)

    terms = (eager_terms(graph, st.layers, prob, assign, ev, training.n_microbatches, zero, cm, zero_autocast,
                         compiled) if eager else NO_EAGER)
    if st.recompute == "full":
        layer_inputs += rc_inputs_fp32 if partial else terms.inputs_fp32_extra_bytes
        bwd += rc_eager_s if partial else terms.recompute_fwd_s
    stash = stash_after_recompute(st.recompute, ev.stash_bytes + terms.residual_stash_bytes, layer_inputs, core_stash,
                                  recomputed_stash_bytes=rc_stash if partial else None)
    working = working_after_recompute(st.recompute, max_layer_stash)
    nxt = (st.layers[1], st.layers[1] + 1)      # the stage's output: the next layer's input
    out_node = _boundary_of(per_graph, graph, nxt, stage_nodes(graph, nxt)) if nxt[0] < len(graph.layers) else None
    bbytes = graph.node(out_node).out_bytes if out_node else 0.0
    fwd += terms.fwd_s
    bwd += terms.bwd_s
    loss_fwd, loss_bwd = megatron_loss_delta_s(graph, prob, assign, cm) if loss == "megatron" else (0.0, 0.0)
    fwd += loss_fwd
    bwd += loss_bwd
    first, last = 0, len(graph.layers) - 1
    stage_params = sum(graph.layers[li].param_count for li in range(*st.layers))
    share = ev.param_elems / stage_params if stage_params else 0.0
    tied_copy = tied_copy_elems(graph, st.layers) * share if eager else 0.0

    layer_of = {n: li for li in range(*st.layers) for n in graph.layers[li].nodes}
    op_s = {o["name"]: o["compute_s"] + o["comm_s"] for o in ev.ops}
    embedding_s = sum(op_s.get(n, 0.0) for n in names if layer_of.get(n) == first)
    head_s = sum(op_s.get(n, 0.0) for n in names if layer_of.get(n) == last)
    units = NO_ZERO_UNITS
    engine = grad_sync or default_grad_sync_engine(eager)
    if zero_priced_per_unit(eager, zero, sub.n_devices, engine):
        rc_layers = (0 if st.recompute != "full" else n_rc)
        units = zero_units(graph, st.layers, prob, assign, zero, rc_layers)
        fwd += units.fwd_delta_s
        bwd += units.bwd_delta_s
        embedding_s += units.root_delta_s[0]
        head_s += units.root_delta_s[1]
    copy_share = 1.0 + tied_copy / ev.param_elems if ev.param_elems else 1.0
    tied = 0.0
    if eager and st.layers[0] == first and st.layers[1] == last + 1:
        tied = tied_embedding_elems(graph)
        if zero >= 2 and ev.param_elems:
            tied *= ev.param_elems_zero / ev.param_elems
    # autopar run's ZeRO-1/2 are FSDP2's (eager.fsdp_zero12): their fp32 gradients are sharded
    # (grads_absent_bytes, fsdp_grad_pool_bytes). They gather once per step and keep the weights
    # unsharded, so no block buffers at the activation peak: a block's reduce-scatter buffers
    # come with its backward.
    fsdp_block = 0.0
    if eager and zero >= 3 and sub.n_devices > 1:
        fsdp_block = max((fsdp_block_buffer_bytes(graph, li, prob, assign) for li in range(*st.layers)), default=0.0)
    buckets: tuple[tuple[float, float], ...] = ()
    if zero <= 1:
        # a function of the problem's ops in order, their strategies and the mesh: shared as
        # the problem is (_posed)
        bkey = ("buckets", shape_key if shape_key is not None else key, engine)
        known = per_graph.get(bkey)
        buckets = known if known is not None else per_graph.setdefault(bkey, grad_sync_buckets(prob, assign, zero, engine))
    sync = sum(d for _, d in buckets) if zero <= 1 else ev.sync_s + units.step_delta_s
    tp_hidden = tp_slow = 0.0
    if tp_comm_overlap:
        if zero >= 3:
            raise PlanError(f"stage {st.index}: tp_comm_overlap with ZeRO-{zero} is not modelled (its weight "
                            "gathers are not tensor-parallel collectives); evaluate without it")
        tp_hidden = tp_overlap_hidden_s(graph, st.layers, ev.ops)
        tp_slow = comm_overlap_s(tp_hidden)
        # a tensor-parallel collective's backward is its mirror (all-gather <-> reduce-scatter,
        # all-reduce <-> identity + all-reduce): half the hidden time is the forward's
        fwd += (tp_slow - tp_hidden) / 2
        bwd += (tp_slow - tp_hidden) / 2
    return StageResult(replace(st, ops=[dict(o) for o in ev.ops]), ev, fwd, bwd, stash, working,
                       (ev.param_state_bytes(zero) + terms.param_state_delta_bytes) * copy_share,
                       sync, optimizer_step_s(ev, zero, cm, copy_share), bbytes, rec_flops,
                       host_fwd_s=terms.host_fwd_s, host_bwd_s=terms.host_bwd_s, embedding_s=embedding_s,
                       head_loss_s=head_s + terms.cross_entropy_s + loss_fwd + loss_bwd,
                       op_comm_s=ev.comm_s + terms.comm_delta_s + units.comm_delta_s - tp_hidden,
                       comm_overlap_s=terms.comm_overlap_s + units.overlap_s + tp_slow,
                       precision_casts_s=terms.precision_casts_s, grad_bucket_s=terms.grad_bucket_s,
                       gpu_idle_s=terms.idle_s,
                       ddp_bucket_bytes=terms.ddp_bytes, ddp_rebuild_bytes=terms.ddp_rebuild_bytes,
                       autocast_cache_bytes=terms.autocast_cache_bytes * copy_share,
                       cross_entropy_peak_bytes=terms.cross_entropy_peak_bytes,
                       grads_absent_bytes=grads_absent_bytes(ev, zero, sub.n_devices, training.n_microbatches,
                                                             zero_autocast) if eager else 0.0,
                       fsdp_root_bytes=terms.fsdp_root_bytes, fsdp_block_bytes=fsdp_block,
                       tied_grad_bytes=eager_mod.tied_embedding_grad_bytes(tied),
                       grad_pool_bytes=fsdp_grad_pool_bytes(ev, zero, sub.n_devices, zero_autocast) if eager else 0.0,
                       tied_copy_params=tied_copy, sync_buckets=buckets)


def tp_overlap_hidden_s(graph: OpGraph, layers: tuple[int, int], ops: list[dict]) -> float:
    """Seconds of the stage's tensor-parallel collectives (per microbatch, forward + backward)
    that run beside the GEMMs of the blocks' linears, as Megatron-Core's `--tp-comm-overlap`
    runs them (Transformer Engine's userbuffers split each linear's GEMM into chunks and move
    the next chunk's activations over NVLink while one multiplies: the sequence-parallel
    all-gather before a column-parallel linear, the reduce-scatter after a row-parallel one,
    and their mirrors in the backward). A collective pairs with its linear: the one whose
    input it gathers (an op's own communication: `ops`' comm_s, its inputs' resharding
    included), or the one whose partial output it reduces (the first consumer's, through
    views). Linears that read one tensor (q, k and v; a gate and an up projection) are one GEMM
    to Megatron (its fused QKV and FC1) and share that tensor's gather: their collectives and
    GEMMs are summed, and the part the GEMMs cover is hidden, min(collectives, GEMMs). Only the
    blocks' linears (TE modules); the embedding's and the head's collectives stay exposed."""
    first, last = 0, len(graph.layers) - 1
    in_blocks = {n for li in range(max(layers[0], first + 1), min(layers[1], last)) for n in graph.layers[li].nodes}
    by_name = {o["name"]: o for o in ops}

    def linear_of(name: str) -> str | None:
        node = graph.node(name)
        if node.kind == MATMUL:
            return name
        for o in node.operands:
            src = o.source
            while src is not None and src in by_name and graph.node(src).kind == VIEW:
                operands = graph.node(src).operands
                src = operands[0].source if operands else None
            if src is not None and src in by_name and graph.node(src).kind == MATMUL:
                return src
        return None

    def reads(lin: str) -> str:
        for o in graph.node(lin).operands:
            if not o.is_param and o.source is not None:
                return o.source
        return lin

    comm: dict[str, float] = {}
    gemm: dict[str, float] = {}
    for o in ops:
        if o["name"] in in_blocks and graph.node(o["name"]).kind == MATMUL:
            key = reads(o["name"])
            gemm[key] = gemm.get(key, 0.0) + o["compute_s"]
    for o in ops:
        if o["comm_s"] <= 0 or o["name"] not in in_blocks:
            continue
        lin = linear_of(o["name"])
        if lin is not None and lin in in_blocks:
            key = reads(lin)
            comm[key] = comm.get(key, 0.0) + o["comm_s"]
    return sum(min(c, gemm[key]) for key, c in comm.items())


# Whether stages of one structure share their problem (_posed); False poses one per stage, as
# before (the oracle of tests/unit/test_speed_h10_stage_sharing.py).
SHARE_STAGES = True


def _posed(graph: OpGraph, layers: tuple[int, int], names: list[str], mesh: Mesh, cm: ComputeModel, boundary: dict, strategies: dict[str, str],
           settings: Settings, sharded_roots: frozenset[str], where: tuple, per_graph: dict,
           stage_index: int | None) -> tuple[StageProblem, Any, Evaluation, dict[str, int], tuple | None]:
    """(problem, group choice, evaluation, assignment) of the ops `names` (those of `layers`) under `strategies`
    (stage_index given: with the per-op records, and an error in the evaluation as the
    stage's PlanError; None: without them, the recomputed layers of evaluate_stage).

    The planner simulates candidates whose stages repeat a few layer structures: gpt-39b
    evaluates hundreds of stages per microbatch size, the 405B shape at microbatch 16 402
    stages whose 454 problems (8 ms to pose, 8 ms to evaluate each) were almost all posed
    afresh, their layers' indices differing. A stage whose ops have the structure of one
    posed before (stage_shape_key: the same ops, operands, outside producers and stash, by
    position; stage_layers_key makes it from each layer's), on the same mesh and compute model (`where`: submesh, shape, cluster, GPU,
    dtype, Settings), under the same strategies by position, is that problem renamed
    (StageProblem.renamed) and its evaluation with each op record's name changed: the same
    figures, summed in the same order. Stages with per-op sharded storage (names in
    `sharded_roots`) are posed afresh. Last in the tuple: the key it is shared under (None:
    not shared)."""
    with_ops = stage_index is not None
    skey = None
    if SHARE_STAGES and not sharded_roots:
        skey = ("shape", with_ops, where, stage_layers_key(graph, layers, boundary),
                tuple(strategies.get(n) for n in names))
        shared = per_graph.get(skey)
        if shared is not None:
            prob0, choice, ev0 = shared
            prob = prob0.renamed(names, boundary)
            ev = replace(ev0, ops=[{**o, "name": n} for o, n in zip(ev0.ops, names)]) if with_ops else ev0
            return prob, choice, ev, prob.assignment(choice), skey
    prob = StageProblem(graph, names, mesh, cm, boundary=boundary)
    choice = prob.choice_from_names(strategies)
    roots = sharded_roots if with_ops else sharded_roots & {g.root for g in prob.groups}
    try:
        ev = prob.evaluate(choice, settings, with_ops=with_ops, sharded_roots=roots)
    except ValueError as e:
        if stage_index is None:
            raise
        raise PlanError(f"stage {stage_index}: {e}") from None
    if skey is not None:
        per_graph[skey] = (prob, choice, ev)
    return prob, choice, ev, prob.assignment(choice), skey


def tied_copy_elems(graph: OpGraph, layers: tuple[int, int]) -> int:
    """Parameters (global) of the copy a stage of layers [layers[0], layers[1]) holds of weights
    its LM head shares with an embedding on another stage (eager.py "pipelines" (b): under the
    eager recipe the copy has its own state, casts and accumulation, and optimizer step): the
    parameters the last layer reads that no op of the stage owns; 0 for a stage without the
    head or with the embedding. The evaluator scales the stage's state, autocast cache and
    optimizer step by 1 + this / the stage's parameters (copy_share); the planner's tables
    (search/range_table.py) by the same ratio."""
    first, last = 0, len(graph.layers) - 1
    if layers[0] == first or layers[1] != last + 1:
        return 0
    names = stage_nodes(graph, layers)
    owned = {o.param for n in names for o in graph.node(n).operands if o.is_param and o.owns_param}
    borrowed = {o.param: _numel(o.shape) for n in graph.layers[last].nodes for o in graph.node(n).operands
                if o.is_param and o.param not in owned}
    return sum(borrowed.values())


def tied_embedding_elems(graph: OpGraph) -> int:
    """Parameters (global) the embedding owns and the LM head reads (a tied head's weight): on
    a stage holding both, the embedding's gradient of them is accumulated into the head's at
    the end of the backward (eager.tied_embedding_grad_bytes)."""
    first, last = 0, len(graph.layers) - 1
    head_params = {o.param for n in graph.layers[last].nodes for o in graph.node(n).operands if o.is_param}
    return sum(_numel(o.shape) for n in graph.layers[first].nodes for o in graph.node(n).operands
               if o.is_param and o.owns_param and o.param in head_params)


def grads_absent_bytes(ev: Evaluation, zero: int, n_devices: int, n_microbatches: int, zero_autocast: bool = False,
                       dp_sharded: bool | None = None) -> float:
    """eager.gradients_absent_at_activation_peak_bytes of the ops `ev` prices on `n_devices`
    (their ZeRO share of gradients under FSDP2). Linear in the ops' parameters: the evaluator
    (StageResult.grads_absent_bytes) and the planner's tables (LayerSol.grads_absent_bytes)
    both ask this. dp_sharded: as eager_terms'."""
    zero12 = _fsdp_zero12(ev, zero, zero_autocast, dp_sharded)
    return eager_mod.gradients_absent_at_activation_peak_bytes(
        ev.param_elems, ev.param_elems_zero if zero >= 2 or zero12 else ev.param_elems,
        zero >= 3 and n_devices > 1 or zero12, n_microbatches, fsdp_zero1=zero12 and zero == 1)


def _fsdp_zero12(ev: Evaluation, zero: int, zero_autocast: bool, dp_sharded: bool | None) -> bool:
    """eager.fsdp_zero12 for the ops `ev` prices, in a stage sharded over its data-parallel
    degree as `dp_sharded` says (None: as the ops' own parameters are, stage_dp_sharded)."""
    return eager_mod.fsdp_zero12(zero, stage_dp_sharded(ev) if dp_sharded is None else dp_sharded, zero_autocast)


def stage_dp_sharded(ev: Evaluation) -> bool:
    """Whether the ops `ev` prices shard some parameters over the data-parallel degree (their
    ZeRO share is less than their local parameters): what decides, for a whole stage, whether
    the eager recipe runs it on FSDP2 with bf16 parameters (eager.fsdp_bf16_params,
    fsdp_zero12). A stage's is true where any of its layers' is: the planner's tables price a
    layer both ways and take, per range of layers, the way its layers decide
    (LayerSol.unsharded_delta)."""
    return ev.param_elems_zero < ev.param_elems


def fsdp_grad_pool_bytes(ev: Evaluation, zero: int, n_devices: int, zero_autocast: bool = False,
                         dp_sharded: bool | None = None) -> float:
    """FSDP2's gradient pool (eager.zero3_grad_pool_bytes) of the ops `ev` prices under the
    eager recipe on `n_devices`: ZeRO-3 on several devices, and ZeRO-1/2 where they run on
    FSDP2 (eager.fsdp_zero12); 0 elsewhere. Linear in the ops' parameters, so a stage's is its
    layers' summed: the evaluator (StageResult.grad_pool_bytes) and the planner's tables
    (LayerSol.grad_pool_bytes) both ask this. dp_sharded: as eager_terms'."""
    if zero >= 3 and n_devices > 1 or _fsdp_zero12(ev, zero, zero_autocast, dp_sharded):
        return eager_mod.zero3_grad_pool_bytes(ev.param_elems_zero)
    return 0.0


def megatron_loss_delta_s(graph: OpGraph, prob: StageProblem, assign: dict[str, int],
                          cm: ComputeModel) -> tuple[float, float]:
    """(forward, backward) seconds the default model adds per microbatch to the loss ops among
    `prob`'s: Megatron's fp32 vocab-parallel cross-entropy
    (ComputeModel.vocab_parallel_cross_entropy_s) beyond each loss op's own pricing, on the
    logits this GPU holds under the strategies `assign` picks. The evaluator adds it where a
    plan is evaluated with loss="megatron" (evaluate); the planner plans the fused loss."""
    fwd = bwd = 0.0
    for n in prob.names:
        node = graph.node(n)
        src = node.operands[0].source if node.kind == LOSS and node.operands else None
        if src is None or n not in assign:
            continue
        if src in assign:
            local_bytes = prob.strategy_of(src, assign[src]).out_bytes_local
        else:
            spec = prob.boundary.get(src)
            local_bytes = graph.node(src).out_bytes / (shard_factor(spec, prob.mesh) if spec else 1)
        src_node = graph.node(src)
        logits = local_bytes / (src_node.out_bytes / _numel(src_node.out_shape))
        ce_fwd, ce_bwd = cm.vocab_parallel_cross_entropy_s(logits)
        own = prob.strategy_of(n, assign[n])
        fwd += max(0.0, ce_fwd - own.fwd_s)
        bwd += max(0.0, ce_bwd - own.bwd_s)
    return fwd, bwd


def optimizer_step_s(ev: Evaluation, zero: int, cm: ComputeModel, copies: float = 1.0) -> float:
    """The optimizer step of the parameters `ev` holds, those this GPU updates (its ZeRO shard
    from ZeRO-1 on), `copies` times (a tied head's copy, eager pipelines). Linear in the
    parameters, so a stage's is the sum of its layers' (the planner's tables add them up)."""
    return eager_mod.optimizer_s((ev.param_elems_zero if zero >= 1 else ev.param_elems) * copies, cm)


def fsdp_block_buffer_bytes(graph: OpGraph, li: int, prob: StageProblem, assign: dict[str, int]) -> float:
    """FSDP2's transient buffers while layer `li` runs its backward as a block of an eager
    ZeRO-3 stage (eager.fsdp_buffer_bytes), from its unsharded parameters per tensor-parallel
    shard under the strategies `assign` picks; 0 for the root layers (the first and the last).
    A stage holds its largest block's at once: the evaluator and the planner's tables
    (search/range_table.py) both take the largest of these."""
    if not 0 < li < len(graph.layers) - 1:
        return 0.0
    local = sum(prob.strategy_of(n, assign[n]).param_elems_local for n in graph.layers[li].nodes if n in assign)
    return eager_mod.fsdp_buffer_bytes(0.0, local)[1]


@dataclass(frozen=True)
class ZeroUnits:
    """ZeRO-2/3's collectives as FSDP runs them (`zero_units`), as changes to a stage's
    evaluation, whose ops price each parameter's collectives alone (sharding/rules/common.py
    `param_terms`): per microbatch, forward and backward (the ops' collectives replaced by the
    exposed part of the units' and the compute's slowdown beside the rest), the part of them
    that is communication, the slowdown, and the root units' change (embedding, head: in the
    breakdown's parts of their own); per step, ZeRO-2's weight gather."""

    fwd_delta_s: float = 0.0
    bwd_delta_s: float = 0.0
    comm_delta_s: float = 0.0
    overlap_s: float = 0.0
    root_delta_s: tuple[float, float] = (0.0, 0.0)
    step_delta_s: float = 0.0


NO_ZERO_UNITS = ZeroUnits()


def zero_priced_per_unit(eager: bool, zero: int, n_devices: int, engine: str) -> bool:
    """Whether a stage's ZeRO-2/3 collectives are priced per FSDP unit (zero_units): under the
    default model (the eager recipe has its own FSDP2 terms), at ZeRO-2/3 on more than one
    device, with an engine that gathers per unit (collectives.zero_gathers_per_unit). The
    evaluator and the planner's tables (LayerSolver.prices_zero_units) both ask this."""
    return not eager and zero >= 2 and n_devices > 1 and zero_gathers_per_unit(engine)


def zero_units(graph: OpGraph, layers: tuple[int, int], prob: StageProblem, assign: dict[str, int],
               zero: int, recomputed_layers: int = 0) -> ZeroUnits:
    """ZeRO-2/3 of the layers [layers[0], layers[1]) as FSDP runs them: one flat parameter per
    unit, a transformer block (llm-foundry and torchtitan wrap each block; DeepSpeed ZeRO-3
    gathers in prefetch buckets of about a block), so one collective per unit, kind and group,
    its latency paid once, not once per tensor. A block's collectives run on one stream beside
    the compute of its neighbours, as FSDP prefetches them (`eager.fsdp_block_comm_s`, the
    schedule FSDP2's measured rows fix; the stage's first and last block have nothing to hide
    behind on one side); the compute slows beside the hidden part (`comm_overlap_s`). A
    recomputed block's backward reruns its forward, which the gather of the next block hides
    behind too. The root units (embedding, head and final norm, the layers outside the blocks)
    gather once at the start and are exposed. ZeRO-2 (FSDP's SHARD_GRAD_OP) reduce-scatters
    each block's gradients beside the backward, and gathers the updated weights once per step,
    in the next forward, prefetched as ZeRO-3's forward gathers are.

    The stage's figure is the sum of its layers' (`zero_unit_layer`), each priced at its place
    among the stage's blocks (first, last, recomputed): the planner's tables add up the same
    per-layer figures (search/range_table.py)."""
    first, last = 0, len(graph.layers) - 1
    blocks = [li for li in range(*layers) if first < li < last]
    lo, hi = (blocks[0], blocks[-1]) if blocks else (-1, -1)
    total = NO_ZERO_UNITS
    for li in range(*layers):
        u = zero_unit_layer(graph, li, prob, assign, zero, first=li == lo, last=li == hi,
                            recomputed=li < layers[0] + recomputed_layers)
        total = ZeroUnits(total.fwd_delta_s + u.fwd_delta_s, total.bwd_delta_s + u.bwd_delta_s,
                          total.comm_delta_s + u.comm_delta_s, total.overlap_s + u.overlap_s,
                          (total.root_delta_s[0] + u.root_delta_s[0], total.root_delta_s[1] + u.root_delta_s[1]),
                          total.step_delta_s + u.step_delta_s)
    return total


def zero_unit_layer(graph: OpGraph, li: int, prob: StageProblem, assign: dict[str, int], zero: int,
                    first: bool = False, last: bool = False, recomputed: bool = False) -> ZeroUnits:
    """One layer's part of `zero_units`: layer `li` (ops of `prob` under `assign`) as a root
    unit, or as a block that is the stage's first block (`first`), its last (`last`), both or
    neither, its forward rerun in its backward or not (`recomputed`)."""
    return zero_unit_price(zero_layer_collectives(graph, li, prob, assign, zero), first, last, recomputed)


@dataclass(frozen=True)
class ZeroLayer:
    """What `zero_unit_price` needs of one layer: whether it is a root unit; its ops' compute,
    forward and backward (with and without its forward rerun); per collective, one per group
    (the unit's) and the ops' per-tensor seconds."""

    root: int            # 0: a block; else which root unit (1 the first layer, 2 the last)
    c_f: float
    c_b: float
    c_b_rec: float
    ag_f: float
    old_ag_f: float
    ag_b: float
    old_ag_b: float
    rs: float
    old_rs: float
    ag_step: float
    old_step: float


def zero_layer_collectives(graph: OpGraph, li: int, prob: StageProblem, assign: dict[str, int],
                           zero: int) -> ZeroLayer | None:
    """Layer `li`'s ZeRO collectives and compute (ZeroLayer); None where it has none."""
    mesh = prob.mesh
    c_f = c_b = c_b_rec = 0.0
    # per (phase, kind, mask): bytes, per-tensor seconds
    colls: dict[tuple[str, str, int], list[float]] = {}
    for n in graph.layers[li].nodes:
        if n not in assign:
            continue
        st = prob.strategy_of(n, assign[n])
        c_f += st.fwd_s
        c_b += st.bwd_s
        c_b_rec += st.bwd_s + st.fwd_s
        for c in st.runs(zero):
            if c.purpose == ZERO:
                b = colls.setdefault((c.phase, c.kind, c.mask), [0.0, 0.0])
                b[0] += c.nbytes
                b[1] += c.time_s
    if not colls:
        return None

    def unit_s(phase: str, kind: str) -> tuple[float, float]:
        """(one collective per group, the ops' per-tensor seconds) of the unit's `kind` in `phase`."""
        got = [(collective_s(k, nb, mesh.axis(m)), old) for (ph, k, m), (nb, old) in colls.items()
               if ph == phase and k == kind]
        return sum(g[0] for g in got), sum(g[1] for g in got)

    root = 1 if li == 0 else 2 if li == len(graph.layers) - 1 else 0
    return ZeroLayer(root, c_f, c_b, c_b_rec, *unit_s(FORWARD, ALL_GATHER), *unit_s(BACKWARD, ALL_GATHER),
                     *unit_s(BACKWARD, REDUCE_SCATTER), *unit_s(STEP, ALL_GATHER))


def zero_unit_price(z: ZeroLayer | None, first: bool = False, last: bool = False,
                    recomputed: bool = False) -> ZeroUnits:
    """`zero_unit_layer` of a layer's ZeroLayer (found once, priced at each place)."""
    if z is None:
        return NO_ZERO_UNITS
    if z.root:
        d_f, d_b = z.ag_f - z.old_ag_f, z.ag_b + z.rs - z.old_ag_b - z.old_rs
        root = (d_f + d_b, 0.0) if z.root == 1 else (0.0, d_f + d_b)
        return ZeroUnits(d_f, d_b, d_f + d_b, 0.0, root, z.ag_step - z.old_step)
    c_b = z.c_b_rec if recomputed else z.c_b
    exp_f, exp_b, hidden = eager_mod.fsdp_block_comm_s(z.c_f, c_b, z.ag_f, z.ag_b, z.rs, first=first, last=last)
    slow_f = comm_overlap_s(z.ag_f - exp_f)
    slow_b = comm_overlap_s(hidden - (z.ag_f - exp_f))
    step = 0.0
    if z.ag_step or z.old_step:
        # the first microbatch's forward hides the weight gather as ZeRO-3's gathers
        s_f = eager_mod.fsdp_block_comm_s(z.c_f, 0.0, z.ag_step, 0.0, 0.0, first=first)[0]
        step = s_f + comm_overlap_s(z.ag_step - s_f) - z.old_step
    return ZeroUnits(exp_f + slow_f - z.old_ag_f, exp_b + slow_b - z.old_ag_b - z.old_rs,
                     exp_f + exp_b - (z.old_ag_f + z.old_ag_b + z.old_rs), slow_f + slow_b, (0.0, 0.0), step)


def grad_sync_buckets(prob: StageProblem, assign: dict[str, int], zero: int, engine: str,
                      part_of_stage: bool = False) -> tuple[tuple[float, float], ...]:
    """The data-parallel gradient sync (ZeRO 0/1) of the ops `prob` holds under the strategies
    `assign` picks, as `engine` runs it (collectives.py, "the data-parallel gradient sync"):
    the backward runs the ops in reverse, each taking its own backward time (compute and
    collectives); every weight gradient joins its process group's bucket when its op is done.
    Per bucket: (share of the backward done when it is launched, seconds of its all-reduce);
    an engine that reduces after the backward launches every bucket at its end (share 1).
    part_of_stage: the ops are some of a stage's (a layer, for the planner): a bucket they leave
    partly filled is priced at the full bucket's rate per byte, as the rest of it is the next
    layer's, so it pays its share of one latency, not a latency of its own. An op whose
    parameters are stored sharded in a ZeRO-1 stage keeps its place in the buckets: one
    reduction per step is priced as at the stage's level (strategy.sharded_storage_cost)."""
    mesh = prob.mesh
    factor = grad_reduce_factor(engine)
    grads = []
    t = 0.0
    for name in reversed(prob.names):
        if name not in assign:
            continue
        st = prob.strategy_of(name, assign[name])
        t += st.bwd_s + st.bwd_comm_s
        grads += [(t, c.mask, c.nbytes * factor) for c in st.runs(zero) if c.purpose == GRAD_SYNC]
    if not grads:
        return ()
    sizes = {m: grad_bucket_bytes(engine, mesh.factor(m), GRAD_BYTES * factor) for _, m, _ in grads}
    overlaps = grad_sync_overlaps(engine)

    return tuple((b.ready_s / t if t > 0 and overlaps else 1.0,
                  all_reduce_share_s(b.nbytes, sizes[b.mask], mesh.axis(b.mask))
                  if part_of_stage and b.nbytes < sizes[b.mask] else all_reduce_s(b.nbytes, mesh.axis(b.mask)))
                 for b in fill_buckets(grads, sizes, t))


def grad_sync_step_s(prob: StageProblem, assign: dict[str, int], ev: Evaluation, zero: int, engine: str,
                     bwd_s: float) -> float:
    """What the gradient sync adds to a step, per layer, for the planner's tables, which add
    up layers: the layer priced as `evaluate` prices a stage of it alone, its buckets beside its
    own backward `bwd_s`: the part the backward does not cover (at least its last bucket) and
    the compute's slowdown beside the rest; a bucket it leaves partly filled pays its share of
    a latency (`grad_sync_buckets`, part_of_stage). Summed over a stage's layers this is the
    stage's figure within each layer's last bucket and a latency (tests check it): a stage's
    backward covers each layer's last bucket but the stage's last, which pays a whole latency.
    ZeRO-2's weight gather stays exposed, as in `evaluate`."""
    if zero > 1:
        return ev.sync_s
    jobs = [(bwd_s * share, d) for share, d in grad_sync_buckets(prob, assign, zero, engine, part_of_stage=True)]
    exposed, hidden = overlapped_sync_s(jobs, max(0.0, bwd_s))
    return exposed + comm_overlap_s(hidden)


def _core_kept_bytes(graph: OpGraph, prob: StageProblem, name: str, index: int) -> float:
    """What selective recomputation drops of an attention-core op's stash: the whole output of
    a score op (QK^T, softmax, ...), but only the kept scores of an unfused attention op, whose
    [b, h, s, d] output the next op still reads (its strategy's out_bytes_local holds both,
    sharding/rules/attention.py)."""
    st = prob.strategy_of(name, index)
    node = graph.node(name)
    if not is_unfused_attention(node):
        return st.out_bytes_local
    return st.out_bytes_local - node.out_bytes / shard_factor(st.out_spec, prob.mesh)


@dataclass(frozen=True)
class EagerTerms:
    """What the eager PyTorch recipe adds to a set of consecutive layers under one sharding
    (autopar/costmodel/eager.py). Every field is a sum over the layers' ops, so a stage's terms
    are its layers' terms added up: the planner's per-layer solutions (search/layer_solver.py)
    and the evaluator's stages use this one function."""

    fwd_s: float = 0.0                 # device, per microbatch: autocast's fp32 norms and input casts
    bwd_s: float = 0.0                 # device, per microbatch: their backward, cross_entropy_s, precision_casts_s
    cross_entropy_s: float = 0.0       # fp32 cross-entropy beyond the loss op's own cost (in bwd_s)
    precision_casts_s: float = 0.0     # weight copies, gradient casts and accumulation (in bwd_s)
    idle_s: float = 0.0                # the GPU's idle between the blocks' kernels (in fwd_s and bwd_s)
    host_fwd_s: float = 0.0            # host dispatch per microbatch
    host_bwd_s: float = 0.0
    grad_bucket_s: float = 0.0         # per step: DDP's copy of the gradients into its buckets
    residual_stash_bytes: float = 0.0  # per microbatch in flight: the norms' fp32 inputs, less the loss's logits
    inputs_fp32_extra_bytes: float = 0.0  # the layers' fp32 inputs beyond their graph size (full recompute)
    cross_entropy_peak_bytes: float = 0.0  # fp32 loss tensors at the start of the loss backward
    ddp_bytes: float = 0.0             # whole step: DDP's gradient buckets
    ddp_rebuild_bytes: float = 0.0     # step 2's activation peak: DDP's first buckets (eager.ddp_rebuild_transient_bytes)
    autocast_cache_bytes: float = 0.0  # whole step, several microbatches: autocast's weight cache
    fsdp_root_bytes: float = 0.0       # forward and backward: FSDP2's unsharded root weights and grads
    param_state_delta_bytes: float = 0.0  # whole step: FSDP2's ZeRO-1/2 state less the graph's (memory.py)
    # per microbatch, in fwd_s / bwd_s: the change to the ops' communication (FSDP2's blocks'
    # collectives hidden behind their compute, less its fp32 reduce-scatter's extra bytes;
    # DTensor's per-linear fp32 input-gradient all-reduces, eager.tp_input_grad_all_reduce_s), and
    # the compute's slowdown beside the hidden part (eager.fsdp_block_comm_s, comm_overlap_s)
    comm_delta_s: float = 0.0
    comm_overlap_s: float = 0.0
    # per microbatch, if the blocks are recomputed whole (full recomputation), beyond the graph's
    # forward (Evaluation.recompute_s): in eager blocks the fp32 stream of their norms again and
    # autocast's weight copies made again; in compiled blocks the fused pointwise kernels in the
    # place of the graph's ops (negative)
    recompute_fwd_s: float = 0.0

    @property
    def device_s(self) -> float:
        """Device seconds per microbatch (forward + backward)."""
        return self.fwd_s + self.bwd_s

    @property
    def held_bytes(self) -> float:
        """Bytes held through the step beyond weights, gradients and optimizer state, as the
        planner counts a layer: at one moment that has them all, so DDP's rebuild transient too
        (the evaluator counts it at the activation peak only)."""
        return (self.ddp_bytes + self.ddp_rebuild_bytes + self.autocast_cache_bytes + self.fsdp_root_bytes
                + self.param_state_delta_bytes)


NO_EAGER = EagerTerms()


def eager_terms(graph: OpGraph, layers: tuple[int, int], prob: StageProblem, assign: dict[str, int],
                ev: Evaluation, n_microbatches: int, zero: int, cm: ComputeModel,
                zero_autocast: bool = False, compiled: bool | None = None,
                dp_sharded: bool | None = None) -> EagerTerms:
    """The eager recipe's terms of layers [layers[0], layers[1]) whose ops `prob` holds, under
    the strategies `assign` picks (ev: prob's evaluation of them). zero_autocast, compiled:
    as `evaluate_stage`'s. dp_sharded: whether the stage these layers are part of
    shards some parameters over its data-parallel degree (`stage_dp_sharded`), which decides
    how FSDP2 runs all of them; None: these layers are the stage."""
    names = list(prob.names)
    inside = set(names)
    first, last = 0, len(graph.layers) - 1

    def local_elems(src: str) -> tuple[float, float]:
        """(local bytes, bytes per element) of a tensor the layers read or make."""
        node = graph.node(src)
        if src in assign:
            local = prob.strategy_of(src, assign[src]).out_bytes_local
        else:
            spec = prob.boundary.get(src)
            local = node.out_bytes / (shard_factor(spec, prob.mesh) if spec else 1)
        return local, node.out_bytes / _numel(node.out_shape)

    fwd = bwd = ce_s = ce_peak = residual = tp_grad_delta = rerun = 0.0

    def charge(li: int | None, f: float, b: float, rerun_too: bool = False) -> None:
        """Device seconds an op's eager kernels add beyond the graph's price of it, forward and
        backward: to the layers' terms, to its FSDP2 block's compute (`blocks`, layer `li`),
        and (`rerun_too`) to the forward full recomputation reruns."""
        nonlocal fwd, bwd, rerun
        fwd += f
        bwd += b
        if rerun_too:
            rerun += f
        if li is not None:
            acc = blocks.setdefault(li, [0.0] * 5)
            acc[0] += f
            acc[1] += b
    n_linears = n_other = 0
    split_linears: set[str] = set()
    vocab_split_head: str | None = None
    fsdp = zero >= 3 and prob.mesh.n_devices > 1
    # ZeRO runs as FSDP2 with bf16 parameters and no autocast (eager.fsdp_bf16_params): no fp32
    # residual stream, input copies or weight cache, a bf16 loss; ZeRO-1/2 (eager.fsdp_zero12)
    # with their own state and no DDP buckets.
    if dp_sharded is None:
        dp_sharded = stage_dp_sharded(ev)
    bf16 = eager_mod.fsdp_bf16_params(zero, dp_sharded, zero_autocast)
    zero12 = eager_mod.fsdp_zero12(zero, dp_sharded, zero_autocast)
    # bench/truth's fsdp2 recipe: autocast over those bf16 parameters, a bf16 residual stream
    # whose norms run in fp32 only where autocast casts them, and no weight cache
    bf16_stream = eager_mod.autocast_over_bf16_params(zero, dp_sharded, zero_autocast)
    layer_of = {m: li for li in range(*layers) if first < li < last for m in graph.layers[li].nodes} if fsdp else {}
    # The blocks run compiled where the runtime compiles them (eager.compiled_per_block: by the
    # devices the blocks' weights are split over, and by the engine the stage runs on: FSDP2
    # where autopar run's ZeRO shards, eager.fsdp_bf16_params; context parallelism where a
    # block's op splits the sequence): their ops are one compiled region per block for the
    # host, their autocast casts fused and merged (eager.py "compiled blocks").
    in_block = {m for li in range(*layers) if first < li < last for m in graph.layers[li].nodes}
    block_split = _block_weight_split(graph, prob, assign, in_block)
    if compiled is None:
        compiled = eager_mod.compiled_per_block(
            block_split, stage_devices=prob.mesh.n_devices, fsdp2=eager_mod.fsdp_bf16_params(zero, dp_sharded),
            context_parallel=block_split == 1 and _splits_sequence(graph, prob, assign, in_block))
    # per FSDP2 block: compute forward, backward; all-gather forward, backward; reduce-scatter
    blocks: dict[int, list[float]] = {}
    for n in names:
        node = graph.node(n)
        li = layer_of.get(n)
        if li is not None and n in assign:
            st = prob.strategy_of(n, assign[n])
            acc = blocks.setdefault(li, [0.0] * 5)
            acc[0] += st.fwd_s
            acc[1] += st.bwd_s
            for c in st.runs(zero):
                if c.purpose != ZERO:
                    continue
                if c.phase == FORWARD and c.kind == ALL_GATHER:
                    acc[2] += c.time_s
                elif c.phase == BACKWARD and c.kind == ALL_GATHER:
                    acc[3] += c.time_s
                elif c.phase == BACKWARD and c.kind == REDUCE_SCATTER:
                    acc[4] += c.time_s
        if (node.kind == NORM and node.operands and node.operands[0].source is not None and not bf16
                and eager_mod.norm_runs_fp32(node.op, bf16_stream)):
            # autocast keeps the residual stream in fp32: the norm saves an fp32 input, runs in
            # fp32 and its output is cast to bf16 by each linear it feeds
            residual += eager_mod.fp32_residual_extra_bytes(*local_elems(node.operands[0].source))
            if n in assign:
                local, elem_bytes = local_elems(n)
                elems = local / elem_bytes
                consumers = sum(1 for m in graph.consumers(n) if m in inside and graph.node(m).kind == MATMUL
                                and graph.node(m).param_operands)
                fused = compiled and n in in_block
                residual += eager_mod.autocast_input_copies_bytes(elems, consumers, fused)
                if fused:
                    f32_fwd, f32_bwd = eager_mod.compiled_norm_fp32_s(elems, cm)
                else:
                    # the eager kernels (eager.autocast_norm_s) in place of the graph's norm; a
                    # residual add making its input prices its own (fp32_residual_add_s below)
                    norm_in = node.operands[0].source
                    e_f, e_b = eager_mod.autocast_norm_s(
                        elems, consumers, cm, fp32_stream=not bf16_stream,
                        input_accumulate=graph.node(norm_in).op != "add" and len(graph.consumers(norm_in)) > 1)
                    own = prob.strategy_of(n, assign[n])
                    f32_fwd, f32_bwd = e_f - own.fwd_s, e_b - own.bwd_s
                # the recomputed forward's norm runs fp32 again
                charge(li, f32_fwd, f32_bwd, rerun_too=n in in_block and not fused)
        if node.kind == LOSS and node.operands and node.operands[0].source in assign and n in assign:
            local, elem_bytes = local_elems(node.operands[0].source)
            own = prob.strategy_of(n, assign[n])
            # the logits the graph saves for the loss (at the op that makes them, under the
            # loss's views) are not kept by the eager step
            made: str | None = node.operands[0].source
            while made is not None and graph.node(made).kind == VIEW and graph.node(made).operands:
                made = graph.node(made).operands[0].source
            # logits split over the vocabulary (their last dim) run torch's loss_parallel
            made_spec = prob.strategy_of(made, assign[made]).out_spec if made in assign else ()
            vocab_split = bool(made_spec and made_spec[-1])
            if vocab_split and made is not None and made in inside:
                vocab_split_head = made
            bf16_loss = bf16 and not vocab_split
            ce_s += max(0.0, eager_mod.cross_entropy_s(local / elem_bytes, cm, bf16_loss) - (own.fwd_s + own.bwd_s))
            ce_peak += eager_mod.cross_entropy_peak_bytes_per_logit(bf16, vocab_split) * local / elem_bytes
            if made is not None and made in inside:
                residual += eager_mod.loss_stash_bytes(prob.saved.get(made, 0.0) * local_elems(made)[0])
        # an op of a compiled block is launched by its block's region (eager.host_s)
        dispatched = not (compiled and n in in_block)
        if (node.op == "add" and n in assign and not bf16 and not bf16_stream and not (compiled and n in in_block)
                and any(graph.node(m).kind == NORM and eager_mod.norm_runs_fp32(graph.node(m).op, bf16_stream)
                        for m in graph.consumers(n))):
            # a residual add into autocast's fp32 stream (eager.fp32_residual_add_s) in place of
            # the graph's bf16 one: it reads a linear's bf16 output and the fp32 stream
            st = prob.strategy_of(n, assign[n])
            read_bytes = sum(2 if o.source is not None and graph.node(o.source).kind == MATMUL else 4
                             for o in node.operands)
            local, elem_bytes = local_elems(n)
            a_f, a_b = eager_mod.fp32_residual_add_s(local / elem_bytes, read_bytes, len(graph.consumers(n)) > 1, cm)
            charge(li, a_f - st.fwd_s, a_b - st.bwd_s, rerun_too=n in in_block)
        rope = rotary_ops(graph, n) if node.op == "cat" and not (compiled and n in in_block) else None
        if rope is not None and all(m in assign for m in rope):
            # eager rotary: its kernels by kind (eager.rotary_s) in place of the graph's five ops'
            local, elem_bytes = local_elems(n)
            r_f, r_b = eager_mod.rotary_s(local / elem_bytes, cm)
            sts = [prob.strategy_of(m, assign[m]) for m in rope]
            charge(li, r_f - sum(st.fwd_s for st in sts), r_b - sum(st.bwd_s for st in sts), rerun_too=n in in_block)
        if node.kind == MATMUL and n in assign and any(o.is_param and len(o.shape) == 1 for o in node.operands):
            # the bias gradient's sum over the tokens, which the graph's linear does not price
            charge(li, 0.0, eager_mod.bias_grad_sum_s(local_elems(n)[0], cm, fused=compiled and n in in_block))
        if node.kind == MATMUL and node.param_operands:
            n_linears += dispatched
            # linears with split weights are what eager PyTorch runs as DTensors
            if n in assign:
                st = prob.strategy_of(n, assign[n])
                if any(o.is_param and i < len(st.in_specs) and st.in_specs[i] is not None
                       and any(st.in_specs[i]) for i, o in enumerate(node.operands)):
                    split_linears.add(n)
                # DTensor all-reduces each column-parallel linear's input gradient itself, in fp32
                # where autocast's norm made the input fp32 (eager.tp_input_grad_all_reduce_s), where
                # the graph prices this linear's share of one all-reduce per tensor
                for c in st.collectives:
                    if c.kind != ALL_REDUCE or c.phase != BACKWARD or c.operand < 0:
                        continue
                    read = node.operands[c.operand].source
                    if read is None:
                        continue
                    made_as = (prob.strategy_of(read, assign[read]).out_spec if read in assign
                               else prob.boundary.get(read))
                    if made_as != st.in_specs[c.operand]:
                        continue        # converted on the way (Megatron-SP's gather: a reduce-scatter back)
                    producer = graph.node(read)
                    fp32_in = (producer.kind == NORM and not bf16
                               and eager_mod.norm_runs_fp32(producer.op, bf16_stream))
                    elem = producer.out_bytes / _numel(producer.out_shape)
                    eager_ar = eager_mod.tp_input_grad_all_reduce_s(c.nbytes, elem, fp32_in, prob.mesh.axis(c.mask))
                    delta = eager_ar - c.time_s * prob.grad_share.get(n, {}).get(c.operand, 1.0)
                    bwd += delta
                    tp_grad_delta += delta
        elif node.kind not in (VIEW, INPUT, OUTPUT):
            n_other += dispatched
    if bf16 and vocab_split_head is not None and split_linears == {vocab_split_head}:
        # a head split over the vocab with no other split weight is the runtime's dp-vocab head,
        # whose weight shard FSDP2 does not manage (ignored_params): it stays fp32 and is cast
        # to bf16 every forward, the copy saved for the head's backward (Segment._dp_vocab_head_loss)
        st = prob.strategy_of(vocab_split_head, assign[vocab_split_head])
        residual += eager_mod.AUTOCAST_DTYPE_BYTES * sum(
            _numel(o.shape) / shard_factor(st.in_specs[i], prob.mesh)
            for i, o in enumerate(graph.node(vocab_split_head).operands)
            if o.is_param and i < len(st.in_specs) and st.in_specs[i] is not None)
    compiled_weight_copies = 0.0
    if compiled and block_split == 1 and not (bf16 or bf16_stream) and n_microbatches > 1:
        # A compiled block casts its linears' weights to bf16 inside the region and keeps the
        # copies for its backward, per microbatch: autocast's weight cache (one copy for the
        # step, eager.state_bytes) does not hold them (saved_activations.py: a Llama block
        # keeps its 90 MB of bf16 weights compiled as eager). With one microbatch the copies
        # are the one gradients_absent_at_activation_peak_bytes counts.
        compiled_weight_copies = eager_mod.AUTOCAST_CACHE_BYTES_PER_PARAM * sum(
            _local_param_elems(graph, prob, n, assign[n]) for n in names
            if n in in_block and n in assign and graph.node(n).kind == MATMUL)
        residual += compiled_weight_copies
    if compiled and block_split == 1:
        # what a compiled block saves for its backward: AOTAutograd's minimum cut (remat.py).
        # Measured on plain regions only; a tensor-parallel block's region over DTensors (with
        # its collectives) keeps more than this cut on the 2-GPU tp rows (llama-1b-gqa tp mb4:
        # 14.84 GiB allocated, 13.71 with the cut) and is left at the eager set less
        # autocast's copies until its saved tensors are measured.
        for li in range(*layers):
            if first < li < last:
                residual += compiled_block_stash_delta_bytes(
                    graph, li, lambda v: local_elems(v)[0],
                    lambda op: not bf16 and eager_mod.norm_runs_fp32(op, bf16_stream),
                    lambda v: eager_mod.fp32_residual_extra_bytes(*local_elems(v)))
    if compiled and not bf16:
        # Inductor fuses each chain of a compiled block's pointwise ops into one kernel each way
        # (eager.fused_pointwise_s): the chain's ops, priced one eager kernel each, cost that
        # kernel instead, and so does the recomputation where it reruns the chain
        roles = checkpoint_roles(graph)
        for li in range(*layers):
            if not first < li < last:
                continue
            for ops, chain_in, chain_out, const_bytes, param_bytes in fused_pointwise_chains(
                    graph, list(graph.layers[li].nodes)):
                if not all(n in assign for n in ops):
                    continue
                f_s, b_s = eager_mod.fused_pointwise_s(sum(local_elems(r)[0] for r in chain_in),
                                                       sum(local_elems(n)[0] for n in chain_out),
                                                       const_bytes, param_bytes, cm)
                strategies = [prob.strategy_of(n, assign[n]) for n in ops]
                fused_fwd = f_s - sum(st.fwd_s for st in strategies)
                fwd += fused_fwd
                bwd += b_s - sum(st.bwd_s for st in strategies)
                if all(roles.get(n) == RERUN for n in ops):
                    rerun += fused_fwd
    comm_delta, overlap = tp_grad_delta, 0.0
    for li, (c_f, c_b, ag_f, ag_b, rs) in blocks.items():
        rs_eager = eager_mod.FSDP_REDUCE_SCATTER_FACTOR * rs
        exp_f, exp_b, hidden = eager_mod.fsdp_block_comm_s(c_f, c_b, ag_f, ag_b, rs_eager,
                                                           first=li == first + 1, last=li == last - 1)
        slow_f = eager_mod.comm_overlap_s(ag_f - exp_f)
        slow_b = eager_mod.comm_overlap_s(hidden - (ag_f - exp_f))
        comm_delta += exp_f + exp_b - (ag_f + ag_b + rs)
        overlap += slow_f + slow_b
        fwd += exp_f - ag_f + slow_f
        bwd += exp_b - ag_b - rs + slow_b
    inputs_extra = 0.0
    for li in range(*layers) if not (bf16 or bf16_stream) else ():
        src = main_boundary(graph, list(graph.layers[li].nodes))
        if src is not None:
            inputs_extra += eager_mod.fp32_residual_extra_bytes(*local_elems(src))
    # over FSDP2's bf16 parameters autocast copies no weight; FSDP2 casts its shards per gather
    weight_casts = (eager_mod.fsdp_weight_cast_params(ev.param_elems_zero, zero, n_microbatches)
                    if bf16 or bf16_stream else None)
    casts = eager_mod.precision_casts_s(ev.param_elems, n_microbatches, cm, weight_casts)
    if not (bf16 or bf16_stream or compiled):
        # a recomputed eager block's linears cast their fp32 weights again (eager.recompute_weight_casts_s)
        rerun += eager_mod.recompute_weight_casts_s(
            sum(_local_param_elems(graph, prob, n, assign[n]) for n in in_block
                if n in assign and graph.node(n).kind == MATMUL), cm)
    n_blocks = sum(1 for li in range(*layers) if first < li < last)
    ddp = ev.sync_s > 0 and zero < 3
    ddp_engine = ddp and not zero12         # DDP itself runs (ZeRO-1/2 run on FSDP2)
    # the host's per-block costs follow the engines that wrap the blocks: DTensor where a block's
    # linear is split (not a dp-vocab head's, outside the blocks), FSDP2's hooks on every block
    # where ZeRO-1/2 runs on FSDP2 as well as ZeRO-3, and DDP's reducer only where DDP runs
    host_fwd, host_bwd = eager_mod.host_s(n_linears, n_other, n_blocks, tp=bool(split_linears & in_block),
                                          fsdp=fsdp or (zero12 and prob.mesh.n_devices > 1), cm=cm,
                                          ddp=ddp_engine, compiled=compiled,
                                          split_blocks=block_split > 1, n_microbatches=n_microbatches,
                                          fsdp_accumulating=zero12 and zero == 1)
    fsdp_root = 0.0
    if zero >= 3 and prob.mesh.n_devices > 1:
        # the root layers' own parameters per tensor-parallel shard, under their strategies
        root_params = sum(prob.strategy_of(n, assign[n]).param_elems_local for li in range(*layers)
                          if li in (first, last) for n in graph.layers[li].nodes if n in assign)
        fsdp_root = eager_mod.fsdp_buffer_bytes(root_params, 0.0)[0]
    # the GPU waits for its CPU between kernels, per block (eager.gpu_idle_s)
    idle_f, idle_b = eager_mod.gpu_idle_s(sum(1 for li in range(*layers) if first < li < last))
    fwd += idle_f
    bwd += idle_b
    return EagerTerms(fwd_s=fwd, bwd_s=bwd + ce_s + casts, cross_entropy_s=ce_s, precision_casts_s=casts,
                      idle_s=idle_f + idle_b,
                      recompute_fwd_s=rerun,
                      host_fwd_s=host_fwd, host_bwd_s=host_bwd,
                      grad_bucket_s=eager_mod.grad_bucket_copy_s(ev.param_elems, cm) if ddp else 0.0,
                      residual_stash_bytes=residual, inputs_fp32_extra_bytes=inputs_extra,
                      cross_entropy_peak_bytes=ce_peak,
                      ddp_bytes=eager_mod.state_bytes(ev.param_elems, ddp_engine, 1),
                      ddp_rebuild_bytes=eager_mod.ddp_rebuild_transient_bytes(ev.param_elems)
                      if ddp_engine else 0.0,
                      autocast_cache_bytes=0.0 if bf16 or bf16_stream
                      else eager_mod.state_bytes(ev.param_elems, False, n_microbatches) - compiled_weight_copies,
                      param_state_delta_bytes=(eager_mod.fsdp_zero12_state_bytes(ev.param_elems, ev.param_elems_zero,
                                                                                 zero, n_microbatches)
                                               - ev.param_state_bytes(zero)) if zero12 else 0.0,
                      fsdp_root_bytes=fsdp_root, comm_delta_s=comm_delta, comm_overlap_s=overlap)


def rotary_ops(graph: OpGraph, cat: str) -> list[str] | None:
    """The ops of one rotate-half rotary embedding, `x * cos + cat(-x2, x1) * sin`, found from
    its `cat`: [neg, cat, the multiply of x, the multiply of the cat, their add]; None if `cat`
    is not one."""
    node = graph.node(cat)
    if len(node.operands) != 2 or node.operands[0].source is None:
        return None
    neg = node.operands[0].source
    if graph.node(neg).op != "neg" or not graph.node(neg).operands:
        return None
    half = graph.node(neg).operands[0].source
    x = graph.node(half).operands[0].source if half is not None and graph.node(half).operands else None
    mul_rot = [m for m in graph.consumers(cat) if graph.node(m).op == "mul"]
    mul_x = [m for m in graph.consumers(x) if graph.node(m).op == "mul"] if x is not None else []
    if len(mul_rot) != 1 or len(mul_x) != 1:
        return None
    adds = [a for a in graph.consumers(mul_rot[0]) if graph.node(a).op == "add"
            and {o.source for o in graph.node(a).operands} == {mul_rot[0], mul_x[0]}]
    if len(adds) != 1:
        return None
    return [neg, cat, mul_x[0], mul_rot[0], adds[0]]


def _local_param_elems(graph: OpGraph, prob: StageProblem, name: str, choice: int) -> float:
    """Elements of the parameters op `name` owns that this GPU holds under strategy `choice`."""
    st = prob.strategy_of(name, choice)
    return sum(_numel(o.shape) / (shard_factor(st.in_specs[i], prob.mesh)
                                  if i < len(st.in_specs) and st.in_specs[i] is not None else 1)
               for i, o in enumerate(graph.node(name).operands) if o.is_param and o.owns_param)


# per graph (weakly held): layer -> (its region's tensors, data edges, ops the backward cannot
# replay, what the backward reads with the saved share, the norms' inputs by norm op), and the
# cut per tensor sizes
_REGION_CACHE: weakref.WeakKeyDictionary[OpGraph, dict] = weakref.WeakKeyDictionary()
# what AOTAutograd's partition may replay in a backward: pointwise ops, views, and norms (their
# reductions' outputs are small and saved beside, as the eager norm saves them)
_REPLAYABLE = (ELEMENTWISE, VIEW, NORM)
_RANDOM_OPS = ("dropout",)


def _compiled_region(graph: OpGraph, li: int) -> tuple:
    per_graph = _REGION_CACHE.setdefault(graph, {})
    if li in per_graph:
        return per_graph[li]
    nodes = list(graph.layers[li].nodes)
    inside = set(nodes)
    saved, outside = saved_tensors(graph, nodes)
    edges: list[tuple[str, str]] = []
    fixed: set[str] = set()
    for n in nodes:
        node = graph.node(n)
        for o in node.operands:
            if o.source is None or graph.node(o.source).kind == INPUT:
                continue
            edges.append((o.source, n))
            if o.source not in inside:
                fixed.add(o.source)              # the region's input
        materialized = any(graph.node(m).kind not in _REPLAYABLE for m in graph.consumers(n) if m in inside)
        if node.kind not in _REPLAYABLE or node.op in _RANDOM_OPS or materialized:
            fixed.add(n)
    tensors = tuple(dict.fromkeys([n for n in nodes] + [u for u, _ in edges]))
    norm_inputs = tuple((graph.node(n).operands[0].source, graph.node(n).op) for n in nodes
                        if graph.node(n).kind == NORM and graph.node(n).operands
                        and graph.node(n).operands[0].source is not None)
    reads = {**saved, **{u: max(w, saved.get(u, 0.0)) for u, w in outside.items()}}
    region: tuple = (tensors, tuple(edges), frozenset(fixed), reads, norm_inputs, {})
    per_graph[li] = region
    return region


def compiled_block_stash_delta_bytes(graph: OpGraph, li: int, local_bytes, fp32_norm, fp32_extra_bytes) -> float:
    """How much less layer `li`'s block keeps for its backward, per microbatch, compiled per
    block (one torch.compile region) than the eager recipe keeps (the graph's saved tensors,
    `saved_tensors`, and the fp32 copies of the norms' inputs that autocast keeps): the eager
    set less AOTAutograd's least saved set (remat.min_saved_bytes over the block's ops, the
    block's input fixed; replayable: pointwise ops, views and norms, unless a matmul or the
    attention reads their output). local_bytes(tensor): its bytes on this GPU; fp32_norm(op):
    whether a norm of that op runs in fp32 (its input then kept in fp32); fp32_extra_bytes(tensor):
    the bytes that fp32 copy adds. gpt-1.3b: 36 -> 34 B per token and hidden unit (the fp32
    x + proj rebuilt from x and proj), a Llama block 624 -> 504 MiB at 4 x 2048 tokens (also
    SiLU's output rebuilt), as measured (bench/truth/README.md, seventh pass). A tensor kept
    with a mask (dropout) keeps the mask either way. Not priced: the replay's time (pointwise,
    fused into the backward's kernels)."""
    tensors, edges, fixed, reads, norm_inputs, cuts = _compiled_region(graph, li)
    extra = {v: fp32_extra_bytes(v) for v, op in norm_inputs if fp32_norm(op)}
    size = {v: local_bytes(v) + extra.get(v, 0.0) for v in tensors}
    eager = sum(w * size[v] for v, w in reads.items())
    # beyond a whole tensor: a dropout's mask, kept compiled too
    masks = sum((w - 1.0 if w >= 1.0 else w) * size[v] for v, w in reads.items())
    key = tuple(size[v] for v in tensors)
    if key not in cuts:
        cuts[key] = min_saved_bytes(size, edges, fixed, [v for v, w in reads.items() if w >= 1.0])
    return cuts[key] + masks - eager


def fused_pointwise_chains(graph: OpGraph, block: list[str]) -> list[tuple[list[str], list[str], list[str], float, float]]:
    """The chains of one compiled block's pointwise ops (elementwise, norms, copying views) that
    Inductor fuses into one kernel: (ops, activation inputs, outputs, constant bytes, weight
    bytes), for the chains of two ops or more. Ops join a chain along producer-to-consumer edges (through
    aliasing views, which move nothing) when no matmul or attention lies between them on any
    path from the block's input: a residual add before the MLP and the one after it stay apart,
    whose kernel would have to wait for the MLP's matmuls. Inputs are the tensors the chain reads
    from outside it (views resolved to the tensor they alias, each once); outputs the chain's
    tensors read outside it (or by nothing: the block's output)."""
    in_block = set(block)

    def root(src: str) -> str:
        # a view that moves no bytes aliases its operand: the kernel reads the operand
        while src in in_block:
            node = graph.node(src)
            if node.kind != VIEW or node.fwd_bytes or not node.operands or node.operands[0].source is None:
                break
            src = node.operands[0].source
        return src

    def pointwise(name: str) -> bool:
        node = graph.node(name)
        return node.kind in (ELEMENTWISE, NORM) or (node.kind == VIEW and node.fwd_bytes > 0)

    # depth: how many matmuls / attentions lie on the longest path from the block's input
    depth: dict[str, int] = {}
    for n in block:
        depth[n] = max((depth[r] + (0 if pointwise(r) else 1)
                        for o in graph.node(n).operands if o.source is not None
                        for r in [root(o.source)] if r in depth), default=0)
    parent = {n: n for n in block if pointwise(n)}

    def readers(n: str) -> list[str]:
        # consumers, looking through the aliasing views that pass the tensor on
        seen: list[str] = []
        for c in graph.consumers(n):
            node = graph.node(c)
            if c in in_block and node.kind == VIEW and not node.fwd_bytes:
                seen.extend(readers(c))
            else:
                seen.append(c)
        return seen

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in parent:
        for o in graph.node(n).operands:
            r = root(o.source) if o.source is not None else None
            if r in parent and depth[r] == depth[n]:
                parent[find(r)] = find(n)
    chains: dict[str, list[str]] = {}
    for n in parent:
        chains.setdefault(find(n), []).append(n)
    out = []
    for ops in chains.values():
        if len(ops) < 2:
            continue
        members = set(ops)
        inputs: list[str] = []
        const_bytes = param_bytes = 0.0
        for n in ops:
            for o in graph.node(n).operands:
                if o.source is None:
                    if o.is_param:
                        param_bytes += o.nbytes
                    else:
                        const_bytes += o.nbytes
                    continue
                r = root(o.source)
                if r not in members and r not in inputs:
                    inputs.append(r)

        outputs = [n for n in ops for rs in [readers(n)] if not rs or any(c not in members for c in rs)]
        out.append((ops, inputs, outputs, const_bytes, param_bytes))
    return out


def _block_weight_split(graph: OpGraph, prob: StageProblem, assign: dict[str, int], block_ops: set[str]) -> int:
    """Over how many devices the blocks' linears split their weights (1: none split): the
    tensor-parallel degree the runtime's engines give the stage (runtime/engines.py
    StageLayout.tp), which decides whether its blocks run compiled."""
    most = 1
    for n in block_ops:
        node = graph.node(n)
        if n not in assign or node.kind != MATMUL or not node.param_operands:
            continue
        st = prob.strategy_of(n, assign[n])
        for i, o in enumerate(node.operands):
            if o.is_param and i < len(st.in_specs) and st.in_specs[i] is not None:
                most = max(most, shard_factor(st.in_specs[i], prob.mesh))
    return most


def _splits_sequence(graph: OpGraph, prob: StageProblem, assign: dict[str, int], block_ops: set[str]) -> bool:
    """Whether some op of the blocks takes a context-parallel strategy (splits_sequence): the
    stage runs on torch's context parallelism (runtime/engines.py StageLayout.cp)."""
    return any(splits_sequence(graph.node(n), prob.strategy_of(n, assign[n]).name)
               for n in block_ops if n in assign)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _boundary_of(per_graph: dict, graph: OpGraph, layers: tuple[int, int], names: list[str]) -> str | None:
    """main_boundary of `names`, the ops of `layers`, once per graph and layers (per_graph:
    the graph's _STAGE_CACHE entry)."""
    k = ("boundary", layers)
    if k in per_graph:
        return per_graph[k]
    value = per_graph[k] = main_boundary(graph, names)
    return value


def p2p_time_s(cluster: Cluster, a: StagePlan, b: StagePlan, nbytes: float) -> float:
    """Send a boundary tensor from stage a's devices to stage b's: the pairs work in parallel
    over the link that joins the submeshes (NVLink inside a node, the NICs across nodes)."""
    if nbytes <= 0:
        return 0.0
    m = cluster.gpus_per_node
    nodes_a = {d // m for d in a.device_ids}
    nodes_b = {d // m for d in b.device_ids}
    pairs = max(1, min(len(a.device_ids), len(b.device_ids)))
    if nodes_a == nodes_b and len(nodes_a) == 1:
        link = cluster.intra_link
        return p2p_s(nbytes / pairs, link)
    per_gpu_bw = cluster.inter_link.bandwidth_bytes_per_s / m
    lanes = min(pairs, m * min(len(nodes_a), len(nodes_b)))
    return cluster.inter_link.latency_s + nbytes / (per_gpu_bw * lanes)




def _graph_flops(graph: OpGraph) -> float:
    """graph.fwd_flops + graph.bwd_flops, summed once per graph (the planner evaluates many
    candidates of one graph; _STAGE_CACHE already takes a graph as unchanged once evaluated)."""
    per_graph = _STAGE_CACHE.setdefault(graph, {})
    hit = per_graph.get(("flops",))
    if hit is None:
        hit = per_graph[("flops",)] = graph.fwd_flops + graph.bwd_flops
    return hit


def evaluate(plan: Plan, graph: OpGraph, cluster: Cluster, eager: bool = EAGER_DEFAULT,
             grad_sync: str | None = None, zero_autocast: bool = False, compiled: bool | None = None,
             loss: str = "fused", ddp_rebuild: bool = True, expandable_segments: bool = True,
             checkpoint_early_stop: bool = True, tp_comm_overlap: bool = False) -> Plan:
    """A copy of `plan` with its prediction and each stage's costs filled in; `plan` is unchanged.

    eager: the step as the eager PyTorch recipe runs it (autopar.costmodel.eager, measured on
    H200 in bench/truth: autocast over fp32 master weights, DDP / FSDP2 / DTensor engines, the
    caching allocator): fp32 cross-entropy, autocast's casts and fp32 norms, gradient
    accumulation and DDP's buckets, the host's dispatch (a GPU's step takes max(host, device)),
    the allocator's reserve, CUDA context and NCCL memory. The planner's per-layer solutions
    carry the same terms (`eager_terms`) and its memory check the same per-GPU reserve and fixed
    memory (`eager.stage_allocatable_bytes`) when it plans with eager=True, so `autopar plan --eager`
    and `autopar evaluate --eager` judge a plan alike. Off by default (EAGER_DEFAULT): on the
    published Megatron-style runs the terms make Megatron-LM's time and Megatron-DeepSpeed's
    memory far worse (bench/calibration/FINDINGS.md section 8); fused engines avoid most of them.
    The fused AdamW step at its measured bandwidth counts either way.
    grad_sync: the engine whose data-parallel gradient buckets the plan runs
    (collectives.GRAD_SYNC_ENGINES); None: PyTorch DDP's with eager, else Megatron-Core's.
    zero_autocast: with eager, ZeRO stages as bench/truth's harness ran FSDP2 (autocast over its
    bf16 parameters) instead of as `autopar run` does (bf16 parameters, no autocast: the default).
    compiled: with eager, whether the blocks run compiled per block (torch.compile, eager.py
    "compiled blocks"): None, where `autopar run` compiles them (eager.compiled_per_block:
    tensor-parallel stages and stages on one device); False, all eager, as bench/truth's harness ran; True, all compiled
    (`autopar run`'s compile=True).
    loss: the default model's loss kernel (compute.LOSS_KERNELS): "fused" (one pass over the
    logits each way), or "megatron" (Megatron's fp32 vocab-parallel cross-entropy, as Megatron-LM
    and Megatron-DeepSpeed run it: ComputeModel.vocab_parallel_cross_entropy_s). Not with eager,
    whose recipe prices PyTorch's cross-entropy (eager.cross_entropy_s).
    expandable_segments: with eager, whether the caching allocator runs with expandable segments,
    as `autopar run` runs it (eager.ALLOC_CONF, the default here), or with its default segments, as
    bench/truth's native recipes ran (eager.reserve_fraction).
    checkpoint_early_stop: full recomputation as torch's non-reentrant checkpoint runs it, the
    way `autopar run` does (True): it stops rerunning a block once the last tensor its backward
    needs is saved again, so a block's trailing output projection and residual add are not
    rerun (stage_problem.block_rerun); False: the whole block's forward again, as Megatron's
    CheckpointFunction and reentrant checkpointing rerun it. Neither reruns the embedding or
    the head.
    ddp_rebuild: with eager, the peak of a run, whose second step holds DDP's first buckets beside
    the rebuilt ones at its activation peak (eager.ddp_rebuild_transient_bytes); False: the peak
    of the steps after it (what a measured run shows where the first buckets were freed by the
    rebuild: bench/truth/predict.py compares the corpus's ddp rows both ways).
    tp_comm_overlap: the blocks' tensor-parallel collectives overlapped with their linears' GEMMs,
    as Megatron-Core's `--tp-comm-overlap` runs them (`tp_overlap_hidden_s`; the hidden part
    slows the compute, collectives.comm_overlap_s). Off by default: `autopar run` and PyTorch's
    DTensor tensor parallelism run them exposed. Not with eager or ZeRO-3."""
    if tp_comm_overlap and eager:
        raise PlanError("tp_comm_overlap is Megatron-Core's engine; the eager recipe runs DTensor's collectives exposed")
    if loss not in LOSS_KERNELS:
        raise PlanError(f"loss must be one of {', '.join(LOSS_KERNELS)} (got {loss!r})")
    if eager and loss != "fused":
        raise PlanError(f"loss={loss!r} is the default model's; the eager recipe prices PyTorch's cross-entropy")
    tr = plan.training
    cm = ComputeModel(cluster.gpu, tr.dtype)
    if plan.n_devices > cluster.n_gpus:
        raise PlanError(f"plan uses {plan.n_devices} devices but cluster {cluster.name} has {cluster.n_gpus}")
    if any(d >= cluster.n_gpus for s in plan.stages for d in s.device_ids):
        raise PlanError(f"plan names device ids beyond the cluster's {cluster.n_gpus} GPUs")
    if plan.stages[-1].layers[1] != len(graph.layers) or plan.stages[0].layers[0] != 0:
        raise PlanError(f"plan's stages cover layers [{plan.stages[0].layers[0]}, {plan.stages[-1].layers[1]}) "
                        f"but the model has {len(graph.layers)} layers")
    schedule = tr.schedule
    v = tr.virtual_stages
    B = tr.n_microbatches
    res = [evaluate_stage(graph, cluster, s, tr, cm, eager, grad_sync, zero_autocast, compiled, loss=loss,
                          checkpoint_early_stop=checkpoint_early_stop, tp_comm_overlap=tp_comm_overlap)
           for s in plan.stages]
    n_dev_stages = len(res) // v if schedule == "interleaved" else len(res)
    if eager and n_dev_stages > 1:
        res = _pipeline_terms(res, graph, cluster, B, cm)
    p2p = [p2p_time_s(cluster, res[i].plan, res[i + 1].plan, res[i].boundary_bytes) for i in range(len(res) - 1)]
    # record_ops=False: the per-stage and per-device ends are all that is read here; the
    # steady state of a long schedule is then extrapolated exactly (pipeline.simulate)
    fwd_s = [r.fwd_s + r.pipeline_fwd_s for r in res]
    bwd_s = [r.bwd_s + r.pipeline_bwd_s for r in res]
    sched = simulate(fwd_s, bwd_s, B, schedule, p2p, chunks=v, record_ops=False)
    timed = sched
    host_fwd_s = [r.host_fwd_s for r in res]
    host_bwd_s = [r.host_bwd_s for r in res]
    # (without launch times, as the planner prices plans unless eager, that is `sched` again)
    if n_dev_stages > 1 and (any(host_fwd_s) or any(host_bwd_s)):
        # Each GPU also waits for its own CPU to launch an op's kernels; the CPUs run through
        # their schedules without waiting for each other (pipeline.simulate), so a host-bound
        # pipeline pays its launches once, not again in the bubble. (One GPU alone: `step` below.)
        timed = simulate(fwd_s, bwd_s, B, schedule, p2p, chunks=v, host_fwd_s=host_fwd_s, host_bwd_s=host_bwd_s,
                         record_ops=False)

    # Per device: stages (chunks) it hosts, their finish time, sync and optimizer step after.
    finish: dict[int, float] = dict(enumerate(timed.stage_end_s))
    # A GPU hosting several chunks (interleaved) syncs and steps all of them after its last
    # backward, and holds all their stashes, but recomputes one layer at a time.
    dev_mem: dict[int, float] = {}
    dev_work: dict[int, float] = {}
    dev_held: dict[int, float] = {}
    dev_absent: dict[int, float] = {}
    dev_rebuild: dict[int, float] = {}
    dev_tied: dict[int, float] = {}
    dev_end: dict[int, float] = {}
    dev_tail: dict[int, float] = {}
    dev_host: dict[int, float] = {}
    dev_pool: dict[int, float] = {}
    dev_stages: dict[int, list[StageResult]] = {}
    dev_sync_jobs: dict[int, list[tuple[float, float]]] = {}   # gradient buckets: (ready at, seconds)
    mem_rows = []
    stages = []
    for i, r in enumerate(res):
        rank = i % n_dev_stages
        inf = inflight(schedule, rank, n_dev_stages, B, v)
        # the loss's fp32 tensors, the recomputed layer and FSDP2's block buffers (the planner's
        # tables count them by the same function)
        working = float(stage_working_bytes(r.working_bytes, r.cross_entropy_peak_bytes, r.fsdp_block_bytes))
        act = activation_bytes(inf, r.stash_bytes, working)
        held = (r.param_state_bytes + r.ddp_bucket_bytes + r.autocast_cache_bytes    # the whole step
                + r.fsdp_root_bytes)
        total = held + act
        memory = StageMemory(param_state_bytes=held, activation_bytes=act,
                             stash_per_microbatch_bytes=r.stash_bytes, inflight_microbatches=inf,
                             working_bytes=working, total_bytes=total)
        stages.append(replace(r.plan, memory=memory, t_intra_s=r.fwd_s + r.bwd_s, fwd_s=r.fwd_s, bwd_s=r.bwd_s))
        dev_mem[rank] = dev_mem.get(rank, 0.0) + total - working
        dev_work[rank] = max(dev_work.get(rank, 0.0), working)
        dev_held[rank] = dev_held.get(rank, 0.0) + held
        dev_absent[rank] = dev_absent.get(rank, 0.0) + r.grads_absent_bytes
        dev_rebuild[rank] = dev_rebuild.get(rank, 0.0) + (r.ddp_rebuild_bytes if ddp_rebuild else 0.0)
        dev_tied[rank] = dev_tied.get(rank, 0.0) + r.tied_grad_bytes
        dev_end[rank] = max(dev_end.get(rank, 0.0), finish.get(i, 0.0))
        dev_tail[rank] = (dev_tail.get(rank, 0.0) + (0.0 if r.sync_buckets else r.sync_s) + r.optimizer_s
                          + r.grad_bucket_s + r.grad_scale_s + r.tied_sync_s)
        # A stage's gradient buckets run beside its last backward (bwd_s[i], ending at finish[i]),
        # on the GPU's one communication stream with its other chunks' (interleaved).
        dev_sync_jobs.setdefault(rank, []).extend(
            (finish.get(i, 0.0) - bwd_s[i] * (1.0 - share), d) for share, d in r.sync_buckets)
        dev_host[rank] = dev_host.get(rank, 0.0) + B * (r.host_fwd_s + r.host_bwd_s)
        dev_pool[rank] = dev_pool.get(rank, 0.0) + r.grad_pool_bytes
        dev_stages.setdefault(rank, []).append(r)
        mem_rows.append(total)
    # The buckets' collectives the backward does not cover wait after it; the compute slows
    # beside the ones it does (collectives.comm_overlap_s).
    dev_sync = {k: sum(r.sync_s for r in dev_stages[k] if not r.sync_buckets) for k in dev_end}
    dev_sync_overlap = {k: 0.0 for k in dev_end}
    for k, jobs in dev_sync_jobs.items():
        exposed, hidden = overlapped_sync_s(jobs, dev_end[k])
        dev_sync[k] += exposed
        dev_sync_overlap[k] = comm_overlap_s(hidden)
        dev_tail[k] += exposed + dev_sync_overlap[k]
    # One GPU's host runs ahead of its stream across steps: its step takes max(host, device).
    dev_step = {k: max(dev_end[k] + dev_tail[k], dev_host[k]) for k in dev_end}
    step = max(dev_step.values())
    zero3 = tr.zero >= 3 and any(r.plan.n_devices > 1 for r in res)
    # FSDP2's gradient pool: ZeRO-3's, and ZeRO-1/2's where `autopar run` runs them on FSDP2
    fsdp = zero3 or any(p > 0 for p in dev_pool.values())
    # The activations peak before the gradients exist (one-microbatch eager steps): the state is
    # then `absent` below its full size, and DDP's first buckets are there beside it in step 2;
    # after the backward the state is full and the activations and first buckets gone.
    absent_at_peak = {k: min(dev_absent[k] - dev_rebuild[k], dev_mem[k] + dev_work[k] - dev_held[k] - dev_tied[k])
                      for k in dev_mem}
    # the first buckets at the peak: the activation moment's (the larger moment, or equal)
    rebuild_at_peak = {k: dev_rebuild[k] if absent_at_peak[k] == dev_absent[k] - dev_rebuild[k] else 0.0
                       for k in dev_mem}
    workspace = eager_mod.CUBLAS_WORKSPACE_BYTES if eager else 0.0
    allocated = {k: dev_mem[k] + dev_work[k] - absent_at_peak[k] + workspace for k in dev_mem}
    # What the allocator's pools hold at their own peaks: FSDP2's gradient pool stays reserved
    # where its gradients are absent (eager.zero3_grad_pool_bytes).
    pooled = {k: dev_mem[k] + dev_work[k] + workspace if dev_pool[k] else allocated[k] for k in dev_mem}
    loss_segment = {k: eager_mod.loss_segment_bytes(max(r.cross_entropy_peak_bytes for r in dev_stages[k]))
                    for k in dev_mem}
    device_bytes = {k: eager_mod.device_peak_bytes(pooled[k], fsdp, plan.n_devices, dev_pool[k], loss_segment[k],
                                                 expandable_segments)
                    if eager else allocated[k] for k in dev_mem}
    mem_dev = max(device_bytes, key=lambda k: device_bytes[k])
    peak = device_bytes[mem_dev]
    fits = peak <= cluster.gpu.memory_bytes
    time_dev = max(dev_step, key=lambda k: dev_step[k])
    breakdown = _time_breakdown(dev_stages[time_dev], B, dev_step[time_dev], dev_tail[time_dev],
                                sched, time_dev, dev_sync[time_dev], dev_sync_overlap[time_dev])
    memory_breakdown = _memory_breakdown(dev_stages[mem_dev], dev_mem[mem_dev], allocated[mem_dev], fsdp,
                                         plan.n_devices if eager else 0, absent_at_peak[mem_dev],
                                         pooled[mem_dev], dev_pool[mem_dev], loss_segment[mem_dev],
                                         rebuild_at_peak[mem_dev], expandable_segments)

    tokens = tr.global_batch * plan.model.seq
    model_flops = _graph_flops(graph) * B
    hw_flops = model_flops + sum(r.recompute_flops for r in res) * B
    n_gpus = plan.n_devices
    peak_flops = cluster.gpu.peak(tr.dtype)
    compute = sum(r.ev.fwd_s + r.ev.bwd_s - r.ev.comm_s for r in res)
    comm = sum(r.ev.comm_s for r in res)
    predicted = Prediction(
        step_time_s=step,
        tokens_per_s=tokens / step,
        model_flops_per_step=model_flops,
        hardware_flops_per_step=hw_flops,
        tflops_per_gpu=model_flops / step / n_gpus / 1e12,
        hardware_tflops_per_gpu=hw_flops / step / n_gpus / 1e12,
        mfu=model_flops / step / (n_gpus * peak_flops),
        bubble_fraction=sched.bubble_fraction,
        pipeline_s=sched.makespan_s,
        grad_sync_s=max(dev_sync.values()),
        optimizer_s=max(r.optimizer_s for r in res),
        p2p_s=sum(p2p),
        compute_s_per_microbatch=compute,
        comm_s_per_microbatch=comm,
        peak_memory_bytes=peak,
        memory_limit_bytes=cluster.gpu.memory_bytes,
        fits=bool(fits),
        peak_allocated_bytes=allocated[mem_dev],
        peak_reserved_bytes=peak - memory_breakdown["cuda_context"] - memory_breakdown["nccl"],
        host_s=max(dev_host.values()),
        breakdown_s=breakdown,
        memory_breakdown_bytes=memory_breakdown,
    )
    return replace(plan, model=replace(plan.model, flops_per_step=model_flops), stages=stages, prediction=predicted)


def _pipeline_terms(res: list[StageResult], graph: OpGraph, cluster: Cluster, n_microbatches: int,
                    cm: ComputeModel) -> list[StageResult]:
    """The stages of an eager pipeline with what torch.distributed.pipelining adds (eager.py
    "pipelines"): a tied head copy's casts and accumulation; the gradient scaling after the
    schedule; and, where the last stage holds a tied head's copy, the all-reduce of its fp32
    gradient with the embedding's, which both stages wait for. The stage's own ops (fwd_s,
    bwd_s) are left as they are: these come from splitting the model into stages, which the
    planner's per-layer costs do not know of."""
    out = []
    for r in res:
        # the copy's parameters are cast as the stage's own are (precision_casts_s is linear in them)
        copy_casts = r.precision_casts_s * r.tied_copy_params / r.ev.param_elems if r.ev.param_elems else 0.0
        out.append(replace(r, pipeline_bwd_s=copy_casts, precision_casts_s=r.precision_casts_s + copy_casts,
                           grad_scale_s=eager_mod.pipeline_grad_scale_s(r.ev.param_elems + r.tied_copy_params,
                                                                        n_microbatches, cm)))
    copy = out[-1].tied_copy_params
    if copy > 0:
        sync = p2p_time_s(cluster, out[0].plan, out[-1].plan, eager_mod.FP32_BYTES * copy)
        out[0] = replace(out[0], tied_sync_s=sync)
        out[-1] = replace(out[-1], tied_sync_s=sync)
    return out


def _time_breakdown(stages: list[StageResult], n_microbatches: int, step_s: float, tail_s: float,
                    device_schedule: Schedule, rank: int, sync_s: float = 0.0,
                    sync_overlap_s: float = 0.0) -> dict[str, float]:
    """Where one GPU's step goes (it adds up to `step_s`): device time per part, the pipeline
    bubble of the device-only schedule (stage-to-stage transfers included), and the host's
    share (time the GPU waits for the CPU). sync_s, sync_overlap_s: the GPU's exposed gradient
    sync and the compute's slowdown beside its hidden part (in `tail_s`)."""
    b = n_microbatches
    embedding = b * sum(r.embedding_s for r in stages)
    head_loss = b * sum(r.head_loss_s for r in stages)
    casts = b * sum(r.precision_casts_s for r in stages)
    op_comm = b * sum(r.op_comm_s for r in stages)
    overlap = b * sum(r.comm_overlap_s for r in stages)
    idle = b * sum(r.gpu_idle_s for r in stages)
    busy = b * sum(r.fwd_s + r.bwd_s + r.pipeline_fwd_s + r.pipeline_bwd_s for r in stages)
    blocks = busy - embedding - head_loss - casts - op_comm - overlap - idle
    optimizer = sum(r.optimizer_s for r in stages)
    sync = sync_s + sum(r.tied_sync_s for r in stages)
    scale = sum(r.grad_scale_s for r in stages)
    buckets = sum(r.grad_bucket_s for r in stages)
    end = device_schedule.device_end_s[rank]
    bubble = max(0.0, end - busy)
    parts = {"blocks": blocks, "head_loss": head_loss, "embedding": embedding, "precision_casts": casts,
             "optimizer": optimizer, "grad_buckets": buckets, "exposed_comm": op_comm + sync,
             "comm_overlap": overlap + sync_overlap_s,
             "bubble": bubble, "gpu_idle": idle, "pipeline_grad_scale": scale}
    parts["host"] = max(0.0, step_s - (busy + bubble + tail_s))
    return parts


def _memory_breakdown(stages: list[StageResult], held_bytes: float, allocated_bytes: float, fsdp: bool,
                      n_gpus: int, grads_absent_bytes: float = 0.0, pooled_bytes: float | None = None,
                      grad_pool_bytes: float = 0.0, loss_segment_bytes: float = 0.0,
                      ddp_rebuild_bytes: float = 0.0, expandable_segments: bool = True) -> dict[str, float]:
    """Where one GPU's peak memory goes; the parts add up to its predicted peak. n_gpus 0: the
    plan is not evaluated as the eager recipe (no allocator reserve, context or NCCL).
    grads_absent_bytes: the part of weights + gradients + optimizer state not allocated at the
    peak (gradients not made yet, net of autocast's weight copies), less `ddp_rebuild_bytes`,
    DDP's first buckets there (eager.ddp_rebuild_transient_bytes). pooled_bytes, grad_pool_bytes:
    what the allocator's pools hold at their own peaks, FSDP2's gradient pool among them
    (eager.reserved_bytes); the part of the latter not allocated at the peak is
    "fsdp_grad_pool"."""
    pooled = allocated_bytes if pooled_bytes is None else pooled_bytes
    params = sum(r.param_state_bytes for r in stages)
    buckets = sum(r.ddp_bucket_bytes for r in stages)
    cache = sum(r.autocast_cache_bytes for r in stages)
    recompute = max((r.working_bytes for r in stages), default=0.0)
    ce = max((r.cross_entropy_peak_bytes for r in stages), default=0.0)
    root = sum(r.fsdp_root_bytes for r in stages)
    block = max((r.fsdp_block_bytes for r in stages), default=0.0)
    reserved = (eager_mod.reserved_bytes(pooled, fsdp, grad_pool_bytes, loss_segment_bytes, expandable_segments) if n_gpus
                else allocated_bytes)
    grad_pool_free = pooled - allocated_bytes if n_gpus else 0.0
    parts = {"weights_grads_optimizer": params - grads_absent_bytes - ddp_rebuild_bytes, "ddp_buckets": buckets,
             "autocast_cache": cache,
             "fsdp_buffers": root + block, "cublas_workspace": eager_mod.CUBLAS_WORKSPACE_BYTES if n_gpus else 0.0,
             "activations": held_bytes - params - buckets - cache - root,
             "recompute_working": recompute if recompute >= ce else 0.0,
             "cross_entropy": ce if ce > recompute else 0.0,
             "allocator_reserve": reserved - allocated_bytes - grad_pool_free,
             "cuda_context": eager_mod.CUDA_CONTEXT_BYTES if n_gpus else 0.0,
             "nccl": eager_mod.outside_allocator_bytes(n_gpus) - eager_mod.CUDA_CONTEXT_BYTES if n_gpus else 0.0}
    if grad_pool_free > 0:          # FSDP2 plans only
        parts["fsdp_grad_pool"] = grad_pool_free
    if ddp_rebuild_bytes > 0:       # DDP plans whose peak is step 2's activation peak
        parts["ddp_rebuild_transient"] = ddp_rebuild_bytes
    return parts


def memory_report(plan: Plan) -> str:
    """Per-stage memory breakdown, for messages about plans that do not fit."""
    lines = []
    for s in plan.stages:
        m = s.memory
        if m is None:
            lines.append(f"  stage {s.index}: not evaluated")
            continue
        lines.append(f"  stage {s.index} (layers {s.layers[0]}-{s.layers[1] - 1}, {s.n_devices} GPUs): "
                     f"weights+grads+optimizer {m.param_state_bytes / 2**30:.2f} GiB, "
                     f"activations {m.activation_bytes / 2**30:.2f} GiB "
                     f"({m.inflight_microbatches:g} microbatches in flight), "
                     f"total {m.total_bytes / 2**30:.2f} GiB")
    return "\n".join(lines)
