"""Plan sharding specs ("S0RS1", "scalar") as DTensor placements, and local shard shapes.

The layout type and its encodings are defined in autopar/sharding/spec.py. DTensor says a
spec per *mesh* dim: mesh dim k holds Shard(d) for the tensor dim d it splits
(`spec.mesh_dims`), else Replicate(). Two mesh dims sharding one tensor dim split it axis 0
major, which is DTensor's default order, so S01 needs no special case.
"""

from __future__ import annotations

from autopar.sharding.spec import mesh_dims, parse_spec, spec_from_mesh_dims, spec_str


def is_dtensor(x) -> bool:
    """Whether `x` is a DTensor (the check the runtime's layers share)."""
    from torch.distributed.tensor import DTensor  # deferred: importing torch costs seconds
    return isinstance(x, DTensor)


def placements(spec: str | None, ndim: int, mesh_ndim: int = 2):
    """DTensor placements (one per mesh dim) of a plan spec; None (a constant) is replicated."""
    from torch.distributed.tensor import Replicate, Shard  # deferred: importing torch costs seconds
    masks = parse_spec(spec) if spec else ()
    if spec and spec != "scalar" and len(masks) != ndim:
        raise ValueError(f"sharding spec {spec!r} has {len(masks)} dims, the tensor has {ndim}")
    return tuple(Shard(d) if d is not None else Replicate() for d in mesh_dims(masks, mesh_ndim))


def local_shape(shape: tuple[int, ...], spec: str | None, mesh_shape: tuple[int, int],
                coord: tuple[int, int]) -> tuple[int, ...]:
    """The shard of `shape` that the device at mesh coordinate `coord` holds (torch.chunk
    sizes, as DTensor splits: uneven dims give the last ranks less)."""
    masks = parse_spec(spec) if spec and spec != "scalar" else (0,) * len(shape)
    out = []
    for size, m in zip(shape, masks):
        for k in (0, 1):                 # axis 0 splits first (outer), then axis 1 inside it
            if m & (1 << k):
                n, c = mesh_shape[k], coord[k]
                chunk = -(-size // n)
                size = max(0, min(size, (c + 1) * chunk) - c * chunk)
        out.append(size)
    return tuple(out)


def spec_of(placements_, ndim: int) -> str:
    """The plan spec of DTensor placements (the inverse of `placements`; partial sums read as R)."""
    return spec_str(spec_from_mesh_dims(tuple(p.dim if p.is_shard() else None for p in placements_), ndim))
