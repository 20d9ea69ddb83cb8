"""The sharded stage program compiled per layer (runtime.program.CompiledBlock): a plan whose
layout no engine takes runs its blocks through torch.compile and trains exactly as one process
does (gloo, fp32); a block that does not compile runs op by op, with a warning naming it.

On CPU the blocks compile with the "aot_eager" backend: dynamo's trace of the program and
AOTAutograd's joint forward/backward graph, run by eager kernels, so the numbers checked are the
traced graph's without a C++ build per block; on CUDA the default backend is Inductor."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import graphs
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.evaluation.evaluator import evaluate
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.plan import Plan
from autopar.runtime.engines import EngineMismatch, match_plan

pytestmark = pytest.mark.runtime

M = "gpt:hidden=64,layers=4,heads=4,seq=32,vocab=128"
TOL = 1e-5


def other_layout(mb: int = 2, pp: int = 1, **kw) -> Plan:
    """Megatron tp2 (x pp) with the row-parallel fc2 matmuls replicated instead: no engine takes it."""
    cl = load_cluster("p3.16xlarge", 1, 2 * pp)
    plan = build_3d(ModelSource(M), cl, 8, Config3D(1, 2, pp, mb, **kw))
    for s in plan.stages:
        for name in s.strategies:
            if name.endswith("mlp_fc2"):
                s.strategies[name] = "R"
    return evaluate(plan, graphs.load(M, batch=mb), cl)


def two_d_layout(pp: int = 1, **kw) -> Plan:
    """The layout of gpt-39b's headline plan (autopar plan gpt-39b --cluster p3.16xlarge) on a 2x2
    mesh per stage: q/k/v/fc1 weights split on both dims over both axes ("k@0,n@1+rs:b@0"),
    sequence-parallel row matmuls over axis 1, batch over axis 0 (bench/runtime_vs_native.py
    --program)."""
    cl = load_cluster("p3.16xlarge", 1, 4 * pp)
    plan = build_3d(ModelSource(M), cl, 8, Config3D(2, 2, pp, 2, **kw))
    for s in plan.stages:
        for name in s.strategies:
            if name.endswith(("attn_q", "attn_k", "attn_v", "mlp_fc1")):
                s.strategies[name] = "k@0,n@1+rs:b@0"
            elif name.endswith(("attn_proj", "mlp_fc2")):
                s.strategies[name] = "b@0,k@1+rs:s@1"
        if "wpe" in s.strategies:
            s.strategies["wpe"] = "h@01"
    return evaluate(plan, graphs.load(M, batch=plan.training.microbatch_size), cl)


def run_cli(plan: Plan, tmp_path, backend: str, *flags: str) -> tuple[dict, str]:
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    env = dict(os.environ, AUTOPAR_COMPILE_BACKEND=backend)
    r = subprocess.run([sys.executable, "-m", "autopar.cli", "run", str(path), "--device", "cpu", "--steps", "2",
                        "--check", "--json", *flags], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout), r.stderr


def assert_exact(out: dict) -> None:
    assert out["max_abs_loss_diff"] < TOL, out
    assert out["max_abs_grad_diff"] < TOL, out
    assert out["n_grads_compared"] == len(graphs.zoo.build_module(M).state_dict())
    assert not out["engines"]                   # the program path, not PyTorch's engines


def test_the_layout_is_no_engines():
    plan = other_layout()
    with pytest.raises(EngineMismatch, match="op blocks_0_mlp_fc2 is 'R'"):
        match_plan(plan, graphs.load(M, batch=2), "gpt")


def test_compiled_blocks_match_one_process(tmp_path):
    out, err = run_cli(other_layout(), tmp_path, "aot_eager", "--compile")
    assert_exact(out)
    # every block compiled: none fell back to running op by op
    assert "torch.compile of block" not in err, err[-3000:]
    assert "runs op by op on DTensors (slow): stage 0" in err        # the engines' mismatch, named


def test_compile_failure_warns_and_runs_op_by_op(tmp_path):
    # a backend that cannot compile (tvm is registered, not installed): every block says so, and
    # the run still computes one process's numbers
    out, err = run_cli(other_layout(), tmp_path, "tvm", "--compile")
    assert_exact(out)
    assert "torch.compile of block 2 (layer 1, ops blocks_0_ln1 .. " in err, err[-3000:]
    assert "the tvm backend failed on it" in err and "this block runs op by op" in err


def test_no_compile_runs_op_by_op(tmp_path):
    out, err = run_cli(other_layout(), tmp_path, "tvm", "--no-compile")
    assert_exact(out)
    assert "torch.compile of block" not in err          # nothing was compiled, so nothing failed


def test_two_d_sharded_weights_compiled_match_one_process(tmp_path):
    plan = two_d_layout()
    q = next(o for o in plan.stages[0].ops if o["name"] == "blocks_0_attn_q")
    assert q["in_specs"][1] == "S1S0"               # the weight split on both dims
    out, err = run_cli(plan, tmp_path, "aot_eager", "--compile", "--optimizer", "sgd", "--lr", "0.1")
    assert_exact(out)
    assert out["max_abs_param_diff"] < TOL
    assert out["n_processes"] == 4 and "torch.compile of block" not in err, err[-3000:]


def test_pipeline_with_recomputed_layers_compiled_matches_one_process(tmp_path):
    # two stages (1F1B) whose layers are recomputed whole: each is checkpointed around its
    # compiled code
    plan = other_layout(pp=2, recompute="full")
    out, err = run_cli(plan, tmp_path, "aot_eager", "--compile", "--optimizer", "sgd", "--lr", "0.1")
    assert_exact(out)
    assert out["max_abs_param_diff"] < TOL
    assert "torch.compile of block" not in err, err[-3000:]


@pytest.mark.slow
def test_every_gpt_strategy_compiled_matches_one_process(monkeypatch, capfd):
    # every strategy the ILP offers each op on a 2x2 mesh (test_runtime's sweep), compiled: the
    # second microbatch of each plan runs the compiled blocks (6-7 minutes on 2 cores)
    from builders import rotated_strategy_plans

    from autopar.runtime.launch import check_plans
    monkeypatch.setenv("AUTOPAR_COMPILE_BACKEND", "aot_eager")
    model = M.replace("layers=4", "layers=1")
    cl = load_cluster("p3.16xlarge", 1, 4)
    base = build_3d(ModelSource(model), cl, 8, Config3D(2, 2, 1, 2))
    assert base.training.n_microbatches == 2
    results = check_plans(rotated_strategy_plans(base, cl, "sweep 2x2"), compile=True)
    bad = [r for r in results if r["max_abs_loss_diff"] >= TOL or r["max_abs_grad_diff"] >= TOL]
    assert not bad, bad
    assert "torch.compile of block" not in capfd.readouterr().err


# -- interleaved schedules: several program stages (chunks) per rank ---------------------------

def interleaved(plan: Plan) -> Plan:
    assert plan.training.schedule == "interleaved" and len(plan.stages) == 4
    groups = [s.device_ids for s in sorted(plan.stages, key=lambda s: s.index)]
    assert groups[0] == groups[2] and groups[1] == groups[3] and groups[0] != groups[1]   # 2 chunks per rank
    return plan


def test_interleaved_compiled_chunks_match_one_process(tmp_path):
    # pp2 x 2 chunks, each chunk tp2 with fc2 replicated (no engine takes it): every rank runs
    # two compiled program stages under torch's Interleaved1F1B
    plan = interleaved(other_layout(pp=2, schedule="interleaved", virtual_stages=2))
    out, err = run_cli(plan, tmp_path, "aot_eager", "--compile", "--optimizer", "sgd", "--lr", "0.1")
    assert_exact(out)
    assert out["max_abs_param_diff"] < TOL
    assert out["n_processes"] == 4 and "torch.compile of block" not in err, err[-3000:]
    # rank 0 holds chunks 0 (the embeddings, block 0) and 2 (block 2); rank 2 chunks 1 and 3
    assert {"wte.weight", "blocks.0.mlp.fc2.weight", "blocks.2.mlp.fc2.weight"} == {
        n for n in out["param_specs"][0] if n in ("wte.weight", "blocks.0.mlp.fc2.weight", "blocks.2.mlp.fc2.weight")}
    assert "blocks.1.mlp.fc2.weight" not in out["param_specs"][0]


def test_interleaved_chunks_with_zero_match_one_process():
    # ZeRO-1 (optimizer shards per chunk mesh) and ZeRO-3 (parameters sharded per chunk), op by op
    from autopar.runtime.launch import check_plans
    plans = [interleaved(other_layout(pp=2, schedule="interleaved", virtual_stages=2, zero=z)) for z in (1, 3)]
    for r in check_plans([p.to_json() for p in plans]):
        assert r["max_abs_loss_diff"] < TOL and r["max_abs_grad_diff"] < TOL, r
        assert r["n_grads_compared"] == len(graphs.zoo.build_module(M).state_dict()), r


@pytest.mark.slow
def test_interleaved_two_d_sharded_weights_match_one_process(tmp_path):
    # gpt-39b's headline plan in small: 2 ranks x 2 chunks, every chunk on a 2x2 mesh with weights
    # split over both axes and sequence-parallel row matmuls (8 processes, op by op on gloo)
    plan = interleaved(two_d_layout(pp=2, schedule="interleaved", virtual_stages=2))
    q = next(o for s in plan.stages for o in s.ops if o["name"] == "blocks_2_attn_q")
    assert q["in_specs"][1] == "S1S0"
    out, _ = run_cli(plan, tmp_path, "aot_eager", "--optimizer", "sgd", "--lr", "0.1")
    assert_exact(out)
    assert out["max_abs_param_diff"] < TOL and out["n_processes"] == 8
