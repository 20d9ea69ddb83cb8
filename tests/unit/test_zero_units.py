"""ZeRO-2/3's collectives as FSDP runs them in the default model (evaluation/evaluator.py
`zero_units`): one collective per unit (a transformer block), on one stream beside the compute
of its neighbours, instead of one exposed collective per parameter tensor."""

from __future__ import annotations

import pytest

from autopar.costmodel import eager
from autopar.costmodel.collectives import ALL_GATHER, FORWARD, ZERO, all_gather_s, reduce_scatter_s
from autopar.costmodel.compute import ComputeModel
from autopar.evaluation import evaluator
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.evaluation.evaluator import evaluate_stage
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.sharding.rules.common import GRAD_BYTES
from autopar.sharding.stage_problem import StageProblem
from graphs.ir import MATMUL, numel

SPEC = "gpt:hidden=256,layers=4,heads=4,seq=128,vocab=1024"


@pytest.fixture(scope="module")
def src():
    return ModelSource(SPEC)


def _stage(src, cluster, dp, zero, mb=2):
    plan = build_3d(src, cluster, dp * mb, Config3D(dp, 1, 1, mb, zero=zero))
    st = plan.stages[0]
    graph = src.graph(dp * mb)
    cm = ComputeModel(cluster.gpu, plan.training.dtype)
    mesh = Mesh(cluster, Submesh(*st.submesh), tuple(st.logical_mesh))
    return plan, st, graph, cm, mesh


@pytest.mark.parametrize("nodes", [1, 8])
def test_one_collective_per_block_of_its_parameters(src, monkeypatch, nodes):
    """Each block's gather and reduce-scatter are priced on its parameter count (graph layers,
    not the ops' collectives): 2 B per parameter each way, one latency each; the compute beside
    them is the block's ops' own."""
    seen = []
    real = eager.fsdp_block_comm_s

    def spy(*args, **kw):
        seen.append((args, kw))
        return real(*args, **kw)

    monkeypatch.setattr(eager, "fsdp_block_comm_s", spy)
    cluster = load_cluster("dgx-h100", nodes)
    dp = 8 * nodes
    plan, st, graph, cm, mesh = _stage(src, cluster, dp, 3)
    evaluator._STAGE_CACHE.clear()
    seen.clear()
    evaluate_stage(graph, cluster, st, plan.training, cm)
    blocks = list(range(1, len(graph.layers) - 1))
    assert len(seen) == len(blocks)
    axis = mesh.axis(1) if mesh.axis(1).size == dp else mesh.axis(3)
    assert axis.size == dp
    prob = StageProblem(graph, [n for layer in graph.layers for n in layer.nodes], mesh, cm)
    assign = prob.assignment(prob.choice_from_names(st.strategies))
    for li, ((c_f, c_b, ag_f, ag_b, rs), kw) in zip(blocks, seen, strict=True):
        params = graph.layers[li].param_count
        assert ag_f == pytest.approx(all_gather_s(2 * params, axis), rel=1e-9)
        # the backward gathers what it reads: the matmuls' weights at least, not the biases
        read = sum(numel(o.shape) for n in graph.layers[li].nodes if graph.node(n).kind == MATMUL
                   for o in graph.node(n).operands if o.is_param and len(o.shape) == 2)
        assert all_gather_s(2 * read, axis) <= ag_b < ag_f
        assert rs == pytest.approx(reduce_scatter_s(GRAD_BYTES * params, axis), rel=1e-9)
        ops = [prob.strategy_of(n, assign[n]) for n in graph.layers[li].nodes if n in assign]
        assert c_f == pytest.approx(sum(s.fwd_s for s in ops), rel=1e-12)
        assert c_b == pytest.approx(sum(s.bwd_s for s in ops), rel=1e-12)
        assert kw == {"first": li == blocks[0], "last": li == blocks[-1]}
        # the per-tensor pricing it replaces paid one latency per tensor
        per_tensor = sum(c.time_s for s in ops for c in s.runs(3)
                         if c.purpose == ZERO and c.kind == ALL_GATHER and c.phase == FORWARD)
        n_tensors = sum(1 for s in ops for c in s.runs(3)
                        if c.purpose == ZERO and c.kind == ALL_GATHER and c.phase == FORWARD)
        assert per_tensor - ag_f == pytest.approx((n_tensors - 1) * (dp - 1) * axis.latency_s, rel=1e-6)


@pytest.mark.parametrize("zero", [2, 3])
def test_step_within_its_bounds(src, zero):
    """Across nodes, where the collectives matter: the step is no shorter than the compute alone
    nor than the stream's collectives alone (one stream runs them all, in order), and no longer
    than the per-tensor pricing, everything exposed, which it replaces; the breakdown adds up."""
    cluster = load_cluster("dgx-h100", 8)
    plan, st, graph, cm, mesh = _stage(src, cluster, 64, zero, mb=1)
    evaluator._STAGE_CACHE.clear()
    res = evaluate_stage(graph, cluster, st, plan.training, cm)
    prob = StageProblem(graph, [n for layer in graph.layers for n in layer.nodes], mesh, cm)
    assign = prob.assignment(prob.choice_from_names(st.strategies))
    ev = res.ev
    units = evaluator.zero_units(graph, st.layers, prob, assign, zero)
    compute = sum(prob.strategy_of(n, i).fwd_s + prob.strategy_of(n, i).bwd_s for n, i in assign.items())
    assert res.fwd_s + res.bwd_s >= compute * (1 - 1e-12)
    # the stream's collectives per microbatch, one per block, kind and phase
    axis = mesh.axis(1) if mesh.axis(1).size == 64 else mesh.axis(3)
    stream = 0.0
    for li in range(1, len(graph.layers) - 1):
        p = graph.layers[li].param_count
        stream += reduce_scatter_s(GRAD_BYTES * p, axis) + (2 * all_gather_s(2 * p, axis) if zero == 3 else 0.0)
    assert res.fwd_s + res.bwd_s >= stream
    # the per-tensor pricing, all exposed: no larger
    assert res.fwd_s + res.bwd_s + res.sync_s <= ev.fwd_s + ev.bwd_s + ev.sync_s
    assert units.fwd_delta_s + units.bwd_delta_s + units.step_delta_s < 0
    b = plan.predicted.breakdown_s
    assert sum(b.values()) == pytest.approx(plan.predicted.step_time_s, rel=1e-9)
    assert b["comm_overlap"] >= 0 and b["exposed_comm"] >= 0


def test_one_gpu_and_zero1_unchanged(src):
    """Nothing to gather on one GPU, and ZeRO 0/1 are the gradient buckets' (test_grad_sync)."""
    for dp, zero in ((1, 3), (8, 1)):
        cluster = load_cluster("dgx-h100", 1, dp)
        plan, st, graph, cm, mesh = _stage(src, cluster, dp, zero)
        evaluator._STAGE_CACHE.clear()
        res = evaluate_stage(graph, cluster, st, plan.training, cm)
        assert res.fwd_s == res.ev.fwd_s and res.bwd_s == res.ev.bwd_s
