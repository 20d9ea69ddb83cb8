"""Context parallelism: the sequence split through a whole layer, sdpa included (ring attention
or all-gathered K/V, causal load balancing), against closed forms; and the exactness of offering
a sequence split only where the batch cannot take its axes (rules/einsum.py), by solving stages
with the full and the pruned option sets."""

from __future__ import annotations

import math

import pytest

from autopar.costmodel.collectives import (
    ALL_GATHER,
    BACKWARD,
    FORWARD,
    GRAD_SYNC,
    REDUCE_SCATTER,
    RING_P2P,
    all_gather_s,
    reduce_scatter_s,
    ring_pass_exposed_s,
    ring_pass_s,
    ring_step_s,
)
from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh, MeshAxis, Submesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.sharding import rules, stage_problem
from autopar.sharding.rules.attention import CP_ALLGATHER, CP_RING, attention_strategies, cp_of
from autopar.sharding.rules.einsum import matmul_strategies
from autopar.sharding.spec import parse_spec
from autopar.sharding.stage_problem import Settings, StageProblem
from graphs.ir import ATTENTION, MATMUL
from graphs.query import main_boundary, stage_nodes

SEQ, HEADS, D = 2048, 8, 32
MODEL = f"llama:hidden={HEADS * D},layers=1,heads={HEADS},kv_heads=2,seq={SEQ},vocab=512,ffn=512"
SETTINGS = Settings(n_microbatches=8)


def _setup(batch: int, mesh_shape: tuple[int, int], nodes: int = 1):
    g = ModelSource(MODEL).graph(batch)
    cl = load_cluster("dgx-h100", nodes)
    n = mesh_shape[0] * mesh_shape[1]
    sub = Submesh(1, n) if n <= cl.gpus_per_node else Submesh(n // cl.gpus_per_node, cl.gpus_per_node)
    return g, Mesh(cl, sub, mesh_shape), ComputeModel(cl.gpu, "bf16")


def _sdpa(g):
    return g.node(next(n for layer in g.layers for n in layer.nodes if g.node(n).kind == ATTENTION))


def _linear(g):
    return g.node(next(n for layer in g.layers[1:] for n in layer.nodes
                       if g.node(n).kind == MATMUL and g.node(n).attrs.get("equation") == "bsk,nk->bsn"))


# ---- the ring formula -------------------------------------------------------------------------

def test_ring_pass_is_max_of_compute_and_transfer_per_step():
    axis = MeshAxis(4, 1e9, 1e-5, False)
    block = 2e6
    p = 1e-5 + 2e6 / 1e9
    assert ring_step_s(block, axis) == pytest.approx(p)
    for c in (0.0, p / 3, p, 5 * p):       # transfer-bound, balanced, compute-bound
        assert ring_pass_s(block, axis, c) == pytest.approx(c + 3 * max(c, p))
        assert ring_pass_exposed_s(block, axis, c) == pytest.approx(3 * max(0.0, p - c))
    # the backward's tail hop is never hidden
    assert ring_pass_exposed_s(block, axis, 10 * p, tail_bytes=block) == pytest.approx(p)
    assert ring_pass_s(block, MeshAxis(1, math.inf, 0.0, False), 0.5) == 0.5


# ---- sdpa under a sequence split --------------------------------------------------------------

def test_ring_attention_against_closed_form():
    g, mesh, cm = _setup(1, (1, 4))
    node = _sdpa(g)
    b, h, s, d = node.operands[0].shape
    hkv = node.operands[1].shape[1]
    assert node.attrs.get("is_causal")
    sts = {st.name: st for st in attention_strategies(node, mesh, cm)}
    st = sts[f"s@1+cp:{CP_RING}"] if f"s@1+cp:{CP_RING}" in sts else sts[f"s@1+cp:{CP_ALLGATHER}"]
    assert st.out_spec == parse_spec("RRS1R") and st.in_specs[:3] == (parse_spec("RRS1R"),) * 3
    # load balanced: every one of the 4 steps computes a causal (s/4)-long block's FLOPs
    fwd = max(4 * cm.attention_s(b, h, s // 4, d, True), cm.attention_s(b, h, s, d, True) / 4)
    bwd = max(4 * cm.attention_s(b, h, s // 4, d, True, True), cm.attention_s(b, h, s, d, True, True) / 4)
    assert st.fwd_s == pytest.approx(fwd) and st.bwd_s == pytest.approx(bwd)
    kv_block = 2 * b * hkv * (s // 4) * d * 2
    axis = mesh.axis(2)
    ring = attention_strategies(node, mesh, cm)
    by_kind = {cp_of(x.name)[1]: x for x in ring if cp_of(x.name) and cp_of(x.name)[0] == 2}
    assert by_kind, "a sequence split of sdpa is offered where the batch (1) cannot take the axis"
    if CP_RING in by_kind:
        r = by_kind[CP_RING]
        assert [(c.kind, c.phase) for c in r.collectives] == [(RING_P2P, FORWARD), (RING_P2P, BACKWARD)]
        assert r.fwd_comm_s == pytest.approx(ring_pass_exposed_s(kv_block, axis, fwd / 4))
        assert r.bwd_comm_s == pytest.approx(ring_pass_exposed_s(2 * kv_block, axis, bwd / 4, kv_block))
    if CP_ALLGATHER in by_kind:
        a = by_kind[CP_ALLGATHER]
        assert [(c.kind, c.phase) for c in a.collectives] == [(ALL_GATHER, FORWARD), (ALL_GATHER, BACKWARD),
                                                              (REDUCE_SCATTER, BACKWARD)]
        assert a.fwd_comm_s == pytest.approx(all_gather_s(4 * kv_block, axis))
        assert a.bwd_comm_s == pytest.approx(all_gather_s(4 * kv_block, axis) + reduce_scatter_s(4 * kv_block, axis))


def test_only_undominated_kv_exchanges_are_kept():
    """Ring and all-gather share layouts, compute and memory; one is dropped only when the other
    is no dearer in forward and in backward."""
    for nodes, shape in ((1, (1, 8)), (2, (2, 8)), (4, (4, 8))):
        g, mesh, cm = _setup(1, shape, nodes)
        node = _sdpa(g)
        full = {}
        for st in attention_strategies(node, mesh, cm):
            if cp_of(st.name):
                full.setdefault(st.name.split("+cp:")[0], []).append(st)
        assert full
        for base, kept in full.items():
            assert 1 <= len(kept) <= 2
            if len(kept) == 2:
                r, a = sorted(kept, key=lambda x: x.name != f"{base}+cp:{CP_RING}")
                assert (a.fwd_comm_s < r.fwd_comm_s) or (a.bwd_comm_s < r.bwd_comm_s)
                assert (r.fwd_comm_s < a.fwd_comm_s) or (r.bwd_comm_s < a.bwd_comm_s)


def test_causal_split_needs_two_chunks_per_rank():
    g = ModelSource("llama:hidden=64,layers=1,heads=4,seq=12,vocab=64").graph(1)
    cl = load_cluster("dgx-h100", 1)
    cm = ComputeModel(cl.gpu, "bf16")
    node = _sdpa(g)
    on = lambda n: [st.name for st in attention_strategies(node, Mesh(cl, Submesh(1, n), (1, n)), cm)  # noqa: E731
                    if cp_of(st.name)]
    assert on(2) and not on(4)        # 12 tokens: 4 chunks of 3 on 2 ranks; not 8 chunks on 4 ranks


def test_cp_of_reads_names_and_refuses_bad_ones():
    assert cp_of("h@1,s@0+cp:ring") == (1, "ring")
    assert cp_of("s@01+cp:allgather") == (3, "allgather")
    assert cp_of("b@0,h@1") is None
    with pytest.raises(ValueError, match="unknown context-parallel exchange"):
        cp_of("s@0+cp:ulysses")
    with pytest.raises(ValueError, match="no sequence split"):
        cp_of("h@0+cp:ring")


# ---- matmuls: weight gradients and memory -----------------------------------------------------

def test_seq_split_matmul_syncs_weight_grads_like_data_parallel():
    g, mesh, cm = _setup(4, (1, 4))
    node = _linear(g)
    full = {st.name: st for st in matmul_strategies(node, mesh, cm, prune_seq=False)}
    seq, batch = full["s@1"], full["b@1"]
    assert (seq.fwd_s, seq.bwd_s, seq.out_bytes_local) == (batch.fwd_s, batch.bwd_s, batch.out_bytes_local)
    sync = [(c.kind, c.mask, c.nbytes, c.time_s) for c in seq.collectives if c.purpose == GRAD_SYNC]
    assert sync and sync == [(c.kind, c.mask, c.nbytes, c.time_s) for c in batch.collectives if c.purpose == GRAD_SYNC]
    assert seq.grad_sync_s == batch.grad_sync_s > 0
    # the batch (4) takes the axis, so the pruned set drops the sequence split; at batch 1 it stays
    assert "s@1" not in {st.name for st in matmul_strategies(node, mesh, cm)}
    g1, _, _ = _setup(1, (1, 4))
    assert "s@1" in {st.name for st in matmul_strategies(_linear(g1), mesh, cm)}


def test_planner_space_splits_the_sequence_wherever_the_batch_cannot_take_the_axes():
    """No one-sample restriction any more (the planner keeps a lean alternative per layer,
    search/layer_solver.py): batch 2 on a 1x8 mesh (the batch cannot take 8 ways) gets the
    sequence split; batch 2 on 2x4 gets it beside the batch split; batch 8 on 1x8 does not
    (the batch takes the axis: exact pruning)."""
    def seq_names(batch, shape):
        g, mesh, cm = _setup(batch, shape)
        names = {st.name for st in matmul_strategies(_linear(g), mesh, cm)}
        names |= {st.name for st in attention_strategies(_sdpa(g), mesh, cm)}
        return {n for n in names if "s@" in n.split("+")[0]}
    assert "s@1" in seq_names(2, (1, 8)) and "s@1+cp:ring" in seq_names(2, (1, 8))
    got = seq_names(2, (2, 4))
    assert got and "b@0,s@1+cp:ring" in got
    assert not seq_names(8, (1, 8))
    assert "s@1" in seq_names(1, (1, 8)) and "s@1+cp:ring" in seq_names(1, (1, 8))


def _block_problem(g, mesh, cm, spec: str):
    names = stage_nodes(g, (1, 2))
    src = main_boundary(g, names)
    return StageProblem(g, names, mesh, cm, boundary={src: parse_spec(spec)})


def _uniform_choice(prob: StageProblem, g, letter: str, axes: str) -> dict[str, str]:
    want = {}
    for grp in prob.groups:
        node = g.node(grp.root)
        have = [s.name for s in grp.strategies[grp.root]]
        if node.kind == ATTENTION:
            want[grp.root] = next(h for h in have if h.startswith(f"{letter}@{axes}") and h.count("@") == 1)
        elif node.kind == MATMUL:
            want[grp.root] = f"{letter}@{axes}"
    return want


def _clear_strategy_caches() -> None:
    """Forget every strategy list and ILP input the stage builder memoised (they were built
    from the rules being swapped)."""
    for obj in list(vars(stage_problem).values()):
        if callable(getattr(obj, "cache_clear", None)):
            obj.cache_clear()
    for name, obj in list(vars(stage_problem).items()):
        if name.endswith("_MEMO") and isinstance(obj, dict):
            obj.clear()


@pytest.fixture
def full_rules(monkeypatch):
    """The rules with every sequence split offered (no pruning)."""
    _use_rules(monkeypatch, prune_seq=False)
    yield
    _clear_strategy_caches()


def test_memory_follows_the_sequence_split(full_rules):
    """A layer run split over the sequence stashes what the same layer split over the batch
    does (the local sizes are equal), and 1/n of what it stashes unsplit."""
    g, mesh, cm = _setup(2, (1, 2))
    ev = {}
    for key, letter, spec in (("seq", "s", "RS1R"), ("batch", "b", "S1RR")):
        prob = _block_problem(g, mesh, cm, spec)
        ev[key] = prob.evaluate(prob.choice_from_names(_uniform_choice(prob, g, letter, "1")), SETTINGS, with_ops=True)
    prob = _block_problem(g, mesh, cm, "RRR")
    ev["none"] = prob.evaluate(prob.choice_from_names({}), SETTINGS)
    seq_ops = {o["name"]: o for o in ev["seq"].ops}
    sdpa = _sdpa(g).name
    assert cp_of(seq_ops[sdpa]["strategy"])[0] == 2 and seq_ops[sdpa]["out_spec"] == "RRS1R"
    assert ev["seq"].stash_bytes == pytest.approx(ev["batch"].stash_bytes)
    assert ev["seq"].stash_bytes == pytest.approx(ev["none"].stash_bytes / 2)
    assert ev["seq"].param_elems == ev["batch"].param_elems == ev["none"].param_elems
    # same compute except attention; the sequence split pays the K/V exchange on top
    assert ev["seq"].per_microbatch_s > ev["batch"].per_microbatch_s
    assert ev["seq"].sync_s == pytest.approx(ev["batch"].sync_s)


# ---- exactness of the pruning -----------------------------------------------------------------

def _optimum(g, mesh, cm, budget_frac: float | None):
    names = stage_nodes(g, (0, len(g.layers)))
    prob = StageProblem(g, names, mesh, cm)
    budget = None
    if budget_frac is not None:
        free = prob.evaluate(prob.solve(SETTINGS).choice, SETTINGS)
        budget = (free.param_state_bytes(SETTINGS.zero) + free.stash_bytes) * budget_frac
    res = prob.solve(SETTINGS, mem_budget_bytes=budget)
    assert res.status == "optimal"
    return prob.objective(res.choice, SETTINGS), prob.size()["strategies"]


@pytest.mark.parametrize("batch,shape,budget_frac", [(2, (1, 2), None), (2, (2, 2), None), (4, (2, 2), None),
                                                    (2, (2, 2), 0.6), (4, (1, 4), 0.8)])
def test_pruned_optimum_equals_full_optimum(monkeypatch, batch, shape, budget_frac):
    g, mesh, cm = _setup(batch, shape)
    _use_rules(monkeypatch, prune_seq=True)
    pruned, n_pruned = _optimum(g, mesh, cm, budget_frac)
    _use_rules(monkeypatch, prune_seq=False)
    try:
        full, n_full = _optimum(g, mesh, cm, budget_frac)
    finally:
        _clear_strategy_caches()
    assert n_full > n_pruned                   # the full set really holds more
    assert pruned == pytest.approx(full, rel=1e-9, abs=1e-12)


def _rules(prune_seq: bool):
    """The matmul and attention rules with every non-dominated sequence split (`prune_seq`), or
    with every sequence split at all."""
    def matmul(n, m, c):
        ok = "equation" in n.attrs and len(n.operands) >= 2
        return matmul_strategies(n, m, c, prune_seq=prune_seq) if ok else []

    def attention(n, m, c):
        ok = len(n.operands) >= 3 and len(n.operands[0].shape) == 4
        return attention_strategies(n, m, c, prune_seq=prune_seq) if ok else []
    return matmul, attention


def _use_rules(monkeypatch, prune_seq: bool) -> None:
    matmul, attention = _rules(prune_seq)
    monkeypatch.setitem(rules.DECISION_RULES, MATMUL, matmul)
    monkeypatch.setitem(rules.DECISION_RULES, ATTENTION, attention)
    _clear_strategy_caches()


def test_batch_one_plans_context_parallel_when_memory_needs_it():
    """At batch 1 on a (1, 4) mesh, with 2 K/V heads (no 4-way head split), a memory budget
    the unsplit attention cannot meet is met by splitting it over the sequence; without the
    sequence split the same budget is infeasible."""
    g, mesh, cm = _setup(1, (1, 4))
    names = stage_nodes(g, (1, 2))
    src = main_boundary(g, names)
    sdpa = _sdpa(g).name

    def problem(allowed=None):
        return StageProblem(g, names, mesh, cm, boundary={src: parse_spec("RRR")}, allowed=allowed)

    prob = problem()
    free = prob.evaluate(prob.solve(SETTINGS).choice, SETTINGS)
    budget = 0.4 * (free.stash_bytes + free.param_state_bytes(SETTINGS.zero))
    res = prob.solve(SETTINGS, mem_budget_bytes=budget)
    assert res.status == "optimal"
    ev = prob.evaluate(res.choice, SETTINGS, with_ops=True)
    assert ev.stash_bytes + ev.param_state_bytes(SETTINGS.zero) <= budget * (1 + 1e-9)
    ops = {o["name"]: o for o in ev.ops}
    assert cp_of(ops[sdpa]["strategy"]) == (2, CP_RING)
    assert ops[sdpa]["out_spec"] == "RRS1R"
    no_cp = {st.name for st in attention_strategies(_sdpa(g), mesh, cm) if not cp_of(st.name)}
    assert problem({sdpa: no_cp}).solve(SETTINGS, mem_budget_bytes=budget).status == "infeasible"
