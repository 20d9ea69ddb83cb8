"""StageTables._best_options prices only the options that fit where they are few
(StageTables._fitting_best), and skips the gather of depths onto held rows where each depth
holds its own count. The previous code, an argmin over every (depth, range, start) cell, is the
reference: on random composed tables (with and without ZeRO's last-block recompute figures,
a NaN sync, depths sharing a held count, starts alike), at caps where few, some or all options fit, all five
arrays equal the reference's bit for bit, and both ways are taken."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_search import chained_table

import autopar.search.tables as tables
from autopar.search.range_table import RangeTable
from autopar.search.tables import SearchSpace, StageTables, _first_least


def previous_best_options(st: StageTables, rt: RangeTable) -> tuple[np.ndarray, ...]:
    """_best_options as it was (without its memo), verbatim."""
    held, depth_row = st._held_counts
    at = (st.rep_i, st.rep_j)
    sync = rt.sync[at]                                          # (U, P)
    n_u, n_p = sync.shape[0], sync.shape[1]
    k = rt.least_recompute_layers(st.rep_i, st.rep_j, held, st.space.memory_cap_bytes)  # (H, U, P)
    tt = rt.chosen_time_s(st.rep_i, st.rep_j, k)[depth_row]                                   # (S, U, P)
    k = k[depth_row]
    key = st._slots * tt + sync
    pbest, flat, kbest = _first_least(key)
    return (kbest, tt.ravel()[flat], sync.ravel()[flat % (n_u * n_p)], pbest, k.ravel()[flat])


def _bits(a: np.ndarray) -> bytes:
    return a.dtype.str.encode() + a.tobytes()


@pytest.mark.parametrize("seed", range(6))
def test_best_options_equal_the_argmin_over_every_cell(seed, monkeypatch):
    rng = np.random.default_rng(900 + seed)
    ways = {"fitting": 0, "every cell": 0}
    fitting = StageTables._fitting_best

    def counted_fitting(self, *args):
        out = fitting(self, *args)
        ways["fitting"] += out is not None
        return out

    def counted_argmin(key):
        ways["every cell"] += 1
        return _first_least(key)
    monkeypatch.setattr(StageTables, "_fitting_best", counted_fitting)
    monkeypatch.setattr(tables, "_first_least", counted_argmin)
    L = int(rng.integers(6, 12))
    for variant in range(4):
        rt = chained_table(rng, L)
        # two plain starts alike: their options tie, and the first one wins
        rt = dataclasses.replace(rt, **{f: np.concatenate([getattr(rt, f), getattr(rt, f)[..., -1:]], axis=2)
                                        for f in ("t", "rec", "sync", "param", "stash", "inputs", "max_layer_stash")},
                                 starts=rt.starts + rt.starts[-1:])
        if variant % 2:
            # ZeRO-2/3 per FSDP unit: what recomputing a stage's last block adds
            rt = dataclasses.replace(rt, rec_last=np.where(np.isfinite(rt.t), rng.uniform(0, 0.05, rt.t.shape), np.inf))
        if variant == 3:
            sync = rt.sync.copy()
            sync[1, 3, 2] = np.nan
            rt = dataclasses.replace(rt, sync=sync)
        for B, schedule, S in ((64, "1f1b", L), (3, "1f1b", L), (5, "gpipe", L // 2)):
            for cap in (0.5, 1.0, 1.6, 2.5, 4.0, 100.0):
                st = StageTables(SearchSpace(L, S, B, 8, schedule, cap), 1)
                got = st._best_options(dataclasses.replace(rt, _best={}, _bounds=None))
                want = previous_best_options(st, dataclasses.replace(rt, _best={}, _bounds=None))
                assert [_bits(a) for a in got] == [_bits(a) for a in want], (variant, B, schedule, cap)
    assert ways["fitting"] and ways["every cell"], ways
