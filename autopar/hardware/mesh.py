"""Submeshes (Alpa's physical device groups), logical 2-D meshes on them, and the link each
mesh axis communicates over."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

from .specs import Cluster

# ---- submeshes and logical meshes -----------------------------------------------------------

@dataclass(frozen=True)
class Submesh:
    """Alpa's physical submesh: (1, 2^k) inside a node, or (n, M) whole nodes."""

    n_nodes: int
    gpus_per_node: int

    @property
    def n_devices(self) -> int:
        return self.n_nodes * self.gpus_per_node

    def logical_meshes(self) -> list[tuple[int, int]]:
        d = self.n_devices
        return [(d0, d // d0) for d0 in range(1, d + 1) if d % d0 == 0]

    def __str__(self) -> str:
        return f"({self.n_nodes},{self.gpus_per_node})"


def submeshes(cluster: Cluster) -> list[Submesh]:
    """Alpa's submesh shapes: (1, 2^k) inside a node and (n, M) whole nodes. Beyond 16 nodes
    only power-of-two node counts are offered: every (n, M) shape multiplies the ILPs to solve,
    and large clusters are built from power-of-two pipeline stages in practice."""
    out = [Submesh(1, 2 ** k) for k in range(int(math.log2(cluster.gpus_per_node)) + 1)]
    counts = range(2, cluster.n_nodes + 1) if cluster.n_nodes <= 16 else \
        sorted({n for n in (2 ** k for k in range(1, int(math.log2(cluster.n_nodes)) + 1))} | {cluster.n_nodes})
    out += [Submesh(n, cluster.gpus_per_node) for n in counts]
    return out


@dataclass(frozen=True)
class MeshAxis:
    """One axis of a logical mesh placed on a submesh: its size and the link it uses."""

    size: int
    bandwidth_bytes_per_s: float
    latency_s: float
    crosses_nodes: bool


def mesh_axes(cluster: Cluster, submesh: Submesh, mesh: tuple[int, int]) -> tuple[MeshAxis, MeshAxis, MeshAxis]:
    """Axis 0, axis 1, and both axes together, for a logical mesh laid row-major over devices
    ordered (node, gpu). Axis 1 groups consecutive devices; axis 0 strides by d1.

    A group that spans nodes is bounded by the nodes' NICs: all groups of a node communicate at
    once, so each gets node bandwidth x (its GPUs per node) / (GPUs per node) — a full-node
    group sees the whole node's NIC bandwidth (NCCL's hierarchical collectives), a
    one-GPU-per-node group an eighth of it.
    """
    d0, d1 = mesh
    if d0 * d1 != submesh.n_devices:
        raise ValueError(f"logical mesh {mesh} does not have {submesh.n_devices} devices")
    m = submesh.gpus_per_node

    def axis(size: int, members_per_node: int) -> MeshAxis:
        if size <= 1:
            return MeshAxis(1, math.inf, 0.0, False)
        if members_per_node >= size:
            return MeshAxis(size, cluster.intra_link.bandwidth_bytes_per_s, cluster.intra_link.latency_s, False)
        bw = cluster.inter_link.bandwidth_bytes_per_s * members_per_node / cluster.gpus_per_node
        return MeshAxis(size, bw, cluster.inter_link.latency_s, True)

    a1 = axis(d1, min(d1, m))
    a0 = axis(d0, max(1, min(d0, m // d1)) if d1 < m else 1)
    both = axis(d0 * d1, min(d0 * d1, m))
    return a0, a1, both


def searched_meshes(cluster: Cluster, submesh: Submesh) -> list[tuple[int, int]]:
    """The submesh's logical meshes less each (d, 1) whose mirror (1, d) puts its one live axis
    on the same link (mesh_axes, axes swapped): with a single live axis a sharding problem is
    the same with the axis relabelled, so (d, 1) only repeats (1, d), which comes first.

    Meshes with two live axes keep their mirrors: (a, b) and (b, a) are different problems
    here even on one link. The layouts are not closed under swapping the axes (S01 splits axis
    0 major), and spec.reshard_s converts axis 0 first, so e.g. moving a split from axis 0 to
    axis 1 gathers first on (2, 4) but slices first on (4, 2). gpt-39b's 4x2 range tables
    differ from 2x4's in 22-53% of their finite time cells (microbatch sizes 1-4, times by up to 2%,
    gradient sync and memory by up to 40%), and a small GPT's 4x2 wins stage-table cells from 2x4."""
    shapes = submesh.logical_meshes()
    def mirrors(shape: tuple[int, int]) -> bool:
        d0, d1 = shape
        if d1 != 1 or d0 == 1:
            return False
        a0, a1, both = mesh_axes(cluster, submesh, shape)
        m0, m1, m_both = mesh_axes(cluster, submesh, (1, d0))
        return (a0, a1, both) == (m1, m0, m_both)
    return [s for s in shapes if not mirrors(s)]


@dataclass(frozen=True)
class Mesh:
    """A logical mesh (d0, d1) placed on a submesh of a cluster: sizes and links per axis."""

    cluster: Cluster
    submesh: Submesh
    shape: tuple[int, int]

    def __hash__(self) -> int:
        """The hash dataclass would make (of the fields' tuple), taken once per object: the
        strategy and resharding caches key on a mesh at every lookup, and hashing a Cluster
        walks its links. Not pickled (__getstate__): string hashes differ between processes."""
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.cluster, self.submesh, self.shape))
            object.__setattr__(self, "_hash", h)
        return h

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_hash", None)
        state.pop("_axes", None)
        return state

    @property
    def n_devices(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def axes(self) -> tuple[MeshAxis, MeshAxis, MeshAxis]:
        """_axes of this mesh, kept on the object after the first call (a lookup in _axes'
        cache hashes the Cluster)."""
        a = self.__dict__.get("_axes")
        if a is None:
            a = _axes(self.cluster, self.submesh, self.shape)
            object.__setattr__(self, "_axes", a)
        return a

    def axis(self, mask: int) -> MeshAxis:
        """The communication group of a mask: 1 -> axis 0, 2 -> axis 1, 3 -> both."""
        return self.axes[mask - 1]

    def factor(self, mask: int) -> int:
        return (self.shape[0] if mask & 1 else 1) * (self.shape[1] if mask & 2 else 1)

    @property
    def live_axes(self) -> tuple[int, ...]:
        """Masks of the axes with more than one device."""
        return tuple(m for m, d in ((1, self.shape[0]), (2, self.shape[1])) if d > 1)

    def __str__(self) -> str:
        return f"{self.shape[0]}x{self.shape[1]}"


@cache
def _axes(cluster: Cluster, submesh: Submesh, shape: tuple[int, int]):
    return mesh_axes(cluster, submesh, shape)


