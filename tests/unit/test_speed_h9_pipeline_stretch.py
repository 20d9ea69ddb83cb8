"""The pipeline simulator's stretched layouts (pipeline._stretched: a long schedule's layout built
from a shorter one's, in time independent of the number of microbatches) against the layouts laid
out op by op (pipeline._layout, which the fast path read before): every field the fast path reads
equal, and every simulated figure equal to the bit with either layout."""

from __future__ import annotations

import math
import random

import pytest

from autopar.evaluation import pipeline
from autopar.evaluation.pipeline import simulate


def _shapes() -> list[tuple[str, int, int, int]]:
    out = []
    for p in (1, 2, 3, 4, 5, 7, 8):
        for m in range(0, 14 * p + 1):
            out.append(("1f1b", p, m, 1))
            for v in (1, 2, 3, 4):
                if m % p == 0:
                    out.append(("interleaved", p, m, v))
    return out


def _fields(lay: pipeline._Layout, n_ops_kinds: int) -> tuple:
    kinds = list(range(n_ops_kinds))      # busy_terms read the duration indices
    return (lay.n_ids, lay.deadlocked, lay.order, lay.bounds, lay.steady, lay.stage_last,
            [terms(kinds) for terms in lay.busy_terms])


@pytest.mark.parametrize("shape", _shapes() + [("1f1b", 64, 512, 1), ("1f1b", 13, 300, 1),
                                               ("interleaved", 16, 256, 3), ("interleaved", 12, 120, 2)])
def test_stretched_layout_is_the_layout(shape):
    schedule, p, m, v = shape
    full = pipeline._layout(schedule, p, m, v)
    stretched = pipeline._stretched(schedule, p, m, v)
    assert _fields(stretched, 2 * p * v) == _fields(full, 2 * p * v)
    if stretched.device_ops is None:      # stretched, not laid out
        assert m // p > pipeline._STRETCH_FROM_ROUNDS and stretched.steady is not None


def test_long_shapes_are_stretched(monkeypatch):
    """The planner's long schedules take the stretched layout: laid out for fewer microbatches."""
    laid: list[int] = []
    layout = pipeline._layout

    def recording(schedule, p, m, v):
        laid.append(m)
        return layout(schedule, p, m, v)

    monkeypatch.setattr(pipeline, "_layout", recording)
    for schedule, p, m, v in [("1f1b", 8, 512, 1), ("interleaved", 8, 512, 2), ("1f1b", 5, 103, 1)]:
        laid.clear()
        pipeline._stretched.cache_clear()
        pipeline._stretched(schedule, p, m, v)
        assert len(laid) == 1 and laid[0] < (pipeline._STRETCH_FROM_ROUNDS + 1) * p


def _case(rng: random.Random, schedule: str, p: int, v: int, m: int) -> tuple[tuple, dict]:
    n = p * v
    base = rng.uniform(0.5, 2.0)
    fwd = [base * rng.choice([1.0, rng.uniform(0.7, 1.5)]) for _ in range(n)]
    bwd = [f * rng.choice([2.0, rng.uniform(1.5, 3.0)]) for f in fwd]
    comm = [rng.choice([0.0, rng.uniform(0.0, 0.3)]) for _ in range(n - 1)]
    kw: dict = {"chunks": v}
    pace = rng.choice([None, 0.1, 0.9, 1.5])
    if pace is not None:
        kw["host_fwd_s"] = [pace * f * rng.uniform(0.9, 1.1) for f in fwd]
        kw["host_bwd_s"] = [pace * b * rng.uniform(0.9, 1.1) for b in bwd]
    return (fwd, bwd, m, schedule, comm), kw


def _figures(s: pipeline.Schedule) -> tuple:
    return (s.makespan_s, s.busy_s, s.stage_end_s, s.device_end_s, s.ops, s.bubble_fraction)


@pytest.mark.parametrize("seed", range(4))
def test_simulation_with_stretched_layouts_is_bit_for_bit(monkeypatch, seed):
    """Random stage times, transfers and launch clocks (none, trailing, near and above the GPU's
    pace), equal stages (where the jump is taken), tiny to long schedules of every kind."""
    rng = random.Random(seed)
    cases = []
    for _ in range(25):
        schedule = rng.choice(["gpipe", "1f1b", "1f1b", "interleaved"])
        p = rng.randint(1, 9)
        v = rng.randint(2, 4) if schedule == "interleaved" else 1
        m = rng.choice([0, 1, 2, p, 3 * p, rng.randint(7 * p, 24 * p)])
        if schedule == "interleaved":
            m = p * max(1, m // p)
        args, kw = _case(rng, schedule, p, v, m)
        shape = rng.random()
        if shape < 0.2:       # equal stages: the steady state repeats exactly
            args = ([1.0] * (p * v), [2.0] * (p * v), m, schedule, [0.1] * (p * v - 1))
        elif shape < 0.4:     # a planner's: near-equal stages, heavier ends (the jump is taken)
            fwd = [0.0176 * (1 + rng.uniform(-0.01, 0.01)) for _ in range(p * v)]
            fwd[-1] *= 1.16
            args = (fwd, [2 * f for f in fwd], m, schedule, [0.0107] * (p * v - 1))
        cases.append((args, kw))
    new = [_figures(simulate(*args, **kw, record_ops=False)) for args, kw in cases]
    # the layouts and the jump's test as they were
    monkeypatch.setattr(pipeline, "_stretched", pipeline._layout)
    monkeypatch.setattr(pipeline, "_jump", lambda states, *rest: _list_jump(states[-1].tolist(),
                                                                            [x.tolist() for x in states], *rest))
    old = [_figures(simulate(*args, **kw, record_ops=False)) for args, kw in cases]
    assert new == old


# pipeline._jump as it was, on lists (verbatim).
def _list_jump(cur: list[float], states: list[list[float]], clocks: list[list[float]], decided: list[list[bool]],
               host: list[float], rounds_left: int, use_host: bool) -> tuple[int, int, float, list[float]] | None:
    top = max(cur)
    tol = pipeline._SPREAD_ULPS * math.ulp(top)
    mid = len(cur) // 2
    for j in range(1, len(states)):
        periods = rounds_left // j
        if not periods:
            return None
        old = states[-1 - j]
        d0 = cur[0] - old[0]
        if abs(cur[-1] - old[-1] - d0) > 2 * tol or abs(cur[mid] - old[mid] - d0) > 2 * tol:
            continue        # cheap rejection before comparing all
        d = [x - y for x, y in zip(cur, old)]
        lo, hi = min(d), max(d)
        c = lo + (hi - lo) / 2
        drift = hi - c
        moves = [h - g for h, g in zip(host, clocks[-1 - j])] if use_host else []
        for r, hr in enumerate(moves):
            if abs(hr - c) <= tol:          # a launch clock that keeps pace
                drift = max(drift, abs(hr - c))
            elif hr > c or any(rnd[r] for rnd in decided[-j:]):     # one that may decide later
                drift = math.inf
        if drift <= tol and periods * drift <= pipeline._JUMP_REL * top:
            return periods, j, c, moves
    return None


def test_zero_launch_times_are_no_launch_times():
    """evaluate simulates the launch clocks only where some launch takes time: all zero, the
    schedule is the one without them, to the bit."""
    rng = random.Random(3)
    for _ in range(30):
        schedule = rng.choice(["gpipe", "1f1b", "interleaved"])
        p = rng.randint(1, 8)
        v = rng.randint(2, 3) if schedule == "interleaved" else 1
        m = p * rng.randint(1, 12)
        args, kw = _case(rng, schedule, p, v, m)
        kw.pop("host_fwd_s", None)
        kw.pop("host_bwd_s", None)
        zeros = [0.0] * (p * v)
        for record in (True, False):
            with_zeros = simulate(*args, **kw, host_fwd_s=zeros, host_bwd_s=zeros, record_ops=record)
            assert _figures(with_zeros) == _figures(simulate(*args, **kw, record_ops=record))
