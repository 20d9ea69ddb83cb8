"""One evaluator for every plan, searched or hand-made (DESIGN §2, §4, §6).

Per stage: the intra-op cost of its ops under the plan's strategies (the same function the ILP
minimises), recomputation, memory per device. Across stages: point-to-point transfers, the
pipeline schedule simulated op by op, gradient synchronisation and the optimizer step.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from autopar.costmodel.collectives import p2p_s
from autopar.costmodel.compute import ComputeModel
from autopar.costmodel.memory import inflight
from autopar.evaluation.pipeline import simulate
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.specs import Cluster
from autopar.plan import Plan, PlanError, StagePlan
from autopar.sharding.spec import parse_spec, shard_factor
from autopar.sharding.stage_problem import Evaluation, Settings, StageProblem
from graphs.ir import OpGraph
from graphs.query import attention_core, main_boundary, stage_nodes

RECOMPUTE = ("none", "selective", "full")
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
    sync_s: float
    optimizer_s: float
    boundary_bytes: float       # global bytes of the tensor sent to the next stage per microbatch
    recompute_flops: float = 0.0   # forward FLOPs rerun per microbatch (global, all devices)


def evaluate_stage(graph: OpGraph, cluster: Cluster, st: StagePlan, training: dict, cm: ComputeModel) -> StageResult:
    names = stage_nodes(graph, st.layers)
    sub = Submesh(*st.submesh)
    if sub.n_devices != len(st.device_ids):
        raise PlanError(f"stage {st.index}: submesh {st.submesh} has {sub.n_devices} devices but "
                        f"{len(st.device_ids)} device ids are given")
    mesh = Mesh(cluster, sub, tuple(st.logical_mesh))
    bsrc = main_boundary(graph, names)
    boundary = {}
    if bsrc is not None:
        spec = parse_spec(st.input_spec) if st.input_spec else tuple(0 for _ in graph.node(bsrc).out_shape)
        if len(spec) != len(graph.node(bsrc).out_shape):
            raise PlanError(f"stage {st.index}: input_spec {st.input_spec!r} does not fit the boundary tensor "
                            f"{bsrc} of shape {graph.node(bsrc).out_shape}")
        boundary[bsrc] = spec
    zero = int(training.get("zero", 0))
    B = int(training["n_microbatches"])
    # Grids of hand-made plans evaluate the same stage under many schedules and recompute
    # settings: the stage's ILP-side cost does not depend on them, so it is computed once.
    key = (tuple(st.layers), sub, mesh.shape, tuple(sorted(boundary.items())),
           tuple(sorted(st.strategies.items())), zero, cluster, id(cm.gpu), cm.dtype)
    per_graph = _STAGE_CACHE.setdefault(graph, {})
    hit = per_graph.get(key)
    if hit is None:
        prob = StageProblem(graph, names, mesh, cm, boundary=boundary)
        choice = prob.choice_from_names(st.strategies)
        ev = prob.evaluate(choice, Settings(n_microbatches=B, zero=zero), with_ops=True)
        hit = per_graph[key] = (prob, choice, ev, prob.assignment(choice))
    prob, choice, ev, assign = hit

    fwd, bwd, stash, working, rec_flops = ev.fwd_s, ev.bwd_s, ev.stash_bytes, 0.0, 0.0
    if st.recompute == "full":
        # Keep each layer's input; rerun the stage's forward during backward, one layer at a
        # time, so one layer's activations are live on top of the stashes.
        layer_inputs = 0.0
        per_layer = []
        for li in range(*st.layers):
            lnames = list(graph.layers[li].nodes)
            src = main_boundary(graph, lnames)
            if src is not None:
                node = graph.node(src)
                spec_idx = assign.get(src)
                spec = (prob.strategy_of(src, spec_idx).out_spec if spec_idx is not None else boundary.get(src, ()))
                layer_inputs += node.out_bytes / (shard_factor(spec, mesh) if spec else 1)
            per_layer.append(sum(prob.saved.get(n, 0.0) * prob.strategy_of(n, assign[n]).out_bytes_local
                                 for n in lnames))
        stash = layer_inputs
        working = max(per_layer) if per_layer else 0.0
        bwd += ev.recompute_fwd_s
        rec_flops = sum(graph.node(n).fwd_flops for n in names)
    elif st.recompute == "selective":
        core = attention_core(graph, names)
        dropped = [n for n in core if prob.saved.get(n)]
        stash -= sum(prob.saved[n] * prob.strategy_of(n, assign[n]).out_bytes_local for n in dropped)
        if dropped:
            # Rebuilding the dropped scores reruns the whole attention core (QK^T, scale, mask,
            # softmax, dropout), not only the ops whose outputs were kept.
            bwd += sum(prob.strategy_of(n, assign[n]).fwd_s for n in core)
            rec_flops = sum(graph.node(n).fwd_flops for n in core)

    out_node = _stage_output(graph, st.layers)
    bbytes = graph.node(out_node).out_bytes if out_node else 0.0
    st.ops = [dict(o) for o in ev.ops]
    return StageResult(st, ev, fwd, bwd, stash, working, ev.param_state_bytes(zero),
                       ev.sync_s, ev.optimizer_step_s(zero, cm), bbytes, rec_flops)


def _stage_output(graph: OpGraph, layers: tuple[int, int]) -> str | None:
    if layers[1] >= len(graph.layers):
        return None
    nxt = stage_nodes(graph, (layers[1], min(len(graph.layers), layers[1] + 1)))
    return main_boundary(graph, nxt)


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




def evaluate(plan: Plan, graph: OpGraph, cluster: Cluster) -> Plan:
    """Fill `plan.predicted` and each stage's costs; returns the plan."""
    tr = plan.training
    cm = ComputeModel(cluster.gpu, tr.get("dtype", "bf16"))
    if plan.n_devices > cluster.n_gpus:
        raise PlanError(f"plan uses {plan.n_devices} devices but cluster {cluster.name} has {cluster.n_gpus}")
    if any(d >= cluster.n_gpus for s in plan.stages for d in s.device_ids):
        raise PlanError(f"plan names device ids beyond the cluster's {cluster.n_gpus} GPUs")
    if plan.stages[-1].layers[1] != len(graph.layers) or plan.stages[0].layers[0] != 0:
        raise PlanError(f"plan's stages cover layers [{plan.stages[0].layers[0]}, {plan.stages[-1].layers[1]}) "
                        f"but the model has {len(graph.layers)} layers")
    schedule = tr.get("schedule", "1f1b")
    v = int(tr.get("virtual_stages", 1) or 1)
    B = int(tr["n_microbatches"])
    res = [evaluate_stage(graph, cluster, s, tr, cm) for s in plan.stages]
    n_dev_stages = len(res) // v if schedule == "interleaved" else len(res)
    p2p = [p2p_time_s(cluster, res[i].plan, res[i + 1].plan, res[i].boundary_bytes) for i in range(len(res) - 1)]
    sched = simulate([r.fwd_s for r in res], [r.bwd_s for r in res], B,
                     schedule if schedule != "interleaved" else "interleaved", p2p, chunks=v)

    # Per device: stages (chunks) it hosts, their finish time, sync and optimizer step after.
    finish = {}
    for op in sched.ops:
        finish[op.stage] = max(finish.get(op.stage, 0.0), op.end_s)
    # A GPU hosting several chunks (interleaved) syncs and steps all of them after its last
    # backward, and holds all their stashes, but recomputes one layer at a time.
    dev_mem: dict[int, float] = {}
    dev_work: dict[int, float] = {}
    dev_end: dict[int, float] = {}
    dev_tail: dict[int, float] = {}
    mem_rows = []
    for i, r in enumerate(res):
        rank = i % n_dev_stages
        inf = inflight(schedule, rank, n_dev_stages, B, v)
        act = inf * r.stash_bytes + r.working_bytes
        total = r.param_state_bytes + act
        r.plan.memory = {"param_state_bytes": r.param_state_bytes, "activation_bytes": act,
                         "stash_per_microbatch_bytes": r.stash_bytes, "inflight_microbatches": inf,
                         "working_bytes": r.working_bytes, "total_bytes": total}
        r.plan.t_intra_s = r.fwd_s + r.bwd_s
        r.plan.fwd_s, r.plan.bwd_s = r.fwd_s, r.bwd_s
        dev_mem[rank] = dev_mem.get(rank, 0.0) + total - r.working_bytes
        dev_work[rank] = max(dev_work.get(rank, 0.0), r.working_bytes)
        dev_end[rank] = max(dev_end.get(rank, 0.0), finish.get(i, 0.0))
        dev_tail[rank] = dev_tail.get(rank, 0.0) + r.sync_s + r.optimizer_s
        mem_rows.append(total)
    step = max(dev_end[k] + dev_tail[k] for k in dev_end)
    peak = max(dev_mem[k] + dev_work[k] for k in dev_mem)
    fits = peak <= cluster.gpu.memory_bytes

    tokens = tr["global_batch"] * plan.model["seq"]
    model_flops = (graph.fwd_flops + graph.bwd_flops) * B
    hw_flops = model_flops + sum(r.recompute_flops for r in res) * B
    n_gpus = plan.n_devices
    peak_flops = cluster.gpu.peak(tr.get("dtype", "bf16"))
    compute = sum(r.ev.fwd_s + r.ev.bwd_s - r.ev.comm_s for r in res)
    comm = sum(r.ev.comm_s for r in res)
    plan.predicted = {
        "step_time_s": step,
        "tokens_per_s": tokens / step,
        "model_flops_per_step": model_flops,
        "hardware_flops_per_step": hw_flops,
        "tflops_per_gpu": model_flops / step / n_gpus / 1e12,
        "hardware_tflops_per_gpu": hw_flops / step / n_gpus / 1e12,
        "mfu": model_flops / step / (n_gpus * peak_flops),
        "bubble_fraction": sched.bubble_fraction,
        "pipeline_s": sched.makespan_s,
        "grad_sync_s": max(r.sync_s for r in res),
        "optimizer_s": max(r.optimizer_s for r in res),
        "p2p_s": sum(p2p),
        "compute_s_per_microbatch": compute,
        "comm_s_per_microbatch": comm,
        "peak_memory_bytes": peak,
        "memory_limit_bytes": cluster.gpu.memory_bytes,
        "fits": bool(fits),
    }
    plan.model["flops_per_step"] = model_flops
    return plan


def memory_report(plan: Plan) -> str:
    """Per-stage memory breakdown, for messages about plans that do not fit."""
    lines = []
    for s in plan.stages:
        m = s.memory
        lines.append(f"  stage {s.index} (layers {s.layers[0]}-{s.layers[1] - 1}, {s.n_devices} GPUs): "
                     f"weights+grads+optimizer {m.get('param_state_bytes', 0) / 2**30:.2f} GiB, "
                     f"activations {m.get('activation_bytes', 0) / 2**30:.2f} GiB "
                     f"({m.get('inflight_microbatches', 0):g} microbatches in flight), "
                     f"total {m.get('total_bytes', 0) / 2**30:.2f} GiB")
    return "\n".join(lines)
