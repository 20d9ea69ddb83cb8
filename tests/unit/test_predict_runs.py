"""bench/truth/predict_runs.py's check that a measured row ran the plan it is compared with."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = "gpt:hidden=64,layers=4,heads=4,seq=32,vocab=128"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def modules():
    pr = _load("predict_runs", ROOT / "bench/truth/predict_runs.py")     # puts bench/ on sys.path
    assert str(ROOT / "bench") in sys.path
    import runtime_vs_native as bench
    return pr, bench


def _row(layout: str | None) -> dict:
    return {"model": "gpt-tiny", "autopar": {} if layout is None else {"layout": layout}}


@pytest.mark.parametrize("strategy, ran, mismatch", [
    # by construction: build_3d's dp2 plan runs dp=2, tp=1 on the engines, its tp2 plan dp=1, tp=2
    ("dp", "StageLayout(dp=2, tp=1, dp_axis=0, split_embeddings=())", False),
    ("dp", "StageLayout(dp=1, tp=2, dp_axis=0, split_embeddings=())", True),
    ("tp", "StageLayout(dp=1, tp=2, dp_axis=0, split_embeddings=('wpe', 'wte'))", False),
    ("tp", "StageLayout(dp=2, tp=1, dp_axis=1, split_embeddings=())", True),
    ("tp", None, False),                 # no layout recorded: nothing to hold the plan against
])
def test_layout_mismatch_names_the_degrees(modules, strategy, ran, mismatch):
    pr, bench = modules
    from autopar.model import ModelSource
    plan = bench.make_plan(TINY, strategy, 2, 2, "dgx-h200")
    graph = ModelSource(TINY).graph(plan.training.microbatch_size)
    why = pr.layout_mismatch(_row(ran), plan, graph)
    if not mismatch:
        assert why == ""
    else:
        now = "dp=2, tp=1" if strategy == "dp" else "dp=1, tp=2"
        other = "dp=1, tp=2" if strategy == "dp" else "dp=2, tp=1"
        assert why == f"its first stage now runs {now}; the row ran {other}"
