"""The data-parallel gradient sync as engines run it: buckets filled in the backward's order,
their all-reduces on one stream beside the rest of the backward (costmodel/collectives.py), in
the evaluator's step and the planner's per-layer tables (evaluation/evaluator.py)."""

from __future__ import annotations

import random

import pytest

from autopar.costmodel import collectives as coll
from autopar.costmodel import eager
from autopar.costmodel.collectives import (
    COMM_OVERLAP_SLOWDOWN,
    GRAD_SYNC,
    all_reduce_s,
    comm_overlap_s,
    fill_buckets,
    grad_bucket_bytes,
    overlapped_sync_s,
    stream_end_s,
)
from autopar.costmodel.compute import ComputeModel
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.evaluation.evaluator import evaluate_stage, grad_sync_buckets, grad_sync_step_s
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.sharding.stage_problem import Settings, StageProblem
from graphs.query import main_boundary

SPEC = "gpt:hidden=256,layers=4,heads=4,seq=128,vocab=1024"


# ---- the stream and the buckets: brute force on small integer inputs ----------------------------

def _tick_simulation(jobs: list[tuple[int, int]], end: int) -> tuple[int, int]:
    """(finish time, busy ticks before `end`) of one stream run clock tick by clock tick: when
    idle, it starts the earliest-ready job that is ready (ties: shorter first, as sorted)."""
    pending = sorted(jobs)
    t = busy_before = 0
    left = 0                      # ticks left of the running job
    while pending or left:
        if not left and pending and pending[0][0] <= t:
            left = pending.pop(0)[1]
        if left:
            left -= 1
            busy_before += t < end
        t += 1
    return t, busy_before


def test_stream_and_overlap_match_a_tick_by_tick_simulation():
    rng = random.Random(7)
    for _ in range(300):
        jobs = [(rng.randint(0, 12), rng.randint(1, 6)) for _ in range(rng.randint(1, 6))]
        end = rng.randint(max(r for r, _ in jobs), 20)
        finish, busy_before = _tick_simulation(jobs, end)
        assert stream_end_s(jobs) == finish
        exposed, hidden = overlapped_sync_s(jobs, end)
        assert exposed == max(0, finish - end)
        assert hidden == busy_before
    assert overlapped_sync_s([], 5.0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="after the compute ends"):
        overlapped_sync_s([(3.0, 1.0)], 2.0)


def test_buckets_by_brute_force():
    """Every gradient lands in one bucket of its group; a bucket closes at the gradient that
    takes it to its size, ready when that gradient is made; the rest close at the end."""
    rng = random.Random(3)
    for _ in range(300):
        grads = [(float(i), rng.choice((1, 2)), float(rng.randint(1, 9))) for i in range(rng.randint(0, 12))]
        size = {1: float(rng.randint(1, 15)), 2: float(rng.randint(1, 15))}
        got = fill_buckets(grads, size, 99.0)
        want = []
        for mask in (1, 2):
            mine = [g for g in grads if g[1] == mask]
            start = 0
            for i in range(len(mine)):
                if sum(g[2] for g in mine[start:i + 1]) >= size[mask]:
                    want.append((mine[i][0], mask, sum(g[2] for g in mine[start:i + 1])))
                    start = i + 1
            if start < len(mine):
                want.append((99.0, mask, sum(g[2] for g in mine[start:])))
        assert sorted((b.ready_s, b.mask, b.nbytes) for b in got) == sorted(want)


def test_bucket_sizes_per_engine():
    # PyTorch DDP: bucket_cap_mb=25 of fp32 gradients, whatever the group
    assert grad_bucket_bytes(coll.DDP, 2, 4) == grad_bucket_bytes(coll.DDP, 1024, 4) == 25 * 2**20
    # Megatron-Core: max(40M, 1M x dp) parameters, in the gradients' bytes
    assert grad_bucket_bytes(coll.MEGATRON_CORE, 8, 2) == 40e6 * 2
    assert grad_bucket_bytes(coll.MEGATRON_CORE, 128, 2) == 128e6 * 2


def test_engines_after_the_backward(src):
    """DeepSpeed's pipeline engine reduces its buckets after the schedule: all of them exposed,
    one latency per 500M-parameter bucket; an unknown engine is refused by name."""
    assert grad_bucket_bytes(coll.DEEPSPEED, 8, 2) == 500e6 * 2
    assert grad_bucket_bytes(coll.MEGATRON_LOCAL, 8, 2) == float("inf")
    assert not coll.grad_sync_overlaps(coll.DEEPSPEED) and coll.grad_sync_overlaps(coll.DDP)
    cluster = load_cluster("dgx-h100", 2)
    plan = build_3d(src, cluster, 32, Config3D(16, 1, 1, 2), grad_sync=coll.DEEPSPEED)
    res = evaluate_stage(src.graph(32), cluster, _stage(plan), plan.training,
                         ComputeModel(cluster.gpu, plan.training.dtype), False, coll.DEEPSPEED)
    assert res.sync_buckets and all(share == 1.0 for share, _ in res.sync_buckets)
    p = plan.predicted
    assert p.grad_sync_s == pytest.approx(res.sync_s, rel=1e-12)
    assert p.breakdown_s["comm_overlap"] == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="unknown gradient sync engine 'nccl'"):
        build_3d(src, cluster, 32, Config3D(16, 1, 1, 2), grad_sync="nccl")


def test_overlap_slowdown_is_one_concept():
    """FSDP2's hidden collectives and the gradient buckets slow the compute alike."""
    assert eager.comm_overlap_s is comm_overlap_s and eager.COMM_OVERLAP_SLOWDOWN == COMM_OVERLAP_SLOWDOWN
    assert comm_overlap_s(2.0) == pytest.approx(2.0 * COMM_OVERLAP_SLOWDOWN)


# ---- the evaluator and the planner's tables ------------------------------------------------------

@pytest.fixture(scope="module")
def src():
    return ModelSource(SPEC)


def _stage(plan):
    return plan.stages[0]


def _dp_plan(src, cluster, dp, eager_=False, mb=2):
    return build_3d(src, cluster, dp * mb, Config3D(dp, 1, 1, mb), eager=eager_)


@pytest.mark.parametrize("eager_,engine", [(False, None), (True, None), (False, coll.MEGATRON_LOCAL)])
def test_one_bucket_closed_form(src, monkeypatch, eager_, engine):
    """Buckets larger than the model (or Megatron-LM's one flat buffer): one all-reduce of
    every gradient (2 B per parameter, 4 B in DDP's fp32 buckets), ready at the end of the
    backward, so all of it is exposed and nothing slows the compute: the step is the pipeline,
    that all-reduce, the optimizer and DDP's bucket copy."""
    if engine is None:
        monkeypatch.setattr(coll, "DDP_BUCKET_BYTES", 1e18)
        monkeypatch.setattr(coll, "MEGATRON_BUCKET_PARAMS", 1e18)
    cluster = load_cluster("dgx-h100", 2)
    plan = build_3d(src, cluster, 32, Config3D(16, 1, 1, 2), eager=eager_, grad_sync=engine)
    st = _stage(plan)
    res = evaluate_stage(src.graph(32), cluster, st, plan.training, ComputeModel(cluster.gpu, plan.training.dtype),
                         eager_, engine)
    mesh = Mesh(cluster, Submesh(*st.submesh), tuple(st.logical_mesh))
    assert mesh.axis(1).size == 16 and len(res.sync_buckets) == 1
    graph = src.graph(32)
    prob = StageProblem(graph, [n for layer in graph.layers for n in layer.nodes], mesh, 
                        ComputeModel(cluster.gpu, plan.training.dtype))
    assign = prob.assignment(prob.choice_from_names(st.strategies))
    grads = [c for n in prob.names for c in prob.strategy_of(n, assign[n]).runs(0) if c.purpose == GRAD_SYNC]
    assert {c.mask for c in grads} == {1}
    sync = all_reduce_s(sum(c.nbytes for c in grads) * (2 if eager_ else 1), mesh.axis(1))
    p = plan.predicted
    assert p.grad_sync_s == pytest.approx(sync, rel=1e-9)
    tail = p.step_time_s - p.pipeline_s - p.breakdown_s["host"]     # the eager recipe may wait on the host
    assert tail == pytest.approx(sync + p.optimizer_s + p.breakdown_s["grad_buckets"], rel=1e-9)
    assert p.breakdown_s["comm_overlap"] == pytest.approx(0.0, abs=1e-15) or eager_


def test_buckets_hide_behind_the_backward(src):
    """Default buckets on a fast network: the backward covers all but the last bucket, which
    waits after it, and the compute slows beside the rest; the sync costs far less than an
    exposed all-reduce per tensor, and the step's parts still add up."""
    cluster = load_cluster("dgx-h100", 2)
    plan = _dp_plan(src, cluster, 16)
    st = _stage(plan)
    graph = src.graph(32)
    res = evaluate_stage(graph, cluster, st, plan.training, ComputeModel(cluster.gpu, plan.training.dtype))
    assert res.sync_buckets and all(0 < share <= 1 for share, _ in res.sync_buckets)
    total = sum(d for _, d in res.sync_buckets)
    assert res.sync_s == pytest.approx(total)
    p = plan.predicted
    window_end = p.pipeline_s
    jobs = [(window_end - res.bwd_s * (1 - share), d) for share, d in res.sync_buckets]
    exposed, hidden = overlapped_sync_s(jobs, window_end)
    assert p.grad_sync_s == pytest.approx(exposed, rel=1e-9)
    assert p.step_time_s - p.pipeline_s == pytest.approx(exposed + comm_overlap_s(hidden) + p.optimizer_s, rel=1e-9)
    assert sum(p.breakdown_s.values()) == pytest.approx(p.step_time_s, rel=1e-9)


@pytest.mark.parametrize("bucket_params", [100_000, 40_000_000])
def test_layer_terms_match_the_stage(src, monkeypatch, bucket_params):
    """The planner's per-layer terms (each layer as a stage of its own, a partly filled bucket
    paying its share of a latency), summed over a stage of blocks, are the evaluator's exposed
    sync and slowdown for the stage within each layer's last bucket and a latency. Buckets of
    100k parameters: about 8 per block of this model; Megatron-Core's 40M: one for the whole
    stage, all exposed, which the layers' sum then matches but for its latency."""
    monkeypatch.setattr(coll, "MEGATRON_BUCKET_PARAMS", bucket_params)
    monkeypatch.setattr(coll, "MEGATRON_BUCKET_PARAMS_PER_DP_RANK", 0)
    # 25 Gb/s between nodes (a sync the backward cannot hide), and NVLink inside one
    for dp, cluster in ((32, load_cluster("p3.16xlarge", 4)), (4, load_cluster("p3.16xlarge", 4, 1)),
                        (8, load_cluster("p3.16xlarge", 1))):
        plan = _dp_plan(src, cluster, dp)
        st = _stage(plan)
        graph = src.graph(2 * dp)
        cm = ComputeModel(cluster.gpu, plan.training.dtype)
        mesh = Mesh(cluster, Submesh(*st.submesh), tuple(st.logical_mesh))
        latency = 2 * (mesh.axis(1).size - 1) * mesh.axis(1).latency_s
        blocks = range(1, len(graph.layers) - 1)
        terms = slack = 0.0
        for li in blocks:
            names = list(graph.layers[li].nodes)
            prob = StageProblem(graph, names, mesh, cm, boundary={main_boundary(graph, names): (1, 0, 0)})
            choice = prob.choice_from_names({n: s for n, s in st.strategies.items() if n in names})
            assign = prob.assignment(choice)
            ev = prob.evaluate(choice, Settings(plan.training.n_microbatches, 0))
            terms += grad_sync_step_s(prob, assign, ev, 0, coll.MEGATRON_CORE, ev.bwd_s)
            slack += max(d for _, d in grad_sync_buckets(prob, assign, 0, coll.MEGATRON_CORE)) + latency
        # the same blocks as a stage of their own, through the evaluator's buckets
        names = [n for li in blocks for n in graph.layers[li].nodes]
        prob = StageProblem(graph, names, mesh, cm, boundary={main_boundary(graph, names): (1, 0, 0)})
        choice = prob.choice_from_names({n: s for n, s in st.strategies.items() if n in names})
        ev = prob.evaluate(choice, Settings(plan.training.n_microbatches, 0))
        buckets = grad_sync_buckets(prob, prob.assignment(choice), 0, coll.MEGATRON_CORE)
        exposed, hidden = overlapped_sync_s([(ev.bwd_s * share, d) for share, d in buckets], ev.bwd_s)
        stage = exposed + comm_overlap_s(hidden)
        assert abs(terms - stage) <= slack, (dp, stage, terms, slack)
