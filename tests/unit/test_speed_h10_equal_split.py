"""_equal_split (the equal-layer candidates, uniform and interleaved) reads each chunk's options
once for both its passes, and makes its `follows` matrix by numbering the start layouts
(candidates._follows). The previous code is the reference: the P x P matrix of StartLayout
comparisons, on the starts of real range tables and on made-up ones (duplicates, starts at the
embedding, both seq_split variants), and the options made again in each pass
(candidates.REUSE_OPTIONS = False): on every submesh and logical mesh of an 8-GPU and a 16-GPU
cluster, at the GPU's memory and at tighter caps, with and without sharded storage, the candidates are equal (their reprs: floats
round-trip) and there are some of each kind."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import autopar.search.candidates as C
from autopar.hardware.mesh import Mesh, searched_meshes
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.search.layer_solver import SearchStats, StartLayout
from autopar.search.planner import SearchJob
from autopar.search.range_table import range_tables
from autopar.search.tables import SearchSpace, boundary_p2p_s, storage_items

MODEL = "gpt:hidden=256,layers=8,heads=4,seq=128,vocab=1024"


def previous_follows(starts) -> np.ndarray:
    """_equal_split's follows as it was, verbatim."""
    P = len(starts)
    return np.array([[starts[q] == StartLayout(starts[q0].spec, seq_split=starts[q0].seq_split)
                      for q in range(P)]
                     for q0 in range(P)])


def test_follows_equals_the_comparisons():
    rng = np.random.default_rng(15)
    specs = [(0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 2), (2, 0, 1)]
    for _ in range(200):
        n = int(rng.integers(1, 12))
        starts = [StartLayout(specs[int(rng.integers(len(specs)))], bool(rng.integers(2)), bool(rng.integers(2)))
                  for _ in range(n)]
        new = C._follows(starts)
        assert new.dtype == bool and np.array_equal(new, previous_follows(starts))


def _cases(nodes: int, sharded: bool):
    cl = load_cluster("p3.16xlarge", nodes, 8)
    job = SearchJob(ModelSource(MODEL), cl, 64, "1f1b", None, cl.gpu.training_dtype(None), 1, 10.0, "highs", "ilp",
                    sharded_storage=sharded)
    prop = job.propose(2, SearchStats())
    L = len(prop.graph.layers)
    # at the GPU's memory, and at caps that only some options fit (where storing groups
    # sharded can win)
    spaces = [SearchSpace(L, min(L, cl.n_gpus), 32, cl.n_gpus, "1f1b", cap)
              for cap in (cl.gpu.memory_bytes, 3e7, 1e7, 5e6, 3e6, 2e6, 1e6)]
    p2p = boundary_p2p_s(cl, prop.graph, prop.solver.inputs, prop.subs)
    for mi, sub in enumerate(prop.subs):
        for shape in searched_meshes(cl, sub):
            mesh = Mesh(cl, sub, shape)
            full, lean = range_tables(prop.solver, mesh)
            for rt in [full] if full is lean else [full, lean]:
                items = functools.partial(storage_items, prop.solver, mesh, rt, chains={}) if sharded else None
                for space in spaces:
                    yield mi, sub, shape, space, p2p[mi], rt, items


@pytest.mark.parametrize("nodes,sharded", [(1, False), (2, False), (1, True)])
def test_equal_split_reads_each_chunks_options_once(nodes, sharded, monkeypatch):
    found = {1: 0, 2: 0}
    for mi, sub, shape, space, p2p, rt, items in _cases(nodes, sharded):
        assert np.array_equal(C._follows(rt.starts), previous_follows(rt.starts))
        for chunks in (1, 2):
            got = {}
            for reuse in (True, False):
                monkeypatch.setattr(C, "REUSE_OPTIONS", reuse)
                got[reuse] = repr(C._equal_split(rt, mi, sub, shape, space, p2p, chunks=chunks, storage=items))
            assert got[True] == got[False]
            found[chunks] += got[True] != "[]"
    assert found[1] and found[2]
