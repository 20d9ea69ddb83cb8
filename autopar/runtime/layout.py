"""Plan sharding specs ("S0RS1", "scalar") as DTensor placements, and local shard shapes.

A spec token per tensor dim: R, S0 (split over mesh axis 0), S1 (axis 1), S01 (both, axis 0
major). DTensor says the same per *mesh* dim: mesh dim k holds Shard(d) when tensor dim d's
token has bit k set, else Replicate(). Two mesh dims sharding one tensor dim split it axis 0
major, which is DTensor's default order, so S01 needs no special case.
"""

from __future__ import annotations

from autopar.sharding.spec import parse_spec


def placements(spec: str | None, ndim: int, mesh_ndim: int = 2):
    """DTensor placements (one per mesh dim) of a plan spec; None (a constant) is replicated."""
    from torch.distributed.tensor import Replicate, Shard
    masks = parse_spec(spec) if spec else ()
    if spec and spec != "scalar" and len(masks) != ndim:
        raise ValueError(f"sharding spec {spec!r} has {len(masks)} dims, the tensor has {ndim}")
    out = []
    for k in range(mesh_ndim):
        dims = [d for d, m in enumerate(masks) if m & (1 << k)]
        if len(dims) > 1:
            raise ValueError(f"sharding spec {spec!r} splits two tensor dims over mesh axis {k}")
        out.append(Shard(dims[0]) if dims else Replicate())
    return tuple(out)


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
    from autopar.sharding.spec import spec_str
    masks = [0] * ndim
    for k, p in enumerate(placements_):
        if p.is_shard():
            masks[p.dim] |= 1 << k
    return spec_str(tuple(masks))
