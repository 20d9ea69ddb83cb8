"""Per-group parameter storage (StageProblem.solve_storage): each parameter-owning group of a
ZeRO-1/2 stage may store its parameters sharded (ZeRO-3) instead, priced with FSDP2's overlap
model, under the memory budget."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from builders import block_names, megatron_gpt

from autopar.costmodel.collectives import COMM_OVERLAP_SLOWDOWN, ZERO
from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.sharding.stage_problem import Settings, StageProblem
from autopar.sharding.strategy import op_cost, sharded_storage_cost

P3 = load_cluster("p3.16xlarge", 1)
CM = ComputeModel(P3.gpu, P3.gpu.training_dtype())


def _problem(allowed=None, shape=(2, 1)):
    g = megatron_gpt(1024, 8, 256, 8, layers=1)
    mesh = Mesh(P3, Submesh(1, shape[0] * shape[1]), shape)
    return StageProblem(g, block_names(g), mesh, CM, boundary={"wte": (0, 0, 0)}, allowed=allowed)


def _memory(prob, choice, st, roots=frozenset()):
    ev = prob.evaluate(choice, st, sharded_roots=roots)
    return ev.param_state_bytes(st.zero) + st.inflight * ev.stash_bytes


@pytest.mark.parametrize("zero", [1, 2])
@pytest.mark.parametrize("B", [1, 2, 8])
def test_sharded_storage_is_priced_on_what_it_adds(zero, B):
    """Storing a weight sharded costs the stage level's price plus the gathers it adds
    ((B - 1) / B of the forward's, all of the backward's) between hidden (which still slows
    the compute: not free) and exposed, plus under ZeRO-1 the other B - 1 reduce-scatters. So
    it never beats the stage's own storage on time alone, only on memory."""
    prob = _problem()
    checked = 0
    for grp in prob.groups:
        for st in grp.strategies[grp.root]:
            zc = [c for c in st.collectives if c.purpose == ZERO and 3 in c.zero]
            ag_s = (sum(c.time_s for c in zc if c.kind == "all_gather" and c.phase == "forward") * (B - 1) / B
                    + sum(c.time_s for c in zc if c.kind == "all_gather" and c.phase == "backward"))
            rs_s = sum(c.time_s for c in zc if c.kind == "reduce_scatter") * (B - 1) / B if zero == 1 else 0.0
            if ag_s == 0:
                continue
            level, mixed = op_cost(st, zero), sharded_storage_cost(st, zero, B)
            lo = level.objective_s(B) + COMM_OVERLAP_SLOWDOWN * ag_s + rs_s
            assert lo - 1e-15 <= mixed.objective_s(B) <= lo + (1 - COMM_OVERLAP_SLOWDOWN) * ag_s + 1e-15
            assert mixed.objective_s(B) > level.objective_s(B)
            assert mixed.step_s == level.step_s
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("zero", [1, 2])
def test_storage_ilp_matches_brute_force(zero):
    """Every strategy and per-group storage assignment of a block (the matmuls' strategies
    narrowed so that the space is enumerable), scored by the evaluator: at each memory budget
    the ILP's choice is the cheapest that fits. At some budget the best is a mix (some groups
    sharded, some not) that beats both uniform storages."""
    dp = {"blocks.0.q", "blocks.0.k", "blocks.0.v", "blocks.0.scores", "blocks.0.ctx", "blocks.0.proj"}
    allowed = {n: {"b@0"} for n in dp} | {"blocks.0.fc1": {"b@0", "n@0"}, "blocks.0.fc2": {"b@0", "k@0"}}
    prob = _problem(allowed)
    st = Settings(n_microbatches=2, zero=zero, inflight=2)
    groups = [gi for gi, grp in enumerate(prob.groups) if len(grp.strategies[grp.root]) > 1]
    eligible = [prob.groups[gi].root for gi in prob.storage_groups(st)]
    assert len(eligible) == 6
    rows = []
    for picks in itertools.product(*(range(len(prob.groups[gi].strategies[prob.groups[gi].root])) for gi in groups)):
        choice = np.zeros(len(prob.groups), np.int64)
        choice[groups] = picks
        for bits in itertools.product((0, 1), repeat=len(eligible)):
            roots = frozenset(r for r, b in zip(eligible, bits) if b)
            rows.append((prob.objective(choice, st, roots), _memory(prob, choice, st, roots), roots))
    assert len(rows) == 4 * 64
    mems = sorted({m for _, m, _ in rows})
    mixed_wins = 0
    for budget in mems[:: max(1, len(mems) // 40)] + [mems[-1]]:
        fits = [(t, m, r) for t, m, r in rows if m <= budget * (1 + 1e-12)]
        best = min(t for t, _, _ in fits)
        res, roots = prob.solve_storage(st, mem_budget_bytes=budget)
        assert res.status == "optimal"
        t = prob.objective(res.choice, st, roots)
        assert t == pytest.approx(best, rel=1e-9)
        assert t == pytest.approx(res.objective, rel=1e-9)
        assert _memory(prob, res.choice, st, roots) <= budget * (1 + 1e-9)
        uniform = [t for t, _, r in fits if len(r) in (0, len(eligible))]
        if 0 < len(roots) < len(eligible) and (not uniform or best < min(uniform) * (1 - 1e-9)):
            mixed_wins += 1
    assert mixed_wins > 0


@pytest.mark.parametrize("zero", [0, 3])
def test_no_choice_outside_zero_1_2_is_plain_solve(zero):
    prob = _problem()
    st = Settings(n_microbatches=2, zero=zero)
    assert prob.storage_groups(st) == {}
    res, roots = prob.solve_storage(st)
    plain = prob.solve(st)
    assert roots == frozenset() and res.objective == plain.objective
    assert list(res.choice) == list(plain.choice)


def test_sharded_storage_refused_at_zero_0():
    prob = _problem()
    root = next(prob.groups[gi].root for gi in prob.storage_groups(Settings(zero=1)))
    with pytest.raises(ValueError, match="ZeRO 1 or 2"):
        prob.evaluate(np.zeros(len(prob.groups), np.int64), Settings(zero=0), sharded_roots={root})
    with pytest.raises(ValueError, match="not a decision op"):
        prob.evaluate(np.zeros(len(prob.groups), np.int64), Settings(zero=1), sharded_roots={"nope"})


def test_plan_with_sharded_storage_is_priced_as_the_stage_problem_prices_it():
    """A one-stage ZeRO-1 data-parallel plan with some groups stored sharded: the evaluator's
    stage time and parameter state are StageProblem.evaluate's with those groups (one cost
    function); the plan's JSON and `autopar show` carry the choice, and an empty choice writes
    the bytes of a plan without it."""
    import dataclasses
    import json

    from autopar.evaluation.baselines import Config3D, build_3d
    from autopar.evaluation.evaluator import evaluate
    from autopar.model import ModelSource
    from autopar.plan import Plan
    from autopar.report import plan_summary
    from graphs.query import stage_nodes

    src = ModelSource("gpt:hidden=256,layers=4,heads=4,seq=64,vocab=512")
    cl = load_cluster("p3.16xlarge", 1)
    base = build_3d(src, cl, 64, Config3D(8, 1, 1, 4, zero=1))
    st = base.stages[0]
    graph = src.graph(base.training.microbatch_size)
    mesh = Mesh(cl, Submesh(*st.submesh), st.logical_mesh)
    prob = StageProblem(graph, stage_nodes(graph, st.layers), mesh, ComputeModel(cl.gpu, base.training.dtype))
    settings = Settings(n_microbatches=base.training.n_microbatches, zero=1)
    roots = sorted(prob.groups[gi].root for gi in prob.storage_groups(settings))[::2]
    assert roots
    mixed = evaluate(dataclasses.replace(base, stages=[dataclasses.replace(st, sharded_storage=roots)]), graph, cl)
    choice = prob.choice_from_names(st.strategies)
    for plan, r in ((base, frozenset()), (mixed, frozenset(roots))):
        ev = prob.evaluate(choice, settings, sharded_roots=r)
        assert plan.stages[0].t_intra_s == pytest.approx(ev.per_microbatch_s, rel=1e-12)
        assert plan.stages[0].memory.param_state_bytes >= ev.param_state_bytes(1)
    assert mixed.stages[0].t_intra_s > base.stages[0].t_intra_s
    assert (base.stages[0].memory.param_state_bytes - mixed.stages[0].memory.param_state_bytes
            == pytest.approx(prob.evaluate(choice, settings).param_state_bytes(1)
                             - prob.evaluate(choice, settings, sharded_roots=frozenset(roots)).param_state_bytes(1)))
    assert Plan.from_json(mixed.to_json()).stages[0].sharded_storage == roots
    assert json.loads(mixed.to_json())["stages"][0]["sharded_storage"] == roots
    assert "sharded_storage" not in json.loads(base.to_json())["stages"][0]
    assert f"parameters stored sharded (ZeRO-3) in a ZeRO-1 stage: {roots[0]}" in plan_summary(mixed)


def test_cli_shard_with_sharded_storage(capsys):
    """`autopar shard --memory-limit --sharded-storage` reports the groups it shards; without a
    memory limit or at ZeRO 0/3 it is a one-line error."""
    from autopar.cli import main
    tiny = ["shard", "gpt:hidden=256,layers=2,heads=4,seq=64,vocab=512", "--cluster", "p3.16xlarge",
            "--mesh", "8x1", "--batch", "8"]
    assert main(tiny + ["--zero", "2", "--memory-limit", "--sharded-storage"]) == 0
    assert "parameters stored sharded (ZeRO-3): 0 of" in capsys.readouterr().out   # no memory pressure
    for extra in (["--zero", "2"], ["--zero", "3", "--memory-limit"]):
        assert main(tiny + extra + ["--sharded-storage"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "autopar: error: --sharded-storage needs --memory-limit and --zero 1 or 2"
