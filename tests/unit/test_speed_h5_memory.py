"""The planner's memory habits at scale (exact: neither changes a value, so the plans are the
same; these tests check the mechanisms themselves).

- The range tables are the search's largest arrays (about 7 GB for a 1T GPT at one microbatch
  size when every one was kept); the search keeps them past the loop that builds them only for
  sharded storage, which reads them again.
- `_small_pages` turns NumPy's huge-page requests off while planning (each huge-page fault may
  compact memory first) and restores the caller's setting after.
- A pool worker takes its large arrays from the heap (`_tables_from_the_heap`): a range table
  freed and made again reuses the freed one's pages instead of faulting in fresh ones."""

from __future__ import annotations

import gc
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.search import planner
from autopar.search.candidates import dp_candidates
from autopar.search.layer_solver import SearchStats
from autopar.search.planner import SearchJob, _small_pages
from autopar.search.range_table import RangeTable, range_tables

MODEL = "gpt:hidden=512,layers=2,heads=8,seq=256,vocab=4096"


def _live_range_tables() -> int:
    """Range tables made since `frozen_heap` froze the older objects (gc.collect and
    gc.get_objects skip frozen ones)."""
    gc.collect()
    return sum(type(o) is RangeTable for o in gc.get_objects())   # (type, not isinstance: it would touch deprecated torch attributes)


@pytest.fixture
def frozen_heap():
    """Late in a full test run the heap holds millions of objects, which each gc.collect and
    gc.get_objects walked (seconds each): the objects from before the test are frozen out."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.mark.parametrize("storage", [False, True])
def test_range_tables_outlive_their_loop_only_for_sharded_storage(storage, monkeypatch, frozen_heap):
    """Counted when the DP starts, after the loop over meshes: with sharded storage every table
    built is still alive, without it fewer than were built (each dies with its iteration;
    a handful may stay referenced by a caught exception's frames, which is not the point)."""
    built, live_at_dp = [], []

    def counting_range_tables(*args, **kwargs):
        pair = range_tables(*args, **kwargs)
        built.extend({id(t): t for t in pair}.values())
        return pair

    def counting_dp_candidates(*args, **kwargs):
        live_at_dp.append(_live_range_tables())
        return dp_candidates(*args, **kwargs)

    monkeypatch.setattr(planner, "range_tables", counting_range_tables)
    monkeypatch.setattr(planner, "dp_candidates", counting_dp_candidates)
    cl = load_cluster("p3.16xlarge", 1, 4)
    job = SearchJob(ModelSource(MODEL), cl, 8, "1f1b", None, cl.gpu.training_dtype(None), 1, 10.0, "highs", "ilp",
                    sharded_storage=storage)
    before = _live_range_tables()
    n_built = []

    def forget_built(*args, **kwargs):
        # the list above must not keep them alive: count, then drop the references
        n_built.append(len(built))
        built.clear()
        return counting_dp_candidates(*args, **kwargs)

    monkeypatch.setattr(planner, "dp_candidates", forget_built)
    prop = job.propose(2, SearchStats())
    assert prop.candidates
    assert n_built[0] >= 4
    kept = live_at_dp[0] - before
    if storage:
        assert kept >= n_built[0]
    else:
        assert kept < n_built[0]


def _setter():
    setter = getattr(np._core.multiarray, "_set_madvise_hugepage", None)
    if setter is None:
        pytest.skip("this NumPy has no huge-page switch")
    return setter


@pytest.mark.parametrize("initial", [True, False])
def test_small_pages_turns_huge_pages_off_and_restores_the_setting(initial):
    setter = _setter()
    original = setter(initial)
    try:
        with _small_pages():
            assert setter(False) is False       # off inside (setter returns the previous value)
        assert setter(initial) is initial       # the caller's setting is back
        with pytest.raises(RuntimeError), _small_pages():
            raise RuntimeError("restored on the way out too")
        assert setter(initial) is initial
    finally:
        setter(original)


# A fresh interpreter, not a fork of this one: a forked child inherits this process's heap, where a
# freed chunk as large as a table (left by earlier tests) serves it without the mmap path either way.
_SECOND_TABLE = """
import resource, sys
import numpy as np
from autopar.search import planner
if sys.argv[1] == "heap":
    planner._tables_from_the_heap()
with planner._small_pages():         # as the planner runs (4 KiB pages)
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.full((9, 128, 129, 32), np.inf)      # a range table of the 405B shape (38 MiB)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        del a
print(faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_worker_reuses_a_freed_tables_pages():
    """In a fresh process (the setting is for good there, as in a pool worker): the second
    38 MiB table faults in its 9,700 pages again by default, hardly any from the heap."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    # both at once (each counts its own faults): most of each one's time is importing autopar and torch
    runs = {mode: subprocess.Popen([sys.executable, "-c", _SECOND_TABLE, mode], stdout=subprocess.PIPE, text=True,
                                   env=env) for mode in ("default", "heap")}
    try:
        outs = {mode: p.communicate(timeout=120)[0] for mode, p in runs.items()}
    finally:
        for p in runs.values():
            p.kill()                     # a no-op for a process that has ended
    assert all(p.returncode == 0 for p in runs.values()), outs
    faults = {mode: int(out.split()[-1]) for mode, out in outs.items()}
    page = resource.getpagesize()
    assert faults["default"] > 0.9 * 9 * 128 * 129 * 32 * 8 / page, faults
    assert faults["heap"] < 0.01 * faults["default"], faults
