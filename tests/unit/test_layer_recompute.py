"""Per-layer recomputation (Megatron's --recompute-method block): a stage of n layers recomputes
its first k, 0 <= k <= n. Oracles: brute force over k (and over every subset of layers, where
the layers are alike) for the tables' least fitting k; the evaluator's price of k layers against
the range table's figures of the same layers; the plan JSON round trip and its validation; the
labels; the engines' Segment checkpointing exactly its first blocks."""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import replace

import numpy as np
import pytest

from autopar.costmodel.compute import ComputeModel
from autopar.costmodel.memory import stash_after_recompute
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.evaluation.evaluator import evaluate_stage
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.plan import Plan, PlanError, Training
from autopar.report import plan_summary
from autopar.search.candidates import auto_label
from autopar.search.layer_solver import LayerSolver, SearchStats, boundary_specs
from autopar.search.range_table import RangeTable, range_table
from autopar.sharding.stage_problem import Settings
from autopar.validation import check_plan
from tests.unit.table_stages import table_stages
from tests.unit.test_search import chained_table, synthetic_table

P3 = load_cluster("p3.16xlarge", 1)
CM = ComputeModel(P3.gpu, P3.gpu.training_dtype())
M = "gpt:hidden=64,layers=4,heads=4,seq=32,vocab=128"


def brute_least_k(rt: RangeTable, i: int, j: int, p: int, held: float, cap: float) -> int:
    """The least k whose memory, by the formula written out, fits; -1 if none."""
    for k in range(j - i + 1):
        if k == 0:
            mem = rt.param[i, j, p] + held * rt.stash[i, j, p]
        else:
            mem = (rt.param[i, j, p] + held * (rt.stash[i, j, p] - rt.stash[i, i + k, p] + rt.inputs[i, i + k, p])
                   + rt.max_layer_stash[i, i + k, p])
        if mem <= cap:
            return k
    return -1


@pytest.mark.parametrize("make", [chained_table, synthetic_table])
@pytest.mark.parametrize("seed", range(4))
def test_least_recompute_layers_is_the_least_fitting_k_by_brute_force(make, seed):
    """Every cell, at several caps and depths: also on tables whose memory is not monotone in k
    (synthetic_table's prefixes are unrelated random figures), where the bound and bisection
    must still never skip the least fitting k."""
    rng = np.random.default_rng(seed)
    L = 7
    with np.errstate(invalid="ignore"):
        rt = make(rng, L)
        i, j = np.nonzero(np.arange(L + 1)[None, :] > np.arange(L)[:, None])      # every range
        held = np.array([1.0, 2.0, 3.5, 6.0])
        seen = set()
        for cap in (0.5, 1.0, 1.5, 2.5, 4.0):
            got = rt.least_recompute_layers(i, j, held, cap)
            assert got.shape == (len(held), len(i), len(rt.starts))
            for (s, h), (u, (a, b)), p in itertools.product(enumerate(held), enumerate(zip(i, j)),
                                                           range(len(rt.starts))):
                want = brute_least_k(rt, a, b, p, h, cap) if math.isfinite(rt.t[a, b, p]) else -1
                assert got[s, u, p] == want, (cap, h, a, b, p)
                seen.add("none" if want == 0 else "none fits" if want < 0 else
                         "full" if want == b - a else "some")
    assert seen == {"none", "some", "full", "none fits"}       # every outcome was exercised


def test_chosen_time_adds_the_recomputed_layers_forward():
    rng = np.random.default_rng(3)
    L = 6
    rt = chained_table(rng, L)
    i, j = np.array([0, 1, 2, 1]), np.array([4, 6, 5, 2])
    k = rng.integers(-1, 5, (3, len(i), len(rt.starts)))
    k = np.minimum(k, (j - i)[None, :, None])
    got = rt.chosen_time_s(i, j, k)
    for s, u, p in itertools.product(range(3), range(len(i)), range(len(rt.starts))):
        a, b, kk = i[u], j[u], k[s, u, p]
        want = math.inf if kk < 0 else rt.t[a, b, p] + (rt.rec[a, a + kk, p] if kk else 0.0)
        assert got[s, u, p] == want
    # and the per-option form the equal-split candidates use, to the bit
    for u in range(len(i)):
        ks = np.arange(j[u] - i[u] + 1)
        t = rt.layers_time_s(i[u], j[u], ks)
        mem = rt.layers_memory_bytes(i[u], j[u], ks, 2.0)
        for kk, p in itertools.product(ks, range(len(rt.starts))):
            a, b = i[u], j[u]
            assert t[kk, p] == (rt.t[a, b, p] + rt.rec[a, a + kk, p] if kk else rt.t[a, b, p])
            if math.isfinite(rt.t[a, b, p]):
                assert (brute_least_k(rt, a, b, p, 2.0, mem[kk, p]) <= kk)


def test_k_zero_and_all_are_none_and_full_to_the_bit():
    rng = np.random.default_rng(5)
    L = 6
    rt = chained_table(rng, L)
    for i, j in [(0, 3), (1, 6), (2, 4)]:
        held = 3.0
        mem = rt.layers_memory_bytes(i, j, np.array([0, j - i]), held)
        t = rt.layers_time_s(i, j, np.array([0, j - i]))
        at = (i, j)
        ok = np.isfinite(rt.t[at])
        assert np.array_equal(mem[0][ok], rt.memory_bytes("none", held, at)[ok])
        assert np.array_equal(mem[1][ok], rt.memory_bytes("full", held, at)[ok])
        assert np.array_equal(t[0][ok], rt.time_s("none", at)[ok])
        assert np.array_equal(t[1][ok], rt.time_s("full", at)[ok])
    x, y = 3.7, 0.2
    assert stash_after_recompute("full", x, y, recomputed_stash_bytes=x) == stash_after_recompute("full", x, y)


def test_for_alike_layers_the_first_k_are_as_good_as_any_k_layers():
    """Layers of one class have equal figures, so any k of them cost what the first k cost:
    the least fitting k over prefixes is the optimum over every subset of layers (brute force
    over subsets, with the working set the largest recomputed stash)."""
    rng = np.random.default_rng(8)

    def cost(subset, n, t, f, s, x, param, held) -> tuple[float, float]:
        """(time, memory) with the layers in `subset` recomputed, the rest kept."""
        kept = n - len(subset)
        mem = param + held * (s * kept + x * len(subset)) + (s if subset else 0.0)
        return n * t + f * len(subset), mem

    for _ in range(40):
        n = int(rng.integers(1, 7))
        fig = (n, *rng.uniform([0.5, 0.1, 0.05, 0.001, 0.1], [1, 0.3, 0.2, 0.03, 1]), float(rng.integers(1, 5)))
        cap = rng.uniform(0.3, 3)
        best = min((cost(sub, *fig)[0] for r in range(n + 1) for sub in itertools.combinations(range(n), r)
                    if cost(sub, *fig)[1] <= cap), default=math.inf)
        prefix = next((cost(tuple(range(k)), *fig)[0] for k in range(n + 1) if cost(tuple(range(k)), *fig)[1] <= cap),
                      math.inf)
        assert prefix == best


# ---- the evaluator prices k layers as the tables do --------------------------------------------

@pytest.mark.parametrize("shape,sub", [((1, 2), Submesh(1, 2)), ((2, 1), Submesh(1, 2))])
def test_evaluator_prices_k_layers_as_the_range_table(shape, sub):
    g = ModelSource(M).graph(4)
    B = 4
    mesh = Mesh(P3, sub, shape)
    solver = LayerSolver(g, CM, Settings(n_microbatches=B, zero=1), SearchStats(), 10.0, "highs")
    rt = range_table(solver, mesh)
    training = Training.split(16, 4, dtype=CM.dtype, schedule="1f1b", zero=1)
    specs = boundary_specs(g.node(solver.inputs[1]).out_shape, mesh)
    checked = 0
    for i, j, p, base in table_stages(solver, rt, mesh, sub, shape, [(1, 5), (0, 3), (2, 6)], specs[:3]):
        none = evaluate_stage(g, P3, base, training, CM)
        working = 0.0
        for k in range(j - i + 1):
            res = evaluate_stage(g, P3, replace(base, recompute="full", recompute_layers=k), training, CM)
            want_stash = (rt.stash[i, j, p] if k == 0
                          else rt.stash[i, j, p] - rt.stash[i, i + k, p] + rt.inputs[i, i + k, p])
            assert res.stash_bytes == pytest.approx(want_stash, rel=1e-9)
            assert res.bwd_s - none.bwd_s == pytest.approx(rt.rec[i, i + k, p] if k else 0.0, rel=1e-9, abs=1e-15)
            assert res.fwd_s == none.fwd_s and res.param_state_bytes == none.param_state_bytes
            # the working set is the largest recomputed layer's stash, as the evaluator has always
            # attributed a layer's stash (a tensor to the layer making it, where the tables' layer
            # solutions count it with the layer reading it): it grows with k, from none
            assert res.working_bytes >= working and (k or res.working_bytes == 0.0)
            working = res.working_bytes
            if k == j - i:     # all of them: what recompute "full" prices, to the bit
                full = evaluate_stage(g, P3, replace(base, recompute="full"), training, CM)
                assert (res.stash_bytes, res.bwd_s, res.working_bytes, res.recompute_flops) == \
                    (full.stash_bytes, full.bwd_s, full.working_bytes, full.recompute_flops)
            checked += 1
    assert checked >= 8


# ---- plan JSON, validation, labels -------------------------------------------------------------

def small_plan(recompute: str = "full", k: int | None = 2) -> Plan:
    cl = load_cluster("p3.16xlarge", 1, 2)
    plan = build_3d(ModelSource(M), cl, 8, Config3D(1, 1, 2, 2, recompute=recompute))
    plan.stages[1] = replace(plan.stages[1], recompute_layers=k)
    return plan


def test_plan_json_round_trip_and_old_files():
    plan = small_plan()
    back = Plan.from_json(plan.to_json())
    assert back.stages[1].recompute_layers == 2 and back.stages[0].recompute_layers is None
    assert back.to_json() == plan.to_json()
    d = plan.to_dict()
    assert "recompute_layers" not in d["stages"][0]         # all layers: written as before
    # a plan file from before per-layer recomputation: no key, all layers
    old = copy.deepcopy(d)
    del old["stages"][1]["recompute_layers"]
    check_plan(old)
    assert Plan.from_dict(old).stages[1].recompute_layers is None


@pytest.mark.parametrize("k,recompute,message", [
    (4, "full", r"stages/1/recompute_layers must be a whole number of the stage's layers, 0 to 3 \(got 4\)"),
    (-1, "full", r"0 to 3 \(got -1\)"),
    (True, "full", r"\(got True\)"),
    (1.5, "full", r"\(got 1.5\)"),
    (2, "none", r"needs recompute \"full\" \(got 'none'\)"),
])
def test_bad_recompute_layers_are_refused(k, recompute, message):
    d = small_plan(recompute, None).to_dict()
    d["stages"][1]["recompute_layers"] = k
    with pytest.raises(PlanError, match=message):
        check_plan(d)


def test_labels_show_the_recomputed_layers():
    plan = small_plan()
    assert auto_label(plan.stages) == "2 stages: 3L@1x1+rc, 3L@1x1+rc2/3"
    rows = [line.split() for line in plan_summary(plan.to_dict()).splitlines()]
    assert next(r for r in rows if r[:2] == ["1", "3-5"])[:6] == ["1", "3-5", "1", "1x1", "full", "2/3"]


# ---- the engines' Segment ------------------------------------------------------------------------

def test_segment_checkpoints_only_its_first_blocks(monkeypatch):
    import torch
    import torch.utils.checkpoint

    import graphs
    from autopar.runtime.engines import Segment, recompute_and_compile, recomputed_blocks

    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(fn, *args, **kw):
        calls.append(fn)
        return real(fn, *args, **kw)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    # (dynamo's "eager" backend: the compiled placement without a C++ build)
    monkeypatch.setenv("AUTOPAR_COMPILE_BACKEND", "eager")
    ids = torch.randint(0, 128, (2, 32))
    # eager, or compiled with the checkpoint inside each block's forward: the block's own forward
    # is checkpointed; compiled tensor-parallel blocks: the checkpoint goes around the block
    for compile, tp in ((False, False), (True, True)):
        for n_ckpt in (None, 0, 1, 3, 4):
            calls.clear()
            model = graphs.zoo.build_module(M)
            seg = Segment(model, True, False, range(0, 4), recompute="full", recompute_blocks=n_ckpt)
            recompute_and_compile(seg, compile, tp)
            seg(ids).sum().backward()
            want = [model.blocks[b] for b in range(4 if n_ckpt is None else n_ckpt)]
            assert [fn if compile else fn.__self__ for fn in calls] == want, (compile, n_ckpt)
    # planner layers -> blocks: layer 0 embeds, 1..4 are blocks 0..3, 5 is the head
    st = small_plan().stages[1]            # layers 3..5 (blocks 2, 3 and the head), first 2
    assert st.layers == (3, 6) and recomputed_blocks(st, 4) == 2
    assert recomputed_blocks(replace(st, layers=(0, 3), recompute_layers=1), 4) == 0    # the embedding
    assert recomputed_blocks(replace(st, layers=(0, 3), recompute_layers=2), 4) == 1
    assert recomputed_blocks(replace(st, recompute_layers=None), 4) is None


# ---- the Megatron baseline's --recompute-num-layers ---------------------------------------------

def test_megatron_recompute_num_layers_maps_to_the_stages_first_blocks():
    """Megatron counts transformer blocks; the planner's layers put the embedding (layer 0)
    before the first block, and a count covering every layer is all of them (None)."""
    cl = load_cluster("p3.16xlarge", 1, 2)
    plan = build_3d(ModelSource(M), cl, 8, Config3D(1, 1, 2, 2, recompute="full", recompute_num_layers=1))
    # layers: 0 embeds, 1..4 blocks, 5 head; stages [0, 3) and [3, 6)
    assert [s.recompute_layers for s in plan.stages] == [2, 1]
    assert plan.config.label == "dp1 tp1 pp2 mb2 rc:full/1" and plan.config.settings["recompute_num_layers"] == 1
    every = build_3d(ModelSource(M), cl, 8, Config3D(1, 1, 2, 2, recompute="full", recompute_num_layers=2))
    assert [s.recompute_layers for s in every.stages] == [None, 2]
    full = build_3d(ModelSource(M), cl, 8, Config3D(1, 1, 2, 2, recompute="full"))
    assert "recompute_num_layers" not in full.to_dict()["config"]
    # fewer recomputed blocks: less time, more memory, priced as the stages say
    assert plan.predicted.step_time_s < full.predicted.step_time_s
    assert plan.predicted.peak_memory_bytes > full.predicted.peak_memory_bytes
    with pytest.raises(PlanError, match="needs recompute 'full'"):
        build_3d(ModelSource(M), cl, 8, Config3D(1, 1, 2, 2, recompute="selective", recompute_num_layers=1))


def test_the_growing_working_set_bound_is_used_on_composed_tables_only():
    """least_recompute_layers' second bound needs max_layer_stash to grow along a row, as it
    does in a composed table; a table where it does not (synthetic_table) must not use it."""
    rng = np.random.default_rng(0)
    assert chained_table(rng, 6)._prefix_bounds()[2]
    assert not synthetic_table(rng, 6)._prefix_bounds()[2]
    g = ModelSource(M).graph(4)
    solver = LayerSolver(g, CM, Settings(n_microbatches=4, zero=1), SearchStats(), 10.0, "highs")
    assert range_table(solver, Mesh(P3, Submesh(1, 2), (1, 2)))._prefix_bounds()[2]


def test_composed_tables_take_the_banded_search_and_agree_with_the_general_one(monkeypatch):
    """least_recompute_layers bisects over the held counts where memory grows with them (a
    composed table, counts ascending); the answer is the general row-by-row search's."""
    import autopar.search.range_table as rtm
    rng = np.random.default_rng(11)
    L = 8
    rt = chained_table(rng, L)
    i, j = np.nonzero(np.arange(L + 1)[None, :] > np.arange(L)[:, None])
    held = np.array([1.0, 2.0, 3.0, 5.0, 8.0, 13.0])
    calls = []
    real = rtm._rows_while
    monkeypatch.setattr(rtm, "_rows_while", lambda *a: calls.append(1) or real(*a))
    for cap in (0.8, 1.6, 2.4, 3.2):
        banded = rt.least_recompute_layers(i, j, held, cap)
        general = np.stack([rt.least_recompute_layers(i, j, held[r:r + 1], cap)[0] for r in range(len(held))])
        assert np.array_equal(banded, general)
    assert calls            # the banded search ran (one held count alone takes the general one)
