"""Pipeline schedules, simulated op by op.

Each device runs its forward (F) and backward (B) ops in the order its schedule fixes; an op
starts when its device is free and its input has arrived (the previous stage's F, or the next
stage's B, plus the point-to-point transfer). The simulation gives the makespan, every op's
start and end (for Gantt charts), and so the bubble — closed forms are only the tests.

The planner simulates thousands of microbatches per candidate, so the ops live in flat lists
laid out once per shape (_layout), and without the op list (record_ops=False) the steady state
of 1F1B / interleaved schedules is jumped over (_run_fast says why that is exact).
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, reduce

import numpy as np


@dataclass(frozen=True)
class Op:
    device: int          # pipeline rank
    stage: int           # virtual stage = chunk * n_devices + device
    microbatch: int
    kind: str            # "F" or "B"
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Schedule:
    makespan_s: float
    ops: tuple[Op, ...]               # every op in simulation order; empty unless record_ops
    busy_s: tuple[float, ...]         # per device
    stage_end_s: tuple[float, ...] = ()     # per virtual stage: when its last op ends (0.0: none)
    device_end_s: tuple[float, ...] = ()    # per device: when its last op ends (0.0: none)

    @property
    def bubble_fraction(self) -> float:
        """The busiest device's share of the step spent idle: idle / (idle + busy), which is
        (p-1)/(m+p-1) for GPipe/1F1B with p equal stages and m microbatches, and
        (p-1)/(m*v+p-1) interleaved with v chunks per device."""
        busy = max(self.busy_s)
        # (max 0: without recorded ops the makespan is exact to 1e-12 relative, and may then
        # fall an ulp below a device's summed busy time)
        return max(0.0, self.makespan_s - busy) / self.makespan_s if self.makespan_s > 0 else 0.0


def device_order(schedule: str, rank: int, n_devices: int, n_microbatches: int,
                 chunks: int = 1) -> list[tuple[str, int, int]]:
    """The (kind, chunk, microbatch) sequence a device runs."""
    p, m = n_devices, n_microbatches
    if schedule == "gpipe":
        return [("F", 0, i) for i in range(m)] + [("B", 0, i) for i in range(m)]
    if schedule == "1f1b":
        warm = min(p - rank - 1, m)
        seq = [("F", 0, i) for i in range(warm)]
        f, b = warm, 0
        while f < m:
            seq.append(("F", 0, f)); f += 1
            seq.append(("B", 0, b)); b += 1
        seq += [("B", 0, i) for i in range(b, m)]
        return seq
    if schedule == "interleaved":
        v = chunks
        if m % p:
            raise ValueError(f"interleaved 1F1B needs the number of microbatches ({m}) to be a multiple "
                             f"of the pipeline depth ({p})")
        total = m * v

        def fwd_id(k):
            return (k // p) % v, (k // (p * v)) * p + k % p

        def bwd_id(k):
            return v - 1 - (k // p) % v, (k // (p * v)) * p + k % p

        warm = min((p - rank - 1) * 2 + (v - 1) * p, total)
        seq = [("F",) + fwd_id(k) for k in range(warm)]
        f, b = warm, 0
        while f < total:
            seq.append(("F",) + fwd_id(f)); f += 1
            seq.append(("B",) + bwd_id(b)); b += 1
        seq += [("B",) + bwd_id(k) for k in range(b, total)]
        return seq
    raise ValueError(f"unknown schedule {schedule!r}; use gpipe, 1f1b or interleaved")


# The simulator keeps each op's end time in a flat list indexed by op id: oid = di * m + microbatch,
# where di indexes the durations and launch times (forward of virtual stage g: g, backward: n + g),
# so the same op q microbatches later is oid + q. An op is the record (code, device, di, a, b, ci,
# oid); code 0: forward of stage 0 (no input); 1: forward after the previous stage's forward a and
# link ci; 2: backward of the last stage, after its own forward a; 3: backward after its own forward
# a and the next stage's backward b over link ci.
_Rec = tuple[int, int, int, int, int, int, int]

# The steady-state jump (_run_fast) takes the last j rounds' increments of the live end times (and
# of the launch clocks that keep pace) as one constant c when none is further from c than this many
# units in the last place of the latest end time, and when rounds skipped x that distance stays
# below _JUMP_REL of it (float rounding makes exact equality rare); otherwise it simulates on.
_SPREAD_ULPS = 64
_JUMP_REL = 2.0 ** -43     # ~1.1e-13
_MAX_PERIOD = 8            # rounds
# Python 3.12 made sum() of floats compensated; before, it adds left to right (and fast).
_SUM_IS_SEQUENTIAL = sys.version_info < (3, 12)


@dataclass(frozen=True)
class _Layout:
    """Where a schedule's ops go, independent of their times (cached per shape)."""
    n_ids: int
    deadlocked: bool
    device_ops: list[list[_Rec]] | None   # per device, its ops in its order; None in a stretched layout
    order: list[_Rec]          # every op, inputs first: the prefix, the rounds, the tail
    bounds: tuple[int, ...]    # order[bounds[t]:bounds[t + 1]] is round t, order[bounds[-1]:] the tail
    busy_terms: tuple[Callable[[list[float]], tuple[float, ...]], ...]   # per device: its ops' durations, in order
    stage_last: tuple[int, ...]                # per virtual stage, its last op, -1 if none
    # (t_a, t_b, q, live, last): after round t (t_a <= t < t_b) the ops are those of round t_a
    # shifted by (t - t_a) q microbatches, op for op on every device, and the end times still
    # needed at frontier t (after rounds < t; t_a <= t <= t_b) are those of `live` shifted alike;
    # last[r]: index in live of device r's last op at frontier t_b, -1 if it has run none.
    steady: tuple[int, int, int, tuple[int, ...], tuple[int, ...]] | None


def _advance(device_ops: list[list[_Rec]], pos: list[int], caps: list[int], done: bytearray) -> list[_Rec]:
    """Run, round robin over the devices as the reference sweep does, every op whose inputs are
    done, at most up to position caps[r] on device r; the ops in the order run."""
    out: list[_Rec] = []
    progressed = True
    while progressed:
        progressed = False
        for r, recs in enumerate(device_ops):
            i = i0 = pos[r]
            cap = caps[r]
            while i < cap:
                rec = recs[i]
                code = rec[0]
                if code == 1 or code == 2:
                    if not done[rec[3]]:
                        break
                elif code == 3 and not (done[rec[3]] and done[rec[4]]):
                    break
                done[rec[6]] = 1
                out.append(rec)
                i += 1
            if i > i0:
                pos[r] = i
                progressed = True
    return out


def _getter(indices: tuple[int, ...]) -> Callable[[list[float]], tuple[float, ...]]:
    if len(indices) == 1:
        return lambda values: (values[indices[0]],)
    return operator.itemgetter(*indices) if indices else lambda values: ()


@lru_cache(maxsize=16)     # a layout of 64K ops holds ~10 MB
def _layout(schedule: str, p: int, m: int, v: int) -> _Layout:
    n = p * v
    orders = [device_order(schedule, r, p, m, v) for r in range(p)]
    device_ops: list[list[_Rec]] = []
    for r, seq in enumerate(orders):
        recs: list[_Rec] = []
        for kind, chunk, mb in seq:
            g = chunk * p + r
            if kind == "F":
                recs.append((1, r, g, (g - 1) * m + mb, 0, g - 1, g * m + mb) if g > 0 else (0, r, 0, 0, 0, 0, mb))
            elif g < n - 1:
                recs.append((3, r, n + g, g * m + mb, (n + g + 1) * m + mb, g, (n + g) * m + mb))
            else:
                recs.append((2, r, n + g, g * m + mb, 0, 0, (n + g) * m + mb))
        device_ops.append(recs)
    n_ids = 2 * n * m
    stage_last = [-1] * n
    for recs in device_ops:
        for rec in recs:
            stage_last[rec[2] % n] = rec[6]     # in device order: the stage's last op wins
    busy_terms = tuple(_getter(tuple(rec[2] for rec in recs)) for recs in device_ops)
    lengths = [len(recs) for recs in device_ops]
    steady = None
    if _has_rounds(schedule, m):
        order, bounds, frontiers = _cut(device_ops, p, v, n_ids)
        deadlocked = len(order) < sum(lengths)
        if not deadlocked:
            steady = _steady(device_ops, order, bounds, frontiers, p, n_ids, stage_last)
    else:
        order = _advance(device_ops, [0] * p, lengths, bytearray(n_ids))
        bounds, deadlocked = (len(order),), len(order) < sum(lengths)
    return _Layout(n_ids, deadlocked, device_ops, order, bounds, busy_terms, tuple(stage_last), steady)


def _has_rounds(schedule: str, m: int) -> bool:
    return schedule in ("1f1b", "interleaved") and m > 0


@lru_cache(maxsize=8)
def _sweep(schedule: str, p: int, m: int, v: int) -> list[_Rec]:
    """The ops in the order the reference sweep runs them (the order of Schedule.ops)."""
    lay = _layout(schedule, p, m, v)
    if not _has_rounds(schedule, m):     # then the layout's order is the sweep's
        return lay.order
    assert lay.device_ops is not None
    return _advance(lay.device_ops, [0] * p, [len(recs) for recs in lay.device_ops], bytearray(lay.n_ids))


def _cut(device_ops: list[list[_Rec]], p: int, v: int, n_ids: int
         ) -> tuple[list[_Rec], tuple[int, ...], list[list[int]]]:
    """Cut a 1F1B / interleaved schedule into rounds of p microbatches: a device's steady part
    runs one forward and one backward per microbatch and chunk, so a round is 2 p v of its ops.
    Round 0 starts where a device has run its warm-up forwards (all before its first backward
    but one); _advance keeps every cut closed under the ops' inputs. Returns the ops as prefix,
    rounds and tail, where each round starts in that list, and each frontier's position per device."""
    step = 2 * p * v
    lengths = [len(recs) for recs in device_ops]
    start = []
    for recs in device_ops:
        first_b = next((i for i, rec in enumerate(recs) if rec[0] >= 2), len(recs))
        start.append(max(0, first_b - 1))
    done = bytearray(n_ids)
    pos = [0] * p
    order = _advance(device_ops, pos, start, done)
    bounds = [len(order)]
    frontiers = [pos[:]]
    t = 1
    while any(s + step * t < n_r for s, n_r in zip(start, lengths)):
        order += _advance(device_ops, pos, [min(s + step * t, n_r) for s, n_r in zip(start, lengths)], done)
        bounds.append(len(order))
        frontiers.append(pos[:])
        t += 1
    order += _advance(device_ops, pos, lengths, done)
    return order, tuple(bounds), frontiers


def _steady(device_ops: list[list[_Rec]], order: list[_Rec], bounds: tuple[int, ...], frontiers: list[list[int]],
            p: int, n_ids: int, stage_last: list[int]) -> tuple[int, int, int, tuple[int, ...], tuple[int, ...]] | None:
    """The longest stretch of rounds that are one another shifted by q = p microbatches, op for
    op, with the live end times shifted alike (_Layout.steady); None if there is no stretch of
    3 rounds. Checked here on the ops themselves rather than derived from the schedule's formulas."""
    q = p
    n_rounds = len(bounds) - 1
    per_dev = [[tuple(rec[6] for rec in recs[frontiers[t][r]:frontiers[t + 1][r]]) for r, recs in enumerate(device_ops)]
               for t in range(n_rounds)]
    same = [False] + [all(tuple(o - q for o in a) == b for a, b in zip(per_dev[t], per_dev[t - 1]))
                      for t in range(1, n_rounds)]
    # An op's end time is live at frontier u (after rounds < u) when it ran before u and an op of
    # round >= u reads it: its device's next op or an op taking its output.
    rd = [n_rounds] * n_ids
    for rec in order[:bounds[0]]:
        rd[rec[6]] = -1
    for t in range(n_rounds):
        for rec in order[bounds[t]:bounds[t + 1]]:
            rd[rec[6]] = t
    last_read = rd[:]
    for recs in device_ops:
        for i, rec in enumerate(recs):
            t = rd[rec[6]]
            if i:
                prev = recs[i - 1][6]
                if t > last_read[prev]:
                    last_read[prev] = t
            if rec[0]:
                if t > last_read[rec[3]]:
                    last_read[rec[3]] = t
                if rec[0] == 3 and t > last_read[rec[4]]:
                    last_read[rec[4]] = t
    born: list[list[int]] = [[] for _ in range(n_rounds + 2)]
    dies: list[list[int]] = [[] for _ in range(n_rounds + 2)]
    for recs in device_ops:
        for rec in recs:
            o = rec[6]
            if rd[o] < last_read[o]:
                born[rd[o] + 1].append(o)
                dies[last_read[o] + 1].append(o)
    live: set[int] = set()
    shape: list[tuple[int, ...]] = []     # live ids at frontier u, shifted back by u rounds
    for u in range(n_rounds + 1):
        live.update(born[u])
        live.difference_update(dies[u])
        shape.append(tuple(sorted(o - u * q for o in live)))
    needed = {o for o in stage_last if o >= 0} | {recs[-1][6] for recs in device_ops if recs}
    best: tuple[int, int] | None = None
    u = 0
    while u < n_rounds:
        # frontiers u..b: rounds u..b-1 alike and the live ids alike
        b = u
        while b < n_rounds and (b == u or same[b]) and shape[b + 1] == shape[u]:
            b += 1
        for o in needed:            # the ops read after the simulation must not be skipped
            if u <= rd[o] < b:
                b = rd[o]
        if b - u >= 3 and (best is None or b - u > best[1] - best[0]):
            best = (u, b)
        u = max(u + 1, b)
    if best is None:
        return None
    t_a, t_b = best
    tmpl = tuple(o + t_a * q for o in shape[t_a])
    index = {o: i for i, o in enumerate(tmpl)}
    last = []
    shift = (t_b - t_a) * q
    for r, recs in enumerate(device_ops):
        k = frontiers[t_b][r]
        last.append(index.get(recs[k - 1][6] - shift, -2) if k else -1)
    if -2 in last:      # a device's last op is not live (cannot happen in 1F1B or interleaved)
        return None
    return t_a, t_b, q, tmpl, tuple(last)


# A long schedule's stretched layout is its layout for the fewest microbatches m0 = m - K p with at
# least this many rounds' worth (m0 >= this many times p), K steady rounds inserted.
_STRETCH_FROM_ROUNDS = 6


@lru_cache(maxsize=16)
def _stretched(schedule: str, p: int, m: int, v: int) -> _Layout:
    """_layout(schedule, p, m, v) for the fast path (its device_ops left out), built in time
    independent of m from the layout for m0 = m - K p microbatches, whose steady stretch is K
    rounds shorter: the first steady round repeated K times more, every later op K p
    microbatches on.

    Why that is the same layout: a device's ops for m are those for m0 with K p v forward /
    backward pairs more in the middle, each op after them the one for m0 K p microbatches on
    (device_order), and an op's inputs are its own microbatch's. A cut after rounds < t reaches
    on each device the furthest prefix, below the round's caps, closed under the ops' inputs
    (_advance runs all it can), a function of the caps alone; in the steady stretch the caps,
    the ops below them and their inputs are the previous round's shifted by p microbatches, so
    the rounds are too, and so are the live ids _steady compares; the stretch is the longest one
    K rounds longer, and the needed ops (stage_last, device ends) stay after it. The unit test
    compares every field with _layout's over schedules, depths, chunks and lengths."""
    q = p     # microbatches a round moves (_steady)
    k = m // p - _STRETCH_FROM_ROUNDS if p else 0      # (no stage at all: _layout's error)
    if not _has_rounds(schedule, m) or k <= 0:
        return _layout(schedule, p, m, v)
    m0 = m - k * q
    base = _layout(schedule, p, m0, v)
    if base.steady is None or base.device_ops is None:
        return _layout(schedule, p, m, v)
    t_a, t_b, _, live, last = base.steady
    order0, bounds0 = base.order, base.bounds
    grow = m - m0       # each op id di * m0 + microbatch becomes di * m + microbatch

    def moved(recs: list[_Rec], shift: int) -> list[_Rec]:
        """The records for m, `shift` microbatches on."""
        out: list[_Rec] = []
        for code, r, di, a, b, ci, o in recs:
            o2 = o + (o // m0) * grow + shift
            if code == 0:
                out.append((0, r, 0, 0, 0, 0, o2))
            elif code == 3:
                out.append((3, r, di, a + (a // m0) * grow + shift, b + (b // m0) * grow + shift, ci, o2))
            else:
                out.append((code, r, di, a + (a // m0) * grow + shift, 0, ci, o2))
        return out

    first = moved(order0[bounds0[t_a]:bounds0[t_a + 1]], 0)
    order = moved(order0[:bounds0[t_a]], 0) + first
    for j in range(1, k):
        s = j * q
        order += [(c, r, di, a + s if c else 0, b + s if c == 3 else 0, ci, o + s) for c, r, di, a, b, ci, o in first]
    order += moved(order0[bounds0[t_a]:], k * q)
    size = bounds0[t_a + 1] - bounds0[t_a]
    bounds = bounds0[:t_a + 1] + tuple(bounds0[t_a] + j * size for j in range(1, k)) \
        + tuple(b + k * size for b in bounds0[t_a:])
    # each device's op kinds (duration indices): the first steady round's k times more
    before = [0] * p
    during = [0] * p
    for rec in order0[:bounds0[t_a]]:
        before[rec[1]] += 1
    for rec in order0[bounds0[t_a]:bounds0[t_a + 1]]:
        during[rec[1]] += 1
    busy_terms = []
    for r, recs in enumerate(base.device_ops):
        dis = [rec[2] for rec in recs]
        i, j = before[r], before[r] + during[r]
        busy_terms.append(_getter(tuple(dis[:i] + dis[i:j] * k + dis[i:])))
    in_prefix = {rec[6] for rec in order0[:bounds0[t_a]]}
    stage_last = tuple(o if o < 0 else o + (o // m0) * grow + (0 if o in in_prefix else k * q) for o in base.stage_last)
    steady = (t_a, t_b + k, q, tuple(o + (o // m0) * grow for o in live), last)
    return _Layout(base.n_ids // m0 * m, False, None, order, bounds, tuple(busy_terms), stage_last, steady)


def simulate(fwd_s: list[float], bwd_s: list[float], n_microbatches: int, schedule: str = "1f1b",
             p2p_s: list[float] | None = None, chunks: int = 1,
             host_fwd_s: list[float] | None = None, host_bwd_s: list[float] | None = None,
             record_ops: bool = True) -> Schedule:
    """fwd_s / bwd_s: per virtual stage (len = devices * chunks), per microbatch.
    p2p_s[g]: transfer time between virtual stage g and g+1 (each direction).

    host_fwd_s / host_bwd_s (per virtual stage, per microbatch): the CPU time to launch an op.
    Each device's CPU launches its ops in schedule order, one after another, and never waits for
    the GPU or for the other stages (eager pipelining: receives are stream waits, not host
    waits); an op's kernels cannot start before its launch starts nor end before it ends. So a
    host-bound pipeline runs at its CPUs' pace without idling them in the bubble, while the GPUs
    still wait for their inputs. Without them the schedule is the device's alone.

    record_ops=False leaves `ops` empty and lets the simulation jump over the steady state of
    1F1B / interleaved schedules: once one round of q microbatches moves every end time still
    needed (and the launch clocks that can still matter) by the same amount c, every later
    steady round does too, since the recurrence is max-plus linear and shift invariant there;
    so the remaining steady rounds are skipped by adding c per round. makespan_s, stage_end_s
    and device_end_s then differ from the op-by-op floats by rounding only (the op-by-op sums
    round differently over the skipped rounds; seen up to 5e-14 relative, tested against 1e-12);
    busy_s is always bit for bit, and so is everything with record_ops=True or with negative or
    non-finite times (no jump)."""
    n_stages = len(fwd_s)
    if n_stages % chunks:
        raise ValueError(f"{n_stages} stages do not split into {chunks} chunks per device")
    p = n_stages // chunks
    m = n_microbatches
    comm = list(p2p_s) if p2p_s is not None else [0.0] * max(0, n_stages - 1)
    hf = list(host_fwd_s) if host_fwd_s is not None else [0.0] * n_stages
    hb = list(host_bwd_s) if host_bwd_s is not None else [0.0] * n_stages
    durs = list(fwd_s) + list(bwd_s)
    launch = hf + hb
    # Finite, non-negative times keep every device's end times non-decreasing (so a stage's last
    # op ends last) and an all-zero launch clock at 0.0, never above a start: the fast paths
    # rely on both.
    regular = all(0 <= x < math.inf for x in durs) and all(0 <= x < math.inf for x in comm) \
        and all(0 <= x < math.inf for x in launch)
    # (the fast path reads only the order of the ops, so a long schedule's comes stretched)
    lay = _stretched(schedule, p, m, chunks) if regular and not record_ops else _layout(schedule, p, m, chunks)
    if len(hf) != n_stages or len(hb) != n_stages:
        raise ValueError(f"host times are given for {len(hf)}/{len(hb)} stages, the schedule has {n_stages}")
    if lay.deadlocked:
        raise RuntimeError(f"pipeline schedule {schedule!r} deadlocked (p={p}, m={n_microbatches}, v={chunks})")
    end = [0.0] * lay.n_ids
    free = [0.0] * p
    host = [0.0] * p
    ops: list[Op] = []
    if record_ops:
        _run_general(_sweep(schedule, p, m, chunks), end, free, host, durs, launch, comm, ops, m, n_stages)
    elif not regular:
        _run_general(lay.order, end, free, host, durs, launch, comm, None, m, n_stages)
    elif any(launch):
        _run_fast(lay, end, free, host, durs, launch, comm, True)
    else:
        _run_fast(lay, end, free, host, durs, launch, comm, False)
    busy = tuple(_sequential_sum(terms(durs)) for terms in lay.busy_terms)
    if regular:
        stage_end = tuple(end[o] if o >= 0 else 0.0 for o in lay.stage_last)
        device_end = tuple(free)
    else:
        # As a reader of the op list would take them: the latest end, 0.0 if none.
        se = [0.0] * n_stages
        de = []
        assert lay.device_ops is not None       # (a layout of _layout's, not stretched)
        for recs in lay.device_ops:
            oids = [rec[6] for rec in recs]
            for o in oids:
                g = (o // m) % n_stages
                se[g] = max(se[g], end[o])
            de.append(max((end[o] for o in oids), default=0.0))
        stage_end, device_end = tuple(se), tuple(de)
    return Schedule(max(free), tuple(ops), busy, stage_end, device_end)


def _sequential_sum(terms: tuple[float, ...]) -> float:
    """0.0 + terms[0] + terms[1] + ..., left to right, as the op-by-op loop adds busy time."""
    if _SUM_IS_SEQUENTIAL:
        return sum(terms, 0.0)
    return reduce(operator.add, terms, 0.0)


def _run_general(recs: list[_Rec], end: list[float], free: list[float], host: list[float], durs: list[float],
                 launch: list[float], comm: list[float], ops: list[Op] | None, m: int, n: int) -> None:
    """The recurrence, op by op, exactly as specified (any times, any order of evaluation that
    respects the inputs gives the same floats)."""
    for code, r, di, a, b, ci, oid in recs:
        if code == 1:
            ready = end[a] + comm[ci]
        elif code == 3:
            ready = end[a]
            x = end[b] + comm[ci]
            if x > ready:
                ready = x
        elif code == 2:
            ready = end[a]
        else:
            ready = 0.0
        # max(free, ready, host) and max(start + dur, host) as Python's max picks: the first of equals
        s = free[r]
        if ready > s:
            s = ready
        h = host[r]
        if h > s:
            s = h
        h = h + launch[di]
        host[r] = h
        e = s + durs[di]
        if h > e:
            e = h
        free[r] = e
        end[oid] = e
        if ops is not None:
            k, mb = divmod(oid, m)
            ops.append(Op(r, k, mb, "F", s, e) if k < n else Op(r, k - n, mb, "B", s, e))


def _run_plain(recs: list[_Rec], end: list[float], free: list[float], durs: list[float], comm: list[float]) -> None:
    """_run_general without launch clocks (all zero: they never bind on regular times)."""
    for code, r, di, a, b, ci, oid in recs:
        if code == 1:
            ready = end[a] + comm[ci]
        elif code == 3:
            ready = end[a]
            x = end[b] + comm[ci]
            if x > ready:
                ready = x
        elif code == 2:
            ready = end[a]
        else:
            ready = 0.0
        s = free[r]
        if ready > s:
            s = ready
        e = s + durs[di]
        free[r] = e
        end[oid] = e


def _run_host(recs: list[_Rec], end: list[float], free: list[float], host: list[float], bound: list[bool],
              durs: list[float], launch: list[float], comm: list[float]) -> None:
    """_run_general, noting in bound[r] when device r's launch clock decides a start or an end."""
    for code, r, di, a, b, ci, oid in recs:
        if code == 1:
            ready = end[a] + comm[ci]
        elif code == 3:
            ready = end[a]
            x = end[b] + comm[ci]
            if x > ready:
                ready = x
        elif code == 2:
            ready = end[a]
        else:
            ready = 0.0
        s = free[r]
        if ready > s:
            s = ready
        h = host[r]
        if h > s:
            s = h
            bound[r] = True
        h = h + launch[di]
        host[r] = h
        e = s + durs[di]
        if h > e:
            e = h
            bound[r] = True
        free[r] = e
        end[oid] = e


def _jump(states: list[np.ndarray], clocks: list[list[float]], decided: list[list[bool]],
          host: list[float], rounds_left: int, use_host: bool) -> tuple[int, int, float, list[float]] | None:
    """Whether the last j rounds (j = 1.._MAX_PERIOD) moved every live end time by one c, and
    the launch clocks either by c too or by less without deciding anything (_run_fast): then
    (periods, j, c, each clock's move) for the whole periods of j rounds left, else None.
    states: the live end times at the last frontiers, the latest last (arrays: the differences,
    their least and greatest are numpy's, the same floats as one by one, but as many times
    faster as there are live ids)."""
    cur = states[-1]
    top = float(cur.max())
    tol = _SPREAD_ULPS * math.ulp(top)
    mid = len(cur) // 2
    for j in range(1, len(states)):
        periods = rounds_left // j
        if not periods:
            return None
        old = states[-1 - j]
        d0 = cur[0] - old[0]
        if abs(cur[-1] - old[-1] - d0) > 2 * tol or abs(cur[mid] - old[mid] - d0) > 2 * tol:
            continue        # cheap rejection before comparing all
        d = cur - old
        lo, hi = float(d.min()), float(d.max())
        c = lo + (hi - lo) / 2
        drift = hi - c
        moves = [h - g for h, g in zip(host, clocks[-1 - j])] if use_host else []
        for r, hr in enumerate(moves):
            if abs(hr - c) <= tol:          # a launch clock that keeps pace
                drift = max(drift, abs(hr - c))
            elif hr > c or any(rnd[r] for rnd in decided[-j:]):     # one that may decide later
                drift = math.inf
        if drift <= tol and periods * drift <= _JUMP_REL * top:
            return periods, j, c, moves
    return None


def _run_fast(lay: _Layout, end: list[float], free: list[float], host: list[float], durs: list[float],
              launch: list[float], comm: list[float], use_host: bool) -> None:
    """Simulate regular times, jumping over the steady rounds where that is exact up to rounding.

    Why the jump is exact: let x_u be the end times live at frontier u (lay.steady) and h_u the
    launch clocks. j steady rounds are one and the same max-plus expression x_{u+j} = F(x_u, h_u),
    h_{u+j} = h_u + H (sums of the same launches), with no constant terms (a first stage's zero
    input never exceeds its device's clock), so F(x + c, h + c) = F(x, h) + c, and F is monotone.
    Suppose x_{u+j} = x_u + c, and every launch clock either moved by c too or moved by H_r < c
    without deciding any start or end in those rounds (so dropping it, h_r = -inf, changes
    nothing). Then F(x_{u+j}, h_{u+j}) <= F(x_u + c, h_u + c) = x_{u+j} + c, and
    F(x_{u+j}, h_{u+j}) >= F(x_u + c, (h_u + c) without the slow clocks) = x_{u+j} + c: the next
    j rounds move everything by c again, and the slow clocks decide nothing in them either. By
    induction x_{u+kj} = x_u + k c up to the end of the steady stretch, where the simulation
    resumes. In floats the increments agree to a few units in the last place only (_SPREAD_ULPS);
    F is non-expansive in the max norm, so k such periods add at most k times that spread."""
    order, bounds, p = lay.order, lay.bounds, len(free)
    bound = [False] * p

    def run(lo: int, hi: int) -> None:
        if use_host:
            _run_host(order[lo:hi], end, free, host, bound, durs, launch, comm)
        else:
            _run_plain(order[lo:hi], end, free, durs, comm)

    resume = 0
    if lay.steady is not None:
        t_a, t_b, q, live, last = lay.steady
        run(0, bounds[t_a])
        # The last few frontiers' live end times and launch clocks, and per round which launch
        # clocks decided a start or an end: the steady state may repeat only every j rounds
        # (its critical cycle need not span a whole round), so each j up to _MAX_PERIOD is tried.
        states = [np.array([end[o] for o in live])]
        clocks = [host[:]]
        decided: list[list[bool]] = []
        u = t_a
        while u < t_b - 1:
            bound[:] = [False] * p
            run(bounds[u], bounds[u + 1])
            u += 1
            off = (u - t_a) * q
            cur = [end[o + off] for o in live]
            states.append(np.array(cur))
            clocks.append(host[:])
            decided.append(bound[:])
            if len(states) > _MAX_PERIOD + 1:
                del states[0], clocks[0], decided[0]
            target = _jump(states, clocks, decided, host, t_b - u, use_host)
            if target:
                periods, j, c, moves = target
                u += periods * j
                shift = (u - t_a) * q
                jump_s = periods * c
                for o, x in zip(live, cur):
                    end[o + shift] = x + jump_s
                for r, hr in enumerate(moves):
                    host[r] += periods * hr
                for r, i in enumerate(last):
                    if i >= 0:
                        free[r] = end[live[i] + shift]
                break
        resume = bounds[u]
    run(resume, len(order))
def closed_form_latency_s(stage_s: list[float], n_microbatches: int) -> float:
    """Alpa's T = sum t_i + (B - 1) max t_j (the DP's objective)."""
    return sum(stage_s) + (n_microbatches - 1) * max(stage_s)
