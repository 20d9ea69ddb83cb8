"""range_tables after its per-state overhead was cut (layer solutions looked up by layer class,
one figure vector per solution, arrays written in place): every table equals, to the bit, the
one the previous implementation (kept below as the reference) builds from a fresh solver, and
the solver's counts (ILPs, cache hits) are the same."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.search.layer_solver import LayerSolver, SearchStats, StartLayout, boundary_specs
from autopar.search.range_table import RangeTable, range_tables
from autopar.sharding.stage_problem import Settings

MODEL = "llama:hidden=1024,layers=3,heads=16,kv_heads=2,seq=16384,vocab=512,ffn=2048"
FIELDS = ("t", "rec", "sync", "param", "stash", "inputs", "max_layer_stash")


def reference_range_tables(solver, mesh, context_parallel=True):
    """range_tables as it was before (git 0bc27d1), verbatim but for names."""
    g = solver.graph
    L = len(g.layers)
    in_specs = [boundary_specs(g.node(s).out_shape if s else (), mesh) for s in solver.inputs]
    specs = in_specs[1] if L > 1 else [()]
    plain = list(dict.fromkeys(q for i in range(1, L) for q in in_specs[i]))
    K = 7
    clean: dict = {}
    full_suffix: dict = {}

    def build(seq_split, suffix, reuse):
        def known(state):
            if state in suffix:
                return True
            if reuse and clean.get(state):
                suffix[state] = full_suffix[state]
                return True
            return False

        def chain(li, spec, restrict):
            key = (li, spec, restrict)
            if known(key):
                return suffix[key]
            path = []
            cur_l, cur_spec, r = li, spec, restrict
            while True:
                sol = solver.solve(cur_l, mesh, cur_spec if cur_l else None, r, seq_split)
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
                arr = np.full((K, L - l), np.inf)
                if math.isfinite(sol.t_s):
                    v = np.array([sol.t_s, sol.fwd_s, sol.sync_s, sol.param_bytes, sol.stash_bytes,
                                  sol.input_bytes, sol.stash_bytes])
                    arr[:, 0] = v
                    if tail is not None:
                        m = tail.shape[1]
                        arr[:6, 1:1 + m] = v[:6, None] + tail[:6]
                        arr[6, 1:1 + m] = np.maximum(v[6], tail[6])
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


def _same(a: RangeTable, b: RangeTable) -> None:
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.shape == y.shape
        # bit for bit, inf included
        assert np.array_equal(x.view(np.int64), y.view(np.int64)), f
    assert a.starts == b.starts and a.uses_seq_split == b.uses_seq_split


@pytest.mark.parametrize("context_parallel", [True, False])
def test_range_tables_equal_the_previous_implementation(context_parallel):
    g = ModelSource(MODEL).graph(1)
    cl = load_cluster("dgx-h100", 1)
    cm = ComputeModel(cl.gpu, "bf16")
    settings = Settings(n_microbatches=4)
    new_stats, old_stats = SearchStats(), SearchStats()
    new = LayerSolver(g, cm, settings, new_stats, 10.0, "highs", context_parallel=context_parallel)
    old = LayerSolver(g, cm, settings, old_stats, 10.0, "highs", context_parallel=context_parallel)
    saw_cp = False
    for shape in ((1, 4), (2, 2), (4, 1), (2, 4)):
        mesh = Mesh(cl, Submesh(1, shape[0] * shape[1]), shape)
        got = range_tables(new, mesh, context_parallel)
        want = reference_range_tables(old, mesh, context_parallel)
        assert (got[0] is got[1]) == (want[0] is want[1])
        _same(got[0], want[0])
        _same(got[1], want[1])
        saw_cp |= got[0].uses_seq_split
        assert any(np.isfinite(got[0].t).ravel())
    # the repeated blocks are looked up, not solved again, and counted alike
    assert new_stats.ilps == old_stats.ilps and new_stats.cache_hits == old_stats.cache_hits > 0
    assert new_stats.ilps_no_seq == old_stats.ilps_no_seq
    if context_parallel:
        assert saw_cp     # the lean-from-full sharing path was exercised
