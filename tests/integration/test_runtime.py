"""autopar.runtime: plans run on torch.distributed (gloo, 4 CPU processes) and reproduce one
process's loss and gradients; bad input stops before any process starts; a failing rank stops
the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import graphs
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.plan import Plan, PlanError
from autopar.runtime import check_plan_matches
from autopar.runtime.launch import RankFailed, run_plan

# Every test here launches torch.distributed processes (gloo): CI runs them as a second pass.
pytestmark = pytest.mark.runtime

M = "gpt:hidden=64,layers=4,heads=4,seq=32,vocab=128"
TOL = 1e-5


def plan_3d(dp, tp, pp, mb, **kw) -> Plan:
    cl = load_cluster("p3.16xlarge", 1, dp * tp * pp)
    return build_3d(ModelSource(M), cl, 8, Config3D(dp, tp, pp, mb, **kw))


def write(plan: Plan | dict, tmp_path, name="plan.json") -> str:
    path = tmp_path / name
    path.write_text(plan.to_json() if isinstance(plan, Plan) else json.dumps(plan))
    return str(path)


def assert_matches(out: dict) -> None:
    assert out["max_abs_loss_diff"] < TOL, out
    assert out["max_abs_grad_diff"] < TOL, out
    # every parameter of the model got a gradient in the parallel run and was compared
    assert out["n_grads_compared"] == len(graphs.zoo.build_module(M).state_dict())
    assert len(out["losses"]) == out["steps"]
    assert out["measured_step_time_s"] > 0 and out["predicted_step_time_s"] > 0


def autopar_cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "autopar.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


# -- plans that must match one process --------------------------------------------------------

def test_dp2_tp2_matches_one_process(tmp_path):
    out = run_plan(write(plan_3d(2, 2, 1, 2), tmp_path), steps=2, check=True)
    assert_matches(out)
    specs = out["param_specs"][0]
    # Megatron's layout on the (dp=2, tp=2) mesh: column-parallel q, row-parallel proj,
    # vocab-parallel embedding; everything replicated over the data-parallel axis 0
    assert specs["blocks.0.attn.q.weight"] == "S1R"
    assert specs["blocks.0.attn.proj.weight"] == "RS1"
    assert specs["wte.weight"] == "S1R"
    assert specs["blocks.0.ln1.weight"] == "R"


def test_pp2_tp2_1f1b_full_recompute_matches_one_process(tmp_path):
    plan = plan_3d(1, 2, 2, 2, recompute="full")
    assert plan.training.schedule == "1f1b" and plan.training.n_microbatches == 4
    out = run_plan(write(plan, tmp_path), steps=2, check=True)
    assert_matches(out)
    assert [s["blocks.0.mlp.fc1.weight"] for s in out["param_specs"][:1]] == ["S1R"]
    # the tied embedding lives in both stages and both copies got the summed gradient
    assert "wte.weight" in out["param_specs"][0] and "wte.weight" in out["param_specs"][1]


def test_pp2_dp2_gpipe_zero1_matches_one_process(tmp_path):
    plan = plan_3d(2, 1, 2, 1, schedule="gpipe", zero=1)
    assert plan.training.n_microbatches == 4
    out = run_plan(write(plan, tmp_path), steps=2, check=True, optimizer="sgd", lr=0.1)
    assert_matches(out)
    # plain SGD: the sharded optimizer update reproduces the parameters too
    assert out["max_abs_param_diff"] < TOL


def test_dp4_zero3_matches_one_process(tmp_path):
    out = run_plan(write(plan_3d(4, 1, 1, 1, zero=3), tmp_path), steps=2, check=True, optimizer="sgd", lr=0.1)
    assert_matches(out)
    assert out["max_abs_param_diff"] < TOL
    # ZeRO-3 keeps each weight sharded over the data-parallel axis between uses
    assert out["param_specs"][0]["blocks.0.mlp.fc1.weight"] == "S0R"


def test_pp4_one_device_stages_match_one_process(tmp_path):
    # one device per stage: plain tensors (no mesh) passed between four stages
    plan = plan_3d(1, 1, 4, 2)
    assert [len(s.device_ids) for s in plan.stages] == [1, 1, 1, 1]
    out = run_plan(write(plan, tmp_path), steps=2, check=True)
    assert_matches(out)


def test_one_device_plan_matches_one_process(tmp_path):
    cl = load_cluster("p3.16xlarge", 1, 1)
    plan = build_3d(ModelSource(M), cl, 8, Config3D(1, 1, 1, 4))
    out = run_plan(write(plan, tmp_path), steps=2, check=True, optimizer="sgd", lr=0.1)
    assert_matches(out)
    assert out["max_abs_param_diff"] < TOL


def test_auto_plan_matches_one_process(tmp_path):
    import autopar
    plan = autopar.plan(M, "p3.16xlarge", nodes=1, gpus_per_node=4, global_batch=8)
    assert plan.n_devices == 4
    out = run_plan(write(plan, tmp_path), steps=2, check=True)
    assert_matches(out)


def test_cli_json_reports_measured_and_predicted(tmp_path):
    path = write(plan_3d(2, 2, 1, 2), tmp_path)
    r = autopar_cli("run", path, "--device", "cpu", "--steps", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["predicted_step_time_s"] == Plan.from_json(path).predicted.step_time_s
    assert out["measured_step_time_s"] > 0 and out["n_processes"] == 4
    assert "max_abs_grad_diff" not in out


# -- every strategy the intra-op ILP can choose (1 forward/backward per plan) ------------------

LLAMA = "llama:hidden=64,layers=1,heads=4,kv_heads=2,seq=32,vocab=128"
MOE = "moe:hidden=64,layers=2,heads=4,seq=32,vocab=128,experts=4"


def sweep_plans(model: str, mesh: tuple[int, int]) -> list[str]:
    """One-stage plans on `mesh` that together give every decision op each of its strategies:
    plan k gives op i its ((k + i) mod n_i)-th strategy."""
    from builders import rotated_strategy_plans
    cl = load_cluster("p3.16xlarge", 1, 4)
    base = build_3d(ModelSource(model), cl, 8, Config3D(mesh[0], mesh[1], 1, 8 // (2 * mesh[0])))
    assert tuple(base.stages[0].logical_mesh) == mesh
    return rotated_strategy_plans(base, cl, f"sweep {mesh[0]}x{mesh[1]}")


def check_sweep(model: str, mesh: tuple[int, int]) -> None:
    from autopar.runtime.launch import check_plans
    results = check_plans(sweep_plans(model, mesh))
    bad = [r for r in results if r["max_abs_loss_diff"] >= TOL or r["max_abs_grad_diff"] >= TOL]
    assert not bad, bad
    assert all(r["n_grads_compared"] == len(graphs.zoo.build_module(model).state_dict()) for r in results)


@pytest.mark.parametrize("mesh", [(2, 2), (1, 4), (4, 1)])
def test_every_gpt_strategy_runs_and_matches(mesh):
    check_sweep(M.replace("layers=4", "layers=1"), mesh)


@pytest.mark.slow
@pytest.mark.parametrize("model", [LLAMA, MOE], ids=["llama-gqa", "moe"])
def test_every_llama_and_moe_strategy_runs_and_matches(model):
    check_sweep(model, (2, 2))


# -- every plan the planner emits for a tiny GPT and Llama on 1-8 devices -------------------------

PLANNED = {"gpt": M, "llama": "llama:hidden=64,layers=2,heads=4,kv_heads=2,seq=32,vocab=128"}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(PLANNED))
def test_every_plan_the_planner_emits_runs_and_matches(family):
    # default and eager cost models, the planner's microbatch choice and 8 microbatches (which
    # gives pipelines of different stage sizes on 8 devices); the planner takes power-of-two
    # device counts only (Alpa's submeshes), so 1, 2, 4 and 8
    import autopar
    from autopar.runtime.launch import check_plans
    model = PLANNED[family]
    for n in (1, 2, 4, 8):
        plans = sorted({autopar.plan(model, "dgx-h200", nodes=1, gpus_per_node=n, global_batch=32, workers=1,
                                     eager=eager, microbatches=mbs).to_json()
                        for eager in (False, True) for mbs in ("auto", 8)})
        for r in check_plans(plans):
            assert r["max_abs_loss_diff"] < TOL and r["max_abs_grad_diff"] < TOL, (n, r)
            assert r["n_grads_compared"] == len(graphs.zoo.build_module(model).state_dict()), (n, r)


# -- bad input: exit code 2 before any process starts ------------------------------------------

def test_nproc_mismatch(tmp_path):
    r = autopar_cli("run", write(plan_3d(2, 2, 1, 2), tmp_path), "--device", "cpu", "--nproc", "2")
    assert r.returncode == 2
    assert "--nproc 2 does not match the plan, which runs on 4 devices" in r.stderr


def test_more_devices_than_exist(tmp_path):
    n = 1 << (4 * (os.cpu_count() or 1)).bit_length()       # more than 4 processes per core
    cl = load_cluster("p3.16xlarge", n // 8, 8)
    plan = build_3d(ModelSource(M), cl, n, Config3D(n, 1, 1, 1))
    r = autopar_cli("run", write(plan, tmp_path), "--device", "cpu")
    assert r.returncode == 2
    assert f"the plan runs on {n} devices" in r.stderr and "--nproc" in r.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(tmp_path):
    r = autopar_cli("run", write(plan_3d(2, 2, 1, 2), tmp_path), "--device", "cuda")
    assert r.returncode == 2
    assert "CUDA is not available" in r.stderr and "--device cpu" in r.stderr


def test_model_with_other_layer_count(tmp_path):
    d = plan_3d(2, 2, 1, 2).to_dict()
    d["model"]["name"] = M.replace("layers=4", "layers=2")
    r = autopar_cli("run", write(d, tmp_path), "--device", "cpu")
    assert r.returncode == 2
    assert "the plan has 6 layers" in r.stderr and "has 4" in r.stderr


def test_model_with_other_op_names():
    plan = plan_3d(1, 2, 2, 2)
    ir = graphs.load("llama:hidden=64,layers=4,heads=4,seq=32,vocab=128", batch=2)
    assert len(ir.layers) == 6                               # same layer count, other ops
    with pytest.raises(PlanError, match="does not match the model: stage 0"):
        check_plan_matches(plan, ir)


def test_unreadable_plan(tmp_path):
    r = autopar_cli("run", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "does not exist" in r.stderr


# -- a failing rank takes the others down ---------------------------------------------------------

def test_failing_rank_stops_the_others(tmp_path):
    d = plan_3d(2, 1, 2, 1).to_dict()
    # Corrupt one op of stage 1 only: its ranks fail in their first forward while stage 0's
    # ranks wait for gradients from them.
    op = next(o for o in d["stages"][1]["ops"] if o["name"] == "blocks_2_mlp_fc1")
    op["in_specs"][0] = "S0S0R"
    t0 = time.monotonic()
    with pytest.raises(RankFailed) as e:
        run_plan(write(d, tmp_path), steps=1, timeout_s=120)
    assert time.monotonic() - t0 < 100
    msg = str(e.value)
    assert "the other ranks were stopped" in msg and "Traceback" in msg
    assert "splits two tensor dims over mesh axis 0" in msg


def test_deadline_stops_every_rank(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(RankFailed, match="did not finish within 3 s"):
        run_plan(write(plan_3d(2, 2, 1, 2), tmp_path), steps=50, timeout_s=3)
    assert time.monotonic() - t0 < 30


def test_memory_warning_when_the_eager_recipe_outgrows_the_gpu():
    # measured on 2 H200s (bench/results/runtime_vs_native_h200.json): gpt-6.7b dp2 at
    # microbatch 2 runs out of memory; the default model calls it a fit, the eager one does not
    from autopar.evaluation.baselines import Config3D, build_3d
    from autopar.hardware.presets import load_cluster
    from autopar.model import ModelSource
    from autopar.runtime.launch import _eager_prediction, memory_warning
    cl = load_cluster("dgx-h200", 1, 2)
    h200_bytes = 150_110_011_392                 # torch.cuda.get_device_properties().total_memory
    big = build_3d(ModelSource("gpt-6.7b"), cl, 8, Config3D(2, 1, 1, 2))
    assert big.prediction is not None and big.prediction.fits
    warning = memory_warning(big, _eager_prediction(big), h200_bytes)
    assert warning is not None and "autopar plan --eager" in warning and "GiB per GPU" in warning
    small = build_3d(ModelSource("gpt-1.3b"), cl, 4, Config3D(2, 1, 1, 1))
    assert memory_warning(small, _eager_prediction(small), h200_bytes) is None
