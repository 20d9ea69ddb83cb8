"""Collectives by alpha-beta (ring algorithms), and point-to-point transfers.

All times in seconds, sizes in bytes. `nbytes` of a collective is the size of the full tensor
each rank holds after an all-reduce / all-gather (i.e. n x the shard).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..hardware.mesh import MeshAxis
from ..hardware.specs import Link

ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, ALL_TO_ALL = "all_reduce", "all_gather", "reduce_scatter", "all_to_all"
# Ring attention's K/V exchange: each rank passes a block to its successor, n-1 times per pass.
# A Collective of this kind carries only the *exposed* seconds (`ring_pass_exposed_s`), as the
# transfers overlap the attention compute of the block in hand.
RING_P2P = "ring_p2p"
# When a collective runs: in an op's forward or backward (every microbatch), or once per step
# after the last backward (gradient sync, ZeRO's gather of the updated weights).
FORWARD, BACKWARD, STEP = "forward", "backward", "step"
# Why: moving activations or their gradients, synchronising weight gradients (ZeRO 0/1), or
# ZeRO-2/3's sharded gradients and weights.
ACTIVATION, GRAD_SYNC, ZERO = "activation", "grad_sync", "zero"
ALL_ZERO_LEVELS = (0, 1, 2, 3)


@dataclass(frozen=True, slots=True)
class Collective:
    """One collective an op issues, priced on its mesh. `nbytes` is the full tensor (the
    convention above); `mask` the mesh axes of its group (1 axis 0, 2 axis 1, 3 both as one
    group). `zero` lists the ZeRO levels under which it runs. `operand`: for the backward
    all-reduce of an activation operand's gradient, that operand (the readers of one tensor
    sum their partial gradients before one all-reduce, so a stage shares it among them)."""

    kind: str
    mask: int
    nbytes: float
    phase: str
    time_s: float
    purpose: str = ACTIVATION
    zero: tuple[int, ...] = ALL_ZERO_LEVELS
    operand: int = -1


def collective_s(kind: str, nbytes: float, axis: MeshAxis) -> float:
    return _PRICE[kind](nbytes, axis)


# ---- collectives -----------------------------------------------------------------------------

def all_reduce_s(nbytes: float, axis: MeshAxis) -> float:
    """Ring all-reduce: 2(n-1) steps, each rank moves 2(n-1)/n of the buffer."""
    n = axis.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) * axis.latency_s + 2 * (n - 1) / n * nbytes / axis.bandwidth_bytes_per_s


def all_gather_s(nbytes: float, axis: MeshAxis) -> float:
    """Ring all-gather to a `nbytes` result: half an all-reduce."""
    n = axis.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) * axis.latency_s + (n - 1) / n * nbytes / axis.bandwidth_bytes_per_s


def reduce_scatter_s(nbytes: float, axis: MeshAxis) -> float:
    """Ring reduce-scatter of a `nbytes` input: half an all-reduce."""
    return all_gather_s(nbytes, axis)


def all_to_all_s(nbytes: float, axis: MeshAxis) -> float:
    """All-to-all of a tensor of `nbytes` in total over the group: each rank holds nbytes/n
    and sends (n-1)/n of it, i.e. (n-1)/n^2 * nbytes per rank."""
    n = axis.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) * axis.latency_s + (n - 1) / (n * n) * nbytes / axis.bandwidth_bytes_per_s


def ring_step_s(block_bytes: float, axis: MeshAxis) -> float:
    """One ring step: every rank sends a `block_bytes` block to its successor while receiving
    one from its predecessor (full-duplex links, all ranks at once): one latency and one block
    over the axis' per-GPU bandwidth."""
    if axis.size <= 1 or block_bytes <= 0:
        return 0.0
    return axis.latency_s + block_bytes / axis.bandwidth_bytes_per_s


def ring_pass_s(block_bytes: float, axis: MeshAxis, step_compute_s: float, tail_bytes: float = 0.0) -> float:
    """Wall time of a ring pass over an axis of n ranks: n compute steps on the block in hand,
    the transfer of the next block overlapped with each of the first n-1 (so each of those
    steps takes max(compute, transfer)), then `tail_bytes` sent one more hop with nothing to
    overlap (ring attention's backward returns the accumulated dK, dV blocks home)."""
    return max(axis.size, 1) * step_compute_s + ring_pass_exposed_s(block_bytes, axis, step_compute_s, tail_bytes)


def ring_pass_exposed_s(block_bytes: float, axis: MeshAxis, step_compute_s: float, tail_bytes: float = 0.0) -> float:
    """Of `ring_pass_s`, the seconds beyond the n compute steps: per overlapped step
    max(compute, transfer) - compute, and the tail hop."""
    n = axis.size
    if n <= 1:
        return 0.0
    return (n - 1) * max(0.0, ring_step_s(block_bytes, axis) - step_compute_s) + ring_step_s(tail_bytes, axis)


def p2p_s(nbytes: float, link: Link) -> float:
    if nbytes <= 0:
        return 0.0
    return link.latency_s + nbytes / link.bandwidth_bytes_per_s


_PRICE = {ALL_REDUCE: all_reduce_s, ALL_GATHER: all_gather_s, REDUCE_SCATTER: reduce_scatter_s,
          ALL_TO_ALL: all_to_all_s}
