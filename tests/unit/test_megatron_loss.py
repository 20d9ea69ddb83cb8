"""The default model's loss as Megatron runs it (costmodel/compute.py
`vocab_parallel_cross_entropy_s`, evaluation/evaluator.py `megatron_loss_delta_s`): fp32
passes over this GPU's vocab shard of the logits, bytes at the streaming bandwidth, beyond the
loss op's own one-pass pricing. Oracle: the bytes counted by hand from Megatron's kernel
sequence (cast, max, subtract, exp, sum, divide; multiply, cast back) on the logits counted by
hand (tokens x vocab / tp)."""

from __future__ import annotations

import pytest

from autopar.costmodel.compute import ComputeModel
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.evaluation.evaluator import evaluate_stage, megatron_loss_delta_s
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.plan import PlanError
from autopar.sharding.stage_problem import StageProblem
from graphs.ir import LOSS
from graphs.query import stage_nodes

SEQ, VOCAB, MB = 512, 65536, 4
SPEC = f"gpt:hidden=256,layers=2,heads=4,seq={SEQ},vocab={VOCAB}"


@pytest.fixture(scope="module")
def src():
    return ModelSource(SPEC)


def _stage(src, tp):
    cluster = load_cluster("dgx-a100", 1, tp)
    plan = build_3d(src, cluster, MB, Config3D(1, tp, 1, MB))
    st = plan.stages[0]
    graph = src.graph(MB)
    cm = ComputeModel(cluster.gpu, plan.training.dtype)
    mesh = Mesh(cluster, Submesh(*st.submesh), tuple(st.logical_mesh))
    prob = StageProblem(graph, stage_nodes(graph, st.layers), mesh, cm)
    assign = prob.assignment(prob.choice_from_names(st.strategies))
    return plan, st, graph, cm, prob, assign, cluster


def _hand_s(cm, logits, passes_bytes):
    # one kernel per pass: its bytes at the streaming bandwidth plus the gap, at least a launch
    return sum(max(b * logits / cm.stream_bytes_per_s + cm.gap_s, cm.launch_s) for b in passes_bytes)


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_cross_entropy_bytes_on_the_vocab_shard(src, tp):
    plan, st, graph, cm, prob, assign, cluster = _stage(src, tp)
    logits = MB * SEQ * VOCAB / tp
    fwd_hand = _hand_s(cm, logits, (2 + 4, 4, 4 + 4, 4 + 4, 4, 4 + 4))   # 38 B
    bwd_hand = _hand_s(cm, logits, (4 + 4, 4 + 2))                       # 14 B
    assert cm.vocab_parallel_cross_entropy_s(logits) == pytest.approx((fwd_hand, bwd_hand), rel=1e-9)
    (loss,) = [n for n in prob.names if graph.node(n).kind == LOSS]
    own = prob.strategy_of(loss, assign[loss])
    assert 0 < own.fwd_s < fwd_hand and 0 < own.bwd_s < bwd_hand      # one bf16 pass each way
    fwd, bwd = megatron_loss_delta_s(graph, prob, assign, cm)
    assert fwd == pytest.approx(fwd_hand - own.fwd_s, rel=1e-9)
    assert bwd == pytest.approx(bwd_hand - own.bwd_s, rel=1e-9)


def test_stage_carries_it_with_loss_megatron_only(src):
    """evaluate(loss="megatron") adds the term to the stage (its fwd, bwd and head+loss
    figures); the default ("fused", the planner's) and the eager recipe are as they were."""
    plan, st, graph, cm, prob, assign, cluster = _stage(src, 1)
    fwd, bwd = megatron_loss_delta_s(graph, prob, assign, cm)
    assert fwd > 0 and bwd > 0
    fused = evaluate_stage(graph, cluster, st, plan.training, cm)
    megatron = evaluate_stage(graph, cluster, st, plan.training, cm, loss="megatron")
    assert megatron.fwd_s - fused.fwd_s == pytest.approx(fwd, rel=1e-9)
    assert megatron.bwd_s - fused.bwd_s == pytest.approx(bwd, rel=1e-9)
    assert megatron.head_loss_s - fused.head_loss_s == pytest.approx(fwd + bwd, rel=1e-9)
    step = {k: build_3d(src, cluster, MB, Config3D(1, 1, 1, MB), loss=k).prediction.step_time_s
            for k in ("fused", "megatron")}
    assert step["megatron"] - step["fused"] == pytest.approx(fwd + bwd, rel=1e-6)   # one microbatch


@pytest.mark.parametrize("kw", [{"loss": "fp32"}, {"loss": "megatron", "eager": True}])
def test_bad_loss_is_a_clear_error(src, kw):
    cluster = load_cluster("dgx-a100", 1, 1)
    with pytest.raises(PlanError, match="loss"):
        build_3d(src, cluster, MB, Config3D(1, 1, 1, MB), **kw)
