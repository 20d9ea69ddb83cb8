"""The "megatron" row of `autopar compare`: the best point of Megatron-Core's grid (dp x tp x pp,
TP with or without SP, 1F1B or interleaved, distributed optimizer, recomputation, every
microbatch size), scored by the one evaluator."""

from __future__ import annotations

import dataclasses

import pytest

from autopar.compare import compare
from autopar.evaluation.baselines import Config3D, build_3d, build_3d_recomputes
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource

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
