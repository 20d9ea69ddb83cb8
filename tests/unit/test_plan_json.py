"""Plan JSON (autopar.plan/v1): schema, round trip, cross-field rules; the CLI's evaluate."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from autopar.cli import main
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.evaluation.evaluator import evaluate
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.plan import Plan, PlanError, schema, validate

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
    re = evaluate(Plan.from_json(text), src.graph(p.training["microbatch_size"]), cl)
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
    g = src.graph(p.training["microbatch_size"])
    with pytest.raises(PlanError, match="plan uses 8 devices but cluster p3.16xlarge has 4"):
        evaluate(Plan.from_json(p.to_json()), g, load_cluster("p3.16xlarge", 1, 4))
    d = _broken(p, lambda d: d["stages"][1].update(layers=[3, 5]))
    with pytest.raises(PlanError, match=r"cover layers \[0, 5\) but the model has 6 layers"):
        evaluate(Plan.from_dict(d), g, load_cluster("p3.16xlarge", 1))


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
    (["--microbatch", "3"], "global batch 64 is not divisible by dp*microbatch = 2*3"),
    (["--cluster", "p9"], "unknown cluster 'p9'"),
    (["--nodes", "0"], "field 'nodes' must be an integer >= 1"),
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
