"""Sharding specs on a 2-D logical mesh and the cost of converting between them.

A spec is a tuple with one entry per tensor dim: 0 = replicated (R), 1 = split over mesh axis 0
(S0), 2 = split over axis 1 (S1), 3 = split over both, axis 0 major (S01). Written as a string
by concatenating the per-dim tokens: "S0RS1" is [S0, R, S1]. A scalar's spec is ().
"""

from __future__ import annotations

import re
from functools import lru_cache

from ..costmodel.collectives import all_gather_s, all_to_all_s
from ..hardware.mesh import Mesh

R, S0, S1, S01 = 0, 1, 2, 3
Spec = tuple
_TOKENS = {R: "R", S0: "S0", S1: "S1", S01: "S01"}
_SPEC_RE = re.compile(r"S01|S0|S1|R")


def spec_str(spec: Spec) -> str:
    return "".join(_TOKENS[m] for m in spec) if spec else "scalar"


def parse_spec(text: str) -> Spec:
    if text == "scalar":
        return ()
    parts = _SPEC_RE.findall(text)
    if "".join(parts) != text:
        raise ValueError(f"bad sharding spec {text!r}: expected tokens R, S0, S1, S01 per dim (e.g. 'S0RS1')")
    return tuple({"R": R, "S0": S0, "S1": S1, "S01": S01}[p] for p in parts)


def used_mask(spec: Spec) -> int:
    m = 0
    for x in spec:
        m |= x
    return m


def is_valid(spec: Spec, shape: tuple[int, ...], mesh: Mesh) -> bool:
    """Each axis used at most once, every split dim divisible, no split of a size-1 axis."""
    if len(spec) != len(shape):
        return False
    seen = 0
    for x, d in zip(spec, shape):
        if x & seen:
            return False
        seen |= x
        if x and (d % mesh.factor(x) != 0 or mesh.factor(x) == 1):
            return False
    return True


def shard_factor(spec: Spec, mesh: Mesh) -> int:
    f = 1
    for x in spec:
        if x:
            f *= mesh.factor(x)
    return f


def reshard_s(shape: tuple[int, ...], elem_bytes: int, src: Spec, dst: Spec, mesh: Mesh) -> float:
    """Time to convert a tensor from layout `src` to `dst` (forward direction only).

    Axis by axis (0 then 1): kept -> free; replicated -> split is a local slice (free);
    split -> replicated is an all-gather; split on one dim -> split on another is an
    all-to-all. Each step is costed on the tensor's size at that step.
    """
    if src == dst or not shape:
        return 0.0
    return _reshard_s(tuple(shape), elem_bytes, tuple(src), tuple(dst), mesh)


@lru_cache(maxsize=500_000)
def _reshard_s(shape, elem_bytes, src, dst, mesh: Mesh) -> float:
    cur = list(src)
    total = 0.0
    full_bytes = elem_bytes
    for d in shape:
        full_bytes *= d
    for bit in (1, 2):
        if mesh.factor(bit) == 1:
            continue
        s_dim = next((i for i, x in enumerate(cur) if x & bit), None)
        d_dim = next((i for i, x in enumerate(dst) if x & bit), None)
        if s_dim == d_dim:
            continue
        if s_dim is None:            # slice: free
            cur[d_dim] |= bit
            continue
        local_before = full_bytes / shard_factor(tuple(cur), mesh)
        axis = mesh.axis(bit)
        if d_dim is None:            # gather along this axis
            total += all_gather_s(local_before * axis.size, axis)
            cur[s_dim] &= ~bit
        else:                        # move the split to another dim
            total += all_to_all_s(local_before * axis.size, axis)
            cur[s_dim] &= ~bit
            cur[d_dim] |= bit
    # Dims still split differently (e.g. S01 -> S1 on one dim) need one more gather.
    if tuple(cur) != dst:
        extra = 0
        for c, t in zip(cur, dst):
            extra |= c & ~t
        if extra:
            local_before = full_bytes / shard_factor(tuple(cur), mesh)
            axis = mesh.axis(extra)
            total += all_gather_s(local_before * axis.size, axis)
    return total
