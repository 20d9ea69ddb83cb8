"""The auto planner: never worse than hand-made 3D plans, deterministic plan files, clear errors."""

import dataclasses
import json

import pytest

import autopar
from autopar.cli import main
from autopar.compare import _factorizations, _grid
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.hardware.mesh import Submesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.plan import Plan, PlanError
from autopar.search.candidates import microbatch_candidates, place
from autopar.search.layer_solver import SearchStats
from autopar.search.planner import SearchJob

SMALL = "gpt:hidden=256,layers=4,heads=4,seq=128,vocab=1024"


def best_3d(src, cl, gb):
    n_blocks = src.summary()["n_layers"] - 2
    best, tried, err = _grid(src, cl, gb, None, _factorizations(cl, n_blocks), zeros=(0, 1))
    assert best is not None and tried > 0, err
    return best


@pytest.mark.parametrize("model,nodes,gpn,gb", [
    ("gpt-350m", 1, 1, 64),        # Alpa's weak-scaling start: one GPU
    ("gpt-760m", 1, 2, 64),
    (SMALL, 2, 4, 64),             # across nodes: pipeline and data parallel compete
])
def test_auto_is_never_worse_than_the_best_3d_plan(model, nodes, gpn, gb):
    cl = load_cluster("p3.16xlarge", nodes, gpn)
    src = ModelSource(model)
    auto = autopar.plan(src, cl, global_batch=gb, workers=1)
    ref = best_3d(src, cl, gb)
    assert auto.predicted.fits
    # Hand-made plans lie in the search space; the tolerance covers the DP's approximation of
    # the per-step gradient sync, which only the evaluator simulates exactly.
    assert auto.predicted.step_time_s <= ref.predicted.step_time_s * 1.001, (
        auto.config.label, ref.config.label)


@pytest.mark.parametrize("model,nodes,gpn,gb,mb,interleaved", [
    ("gpt-760m", 1, 2, 1024, 2, True),   # many microbatches: a tight bound
    (SMALL, 2, 4, 64, 2, False),         # across nodes
    (SMALL, 1, 4, 32, 4, True),          # 2 ranks x 2 chunks among the candidates (and above)
    (SMALL, 1, 4, 8, 8, False),          # one microbatch: no steady state to amortise the fill
])
def test_search_skips_only_candidates_whose_bound_cannot_beat_the_best(model, nodes, gpn, gb, mb, interleaved):
    """Every candidate's lower bound is at most its simulated step time, so skipping by the
    bound keeps the best of all candidates: the search's plan is the best of simulating them all."""
    cl = load_cluster("p3.16xlarge", nodes, gpn)
    job = SearchJob(ModelSource(model), cl, gb, "1f1b", None, cl.gpu.training_dtype(None), 1, 10.0, "highs", "ilp")
    prop = job.propose(mb, SearchStats())
    plans = [job.simulate(prop, c) for c in prop.candidates]
    for cand, p in zip(prop.candidates, plans):
        assert cand.step_lower_bound_s(gb // mb) <= p.predicted.step_time_s, p.config.label
    fitting = [p.predicted.step_time_s for p in plans if p.predicted.fits]
    found = job.search(mb)
    assert found.plan is not None and found.plan.predicted.step_time_s == min(fitting)
    assert found.row["candidates_evaluated"] <= len(prop.candidates)
    if interleaved:
        assert any(c.chunks > 1 for c in prop.candidates)


def test_interleaved_candidate_is_no_worse_than_megatrons_on_its_mesh_when_memory_is_tight():
    """Megatron's interleaved plan lies in the equal-split space. On a GPU just big enough for
    it, the first chunk (embedding and its share of blocks) needs more than half the memory and
    its partner chunk less: the two share the GPU, so the search must cap their sum, not each
    chunk at half (which left no interleaved candidate here, and on gpt-39b / p3.16xlarge mb2
    forced full recompute on the first chunk: 64.65 s against Megatron's 59.20 s)."""
    src = ModelSource("gpt:hidden=512,layers=16,heads=8,seq=256,vocab=32768")
    cl = load_cluster("p3.16xlarge", 1, 8)
    cfg = Config3D(dp=1, tp=2, pp=4, microbatch=1, schedule="interleaved", virtual_stages=2, zero=1,
                   sequence_parallel=True)
    peak_bytes = build_3d(src, cl, 8, cfg).predicted.peak_memory_bytes
    tight = dataclasses.replace(cl, gpu=dataclasses.replace(cl.gpu, memory_bytes=peak_bytes))
    megatron = build_3d(src, tight, 8, cfg)
    assert megatron.predicted.fits
    job = SearchJob(src, tight, 8, "1f1b", None, tight.gpu.training_dtype(None), 1, 10.0, "highs", "ilp")
    prop = job.propose(1, SearchStats())
    same_shape = [job.simulate(prop, c) for c in prop.candidates
                  if c.origin == "equal" and c.chunks == 2 and c.choices[0].logical_mesh == (1, 2)]
    assert same_shape and all(p.predicted.fits for p in same_shape)
    assert min(p.predicted.step_time_s for p in same_shape) <= megatron.predicted.step_time_s * (1 + 1e-9)


def test_dp_optima_interleaved_on_their_own_device_groups():
    """interleaved_dp_candidates: a DP optimum keeps its groups and layer counts, each group's
    layers cut into a chunk per pass of the model, and every candidate's bound stays below its
    simulation (oracle: the simulator). Optima on groups of different sizes (here 1, 2, 1 and
    4 GPUs) are not interleaved: `autopar run` runs that on gloo only (the planner emits only
    what runs on CUDA)."""
    src = ModelSource("gpt:hidden=512,layers=12,heads=8,seq=256,vocab=32768")
    cl = load_cluster("p3.16xlarge", 1, 8)
    job = SearchJob(src, cl, 48, "1f1b", None, cl.gpu.training_dtype(None), 1, 10.0, "highs", "ilp")
    prop = job.propose(1, SearchStats())
    B = 48
    n_dev = [s.n_devices for s in prop.subs]
    parents = [c for c in prop.candidates if c.origin == "dp"]
    assert any(len({n_dev[mi] for _, _, mi in p.stages}) > 1 for p in parents)
    checked = 0
    for c in prop.candidates:
        if c.origin != "dp-interleaved":
            continue
        d = c.depth
        assert len({n_dev[mi] for _, _, mi in c.stages}) == 1
        assert any(len(p.stages) == d and all(
            p.stages[r][2] == c.stages[r][2] and p.stages[r][1] - p.stages[r][0]
            == sum(j - i for i, j, _ in c.stages[r::d]) for r in range(d)) for p in parents)
        assert [i for i, _, _ in c.stages[1:]] == [j for _, j, _ in c.stages[:-1]] and c.stages[0][0] == 0
        assert all(c.stages[k][2] == c.stages[k % d][2] for k in range(len(c.stages)))
        plan = job.simulate(prop, c)
        assert plan.training.schedule == "interleaved"
        assert c.step_lower_bound_s(B) <= plan.predicted.step_time_s
        checked += 1
    assert checked


def test_sync_dominated_tiny_pipeline_stays_within_two_percent_of_3d():
    """A known gap: a tiny model, one microbatch, gradient sync comparable to compute. The
    layer ILP charges a stage's gradient sync as exposed (sync / B); the simulator hides a later
    stage's sync behind the earlier stages' last backward, so Megatron's data-parallel stages
    win by about 1%. Realistic batches amortise the sync and the gap vanishes (test above)."""
    cl = load_cluster("p3.16xlarge", 1, 4)
    src = ModelSource(SMALL)
    auto = autopar.plan(src, cl, global_batch=32, workers=1)
    ref = best_3d(src, cl, 32)
    assert auto.predicted.step_time_s <= ref.predicted.step_time_s * 1.02


def test_plan_json_is_deterministic_and_round_trips(tmp_path):
    a = autopar.plan(SMALL, "p3.16xlarge", nodes=1, gpus_per_node=4, global_batch=16, workers=1).to_json()
    b = autopar.plan(SMALL, "p3.16xlarge", nodes=1, gpus_per_node=4, global_batch=16, workers=2).to_json()
    assert a == b
    p = Plan.from_json(a)
    assert p.to_json() == a
    d = json.loads(a)
    assert d["schema"] == "autopar.plan/v1"
    for key in ("step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "bubble_fraction", "peak_memory_bytes", "fits"):
        assert key in d["predicted"]
    assert d["search"]["ilps"] > 0 and d["search"]["statuses"]
    assert sorted({i for s in d["stages"] for i in s["device_ids"]}) == list(range(4))   # every GPU used


def test_hand_edited_plan_gets_a_schema_error_naming_the_path(tmp_path):
    d = json.loads(autopar.plan(SMALL, "p3.16xlarge", nodes=1, gpus_per_node=2, global_batch=8, workers=1).to_json())
    d["stages"][0]["logical_mesh"] = [0, 2]
    with pytest.raises(PlanError, match=r"stages/0/logical_mesh"):
        Plan.from_dict(d)
    d["stages"][0]["logical_mesh"] = [2, 1]
    d["training"]["schedule"] = "zigzag"
    with pytest.raises(PlanError, match=r"training/schedule"):
        Plan.from_dict(d)
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    assert main(["show", str(path)]) == 2


def test_no_plan_fits_says_the_least_memory_and_what_helps():
    with pytest.raises(PlanError) as e:
        autopar.plan("gpt-6.7b", "p3.16xlarge", nodes=1, gpus_per_node=1, global_batch=8, workers=1)
    msg = str(e.value)
    assert "least memory per device" in msg and "GiB" in msg and "more GPUs" in msg


def test_bad_microbatch_count_lists_valid_ones():
    with pytest.raises(PlanError, match=r"valid counts: \[1, 2, 3, 4, 6, 12\]"):
        microbatch_candidates(12, 4, 5)


def test_placement_never_overlaps_and_uses_every_device():
    cl = load_cluster("p3.16xlarge", 3, 8)
    stages = [(0, 1, Submesh(1, 2)), (1, 2, Submesh(2, 8)), (2, 3, Submesh(1, 4)), (3, 4, Submesh(1, 2))]
    ids = place(stages, cl)
    flat = [i for s in ids for i in s]
    assert sorted(flat) == list(range(24))
    for (_, _, sub), dev in zip(stages, ids):
        if sub.n_nodes == 1:   # a (1, 2^k) submesh stays inside one node
            assert len({d // 8 for d in dev}) == 1


def test_cli_plan_show_and_gantt(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", SMALL, "--cluster", "p3.16xlarge", "--nodes", "1", "--gpus-per-node", "4",
                 "--global-batch", "16", "-o", str(out)]) == 0
    assert Plan.from_json(out).predicted.fits
    # never overwrite a user's file silently
    assert main(["plan", SMALL, "--nodes", "1", "--gpus-per-node", "4", "--global-batch", "16", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    png = tmp_path / "g.png"
    assert main(["show", str(out), "--gantt", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_table_json_plot_agree(tmp_path, capsys):
    js, png, csvp = tmp_path / "c.json", tmp_path / "c.png", tmp_path / "c.csv"
    assert main(["compare", SMALL, "--nodes", "1", "--gpus-per-node", "4", "--global-batch", "16",
                 "--strategies", "dp,zero3,tp,pp,3d,auto", "--json", str(js), "--plot", str(png),
                 "--csv", str(csvp)]) == 0
    text = capsys.readouterr().out
    doc = json.loads(js.read_text())
    rows = {r["strategy"]: r for r in doc["rows"]}
    assert set(rows) == {"dp", "zero3", "tp", "pp", "3d", "auto"}
    fit = {k: r for k, r in rows.items() if r["fits"]}
    assert rows["auto"]["fits"]
    # auto >= 3d >= each single strategy (ties allowed)
    assert rows["auto"]["tokens_per_s"] >= rows["3d"]["tokens_per_s"] * 0.999
    for k in ("dp", "zero3", "tp", "pp"):
        if k in fit:
            assert rows["3d"]["tokens_per_s"] >= fit[k]["tokens_per_s"] * 0.999
    for r in fit.values():        # the terminal table shows the JSON's numbers
        assert f"{r['tokens_per_s']:,.0f}" in text
    # every row carries its full plan, which can be re-evaluated
    for plan in doc["plans"].values():
        Plan.from_dict(plan)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert csvp.read_text().splitlines()[0].startswith("strategy,")


def test_compare_unknown_strategy_lists_valid_ones(capsys):
    assert main(["compare", SMALL, "--strategies", "dp,warp"]) == 2
    err = capsys.readouterr().err
    assert "warp" in err and "zero3" in err and "inter-only" in err


def test_too_small_cluster_shows_oom_per_strategy_not_a_crash():
    rows = autopar.compare("gpt-2.6b", "p3.16xlarge", nodes=1, gpus_per_node=1, global_batch=8,
                           strategies=["dp", "zero3", "auto"])
    by = {r.strategy: r for r in rows}
    assert not by["dp"].fits and by["dp"].plan is not None       # OOM with its memory need
    assert by["dp"].plan.predicted.peak_memory_bytes > 16e9
    assert not by["auto"].fits and "least memory" in by["auto"].error


def test_cli_plan_context_parallel_switch(tmp_path):
    """--no-context-parallel searches the space without sequence splits; the default space
    contains it, so its plan is never slower (here, batch 1 on 4 GPUs, it is faster with CP)."""
    model = "llama:hidden=1024,layers=4,heads=8,kv_heads=8,ffn=2048,seq=32768,vocab=1024"
    args = ["--cluster", "dgx-h100", "--nodes", "1", "--gpus-per-node", "4", "--global-batch", "1"]
    on, off = tmp_path / "on.json", tmp_path / "off.json"
    assert main(["plan", model, *args, "-o", str(on)]) == 0
    assert main(["plan", model, *args, "--no-context-parallel", "-o", str(off)]) == 0
    p_on, p_off = Plan.from_json(on), Plan.from_json(off)
    assert "+cp" in p_on.config.label and "+cp" not in p_off.config.label
    assert p_on.predicted.step_time_s < p_off.predicted.step_time_s
