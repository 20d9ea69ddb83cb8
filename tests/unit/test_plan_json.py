"""Plan JSON (autopar.plan/v1): schema, round trip, cross-field rules, the typed plan records and
their one validator (Training); the CLI's evaluate."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import jsonschema
import pytest

from autopar.cli import main
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.evaluation.evaluator import evaluate
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.plan import (
    ClusterInfo,
    ModelInfo,
    Plan,
    PlanConfig,
    PlanError,
    Prediction,
    StageMemory,
    StagePlan,
    Training,
    schema,
    validate,
)
from autopar.report import memory_groups, plan_summary
from autopar.search.planner import plan as auto_plan

TINY = "gpt:hidden=64,layers=4,heads=4,seq=32,vocab=128"


@pytest.fixture(scope="module")
def plan_3d():
    src = ModelSource(TINY)
    cl = load_cluster("p3.16xlarge", 1)
    return build_3d(src, cl, 32, Config3D(2, 2, 2, 2)), src, cl


def test_plan_round_trip_and_determinism(plan_3d, tmp_path):
    p, src, cl = plan_3d
    text = p.to_json()
    d = json.loads(text)
    jsonschema.validate(d, schema())
    assert d["schema"] == "autopar.plan/v1" and len(d["stages"]) == 2
    q = Plan.from_json(text)
    assert q.to_json() == text
    path = tmp_path / "plan.json"
    p.to_json(path)
    assert Plan.from_json(str(path)).to_json() == text
    # the same inputs give the same bytes; a plan read back re-evaluates to the same figures
    again = build_3d(src, cl, 32, Config3D(2, 2, 2, 2))
    assert again.to_json() == text
    re = evaluate(Plan.from_json(text), src.graph(p.training.microbatch_size), cl)
    assert json.loads(re.to_json())["predicted"] == d["predicted"]


def _broken(p, edit):
    d = copy.deepcopy(p.to_dict())
    edit(d)
    return d


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d.pop("training"), r"at \(top level\): 'training' is a required property"),
    (lambda d: d["training"].update(schedule="zigzag"), "at training/schedule"),
    (lambda d: d["training"].update(zero=5), "at training/zero"),
    (lambda d: d["stages"][1].update(device_ids=[0, 1, 2, 3]), r"device ids \[0, 1, 2, 3\] are used by an earlier"),
    (lambda d: d["stages"][1].update(layers=[4, 6]), "starts at layer 4, but the previous stage ends at 3"),
    (lambda d: d["stages"][0].update(logical_mesh=[4, 2]), "logical_mesh 4x2 does not match 4 device_ids"),
    (lambda d: d["stages"][0].update(layers=[2, 2]), r"at stages/0/layers|empty range"),
    (lambda d: d["stages"][0]["strategies"].update(x=3), r"at stages/0/strategies/x"),
    (lambda d: d.update(schema="autopar.plan/v0"), "at schema"),
    (lambda d: d["stages"][0].update(sharded_storage="fc"), r"at stages/0/sharded_storage"),
    (lambda d: d["stages"][0].update(sharded_storage=["fc"]), r"stages/0/sharded_storage: per-op sharded storage "
                                                              r"needs ZeRO 1 or 2 \(training/zero is 0\)"),
])
def test_malformed_plans_name_the_path(plan_3d, edit, msg):
    p, _, _ = plan_3d
    with pytest.raises(PlanError, match=msg):
        validate(_broken(p, edit))


def test_plan_file_errors(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.from_json(str(tmp_path / "nope.json"))
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("{not json")


def test_evaluate_rejects_plans_that_do_not_match_the_model(plan_3d):
    p, src, _ = plan_3d
    g = src.graph(p.training.microbatch_size)
    with pytest.raises(PlanError, match="plan uses 8 devices but cluster p3.16xlarge has 4"):
        evaluate(Plan.from_json(p.to_json()), g, load_cluster("p3.16xlarge", 1, 4))
    d = _broken(p, lambda d: d["stages"][1].update(layers=[3, 5]))
    with pytest.raises(PlanError, match=r"cover layers \[0, 5\) but the model has 6 layers"):
        evaluate(Plan.from_dict(d), g, load_cluster("p3.16xlarge", 1))


# ---- typed plan records ---------------------------------------------------------------------------

FIXTURE = Path(__file__).parent.parent / "data" / "plan_v1_small.json"


def _every_field_plan() -> Plan:
    """A plan whose every field, at every level, differs from its default."""
    stages = [StagePlan(index=k, layers=(2 * k, 2 * k + 2), layer_names=[f"l{2 * k}", f"l{2 * k + 1}"],
                        submesh=(1, 2), device_ids=[2 * (k % 2), 2 * (k % 2) + 1], logical_mesh=(2, 1),
                        strategies={"fc": "k@0,n@1+rs:s@0"}, input_spec=f"S{k}R",
                        recompute=("selective", "full")[k % 2], recompute_layers=k // 2 if k % 2 else None,
                        sharded_storage=["fc"],
                        ops=[{"name": "fc", "op": "linear", "kind": "matmul", "strategy": "b@0",
                              "out_spec": "S0R", "in_specs": ["S0R", None], "compute_s": 1e-3, "comm_s": 0}],
                        t_intra_s=3.5 + k, fwd_s=1.25, bwd_s=math.inf if k == 3 else 2.25 + k,
                        memory=StageMemory(param_state_bytes=1e9, activation_bytes=2.5e8 + k,
                                           stash_per_microbatch_bytes=1.25e8, inflight_microbatches=1.5,
                                           working_bytes=3.0, total_bytes=1.25e9 + 1e3 * k))
              for k in range(4)]
    return Plan(strategy="3d", model=ModelInfo(name="gpt-x", params=1234, seq=64, n_layers=8, family="gpt",
                                               loadable=False, flops_per_step=4.5e12),
                cluster=ClusterInfo(name="mine", nodes=2, gpus_per_node=2, gpu="H100-SXM5-80GB"),
                training=Training(global_batch=48, microbatch_size=4, n_microbatches=12, dtype="fp16",
                                  schedule="interleaved", virtual_stages=2, zero=2, optimizer="sgd"),
                stages=stages,
                config=PlanConfig(kind="megatron", label="dp2 tp1 pp2", settings={"dp": 2, "tp": 1, "pp": 2}),
                prediction=Prediction(step_time_s=math.inf, tokens_per_s=0.5, model_flops_per_step=1.5,
                                      hardware_flops_per_step=2.5, tflops_per_gpu=3.5,
                                      hardware_tflops_per_gpu=4.5, mfu=0.25, bubble_fraction=0.125,
                                      pipeline_s=5.5, grad_sync_s=6.5, optimizer_s=7.5, p2p_s=0,
                                      compute_s_per_microbatch=8.5, comm_s_per_microbatch=9.5,
                                      peak_memory_bytes=1e10, memory_limit_bytes=8e10, fits=True,
                                      peak_allocated_bytes=9e9, peak_reserved_bytes=9.5e9, host_s=0.75,
                                      breakdown_s={"blocks": 4.0, "bubble": 1.5},
                                      memory_breakdown_bytes={"weights": 6e9, "cuda_context": 5e8}),
                search={"ilps": 3, "statuses": {"optimal": 3}})


def _non_default(record, unset: frozenset[str] = frozenset()) -> None:
    """Every field of `record` but those named in `unset` differs from its default."""
    for f in dataclasses.fields(record):
        if not f.compare or f.name in unset:   # Plan.timing: kept out of the JSON on purpose
            continue
        value = getattr(record, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert value != default, f"{type(record).__name__}.{f.name} keeps its default: the test misses it"
        if dataclasses.is_dataclass(value):
            _non_default(value)


def test_round_trip_of_every_field():
    p = _every_field_plan()
    _non_default(p)
    for s in p.stages:
        # recompute_layers counts recomputed layers, so only a "full" stage has one
        _non_default(s, frozenset() if s.recompute == "full" else frozenset({"recompute_layers"}))
    text = p.to_json()
    q = Plan.from_json(text)
    assert q == p                              # every record, field by field (inf survives as null)
    assert q.to_json() == text
    d = json.loads(text)
    assert d["predicted"]["step_time_s"] is None and d["predicted"]["p2p_s"] == 0
    assert d["config"] == {"kind": "megatron", "label": "dp2 tp1 pp2", "dp": 2, "tp": 1, "pp": 2}
    assert d["model"]["flops_per_step"] == 4.5e12 and d["stages"][3]["bwd_s"] is None
    assert [st.get("recompute_layers") for st in d["stages"]] == [None, 0, None, 1]


def test_v1_file_written_by_the_old_code_loads_and_writes_back_the_same_bytes():
    text = FIXTURE.read_text()                 # written by `autopar plan` before plan data was typed
    p = Plan.from_json(text)
    assert p.to_json() == text
    assert p.model.name == "gpt:hidden=64,layers=2,heads=4,seq=32,vocab=128" and p.model.n_layers == 4
    assert p.cluster == ClusterInfo(name="dgx-h100", nodes=1, gpus_per_node=2, gpu="H100-SXM5-80GB")
    assert p.training == Training(global_batch=32, microbatch_size=32, n_microbatches=1, dtype="bf16",
                                  schedule="1f1b", virtual_stages=1, zero=1)
    assert p.config == PlanConfig(kind="auto", label="1 stage: 4L@1x2")
    assert p.predicted.fits and p.predicted.tokens_per_s == pytest.approx(32 * 32 / p.predicted.step_time_s)
    m = p.stages[0].memory
    assert m is not None and m.total_bytes == pytest.approx(m.param_state_bytes + m.activation_bytes)


def test_an_unevaluated_plan_round_trips_and_has_no_prediction():
    d = json.loads(FIXTURE.read_text())
    d["predicted"] = {}
    for s in d["stages"]:
        s.update(memory={}, ops=[])
    del d["model"]["flops_per_step"]
    p = Plan.from_dict(d)
    assert p.prediction is None and p.stages[0].memory is None and p.model.flops_per_step is None
    assert json.loads(p.to_json()) == d
    with pytest.raises(PlanError, match="has no prediction; evaluate it first"):
        _ = p.predicted


def test_evaluate_returns_a_new_plan_and_leaves_its_input_alone(plan_3d):
    p, src, cl = plan_3d
    d = p.to_dict()
    d["predicted"] = {}
    for s in d["stages"]:
        s.update(memory={}, ops=[], t_intra_s=0.0, fwd_s=0.0, bwd_s=0.0)
    del d["model"]["flops_per_step"]
    bare = Plan.from_dict(d)
    before = bare.to_json()
    out = evaluate(bare, src.graph(bare.training.microbatch_size), cl)
    assert bare.to_json() == before and bare.prediction is None
    assert all(s.memory is None and not s.ops and s.fwd_s == 0.0 for s in bare.stages)
    assert out is not bare and out.to_json() == p.to_json()


@pytest.mark.parametrize("change,msg", [
    ({"global_batch": 0}, r"training.global_batch must be an integer >= 1 \(got 0\)"),
    ({"global_batch": 32.0}, r"training.global_batch must be an integer >= 1 \(got 32.0\)"),
    ({"microbatch_size": 6}, "training.microbatch_size: global batch 32 is not divisible by microbatch size 6"),
    ({"n_microbatches": 3}, r"training.n_microbatches: 3 microbatches of 8 do not make the global batch 32 \(need 4\)"),
    ({"dtype": "int8"}, "training.dtype must be bf16, fp16 or fp32"),
    ({"schedule": "zigzag"}, "training.schedule must be 1f1b, gpipe or interleaved"),
    ({"schedule": "interleaved"}, "training.virtual_stages: the interleaved schedule needs 2 or more chunks"),
    ({"virtual_stages": 2}, "training.virtual_stages: 2 chunks per GPU need the interleaved schedule"),
    ({"zero": 4}, r"training.zero must be 0, 1, 2 or 3 \(got 4\)"),
    ({"zero": True}, "training.zero must be 0, 1, 2 or 3"),
    ({"optimizer": ""}, "training.optimizer must be a non-empty string"),
])
def test_training_errors_name_the_field(change, msg):
    good = {"global_batch": 32, "microbatch_size": 8, "n_microbatches": 4, "dtype": "bf16"}
    Training(**good)
    with pytest.raises(PlanError, match=msg):
        Training(**{**good, **change})


def test_training_split():
    t = Training.split(96, 8, dtype="fp16", schedule="interleaved", virtual_stages=3, zero=2)
    assert (t.n_microbatches, t.virtual_stages) == (12, 3)
    with pytest.raises(PlanError, match="training.microbatch_size must be an integer >= 1"):
        Training.split(96, 0, dtype="fp16")


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d["training"].update(n_microbatches=2), "training.n_microbatches: 2 microbatches of 4 do not"),
    (lambda d: d["model"].update(n_params=3), "plan model/n_params: unknown field"),
    (lambda d: d["training"].update(zero_stage=3), "plan training/zero_stage: unknown field"),
    (lambda d: d["predicted"].pop("fits"), "plan predicted/fits: required field is missing"),
    (lambda d: d["stages"][1]["memory"].pop("total_bytes"), "plan stages/1/memory/total_bytes: required field"),
])
def test_plan_files_with_bad_records_name_the_field(plan_3d, edit, msg):
    p, _, _ = plan_3d
    with pytest.raises(PlanError, match=msg):
        Plan.from_dict(_broken(p, edit))


def test_planner_and_megatron_settings_are_checked_by_training():
    with pytest.raises(PlanError, match=r"training.zero must be 0, 1, 2 or 3 \(got 5\)"):
        auto_plan(TINY, "p3.16xlarge", nodes=1, zero=5)
    cfg = Config3D(2, 2, 2, 2, schedule="interleaved", virtual_stages=2, zero=1)
    assert cfg.training(64, "fp16") == Training(global_batch=64, microbatch_size=4, n_microbatches=16,
                                                dtype="fp16", schedule="interleaved", virtual_stages=2, zero=1)
    # the 1f1b schedule runs one chunk per GPU whatever virtual_stages says
    assert dataclasses.replace(cfg, schedule="1f1b").training(64, "fp16").virtual_stages == 1


# ---- CLI ----------------------------------------------------------------------------------------

EVAL = ["evaluate", "gpt-1.3b", "--cluster", "p3.16xlarge", "--nodes", "1", "--global-batch", "64",
        "--dp", "2", "--tp", "4", "--pp", "1", "--microbatch", "4"]


def test_cli_evaluate_json(capsys):
    assert main(EVAL + ["--json"]) == 0
    out = capsys.readouterr().out
    d = json.loads(out)
    jsonschema.validate(d, schema())
    validate(d)
    pr = d["predicted"]
    for key in ("step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "bubble_fraction", "peak_memory_bytes",
                "grad_sync_s", "optimizer_s", "hardware_flops_per_step"):
        assert isinstance(pr[key], (int, float)) and pr[key] >= 0, key
    assert pr["fits"] is True and pr["step_time_s"] > 0
    assert pr["tokens_per_s"] == pytest.approx(64 * 1024 / pr["step_time_s"], rel=1e-6)
    assert d["training"]["n_microbatches"] == 8 and d["stages"][0]["logical_mesh"] == [2, 4]
    assert d["config"]["label"] == "dp2 tp4 pp1 mb4"


def test_cli_evaluate_text_and_no_fit(capsys):
    assert main(EVAL[:-10] + ["--global-batch", "64", "--dp", "8", "--tp", "1", "--pp", "1",
                              "--microbatch", "8"]) == 0
    cap = capsys.readouterr()
    assert "predicted step time" in cap.out and "DOES NOT FIT" in cap.out
    assert cap.err.startswith("plan does not fit in memory:\n  stage 0 (layers 0-25, 8 GPUs): weights+grads+optimizer")


@pytest.mark.parametrize("argv,msg", [
    (["--dp", "3"], "dp*tp*pp = 3*4*1 = 12 must equal the cluster's 8 GPUs"),
    (["--microbatch", "3"], "training.microbatch_size: global batch 64 is not divisible by microbatch size 6"),
    (["--cluster", "p9"], "unknown cluster 'p9'"),
    (["--nodes", "0"], "--nodes must be at least 1"),
    (["--schedule", "interleaved", "--virtual-stages", "2"], "interleaved schedule needs pp >= 2"),
])
def test_cli_bad_input_exits_2_with_one_line(capsys, argv, msg):
    args = list(EVAL)
    for flag, value in zip(argv[::2], argv[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert "Traceback" not in cap.err and len(err.splitlines()) == 1
    assert err.startswith("autopar: error: ") and msg in err


def test_cli_bad_model_and_cluster_file(capsys, tmp_path):
    assert main(["evaluate", "gpt-nope", "--global-batch", "8", "--dp", "8", "--tp", "1", "--pp", "1",
                 "--microbatch", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("autopar: error: ") and len(err.splitlines()) == 1 and "gpt-nope" in err
    bad = tmp_path / "c.yaml"
    bad.write_text("base: p3.16xlarge\ngpu: {memory_gb: 32}\n")
    assert main(EVAL[:2] + ["--cluster", str(bad)] + EVAL[4:]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gpu.memory_gb" in err


def test_cli_show_bad_plan(capsys, tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"schema": "autopar.plan/v1"}))
    assert main(["show", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a required property" in err


def test_eager_breakdown_in_json_and_show():
    """Each term a named part: the JSON keeps them (and reads back), `autopar show` names them and
    groups the memory into model state, activations and allocator/workspace, adding up to the peak;
    a plan file written before the breakdowns existed still loads and prints."""
    src = ModelSource("gpt:hidden=256,layers=3,heads=4,seq=128,vocab=1024")
    p = build_3d(src, load_cluster("dgx-h200", 1, 2), 8, Config3D(2, 1, 1, 4), eager=True)
    back = Plan.from_json(p.to_json())
    pr = back.predicted
    assert dict(pr.breakdown_s) == pytest.approx(dict(p.predicted.breakdown_s))
    assert {"head_loss", "optimizer", "exposed_comm", "host", "blocks"} <= set(pr.breakdown_s)
    assert sum(pr.breakdown_s.values()) == pytest.approx(pr.step_time_s, rel=1e-6)
    groups = memory_groups(dict(pr.memory_breakdown_bytes))
    assert list(groups) == ["weights+grads+optimizer", "activations", "allocator/workspace"]
    assert sum(sum(g.values()) for g in groups.values()) == pytest.approx(pr.peak_memory_bytes, rel=1e-6)
    text = plan_summary(back)
    assert "head+loss" in text and "exposed comm" in text and "host" in text
    assert "weights+grads+optimizer" in text and "allocator/workspace" in text
    old = Plan.from_json(FIXTURE.read_text())
    assert old.predicted.breakdown_s is None and "step time (slowest GPU)" not in plan_summary(old)
