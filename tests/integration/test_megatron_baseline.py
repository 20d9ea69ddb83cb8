"""The "megatron" row of `autopar compare`: the best point of Megatron-Core's grid (dp x tp x pp,
TP with or without SP, 1F1B or interleaved, distributed optimizer, recomputation, every
microbatch size), scored by the one evaluator."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest

from autopar.compare import RECOMPUTES, _megatron_configs, _megatron_grid, compare
from autopar.evaluation.baselines import (
    Config3D,
    build_3d,
    build_3d_recomputes,
    step_lower_bound_s,
    unevaluated_recomputes,
)
from autopar.evaluation.evaluator import evaluate
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.plan import PlanError, validate
from autopar.search.candidates import auto_label
from autopar.sharding.rules.attention import cp_of

MODEL = "gpt:hidden=256,layers=4,heads=8,seq=256,vocab=1024"


def test_recompute_variants_equal_separate_builds():
    src = ModelSource(MODEL)
    cl = load_cluster("p3.16xlarge", 1)
    cfg = Config3D(2, 4, 1, 2, schedule="1f1b", zero=1, sequence_parallel=True)
    rcs = ("none", "selective", "full")
    for rc, p in zip(rcs, build_3d_recomputes(src, cl, 64, cfg, rcs)):
        q = build_3d(src, cl, 64, dataclasses.replace(cfg, recompute=rc))
        assert p.config.label == q.config.label
        assert p.predicted.step_time_s == q.predicted.step_time_s
        assert p.predicted.peak_memory_bytes == q.predicted.peak_memory_bytes


@pytest.mark.parametrize("cfg", [Config3D(1, 8, 1, 1, zero=1, sequence_parallel=True),
                                 Config3D(2, 2, 2, 1, schedule="interleaved", virtual_stages=2, zero=1),
                                 Config3D(1, 2, 4, 1, recompute="selective", zero=1, sequence_parallel=True)],
                         ids=lambda c: c.label())
def test_memory_does_not_fall_as_the_microbatch_grows(cfg):
    """What the grid's pruning relies on (brute force over every microbatch size): once a
    configuration does not fit, its larger microbatches do not either."""
    src = ModelSource(MODEL)
    cl = load_cluster("p3.16xlarge", 1)
    gb = 64
    peaks = [build_3d(src, cl, gb, dataclasses.replace(cfg, microbatch=mb)).predicted.peak_memory_bytes
             for mb in range(1, gb // cfg.dp + 1) if (gb // cfg.dp) % mb == 0
             and (cfg.schedule != "interleaved" or (gb // (cfg.dp * mb)) % cfg.pp == 0)]
    assert len(peaks) >= 3
    assert all(b >= a * (1 - 1e-12) for a, b in zip(peaks, peaks[1:]))


def test_megatron_row_holds_the_3d_row():
    rows = {r.strategy: r for r in compare(MODEL, "p3.16xlarge", nodes=1, global_batch=64,
                                           strategies=["3d", "megatron"])}
    mega, three_d = rows["megatron"], rows["3d"]
    assert mega.fits and three_d.fits
    assert mega.tried > three_d.tried
    assert mega.plan.predicted.step_time_s <= three_d.plan.predicted.step_time_s
    assert mega.plan.config.settings["zero"] == 1              # the distributed optimizer


# ---- context parallelism and the grid's exact pruning ------------------------------------------

LLAMA = "llama:hidden=256,layers=4,heads=8,kv_heads=4,seq=1024,vocab=1024"


@pytest.mark.parametrize("cfg", [Config3D(1, 4, 1, 1, zero=1, sequence_parallel=True, cp=2),
                                 Config3D(2, 1, 2, 1, zero=1, cp=2),
                                 Config3D(1, 2, 2, 1, schedule="interleaved", virtual_stages=2, zero=1, cp=2)],
                         ids=lambda c: c.label())
def test_context_parallel_configuration_splits_the_sequence(cfg):
    src = ModelSource(LLAMA)
    cl = load_cluster("dgx-h100", 1)
    plan = build_3d(src, cl, 32, cfg)
    assert plan.stages[0].logical_mesh == cfg.mesh_shape()
    cp_axis = cfg.axis_masks()[1]
    for st in plan.stages:
        names = set(st.strategies.values())
        cp = [cp_of(n) for n in names if cp_of(n)]
        assert cp and all(axes == cp_axis for axes, _ in cp)
        assert any(f"s@{'0' if cp_axis == 1 else '1'}" in n and not cp_of(n) for n in names)   # the linears too
    assert plan.predicted.step_time_s > 0
    # the plan file carries it (schema-valid) and the stage label names it
    d = plan.to_dict()
    validate(d)
    assert f"+cp{cfg.cp}" in auto_label(plan.stages)
    sdpa = next(k for k, v in d["stages"][0]["strategies"].items() if cp_of(v))
    d["stages"][0]["strategies"][sdpa] = d["stages"][0]["strategies"][sdpa].replace("+cp:ring", "+cp:ulysses")
    d["stages"][0]["strategies"][sdpa] = d["stages"][0]["strategies"][sdpa].replace("+cp:allgather", "+cp:ulysses")
    with pytest.raises(PlanError):
        validate(d)


def test_context_parallel_configurations_refused_with_the_reason():
    src = ModelSource(LLAMA)
    cl = load_cluster("dgx-h100", 1)
    with pytest.raises(PlanError, match="3-D device mesh"):
        build_3d(src, cl, 32, Config3D(2, 2, 1, 1, cp=2))
    with pytest.raises(PlanError, match="the microbatch divides over the cp GPUs"):
        build_3d(src, cl, 32, Config3D(1, 4, 1, 2, cp=2))
    with pytest.raises(PlanError, match="must equal the cluster's 8 GPUs"):
        build_3d(src, cl, 32, Config3D(1, 4, 1, 1, cp=4))


def test_step_lower_bound_holds():
    """The bound the grid prunes with never exceeds the simulated step (1F1B, interleaved, CP,
    recomputation), and reusing the costs of structurally equal stages does not change it."""
    src = ModelSource(LLAMA)
    cl = load_cluster("dgx-h100", 1)
    memo: dict = {}
    for cfg in [Config3D(2, 2, 2, 1, zero=1), Config3D(2, 2, 2, 2, schedule="interleaved", virtual_stages=2, zero=1),
                Config3D(1, 2, 2, 1, zero=1, sequence_parallel=True, cp=2), Config3D(8, 1, 1, 4, zero=1),
                Config3D(1, 2, 4, 1, zero=1),
                Config3D(2, 2, 2, 1, schedule="interleaved", virtual_stages=2, zero=1, sequence_parallel=True)]:
        plans, graph = unevaluated_recomputes(src, cl, 32, cfg, RECOMPUTES)
        for p in plans:
            bound = step_lower_bound_s(p, graph, cl)
            assert step_lower_bound_s(p, graph, cl, memo=memo) == bound      # structurally equal stages reused
            step = evaluate(p, graph, cl).predicted.step_time_s
            assert 0 < bound <= step * (1 + 1e-12), (p.config.label, bound, step)


def test_pruned_grid_equals_brute_force():
    """The grid's best equals the best of every point evaluated (bound and memory pruning exact)."""
    src = ModelSource(LLAMA)
    cl = load_cluster("dgx-h100", 1)
    gb = 16
    n_blocks = src.summary()["n_layers"] - 2
    best, tried, _ = _megatron_grid(src, cl, gb, "bf16", n_blocks)
    every = []
    for cfg in _megatron_configs(cl, gb, n_blocks, None):
        with contextlib.suppress(PlanError):
            every += build_3d_recomputes(src, cl, gb, cfg, RECOMPUTES)
    assert 0 < tried <= len(every)
    assert any(p.config.settings["cp"] > 1 for p in every)
    want = min(p.predicted.step_time_s for p in every if p.predicted.fits)
    assert best is not None and best.predicted.step_time_s == want
