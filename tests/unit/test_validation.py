"""The validation layer (autopar.validation, autopar.fileio) and the output a person reads
(report, compare table, run): each rule against a brute-force or closed-form oracle."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import stat
from pathlib import Path

import pytest

from autopar import cli
from autopar.compare import Row, csv_rows, legend, summarize_rows, table_rows
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.evaluation.pipeline import simulate
from autopar.fileio import PathError, atomic_path, check_output, check_outputs, write_text
from autopar.hardware.presets import load_cluster
from autopar.hardware.profiles import load_gpu_profile
from autopar.hardware.specs import MAX_GPUS, ClusterError
from autopar.model import ModelSource
from autopar.plan import PlanError
from autopar.report import busy_intervals, inspect_table, memory_per_gpu, plan_summary
from autopar.validation import (
    MAX_GLOBAL_BATCH,
    InputError,
    check_plan,
    check_training,
    int_arg,
    layer_range,
    load_plan,
    mesh_arg,
    microbatches_arg,
)

TINY = "gpt:hidden=64,layers=4,heads=4,seq=32,vocab=128"


@pytest.fixture(scope="module")
def interleaved():
    """pp=2 ranks x 2 chunks of TINY on 2 GPUs: per-GPU memory differs from per-chunk memory."""
    cl = load_cluster("p3.16xlarge", 1, 2)
    return build_3d(ModelSource(TINY), cl, 8, Config3D(1, 1, 2, 1, schedule="interleaved", virtual_stages=2))


# ---- numbers -----------------------------------------------------------------------------

def test_int_arg_accepts_exactly_the_whole_numbers_in_range():
    parse = int_arg("--n", 1, 50)
    for text in [str(i) for i in range(-60, 120)] + ["+7", " 12 ", "1_0"]:
        want = int(text.replace("_", "")) if 1 <= int(text.replace("_", "")) <= 50 else None
        if want is None:
            with pytest.raises(argparse.ArgumentTypeError, match="--n"):
                parse(text)
        else:
            assert parse(text) == want
    for text in ["", "1.0", "1e3", "nan", "0x10", "１２", "3 4", "ten"]:
        with pytest.raises(argparse.ArgumentTypeError, match="whole number from 1 to 50"):
            parse(text)


def test_limits_are_named_in_the_message():
    with pytest.raises(argparse.ArgumentTypeError, match=f"limit of {MAX_GLOBAL_BATCH:,}"):
        int_arg("--global-batch", 1, MAX_GLOBAL_BATCH)(str(1 << 40))
    with pytest.raises(InputError, match="global batch .* limit of 16,384"):
        check_training(1 << 40, 8)
    with pytest.raises(InputError, match="at least 1"):
        check_training(0, 8)                     # 0 is an error, never "the default"
    with pytest.raises(InputError, match="GPU count"):
        check_training(None, MAX_GPUS + 1)
    with pytest.raises(ClusterError, match=f"use at most {MAX_GPUS // 8} nodes of 8"):
        load_cluster("p3.16xlarge", 1 << 30)
    check_training(None, MAX_GPUS, "auto")
    check_training(MAX_GLOBAL_BATCH, 1, "16")


def test_microbatches_mesh_and_layer_range():
    assert microbatches_arg("auto") == "auto" and microbatches_arg("8") == 8
    for bad in ["lots", "0", "-4", "1e3"]:
        with pytest.raises(argparse.ArgumentTypeError):
            microbatches_arg(bad)
    assert mesh_arg("2x4") == (2, 4) and mesh_arg("1X8") == (1, 8)
    for bad in ["0x4", "2x", "2x2x2", "-2x2", "axb", "128x64"]:
        with pytest.raises(argparse.ArgumentTypeError, match="--mesh"):
            mesh_arg(bad)
    # brute force: every i:j text over a 6-layer model
    for i in range(-2, 9):
        for j in range(-2, 9):
            ok = 0 <= i < j <= 6
            if ok:
                assert layer_range(f"{i}:{j}", 6) == (i, j)
            else:
                with pytest.raises(InputError):
                    layer_range(f"{i}:{j}", 6)
    assert layer_range(":", 6) == (0, 6) and layer_range("2:", 6) == (2, 6)
    for bad in ["1:2:3", "3", "a:b"]:
        with pytest.raises(InputError, match="look like 3:7"):
            layer_range(bad, 6)


# ---- files -------------------------------------------------------------------------------

def test_check_output_rules(tmp_path):
    f = tmp_path / "x.json"
    assert check_output(f, False) == f
    f.write_text("mine")
    with pytest.raises(PathError, match="already exists; pass --force"):
        check_output(f, False)
    assert check_output(f, True) == f
    with pytest.raises(PathError, match="is a folder"):
        check_output(tmp_path, True)
    with pytest.raises(PathError, match="does not exist; create it first"):
        check_output(tmp_path / "nope" / "x.json", False)
    with pytest.raises(PathError, match="is not a folder"):
        check_output(f / "x.json", False)
    with pytest.raises(PathError, match="empty"):
        check_output("", False)
    with pytest.raises(PathError, match="--json and --csv both name"):
        check_outputs([("--json", str(tmp_path / "a")), ("--csv", str(tmp_path / "." / "a"))], True)
    if os.geteuid() != 0:                    # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(PathError, match="not writable"):
            check_output(ro / "x.json", False)
        ro.chmod(0o700)


def test_atomic_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path):
    f = tmp_path / "out.json"
    f.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(f, True) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the plot failed")
    assert f.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    write_text(f, "new", True)
    assert f.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask     # a new file's mode, not mkstemp's 0600


# ---- plans -------------------------------------------------------------------------------

def _two_nodes_in_one(d):
    """Stage 0 claims a submesh of 2 nodes x 1 GPU but sits on GPUs 0 and 1 of node 0."""
    d["cluster"].update(nodes=2)
    for i, ids in ((0, [0, 1]), (1, [2]), (2, [0, 1]), (3, [2])):
        d["stages"][i].update(device_ids=ids)
        if len(ids) == 2:
            d["stages"][i].update(submesh=[2, 1], logical_mesh=[1, 2])


def test_check_plan_accepts_evaluated_plans_and_names_each_inconsistency(interleaved):
    d = interleaved.to_dict()
    check_plan(d)
    cases = [
        (lambda d: [d["stages"][i].update(device_ids=[99]) for i in (1, 3)], "outside the plan's cluster"),
        (lambda d: [d["stages"][i].update(device_ids=[0, 0], submesh=[1, 2], logical_mesh=[1, 2]) for i in (0, 2)],
         "more than once"),
        (lambda d: d["stages"][0].update(submesh=[2, 1]), "submesh 2x1 does not match its 1 device_ids"),
        (_two_nodes_in_one, "submesh 2x1 must be 2 whole nodes of 2 GPUs, but device_ids span nodes \\[0\\]"),
        (lambda d: d["model"].update(n_layers=99), "model has 99 layers"),
        (lambda d: d["training"].update(global_batch=9), "global_batch 9 != microbatch_size"),
        (lambda d: d["predicted"].update(step_time_s=-2.0), "predicted/step_time_s must be a finite number"),
        (lambda d: d["predicted"].update(bubble_fraction=1.5), "bubble_fraction"),
        (lambda d: d["stages"][0].update(fwd_s=float("nan")), "stages/0/fwd_s"),
        (lambda d: d["stages"][0]["strategies"].update({next(iter(d["stages"][0]["strategies"])): "bogus"}),
         "'bogus' but the stage's ops list says"),
        (lambda d: d["training"].update(global_batch=65536, n_microbatches=65536), "limit of 16,384"),
    ]
    for mutate, msg in cases:
        bad = json.loads(json.dumps(d))
        mutate(bad)
        with pytest.raises(PlanError, match=msg):
            check_plan(bad)


def test_load_plan_rejects_nan_and_reads_files(interleaved, tmp_path):
    text = interleaved.to_json()
    f = tmp_path / "p.json"
    f.write_text(text)
    assert load_plan(f).to_dict() == interleaved.to_dict() == load_plan(text).to_dict()
    with pytest.raises(PlanError, match="NaN"):
        load_plan(text.replace('"step_time_s": ', '"step_time_s": NaN, "x": ', 1))
    with pytest.raises(ValueError, match="is a folder"):
        load_plan(tmp_path)


def test_profile_names_resolve_only_inside_the_profiles_folder(tmp_path):
    assert load_gpu_profile("h100_sxm.json") is not None
    for name in ["../schema/plan.schema.json", "/etc/passwd", "../profiles/h100_sxm.json", "h100_sxm"]:
        assert load_gpu_profile(name) is None
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"base": "dgx-h100", "gpu": {"profile": "../schema/plan.schema.json"}}))
    with pytest.raises(ClusterError, match="must name a profile shipped"):
        load_cluster(str(f))


# ---- output a person reads -------------------------------------------------------------------

def test_memory_per_gpu_is_the_evaluators_peak(interleaved):
    d = interleaved.to_dict()
    per_gpu = memory_per_gpu(d)
    assert len(per_gpu) == 2                                   # ranks, not chunks
    assert max(per_gpu) == pytest.approx(d["predicted"]["peak_memory_bytes"], rel=1e-6)
    per_chunk = [s["memory"]["total_bytes"] for s in d["stages"]]
    assert max(per_gpu) > max(per_chunk)                       # what the old plot showed
    assert "per GPU" in plan_summary(interleaved)


def test_busy_intervals_keep_every_busy_second():
    sched = simulate([1.0, 1.5], [2.0, 2.5], 200, "1f1b", None)
    rows = busy_intervals(sched.ops, gap_s=1e-9)
    for dev in (0, 1):
        busy = sum(op.end_s - op.start_s for op in sched.ops if op.device == dev)
        merged = rows[dev]
        assert sum(b - a for a, b, _ in merged) == pytest.approx(busy)       # no gap closed at 1e-9
        assert all(b1 <= a2 for (_, b1, _), (a2, _, _) in zip(merged, merged[1:]))
        assert len(merged) < 400 and {k for *_, k in merged} <= {"F", "B", "FB"}


def test_inspect_table_collapses_identical_layers():
    import graphs
    g = graphs.load("gpt:hidden=64,layers=6,heads=4,seq=32,vocab=128")
    text = inspect_table(graphs.summarize(g))
    assert "1-6  block.0 .. block.5" in text and text.count("\n") < 20
    assert "{" not in text                                       # no raw dicts


def test_compare_rows_table_legend_and_csv(interleaved):
    import dataclasses
    oom = dataclasses.replace(interleaved, prediction=dataclasses.replace(interleaved.prediction, fits=False),
                              strategy="dp")
    rows = [Row("dp", oom), Row("3d", interleaved), Row("auto", interleaved)]
    table = summarize_rows(rows)
    by = {r["strategy"]: r for r in table}
    assert by["dp"]["step_time_s"] is None and by["dp"]["tokens_per_s"] is None   # never sorted as fastest
    assert by["auto"]["speedup_vs_3d"] == pytest.approx(1.0) and by["dp"]["speedup_vs_3d"] is None
    header, cells = table_rows(table)
    assert "vs best 3D" in header and cells[2][header.index("vs best 3D")] == "1.00x"
    assert cells[1][1] == interleaved.config.label                                # never cut
    assert "5L@1x16 x3" in legend(table) and "rc:full" in legend(table) and "mbN" in legend(table)
    keys, values = csv_rows(table)
    assert values[0]["step_time_s"] == "" and values[2]["step_time_s"] > 0


def test_progress_lines_when_stderr_is_not_a_terminal(monkeypatch):
    import time
    monkeypatch.setattr(cli, "PROGRESS_EVERY_S", 0.05)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), cli._progress_lines("planning x"):
        time.sleep(0.3)
    lines = err.getvalue().splitlines()
    assert len(lines) >= 2 and all(ln.startswith("autopar: planning x: ") for ln in lines)


def test_help_shows_defaults_and_plan_prints_a_summary(tmp_path, capsys):
    assert cli.main(["plan", "--help"]) == 0
    out = capsys.readouterr().out
    assert "16 per GPU" in out and "(default: 1f1b)" in out
    assert cli.main(["evaluate", TINY, "--nodes", "1", "--gpus-per-node", "2", "--dp", "2", "--tp", "1", "--pp",
                     "1", "--microbatch", "1"]) == 0      # the global batch has plan's default
    assert "global batch 32" in capsys.readouterr().out


def test_run_report_names_the_gpu_of_the_prediction(capsys):
    from autopar.runtime.launch import _report
    out = {"plan": "p", "model": "m", "n_processes": 2, "device": "cpu", "backend": "gloo", "precision": "fp32",
           "steps": 2, "global_batch": 4, "n_microbatches": 2, "microbatch_size": 2, "optimizer": "adam", "lr": 0.1,
           "predicted_step_time_s": 0.001, "measured_step_time_s": 0.5, "losses": [1.0],
           "predicted_for": "2 x V100-SXM2-16GB (p3.16xlarge)", "shard_local_ops": []}
    assert _report(out, False, 1e-4) == 0
    text = capsys.readouterr().out
    assert "predicted 0.001 s for 2 x V100-SXM2-16GB (p3.16xlarge)" in text and "not its speed" in text


def test_run_report_adds_the_eager_engines_prediction(capsys):
    """`autopar run` holds the run against the plan priced as its eager engines run it: the
    same figure as evaluate(..., eager=True) on the plan's cluster; none for a cluster file."""
    import dataclasses

    import graphs
    from autopar.evaluation.baselines import Config3D, build_3d
    from autopar.evaluation.evaluator import evaluate
    from autopar.hardware.presets import load_cluster
    from autopar.model import ModelSource
    from autopar.runtime.launch import _eager_prediction, _report
    cl = load_cluster("dgx-h200", 1, 2)
    plan = build_3d(ModelSource(TINY), cl, 4, Config3D(2, 1, 1, 1))
    want = evaluate(plan, graphs.load(TINY, batch=2), cl, eager=True).prediction.step_time_s
    assert _eager_prediction(plan).step_time_s == want != plan.prediction.step_time_s
    assert _eager_prediction(dataclasses.replace(plan, cluster=dataclasses.replace(plan.cluster, name="x.yaml"))) is None
    out = {"plan": "p", "model": "m", "n_processes": 2, "device": "cuda", "backend": "nccl", "precision": "bf16",
           "steps": 2, "global_batch": 4, "n_microbatches": 2, "microbatch_size": 2, "optimizer": "adam", "lr": 0.1,
           "predicted_step_time_s": 0.001, "measured_step_time_s": 0.002, "losses": [1.0],
           "predicted_eager_step_time_s": 0.0019, "predicted_for": "2 x H200", "shard_local_ops": []}
    assert _report(out, False, 1e-4) == 0
    assert "; 0.0019 s as these eager PyTorch engines run it" in capsys.readouterr().out
    # a run whose stage 0 was compiled per block: the eager model priced it compiled, and says so
    assert _report({**out, "compiled_stages": [0], "compiled_graphs": 1}, False, 1e-4) == 0
    text = capsys.readouterr().out
    assert "; 0.0019 s as these PyTorch engines run it, compiled blocks priced as compiled" in text
    assert "compiled: stage 0 ran torch.compile'd per transformer block (1 graph(s)" in text
    assert "prices eager kernels" not in text


def test_user_factory_errors_show_the_users_line(tmp_path):
    import graphs
    f = tmp_path / "m.py"
    f.write_text("def factory():\n    x = 1\n    raise KeyError('no such layer')\n")
    with pytest.raises(ValueError, match=r"factory\(\) raised KeyError: 'no such layer' \(.*m.py:3\)"):
        graphs.load(f"{f}:factory")
    f.write_text("def factory(:\n")
    with pytest.raises(ValueError, match=r"failed to import: SyntaxError: .*m.py:1\)"):
        graphs.load(f"{f}:factory")


def test_path_errors_name_the_path(tmp_path, capsys):
    assert cli.main(["show", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"autopar: error: plan file {str(tmp_path)!r} is a folder, not a file"
    assert Path(tmp_path).is_dir()
