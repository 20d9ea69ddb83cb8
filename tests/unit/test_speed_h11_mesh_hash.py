"""Mesh keeps its hash and its axes on the object once taken (the strategy and resharding
caches hash a mesh at every lookup). The hash is the one dataclass made, of the fields' tuple,
so every dict and set of meshes keeps its order; equal meshes hash alike; the cached values
stay out of pickles and copies (string hashes differ between processes)."""

from __future__ import annotations

import copy
import dataclasses
import pickle

from autopar.hardware.mesh import Mesh, Submesh, _axes, mesh_axes
from autopar.hardware.presets import load_cluster


def _meshes():
    for name, nodes in (("p3.16xlarge", 2), ("dgx-h100", 1)):
        cl = load_cluster(name, nodes)
        for sub in (Submesh(1, 4), Submesh(1, 8), Submesh(nodes, 8)):
            for shape in sub.logical_meshes():
                yield Mesh(cl, sub, shape)


def test_hash_is_the_fields_tuple_hash_and_axes_are_mesh_axes():
    for m in _meshes():
        want = hash((m.cluster, m.submesh, m.shape))
        assert hash(m) == want and hash(m) == want           # taken, then read back
        twin = Mesh(m.cluster, m.submesh, m.shape)
        assert twin == m and hash(twin) == want
        assert m.axes == mesh_axes(m.cluster, m.submesh, m.shape) and m.axes is m.axes
        assert m.axes is _axes(m.cluster, m.submesh, m.shape)
        assert {m: 1}[twin] == 1


def test_cached_values_stay_out_of_pickles_and_copies():
    for m in _meshes():
        hash(m)
        assert m.axes and "_hash" in vars(m) and "_axes" in vars(m)
        for other in (pickle.loads(pickle.dumps(m)), copy.copy(m), copy.deepcopy(m)):
            assert "_hash" not in vars(other) and "_axes" not in vars(other)
            assert (other.submesh, other.shape) == (m.submesh, m.shape)
            assert hash(other) == hash((other.cluster, other.submesh, other.shape))
        assert dataclasses.asdict(m).keys() == {"cluster", "submesh", "shape"}
        assert "_hash" not in repr(m)
