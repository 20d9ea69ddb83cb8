"""planner._run_searches runs both microbatch rounds in one pool and starts a guessed round-two
size while round one still runs. Its oracle is the serial order of the previous code (round one
in `sizes` order, then `_second_sizes` of all of round one): the same results in the same
order, whatever was guessed. The searches here are stand-ins with planted step times (the
scheduler reads nothing else); each records that it started, so the test can check that the
wrong guess was really made and dropped, and that a size searched in round one can make
another wait until a guess has started (so the wrong guess is not left to timing)."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import autopar
from autopar.search import planner
from autopar.search.layer_solver import SearchStats

# Size 16 plans best, but only after sizes 1 and 4 finished with 1 ahead: the scheduler then
# guesses size 2 (1's neighbour), while round two is 8 and 32 (16's neighbours).
STEP_S = {1: 10.0, 4: 20.0, 16: 5.0, 64: 30.0, 2: 9.0, 8: 6.0, 32: 7.0}
SIZES = [1, 4, 16, 64]
GLOBAL_BATCH = 1024


class _PlantedJob:
    """What the scheduler calls: search(size) -> SearchResult, deterministic per size."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir

    def search(self, size: int) -> planner.SearchResult:
        (self.log_dir / f"started-{size}").touch()
        if size == 16:
            # wait (bounded) until the guess has started: it needs a free worker while 16 runs
            deadline = time.monotonic() + 30
            while not (self.log_dir / "started-2").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        stats = SearchStats()
        stats.ilps = size                        # per-size counts: a dropped guess must not add its own
        plan = SimpleNamespace(predicted=SimpleNamespace(step_time_s=STEP_S[size]))
        return planner.SearchResult(plan, stats, math.inf, {"microbatch_size": size}, STEP_S[size])


def _rows(results: list[planner.SearchResult]) -> list[tuple[int, float, int]]:
    return [(r.row["microbatch_size"], r.plan.predicted.step_time_s, r.stats.ilps) for r in results]


def _second(first):
    return planner._second_sizes(first, SIZES, GLOBAL_BATCH)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_wrong_guess_is_dropped_and_the_results_match_the_serial_rounds(tmp_path):
    serial_dir, pool_dir = tmp_path / "serial", tmp_path / "pool"
    serial_dir.mkdir()
    pool_dir.mkdir()
    # serially, 16 would wait for a guess that never comes: point it at an existing marker
    (serial_dir / "started-2").touch()
    serial = planner._run_searches(_PlantedJob(serial_dir), SIZES, _second, 1, planner._Progress(False, 0))
    os.remove(serial_dir / "started-2")
    assert _rows(serial) == [(1, 10.0, 1), (4, 20.0, 4), (16, 5.0, 16), (64, 30.0, 64), (8, 6.0, 8),
                             (32, 7.0, 32)]
    pooled = planner._run_searches(_PlantedJob(pool_dir), SIZES, _second, 2, planner._Progress(False, 0))
    assert _rows(pooled) == _rows(serial)
    assert (pool_dir / "started-2").exists()     # the wrong guess was made, and dropped above
    assert sorted(int(p.name.split("-")[1]) for p in serial_dir.iterdir()) == [1, 4, 8, 16, 32, 64]


def test_no_second_round_runs_round_one_only(tmp_path):
    got = planner._run_searches(_PlantedJob(tmp_path), [1, 4], None, 2, planner._Progress(False, 0))
    assert _rows(got) == [(1, 10.0, 1), (4, 20.0, 4)]


def test_plan_with_two_workers_equals_one_worker_across_both_rounds():
    """The real search: a model whose best first-round size gets a second round, both ways."""
    kw = dict(cluster="p3.16xlarge", nodes=1, gpus_per_node=4, global_batch=64)
    one = autopar.plan("gpt:hidden=256,layers=2,heads=4,seq=128,vocab=1024", workers=1, **kw)
    two = autopar.plan("gpt:hidden=256,layers=2,heads=4,seq=128,vocab=1024", workers=2, **kw)
    assert one.to_json() == two.to_json()
    rows = one.search["microbatch_candidates"]
    assert len(rows) > len(planner.microbatch_candidates(64, 4, "auto"))      # a second round ran


def test_the_command_leaves_without_teardown_but_with_its_output_and_exit_status(tmp_path):
    """cli.entry skips the interpreter's teardown (os._exit) after flushing: the plan printed
    on stdout (--json, through a pipe, so block-buffered) is whole and equals the file, the
    status is main's, and a bad input still reports its one-line error and status 2."""
    out = tmp_path / "plan.json"
    env = dict(os.environ, AUTOPAR_CACHE_DIR=str(tmp_path / "cache"))
    # both commands start at once: each spends seconds importing torch, and the test run has a core to spare
    runs = [subprocess.Popen([sys.executable, "-m", "autopar.cli", "plan", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
            for args in (["gpt:hidden=256,layers=2,heads=4,seq=128,vocab=1024", "--nodes", "1", "--gpus-per-node",
                          "2", "--global-batch", "8", "--json", "-o", str(out)], ["no-such-model"])]
    try:
        (stdout, stderr), (_, bad_stderr) = [p.communicate(timeout=300) for p in runs]
    finally:
        for p in runs:
            p.kill()                     # a no-op for a process that has ended
    assert runs[0].returncode == 0, stderr
    assert json.loads(stdout) == json.loads(out.read_text())
    assert stdout == out.read_text()
    assert runs[1].returncode == 2 and bad_stderr.startswith("autopar: error: unknown model")
