"""Figures of every layer range [i, j) on one logical mesh, per start layout, from the layer
solutions (layer_solver.py): a suffix recursion over (layer, layout) states, so each state's
layer is looked up once, summed one layer at a time for every state of the layer.

The stage's first and last block. ZeRO-2/3 per FSDP unit (evaluator.zero_units) price a block
by its place in the stage: nothing before the first block's forward gather and after the last
block's backward gather to hide them behind. A layer solution carries its figures as a block
inside a stage and what being first, last or only adds (LayerSol.zero_ends); the tables add the
latter for each range's end blocks (`_add_block_ends`), so a range's figures are the
evaluator's for a stage of those layers under the same strategies (tests check it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from autopar.costmodel.eager import stage_allocatable_bytes, tied_embedding_grad_bytes
from autopar.costmodel.memory import stage_working_bytes, stash_after_recompute, working_after_recompute
from autopar.evaluation.evaluator import tied_copy_elems, tied_embedding_elems
from autopar.hardware.mesh import Mesh
from autopar.search.layer_solver import (
    EAGER_NO_DELTA,
    EAGER_ROWS,
    LayerSol,
    LayerSolver,
    StartLayout,
    ZeroEnds,
    boundary_specs,
)
from autopar.sharding.spec import Spec

__all__ = ["RECOMPUTE_OPTIONS", "RangeTable", "range_table", "range_tables"]

RECOMPUTE_OPTIONS = ("none", "full")


@dataclass
class RangeTable:
    """Per (start layer i, end j) on one mesh, arrays [L, L+1, P] over the P start layouts;
    inf where the range cannot be entered in that layout (a stage starting at layer 0 is entered
    only at the embedding, any other only in a plain layout)."""

    t: np.ndarray            # forward + backward per microbatch, seconds
    rec: np.ndarray          # the forward once more (full recompute), seconds
    sync: np.ndarray         # per step after the last backward: gradient sync and optimizer step, seconds
    param: np.ndarray        # weights, gradients and optimizer state per device, and what is held with them
                             # (the eager recipe's buffers; a tied head's copy, _add_tied_copies), bytes
    stash: np.ndarray        # activations kept per microbatch in flight, bytes
    inputs: np.ndarray       # sum of the layers' inputs (full recompute keeps only those), bytes
    max_layer_stash: np.ndarray  # the most one layer rebuilds (LayerSol.rebuilt_bytes; one layer at a time), bytes
    starts: list[StartLayout]    # start layout per P index
    uses_seq_split: bool = False  # some layer solution in the table splits the sequence
    # ZeRO-2/3 per FSDP unit (evaluator.zero_units): what recomputing a stage's last block
    # adds beyond `rec` (module doc, "the stage's first and last block"); None: nothing
    rec_last: np.ndarray | None = None
    # eager: the loss's fp32 tensors and FSDP2's largest block's buffers, the working set beside
    # the recomputed layer's (memory.stage_working_bytes), bytes; None: none
    loss: np.ndarray | None = None
    block: np.ndarray | None = None
    # eager: FSDP2's gradient pool (LayerSol.grad_pool_bytes), the state absent at a one-microbatch
    # step's activation peak (LayerSol.grads_absent_bytes), a tied embedding's gradient at the end
    # of the backward (_add_tied_copies), bytes; None: none
    pool: np.ndarray | None = None
    absent: np.ndarray | None = None
    tied_grad: np.ndarray | None = None
    _bounds: tuple[np.ndarray, np.ndarray, bool] | None = field(default=None, repr=False, compare=False)
    # StageTables' best options per cell by their arguments (StageTables._best_options): the
    # planner offers one table to two stage tables alike (every option, and without sequence splits)
    _best: dict[tuple, tuple[np.ndarray, ...]] = field(default_factory=dict, repr=False, compare=False)

    def time_s(self, recompute: str, at: tuple = ()) -> np.ndarray:
        """Per-microbatch time under a recompute option, of every cell or of the cells at `at`
        (an index such as (i, j))."""
        if recompute != "full":
            return self.t[at]
        return self.t[at] + self.rec[at] + (self.rec_last[at] if self.rec_last is not None else 0.0)

    def _last_block_rec(self, i: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
        """rec_last of cells [i, j) (shape X + (P,)) where their first k layers take in the
        stage's last block (the layers outside the blocks, the first and the last, are root
        units), else 0; i, j, k broadcast to X."""
        if self.rec_last is None:
            return np.zeros(self.t[i, j].shape)
        n = self.t.shape[0]
        covered = i + k > np.minimum(j - 1, n - 2)
        return np.where(covered[..., None], self.rec_last[i, j], 0.0)

    def cap_bytes(self, cap_bytes: float, at: tuple = ()) -> float | np.ndarray:
        """What the memory of cells `at` (memory_bytes, layers_memory_bytes) may reach on a GPU
        whose cap is `cap_bytes` (SearchSpace.memory_cap_bytes): under the eager recipe the
        evaluator's, raised by the stage's FSDP2 gradient pool and lowered where its loss
        segment outgrows the allocator's reserve (eager.stage_allocatable_bytes); else the cap."""
        if self.pool is None or self.loss is None or self.absent is None or self.tied_grad is None:
            return cap_bytes
        return stage_allocatable_bytes(cap_bytes, self.pool[at], self.loss[at], self.absent[at],
                                       self.param[at] + self.tied_grad[at])

    def working_bytes(self, recompute_working_bytes, at: tuple = ()) -> np.ndarray:
        """The working set of cells `at` beside the stashes, with `recompute_working_bytes`
        (shaped as the cells, or broadcast) rebuilt by recomputation: the evaluator's
        (memory.stage_working_bytes)."""
        if self.loss is None or self.block is None:
            return stage_working_bytes(recompute_working_bytes)
        return stage_working_bytes(recompute_working_bytes, self.loss[at], self.block[at])

    def memory_bytes(self, recompute: str, inflight: float | np.ndarray, at: tuple = ()) -> np.ndarray:
        """Memory per device with `inflight` microbatches' activations held (an array of
        counts broadcasts against the cells): full recompute keeps each layer's input and
        rebuilds one layer's activations at a time."""
        if recompute == "full":
            return (self.param[at] + inflight * stash_after_recompute("full", self.stash[at], self.inputs[at])
                    + self.working_bytes(working_after_recompute("full", self.max_layer_stash[at]), at))
        return self.param[at] + inflight * self.stash[at] + self.working_bytes(0.0, at)

    # Recomputing some layers of a stage (Megatron's --recompute-method block): the stage's
    # first k layers are recomputed, the rest keep their activations. The k recomputed layers of
    # cell (i, j) entered in layout p are the range [i, i + k) entered in p, so their figures are
    # the table's own cells: no array beyond the full range's is needed. k = 0 is "none" and
    # k = j - i is "full", to the bit (memory.stash_after_recompute).

    def layers_time_s(self, i, j, k) -> np.ndarray:
        """Per-microbatch time of cells [i, j) with their first k layers recomputed; i, j and k
        are integer arrays (or ints) broadcast together to a shape X, the result is X + (P,)."""
        i, j, k = np.broadcast_arrays(np.asarray(i), np.asarray(j), np.asarray(k))
        t = self.t[i, j]
        rec = self.rec[i, i + k]
        if self.rec_last is not None:
            rec = rec + self._last_block_rec(i, j, k)
        return np.where((k > 0)[..., None], t + rec, t)

    def chosen_time_s(self, i: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Per-microbatch time of cells [i[u], j[u]) with, per start layout, the first k[..., u, p]
        layers recomputed (k shaped (..., U, P), as least_recompute_layers gives it); inf where
        k < 0 (no count fits)."""
        i, j = np.asarray(i), np.asarray(j)
        out = np.where(k >= 0, self.t[i, j], np.inf)
        some = np.flatnonzero(k > 0)
        if some.size:
            # few cells recompute some layers: gather their prefixes only
            n_u, n_p = k.shape[-2:]
            up = some % (n_u * n_p)
            u, p = up // n_p, up % n_p
            flat = out.reshape(-1)            # out is new and contiguous: a view
            flat[some] = self.recomputed_time_s(flat[some], i[u], j[u], p, k.ravel()[some])
        return out

    def recomputed_time_s(self, t: np.ndarray, i: np.ndarray, j: np.ndarray, p: np.ndarray,
                          k: np.ndarray) -> np.ndarray:
        """t, the times of cells [i, j) entered in p without recomputation, with their first
        k > 0 layers recomputed (all arrays of one shape)."""
        # by flat indices: cheaper than indexing with three arrays
        t = t + self.rec.ravel()[np.ravel_multi_index((i, i + k, p), self.rec.shape)]
        if self.rec_last is not None:
            covered = i + k > np.minimum(j - 1, self.t.shape[0] - 2)
            t += np.where(covered, self.rec_last[i, j, p], 0.0)
        return t

    def layers_memory_bytes(self, i, j, k, inflight) -> np.ndarray:
        """Memory per device of cells [i, j) with their first k layers recomputed (as
        layers_time_s; `inflight` broadcasts against X + (P,))."""
        i, j, k = np.broadcast_arrays(np.asarray(i), np.asarray(j), np.asarray(k))
        pre = (i, i + k)
        with np.errstate(invalid="ignore"):      # k = 0 reads the empty range [i, i): inf - inf
            some = _kept_memory_bytes(self.param[i, j], self.stash[i, j], self.stash[pre], self.inputs[pre],
                                      self.working_bytes(self.max_layer_stash[pre], (i, j)), inflight)
        return np.where((k > 0)[..., None], some, self.memory_bytes("none", inflight, (i, j)))

    def least_recompute_layers(self, i: np.ndarray, j: np.ndarray, inflight: np.ndarray,
                               cap_bytes: float) -> np.ndarray:
        """Per cell (depth s, range u = [i[u], j[u]), start p), with inflight[s] microbatches
        held: the fewest first layers to recompute for the stage to fit in `cap_bytes`, -1
        where no count does. Exact: the time grows with k (each recomputed layer adds its
        forward, >= 0), so the least fitting k is the fastest fitting option; every k below the
        answer is ruled out, by layers_memory_bytes' own formula or by a bound that holds
        for every smaller k (below). Where the memory grows with the microbatches held at every
        k (every table range_tables builds), the cells the bounds leave open are answered from
        each k's rows that fit (_fitting_rows), without the bounds; elsewhere the cell-by-cell
        search answers them (_search_cells, the reference in
        tests/unit/test_speed_h8_least_recompute.py).

        i, j: (U,) ints; inflight: (S,) -> (S, U, P) ints."""
        n_h, n_u, n_p = np.size(inflight), len(i), self.t.shape[2]
        fin, least = self.least_recompute_cells(i, j, inflight, cap_bytes)
        out = np.full((n_h, n_u * n_p), -1)
        out[:, fin] = least
        return out.reshape(n_h, n_u, n_p)

    def least_recompute_cells(self, i: np.ndarray, j: np.ndarray, inflight: np.ndarray,
                              cap_bytes: float) -> tuple[np.ndarray, np.ndarray]:
        """least_recompute_layers of the cells a stage can be entered in (finite time; the
        others are -1 throughout): their flat indices into (U, P), ascending, and (S, F) counts."""
        held = np.asarray(inflight, dtype=np.float64).reshape(-1)
        i, j = np.asarray(i), np.asarray(j)
        at = (i, j)
        n_h, n_p = len(held), self.t.shape[2]
        fin = np.flatnonzero(np.isfinite(self.t[at]).ravel())
        stash_c = self.stash[at].ravel()[fin]                                             # (F,)
        # each cell's memory against its own cap (cap_bytes), as its memory less what its cap
        # adds to `cap_bytes` against that: the bounds below shift with it, a constant per cell
        param_c = self.param[at].ravel()[fin] - (np.broadcast_to(self.cap_bytes(cap_bytes, at), self.t[at].shape)
                                                 .ravel()[fin] - cap_bytes)
        # the working set beside a recomputed layer's `w` (memory.stage_working_bytes), per cell;
        # it grows with w, so the bounds below hold through it
        extra_c = ((self.loss[at].ravel()[fin], self.block[at].ravel()[fin])
                   if self.loss is not None and self.block is not None else (np.zeros(len(fin)), np.zeros(len(fin))))

        def working(w: float | np.ndarray, c: np.ndarray | slice = slice(None)) -> np.ndarray:
            return stage_working_bytes(w, extra_c[0][c], extra_c[1][c])
        # Bounds that rule k out without its exact memory. Recomputing k layers keeps at least
        # the stash less the most any prefix of at most k layers saves (stash less inputs,
        # `most`, which grows with k), and rebuilds at least the least working set of those
        # prefixes (`least_w`, which falls with k; the first layer's stash in a composed table),
        # so
        #   bound(k) = param + held * (stash - most[k]) + least_w[k]
        # falls with k and is below the memory of every k' <= k. Where the working set grows
        # with k (the largest stash of k layers: every table range_tables builds),
        #   param + held * (stash - most[n]) + max_layer_stash[k]
        # grows with k and is below the memory of every k' >= k. Each is compared with the cap
        # plus a margin far above rounding, so no k that fits is ruled out: a cell whose first
        # bound is over at k = n never fits, the search starts at the least k the first bound
        # allows (bisection), and a cell leaves the scan once the second is over.
        most, least_w, _ = self._prefix_bounds()
        relaxed_cap = _relaxed(cap_bytes)
        with np.errstate(invalid="ignore"):
            least_kept_c = stash_c - most[at].ravel()[fin]
        least_w_c = least_w[at].ravel()[fin]
        n_f = len(fin)
        if (n_h > 1 and bool((np.diff(held) > 0).all()) and bool((held >= 0).all())
                and bool((stash_c >= 0).all()) and bool((least_kept_c >= 0).all())):
            # Both sides grow with the microbatches held (rounding is monotone), so per cell
            # the rows that fit without recomputation are the first r0, and the rows the first
            # bound leaves open end at r1: found by bisection over the rows, not row by row.
            r0 = _rows_while(lambda r, c: param_c[c] + held[r] * stash_c[c] + working(0.0, c) <= cap_bytes, n_h, n_f)
            r1 = _rows_while(lambda r, c: param_c[c] + held[r] * least_kept_c[c] + working(least_w_c[c], c)
                             <= relaxed_cap, n_h, n_f)
            out_c = np.where(np.arange(n_h)[:, None] < r0[None, :], 0, -1)
            span = np.maximum(r1 - r0, 0)
            col_of = np.repeat(np.arange(n_f), span)
            row_of = np.repeat(r0 - np.cumsum(span) + span, span) + np.arange(int(span.sum()))
            cells = row_of * n_f + col_of
            if cells.size:
                # The rows left open, per count instead of per cell where the memory grows with
                # the rows at every count too (_fitting_rows): no bound needed, no cell left.
                cols = np.flatnonzero(span)
                u_c, p_c = fin[cols] // n_p, fin[cols] % n_p
                fit_rows = self._fitting_rows(i[u_c], j[u_c], p_c, param_c[cols], stash_c[cols],
                                              lambda w, c: working(w, cols[c]), held, cap_bytes)
                if fit_rows is not None:
                    out_c.flat[cells] = _least_count(fit_rows, j[u_c] - i[u_c], np.repeat(np.arange(len(cols)), span[cols]),
                                                     row_of, n_h)
                    cells = cells[:0]
        else:
            hc = held[:, None]
            mem0 = param_c + hc * stash_c + working(0.0)
            out_c = np.where(mem0 <= cap_bytes, 0, -1)                                    # (H, F)
            with np.errstate(invalid="ignore"):
                floor = param_c + hc * least_kept_c + working(least_w_c)
            cells = np.flatnonzero((out_c < 0) & (floor <= relaxed_cap))
        if cells.size:
            self._search_cells(cells, out_c, fin, i, j, held, param_c, stash_c, least_kept_c, working, cap_bytes)
        return fin, out_c

    def _search_cells(self, cells: np.ndarray, out_c: np.ndarray, fin: np.ndarray, i: np.ndarray, j: np.ndarray,
                      held: np.ndarray, param_c: np.ndarray, stash_c: np.ndarray, least_kept_c: np.ndarray,
                      working, cap_bytes: float) -> None:
        """least_recompute_layers' cell-by-cell search, where the count search does not apply:
        per open cell (flat indices `cells` into out_c, (H, F) over the finite cells `fin` of
        the (U, P) cells), a bisection on the first bound for the least k it allows, then a
        scan up from there with the exact memory, leaving a cell once the second bound is over
        (bounds: least_recompute_layers). Writes each cell's least fitting k into out_c (its
        -1 stays where none fits). tests/unit/test_speed_h8_least_recompute.py checks the count
        search against it."""
        most, least_w, w_grows = self._prefix_bounds()
        relaxed_cap = _relaxed(cap_bytes)
        n_f, n_p = len(fin), self.t.shape[2]
        col = cells % n_f
        up = fin[col]
        p, u_idx = up % n_p, up // n_p
        ii, jj, h = i[u_idx], j[u_idx], held[cells // n_f]
        param, stash = param_c[col], stash_c[col]
        floor_n = param + h * least_kept_c[col]      # the second bound, less its working set

        def bound_ok(k: np.ndarray, sel: np.ndarray) -> np.ndarray:
            pre = (ii[sel], ii[sel] + k, p[sel])
            return param[sel] + h[sel] * (stash[sel] - most[pre]) + working(least_w[pre], col[sel]) <= relaxed_cap

        n = jj - ii
        lo, hi = np.ones_like(n), n.copy()
        while True:
            todo = np.flatnonzero(lo < hi)
            if not todo.size:
                break
            mid = (lo[todo] + hi[todo]) // 2
            ok = bound_ok(mid, todo)
            hi[todo] = np.where(ok, mid, hi[todo])
            lo[todo] = np.where(ok, lo[todo], mid + 1)
        k = lo
        while cells.size:
            pre = (ii, ii + k, p)
            w = working(self.max_layer_stash[pre], col)
            mem = _kept_memory_bytes(param, stash, self.stash[pre], self.inputs[pre], w, h)
            fits = mem <= cap_bytes
            out_c.flat[cells[fits]] = k[fits]
            more = ~fits & (k < n)
            if w_grows:
                more &= floor_n + w <= relaxed_cap
            cells, ii, p, h, param, stash, n, floor_n, col = (x[more] for x in
                                                               (cells, ii, p, h, param, stash, n, floor_n, col))
            k = k[more] + 1

    def _fitting_rows(self, i: np.ndarray, j: np.ndarray, p: np.ndarray, param: np.ndarray, stash: np.ndarray,
                      working, held: np.ndarray, cap_bytes: float) -> np.ndarray | None:
        """least_recompute_layers' search of the columns [i[c], j[c]) entered in p[c] (param
        less its cap's excess, as there), by counts instead of cells: per column c and count
        k = 1..n[c] (n = j - i; laid out column after column), how many of the rows (held[r],
        ascending) fit with the first k layers recomputed, by the cell search's own float
        expression (_kept_memory_bytes). The memory grows with the rows at every count where
        the kept stash is >= 0 (rounding is monotone), so the rows that fit are a prefix:
        found from the real-valued crossing, then checked by the exact test on its two sides
        and moved where that fails. None where some kept stash is negative or not finite
        (then the rows that fit need not be a prefix)."""
        n = j - i
        n_h = len(held)
        col = np.repeat(np.arange(len(n)), n)
        k = np.arange(len(col)) - np.repeat(np.cumsum(n) - n, n) + 1
        shape = self.stash.shape
        at = np.ravel_multi_index((i[col], i[col] + k, p[col]), shape)
        with np.errstate(invalid="ignore"):
            kept = stash_after_recompute("full", stash[col], self.inputs.ravel()[at],
                                         recomputed_stash_bytes=self.stash.ravel()[at])
        if not bool((np.isfinite(kept) & (kept >= 0)).all()):
            return None
        w = working(self.max_layer_stash.ravel()[at], col)
        param = param[col]

        def fits(r: np.ndarray, x: np.ndarray | slice = slice(None)) -> np.ndarray:
            # _kept_memory_bytes, its kept stash worked out once
            return param[x] + held[r] * kept[x] + w[x] <= cap_bytes

        with np.errstate(invalid="ignore", divide="ignore"):
            rows = np.searchsorted(held, (cap_bytes - param - w) / kept, side="right")
        low = fits(np.minimum(rows, n_h - 1)) & (rows < n_h)          # the guess is too low
        high = ~fits(np.maximum(rows - 1, 0)) & (rows > 0)            # too high
        for x, step in ((np.flatnonzero(high), -1), (np.flatnonzero(low), 1)):
            while x.size:       # step to the last row that fits
                rows[x] += step
                x = x[(rows[x] > 0) & ~fits(rows[x] - 1, x)] if step < 0 else x[(rows[x] < n_h) & fits(rows[x], x)]
        return rows

    def _prefix_bounds(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """For least_recompute_layers' bounds, [i, j, p] over the prefixes [i, i + k), k <= j - i:
        the most stash less inputs any of them saves by being recomputed (-inf where none), the
        least working set (max_layer_stash) of any; and whether max_layer_stash grows with j
        in every row (it does in a composed table: the largest of more layers' stashes)."""
        if self._bounds is None:
            with np.errstate(invalid="ignore"):
                d = self.stash - self.inputs
                w = self.max_layer_stash
                grows = not bool(((np.diff(w, axis=1) < 0) & np.isfinite(w[:, :-1])).any())
            d = np.where(np.isfinite(d), d, -np.inf)
            self._bounds = (np.maximum.accumulate(d, axis=1), np.minimum.accumulate(self.max_layer_stash, axis=1),
                            grows)
        return self._bounds


def _relaxed(cap_bytes: float) -> float:
    """The cap plus least_recompute_layers' margin for its bounds, far above rounding."""
    return cap_bytes * (1 + 1e-9) if cap_bytes >= 0 else cap_bytes * (1 - 1e-9)


def _rows_while(pred, n_rows: int, n_cols: int) -> np.ndarray:
    """Per column c, how many leading rows r satisfy pred(r, c), for a predicate true on a
    prefix of the rows (bisection; pred takes arrays of rows and columns)."""
    lo, hi = np.zeros(n_cols, np.int64), np.full(n_cols, n_rows, np.int64)
    while True:
        todo = np.flatnonzero(lo < hi)
        if not todo.size:
            return lo
        mid = (lo[todo] + hi[todo] + 1) // 2
        ok = pred(mid - 1, todo)
        lo[todo] = np.where(ok, mid, lo[todo])
        hi[todo] = np.where(ok, hi[todo], mid - 1)


def _least_count(fit_rows: np.ndarray, n: np.ndarray, col: np.ndarray, row: np.ndarray, n_rows: int) -> np.ndarray:
    """Per cell (column col[x], row row[x]): the least count k = 1..n[col] whose rows that fit
    (RangeTable._fitting_rows: fit_rows, n[c] counts per column c, laid out column after
    column) include the row, -1 where none does. The running maximum over a column's counts
    rises, so the counts before the least one are those whose running maximum is <= the row;
    each column's figures raised by (n_rows + 1) per column before it keep the running maximum
    within the column and sort the whole, so one sorted search answers every cell."""
    first = np.cumsum(n) - n
    base = np.arange(len(n)) * (n_rows + 1)
    top = np.maximum.accumulate(fit_rows + np.repeat(base, n))
    below = np.searchsorted(top, base[col] + row, side="right") - first[col]
    return np.where(below < n[col], below + 1, -1)


def _kept_memory_bytes(param, stash, recomputed_stash, recomputed_inputs, working_bytes, inflight):
    """A stage's memory per device with some of its layers recomputed (RangeTable's formula,
    written once for the arrays and the gathered cells); working_bytes: the stage's working set
    with the recomputed layers' largest stash rebuilt (RangeTable.working_bytes)."""
    return (param + inflight * stash_after_recompute("full", stash, recomputed_inputs, recomputed_stash_bytes=recomputed_stash)
            + working_bytes)


NO_ENDS = ZeroEnds(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def _add_block_ends(tab: np.ndarray, k: int, ends: np.ndarray) -> np.ndarray:
    """ZeRO-2/3 per FSDP unit: add to tab's summed figures (rows t, rec, sync) what each range's
    first and last block add for their place in the stage (evaluator.zero_units), read from the
    layers' own ZeroEnds (`ends[e, f]`: field f of ZeroEnds e; tab[k, i, x + 1, p] is the e of
    layer x on the chain entered at (i, p)); returns rec_last. A stage [i, j) has
    blocks lo = max(i, 1) .. hi = min(j - 1, L - 2) (the first and last layer are root units).
    Not recomputed: t gains first0 of lo and last0 of hi, or only0 where lo == hi; sync gains
    first_step of lo. rec, what recomputing the stage's first layers adds, is read for
    prefixes [i, i + k) of longer stages too, so it gains only what recomputing lo changes of
    its figure as the first block (first1 - first0); rec_last is what recomputing hi then
    changes of its figure as the last block (last1 - last0; as the only block, only1 - only0
    less what rec took)."""
    n = tab.shape[1]
    e = {f: q for q, f in enumerate(ZeroEnds._fields)}
    i, j = np.nonzero(np.arange(n + 1)[None, :] > np.arange(n)[:, None])
    lo, hi = np.maximum(i, 1), np.minimum(j - 1, n - 2)
    has = lo <= hi
    i, j, lo, hi = i[has], j[has], lo[has], hi[has]
    only = (lo == hi)[:, None]

    def own(field: str, x: np.ndarray) -> np.ndarray:
        """(ranges, P): field of layer x[u] on the chain of range u, 0 where the chain is dead
        there (the range's summed figures are inf then)."""
        ids = tab[k, i, x + 1]
        live = np.isfinite(ids)
        return np.where(live, ends[np.where(live, ids, 0).astype(np.int64), e[field]], 0.0)

    f0, f1 = own("first0", lo), own("first1", lo)
    tab[0, i, j] += np.where(only, own("only0", lo), f0 + own("last0", hi))
    tab[1, i, j] += f1 - f0
    tab[2, i, j] += own("first_step", lo)
    rec_last = np.zeros(tab.shape[1:])
    rec_last[i, j] = np.where(only, own("only1", lo) - own("only0", lo) - (f1 - f0),
                              own("last1", hi) - own("last0", hi))
    return rec_last


# the eager recipe's summed rows of range_tables' array: the gradient pool, a tied copy's bytes and
# seconds, the state absent at a one-microbatch activation peak, the parameters (local, and
# their ZeRO share), a tied embedding's gradient (set on [0, L) alone: _add_tied_copies), and
# from DELTA on the layers' LayerSol.unsharded_delta (per EAGER_ROWS)
POOL, COPY_BYTES, COPY_S, ABSENT, ELEMS, ELEMS_ZERO, TIED_GRAD, DELTA = 7, 8, 9, 10, 11, 12, 13, 14
# the rows the unsharded deltas add to, per EAGER_ROWS
DELTA_TARGETS = (0, 2, 3, 4, 5, 6, POOL, COPY_BYTES, ABSENT, 1)


def _add_sharded_stage_deltas(tab: np.ndarray, flag: int) -> None:
    """Under the eager recipe a stage runs as FSDP2's bf16 parameters where any of its layers'
    parameters are data-parallel sharded (evaluator.stage_dp_sharded), its other layers too:
    where row `flag` (the most of the layers' own flags) says a range has such a layer, add
    its layers' summed unsharded deltas (LayerSol.unsharded_delta) to the rows they change."""
    on = tab[flag] == 1.0
    for q, row in enumerate(DELTA_TARGETS):
        tab[row][on] += tab[DELTA + q][on]


def _add_tied_copies(tab: np.ndarray, graph, zero: int) -> None:
    """Under the eager recipe a stage [i, L) after the embedding's holds a copy of the weights
    its head shares with the embedding (evaluator.tied_copy_elems), which the evaluator prices
    as the stage's weights, grads and optimizer state, autocast cache and optimizer step scaled
    by 1 + the copy's parameters / the stage's (evaluate_stage's copy_share): add that share of
    the range's summed COPY_BYTES to its param row and of COPY_S to its sync row. A stage
    [0, L) holding both accumulates the embedding's gradient of them into the head's at the end
    of the backward (evaluator.tied_embedding_elems): its bytes go to the TIED_GRAD row, which
    the memory cap reads (RangeTable.cap_bytes)."""
    L = len(graph.layers)
    # the embedding's gradient of a tied weight, on a stage holding embedding and head
    # (evaluate_stage's tied_grad_bytes: its ZeRO-2/3 share as the stage's parameters')
    tied = tied_embedding_elems(graph)
    if tied:
        elems, elems_zero = tab[ELEMS, 0, L], tab[ELEMS_ZERO, 0, L]
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(elems > 0, elems_zero / elems, 1.0) if zero >= 2 else 1.0
        tab[TIED_GRAD, 0, L] = np.where(np.isfinite(elems), tied_embedding_grad_bytes(float(tied)) * share, np.inf)
    params = np.cumsum([graph.layers[li].param_count for li in range(L)][::-1])[::-1]    # of [i, L)
    for i in range(1, L):
        copy = tied_copy_elems(graph, (i, L))
        if copy and params[i]:
            ratio = copy / params[i]
            tab[3, i, L] += tab[COPY_BYTES, i, L] * ratio
            tab[2, i, L] += tab[COPY_S, i, L] * ratio


def range_table(solver: LayerSolver, mesh: Mesh, seq_split: bool = True) -> RangeTable:
    """The table of one variant (range_tables): with context-parallel layer solutions, or
    (`seq_split` False) without."""
    full, lean = range_tables(solver, mesh, seq_split)
    return full if seq_split else lean


def range_tables(solver: LayerSolver, mesh: Mesh, context_parallel: bool = True) -> tuple[RangeTable, RangeTable]:
    """(full, lean): every layer range [i, j) entered in every start layout, from the layer
    solutions with every option (full) and without sequence splits (lean; LayerSolver.solve).
    The start layouts are the boundary layouts of the second layer's input, once as embedding
    restrictions (for i = 0) and once as plain input layouts (for i > 0). Where no full layer
    solution reached splits a sequence the lean table is the full one (the same object); with
    `context_parallel` False there is only the lean one (returned twice).

    The lean table is built from the full one's states: a state whose whole chain splits no
    sequence has the same lean chain (the lean solution of a layer whose full optimum splits
    no sequence is that optimum, LayerSolver.solve), so its figures are shared, not rebuilt."""
    g = solver.graph
    L = len(g.layers)
    # Each layer is entered only in layouts of its own input: clustered (non-transformer) layers
    # take inputs of different shapes and ranks, so one shape's layouts do not fit them all.
    by_shape: dict[tuple, list[Spec]] = {}       # the blocks' inputs share one shape
    in_specs = [by_shape.get(shape) or by_shape.setdefault(shape, boundary_specs(shape, mesh))
                for shape in (tuple(g.node(s).out_shape) if s else () for s in solver.inputs)]
    specs = in_specs[1] if L > 1 else [()]
    plain = list(dict.fromkeys(q for i in range(1, L) for q in in_specs[i]))
    # Rows: t, rec, sync, param, stash, inputs, loss peak, and under the eager recipe FSDP2's
    # gradient pool, what a tied head's copy scales (bytes, optimizer seconds) and the layers'
    # changes in a data-parallel sharded stage (the rows POOL.. below), summed over a range's
    # layers; then its largest layer stash and block buffers, and under the eager recipe
    # whether some layer's parameters are data-parallel sharded.
    eager = solver.eager
    n_sum = DELTA + len(EAGER_ROWS) if eager else 7
    K = n_sum + (3 if eager else 2)
    # ZeRO-2/3 per FSDP unit: one more row, per column the index of that layer's ZeroEnds in
    # `ends` (kept per column, not summed)
    units = solver.prices_zero_units(mesh)
    n_ends = 1 if units else 0
    ends: list[ZeroEnds] = []
    clean: dict[tuple, bool] = {}             # state -> its full chain splits no sequence

    # Layers with one class have one LayerSolver.key on a mesh, layout and variant.
    classes: dict[tuple, int] = {}
    layer_class = [classes.setdefault((li == 0, g.layers[li].structural_hash, solver.outputs[li] is None), len(classes))
                   for li in range(L)]
    rows: list[tuple[float, ...]] = []
    vectors: dict[int, tuple[LayerSol, int]] = {}

    def figures(sol: LayerSol) -> int:
        """The index in `rows` of a layer solution's K figures (the solver hands the same object
        to every layer of one identity, so they are made once per solution; the entry keeps it
        alive)."""
        hit = vectors.get(id(sol))
        if hit is None:
            own: tuple[float, ...] = ()
            if units:
                ends.append(sol.zero_ends or NO_ENDS)
                own = (float(len(ends) - 1),)
            rows.append((sol.t_s, sol.fwd_s, sol.sync_s, sol.param_bytes, sol.stash_bytes, sol.input_bytes,
                         sol.loss_peak_bytes,
                         *((sol.grad_pool_bytes, sol.copy_scaled_bytes, sol.optimizer_s, sol.grads_absent_bytes,
                            sol.param_elems, sol.param_elems_zero, 0.0, *(sol.unsharded_delta or EAGER_NO_DELTA))
                           if eager else ()),
                         sol.rebuilt_bytes, sol.block_buffer_bytes, *((float(sol.dp_sharded),) if eager else ()), *own))
            hit = vectors[id(sol)] = (sol, len(rows) - 1)
        return hit[1]

    DEAD, BORROWED = -1, -2       # a state's figures row where it has none of its own (build)

    def build(seq_split: bool, reuse: tuple[np.ndarray, dict[tuple, int]] | None
              ) -> tuple[RangeTable, np.ndarray, dict[tuple, int]]:
        """The table of one variant, with the summed array of its states (the table before the
        figures of a range's ends are added, with a column per state the starts do not enter)
        and each state's column there. `reuse`: the full build's, whose states with a chain
        that splits no sequence this one copies instead of walking them.

        Two passes: the chains are walked state by state in Python (each state's layer solved
        once, in the order of the starts), then the ranges' figures are summed layer by layer
        from the last, every state of a layer in one array operation: a state's sums over
        [l, j) are its layer's figures added to (the maxima: taken with) its next state's sums
        over [l + 1, j), the same float operations as a per-state recursion."""
        # state (layer, input layout, embedding restriction) -> (its figures' row in `rows`, DEAD
        # where its layer fits no strategy or BORROWED from `reuse`; the next state or None)
        states: dict[tuple, tuple[int, tuple | None]] = {}
        sols: dict[tuple, LayerSol] = {}

        def known(state: tuple) -> bool:
            if state in states:
                return True
            if reuse is not None and clean.get(state):
                states[state] = (BORROWED, None)
                return True
            return False

        def solve(li: int, spec: Spec | None, restrict: Spec | None) -> LayerSol:
            """solver.solve, remembered here by layer class (LayerSolver.key on this mesh and
            variant, without building it for every state; the stats count as before)."""
            k = (layer_class[li], spec if li else None, restrict)
            sol = sols.get(k)
            if sol is None:
                sol = sols[k] = solver.solve(li, mesh, spec if li else None, restrict, seq_split)
            else:
                solver.stats.cache_hits += 1      # what solver.solve counts for a repeat
            return sol

        def walk(li: int, spec: Spec | None, restrict: Spec | None) -> None:
            """Record the states of the chain entered at (li, spec, restrict): walk forward to
            the end, a dead end or a known state, then fold back (no deep recursion)."""
            state = (li, spec, restrict)
            if known(state):
                return
            path = []
            nxt: tuple | None = None
            while True:
                sol = solve(*state)
                path.append((state, sol))
                if not math.isfinite(sol.t_s) or state[0] + 1 >= L or sol.out_spec is None:
                    nxt = None
                    break
                nxt = (state[0] + 1, sol.out_spec, None)
                if known(nxt):
                    break
                state = nxt
            tail_clean = clean.get(nxt, True) if nxt is not None else True
            for state, sol in reversed(path):
                states[state] = (figures(sol), nxt) if math.isfinite(sol.t_s) else (DEAD, None)
                tail_clean = tail_clean and not sol.seq_split
                if reuse is None:
                    clean[state] = tail_clean
                nxt = state

        starts = ([StartLayout(q, True, seq_split) for q in specs]
                  + [StartLayout(q, False, seq_split) for q in plain])
        n_p = len(starts)
        col: dict[tuple, int] = {}      # state -> its column: its start's, or one after them
        uses_seq = False
        for pi, start in enumerate(starts):
            entered = ([(0, None, start.spec)] if start.at_embedding else
                       [(i, start.spec, None) for i in range(1, L) if start.spec in in_specs[i]])
            for state in entered:
                walk(*state)
                col[state] = pi
                uses_seq |= not clean.get(state, True)
        n_extra = [0] * L
        for state in states:
            if state not in col:
                col[state] = n_p + n_extra[state[0]]
                n_extra[state[0]] += 1
        R = K + n_ends
        summed = np.full((R, L, L + 1, n_p + max(n_extra)), np.inf)
        borrowed = [s for s, (r, _) in states.items() if r == BORROWED]
        if borrowed:
            full_summed, full_col = reuse  # type: ignore[misc]
            at_l = np.array([s[0] for s in borrowed])
            summed[:, at_l, :, [col[s] for s in borrowed]] = full_summed[:, at_l, :, [full_col[s] for s in borrowed]]
        own = [(s[0], col[s], r, col[nxt] if nxt is not None else -1) for s, (r, nxt) in states.items() if r >= 0]
        if own:
            layer, c, row, next_c = (np.array(x) for x in zip(*own))
            v = np.array(rows)[row].T                                         # (R, states)
            summed[:, layer, layer + 1, c] = v
            # from the last layer down: each layer's sums read the next layer's, complete by then
            has = np.flatnonzero(next_c >= 0)
            has = has[np.argsort(-layer[has], kind="stable")]
            bounds = np.flatnonzero(np.diff(layer[has])) + 1
            for x in np.split(has, bounds) if has.size else []:
                l = int(layer[x[0]])
                tail = summed[:, l + 1][:, l + 2:, next_c[x]]                 # (R, L - l - 1, states)
                vx = v[:, x][:, None, :]
                np.add(vx[:n_sum], tail[:n_sum], out=tail[:n_sum])
                np.maximum(vx[n_sum:K], tail[n_sum:K], out=tail[n_sum:K])
                summed[:, l][:, l + 2:, c[x]] = tail
        tab = summed[..., :n_p]
        if summed.shape[3] > n_p or ((units or eager) and seq_split and uses_seq):
            # the figures below are added to the table, not to the sums the lean build copies
            tab = tab.copy()
        rec_last = _add_block_ends(tab, K, np.array(ends, dtype=np.float64).reshape(-1, len(ZeroEnds._fields))) if units else None
        if eager:
            _add_sharded_stage_deltas(tab, n_sum + 2)
            _add_tied_copies(tab, g, solver.settings.zero)
        # the eager working set beside the recomputed layer's, and the gradient pool (none
        # outside the eager recipe)
        return (RangeTable(tab[0], tab[1], tab[2], tab[3], tab[4], tab[5], tab[n_sum], starts, uses_seq and seq_split,
                           rec_last, tab[6] if eager else None, tab[n_sum + 1] if eager else None,
                           tab[POOL] if eager else None, tab[ABSENT] if eager else None,
                           tab[TIED_GRAD] if eager else None),
                summed, col)

    if not context_parallel:
        lean = build(False, None)[0]
        return lean, lean
    full, summed, col = build(True, None)
    return full, (build(False, (summed, col))[0] if full.uses_seq_split else full)
