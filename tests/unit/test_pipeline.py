"""Pipeline schedules: the simulator against closed forms, and its structural invariants."""

from __future__ import annotations

import random

import pytest

from autopar.costmodel.memory import inflight
from autopar.evaluation.pipeline import closed_form_latency_s, device_order, simulate

F, B = 1.0, 2.0


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 4, 5, 8, 16, 32])
def test_bubble_equal_stages(schedule, p, m):
    s = simulate([F] * p, [B] * p, m, schedule)
    # idle / (idle + busy): (p-1) idle slots against m busy ones, never above 1
    assert s.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    assert 0.0 <= s.bubble_fraction < 1.0
    assert s.makespan_s == pytest.approx((m + p - 1) * (F + B), rel=1e-12)
    assert closed_form_latency_s([F + B] * p, m) == pytest.approx(s.makespan_s, rel=1e-12)


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("v", [2, 3, 4])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_bubble_interleaved(p, v, k):
    m = k * p
    s = simulate([F / v] * (p * v), [B / v] * (p * v), m, "interleaved", chunks=v)
    assert s.bubble_fraction == pytest.approx((p - 1) / (m * v + p - 1), abs=1e-12)
    assert s.makespan_s == pytest.approx(m * (F + B) + (p - 1) * (F + B) / v, rel=1e-12)


def test_gpipe_with_p2p_closed_form():
    """GPipe, equal stages, transfer c each way: (m + p - 1)(f + b) + 2 (p - 1) c."""
    for p, m, c in [(2, 4, 0.1), (4, 8, 0.25), (3, 3, 1.5)]:
        s = simulate([F] * p, [B] * p, m, "gpipe", p2p_s=[c] * (p - 1))
        assert s.makespan_s == pytest.approx((m + p - 1) * (F + B) + 2 * (p - 1) * c, rel=1e-12)


def test_closed_form_vs_simulation_unequal_stages():
    """Alpa's T = sum t + (B - 1) max t is exact for GPipe when forward and backward are
    proportional per stage, and an upper bound of the simulated 1F1B makespan (1F1B overlaps a
    slow stage's backward with the others' forwards)."""
    rng = random.Random(0)
    for _ in range(200):
        p, m = rng.randint(1, 6), rng.randint(1, 12)
        t = [rng.uniform(0.5, 2.0) for _ in range(p)]
        f, b = [x / 3 for x in t], [2 * x / 3 for x in t]
        cf = closed_form_latency_s(t, m)
        assert simulate(f, b, m, "gpipe").makespan_s == pytest.approx(cf, rel=1e-12)
        one = simulate(f, b, m, "1f1b").makespan_s
        assert one <= cf + 1e-9
        assert one >= max(m * max(t), sum(t)) - 1e-9


def _check_invariants(s, fwd, bwd, comm, p, v):
    end = {(o.kind, o.stage, o.microbatch): o.end_s for o in s.ops}
    n = len(fwd)
    for o in s.ops:
        assert o.end_s - o.start_s == pytest.approx(fwd[o.stage] if o.kind == "F" else bwd[o.stage])
        assert o.stage % p == o.device
        if o.kind == "F" and o.stage > 0:
            assert o.start_s >= end[("F", o.stage - 1, o.microbatch)] + comm[o.stage - 1] - 1e-12
        if o.kind == "B":
            assert o.start_s >= end[("F", o.stage, o.microbatch)] - 1e-12
            if o.stage < n - 1:
                assert o.start_s >= end[("B", o.stage + 1, o.microbatch)] + comm[o.stage] - 1e-12
    for r in range(p):
        ops = sorted((o for o in s.ops if o.device == r), key=lambda o: o.start_s)
        for a, b in zip(ops, ops[1:]):
            assert b.start_s >= a.end_s - 1e-12            # one op at a time per device
        assert s.busy_s[r] == pytest.approx(sum(o.end_s - o.start_s for o in ops))


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 3)])
def test_schedule_invariants_random_stages(schedule, v):
    rng = random.Random(1)
    for _ in range(30):
        p = rng.randint(2, 5)
        m = p * rng.randint(1, 3)
        n = p * v
        fwd = [rng.uniform(0.1, 1) for _ in range(n)]
        bwd = [rng.uniform(0.1, 2) for _ in range(n)]
        comm = [rng.uniform(0, 0.3) for _ in range(n - 1)]
        s = simulate(fwd, bwd, m, schedule, comm, chunks=v)
        assert len(s.ops) == 2 * m * n
        _check_invariants(s, fwd, bwd, comm, p, v)


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 4)])
@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_evaluator_inflight_matches_simulated_peak(schedule, v, p, k):
    """The activation memory the evaluator charges (microbatches in flight per pipeline rank)
    is the peak of forwards-minus-backwards the simulated schedule reaches."""
    m = k * p
    s = simulate([F / v] * (p * v), [B / v] * (p * v), m, schedule, chunks=v)
    for r in range(p):
        cur = peak = 0
        for o in sorted((o for o in s.ops if o.device == r), key=lambda o: o.start_s):
            cur += 1 if o.kind == "F" else -1
            peak = max(peak, cur)
        assert peak / v == pytest.approx(inflight(schedule, r, p, m, v))


def test_1f1b_device_order():
    assert device_order("1f1b", 0, 3, 4) == [("F", 0, 0), ("F", 0, 1), ("F", 0, 2), ("B", 0, 0), ("F", 0, 3),
                                             ("B", 0, 1), ("B", 0, 2), ("B", 0, 3)]
    assert device_order("1f1b", 2, 3, 2) == [("F", 0, 0), ("B", 0, 0), ("F", 0, 1), ("B", 0, 1)]


def test_schedule_errors():
    with pytest.raises(ValueError, match="multiple of the pipeline depth"):
        simulate([1.0] * 4, [2.0] * 4, 3, "interleaved", chunks=2)
    with pytest.raises(ValueError, match="unknown schedule"):
        simulate([1.0] * 2, [2.0] * 2, 2, "zigzag")
    with pytest.raises(ValueError, match="do not split into 2 chunks"):
        simulate([1.0] * 3, [2.0] * 3, 2, "interleaved", chunks=2)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_host_bound_pipeline_closed_form(schedule, p, m):
    """CPUs slower than their GPUs launch every op back to back and never wait for each other:
    each device's last launch ends at m (hf + hb); the last backwards then run down the stages,
    one device backward each. No bubble is paid on the host."""
    hf, hb = 3 * F, 3 * B
    s = simulate([F] * p, [B] * p, m, schedule, host_fwd_s=[hf] * p, host_bwd_s=[hb] * p)
    assert s.makespan_s == pytest.approx(m * (hf + hb) + (p - 1) * B, rel=1e-12)


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2)])
def test_host_faster_than_every_op_changes_nothing(schedule, v):
    """A launch no longer than its op never delays the GPU (the host's clock is at most the sum
    of the device's earlier op times): the schedule is the device-only one, op for op."""
    rng = random.Random(7)
    for _ in range(30):
        p = rng.choice([2, 3, 4])
        m = p * rng.choice([1, 2, 3])
        fwd = [rng.uniform(0.5, 2.0) for _ in range(p * v)]
        bwd = [rng.uniform(1.0, 4.0) for _ in range(p * v)]
        comm = [rng.uniform(0.0, 0.5) for _ in range(p * v - 1)]
        hf = [rng.uniform(0.0, 1.0) * f for f in fwd]
        hb = [rng.uniform(0.0, 1.0) * b for b in bwd]
        base = simulate(fwd, bwd, m, schedule, comm, chunks=v)
        host = simulate(fwd, bwd, m, schedule, comm, chunks=v, host_fwd_s=hf, host_bwd_s=hb)
        assert host.ops == base.ops


def test_host_times_per_stage_are_checked():
    with pytest.raises(ValueError, match="host times are given for 1/2 stages"):
        simulate([1.0] * 2, [2.0] * 2, 2, "1f1b", host_fwd_s=[1.0], host_bwd_s=[1.0, 1.0])
