"""The fast pipeline simulator against the op-by-op one it replaced (kept here verbatim as
reference_simulate): bit for bit with record_ops (and on irregular times), within 1e-12 relative
where record_ops=False jumps over the steady state."""

from __future__ import annotations

import functools
import math
import random
import re
from fractions import Fraction

import pytest

from autopar.evaluation import pipeline
from autopar.evaluation.pipeline import Op, Schedule, device_order, simulate

REL = 1e-12


# The simulator as it was before the fast paths (autopar/evaluation/pipeline.py), verbatim.
def reference_simulate(fwd_s: list[float], bwd_s: list[float], n_microbatches: int, schedule: str = "1f1b",
             p2p_s: list[float] | None = None, chunks: int = 1,
             host_fwd_s: list[float] | None = None, host_bwd_s: list[float] | None = None) -> Schedule:
    """fwd_s / bwd_s: per virtual stage (len = devices * chunks), per microbatch.
    p2p_s[g]: transfer time between virtual stage g and g+1 (each direction).

    host_fwd_s / host_bwd_s (per virtual stage, per microbatch): the CPU time to launch an op.
    Each device's CPU launches its ops in schedule order, one after another, and never waits for
    the GPU or for the other stages (eager pipelining: receives are stream waits, not host
    waits); an op's kernels cannot start before its launch starts nor end before it ends. So a
    host-bound pipeline runs at its CPUs' pace without idling them in the bubble, while the GPUs
    still wait for their inputs. Without them the schedule is the device's alone."""
    n_stages = len(fwd_s)
    if n_stages % chunks:
        raise ValueError(f"{n_stages} stages do not split into {chunks} chunks per device")
    p = n_stages // chunks
    comm = list(p2p_s) if p2p_s is not None else [0.0] * max(0, n_stages - 1)
    orders = [device_order(schedule if chunks == 1 or schedule == "interleaved" else schedule, r, p,
                           n_microbatches, chunks) for r in range(p)]
    hf = list(host_fwd_s) if host_fwd_s is not None else [0.0] * n_stages
    hb = list(host_bwd_s) if host_bwd_s is not None else [0.0] * n_stages
    if len(hf) != n_stages or len(hb) != n_stages:
        raise ValueError(f"host times are given for {len(hf)}/{len(hb)} stages, the schedule has {n_stages}")
    host = [0.0] * p         # when each device's CPU is free to launch its next op
    pos = [0] * p
    free = [0.0] * p
    busy = [0.0] * p
    done: dict[tuple[str, int, int], float] = {}
    ops: list[Op] = []
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for r in range(p):
            while pos[r] < len(orders[r]):
                kind, chunk, mb = orders[r][pos[r]]
                g = chunk * p + r
                if kind == "F":
                    dep = ("F", g - 1, mb) if g > 0 else None
                    ready = 0.0 if dep is None else done.get(dep)
                    if ready is not None and dep is not None:
                        ready += comm[g - 1]
                    dur = fwd_s[g]
                    launch = hf[g]
                else:
                    own = done.get(("F", g, mb))
                    dep = ("B", g + 1, mb) if g < n_stages - 1 else None
                    nxt = own if dep is None else done.get(dep)
                    if own is None or nxt is None:
                        ready = None
                    else:
                        ready = max(own, nxt + (comm[g] if dep is not None else 0.0))
                    dur = bwd_s[g]
                    launch = hb[g]
                if ready is None:
                    break
                start = max(free[r], ready, host[r])
                host[r] += launch
                end = max(start + dur, host[r])
                free[r] = end
                busy[r] += dur
                done[(kind, g, mb)] = end
                ops.append(Op(r, g, mb, kind, start, end))
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"pipeline schedule {schedule!r} deadlocked (p={p}, m={n_microbatches}, v={chunks})")
    return Schedule(max(free), tuple(ops), tuple(busy))


def _ends(ref: Schedule, n_stages: int, p: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Stage and device ends the way the evaluator read them off the op list."""
    stage: dict[int, float] = {}
    for op in ref.ops:
        stage[op.stage] = max(stage.get(op.stage, 0.0), op.end_s)
    device = tuple(max((op.end_s for op in ref.ops if op.device == r), default=0.0) for r in range(p))
    return tuple(stage.get(g, 0.0) for g in range(n_stages)), device


def _random_case(rng: random.Random, schedule: str | None = None, max_m: int = 64):
    schedule = schedule or rng.choice(["gpipe", "1f1b", "interleaved"])
    v = rng.randint(2, 4) if schedule == "interleaved" else 1
    p = rng.randint(1, 8)
    m = p * rng.randint(1, max(1, max_m // p)) if schedule == "interleaved" else rng.randint(1, max_m)
    n = p * v
    style = rng.random()
    if style < 0.25:        # equal stages: ties everywhere
        fwd, bwd = [1.0] * n, [2.0] * n
    elif style < 0.4:       # a slow stage among equal ones
        fwd, bwd = [0.3] * n, [0.6] * n
        k = rng.randrange(n)
        fwd[k], bwd[k] = 0.5, 1.1
    else:
        fwd = [rng.uniform(0.1, 1) for _ in range(n)]
        bwd = [rng.uniform(0.1, 2) for _ in range(n)]
    comm = [rng.choice([0.0, rng.uniform(0, 0.3)]) for _ in range(n - 1)] if rng.random() < 0.7 else None
    kw: dict = {"chunks": v}
    if rng.random() < 0.6:      # launch times from far below to far above the op times, per stage
        scale = rng.choice([0.1, 0.5, 1.0, 2.0, 4.0])
        kw["host_fwd_s"] = [rng.uniform(0, scale) * f for f in fwd]
        kw["host_bwd_s"] = [rng.uniform(0, scale) * b for b in bwd]
    return (fwd, bwd, m, schedule, comm), kw


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * max(abs(a), abs(b))


def _check(args, kw) -> None:
    ref = reference_simulate(*args, **kw)
    n, p = len(args[0]), len(args[0]) // kw.get("chunks", 1)
    stage_end, device_end = _ends(ref, n, p)
    full = simulate(*args, **kw)
    assert full.ops == ref.ops                      # same ops, same order, same floats
    assert full.makespan_s == ref.makespan_s and full.busy_s == ref.busy_s
    assert full.stage_end_s == stage_end and full.device_end_s == device_end
    fast = simulate(*args, **{**kw, "record_ops": False})
    assert fast.ops == ()
    assert fast.busy_s == ref.busy_s
    assert _close(fast.makespan_s, ref.makespan_s), (fast.makespan_s, ref.makespan_s)
    assert all(_close(a, b) for a, b in zip(fast.stage_end_s, stage_end)) and len(fast.stage_end_s) == n
    assert all(_close(a, b) for a, b in zip(fast.device_end_s, device_end)) and len(fast.device_end_s) == p
    assert _close(fast.bubble_fraction, ref.bubble_fraction) or abs(fast.bubble_fraction - ref.bubble_fraction) < 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_random_schedules_match_reference(seed):
    rng = random.Random(seed)
    for _ in range(60):
        _check(*_random_case(rng))


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved"])
def test_long_steady_schedules_match_reference(schedule):
    """Many microbatches, so that the jump skips many rounds."""
    rng = random.Random(11)
    for _ in range(8):
        args, kw = _random_case(rng, schedule, max_m=256)
        _check(args, kw)


def _counting(monkeypatch) -> list[int]:
    """Count the ops the fast paths simulate one by one."""
    ran = [0]
    plain, host = pipeline._run_plain, pipeline._run_host

    def count_plain(recs, *a):
        ran[0] += len(recs)
        return plain(recs, *a)

    def count_host(recs, *a):
        ran[0] += len(recs)
        return host(recs, *a)

    monkeypatch.setattr(pipeline, "_run_plain", count_plain)
    monkeypatch.setattr(pipeline, "_run_host", count_host)
    return ran


@pytest.mark.parametrize("p,v,m,schedule", [(16, 2, 512, "interleaved"), (32, 1, 1024, "1f1b"), (8, 1, 512, "1f1b"),
                                            (8, 2, 512, "interleaved")])
@pytest.mark.parametrize("host", ["none", "light", "bound"])
def test_planner_sizes_jump_and_match(monkeypatch, p, v, m, schedule, host):
    """gpt-39b's shapes, a planner-like profile (similar stages, heavier ends, transfers): the
    steady state is skipped and the results still agree. 'bound': launches slower than the GPU,
    so the launch clocks set the pace; 'light': they trail it, so the jump must prove they
    never decide a start or end."""
    rng = random.Random(p * m + v)
    n = p * v
    fwd = [0.0176 * (1 + rng.uniform(-0.01, 0.01)) for _ in range(n)]
    fwd[0] *= 1.02
    fwd[-1] *= 1.16
    bwd = [2 * f for f in fwd]
    comm = [0.0107] * (n - 1)
    kw: dict = {"chunks": v}
    if host == "light":
        kw["host_fwd_s"] = [0.1 * f * (1 + rng.uniform(-0.1, 0.1)) for f in fwd]
        kw["host_bwd_s"] = [0.1 * b * (1 + rng.uniform(-0.1, 0.1)) for b in bwd]
    elif host == "bound":
        kw["host_fwd_s"] = [1.5 * f for f in fwd]
        kw["host_bwd_s"] = [1.5 * b for b in bwd]
    ran = _counting(monkeypatch)
    _check((fwd, bwd, m, schedule, comm), kw)
    assert 0 < ran[0] < 2 * n * m / 3          # the jump skipped most of the steady rounds


def test_equal_stages_jump_is_exact_closed_form(monkeypatch):
    """Equal stages, interleaved: makespan = m (f + b) + (p - 1)(f + b) / v, and the jump is taken."""
    p, v, m, f, b = 8, 2, 256, 1.0, 2.0
    ran = _counting(monkeypatch)
    s = simulate([f / v] * (p * v), [b / v] * (p * v), m, "interleaved", chunks=v, record_ops=False)
    assert ran[0] < 2 * p * v * m / 3
    assert s.makespan_s == pytest.approx(m * (f + b) + (p - 1) * (f + b) / v, rel=1e-12)


def test_irregular_times_stay_bit_for_bit():
    """Negative or non-finite times take the general path: every figure bit for bit."""
    rng = random.Random(5)
    for _ in range(40):
        args, kw = _random_case(rng)
        fwd, bwd, m, schedule, comm = args
        k = rng.randrange(len(fwd))
        fwd[k] = rng.choice([-0.5, math.inf, math.nan])
        ref = reference_simulate(fwd, bwd, m, schedule, comm, **kw)
        stage_end, device_end = _ends(ref, len(fwd), len(fwd) // kw["chunks"])
        for record in (True, False):
            s = simulate(fwd, bwd, m, schedule, comm, **kw, record_ops=record)
            assert repr(s.ops) == repr(ref.ops if record else ())      # repr: nan == nan
            assert repr((s.makespan_s, s.busy_s, s.stage_end_s, s.device_end_s)) == \
                repr((ref.makespan_s, ref.busy_s, stage_end, device_end))


def test_zero_microbatches():
    for schedule, v in [("gpipe", 1), ("1f1b", 1), ("interleaved", 2)]:
        ref = reference_simulate([1.0] * (3 * v), [2.0] * (3 * v), 0, schedule, chunks=v)
        for record in (True, False):
            s = simulate([1.0] * (3 * v), [2.0] * (3 * v), 0, schedule, chunks=v, record_ops=record)
            assert (s.makespan_s, s.busy_s, s.ops) == (ref.makespan_s, ref.busy_s, ref.ops)
            assert s.stage_end_s == (0.0,) * (3 * v) and s.device_end_s == (0.0,) * 3


@pytest.mark.parametrize("call", [
    lambda f: f([1.0] * 4, [2.0] * 4, 3, "interleaved", chunks=2),                       # m not a multiple of p
    lambda f: f([1.0] * 2, [2.0] * 2, 2, "zigzag"),                                      # unknown schedule
    lambda f: f([1.0] * 3, [2.0] * 3, 2, "interleaved", chunks=2),                       # stages do not split
    lambda f: f([1.0] * 2, [2.0] * 2, 2, "1f1b", host_fwd_s=[1.0], host_bwd_s=[1.0, 1.0]),
    lambda f: f([1.0] * 4, [2.0] * 4, 4, "1f1b", chunks=2),                              # deadlocks
    lambda f: f([1.0] * 4, [2.0] * 4, 4, "gpipe", chunks=2),                             # deadlocks
    lambda f: f([], [], 4, "1f1b"),                                                      # no stage at all
])
def test_errors_as_reference(call):
    with pytest.raises(Exception) as want:
        call(reference_simulate)
    for record in (True, False):
        with pytest.raises(want.type, match=re.escape(str(want.value))):
            call(functools.partial(simulate, record_ops=record))


def test_device_order_unchanged_for_layouts():
    """The layout's ops per device are device_order's, in its order."""
    for schedule, p, m, v in [("1f1b", 4, 9, 1), ("interleaved", 3, 6, 3), ("gpipe", 3, 4, 1)]:
        lay = pipeline._layout(schedule, p, m, v)
        for r in range(p):
            want = [(k, c * p + r, mb) for k, c, mb in device_order(schedule, r, p, m, v)]
            got = [("F" if rec[2] < p * v else "B", rec[2] % (p * v), rec[6] % m) for rec in lay.device_ops[r]]
            assert got == want


def test_op_is_still_the_public_record():
    s = simulate([1.0, 1.0], [2.0, 2.0], 2, "1f1b")
    assert isinstance(s.ops[0], Op) and s.ops[0] == Op(0, 0, 0, "F", 0.0, 1.0)


def _exact_makespan(fwd, bwd, m, schedule, comm, v, hf, hb) -> Fraction:
    """The same recurrence in exact arithmetic (every float is a fraction), one device at a time
    as far as its inputs allow."""
    n = len(fwd)
    p = n // v
    F = [Fraction(x) for x in fwd]
    Bw = [Fraction(x) for x in bwd]
    C = [Fraction(x) for x in comm]
    HF = [Fraction(x) for x in hf]
    HB = [Fraction(x) for x in hb]
    orders = [device_order(schedule, r, p, m, v) for r in range(p)]
    pos, free, host = [0] * p, [Fraction(0)] * p, [Fraction(0)] * p
    end: dict[tuple[str, int, int], Fraction] = {}
    while any(pos[r] < len(orders[r]) for r in range(p)):
        for r in range(p):
            while pos[r] < len(orders[r]):
                kind, chunk, mb = orders[r][pos[r]]
                g = chunk * p + r
                if kind == "F":
                    if g and ("F", g - 1, mb) not in end:
                        break
                    ready = end[("F", g - 1, mb)] + C[g - 1] if g else Fraction(0)
                    dur, launch = F[g], HF[g]
                else:
                    if ("F", g, mb) not in end or (g < n - 1 and ("B", g + 1, mb) not in end):
                        break
                    ready = end[("F", g, mb)]
                    if g < n - 1:
                        ready = max(ready, end[("B", g + 1, mb)] + C[g])
                    dur, launch = Bw[g], HB[g]
                start = max(free[r], ready, host[r])
                host[r] += launch
                free[r] = end[(kind, g, mb)] = max(start + dur, host[r])
                pos[r] += 1
    return max(free)


@pytest.mark.parametrize("schedule,p,v,m", [("interleaved", 8, 2, 128), ("1f1b", 8, 1, 256), ("1f1b", 3, 1, 200)])
@pytest.mark.parametrize("host", [False, True])
def test_jump_against_exact_arithmetic(monkeypatch, schedule, p, v, m, host):
    """The jump replaces the op-by-op float sums over the skipped rounds by one multiplication:
    against exact arithmetic it is as good as the op-by-op simulation (both within 1e-12)."""
    rng = random.Random(p * m)
    n = p * v
    fwd = [0.3 * (1 + rng.uniform(-0.01, 0.01)) for _ in range(n)]
    fwd[-1] *= 1.2      # one slowest stage (the LM head): the steady state sets in soon
    bwd = [2 * f for f in fwd]
    comm = [0.1] * (n - 1)
    hf = [0.2 * f for f in fwd] if host else [0.0] * n
    hb = [0.2 * b for b in bwd] if host else [0.0] * n
    exact = _exact_makespan(fwd, bwd, m, schedule, comm, v, hf, hb)
    ran = _counting(monkeypatch)
    fast = simulate(fwd, bwd, m, schedule, comm, chunks=v, host_fwd_s=hf, host_bwd_s=hb, record_ops=False)
    assert ran[0] < 2 * n * m
    ref = reference_simulate(fwd, bwd, m, schedule, comm, chunks=v, host_fwd_s=hf, host_bwd_s=hb)
    assert abs(Fraction(fast.makespan_s) - exact) <= Fraction(REL) * exact
    assert abs(Fraction(ref.makespan_s) - exact) <= Fraction(REL) * exact
