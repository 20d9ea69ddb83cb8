"""Plans on PyTorch's engines compiled per transformer block (`autopar run --compile`, engines.
recompute_and_compile) train exactly as one eager process does (gloo, fp32): DDP, FSDP2 ZeRO-3,
ZeRO-1 over accumulated microbatches, a 1F1B pipeline, with recomputation inside the compiled
blocks (torchtitan's order: checkpoint, compile, fully_shard), and tensor-parallel blocks with
their checkpoints around the compiled code.

The blocks compile with Inductor, as on CUDA (its C++ kernels on CPU, a build per graph, so
these take a minute or so each on 2 cores); dynamo's count of graphs shows the compilation ran
instead of falling back to eager blocks."""

from __future__ import annotations

import pytest

from tests.integration.test_engines import assert_exact, mixed_storage_plan, plan_3d, run

pytestmark = pytest.mark.runtime


def run_compiled(plan, tmp_path, max_graphs: int | None = 1) -> dict:
    out = run(plan, tmp_path, compile=True)
    assert_exact(out)
    assert out["engines"]
    # (under interleaving a rank group is named by its first stage)
    assert out["compiled_stages"] == list(range(len(out["param_specs"]))), out["compiled_stages"]
    assert out["compiled_graphs"] >= 1
    if max_graphs is not None:
        # a rank's blocks share one compiled graph (dynamo inlines the modules and guards on
        # their parameters' shapes, not on which block): not one per block, which would reach
        # dynamo's recompile limit (8) on a 24-block model and run the rest eager
        assert out["compiled_graphs"] <= max_graphs, out["compiled_graphs"]
    return out


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_dp2_ddp_compiled_matches_one_process(tmp_path, recompute):
    run_compiled(plan_3d(2, 1, 1, 2, recompute=recompute), tmp_path)


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_zero3_fsdp_compiled_matches_one_process(tmp_path, recompute):
    out = run_compiled(plan_3d(2, 1, 1, 2, zero=3, recompute=recompute), tmp_path)
    assert out["param_specs"][0]["blocks.0.mlp.fc1.weight"] == "S0R"      # fully_shard after compile


def test_zero1_accumulating_microbatches_compiled_matches_one_process(tmp_path):
    plan = plan_3d(2, 1, 1, 1, zero=1)
    assert plan.training.n_microbatches == 4
    run_compiled(plan, tmp_path)


def test_pp2_1f1b_compiled_matches_one_process(tmp_path):
    plan = plan_3d(1, 1, 2, 2)
    assert plan.training.schedule == "1f1b" and plan.training.n_microbatches == 4
    run_compiled(plan, tmp_path)


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_tp2_recompute_compiled_matches_one_process(tmp_path, recompute):
    # the checkpoints around the compiled code: whole blocks, or the attention compiled on its
    # own inside its checkpoint (then the MLP is a graph of its own)
    run_compiled(plan_3d(1, 2, 1, 2, recompute=recompute), tmp_path, max_graphs=1 if recompute == "full" else 2)


@pytest.mark.slow
def test_per_op_sharded_storage_compiled_matches_one_process(tmp_path):
    # FSDP2 units of their own inside compiled blocks (ZeRO-1 with three linears stored sharded)
    # (FSDP2's hooks on a unit inside a block break its graph: dynamo skips them, so these
    # blocks compile in pieces, and differently shaped blocks in different graphs)
    run_compiled(mixed_storage_plan(1), tmp_path, max_graphs=None)


@pytest.mark.slow
def test_tp2_sequence_parallel_pipeline_compiled_matches_one_process(tmp_path):
    # Megatron's sequence parallelism in a pipeline of tp2 stages (DTensor inside the compiled
    # blocks), recomputing whole blocks
    run_compiled(plan_3d(1, 2, 2, 1, sequence_parallel=True, recompute="full"), tmp_path)



@pytest.mark.slow
def test_interleaved_pipeline_compiled_matches_one_process(tmp_path):
    # two compiled chunks per rank under torch's Interleaved1F1B
    plan = plan_3d(1, 1, 2, 1, schedule="interleaved", virtual_stages=2)
    out = run_compiled(plan, tmp_path)
    assert len(out["param_specs"]) == 2
