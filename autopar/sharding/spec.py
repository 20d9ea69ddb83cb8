"""Sharding specs on a 2-D logical mesh and the cost of converting between them.

The one layout type. A `Spec` holds one *mask* per tensor dim; bit k of a mask set means that
dim is split over mesh axis k:

    mask 0 = R (replicated), 1 = S0 (split over axis 0), 2 = S1 (axis 1),
    3 = S01 (split over both, axis 0 major: the outer chunks go along axis 0).

A scalar's spec is (). A sequence (context-parallel) split is a plain split of the token dim:
"RS0S1" is [b, s, h] with the sequence over axis 0 and the hidden dim over axis 1, "RS1S0R" an
attention input [b, heads, s, d] with heads over axis 1 and the sequence over axis 0 (which
tokens a rank holds, e.g. causal load balancing, is the attention strategy's business:
rules/attention.py). A dim that concatenates P known parts (a fused q|k|v or gate|up
projection's output) may instead be split *per part*: each part is cut into the mesh axes'
chunks and device r holds [part_1 chunk r | part_2 chunk r | ...], a block-cyclic layout of the
dim. Such a mask carries the part sizes above its two axis bits (`split_per_part`, `parts_of`);
everything that reads only the axes masks with `AXES` (`axes_of`). Every other encoding is
derived here:
  - text: the per-dim tokens concatenated, "S0RS1" is (S0, R, S1); a per-part split writes its
    part sizes after the axes, "RRS1[4096,1024,1024]"; a scalar is "scalar"
    (`spec_str`, `parse_spec`);
  - a strategy name's axis suffix, "b@0,n@1": letter b split over axis 0 (mask 1), n over
    axis 1 (mask 2), "@01" over both (`axes_str`, `axes_mask`);
  - DTensor placements, one per mesh axis: the tensor dim each axis splits, or None
    (`mesh_dims`, `spec_from_mesh_dims`; runtime/layout.py maps them to Shard/Replicate). A
    per-part split is no Shard placement: `mesh_dims` refuses it.

`Spec` is a plain tuple of ints (an alias, not a class): the ILP builder hashes and compares
specs in its innermost loops, and tuples are what Python hashes fastest.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TypeAlias

from ..costmodel.collectives import ALL_GATHER, ALL_TO_ALL, FORWARD, Collective, collective_s
from ..hardware.mesh import Mesh

Spec: TypeAlias = tuple[int, ...]
R, S0, S1, S01 = 0, 1, 2, 3
AXES = 3                            # the axis bits of a mask
AXIS_BITS = (1, 2)                  # mask bit of mesh axis 0 and axis 1
_PART_BITS = 32                     # bits per part size in a per-part mask
_TOKENS = {R: "R", S0: "S0", S1: "S1", S01: "S01"}
_MASK_OF_TOKEN = {t: m for m, t in _TOKENS.items()}
_SPEC_RE = re.compile(r"(S01|S0|S1)(?:\[(\d+(?:,\d+)*)\])?|R")
_AXES = {1: "0", 2: "1", 3: "01"}
_MASK_OF_AXES = {t: m for m, t in _AXES.items()}


def split_per_part(axes: int, sizes: tuple[int, ...]) -> int:
    """The mask of a dim made of parts `sizes`, each split over the mesh axes in `axes`."""
    if not axes or len(sizes) < 2 or any(not 0 < x < 1 << _PART_BITS for x in sizes):
        raise ValueError(f"a per-part split needs mesh axes and two or more part sizes (got {axes}, {sizes})")
    code = 0
    for i, x in enumerate(sizes):
        code |= x << (_PART_BITS * i)
    return axes | code << 2


def parts_of(mask: int) -> tuple[int, ...]:
    """The part sizes of a per-part split; () for a plain one (or none)."""
    code, out = mask >> 2, []
    while code:
        out.append(code & ((1 << _PART_BITS) - 1))
        code >>= _PART_BITS
    return tuple(out)


def axes_of(mask: int) -> int:
    """The mesh axes a dim's mask splits it over (per part or not)."""
    return mask & AXES


def spec_str(spec: Spec) -> str:
    """The layout as text (parse_spec reads it back). A function of the masks alone, so a
    tuple's text is kept (the evaluator writes one per op's input and output, most of them
    alike): _spec_text computes it."""
    if type(spec) is tuple:
        return _spec_text_kept(spec)
    return _spec_text(spec)


def _spec_text(spec: Spec) -> str:
    if not spec:
        return "scalar"
    out = []
    for m in spec:
        parts = parts_of(m)
        out.append(_TOKENS[m & AXES] + (f"[{','.join(map(str, parts))}]" if parts else ""))
    return "".join(out)


_spec_text_kept = lru_cache(maxsize=65_536)(_spec_text)


def parse_spec(text: str) -> Spec:
    if text == "scalar":
        return ()
    found = list(_SPEC_RE.finditer(text))
    if "".join(f.group(0) for f in found) != text:
        raise ValueError(f"bad sharding spec {text!r}: expected tokens R, S0, S1, S01 per dim (e.g. 'S0RS1'), a "
                         "split per part with its part sizes (e.g. 'RRS1[4096,1024,1024]')")
    out = []
    for f in found:
        axes = _MASK_OF_TOKEN[f.group(1) or "R"]
        out.append(split_per_part(axes, tuple(int(x) for x in f.group(2).split(","))) if f.group(2) else axes)
    return tuple(out)


def axes_str(mask: int) -> str:
    """The mesh axes of a nonzero mask as a strategy name writes them: "0", "1" or "01"."""
    return _AXES[mask]


def axes_mask(text: str) -> int:
    """Inverse of `axes_str`."""
    return _MASK_OF_AXES[text]


def mesh_dims(spec: Spec, mesh_ndim: int = 2) -> tuple[int | None, ...]:
    """Per mesh axis, the tensor dim it splits (None: replicated along that axis). Raises when
    one axis splits two dims (not a layout)."""
    bad = [d for d, m in enumerate(spec) if parts_of(m)]
    if bad:
        raise ValueError(f"sharding spec {spec_str(spec)!r} splits dim {bad[0]} per part (a fused projection's "
                         "block-cyclic layout): it has no DTensor Shard placement")
    out: list[int | None] = []
    for k in range(mesh_ndim):
        dims = [d for d, m in enumerate(spec) if m & (1 << k)]
        if len(dims) > 1:
            raise ValueError(f"sharding spec {spec_str(spec)!r} splits two tensor dims over mesh axis {k}")
        out.append(dims[0] if dims else None)
    return tuple(out)


def spec_from_mesh_dims(dims: tuple[int | None, ...], ndim: int) -> Spec:
    """Inverse of `mesh_dims`."""
    masks = [0] * ndim
    for k, d in enumerate(dims):
        if d is not None:
            masks[d] |= 1 << k
    return tuple(masks)


def used_mask(spec: Spec) -> int:
    m = 0
    for x in spec:
        m |= x & AXES
    return m


def is_valid(spec: Spec, shape: tuple[int, ...], mesh: Mesh) -> bool:
    """Each axis used at most once, every split dim (every part of a per-part split)
    divisible, no split of a size-1 axis."""
    if len(spec) != len(shape):
        return False
    seen = 0
    for x, d in zip(spec, shape):
        a = x & AXES
        if a & seen:
            return False
        seen |= a
        f = mesh.factor(a)
        if a and (d % f != 0 or f == 1):
            return False
        parts = parts_of(x)
        if parts and (sum(parts) != d or any(p % f for p in parts)):
            return False
    return True


def shard_factor(spec: Spec, mesh: Mesh) -> int:
    f = 1
    for x in spec:
        if x:
            f *= mesh.factor(x & AXES)
    return f


def reshard_s(shape: tuple[int, ...], elem_bytes: int, src: Spec, dst: Spec, mesh: Mesh) -> float:
    """Time to convert a tensor from layout `src` to `dst` (forward direction only): the sum
    of `reshard_collectives`."""
    if src == dst or not shape:
        return 0.0
    return _reshard_s(tuple(shape), elem_bytes, tuple(src), tuple(dst), mesh)


def reshard_backward_s(shape: tuple[int, ...], elem_bytes: int, src: Spec, dst: Spec, mesh: Mesh,
                       grad: bool = True) -> float:
    """Backward time of converting a tensor from `src` to `dst`: the conversion runs again to
    rebuild the input the consumer's backward reads (the stash keeps it as it came, in `src`),
    and a tensor that carries a gradient (`grad`) has it arrive in `dst` and go back to `src`
    (a free slice's backward is an all-gather)."""
    again = reshard_s(shape, elem_bytes, src, dst, mesh)
    return again + reshard_s(shape, elem_bytes, dst, src, mesh) if grad else again


def reshard_backward_collectives(shape: tuple[int, ...], elem_bytes: int, src: Spec, dst: Spec, mesh: Mesh,
                                 grad: bool = True) -> tuple[Collective, ...]:
    """The collectives `reshard_backward_s` prices, in order: the conversion again, then the
    gradient's way back from `dst` to `src` when the tensor carries one."""
    again = reshard_collectives(shape, elem_bytes, src, dst, mesh)
    return again + reshard_collectives(shape, elem_bytes, dst, src, mesh) if grad else again


def reshard_collectives(shape: tuple[int, ...], elem_bytes: int, src: Spec, dst: Spec,
                        mesh: Mesh) -> tuple[Collective, ...]:
    """The collectives that convert a tensor from layout `src` to `dst`, in order.

    Axis by axis (0 then 1): kept -> free; replicated -> split is a local slice (free);
    split -> replicated is an all-gather; split on one dim -> split on another is an
    all-to-all. Each step is costed on the tensor's size at that step. A per-part split
    converted to any other layout of its dim is all-gathered first (then sliced, free).
    """
    if src == dst or not shape:
        return ()
    return _reshard_steps(tuple(shape), elem_bytes, tuple(src), tuple(dst), mesh)


@lru_cache(maxsize=500_000)
def _reshard_s(shape: tuple[int, ...], elem_bytes: int, src: Spec, dst: Spec, mesh: Mesh) -> float:
    total = 0.0
    for c in _reshard_steps(shape, elem_bytes, src, dst, mesh):
        total += c.time_s
    return total


@lru_cache(maxsize=500_000)
def _reshard_steps(shape: tuple[int, ...], elem_bytes: int, src: Spec, dst: Spec,
                   mesh: Mesh) -> tuple[Collective, ...]:
    cur = list(src)
    steps: list[Collective] = []
    full_bytes = elem_bytes
    for d in shape:
        full_bytes *= d

    def step(kind: str, mask: int, nbytes: float) -> None:
        steps.append(Collective(kind, mask, nbytes, FORWARD, collective_s(kind, nbytes, mesh.axis(mask))))

    for d, (x, y) in enumerate(zip(src, dst)):
        if x != y and parts_of(x) and x & AXES and mesh.factor(x & AXES) > 1:
            local_before = full_bytes / shard_factor(tuple(cur), mesh)
            step(ALL_GATHER, x & AXES, local_before * mesh.axis(x & AXES).size)
            cur[d] = 0
    cur = [x & AXES for x in cur]
    dst = tuple(x & AXES for x in dst)

    for bit in AXIS_BITS:
        if mesh.factor(bit) == 1:
            continue
        s_dim = next((i for i, x in enumerate(cur) if x & bit), None)
        d_dim = next((i for i, x in enumerate(dst) if x & bit), None)
        if s_dim == d_dim:
            continue
        if s_dim is None:            # slice: free
            assert d_dim is not None
            cur[d_dim] |= bit
            continue
        local_before = full_bytes / shard_factor(tuple(cur), mesh)
        axis = mesh.axis(bit)
        if d_dim is None:            # gather along this axis
            step(ALL_GATHER, bit, local_before * axis.size)
            cur[s_dim] &= ~bit
        else:                        # move the split to another dim
            step(ALL_TO_ALL, bit, local_before * axis.size)
            cur[s_dim] &= ~bit
            cur[d_dim] |= bit
    # Dims still split differently (e.g. S01 -> S1 on one dim) need one more gather.
    if tuple(cur) != dst:
        extra = 0
        for c, t in zip(cur, dst):
            extra |= c & ~t
        if extra:
            local_before = full_bytes / shard_factor(tuple(cur), mesh)
            step(ALL_GATHER, extra, local_before * mesh.axis(extra).size)
    return tuple(steps)
