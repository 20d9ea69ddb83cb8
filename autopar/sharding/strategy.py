"""The cost record of one op under one strategy, and the one function that prices it.

A `Strategy` carries everything the planner, the evaluator and the runtime check read about
an (op, strategy) pair: its layouts, its compute time, every collective it issues (an explicit
list, `Collective` records with kind, mesh axes, bytes, phase and the ZeRO levels they run
under) and its memory terms. `op_cost` turns a record and the training settings into seconds;
the ILP objective and the evaluator's score are both sums of it (sharding/stage_problem.py).

Times are per microbatch unless noted, for the local (sharded) shapes on one device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from autopar.costmodel.collectives import (
    ALL_GATHER,
    BACKWARD,
    FORWARD,
    REDUCE_SCATTER,
    STEP,
    ZERO,
    Collective,
    comm_overlap_s,
)
from autopar.costmodel.eager import fsdp_block_comm_s
from autopar.sharding.spec import Spec


@dataclass(frozen=True, slots=True)
class Strategy:
    name: str
    out_spec: Spec
    in_specs: tuple                      # per operand: Spec, or None for constants
    fwd_s: float = 0.0                   # compute
    bwd_s: float = 0.0
    collectives: tuple[Collective, ...] = ()
    param_elems_local: float = 0.0       # owned parameter elements on one device
    param_elems_zero: float = 0.0        # ... when optimizer state is sharded over the grad-sync axes
    out_bytes_local: float = 0.0
    letters: Mapping[str, int] = field(default_factory=dict)   # letter -> mask, for matmul-like ops
    # Sums of `collectives` by when they run, for the ILP builder's inner loop.
    fwd_comm_s: float = field(init=False)
    bwd_comm_s: float = field(init=False)
    grad_sync_s: float = field(init=False)       # per step, ZeRO 0/1: all-reduce of weight grads
    _zero_fwd_s: tuple[float, ...] = field(init=False, repr=False)   # by ZeRO level
    _zero_bwd_s: tuple[float, ...] = field(init=False, repr=False)
    _step_s: tuple[float, ...] = field(init=False, repr=False)
    # Of bwd_comm_s, the all-reduce of each activation operand's gradient (by operand index).
    bwd_comm_operand: Mapping[int, float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        fwd = bwd = 0.0
        zf, zb, step = [0.0] * 4, [0.0] * 4, [0.0] * 4
        per_operand: dict[int, float] = {}
        for c in self.collectives:
            if c.purpose == ZERO or c.phase == STEP:
                acc = zf if c.phase == FORWARD else (zb if c.phase == BACKWARD else step)
                for z in c.zero:
                    acc[z] += c.time_s
            elif c.phase == FORWARD:
                fwd += c.time_s
            else:
                bwd += c.time_s
                if c.operand >= 0:
                    per_operand[c.operand] = per_operand.get(c.operand, 0.0) + c.time_s
        set_ = object.__setattr__
        set_(self, "fwd_comm_s", fwd)
        set_(self, "bwd_comm_s", bwd)
        set_(self, "grad_sync_s", step[0])
        set_(self, "_zero_fwd_s", tuple(zf))
        set_(self, "_zero_bwd_s", tuple(zb))
        set_(self, "_step_s", tuple(step))
        set_(self, "bwd_comm_operand", per_operand)

    def per_microbatch_s(self) -> float:
        return self.fwd_s + self.bwd_s + self.fwd_comm_s + self.bwd_comm_s

    def runs(self, zero: int) -> tuple[Collective, ...]:
        """The collectives this op issues under ZeRO level `zero`."""
        return tuple(c for c in self.collectives if zero in c.zero)


class OpCost(NamedTuple):
    fwd_s: float        # compute + forward collectives + resharding of the inputs, per microbatch
    bwd_s: float        # the same for backward
    comm_s: float       # of fwd_s + bwd_s, the communication
    step_s: float       # once per step: gradient sync (ZeRO 0/1) or ZeRO-2's weight gather

    def objective_s(self, n_microbatches: int) -> float:
        """The op's share of a stage's step per microbatch: what the ILP minimises."""
        return self.fwd_s + self.bwd_s + self.step_s / n_microbatches


def op_cost(st: Strategy, zero: int, grad_share: Mapping[int, float] | None = None,
            reshard_s: float = 0.0) -> OpCost:
    """Seconds of one op under strategy `st` at ZeRO level `zero`. `grad_share[j]` is the
    share of operand j's backward all-reduce this op pays (1 / the tensor's matmul readers);
    `reshard_s` the forward time of converting its inputs to `st.in_specs` (backward pays
    the same again)."""
    bwd_comm = st.bwd_comm_s
    if grad_share and st.bwd_comm_operand:
        bwd_comm -= sum(c * (1.0 - grad_share.get(j, 1.0)) for j, c in st.bwd_comm_operand.items())
    zf, zb = st._zero_fwd_s[zero], st._zero_bwd_s[zero]
    fwd = st.fwd_s + st.fwd_comm_s + reshard_s + zf
    bwd = st.bwd_s + bwd_comm + reshard_s + zb
    return OpCost(fwd, bwd, st.fwd_comm_s + bwd_comm + 2 * reshard_s + zf + zb, st._step_s[zero])


def sharded_storage_cost(st: Strategy, zero: int, n_microbatches: int, grad_share: Mapping[int, float] | None = None,
                         reshard_s: float = 0.0) -> OpCost:
    """`op_cost` of an op whose parameters are stored sharded over the data-parallel axes
    (ZeRO-3 storage, an FSDP2 unit of its own) in a stage at ZeRO `zero` (1 or 2) of
    `n_microbatches` microbatches: its weights all-gathered for every forward and backward,
    its gradients reduce-scattered every microbatch.

    One gather and one reduction per step is traffic the stage's own storage moves too (ZeRO-1's
    gradient all-reduce, ZeRO-2's reduce-scatters and its gather of the updated weights): that
    part is priced exactly as at the stage's level (`op_cost(st, zero)`, the gradient buckets
    included), so storage is chosen on what it adds. What it adds: the other B - 1 forward
    gathers and every backward gather, which FSDP2 prefetches behind the compute before them,
    priced with the FSDP2 overlap model (eager.fsdp_block_comm_s, the unit's own compute
    standing for its neighbour's: its equal-units case) and the compute's slowdown beside the
    hidden part (comm_overlap_s), so hidden is cheaper, never free; and under ZeRO-1 the other
    B - 1 reduce-scatters, exposed, as the stage's ZeRO-2 ones are priced."""
    base = op_cost(st, zero, grad_share, reshard_s)
    ag_f = ag_b = rs = 0.0
    for c in st.collectives:
        if c.purpose != ZERO or 3 not in c.zero:
            continue
        if c.kind == ALL_GATHER and c.phase == FORWARD:
            ag_f += c.time_s
        elif c.kind == ALL_GATHER and c.phase == BACKWARD:
            ag_b += c.time_s
        elif c.kind == REDUCE_SCATTER and c.phase == BACKWARD:
            rs += c.time_s
    more = (n_microbatches - 1) / n_microbatches
    extra_rs = rs * more if zero == 1 else 0.0
    exp_f, exp_b, hidden = fsdp_block_comm_s(st.fwd_s, st.bwd_s, ag_f * more, ag_b, 0.0)
    slow_f = comm_overlap_s(ag_f * more - exp_f)
    slow_b = comm_overlap_s(hidden - (ag_f * more - exp_f))
    return OpCost(base.fwd_s + exp_f + slow_f, base.bwd_s + exp_b + slow_b + extra_rs,
                  base.comm_s + exp_f + exp_b + extra_rs, base.step_s)
