"""The cost model against measured training steps (issue 13): the H200 corpus of
bench/truth (bench/results/truth_h200_2026-11-30.json) replayed through the current model by
bench/truth/predict.py, no GPU needed.

The bars are the achieved numbers with half a point of room (the issue's targets, median 8% time
and 10% memory, max 20%, are met but for the maxima named in PINNED), so they cannot regress. Memory safety (predicted peak reserved >= measured peak reserved)
holds on every row (MEMORY_SHORT_OK would name an exception); rows whose measured peaks are not
their own would be listed in predict.CONTAMINATED and not compared (none now). The terms' own
accuracy, before the allocator's reserve, is held to PINNED_ALLOCATED (peak allocated).
The default run replays a subset whose graphs trace quickly (every strategy, both families);
`-m slow` replays the whole corpus, checks the strategies' ranking and refits the constants.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

from autopar.costmodel import eager
from autopar.costmodel.compute import ComputeModel
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.evaluation.evaluator import eager_terms, evaluate, evaluate_stage, p2p_time_s
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.search.layer_solver import SearchStats
from autopar.search.planner import SearchJob
from autopar.sharding.spec import parse_spec
from autopar.sharding.stage_problem import Settings, StageProblem
from graphs.query import main_boundary, stage_nodes

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "bench/results/truth_h200_2026-11-30.json"

_spec = importlib.util.spec_from_file_location("truth_predict", ROOT / "bench/truth/predict.py")
assert _spec is not None and _spec.loader is not None
predict = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(predict)

# Three graphs: every strategy of gpt-1.3b at microbatch 1 and 8, and Llama-1b at 1.
SUBSET = {
    "single-gpt-1.3b-s1024-mb1", "single-gpt-1.3b-s1024-mb8", "ddp-gpt-1.3b-s1024-mb1", "ddp-gpt-1.3b-s1024-mb8",
    "fsdp2-gpt-1.3b-s1024-mb1", "fsdp2-gpt-1.3b-s1024-mb8", "tp-gpt-1.3b-s1024-mb1", "tp-gpt-1.3b-s1024-mb8",
    "pp-gpt-1.3b-s1024-mb1-nmb4", "pp-gpt-1.3b-s1024-mb1-nmb8",
    "single-llama-1b-s2048-mb1",
}
# Targets met: median time 8% and memory 10% on every set, and the memory max 20%. Not met yet:
# the time max 20% (tp-gpt-1.3b mb1, host-bound eager DTensor, +24.9%: re-measured in fresh
# workers (call 4) at 241 ms first in its process and 309 ms second, for the same host work, so
# DTensor's dispatch time alone varies by 28% run to run). Memory: fsdp2-llama-3b mb4's +21.8%
# was autocast's fp32 count for RMSNorm, which torch 2.11 runs in bf16 over FSDP2's bf16
# parameters (eager.norm_runs_fp32; now +7.1%, the max +14.1% fsdp2-gpt-6.7b mb8, its allocated
# +3.7%: the allocator's envelope); the ddp
# rows' +24..+27% was DDP's first buckets, which a run's second step holds at its activation
# peak and the harness's runs on some ranks only: eager.ddp_rebuild_transient_bytes,
# predict.ddp_rebuild_comparison). Achieved on
# 2026-11-30 with FSDP2's overlap (eager.fsdp_block_comm_s) and call 4's re-measured rows
# (HOST_TP_S_PER_BLOCK refitted on them), 66 rows, all with memory compared
# (bench/results/truth_predicted_2026-11-30.json), pinned at the achieved value plus half a point.
# 2026-12-01 (bench/results/truth_predicted_2026-12-01.json): autocast's bf16 input copy per
# linear (eager.autocast_input_copies_bytes) and the loss at 10 B per logit, not 12 (its
# gradient is bf16: autocast sets log_softmax's dtype instead of casting the logits), took the
# peak allocated from median 2.0% to 0.7% off (single rows without recomputation: 1.8% -> 0.2%,
# max 2.9% -> 1.9%); the reserved peak is that times the allocator's envelope (1.148), so its
# median rose (8.1% -> 9.2%) while no row is predicted short any more (one was, -0.1%):
#   all      time 3.3% / 24.9%, memory 9.2% / 26.6%   (time 3.6% before the pipeline terms)
#   fit      time 2.9% / 24.9%, memory 9.4% / 26.6%   (3.4%)
# and DDP's first buckets counted at step 2's activation peak only, not as 4 B/param held all step,
# each ddp row compared with the model's peak with them or without, whichever its measured
# allocated is nearer to (2026-12-01, bench/results/ddp_memory_h200_2026-12-01.txt):
#   all      memory 8.6% / 21.8%, allocated 0.6% / 18.1%; fit memory 8.9% / 14.1%;
#   ddp      memory 13.4% / 26.6% -> 9.8% / 13.4%, allocated 0.7% / 19.8% -> 0.0% / 0.7%
#   held_out time 3.6% /  9.1%, memory 8.1% / 21.8%   (fsdp2-llama-3b mb4: FSDP2 rows hold less
#            per token than the autocast count, bench/truth/README.md "Sixth pass")
#   fsdp2    time 4.9% / 11.9% (8.2% / 19.5% with ZeRO-3's collectives all exposed, and the
#            contaminated rows of calls 1-3), memory 11.5% / 21.8%
#   pp       time 0.6% /  8.9%, memory 6.4% /  9.9%   (6.1% / 8.7% before eager.py "pipelines":
#            the GPT rows -7.4 / -8.7 / -7.9% -> +0.5 / +0.0 / -2.3%, held-out llama-3b -2.7 ->
#            +0.3%; the max is the host-bound pp-gpt-1.3b mb1 x4, +4.7 -> +8.9%)
# and the fsdp2 rows priced as autocast over FSDP2's bf16 parameters (eager.autocast_over_bf16_params:
# RMSNorm in bf16 on torch 2.11, no weight cache; the GPT rows do not move):
#   all      time 3.5% / 24.9% -> 3.4% / 24.9%, memory 8.6% / 21.8% -> 7.7% / 14.1%, allocated max 18.1% -> 6.8%
#   held_out time 3.6% /  9.1% -> 3.5% /  8.8%, memory 8.1% / 21.8% -> 7.1% / 13.4%
#   fsdp2    time 4.9% / 11.9% -> 2.9% / 11.9%, memory 11.5% / 21.8% -> 8.2% / 14.1%, allocated 5.0% / 18.1% -> 3.7% / 6.8%
# and the memory-bound ops priced on their own kind's measured rows by size (2026-12-02,
# bench/results/truth_predicted_2026-12-02.json; compute.memory_bound_s, GPU_IDLE_S_PER_BLOCK (then PIPELINE_)
# refitted 0.208 -> 0.165 ms): all 3.4% -> 2.6%, fit 3.3% -> 2.5%, held_out 3.5% / 8.8% -> 3.3% /
# 10.0% (single-llama-3b s8192 mb2 with full recomputation, +8.8% -> +10.0%: the recomputed
# norms and activations at their kinds' rates; the recomputation rows were over already), single
# 3.3% -> 2.3%, ddp 3.6% -> 2.0%, pp 0.6% / 8.9% -> 1.6% / 8.7% (llama-3b +0.3% -> +1.7%,
# gpt-1.3b mb4 x8 +0.4% -> +1.8%); memory unchanged
# and full recomputation priced as torch's checkpoint reruns it (2026-12-02b,
# bench/results/truth_predicted_2026-12-02b.json; stage_problem.block_rerun, eager.recompute_weight_casts_s):
# the seven recomputed rows +0.0..+10.0% -> -3.0..+7.0%; all 2.6% -> 2.5%, fit 2.5% -> 2.3%,
# held_out 3.3% / 10.0% -> 3.0% / 8.8%, single 2.3% / 10.0% -> 1.5% / 8.4%; memory unchanged
# and the eager step's kernels priced by kind (2026-12-02c, bench/results/truth_predicted_2026-12-02c.json;
# bench/truth/README.md sixteenth pass): attention on the rows of the kernels SDPA runs, rotary,
# the fp32 norms with autocast's casts, the residual adds into the fp32 stream and the bias
# gradients kernel by kernel, the GPU's measured idle per block in every eager step
# (GPU_IDLE_S_PER_BLOCK 0.121 ms, was the pipelines' 0.165), COMM_OVERLAP_SLOWDOWN refitted 0.501 -> 0.521:
# all 2.5% -> 2.2%, fit 2.3% -> 2.8%, held_out 3.0% / 8.8% -> 1.8% / 8.8%, single 1.5% -> 1.8%,
# ddp 1.9% -> 1.5%, pp 1.6% / 8.7% -> 0.9% / 9.4%; memory unchanged
PINNED = {  # set: (time median, time max, memory median, memory max)
    "all": (0.027, 0.254, 0.082, 0.146),
    "fit": (0.033, 0.254, 0.094, 0.146),
    "held_out": (0.023, 0.093, 0.076, 0.139),
    "fsdp2": (0.033, 0.124, 0.087, 0.146),
    "pp": (0.014, 0.099, 0.069, 0.104),
}
# Peak allocated (the terms before the allocator's reserve), achieved 2026-12-01 plus half a
# point: all 0.6% / 6.8% (fsdp2-llama-3b s4096 mb1; 18.1% before the fsdp2 rows' RMSNorm ran
# bf16, 19.8% before DDP's first buckets were counted at step 2's activation peak only),
# single 0.3% / 6.1% (single-llama-3b s8192 mb2 with full recomputation), tp 0.0% / 1.3%,
# ddp 0.0% / 0.7%, fsdp2 3.7% / 6.8%.
PINNED_ALLOCATED = {"all": (0.011, 0.073), "single": (0.008, 0.066), "tp": (0.005, 0.018), "ddp": (0.005, 0.012),
                    "fsdp2": (0.042, 0.073)}
# FSDP2's exposed communication against the measured `exposed_comm` of the fsdp2 rows whose GPU
# work fills the step (not host-bound) and whose profiled step ran at the timed one's pace
# (busy time within 5% of step_s): within 9.3 ms achieved (llama3-8b mb1, 13.2 vs 22.5 ms);
# all of ZeRO-3's collectives counted as exposed were 42-95 ms off.
FSDP_EXPOSED_MAX_S = 0.010
# Memory safety: every row's predicted peak reserved is at least the measured one. The least
# margin is single-llama3-8b-s2048-mb1 (+0.2%: at the GPU's capacity, with one allocator retry).
MEMORY_SHORT_OK: dict[str, float] = {}
MEMORY_MARGIN_MEDIAN = (0.05, 0.12)    # achieved +8.6%: safe, and not padded (the 10% target)
# Every subset row within 10% of its measured step but two host-bound ones, whose host work
# does not depend on the microbatch: tp-gpt-1.3b mb1, measured 241 ms first in its worker and
# 309 ms second (the model prices it at 301 ms), and fsdp2-gpt-1.3b mb8, measured 180 ms where
# mb1 measures 207 ms (both priced at 201 ms, with HOST_FSDP_S_PER_BLOCK refitted on call 4).
SUBSET_TIME_MAX = 0.10
SUBSET_ALLOCATED_MAX = 0.025
SUBSET_TIME_OUTLIERS = {"tp-gpt-1.3b-s1024-mb1": 0.254, "fsdp2-gpt-1.3b-s1024-mb8": 0.124}
# Rows whose reserved peak is not their own (they started with the previous run's segments
# reserved, predict.contamination): their allocated peak is held to the bound instead. None
# since call 4 re-measured the two such rows in fresh workers.
NOT_COMPARED: set[str] = set()


@pytest.fixture(scope="module")
def subset():
    return predict.run(CORPUS, SUBSET)


def test_subset_rows_within_bars(subset):
    rows = subset["rows"]
    assert {r["id"] for r in rows} == SUBSET
    for r in rows:
        assert abs(r["step_error"]) <= SUBSET_TIME_OUTLIERS.get(r["id"], SUBSET_TIME_MAX), (r["id"], r["step_error"])
        assert r["memory_safe"] if r["memory_compared"] else r["allocated_safe"], (r["id"], r["memory_error"])
        if r["strategy"] in ("single", "tp"):
            # the terms alone (no allocator reserve): 2026-12-01, -0.1..+1.9% (-2.0..+2.3% before)
            assert abs(r["allocated_error"]) <= SUBSET_ALLOCATED_MAX, (r["id"], r["allocated_error"])


def test_breakdown_adds_up(subset):
    for r in subset["rows"]:
        parts = r["predicted_breakdown_s"]
        assert math.isclose(sum(parts.values()), r["predicted_step_s"], rel_tol=1e-6), r["id"]
        mem = r["predicted_memory_breakdown_bytes"]
        assert sum(mem.values()) == pytest.approx(r["predicted_peak_bytes"], rel=1e-9), r["id"]
        assert r["predicted_peak_reserved_bytes"] == pytest.approx(
            r["predicted_peak_bytes"] - mem["cuda_context"] - mem["nccl"], rel=1e-9), r["id"]


def test_eager_terms_closed_form():
    cm = ComputeModel(load_cluster("dgx-h200", 1, 1).gpu)
    # fused AdamW over 1e9 parameters: 28 GB at the measured 3.47 TB/s
    assert eager.optimizer_s(1e9, cm) == pytest.approx(28e9 / 3.47e12, rel=1e-3)
    # casts: one microbatch 6 + 6 B/param; eight: (12 + 7 * 18) / 8 B/param per microbatch
    # (these fp32 elementwise kernels run at the AdamW kernel's measured share of the stream)
    bw = cm.stream_bytes_per_s * eager.ADAMW_STREAM_SHARE
    assert eager.precision_casts_s(1e9, 1, cm) == pytest.approx(12e9 / bw)
    assert eager.precision_casts_s(1e9, 8, cm) == pytest.approx((12 + 7 * 18) / 8 * 1e9 / bw)
    # (an eager norm's kernels, by kind: tests/unit/test_eager_kernels.py)
    fwd, bwd = eager.host_s(10, 0, 0, tp=False, fsdp=False, cm=cm)
    assert fwd + bwd == pytest.approx(10 * eager.HOST_S_PER_LINEAR)
    fwd, bwd = eager.host_s(0, 0, 4, tp=True, fsdp=True, cm=cm)
    assert fwd + bwd == pytest.approx(4 * (eager.HOST_TP_S_PER_BLOCK + eager.HOST_FSDP_S_PER_BLOCK
                                           + eager.HOST_FSDP_STEP_S_PER_BLOCK))
    # FSDP2's step part once per step: a step of 3 microbatches pays its per-microbatch part 3 times
    fwd, bwd = eager.host_s(0, 0, 4, tp=False, fsdp=True, cm=cm, n_microbatches=3)
    assert 3 * (fwd + bwd) == pytest.approx(4 * (3 * eager.HOST_FSDP_S_PER_BLOCK + eager.HOST_FSDP_STEP_S_PER_BLOCK))
    fwd, bwd = eager.host_s(0, 0, 24, tp=False, fsdp=False, cm=cm, ddp=True)
    assert fwd + bwd == pytest.approx(24 * eager.HOST_DDP_S_PER_BLOCK)
    # the allocator's reserve: expandable segments (autopar run's allocator) by default, the
    # default segments' envelope where the run kept them (bench/truth's native rows)
    assert eager.reserved_bytes(100.0, fsdp=False) == pytest.approx(100 * (1 + eager.RESERVE_FRACTION_EXPANDABLE))
    assert eager.reserved_bytes(100.0, fsdp=False, expandable=False) == pytest.approx(100 * (1 + eager.RESERVE_FRACTION))
    assert eager.expandable_segments(eager.ALLOC_CONF)
    assert eager.expandable_segments("max_split_size_mb:128, expandable_segments:true")
    assert not eager.expandable_segments("") and not eager.expandable_segments("expandable_segments:False")


@pytest.mark.slow
def test_whole_corpus_against_pinned_bars():
    res = predict.run(CORPUS)
    for name, (t_med, t_max, m_med, m_max) in PINNED.items():
        s = res["summary"][name]
        assert s["time_median"] <= t_med and s["time_max"] <= t_max, (name, s)
        assert s["memory_median"] <= m_med and s["memory_max"] <= m_max, (name, s)
    for name, (a_med, a_max) in PINNED_ALLOCATED.items():
        s = res["summary"][name]
        assert s["allocated_median"] <= a_med and s["allocated_max"] <= a_max, (name, s)
    for r in res["rows"]:
        if r["memory_compared"] and not r["memory_safe"]:
            assert r["memory_error"] >= MEMORY_SHORT_OK.get(r["id"], 0.0), (r["id"], r["memory_error"])
    assert {r["id"] for r in res["rows"] if not r["memory_compared"]} == NOT_COMPARED
    assert all(r["allocated_safe"] for r in res["rows"] if not r["memory_compared"])
    lo, hi = MEMORY_MARGIN_MEDIAN
    assert lo <= res["summary"]["all"]["memory_margin_median"] <= hi, res["summary"]["all"]
    # The strategies' ranking on 2 GPUs: every group. llama-3b s4096 mb1 (fsdp2 28.8, pp x8 30.7
    # us per token measured) was the one wrong until the pipeline terms (pp x8 -2.7% -> +0.3%).
    wrong = [(g["model"], g["seq"], g["microbatch"]) for g in res["ranking"] if not g["same"]]
    assert wrong == [], res["ranking"]


@pytest.mark.slow
def test_fitted_constants_match_the_corpus():
    for name, value in predict.fit(CORPUS).items():
        assert getattr(eager, name) == pytest.approx(value, rel=0.01), name


def test_pipeline_terms_closed_form():
    cm = ComputeModel(load_cluster("dgx-h200", 1, 1).gpu)
    bw = cm.stream_bytes_per_s * eager.ADAMW_STREAM_SHARE
    # scale_grads: one read and one write of the fp32 gradients, none with one microbatch
    assert eager.pipeline_grad_scale_s(1e9, 8, cm) == pytest.approx(8e9 / bw)
    assert eager.pipeline_grad_scale_s(1e9, 1, cm) == 0.0
    f, b = eager.gpu_idle_s(16)
    assert f + b == pytest.approx(16 * eager.GPU_IDLE_S_PER_BLOCK)
    assert f / (f + b) == pytest.approx(eager.HOST_FORWARD_SHARE)


def test_pipeline_terms_in_a_tied_gpt_pipeline():
    """pp2 of a tied GPT: the last stage holds a copy of the embedding (its state, casts and
    optimizer step), both stages wait for the tied gradients' all-reduce and scale their
    gradients, every stage idles per block and microbatch; the breakdown still adds up."""
    spec = "gpt:hidden=64,layers=4,heads=4,seq=32,vocab=128"
    cluster = load_cluster("dgx-h200", 1, 2)
    src = ModelSource(spec)
    plan = build_3d(src, cluster, 8, Config3D(1, 1, 2, 1, schedule="1f1b"))
    graph = src.graph(1)
    eager_plan = evaluate(plan, graph, cluster, eager=True)
    cm = ComputeModel(cluster.gpu)
    res = [evaluate_stage(graph, cluster, s, plan.training, cm, eager=True) for s in plan.stages]
    vocab_x_hidden = 128 * 64
    assert res[0].tied_copy_params == 0.0 and res[1].tied_copy_params == vocab_x_hidden
    alone = evaluate_stage(graph, cluster, plan.stages[1], plan.training, cm, eager=False)
    assert res[1].param_state_bytes == pytest.approx(
        alone.param_state_bytes * (1 + vocab_x_hidden / res[1].ev.param_elems))
    p = eager_plan.predicted
    assert sum(p.breakdown_s.values()) == pytest.approx(p.step_time_s, rel=1e-9)
    assert p.breakdown_s["gpu_idle"] == pytest.approx(8 * 2 * eager.GPU_IDLE_S_PER_BLOCK)
    bw = cm.stream_bytes_per_s * eager.ADAMW_STREAM_SHARE
    ranks = {k: s for k, s in enumerate(res)}
    time_rank = 0 if p.breakdown_s["embedding"] > 0 else 1
    own = ranks[time_rank].ev.param_elems + ranks[time_rank].tied_copy_params
    assert p.breakdown_s["pipeline_grad_scale"] == pytest.approx(8 * own / bw)
    # the tied gradients' all-reduce: 4 B per copied parameter between the two stages' GPUs
    assert p.breakdown_s["exposed_comm"] == pytest.approx(
        p2p_time_s(cluster, plan.stages[0], plan.stages[1], 4 * vocab_x_hidden))
    # the default (non-eager) model carries none of it
    plain = evaluate(plan, graph, cluster, eager=False).predicted.breakdown_s
    assert plain["gpu_idle"] == plain["pipeline_grad_scale"] == 0.0


def test_eager_memory_terms_closed_form():
    # autocast's fp32 copy of a bf16 residual tensor of 100 B: 100 B more; none for fp32 or ids
    assert eager.fp32_residual_extra_bytes(100.0, 2) == 100.0
    assert eager.fp32_residual_extra_bytes(100.0, 4) == 0.0 and eager.fp32_residual_extra_bytes(100.0, 8) == 0.0
    # one microbatch: 4 B/param of gradients absent, 2 B/param of bf16 weight copies present
    assert eager.gradients_absent_at_activation_peak_bytes(1e9, 1e9, False, 1) == pytest.approx(2e9)
    assert eager.gradients_absent_at_activation_peak_bytes(1e9, 0.5e9, True, 1) == pytest.approx(2e9)
    assert eager.gradients_absent_at_activation_peak_bytes(1e9, 1e9, False, 4) == 0.0
    # DDP: its buckets, 4 B/param all step, and its first buckets again at step 2's activation
    # peak (4 B/param); autocast's cache over several microbatches 2 B
    assert eager.state_bytes(1e9, True, 1) == pytest.approx(4e9)
    assert eager.ddp_rebuild_transient_bytes(1e9) == pytest.approx(4e9)
    assert eager.state_bytes(1e9, False, 4) == pytest.approx(2e9)
    assert eager.tied_embedding_grad_bytes(1e8) == pytest.approx(4e8)
    assert eager.fsdp_buffer_bytes(1e8, 2e8) == (pytest.approx(4e8), pytest.approx(32e8))
    # FSDP2's gradients (4 B per sharded parameter) sit in a pool of their own: the fraction is
    # the compute stream's only; without ZeRO-3 there is no such pool
    pool = eager.zero3_grad_pool_bytes(1e9)
    assert pool == pytest.approx(4e9)
    for expandable in (True, False):
        f = eager.reserve_fraction(expandable)
        assert eager.reserved_bytes(10e9, True, pool, expandable=expandable) == pytest.approx(6e9 * (1 + f) + 4e9)
        assert eager.reserved_bytes(10e9, False, pool, expandable=expandable) == pytest.approx(10e9 * (1 + f))
        # the planner's cap is the inverse of the evaluator's peak
        for zero3, n in ((False, 1), (True, 2)):
            cap = eager.allocatable_bytes(80 * 2**30, n, expandable)
            assert eager.device_peak_bytes(cap + eager.CUBLAS_WORKSPACE_BYTES, zero3, n,
                                           expandable=expandable) == pytest.approx(80 * 2**30)


def _stage_terms(graph, layers, plan_stage, mesh, cm, n_microbatches, zero, zero_autocast=False, compiled=False):
    """eager_terms of layers [a, b) under the strategies a built plan's stage picked, its blocks
    eager by default (compiled=False: the recipe these tests count by hand, whatever autopar
    run's default compiles; None: that default; tests/unit/test_compiled_blocks.py prices the
    compiled blocks)."""
    names = stage_nodes(graph, layers)
    src = main_boundary(graph, names)
    spec = parse_spec(plan_stage.input_spec) if plan_stage.input_spec else (1, 0, 0)
    prob = StageProblem(graph, names, mesh, cm, boundary={src: spec} if src else None)
    choice = prob.choice_from_names({n: s for n, s in plan_stage.strategies.items() if n in set(names)})
    ev = prob.evaluate(choice, Settings(n_microbatches=n_microbatches, zero=zero))
    return eager_terms(graph, layers, prob, prob.assignment(choice), ev, n_microbatches, zero, cm, zero_autocast,
                       compiled=compiled)


@pytest.mark.parametrize("n_microbatches", [1, 4])
@pytest.mark.parametrize("zero,zero_autocast,gathers_per_microbatch", [
    (0, False, None),      # DDP under autocast over fp32 weights: autocast copies every weight once a step
    (1, True, None),       # ZeRO-1 under the truth recipe: DDP, the same
    (3, True, 2),          # bench/truth's fsdp2: autocast over FSDP2's bf16 parameters, no-op casts
    (3, False, 2),         # autopar run's ZeRO-3: FSDP2's bf16 parameters, no autocast
    (1, False, 0),         # autopar run's ZeRO-1 (FSDP2): one gather a step
])
def test_weight_casts_by_who_casts_the_parameters(zero, zero_autocast, gathers_per_microbatch, n_microbatches):
    """The bf16 copy of the fp32 weights: autocast's (6 B per local parameter, once per step)
    where the blocks compute with fp32 parameters; none by autocast over FSDP2's bf16
    parameters, where FSDP2 casts its fp32 shard (about half the parameters on dp2) for every
    all-gather instead: ZeRO-3 twice per microbatch, ZeRO-1 once per step. The gradients'
    fp32 cast (6 B) and, after the first microbatch, their accumulation (18 B) stay. Closed
    form over the stage's parameters, per microbatch."""
    cl = load_cluster("dgx-h200", 1, 2)
    src = ModelSource("gpt:hidden=256,layers=3,heads=4,seq=128,vocab=1024")
    plan = build_3d(src, cl, 4 * n_microbatches, Config3D(2, 1, 1, 2, zero=zero))
    graph = src.graph(4)
    cm = ComputeModel(cl.gpu, plan.training.dtype)
    mesh = Mesh(cl, Submesh(1, 2), (2, 1))
    st = plan.stages[0]
    prob = StageProblem(graph, stage_nodes(graph, st.layers), mesh, cm)
    choice = prob.choice_from_names(dict(st.strategies))
    ev = prob.evaluate(choice, Settings(n_microbatches=n_microbatches, zero=zero))
    terms = eager_terms(graph, st.layers, prob, prob.assignment(choice), ev, n_microbatches, zero, cm,
                        zero_autocast, compiled=False)
    # every GPU holds all parameters (dp2) and optimizes about half (the shard FSDP2 gathers)
    p, shard = ev.param_elems, ev.param_elems_zero
    assert p == graph.param_count and 0.5 * p <= shard < 0.52 * p
    b = n_microbatches
    if gathers_per_microbatch is None:
        weight_bytes = 6 * p / b                       # autocast: every local parameter once a step
    elif gathers_per_microbatch:
        weight_bytes = 6 * shard * gathers_per_microbatch      # FSDP2: the shard, every gather
    else:
        weight_bytes = 6 * shard / b                   # FSDP2's ZeRO-1/2: the shard, once a step
    bw = cm.stream_bytes_per_s * eager.ADAMW_STREAM_SHARE
    expected_s = ((6 + 18 * (b - 1)) / b * p + weight_bytes) / bw
    assert terms.precision_casts_s == pytest.approx(expected_s, rel=1e-9)
    # the step carries it once per microbatch (evaluate's breakdown, "precision_casts")
    ev_plan = evaluate(plan, graph, cl, eager=True, zero_autocast=zero_autocast, compiled=False)
    assert ev_plan.predicted.breakdown_s["precision_casts"] == pytest.approx(b * expected_s, rel=1e-9)


@pytest.mark.parametrize("family,column_linears", [("gpt", 4), ("llama", 5)])
def test_tp_input_gradients_all_reduced_per_linear_in_fp32(family, column_linears):
    """DTensor's tensor parallelism all-reduces each column-parallel linear's input gradient on
    its own, in fp32 under autocast (the norm's output it reads is fp32): per block GPT's q, k,
    v, fc1 and Llama's wq, wk, wv, w1, w3, as the H200 tp profiles count them, where the graph
    prices one bf16 all-reduce per norm output (two per block), and the vocab-split head's.
    Oracle: the eager terms' change to the communication is that difference, from the ring
    all-reduce's price."""
    from autopar.costmodel.collectives import all_reduce_s
    h, seq, mb, layers = 256, 128, 2, 3
    spec = (f"gpt:hidden={h},layers={layers},heads=4,seq={seq},vocab=1024" if family == "gpt" else
            f"llama:hidden={h},layers={layers},heads=4,kv_heads=2,seq={seq},vocab=1024")
    cl = load_cluster("dgx-h200", 1, 2)
    src = ModelSource(spec)
    plan = build_3d(src, cl, mb, Config3D(1, 2, 1, mb))
    graph = src.graph(mb)
    cm = ComputeModel(cl.gpu, plan.training.dtype)
    st = plan.stages[0]
    mesh = Mesh(cl, Submesh(1, 2), (st.logical_mesh[0], st.logical_mesh[1]))
    terms = _stage_terms(graph, st.layers, st, mesh, cm, 1, 0)
    tp_axis = mesh.axis(2 if st.logical_mesh[1] == 2 else 1)
    grad_bf16 = mb * seq * h * 2                  # one block input's gradient, bf16 as the graph counts it
    per_block = (column_linears * all_reduce_s(2 * grad_bf16, tp_axis)      # fp32, one per linear
                 - 2 * all_reduce_s(grad_bf16, tp_axis))                     # the graph's: one per norm
    # Megatron's vocab-split head is column-parallel too, reading the final norm's fp32 output
    head = all_reduce_s(2 * grad_bf16, tp_axis) - all_reduce_s(grad_bf16, tp_axis)
    assert per_block > 0 and head > 0
    assert terms.comm_delta_s == pytest.approx(layers * per_block + head, rel=1e-9)


@pytest.mark.parametrize("zero_autocast", [False, True])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_stage_eager_terms_are_the_sum_of_its_layers(zero, zero_autocast):
    """The planner adds the eager terms layer by layer (search/layer_solver.py), the evaluator
    per stage: the same numbers, so `autopar plan` and `autopar evaluate` agree. Both ZeRO
    recipes: `autopar run`'s FSDP2 with bf16 parameters (no autocast: no fp32 residual stream,
    the eager step only drops the graph's saved logits) and autocast over FSDP2 (the truth
    harness's)."""
    cl = load_cluster("dgx-h200", 1, 2)
    src = ModelSource("gpt:hidden=256,layers=3,heads=4,seq=128,vocab=1024")
    plan = build_3d(src, cl, 4, Config3D(2, 1, 1, 2, zero=zero))
    graph = src.graph(4)
    cm = ComputeModel(cl.gpu, plan.training.dtype)
    mesh = Mesh(cl, Submesh(1, 2), (2, 1))
    st = plan.stages[0]
    whole = _stage_terms(graph, st.layers, st, mesh, cm, plan.training.n_microbatches, zero, zero_autocast)
    parts = [_stage_terms(graph, (li, li + 1), st, mesh, cm, plan.training.n_microbatches, zero, zero_autocast)
             for li in range(*st.layers)]
    bf16 = zero >= 1 and not zero_autocast
    assert whole.device_s > 0 and whole.cross_entropy_peak_bytes > 0
    assert (whole.residual_stash_bytes > 0) == (not bf16) and (whole.autocast_cache_bytes == 0 or not bf16)
    assert (whole.ddp_bytes > 0) == (zero == 0 or zero_autocast and zero < 3) and (whole.fsdp_root_bytes > 0) == (zero >= 3)
    assert (whole.param_state_delta_bytes != 0) == (zero in (1, 2) and not zero_autocast)
    # FSDP2's blocks: their collectives partly hidden, fp32 reduce-scatters, the compute slowed
    assert (whole.comm_overlap_s > 0) == (zero >= 3) and (whole.comm_delta_s != 0) == (zero >= 3)
    for field in ("fwd_s", "bwd_s", "cross_entropy_s", "precision_casts_s", "host_fwd_s", "host_bwd_s",
                  "grad_bucket_s", "residual_stash_bytes", "inputs_fp32_extra_bytes", "cross_entropy_peak_bytes",
                  "ddp_bytes", "ddp_rebuild_bytes", "autocast_cache_bytes", "fsdp_root_bytes", "comm_delta_s",
                  "comm_overlap_s",
                  "param_state_delta_bytes"):
        assert getattr(whole, field) == pytest.approx(sum(getattr(p, field) for p in parts), rel=1e-9), field


def test_a_ddp_stage_compiled_is_the_sum_of_its_layers():
    """The same over a DDP stage (dp2, no ZeRO) compiled per block (`autopar run --compile`; by
    default DDP stays eager, eager.COMPILED_BY_ENGINE): the planner's layers and the evaluator's
    stage price it alike, and the default (None) prices it eager."""
    cl = load_cluster("dgx-h200", 1, 2)
    src = ModelSource("gpt:hidden=256,layers=3,heads=4,seq=128,vocab=1024")
    plan = build_3d(src, cl, 4, Config3D(2, 1, 1, 2))
    graph = src.graph(4)
    cm = ComputeModel(cl.gpu, plan.training.dtype)
    mesh = Mesh(cl, Submesh(1, 2), (2, 1))
    st = plan.stages[0]
    n = plan.training.n_microbatches
    whole = _stage_terms(graph, st.layers, st, mesh, cm, n, 0, compiled=True)
    assert whole != _stage_terms(graph, st.layers, st, mesh, cm, n, 0)
    assert _stage_terms(graph, st.layers, st, mesh, cm, n, 0, compiled=None) == \
        _stage_terms(graph, st.layers, st, mesh, cm, n, 0, compiled=False)
    parts = [_stage_terms(graph, (li, li + 1), st, mesh, cm, n, 0, compiled=True) for li in range(*st.layers)]
    for field in ("fwd_s", "bwd_s", "host_fwd_s", "host_bwd_s", "residual_stash_bytes", "ddp_bytes"):
        assert getattr(whole, field) == pytest.approx(sum(getattr(p, field) for p in parts), rel=1e-9), field


def test_planner_stage_costs_include_the_eager_terms():
    """Each candidate's per-stage time (the DP's cells, built from the layer solutions) is the
    evaluator's forward + backward of that stage, eager terms included."""
    cl = load_cluster("dgx-h200", 1, 2)
    job = SearchJob(ModelSource("gpt:hidden=256,layers=3,heads=4,seq=128,vocab=1024"), cl, 8, "1f1b", None,
                    cl.gpu.training_dtype(None), 1, 10.0, "highs", "ilp", eager=True)
    prop = job.propose(2, SearchStats())
    checked = 0
    for cand in prop.candidates:
        plan = job.simulate(prop, cand)
        assert plan.predicted.memory_breakdown_bytes["allocator_reserve"] > 0     # simulated as eager too
        for k, st in enumerate(plan.stages):
            if st.recompute == "none":
                assert cand.stage_time_s[k] == pytest.approx(st.fwd_s + st.bwd_s, rel=1e-9), plan.config.label
                checked += 1
    assert checked > 0


def test_eager_stash_drops_the_logits_the_graph_saves_for_the_loss():
    """The graph saves the logits for the loss (a bf16 stand-in for the log-softmax output); the
    eager step keeps none of them, its fp32 log-softmax output being part of the loss's 10 B
    working set: the head layer's eager stash is the final norm's fp32 input less the logits."""
    assert eager.loss_stash_bytes(100.0) == -100.0
    cl = load_cluster("dgx-h200", 1, 1)
    src = ModelSource("gpt:hidden=256,layers=2,heads=4,seq=128,vocab=1024")
    plan = build_3d(src, cl, 2, Config3D(1, 1, 1, 2))
    graph = src.graph(2)
    cm = ComputeModel(cl.gpu, plan.training.dtype)
    mesh = Mesh(cl, Submesh(1, 1), (1, 1))
    last = len(graph.layers) - 1
    terms = _stage_terms(graph, (last, last + 1), plan.stages[0], mesh, cm, 1, 0)
    tokens, hidden, vocab = 2 * 128, 256, 1024
    # the final norm's input is the fp32 residual stream (+2 B over bf16), the logits 2 B each
    assert terms.residual_stash_bytes == pytest.approx(2 * tokens * hidden - 2 * tokens * vocab)
    # at the log-softmax backward: its fp32 output and incoming gradient, the bf16 logits' gradient
    assert terms.cross_entropy_peak_bytes == pytest.approx((4 + 4 + 2) * tokens * vocab)


@pytest.mark.parametrize("spec, copies", [
    ("gpt:hidden=256,layers=2,heads=4,seq=128,vocab=1024", 2),      # ln1 -> q, k, v; ln2 -> fc1
    ("llama:hidden=256,layers=2,heads=4,kv_heads=2,ffn=512,seq=128,vocab=1024", 3),  # wq, wk, wv; w1, w3
])
def test_eager_block_stash_holds_a_bf16_input_copy_per_linear(spec, copies):
    """Counted by hand from the zoo's blocks under autocast on fp32 weights: each of the two
    norms saves its fp32 input (+2 B over the graph's bf16), and every linear a norm feeds
    casts the norm's fp32 output to bf16 and saves its own copy, where the graph saves one:
    GPT's ln1 feeds q, k and v (2 copies more), Llama's attention norm wq, wk, wv and its MLP
    norm w1, w3 (3 more). 2 B each per hidden element and token."""
    assert eager.autocast_input_copies_bytes(100.0, 3) == 400.0
    assert eager.autocast_input_copies_bytes(100.0, 1) == eager.autocast_input_copies_bytes(100.0, 0) == 0.0
    cl = load_cluster("dgx-h200", 1, 1)
    src = ModelSource(spec)
    plan = build_3d(src, cl, 2, Config3D(1, 1, 1, 2))
    graph = src.graph(2)
    cm = ComputeModel(cl.gpu, plan.training.dtype)
    mesh = Mesh(cl, Submesh(1, 1), (1, 1))
    terms = _stage_terms(graph, (1, 2), plan.stages[0], mesh, cm, 1, 0)
    tokens, hidden = 2 * 128, 256
    assert terms.residual_stash_bytes == pytest.approx((2 * 2 + 2 * copies) * tokens * hidden)


@pytest.mark.parametrize("zero", [1, 2])
def test_zero12_state_is_fsdp2s(zero):
    """`autopar run` shards ZeRO-1/2 with FSDP2 and bf16 parameters: per GPU 16 B per sharded
    parameter (fp32 weights, gradients, moments) and 2 B per parameter of unsharded bf16 weights,
    no DDP buckets, no autocast cache (counted by hand; gpt-1.3b dp2 zero1 mb8 x2 allocates
    26.75 GiB, of which this is 12.27). ZeRO-1 over several microbatches accumulates unsharded
    fp32 gradients (4 B per parameter) and reduce-scatters once per step: its sharded fp32
    gradients are absent at the activation peak but reserved in FSDP2's gradient pool, outside
    the compute stream's pool that holds the unsharded ones (gpt-6.7b auto mb4 on 2 H200s:
    98.3 GiB reserved = 83.2 allocated x 1.03 + a 12.5 GiB pool). DDP (ZeRO-0) keeps its 4 B of
    buckets (and its first ones at step 2's activation peak, 4 B more); so does the truth
    harness's recipe (zero_autocast), which ran no ZeRO-1/2."""
    assert eager.fsdp_zero12(zero, True) and not eager.fsdp_zero12(zero, False)
    assert not eager.fsdp_zero12(0, True) and not eager.fsdp_zero12(3, True)
    assert not eager.fsdp_zero12(zero, True, zero_autocast=True)
    assert eager.fsdp_zero12_state_bytes(100.0, 50.0, zero, 1) == 2 * 100 + 16 * 50
    accumulated = 4 * 100 if zero == 1 else 0
    assert eager.fsdp_zero12_state_bytes(100.0, 50.0, zero, 4) == 2 * 100 + 16 * 50 + accumulated
    cl = load_cluster("dgx-h200", 1, 2)
    src = ModelSource("gpt:hidden=256,layers=3,heads=4,seq=128,vocab=1024")
    graph = src.graph(4)
    for z in (0, zero):
        plan = build_3d(src, cl, 16, Config3D(2, 1, 1, 4, zero=z))
        cm = ComputeModel(cl.gpu, plan.training.dtype)
        r = evaluate_stage(graph, cl, plan.stages[0], plan.training, cm, eager=True)
        e, ez = r.ev.param_elems, r.ev.param_elems_zero
        assert e / 2 <= ez < e          # sharded over dp2 (a few small tensors whole)
        if z == 0:
            assert r.ddp_bucket_bytes == pytest.approx(4 * e) and r.autocast_cache_bytes == pytest.approx(2 * e)
            assert r.ddp_rebuild_bytes == pytest.approx(4 * e)
        else:
            assert plan.training.n_microbatches > 1
            assert r.param_state_bytes == pytest.approx(2 * e + 16 * ez + (4 * e if z == 1 else 0))
            assert r.ddp_bucket_bytes == 0.0 and r.ddp_rebuild_bytes == 0.0 and r.autocast_cache_bytes == 0.0
            # the sharded gradients: in the pool all step, absent at the peak under ZeRO-1 only
            assert r.grad_pool_bytes == pytest.approx(4 * ez)
            assert r.grads_absent_bytes == pytest.approx(4 * ez if z == 1 else 0.0)
            # reserved = the compute stream's pool at its peak x (1 + f) + the gradient pool;
            # under ZeRO-1 the allocated peak holds none of the pool, under ZeRO-2 all of it
            p = evaluate(plan, graph, cl, eager=True).prediction
            compute_pool = p.peak_allocated_bytes - (0.0 if z == 1 else 4 * ez)
            assert p.peak_reserved_bytes == pytest.approx(max(
                compute_pool * (1 + eager.RESERVE_FRACTION_EXPANDABLE) + 4 * ez,
                p.peak_allocated_bytes + eager.loss_segment_bytes(r.cross_entropy_peak_bytes)))


def test_loss_segment_in_the_reserve():
    """The allocator reserves at least one fp32 logits tensor over the peak allocated
    (single-llama-1b s8192 mb4 with full recomputation: reserved - allocated is one, 15.66 GiB);
    where the fraction gives more, the fraction."""
    assert eager.loss_segment_bytes(10 * 1000.0) == pytest.approx(4 * 1000.0)
    f = eager.reserve_fraction(expandable=True)
    assert eager.reserved_bytes(100.0, False, 0.0, loss_segment=50.0) == pytest.approx(150.0)
    assert eager.reserved_bytes(100.0, False, 0.0, loss_segment=1.0) == pytest.approx(100 * (1 + f))
    tokens, vocab = 32768, 128256
    seg = eager.loss_segment_bytes(eager.CROSS_ENTROPY_PEAK_BYTES_PER_LOGIT * tokens * vocab)
    assert seg / 2**30 == pytest.approx(15.66, abs=0.01)


def _fsdp2_schedule_delay_s(n_blocks, fwd_s, bwd_s, ag_fwd_s, ag_bwd_s, rs_s):
    """The reference: FSDP2's step of `n_blocks` equal blocks on two streams, op by op, less its
    compute. One NCCL stream in issue order: forward, the gathers one after the other (at most
    two blocks unsharded: a gather starts once the block two before it has computed); backward,
    gather(L-1) and the prefetched gather(L-2), then per block i from the last: its compute
    (after its gather), its reduce-scatter (after its compute), and the gather of block i - 2
    that block i - 1's pre-backward hook prefetches."""
    L = n_blocks
    nccl = 0.0
    c_end: list[float] = []
    for i in range(L):
        start = max(nccl, c_end[i - 2] if i >= 2 else 0.0)
        nccl = start + ag_fwd_s
        c_end.append(max(c_end[-1] if c_end else 0.0, nccl) + fwd_s)
    t = c_end[-1]
    gathered = {L - 1: t + ag_bwd_s}
    nccl = gathered[L - 1]
    if L >= 2:
        nccl += ag_bwd_s
        gathered[L - 2] = nccl
    compute = t
    for i in range(L - 1, -1, -1):
        compute = max(compute, gathered[i]) + bwd_s
        nccl = max(nccl, compute) + rs_s
        if i - 2 >= 0:
            nccl += ag_bwd_s
            gathered[i - 2] = nccl
    end = max(compute, nccl)
    return end - L * (fwd_s + bwd_s)


@pytest.mark.parametrize("fwd_s, bwd_s, ag_s, rs_s", [
    (1.0, 2.0, 0.3, 0.6),      # all hidden but the ends
    (1.0, 2.0, 1.5, 1.0),      # gathers outlast the forward, gather + reduce-scatter the backward
    (0.2, 0.4, 1.0, 2.0),      # communication-bound
    (1.0, 2.0, 0.9, 1.5),      # backward just over
])
def test_fsdp_block_exposure_against_the_two_stream_schedule(fwd_s, bwd_s, ag_s, rs_s):
    """Summed over the blocks, eager.fsdp_block_comm_s is the two-stream schedule's delay in the
    forward and bounds it from above in the backward by at most twice a block's steady-state
    backward delay (it charges every block's, where the schedule's first two backward blocks
    wait only for the unprefetched gather)."""
    for L in (2, 3, 8, 24):
        model = 0.0
        for i in range(L):
            f, b, hidden = eager.fsdp_block_comm_s(fwd_s, bwd_s, ag_s, ag_s, rs_s, first=i == 0, last=i == L - 1)
            assert hidden >= 0 and f + b + hidden == pytest.approx(2 * ag_s + rs_s)
            model += f + b
        sim = _fsdp2_schedule_delay_s(L, fwd_s, bwd_s, ag_s, ag_s, rs_s)
        steady_bwd = max(0.0, ag_s + rs_s - bwd_s)
        assert sim - 1e-9 <= model <= sim + 2 * steady_bwd + 1e-9, (L, model, sim)


def test_fsdp_block_exposure_closed_form():
    # all hidden: nothing exposed
    assert eager.fsdp_block_comm_s(1.0, 2.0, 0.5, 0.5, 1.0) == (0.0, 0.0, pytest.approx(2.0))
    # the forward's gather outlasts its compute by 0.5, the backward's gather + reduce-scatter by 1
    assert eager.fsdp_block_comm_s(1.0, 2.0, 1.5, 1.0, 2.0) == (pytest.approx(0.5), pytest.approx(1.0),
                                                                pytest.approx(3.0))
    # the first block: its forward gather and its reduce-scatter; the last: its backward gather
    assert eager.fsdp_block_comm_s(1.0, 2.0, 0.5, 0.5, 1.0, first=True) == (0.5, 1.0, pytest.approx(0.5))
    assert eager.fsdp_block_comm_s(1.0, 2.0, 0.5, 0.5, 1.0, last=True) == (0.0, 0.5, pytest.approx(1.5))
    # a lone block is both: nothing hides
    assert eager.fsdp_block_comm_s(1.0, 2.0, 0.5, 0.5, 1.0, first=True, last=True) == (0.5, 1.5, 0.0)
    assert eager.comm_overlap_s(2.0) == pytest.approx(2.0 * eager.COMM_OVERLAP_SLOWDOWN)


@pytest.mark.slow
def test_fsdp_exposed_comm_against_the_measured():
    data = json.loads(CORPUS.read_text())
    measured = {r["id"]: r for r in data["runs"]}
    ids = {r["id"] for r in data["runs"] if predict.usable(r) and r["strategy"] == "fsdp2"
           and r["gpu_busy_s"] - r["breakdown_s"]["exposed_comm"] >= 0.9 * r["step_s"]
           and r["gpu_busy_s"] <= 1.05 * r["step_s"]}
    assert len(ids) >= 5
    for r in predict.run(CORPUS, ids)["rows"]:
        m = measured[r["id"]]["breakdown_s"]["exposed_comm"]
        assert abs(r["predicted_breakdown_s"]["exposed_comm"] - m) <= FSDP_EXPOSED_MAX_S, (r["id"], m)


# ---- published runs (bench/calibration, issue 13 part 3) ------------------------------------------
# bench/calibration/published.py evaluated every mappable run of ../shared/calibration/
# published_runs.json as a hand-made plan and stored each row's job and prediction in PUBLISHED.
# The bars hold the stored errors per (set, GPU family); the replay re-evaluates a few stored jobs
# through the harness's own evaluation (no runs file needed: the row keeps its job) and requires
# today's model to predict what was stored, so the bars cannot silently describe another model.

PUBLISHED = ROOT / "bench/results/published_eval_2026-12-02d.json"
_pspec = importlib.util.spec_from_file_location("published_harness", ROOT / "bench/calibration/published.py")
assert _pspec is not None and _pspec.loader is not None
published = importlib.util.module_from_spec(_pspec)
sys.modules[_pspec.name] = published     # its dataclasses look their module up while being made
_pspec.loader.exec_module(published)

# (set, family): (median |error|, max |error|) of predicted tokens/s per GPU, the achieved values
# with half a point of room (bench/calibration/FINDINGS.md, sections 9 to 14). The target
# (8% / 20%) is met by held-out V100 in median only. Before unfused attention (every run flash):
# held-out A100 10.2% / 74.5%, V100 32.2% / 79.5%; fit V100 48.1% / 108.9%. Before the gradient
# sync in buckets (section 10): fit V100 12.0% / 35.6%, held-out H100 25.3% / 45.4%, V100 8.9% / 29.7%.
# Before ZeRO-2/3 per FSDP unit (section 11): fit A100 11.2% / 78.4%, fit H100 27.3% / 76.1%,
# held-out A100 9.7% / 64.7%, held-out H100 16.7% / 24.6%. MPT's Triton attention kernel (section
# 12) moves only MPT's rows (fit set). Megatron's fp32 loss (section 13, published_eval_2026-12-01d):
# fit V100 15.8% / 38.1% -> 14.2% / 33.9%, held-out A100 9.8% -> 10.1%, H100 15.5% / 31.9% -> 14.4% /
# 20.4%, V100 5.4% -> 6.0%. (e) is the same model re-run after the fused-Adam optimizer
# step (d no longer replays; fit H100 11.5% -> 11.6%; section 14). PUBLISHED (2026-12-02) prices
# the memory-bound ops on the H100 profile's rows of their kind and size (compute.memory_bound_s;
# A100 and V100 have no profile) and takes COMM_OVERLAP_SLOWDOWN refitted on the H200 corpus
# under that pricing (0.565 -> 0.501, shared with the data-parallel buckets here): fit A100 6.9%
# -> 6.6%, fit H100 11.6% / 33.0% -> 11.7% / 33.1% (10.9% / 32.5% with the kinds alone),
# held-out H100 14.4% / 20.4% -> 13.8% / 19.8%, held-out V100 max 49.4% -> 52.5% (OneFlow's
# dp4 tp8 row, already optimistic: its overlapped gradient sync slows the backward less).
# PUBLISHED (2026-12-02b) reruns, under full recomputation, only the blocks (not the embedding,
# the head and the loss), and for torchtitan's runs only what torch's early stop reruns
# (evaluator.evaluate's checkpoint_early_stop): fit V100 14.2% / 33.9% -> 15.0% / 36.5%, held-out
# A100 10.1% / 64.6% -> 10.2% / 65.2%, held-out V100 6.0% / 52.5% -> 6.4% / 53.8% (rows that were
# optimistic already, no longer charged the head's forward twice). PUBLISHED (2026-12-02c) runs the
# blocks' tensor-parallel collectives beside their linears' GEMMs where a run states
# --tp-comm-overlap (Megatron-Core's table; evaluate's tp_comm_overlap, the hidden part at
# COMM_OVERLAP_SLOWDOWN): held-out H100 13.8% -> 10.7% (7.1B +11.4 -> +15.0%, 16B -3.7 -> +2.7%,
# 32B -16.3 -> -6.3%); no other row moves. PUBLISHED (2026-12-02d) takes COMM_OVERLAP_SLOWDOWN
# refitted on the H200 corpus under the eager kernels priced by kind (0.501 -> 0.521; the hidden
# part of every overlapped collective slows the compute a little more): fit H100 11.8% -> 11.5%,
# held-out H100 10.7% / 19.8% -> 11.0% / 19.7% (7.1B +15.0 -> +14.5%, 16B +2.7 -> +2.0%, 32B
# -6.3 -> -7.4%), held-out V100 max 53.8% -> 52.8%; 74 rows move by more than 0.1 point.
PUBLISHED_PINNED: dict[tuple[str, str], tuple[float, float]] = {
    ("fit", "A100"): (0.071, 0.660),        # achieved 6.6% / 65.5% (n 151); 8.1% / 79.3% before MPT's Triton attention
    ("fit", "H100"): (0.122, 0.336),        # 11.7% / 33.1% (70); 30.0% / 60.3% before MPT's Triton attention
    ("fit", "V100"): (0.155, 0.370),        # 15.0% / 36.5% (12): no per-tensor latency to hide optimism
    ("held_out", "A100"): (0.107, 0.657),   # 10.2% / 65.2% (126)
    ("held_out", "H100"): (0.115, 0.203),   # 11.0% / 19.7% (4): Megatron-Core, SP, ZeRO-1 and TP overlap as stated
    ("held_out", "V100"): (0.069, 0.543),   # 6.4% / 53.8% (16): OneFlow's 2d rows, section 10
}
# One stored row per kind: unfused attention with dropout (V100, DLPerf), unfused without (BLOOM),
# unfused under selective recomputation and SP (Korthikanti), Triton flash (MPT), ZeRO-3 and ZeRO-2 per
# FSDP unit across nodes (MPT H100), ZeRO-3 per tensor (SC21, DeepSpeed), one block in two
# recomputed (torchtitan), SP with ZeRO-1 and overlapped tensor-parallel collectives (Megatron-Core)
PUBLISHED_REPLAY = ("dlperf-megatron-2d_8x1x1_16_1536x16", "bloom-bench-02-21-18b-h14336-l6-nh64-dp1-tp8-pp1-mbs2-gbs512-r2",
                    "korth-t5-22b-selsp", "mpt-a100-40gb-bf16-1b-s2048-n32-mb10-ga1",
                    "mpt-h100-80gb-bf16-7b-s2048-n512-mb6-ga1", "mpt-h100-80gb-bf16-1b-s2048-n128-mb12-ga1",
                    "sc21-t2-zero3-175b-n384", "tt-a100-llama-2-13b-n64-lb2-ac-selective-layer", "mcore-h100-16b")


def _published_rows() -> list[dict]:
    return [r for r in json.loads(PUBLISHED.read_text())["rows"] if r.get("evaluated") and "error" in r]


def test_published_errors_within_pinned_bars():
    by: dict[tuple[str, str], list[float]] = {}
    for r in _published_rows():
        by.setdefault((r["set"], r["gpu_family"]), []).append(abs(r["error"]))
    assert set(PUBLISHED_PINNED) <= set(by)
    for key, (med, mx) in PUBLISHED_PINNED.items():
        errs = sorted(by[key])
        assert statistics.median(errs) <= med and errs[-1] <= mx, (key, statistics.median(errs), errs[-1])


def test_published_rows_replay_with_the_current_model():
    rows = {r["id"]: r for r in _published_rows()}
    groups: dict[tuple, list[dict]] = {}
    for rid in PUBLISHED_REPLAY:
        job = dict(rows[rid]["job"], what_if={}, eager=None)
        groups.setdefault((job["model"], job["seq"], job["dtype"]), []).append(job)
    for (spec, seq, dtype), jobs in groups.items():
        for res in published.evaluate_group((spec, seq, dtype, jobs)):
            assert "skip" not in res, res
            stored = rows[res["id"]]["predicted"]
            # the time to 0.5%: the commit that stored published_eval_2026-12-01c.json (0d5fb8d)
            # gives another machine's CPU mcore-h100-16b 0.88209 s against its 0.88329 (-0.14%) and
            # mpt-h100-7b 1.16816 against 1.16831, with the same torch, numpy, networkx and
            # highspy versions (tried), so most likely a stage ILP's pick among near-equal
            # optima; the memory does not move
            assert res["predicted"]["step_time_s"] == pytest.approx(stored["step_time_s"], rel=5e-3), res["id"]
            assert res["predicted"]["peak_memory_bytes"] == pytest.approx(stored["peak_memory_bytes"], rel=1e-9)


def test_published_attention_follows_the_source():
    for r in _published_rows():
        impl, dropout, basis = published.attention_of({"source": r["source"]})
        spec = r["job"]["model"]
        assert ("attn=unfused" in spec) == (impl == "unfused"), (r["id"], spec)
        assert ("attn=triton" in spec) == (impl == "triton"), (r["id"], spec)
        assert (f"attn_dropout={dropout:g}" in spec) == (impl == "unfused" and dropout > 0), (r["id"], spec)
        assert any(f.startswith("attention ") for f in r["flags"]) == ("inferred" in basis), r["id"]


def test_residual_table_groups_as_brute_force():
    rows = _published_rows()
    keys = ["gpu_family", "tp", "head_dim_mod8"]
    lines = published.residual_table(rows, keys)
    # brute force: every distinct combination, its errors collected by a scan per group
    combos = {tuple(published.row_key(r, k) for k in keys) for r in rows}
    assert len(lines) == 1 + len(combos)
    for combo in combos:
        errs = [r["error"] for r in rows if tuple(published.row_key(r, k) for k in keys) == combo]
        label = " ".join(f"{k}={v}" for k, v in zip(keys, combo))
        line = next(ln for ln in lines[1:] if ln.split()[:len(keys)] == label.split())
        n, med, mx, sgn = line.split()[len(keys):]
        assert int(n) == len(errs)
        assert float(med.rstrip("%")) == pytest.approx(100 * statistics.median(abs(e) for e in errs), abs=0.05)
        assert float(mx.rstrip("%")) == pytest.approx(100 * max(abs(e) for e in errs), abs=0.05)
        assert float(sgn.rstrip("%")) == pytest.approx(100 * statistics.median(errs), abs=0.05)


def test_row_key_head_dim_from_the_trace_or_the_spec():
    rows = {r["id"]: r for r in _published_rows()}
    bloom = rows["bloom-bench-02-26-182b-h13824-l78-nh128-dp8-tp8-pp6-mbs4-gbs2048"]
    assert published.row_key(bloom, "head_dim") == 13824 // 128 == 108       # traced (A100: shapes stored)
    assert published.row_key(bloom, "head_dim_mod8") == 4
    assert published.row_key(bloom, "tp") == 8 and published.row_key(bloom, "framework") == "Megatron-DeepSpeed"
    h100 = rows["mcore-h100-16b"]                                               # profiled GPU: from the spec
    assert "attn" not in h100["stages"][0]
    kv = dict(x.split("=") for x in h100["model"].partition(":")[2].split(",") if "=" in x)
    assert published.row_key(h100, "head_dim") == int(kv["hidden"]) // int(kv["heads"])
    with pytest.raises(KeyError):
        published.row_key(bloom, "no_such_key")


@pytest.mark.parametrize("zero", [1, 3])
def test_zero_recipe_loss_and_residual_stream(zero):
    """`autopar run`'s ZeRO (FSDP2's bf16 parameters, no autocast) computes the loss on bf16
    logits in bf16: 6 B per logit at its peak (log-softmax output, NLL gradient, the logits'
    gradient, 2 B each), against 10 B under autocast, the truth harness's recipe; and keeps no
    fp32 residual stream (no fp32-norm traffic in the blocks' time). Counted by hand: a rank's
    logits are its 2 sequences x 128 tokens x 1024 vocabulary."""
    cl = load_cluster("dgx-h200", 1, 2)
    src = ModelSource("gpt:hidden=256,layers=3,heads=4,seq=128,vocab=1024")
    graph = src.graph(4)
    plan = build_3d(src, cl, 16, Config3D(2, 1, 1, 4, zero=zero))
    cm = ComputeModel(cl.gpu, plan.training.dtype)
    logits = 2 * 128 * 1024
    run = evaluate_stage(graph, cl, plan.stages[0], plan.training, cm, eager=True)
    harness = evaluate_stage(graph, cl, plan.stages[0], plan.training, cm, eager=True, zero_autocast=True)
    assert run.cross_entropy_peak_bytes == pytest.approx(6 * logits)
    assert harness.cross_entropy_peak_bytes == pytest.approx(10 * logits)
    # two microbatches: autocast caches its casts of fp32 weights (ZeRO-1 as DDP under
    # autocast), none of FSDP2's bf16 ones (ZeRO-3)
    assert run.autocast_cache_bytes == 0.0
    assert (harness.autocast_cache_bytes > 0) == (zero < 3)
    assert run.stash_bytes < harness.stash_bytes and run.fwd_s < harness.fwd_s


@pytest.mark.parametrize("spec, norm_bytes", [
    # LayerNorm is on autocast's fp32 list: it casts the bf16 stream to fp32 and saves that copy
    # (2 norms x 2 B over the graph's bf16), its fp32 output cast by q, k, v and fc1 (2 copies more)
    ("gpt:hidden=256,layers=2,heads=4,seq=128,vocab=1024", 2 * 2 + 2 * 2),
    # RMSNorm has no autocast rule in torch 2.11: bf16 in, bf16 out, the graph's count
    ("llama:hidden=256,layers=2,heads=4,kv_heads=2,ffn=512,seq=128,vocab=1024", 0),
])
def test_harness_fsdp2_block_stash_under_autocast_over_bf16_params(spec, norm_bytes):
    """bench/truth's fsdp2 recipe (truth.py setup_fsdp2: FSDP2's bf16 parameters and autocast on
    top, zero_autocast) counted by hand per hidden element and token of one block: the
    embedding's output and so the residual stream are bf16, so a norm runs in fp32 only where
    autocast casts it (eager.norm_runs_fp32); over fp32 weights both families' norms would
    (test_eager_block_stash_holds_a_bf16_input_copy_per_linear: GPT 8 B, Llama 10 B)."""
    cl = load_cluster("dgx-h200", 1, 2)
    src = ModelSource(spec)
    plan = build_3d(src, cl, 4, Config3D(2, 1, 1, 2, zero=3))
    graph = src.graph(4)
    cm = ComputeModel(cl.gpu, plan.training.dtype)
    mesh = Mesh(cl, Submesh(1, 2), (2, 1))
    harness = _stage_terms(graph, (1, 2), plan.stages[0], mesh, cm, 1, 3, zero_autocast=True)
    tokens, hidden = 2 * 128, 256
    assert harness.residual_stash_bytes == pytest.approx(norm_bytes * tokens * hidden)
    assert eager.norm_runs_fp32("layer_norm", True) and not eager.norm_runs_fp32("rms_norm", True)
    assert eager.norm_runs_fp32("rms_norm", False)


def test_harness_fsdp2_llama_slope_against_the_measured():
    """The measured oracle of eager.norm_runs_fp32: fsdp2-llama-3b s4096 mb1 -> mb4 allocates
    16.33 GiB per microbatch of 4,096 tokens per rank; the model gave 19.62 (10 B per hidden
    element and token per block more: fp32 RMSNorm inputs and their outputs' copies) while it
    priced the autocast-over-fp32 count, and now gives 16.31."""
    rows = {r["id"]: r for r in json.loads(CORPUS.read_text())["runs"]}
    ids = ("fsdp2-llama-3b-s4096-mb1", "fsdp2-llama-3b-s4096-mb4")
    measured = [rows[i]["peak_allocated_bytes"] for i in ids]
    predicted = [predict.predict_row(rows[i])["predicted_peak_allocated_bytes"] for i in ids]
    slope_measured = (measured[1] - measured[0]) / 3
    slope_predicted = (predicted[1] - predicted[0]) / 3
    assert slope_measured / 2**30 == pytest.approx(16.33, abs=0.01)
    assert slope_predicted == pytest.approx(slope_measured, rel=0.01)
    assert all(p >= m for p, m in zip(predicted, measured))     # never short


DDP_MEMORY = ROOT / "bench/results/ddp_memory_h200_2026-12-01.json"


def _ddp_peaks_bytes(model: str, seq: int, mb: int) -> tuple[float, float]:
    """(a run's, the steps' after step 2) predicted peak allocated of native DDP (the truth
    harness's recipe) of `model` at `mb` sequences per GPU, as predict.py prices a ddp row."""
    spec = next(r["model_spec"] for r in json.loads(CORPUS.read_text())["runs"]
                if r["model"] == model and r["seq"] == seq)
    cluster = load_cluster("dgx-h200", 1, 2)
    src = predict._SOURCES.setdefault(spec, ModelSource(spec, seq=seq))
    plan = build_3d(src, cluster, 2 * mb, Config3D(2, 1, 1, mb))
    graph = src.graph(2 * mb)
    run, steady = (evaluate(plan, graph, cluster, eager=True, zero_autocast=True, compiled=False,
                            ddp_rebuild=rebuild).predicted.peak_allocated_bytes for rebuild in (True, False))
    return run, steady


@pytest.mark.parametrize("model, mb", [("gpt-1.3b", 1), ("gpt-1.3b", 4), ("gpt-2.6b", 4)])
def test_ddp_rebuild_transient_against_the_measured_steps(model, mb):
    """Native DDP on one H200 (bench/truth/ddp_memory.py; DDP's memory per GPU does not depend on
    the world size): a back-to-back loop ("loop") peaks in step 2, whose activation peak holds
    DDP's first buckets beside the rebuilt ones, and the steps after it 4 B/param lower; the
    model's two peaks are those within 1% (in this call; it is a race, see the next test). The
    other sequences peak at one of the two: with a
    1 s pause after step 1 ("gap") at the steady one, with truth.py's syncs ("harness") at
    either (a race: NCCL's watchdog releases step 1's all-reduce before step 2's rebuild or not)."""
    runs = {r["variant"]: r for r in json.loads(DDP_MEMORY.read_text())
            if r.get("model") == model and r.get("mb") == mb}
    loop = runs["loop"]
    n = loop["n_params"]
    per_step = {int(k): v for k, v in loop["per_step_peak_bytes"].items()}
    after = max(v for k, v in per_step.items() if k >= 3)
    # the first buckets, 4 B/param, at step 2's loss backward (its activation peak) over step 3's
    head_bwd = {r["step"]: r["peak"] for r in loop["rows"] if r["label"] == "head_bwd"}
    assert head_bwd[2] - head_bwd[3] == pytest.approx(4 * n, rel=0.01)
    run, steady = _ddp_peaks_bytes(model, loop["seq"], mb)
    assert run == pytest.approx(per_step[2], rel=0.01) and steady == pytest.approx(after, rel=0.01)
    assert runs["gap"]["peak_bytes"] == pytest.approx(steady, rel=0.01)
    assert min(abs(runs["harness"]["peak_bytes"] / x - 1) for x in (run, steady)) <= 0.01


DDP_MEMORY_SECOND = ROOT / "bench/results/ddp_memory_h200_2026-12-01b.json"


@pytest.mark.parametrize("model", ["gpt-1.3b", "gpt-6.7b"])
def test_ddp_rebuild_transient_is_a_race_the_model_never_loses(model):
    """A second call (bench/results/ddp_memory_h200_2026-12-01b.json): back to back, native DDP had
    no transient this time, and autopar's bucket-view DDP ("view_loop") had it on gpt-1.3b and
    not on gpt-6.7b. Every native run peaks at one of the model's two peaks (within 1%), and no
    run, native or autopar's, peaks above the model's run peak: a plan priced so fits step 2."""
    runs = {r["variant"]: r for r in json.loads(DDP_MEMORY_SECOND.read_text()) if r.get("model") == model}
    run, steady = _ddp_peaks_bytes(model, runs["loop"]["seq"], runs["loop"]["mb"])
    for variant in ("gap", "loop"):
        assert min(abs(runs[variant]["peak_bytes"] / x - 1) for x in (run, steady)) <= 0.01
    assert all(r["peak_bytes"] <= run * 1.001 for r in runs.values())
    if model == "gpt-1.3b":     # autopar's DDP with the transient: the model's run peak
        assert runs["view_loop"]["peak_bytes"] == pytest.approx(run, rel=0.01)


def test_fsdp_no_sync_microbatches_pay_the_measured_share():
    """ZeRO-1 on FSDP2 accumulating: all microbatches but the last skip the reduce-scatter and pay
    HOST_FSDP_NO_SYNC_SHARE of FSDP2's per-microbatch host part, the median over the stored
    tiny-width sweeps of (zero1 - bf16) / (zero3 - bf16) per block (bench/host_ops.py --recipes)."""
    doc = json.loads((ROOT / "bench/results/host_ops_recipes_h200_2026-12-01.json").read_text())

    def per_block_s(run: dict, name: str) -> float:
        fit = run["per_block"][name]
        return fit["forward_s"]["per_block_s"] + fit["backward_s"]["per_block_s"]

    shares = [(per_block_s(run, f"{m} fsdp2-zero1") - per_block_s(run, f"{m} bf16"))
              / (per_block_s(run, f"{m} fsdp2-zero3") - per_block_s(run, f"{m} bf16"))
              for run in doc["runs"] for m in ("gpt", "llama-gqa")]
    assert abs(eager.HOST_FSDP_NO_SYNC_SHARE - statistics.median(shares)) < 5e-4
    cm = ComputeModel(load_cluster("dgx-h200", 1, 2).gpu, "bf16")
    full = sum(eager.host_s(0, 0, 10, tp=False, fsdp=True, cm=cm, n_microbatches=4))
    quiet = sum(eager.host_s(0, 0, 10, tp=False, fsdp=True, cm=cm, n_microbatches=4, fsdp_accumulating=True))
    assert full - quiet == pytest.approx(10 * eager.HOST_FSDP_S_PER_BLOCK * 3 / 4 * (1 - eager.HOST_FSDP_NO_SYNC_SHARE))
    # the last microbatch always reduce-scatters: one microbatch has none to skip
    assert eager.host_s(0, 0, 10, tp=False, fsdp=True, cm=cm, fsdp_accumulating=True) == \
        eager.host_s(0, 0, 10, tp=False, fsdp=True, cm=cm)
