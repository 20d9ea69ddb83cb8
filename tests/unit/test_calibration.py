"""The cost model against measured training steps (issue 13): the H200 corpus of
bench/truth (bench/results/truth_h200_2026-11-30.json) replayed through the current model by
bench/truth/predict.py, no GPU needed.

The bars are the issue's targets where the model meets them and the achieved numbers where it
does not yet (so they cannot regress): see PINNED and MARGIN_MIN (memory safety, predicted peak
reserved >= measured peak reserved, is not met on every row yet).
The default run replays a subset whose graphs trace quickly (every strategy, both families);
`-m slow` replays the whole corpus, checks the strategies' ranking and refits the constants.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from autopar.costmodel import eager
from autopar.costmodel.compute import ComputeModel
from autopar.hardware.presets import load_cluster

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
# Achieved on 2026-11-30 (targets: median 8% time, 10% memory, max 20%), with ~1 point of room.
PINNED = {  # set: (time median, time max, memory median, memory max)
    "all": (0.09, 0.34, 0.12, 0.57),
    "fit": (0.10, 0.34, 0.125, 0.57),
    "held_out": (0.08, 0.16, 0.10, 0.22),
}
# Memory safety: predicted peak reserved >= measured on every row but the FSDP2 outlier; five
# rows (three ddp gpt-1.3b, ddp llama-3b mb2, pp gpt-1.3b mb4) are short by at most 1.3%.
MARGIN_MIN = -0.015
SUBSET_TIME_MAX = 0.34
UNSAFE_OK = set(predict.RESERVE_OUTLIERS)


@pytest.fixture(scope="module")
def subset():
    return predict.run(CORPUS, SUBSET)


def test_subset_rows_within_bars(subset):
    rows = subset["rows"]
    assert {r["id"] for r in rows} == SUBSET
    for r in rows:
        assert abs(r["step_error"]) <= SUBSET_TIME_MAX, (r["id"], r["step_error"])
        assert r["memory_error"] >= MARGIN_MIN or r["id"] in UNSAFE_OK, (r["id"], r["memory_error"])


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
    # a norm feeding q, k and v: forward 8 + 3 * 6 B per element, backward twice that
    fwd, bwd = eager.autocast_fp32_stream_s(1e9, 3, cm)
    assert (fwd, bwd) == (pytest.approx(26e9 / bw), pytest.approx(52e9 / bw))
    fwd, bwd = eager.host_s(10, 0, 0, tp=False, fsdp=False, cm=cm)
    assert fwd + bwd == pytest.approx(10 * eager.HOST_S_PER_LINEAR)
    fwd, bwd = eager.host_s(0, 0, 4, tp=True, fsdp=True, cm=cm)
    assert fwd + bwd == pytest.approx(4 * (eager.HOST_TP_S_PER_BLOCK + eager.HOST_FSDP_S_PER_BLOCK))
    assert eager.reserved_bytes(100.0, zero3=False) == pytest.approx(100 * (1 + eager.RESERVE_FRACTION))


@pytest.mark.slow
def test_whole_corpus_against_pinned_bars():
    res = predict.run(CORPUS)
    for name, (t_med, t_max, m_med, m_max) in PINNED.items():
        s = res["summary"][name]
        assert s["time_median"] <= t_med and s["time_max"] <= t_max, (name, s)
        assert s["memory_median"] <= m_med and s["memory_max"] <= m_max, (name, s)
    short = {r["id"] for r in res["rows"] if r["memory_error"] < MARGIN_MIN}
    assert short <= UNSAFE_OK, short
    # The strategies' ranking on 2 GPUs: all groups but the two whose measured times per token
    # lie within 7% of each other (see the README table).
    assert sum(not g["same"] for g in res["ranking"]) <= 2, res["ranking"]


@pytest.mark.slow
def test_fitted_constants_match_the_corpus():
    for name, value in predict.fit(CORPUS).items():
        assert getattr(eager, name) == pytest.approx(value, rel=0.01), name
