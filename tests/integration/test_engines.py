"""autopar.runtime.engines: plans lowered to PyTorch's own engines (DDP, FSDP2, tensor parallel,
pipelining) train exactly as one process does (gloo, fp32), and layouts no engine matches are
named when they fall back to the op-by-op program."""

from __future__ import annotations

import copy
import os
import socket

import pytest

import graphs
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.plan import Plan
from autopar.runtime.engines import EngineMismatch, match_plan, segment_blocks
from autopar.runtime.launch import check_plans, run_plan

M = "gpt:hidden=64,layers=4,heads=4,seq=32,vocab=128"
LLAMA = "llama:hidden=64,layers=2,heads=4,kv_heads=2,seq=32,vocab=128"
TOL = 1e-5


def plan_3d(dp, tp, pp, mb, model=M, **kw) -> Plan:
    cl = load_cluster("p3.16xlarge", 1, dp * tp * pp)
    return build_3d(ModelSource(model), cl, 8, Config3D(dp, tp, pp, mb, **kw))


def run(plan: Plan, tmp_path, **kw) -> dict:
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    return run_plan(str(path), steps=2, check=True, optimizer="sgd", lr=0.1, **kw)


def assert_exact(out: dict, model: str = M) -> None:
    assert out["max_abs_loss_diff"] < TOL, out
    assert out["max_abs_grad_diff"] < TOL, out
    assert out["max_abs_param_diff"] < TOL, out
    assert out["n_grads_compared"] == len(graphs.zoo.build_module(model).state_dict())
    assert out["shard_local_ops"] == []          # nothing ran on the op-by-op program


# -- matching (no processes) ------------------------------------------------------------------

def test_megatron_plans_match_their_engines():
    for dp, tp, pp in [(2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2), (2, 1, 2)]:
        plan = plan_3d(dp, tp, pp, 1)
        g = graphs.load(M, batch=plan.training.microbatch_size)
        layouts = match_plan(plan, g, "gpt")
        assert [(x.dp, x.tp) for x in layouts] == [(dp, tp)] * pp


def test_other_layout_is_named():
    plan = plan_3d(1, 2, 1, 2)
    d = copy.deepcopy(plan.to_dict())
    d["stages"][0]["strategies"]["blocks_1_mlp_fc2"] = "R"
    g = graphs.load(M, batch=plan.training.microbatch_size)
    with pytest.raises(EngineMismatch, match="stage 0.*op blocks_1_mlp_fc2 is 'R'"):
        match_plan(Plan.from_dict(d), g, "gpt")


def test_compile_by_default_only_where_measured_to_help():
    # bench/results/runtime_vs_native_h200.json: compiled blocks made tp2 2.5-2.8x faster on
    # H200s; for dp2 they gave 5% and cost 9% more memory, so dp stays eager
    import torch

    from autopar.runtime.engines import StageLayout, default_compile
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert default_compile(StageLayout(1, 2, 0), cuda) and default_compile(StageLayout(2, 2, 0), cuda)
    assert not default_compile(StageLayout(2, 1, 0), cuda) and not default_compile(StageLayout(1, 2, 0), cpu)


def test_segments_cover_every_block_once():
    # layer 0 embeds, layers 1..4 are the blocks, layer 5 is the head
    parts = [segment_blocks(r, 4) for r in [(0, 2), (2, 3), (3, 6)]]
    assert parts == [(True, False, range(0, 1)), (False, False, range(1, 2)), (False, True, range(2, 4))]


# -- numerics against one process (gloo, fp32) ------------------------------------------------

@pytest.mark.runtime
def test_dp2_ddp_matches_one_process(tmp_path):
    out = run(plan_3d(2, 1, 1, 2), tmp_path)
    assert_exact(out)
    assert out["param_specs"][0]["blocks.0.mlp.fc1.weight"] == "RR"


@pytest.mark.runtime
def test_zero3_fsdp_matches_one_process(tmp_path):
    out = run(plan_3d(2, 1, 1, 2, zero=3), tmp_path)
    assert_exact(out)
    # FSDP2 shards every weight's dim 0 over the data-parallel axis
    assert out["param_specs"][0]["blocks.0.mlp.fc1.weight"] == "S0R"


@pytest.mark.runtime
def test_tp2_matches_one_process(tmp_path):
    out = run(plan_3d(1, 2, 1, 2), tmp_path)
    assert_exact(out)
    specs = out["param_specs"][0]
    assert specs["blocks.0.attn.q.weight"] == "S1R" and specs["blocks.0.attn.proj.weight"] == "RS1"
    assert specs["wte.weight"] == "S1R"           # vocab-parallel embedding and tied head


@pytest.mark.runtime
def test_dp2_tp2_matches_one_process(tmp_path):
    out = run(plan_3d(2, 2, 1, 2), tmp_path)
    assert_exact(out)
    assert out["param_specs"][0]["blocks.0.mlp.fc1.weight"] == "S1R"


@pytest.mark.runtime
def test_pp2_1f1b_matches_one_process(tmp_path):
    plan = plan_3d(1, 1, 2, 2)
    assert plan.training.schedule == "1f1b" and plan.training.n_microbatches == 4
    out = run(plan, tmp_path)
    assert_exact(out)
    # the tied embedding lives in both stages
    assert "wte.weight" in out["param_specs"][0] and "wte.weight" in out["param_specs"][1]


@pytest.mark.runtime
def test_pp2_dp2_zero1_gpipe_matches_one_process(tmp_path):
    out = run(plan_3d(2, 1, 2, 1, schedule="gpipe", zero=1), tmp_path)
    assert_exact(out)


@pytest.mark.runtime
def test_pp2_tp2_full_recompute_matches_one_process(tmp_path):
    out = run(plan_3d(1, 2, 2, 2, recompute="full"), tmp_path)
    assert_exact(out)


@pytest.mark.runtime
def test_llama_gqa_dp2_tp2_zero3_matches_one_process():
    plans = [plan_3d(2, 2, 1, 2, model=LLAMA), plan_3d(2, 2, 1, 2, model=LLAMA, zero=3)]
    for r in check_plans([p.to_json() for p in plans]):
        assert r["max_abs_loss_diff"] < TOL and r["max_abs_grad_diff"] < TOL, r
        assert r["n_grads_compared"] == len(graphs.zoo.build_module(LLAMA).state_dict())


def test_replicated_embedding_under_tp_matches_its_engines():
    # the auto planner often keeps the embeddings whole and splits only the head's vocab
    plan = tp_with_replicated_embeddings()
    layouts = match_plan(plan, graphs.load(M, batch=plan.training.microbatch_size), "gpt")
    assert layouts[0].split_embeddings == () and layouts[0].split_head


def tp_with_replicated_embeddings() -> Plan:
    from autopar.evaluation.evaluator import evaluate
    plan = plan_3d(1, 2, 1, 2)
    plan.stages[0].strategies.update(wte="R", wpe="R")
    cl = load_cluster("p3.16xlarge", 1, 2)
    return evaluate(plan, graphs.load(M, batch=plan.training.microbatch_size), cl)


@pytest.mark.runtime
def test_tp2_replicated_embedding_split_head_matches_one_process(tmp_path):
    out = run(tp_with_replicated_embeddings(), tmp_path)
    assert_exact(out)
    assert out["param_specs"][0]["wte.weight"] == "RR"        # stored whole, split at the head


# -- interleaved pipelines (several stages per rank), through runtime.apply directly -----------

def _interleaved_rank(rank: int, world: int, plan: Plan, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from autopar.runtime import EngineModel, apply, build_model, make_batch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    pm = apply(plan, build_model(plan, seed=0), device="cpu", optimizer="sgd", lr=0.0)
    assert isinstance(pm, EngineModel) and len(pm.segments) == 2
    loss = pm.forward_backward(make_batch(plan, 0))
    grads = pm.full_grads()
    torch.save({"loss": None if loss is None else float(loss), "grads": grads if pm.local_index == 0 else {}},
               f"{out}/{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.runtime
@pytest.mark.parametrize("dp", [1, 2])
def test_interleaved_pipeline_matches_one_process(tmp_path, dp):
    import torch
    import torch.multiprocessing as mp

    from autopar.runtime import build_model, make_batch
    plan = plan_3d(dp, 1, 2, 1, schedule="interleaved", virtual_stages=2)
    assert [s.device_ids for s in plan.stages] == [list(range(dp)), list(range(dp, 2 * dp))] * 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_interleaved_rank, args=(2 * dp, plan, port, str(tmp_path)), nprocs=2 * dp)
    # one process: the same microbatches in order
    model = build_model(plan, seed=0)
    batch = make_batch(plan, 0)
    B, mb = plan.training.n_microbatches, plan.training.microbatch_size
    ref_loss = 0.0
    for i in range(B):
        loss = model(batch["ids"][i * mb:(i + 1) * mb], batch["targets"][i * mb:(i + 1) * mb])
        (loss / B).backward()
        ref_loss += float(loss.detach()) / B
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2 * dp)]
    losses = [r["loss"] for r in results if r["loss"] is not None]
    assert losses and all(abs(x - ref_loss) < TOL for x in losses)
    ref = {n: p.grad for n, p in model.named_parameters()}
    got = {n: g for r in results for n, g in r["grads"].items()}
    assert set(got) == set(ref)
    assert max(float((g - ref[n]).abs().max()) for n, g in got.items()) < TOL
