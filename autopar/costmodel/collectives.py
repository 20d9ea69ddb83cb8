"""Collectives by alpha-beta (ring algorithms), and point-to-point transfers.

All times in seconds, sizes in bytes. `nbytes` of a collective is the size of the full tensor
each rank holds after an all-reduce / all-gather (i.e. n x the shard).
"""

from __future__ import annotations

from ..hardware.mesh import MeshAxis
from ..hardware.specs import Link

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


def p2p_s(nbytes: float, link: Link) -> float:
    if nbytes <= 0:
        return 0.0
    return link.latency_s + nbytes / link.bandwidth_bytes_per_s


