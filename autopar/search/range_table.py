"""Figures of every layer range [i, j) on one logical mesh, per start layout, from the layer
solutions (layer_solver.py): a suffix recursion over (layer, layout) states, so each state's
layer is looked up once and a range's sums are array slices."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from autopar.hardware.mesh import Mesh
from autopar.search.layer_solver import LayerSol, LayerSolver, StartLayout, boundary_specs
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
    sync: np.ndarray         # gradient sync per step, seconds
    param: np.ndarray        # weights, gradients and optimizer state per device, bytes
    stash: np.ndarray        # activations kept per microbatch in flight, bytes
    inputs: np.ndarray       # sum of the layers' inputs (full recompute keeps only those), bytes
    max_layer_stash: np.ndarray  # the largest one layer's stash (rebuilt one layer at a time), bytes
    starts: list[StartLayout]    # start layout per P index
    uses_seq_split: bool = False  # some layer solution in the table splits the sequence

    def time_s(self, recompute: str, at: tuple = ()) -> np.ndarray:
        """Per-microbatch time under a recompute option, of every cell or of the cells at `at`
        (an index such as (i, j))."""
        return self.t[at] + (self.rec[at] if recompute == "full" else 0.0)

    def memory_bytes(self, recompute: str, inflight: float | np.ndarray, at: tuple = ()) -> np.ndarray:
        """Memory per device with `inflight` microbatches' activations held (an array of
        counts broadcasts against the cells): full recompute keeps each layer's input and
        rebuilds one layer's activations at a time."""
        if recompute == "full":
            return self.param[at] + inflight * self.inputs[at] + self.max_layer_stash[at]
        return self.param[at] + inflight * self.stash[at]


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
    K = 7   # t, rec, sync, param, stash, inputs, max layer stash
    clean: dict[tuple, bool] = {}             # state -> its full chain splits no sequence
    full_suffix: dict[tuple, np.ndarray] = {}

    # Layers with one class have one LayerSolver.key on a mesh, layout and variant.
    classes: dict[tuple, int] = {}
    layer_class = [classes.setdefault((li == 0, g.layers[li].structural_hash, solver.outputs[li] is None), len(classes))
                   for li in range(L)]
    vectors: dict[int, tuple[LayerSol, np.ndarray]] = {}

    def figures(sol: LayerSol) -> np.ndarray:
        """A layer solution's K figures (the solver hands the same object to every layer of
        one identity, so this is made once per solution; the entry keeps it alive)."""
        hit = vectors.get(id(sol))
        if hit is None:
            hit = vectors[id(sol)] = (sol, np.array([sol.t_s, sol.fwd_s, sol.sync_s, sol.param_bytes,
                                                     sol.stash_bytes, sol.input_bytes, sol.stash_bytes]))
        return hit[1]

    def build(seq_split: bool, suffix: dict[tuple, np.ndarray], reuse: bool) -> RangeTable:
        def known(state: tuple) -> bool:
            if state in suffix:
                return True
            if reuse and clean.get(state):
                suffix[state] = full_suffix[state]
                return True
            return False

        sols: dict[tuple, LayerSol] = {}

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

        def chain(li: int, spec: Spec | None, restrict: Spec | None) -> np.ndarray:
            """(K, L - li) figures of ranges [li, j) for j = li+1..L entered at state (li, spec)."""
            key = (li, spec, restrict)
            if known(key):
                return suffix[key]
            # walk forward to the end (or a dead end), then fold back: no deep recursion
            path = []
            cur_l, cur_spec, r = li, spec, restrict
            while True:
                sol = solve(cur_l, cur_spec, r)
                path.append((cur_l, cur_spec, r, sol))
                if not math.isfinite(sol.t_s) or cur_l + 1 >= L or sol.out_spec is None:
                    break
                if known((cur_l + 1, sol.out_spec, None)):
                    break
                cur_l, cur_spec, r = cur_l + 1, sol.out_spec, None
            tail = None
            tail_clean = True
            last_l, _, _, last_sol = path[-1]
            if math.isfinite(last_sol.t_s) and last_l + 1 < L and last_sol.out_spec is not None:
                nxt = (last_l + 1, last_sol.out_spec, None)
                tail, tail_clean = suffix[nxt], clean.get(nxt, True)
            for l, sp, r, sol in reversed(path):
                if math.isfinite(sol.t_s):
                    v = figures(sol)
                    if tail is not None and tail.shape[1] == L - l - 1:
                        arr = np.empty((K, L - l))      # every column is written below
                    else:
                        arr = np.full((K, L - l), np.inf)
                    arr[:, 0] = v
                    if tail is not None:
                        m = tail.shape[1]
                        np.add(v[:6, None], tail[:6], out=arr[:6, 1:1 + m])
                        np.maximum(v[6], tail[6], out=arr[6, 1:1 + m])
                else:
                    arr = np.full((K, L - l), np.inf)
                suffix[(l, sp, r)] = arr
                tail_clean = tail_clean and not sol.seq_split
                if not reuse:
                    clean[(l, sp, r)] = tail_clean
                tail = arr
            return suffix[key]

        starts = ([StartLayout(q, True, seq_split) for q in specs]
                  + [StartLayout(q, False, seq_split) for q in plain])
        tab = np.full((K, L, L + 1, len(starts)), np.inf)
        uses_seq = False
        for pi, start in enumerate(starts):
            if start.at_embedding:
                tab[:, 0, 1:, pi] = chain(0, None, start.spec)
                uses_seq |= not clean.get((0, None, start.spec), True)
            else:
                for i in range(1, L):
                    if start.spec in in_specs[i]:
                        tab[:, i, i + 1:, pi] = chain(i, start.spec, None)
                        uses_seq |= not clean.get((i, start.spec, None), True)
        return RangeTable(tab[0], tab[1], tab[2], tab[3], tab[4], tab[5], tab[6], starts, uses_seq and seq_split)

    if not context_parallel:
        lean = build(False, {}, False)
        return lean, lean
    full = build(True, full_suffix, False)
    return full, (build(False, {}, True) if full.uses_seq_split else full)
