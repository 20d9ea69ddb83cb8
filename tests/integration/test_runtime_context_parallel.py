"""Context-parallel plans (an attention op split over the sequence, "+cp:ring" / "+cp:allgather")
through `autopar run`: they train as one process does (gloo, fp32), and a context-parallel layout
the runtime cannot run is refused before any process starts, with the stage, op and layout named."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import graphs
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.plan import Plan, PlanError
from autopar.runtime import NotAppliableError
from autopar.runtime.context import check_context_parallel
from autopar.runtime.engines import EngineMismatch, match_plan
from autopar.runtime.launch import check_plans, run_plan
from autopar.runtime.program import context_parallel_axes

pytestmark = pytest.mark.runtime

M = "gpt:hidden=64,layers=2,heads=4,seq=32,vocab=128"
LLAMA = "llama:hidden=64,layers=2,heads=4,kv_heads=2,seq=32,vocab=128"
TOL = 1e-5


def cp_plan(dp: int, tp: int, mb: int, strategy: str, spec: str, model: str = M) -> Plan:
    """A Megatron plan on a dp x tp mesh whose attention ops take `strategy` with q, k, v and the
    output laid out as `spec` (the other ops keep their layouts: the runtime converts between)."""
    cl = load_cluster("p3.16xlarge", 1, dp * tp)
    base = build_3d(ModelSource(model), cl, 2 * dp * mb, Config3D(dp, tp, 1, mb))
    d = copy.deepcopy(base.to_dict())
    for o in d["stages"][0]["ops"]:
        if o["kind"] == "attention":
            o["strategy"] = strategy
            o["in_specs"] = [spec] * 3
            o["out_spec"] = spec
            d["stages"][0]["strategies"][o["name"]] = strategy
    return Plan.from_dict(d)


def _ir(plan: Plan, model: str = M):
    return graphs.load(model, batch=plan.training.microbatch_size)


def test_context_parallel_attention_matches_one_process():
    """Sequence split over the whole mesh (4 chunks), over the dp axis beside head-split TP, on
    2 devices, and with grouped-query attention: loss and every gradient as one process. (On
    CPU DTensor has no rule for a sequence-split attention, so these pass only through the
    runtime's context-parallel attention.)"""
    groups = [([cp_plan(4, 1, 1, "s@0+cp:ring", "RRS0R"), cp_plan(2, 2, 1, "h@1,s@0+cp:ring", "RS1S0R")], M),
              ([cp_plan(2, 1, 1, "s@0+cp:allgather", "RRS0R")], M),
              ([cp_plan(2, 2, 1, "h@1,s@0+cp:allgather", "RS1S0R", model=LLAMA)], LLAMA)]
    for plans, model in groups:
        for p in plans:
            ir = _ir(p, model)
            ops = {o["name"]: o for o in p.stages[0].ops}
            assert set(context_parallel_axes(ops, ir).values()) == {1}          # sequence over axis 0
            with pytest.raises(EngineMismatch):
                match_plan(p, ir, model.split(":")[0])                          # not an engine layout
        for r in check_plans([p.to_json() for p in plans]):
            assert r["max_abs_loss_diff"] < TOL and r["max_abs_grad_diff"] < TOL, r
            assert r["n_grads_compared"] == len(graphs.zoo.build_module(model).state_dict())


def test_context_parallel_run_trains_like_one_process(tmp_path):
    path = tmp_path / "cp.json"
    path.write_text(cp_plan(2, 1, 1, "s@0+cp:ring", "RRS0R").to_json())
    out = run_plan(str(path), steps=2, check=True, optimizer="sgd", lr=0.1)
    assert out["max_abs_loss_diff"] < TOL and out["max_abs_grad_diff"] < TOL and out["max_abs_param_diff"] < TOL


# -- every strategy the ILP offers at one sequence per device --------------------------------------

def sweep_at_one_sequence(dp: int, tp: int) -> list[str]:
    """One-stage plans of a microbatch with one sequence per data-parallel rank on a dp x tp mesh,
    where the planner offers sequence splits (matmuls "s@", attention "+cp:"): plan k gives op i
    its ((k + i) mod n_i)-th strategy, so together they give every op each of its strategies."""
    from builders import rotated_strategy_plans
    cl = load_cluster("p3.16xlarge", 1, dp * tp)
    base = build_3d(ModelSource(M.replace("layers=2", "layers=1")), cl, 2, Config3D(dp, tp, 1, 1))
    return rotated_strategy_plans(base, cl, f"sweep {dp}x{tp} mb1")


@pytest.mark.parametrize("dp,tp", [(1, 2), pytest.param(2, 2, marks=pytest.mark.slow)])
def test_every_strategy_at_one_sequence_runs_and_matches(dp, tp):
    plans = sweep_at_one_sequence(dp, tp)
    offered = {o["strategy"] for t in plans for o in Plan.from_json(t).stages[0].ops}
    assert any("+cp:" in x for x in offered) and any("s@" in x.split("+")[0] for x in offered if "+cp:" not in x)
    model = M.replace("layers=2", "layers=1")
    for r in check_plans(plans):
        assert r["max_abs_loss_diff"] < TOL and r["max_abs_grad_diff"] < TOL, r
        assert r["n_grads_compared"] == len(graphs.zoo.build_module(model).state_dict())


# -- refused before any process starts: stage, op and layout named --------------------------------

def test_unknown_exchange_is_named():
    # the plan schema refuses it on load; the runtime's own check names the op too (a plan built in
    # memory skips the schema)
    with pytest.raises(PlanError, match="stages/0/strategies/scaled_dot_product_attention.*telepathy"):
        cp_plan(2, 1, 1, "s@0+cp:telepathy", "RRS0R")
    plan = cp_plan(2, 1, 1, "s@0+cp:ring", "RRS0R")
    ops = {o["name"]: {**o, "strategy": "s@0+cp:telepathy"} for o in plan.stages[0].ops}
    with pytest.raises(NotAppliableError, match="op scaled_dot_product_attention.*unknown context-parallel exchange"):
        context_parallel_axes(ops, _ir(plan))


def test_specs_that_disagree_with_the_strategy_are_named():
    plan = cp_plan(2, 2, 1, "s@0+cp:ring", "RRS1R")
    with pytest.raises(NotAppliableError, match=r"stage 0 op .*'s@0\+cp:ring'.*sequence over mesh axis 0.*"
                                                r"must each split dim 2"):
        check_context_parallel(plan, _ir(plan))


def test_uneven_sequence_is_refused_by_the_cli(tmp_path):
    model = M.replace("seq=32", "seq=30")
    plan = cp_plan(4, 1, 1, "s@0+cp:ring", "RRS0R", model=model)
    path = tmp_path / "cp.json"
    path.write_text(json.dumps(plan.to_dict()))
    r = subprocess.run([sys.executable, "-m", "autopar.cli", "run", str(path), "--device", "cpu"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "stage 0 op" in r.stderr and "30 tokens does not split evenly over 4 devices" in r.stderr
    assert "--microbatches" in r.stderr or "multiple of 4" in r.stderr


# -- on CUDA: torch's context_parallel ----------------------------------------------------------

def _whole_stage_cp_plan(model: str, dp: int, cp: int) -> Plan:
    """Megatron's context-parallel plan: linears, head and attention split the sequence over cp."""
    return build_3d(ModelSource(model), load_cluster("dgx-h200", 1, dp * cp), 2 * dp, Config3D(dp, 1, 1, 1, cp=cp))


@pytest.mark.parametrize("model", [M, LLAMA])
def test_whole_stage_context_parallel_plan_matches_the_cp_engine(model):
    """Such a plan lowers to the context-parallel engine layout (cp 2, the plan's ring exchange)
    on either mesh axis; on CPU it keeps the exact program path, as torch's engine swaps CUDA
    attention kernels only."""
    import warnings

    from autopar.runtime.engines import apply
    for dp, cp in ((1, 2), (2, 2)):
        plan = _whole_stage_cp_plan(model, dp, cp)
        (layout,) = match_plan(plan, _ir(plan, model), model.split(":")[0])
        assert (layout.dp, layout.tp, layout.cp, layout.cp_exchange) == (dp, 1, cp, "ring")
        assert layout.mesh_dims[1 - layout.dp_axis] == "cp"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(PlanError, match="call apply"):
            apply(_whole_stage_cp_plan(model, 1, 2), device="cpu")
    assert any("CUDA attention kernels only" in str(w.message) for w in caught)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("model", [M.replace("seq=32", "seq=128"), LLAMA.replace("seq=32", "seq=128")])
def test_context_parallel_engine_trains_like_one_process_on_cuda(model, tmp_path):
    """On 2 GPUs, fp32: the plan runs on DDP + torch's context_parallel (not the program), and
    its loss, gradients and updated weights equal one process's. (fp32 attention is the
    memory-efficient kernel, whose ring merge needs chunks of 32 tokens: seq 128 over 2 x 2.)"""
    path = tmp_path / "cp.json"
    path.write_text(_whole_stage_cp_plan(model, 1, 2).to_json())
    out = run_plan(str(path), steps=2, device="cuda", check=True, optimizer="sgd", lr=0.1, precision="fp32")
    print(out["max_abs_loss_diff"], out["max_abs_grad_diff"], out["max_abs_param_diff"])
    assert out["engines"]
    assert out["max_abs_loss_diff"] < 1e-4 and out["max_abs_grad_diff"] < 1e-4 and out["max_abs_param_diff"] < 1e-4
