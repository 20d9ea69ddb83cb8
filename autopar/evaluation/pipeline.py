"""Pipeline schedules, simulated op by op.

Each device runs its forward (F) and backward (B) ops in the order its schedule fixes; an op
starts when its device is free and its input has arrived (the previous stage's F, or the next
stage's B, plus the point-to-point transfer). The simulation gives the makespan, every op's
start and end (for Gantt charts), and so the bubble — closed forms are only the tests.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    ops: tuple[Op, ...]
    busy_s: tuple[float, ...]         # per device

    @property
    def bubble_fraction(self) -> float:
        """The busiest device's share of the step spent idle: idle / (idle + busy), which is
        (p-1)/(m+p-1) for GPipe/1F1B with p equal stages and m microbatches, and
        (p-1)/(m*v+p-1) interleaved with v chunks per device."""
        busy = max(self.busy_s)
        return (self.makespan_s - busy) / self.makespan_s if self.makespan_s > 0 else 0.0


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


def simulate(fwd_s: list[float], bwd_s: list[float], n_microbatches: int, schedule: str = "1f1b",
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


def closed_form_latency_s(stage_s: list[float], n_microbatches: int) -> float:
    """Alpa's T = sum t_i + (B - 1) max t_j (the DP's objective)."""
    return sum(stage_s) + (n_microbatches - 1) * max(stage_s)
