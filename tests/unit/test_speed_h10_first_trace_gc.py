"""planner.plan traces the model's first graph (model_source, serial before the workers fork)
under _fewer_collections' thresholds, as the searches already ran. Oracle: the graph traced at
the default thresholds (the previous code) pickles to the same bytes; plan leaves the
collector's thresholds as it found them."""

from __future__ import annotations

import gc
import importlib
import pickle

from autopar.model import ModelSource
from autopar.search import planner

LOAD = importlib.import_module("graphs.load")    # the module (graphs.load is also its function)
SMALL = "gpt:hidden=256,layers=4,heads=4,seq=128,vocab=1024"


def _fresh_trace(batch: int) -> bytes:
    LOAD._ZOO_PREPARED.clear()      # build and trace the zoo module again
    LOAD._ZOO_FX_CACHE.clear()
    return pickle.dumps(ModelSource(SMALL, dtype="fp16").graph(batch))


def test_first_trace_same_graph_under_fewer_collections(monkeypatch):
    monkeypatch.setenv("AUTOPAR_CACHE", "0")          # no graph cache: trace each time
    before = gc.get_threshold()
    for batch in (1, 4):
        old = _fresh_trace(batch)
        with planner._fewer_collections():
            new = _fresh_trace(batch)
        assert new == old
    assert gc.get_threshold() == before


def test_plan_traces_under_fewer_collections_and_restores(monkeypatch):
    monkeypatch.setenv("AUTOPAR_CACHE", "0")
    seen = []
    real = planner.model_source

    def recorded(*a, **k):
        seen.append(gc.get_threshold())
        return real(*a, **k)
    monkeypatch.setattr(planner, "model_source", recorded)
    before = gc.get_threshold()
    p = planner.plan(SMALL, "p3.16xlarge", nodes=1, global_batch=16, workers=1)
    assert p.predicted.fits
    assert seen == [(50_000, 20, 20)]
    assert gc.get_threshold() == before
