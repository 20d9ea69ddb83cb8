"""RangeTable.least_recompute_layers answers the cells its bounds leave open per count of
recomputed layers (`_fitting_rows`: how many rows fit at each count, a prefix where the memory
grows with the microbatches held) instead of per cell (a bisection on a bound, then a scan).
The previous search is the reference (its cell-by-cell part is RangeTable._search_cells, the
fallback least_recompute_layers keeps): on random composed tables, with
and without the eager recipe's working set and cap, at many caps and held counts, the answers
agree to the element, also where the count search cannot apply (a negative kept stash, held
counts not ascending: the previous search then runs as before); `_fitting_rows` itself is
checked against counting the rows one by one with the formula written out. A table offered to
two stage tables of one space (the planner's every-option and no-sequence-split tables) has its
best options per cell worked out once (StageTables._best_options), and both equal a stage table
given a fresh copy."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from test_search import chained_table, synthetic_table

import autopar.search.range_table as rtm
from autopar.costmodel.memory import stage_working_bytes
from autopar.search.range_table import RangeTable, _kept_memory_bytes, _relaxed, _rows_while
from autopar.search.tables import SearchSpace, StageTables


def previous_least_recompute_layers(rt: RangeTable, i: np.ndarray, j: np.ndarray, inflight: np.ndarray,
                                    cap_bytes: float) -> np.ndarray:
    """least_recompute_layers before the count search (without its memo), as it was: the
    cells its bounds leave open go to the cell-by-cell search (RangeTable._search_cells, which
    least_recompute_layers still runs where the count search cannot apply)."""
    held = np.asarray(inflight, dtype=np.float64).reshape(-1)
    i, j = np.asarray(i), np.asarray(j)
    at = (i, j)
    n_h, n_u, n_p = len(held), len(i), rt.t.shape[2]
    out = np.full((n_h, n_u * n_p), -1)
    fin = np.flatnonzero(np.isfinite(rt.t[at]).ravel())
    stash_c = rt.stash[at].ravel()[fin]
    param_c = rt.param[at].ravel()[fin] - (np.broadcast_to(rt.cap_bytes(cap_bytes, at), rt.t[at].shape)
                                           .ravel()[fin] - cap_bytes)
    extra_c = ((rt.loss[at].ravel()[fin], rt.block[at].ravel()[fin])
               if rt.loss is not None and rt.block is not None else (np.zeros(len(fin)), np.zeros(len(fin))))

    def working(w, c=slice(None)):
        return stage_working_bytes(w, extra_c[0][c], extra_c[1][c])
    most, least_w, _ = rt._prefix_bounds()
    relaxed_cap = _relaxed(cap_bytes)
    with np.errstate(invalid="ignore"):
        least_kept_c = stash_c - most[at].ravel()[fin]
    least_w_c = least_w[at].ravel()[fin]
    n_f = len(fin)
    if (n_h > 1 and bool((np.diff(held) > 0).all()) and bool((held >= 0).all())
            and bool((stash_c >= 0).all()) and bool((least_kept_c >= 0).all())):
        r0 = _rows_while(lambda r, c: param_c[c] + held[r] * stash_c[c] + working(0.0, c) <= cap_bytes, n_h, n_f)
        r1 = _rows_while(lambda r, c: param_c[c] + held[r] * least_kept_c[c] + working(least_w_c[c], c)
                         <= relaxed_cap, n_h, n_f)
        out_c = np.where(np.arange(n_h)[:, None] < r0[None, :], 0, -1)
        span = np.maximum(r1 - r0, 0)
        col_of = np.repeat(np.arange(n_f), span)
        row_of = np.repeat(r0 - np.cumsum(span) + span, span) + np.arange(int(span.sum()))
        cells = row_of * n_f + col_of
    else:
        hc = held[:, None]
        mem0 = param_c + hc * stash_c + working(0.0)
        out_c = np.where(mem0 <= cap_bytes, 0, -1)
        with np.errstate(invalid="ignore"):
            floor = param_c + hc * least_kept_c + working(least_w_c)
        cells = np.flatnonzero((out_c < 0) & (floor <= relaxed_cap))
    if cells.size:
        rt._search_cells(cells, out_c, fin, i, j, held, param_c, stash_c, least_kept_c, working, cap_bytes)
    out[:, fin] = out_c
    return out.reshape(n_h, n_u, n_p)


def _eager(rt: RangeTable, rng: np.random.Generator) -> RangeTable:
    """The table with the eager recipe's arrays: a working set beside the recomputed layer's
    (loss, block) and a cap of its own per cell (pool, absent, tied_grad)."""
    shape = rt.t.shape
    fin = np.isfinite(rt.t)

    def arr(lo: float, hi: float) -> np.ndarray:
        return np.where(fin, rng.uniform(lo, hi, shape), np.inf)
    rt.loss, rt.block, rt.pool, rt.absent = arr(0.0, 0.15), arr(0.0, 0.05), arr(0.0, 0.1), arr(0.0, 0.1)
    rt.tied_grad = np.zeros(shape)
    return rt


def _every_range(n_layers: int) -> tuple[np.ndarray, np.ndarray]:
    return np.nonzero(np.arange(n_layers + 1)[None, :] > np.arange(n_layers)[:, None])


@pytest.mark.parametrize("seed", range(12))
def test_the_count_search_gives_the_previous_answers(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(3, 11))
    rt = chained_table(rng, L)
    if seed % 2:
        rt = _eager(rt, rng)
    i, j = _every_range(L)
    taken = []
    real = RangeTable._fitting_rows
    monkeypatch.setattr(RangeTable, "_fitting_rows", lambda *a: taken.append(r := real(*a)) or r)
    seen = set()
    for _ in range(8):
        held = np.cumsum(rng.integers(1, 4, int(rng.integers(2, 14)))).astype(float)
        mem = rt.param[np.isfinite(rt.param)]
        for cap in np.quantile(mem, [0.05, 0.3, 0.6, 0.9]) + rng.uniform(0, 0.5) * held[-1] * 0.1:
            got = rt.least_recompute_layers(i, j, held, float(cap))
            want = previous_least_recompute_layers(rt, i, j, held, float(cap))
            assert np.array_equal(got, want), (seed, held, cap)
            seen.update({"none" if x == 0 else "no fit" if x < 0 else "some" for x in np.unique(got)})
    assert any(r is not None for r in taken)     # the count search ran
    assert seen == {"none", "no fit", "some"}


@pytest.mark.parametrize("seed", range(6))
def test_where_the_count_search_cannot_apply_the_answers_are_the_previous_ones(seed):
    """Held counts not ascending or a single one, and synthetic_table's unrelated prefixes
    (memory not monotone in the held counts), skip the count search: the previous one runs."""
    rng = np.random.default_rng(100 + seed)
    L = 7
    i, j = _every_range(L)
    with np.errstate(invalid="ignore"):
        for rt in (chained_table(rng, L), synthetic_table(rng, L)):
            for held in (np.array([1.0, 2.0, 3.5, 6.0]), np.array([3.0, 1.0, 2.0]), np.array([2.0])):
                for cap in (0.5, 1.0, 1.5, 2.5, 4.0):
                    got = rt.least_recompute_layers(i, j, held, cap)
                    assert np.array_equal(got, previous_least_recompute_layers(rt, i, j, held, cap))


def test_a_kept_stash_below_zero_by_rounding_declines_the_count_search(monkeypatch):
    """The bounds' kept stash (stash less the prefix's stash less inputs) can be >= 0 where the
    formula's (stash less the prefix's stash, plus its inputs) rounds below 0: the memory then
    falls with the held counts, the rows that fit need not be a prefix, and _fitting_rows
    declines (None) so the previous search answers."""
    L, P = 2, 1
    rt = chained_table(np.random.default_rng(0), L, specs=[(0, 0, 0)])
    rt = RangeTable(*(np.where(np.isfinite(x), 0.0, np.inf) for x in (rt.t, rt.rec, rt.sync, rt.param, rt.stash,
                                                                        rt.inputs, rt.max_layer_stash)),
                    starts=rt.starts[:P])
    p = 0                                        # [0, j) is entered at the embedding
    rt.t[0, 1:, p] = 1.0
    rt.stash[0, 2, p], rt.inputs[0, 2, p] = 1.0, 0.0
    rt.stash[0, 1, p], rt.inputs[0, 1, p] = 1.0 + 2.0 ** -52, 2.0 ** -53
    assert (rt.stash[0, 2, p] - rt.stash[0, 1, p]) + rt.inputs[0, 1, p] < 0 <= rt.stash[0, 2, p] - (
        rt.stash[0, 1, p] - rt.inputs[0, 1, p])
    taken = []
    real = RangeTable._fitting_rows
    monkeypatch.setattr(RangeTable, "_fitting_rows", lambda *a: taken.append(r := real(*a)) or r)
    i, j, held = np.array([0]), np.array([2]), np.array([1.0, 2.0])
    got = rt.least_recompute_layers(i, j, held, 1.5)
    assert taken == [None]
    assert got[:, 0, p].tolist() == [0, 1]
    assert np.array_equal(got, previous_least_recompute_layers(rt, i, j, held, 1.5))


@pytest.mark.parametrize("seed", range(6))
def test_fitting_rows_counts_the_rows_that_fit_at_each_count(seed):
    rng = np.random.default_rng(200 + seed)
    L = 9
    rt = chained_table(rng, L)
    loss = rng.uniform(0, 0.1, 64)
    cols = [(int(a), int(b), int(p)) for a, b in zip(*_every_range(L)) for p in range(len(rt.starts))
            if math.isfinite(rt.t[a, b, p])]
    i, j, p = (np.array(x) for x in zip(*cols))
    param = rt.param[i, j, p] - rng.uniform(0, 0.2, len(i))
    stash = rt.stash[i, j, p]
    held = np.array([1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0])
    for cap in (0.6, 1.0, 1.6, 2.5):
        got = rt._fitting_rows(i, j, p, param, stash, lambda w, c: stage_working_bytes(w, loss[c % 64]), held, cap)
        x = 0
        for c, (a, b, q) in enumerate(cols):
            for k in range(1, b - a + 1):
                mem = [_kept_memory_bytes(param[c], stash[c], rt.stash[a, a + k, q], rt.inputs[a, a + k, q],
                                          stage_working_bytes(rt.max_layer_stash[a, a + k, q], loss[c % 64]), h)
                       for h in held]
                fit = [m <= cap for m in mem]
                assert got[x] == sum(fit) and all(fit[:sum(fit)]), (cap, a, b, q, k)
                x += 1
        assert x == len(got)
    # counts 1..3 fit rows < 2, < 1 and < 4; the one count of the second column fits none
    assert rtm._least_count(np.array([2, 1, 4, 0]), np.array([3, 1]), np.array([0, 0, 0, 0, 0, 1]),
                            np.array([0, 1, 2, 3, 4, 0]), 5).tolist() == [1, 1, 3, 3, -1, -1]


@pytest.mark.parametrize("seed", range(4))
def test_a_table_offered_twice_reads_its_best_options_back(seed):
    """StageTables._best_options keeps a table's best options per cell on the table, by their
    arguments: a second stage table of the same space reads them back, one of another space
    (microbatches, memory cap) works its own out; every one equals a stage table given a fresh
    copy of the table (no memo)."""
    rng = np.random.default_rng(300 + seed)
    L = 8
    rt = chained_table(rng, L)
    fresh = lambda: dataclasses.replace(rt, _best={}, _bounds=None)     # noqa: E731
    spaces = [SearchSpace(L, 4, b, 8, "1f1b", cap) for b in (2, 6) for cap in (1.2, 2.0)]
    for sp in spaces + spaces:
        got, want = StageTables(sp, 1), StageTables(sp, 1)
        got.add(0, (1, 1), rt)
        want.add(0, (1, 1), fresh())
        assert got.class_cells.tobytes() == want.class_cells.tobytes()
        assert np.isfinite(got.class_cells["key_s"]).any()
    assert len(rt._best) == len(spaces)
