"""Megatron sequence parallelism (Korthikanti et al. 2022) in the stage ILP, against closed forms.

With SP on a (1, t) mesh the residual stream, the norms and the adds run split over the
sequence on the tp axis. A column-parallel linear all-gathers its input in forward; in backward
it all-gathers it again (the stash keeps the split input) and reduce-scatters the input gradient
in place of the all-reduce. A row-parallel linear reduce-scatters its output in place of the
all-reduce. Activation memory per layer is the one-GPU figure divided by t.
"""

from __future__ import annotations

import numpy as np
import pytest

from autopar.costmodel.collectives import FORWARD, REDUCE_SCATTER, all_gather_s, all_to_all_s, reduce_scatter_s
from autopar.costmodel.compute import ComputeModel
from autopar.evaluation.baselines import Config3D, build_3d, megatron_names
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.sharding.spec import parse_spec
from autopar.sharding.stage_problem import Settings, StageProblem
from graphs.ir import MATMUL, NORM
from graphs.query import main_boundary, stage_nodes

H, HEADS, S, T = 1024, 16, 1024, 8
MODEL = f"gpt:hidden={H},layers=2,heads={HEADS},seq={S},vocab=4096"
SETTINGS = Settings(n_microbatches=64)     # the norms' per-step weight-gradient all-reduce amortised


@pytest.fixture(scope="module")
def setup():
    g = ModelSource(MODEL).graph(1)
    cl = load_cluster("p3.16xlarge", 1)
    mesh = Mesh(cl, Submesh(1, T), (1, T))
    cm = ComputeModel(cl.gpu, cl.gpu.training_dtype())
    names = stage_nodes(g, (0, 2))           # the embedding's layer and the first block
    return g, mesh, cm, StageProblem(g, names, mesh, cm)


def _megatron_choice(prob: StageProblem, g, sp: bool) -> np.ndarray:
    want = {k: v[0] for k, v in megatron_names(g, prob.names, 1, T).items()}
    if sp:
        for k, w in want.items():
            have = [s.name for s in prob.groups[prob.group_of[k]].strategies[k]]
            want[k] = next((h for h in have if h.startswith(w + "+rs:")), w)
    return prob.choice_from_names(want)


def _memory(ev) -> float:
    return ev.param_state_bytes(SETTINGS.zero) + ev.stash_bytes


def test_ilp_picks_sequence_parallelism_under_a_memory_budget(setup):
    g, mesh, cm, prob = setup
    free = prob.evaluate(prob.solve(SETTINGS).choice, SETTINGS)
    sp = prob.evaluate(_megatron_choice(prob, g, sp=True), SETTINGS)
    assert _memory(sp) < _memory(free)         # without a budget the ILP keeps the stream whole
    res = prob.solve(SETTINGS, mem_budget_bytes=_memory(sp) * (1 + 1e-9))
    assert res.status == "optimal"
    ev = prob.evaluate(res.choice, SETTINGS, with_ops=True)
    assert _memory(ev) <= _memory(sp) * (1 + 1e-9)
    ops = {o["name"]: o for o in ev.ops}
    block = list(g.layers[1].nodes)
    seq_split = parse_spec("RS1R")
    # the norms and the residual adds run split over the sequence on the tp axis ...
    followers = [n for n in block if g.node(n).kind == NORM or g.node(n).op == "add"]
    assert len(followers) == 4
    assert all(parse_spec(ops[n]["out_spec"]) == seq_split for n in followers)
    # ... the embedding and the row-parallel linears reduce-scatter into that layout, and the
    # column-parallel linears split their output features
    assert ops["wte"]["strategy"] == "v@1+rs:s@1"
    linears = {n: ops[n]["strategy"] for n in block if g.node(n).kind == MATMUL}
    assert linears == {"blocks_0_attn_q": "n@1", "blocks_0_attn_k": "n@1", "blocks_0_attn_v": "n@1",
                       "blocks_0_attn_proj": "k@1+rs:s@1", "blocks_0_mlp_fc1": "n@1", "blocks_0_mlp_fc2": "k@1+rs:s@1"}
    # time and memory: the ILP's plan is Megatron's SP plan, or better than it
    assert ev.per_microbatch_s + ev.sync_s / 64 <= sp.per_microbatch_s + sp.sync_s / 64 + 1e-12


def test_sequence_parallel_block_against_closed_form(setup):
    """One block of the SP plan: activation memory sbh * 32 / t bytes (Korthikanti eq. 4 for
    this GPT: no dropout masks, flash attention keeps no [s, s] scores, so 34 + 5as/h becomes
    32), and communication: per column-parallel group an all-gather in forward, an all-gather
    and a reduce-scatter of the [b, s, h] activation in backward (shared by q, k and v); per
    row-parallel linear a reduce-scatter in forward and an all-gather in backward."""
    g, mesh, cm, prob = setup
    ev = prob.evaluate(_megatron_choice(prob, g, sp=True), SETTINGS, with_ops=True)
    sbh = S * 1 * H
    act_bytes = 2 * sbh
    ax = mesh.axis(2)
    assert ev.stash_bytes == pytest.approx(32 * sbh / T, rel=1e-12)

    ops = {o["name"]: o for o in ev.ops}
    unit = all_gather_s(act_bytes, ax)
    assert reduce_scatter_s(act_bytes, ax) == unit
    gathers = sum(ops[n]["comm_s"] for n in ("blocks_0_attn_q", "blocks_0_attn_k", "blocks_0_attn_v"))
    assert gathers == pytest.approx(3 * unit, rel=1e-12)                 # AG + (AG + RS)
    assert ops["blocks_0_mlp_fc1"]["comm_s"] == pytest.approx(3 * unit, rel=1e-12)
    assign = prob.assignment(_megatron_choice(prob, g, sp=True))
    for row in ("blocks_0_attn_proj", "blocks_0_mlp_fc2"):
        st = prob.strategy_of(row, assign[row])
        fwd = [c for c in st.collectives if c.phase == FORWARD]
        assert [(c.kind, c.mask, c.nbytes) for c in fwd] == [(REDUCE_SCATTER, 2, act_bytes)]
        assert ops[row]["comm_s"] == pytest.approx(2 * unit, rel=1e-12)     # RS, and its backward AG
    # per layer 10 [b, s, h] all-gathers' worth (tensor parallelism alone: 4 all-reduces, 8)
    block = [n for n in g.layers[1].nodes]
    assert sum(ops[n]["comm_s"] for n in block) == pytest.approx(10 * unit, rel=1e-12)
    # the norms and adds compute on 1/t of the rows
    for n in ("blocks_0_ln1", "add_1", "blocks_0_ln2", "add_2"):
        node = g.node(n)
        expect = cm.memory_bound_s(node.fwd_bytes / T, node.fwd_flops / T) + \
            cm.memory_bound_s(node.bwd_bytes / T, node.bwd_flops / T)
        assert ops[n]["compute_s"] == pytest.approx(expect, rel=1e-12)
        assert ops[n]["comm_s"] == 0.0


def test_tensor_parallel_block_memory_is_eq_2(setup):
    """The same block without SP: sbh * (8 + 24/t) (Korthikanti eq. 2 without the two dropout
    masks outside the parallel regions and without the scores): the norms' inputs and outputs
    stay whole."""
    g, mesh, cm, prob = setup
    ev = prob.evaluate(_megatron_choice(prob, g, sp=False), SETTINGS)
    assert ev.stash_bytes == pytest.approx(S * H * (8 + 24 / T), rel=1e-12)


def test_gather_edge_prices_match_between_ilp_and_evaluate(setup):
    """The ILP's arrays and the evaluator price the SP gather alike (one cost function)."""
    g, mesh, cm, prob = setup
    costs, edges, _ = prob.ilp_arrays(SETTINGS)
    for sp in (False, True):
        choice = _megatron_choice(prob, g, sp)
        ilp = sum(c[choice[i]] for i, c in enumerate(costs)) + sum(e[choice[u], choice[v]] for u, v, e in edges)
        assert ilp == pytest.approx(prob.objective(choice, SETTINGS), rel=1e-12)


def test_conversion_that_is_not_a_gather_keeps_its_price(setup):
    """A layout change that is not Megatron's gather (the sequence split moved to the hidden
    dim, an all-to-all, into a linear split on its contracted dim) pays the conversion in
    forward, and in backward the gradient's way back and the conversion again (the stash keeps
    the input as it came), on top of the linear's own collectives."""
    g, mesh, cm, _ = setup
    names = stage_nodes(g, (1, 2))
    src = main_boundary(g, names)
    prob = StageProblem(g, names, mesh, cm, boundary={src: parse_spec("RS1R")},
                        allowed={"blocks_0_attn_q": {"k@1"}})
    ev = prob.evaluate(prob.choice_from_names({"blocks_0_attn_q": "k@1"}), SETTINGS, with_ops=True)
    q = next(o for o in ev.ops if o["name"] == "blocks_0_attn_q")
    ln1 = prob.strategy_of("blocks_0_ln1", 0)
    assert ln1.out_spec == parse_spec("RS1R")
    st = prob.strategy_of("blocks_0_attn_q", 0)
    assert st.in_specs[0] == parse_spec("RRS1")                         # S1 moves from s to h: all-to-all
    a2a = all_to_all_s(2 * S * H, mesh.axis(2))
    assert q["comm_s"] == pytest.approx(st.fwd_comm_s + st.bwd_comm_s + 3 * a2a, rel=1e-12)


def test_megatron_baseline_with_sp_splits_the_sequence():
    src = ModelSource("gpt:hidden=256,layers=4,heads=8,seq=256,vocab=1024")
    cl = load_cluster("p3.16xlarge", 1)
    sp = build_3d(src, cl, 64, Config3D(1, 8, 1, 1, sequence_parallel=True, zero=1))
    tp = build_3d(src, cl, 64, Config3D(1, 8, 1, 1, zero=1))
    assert sp.config.label.endswith(" sp") and "sp" not in tp.config.label.split()
    norms = [o for o in sp.stages[0].ops if o["kind"] == NORM]
    assert norms and all(parse_spec(o["out_spec"])[1] == 2 for o in norms)
    # the activation memory shrinks: with SP every per-layer activation is split by t
    assert sp.stages[0].memory.stash_per_microbatch_bytes < tp.stages[0].memory.stash_per_microbatch_bytes


def test_vocab_parallel_embedding_reduce_scatters_into_the_sequence_split(setup):
    """Megatron's embedding under SP: the partial lookup is reduce-scattered over the sequence
    (not all-reduced), and in backward its gradient all-gathered."""
    g, mesh, cm, prob = setup
    sts = {s.name: s for s in prob.groups[prob.group_of["wte"]].strategies["wte"]}
    plain, rs = sts["v@1"], sts["v@1+rs:s@1"]
    full = 2 * S * H
    assert rs.out_spec == parse_spec("RS1R") and rs.out_bytes_local == full / T
    assert (rs.fwd_s, rs.bwd_s, rs.param_elems_local) == (plain.fwd_s, plain.bwd_s, plain.param_elems_local)
    assert rs.fwd_comm_s == pytest.approx(reduce_scatter_s(full, mesh.axis(2)), rel=1e-12)
    assert rs.bwd_comm_s == pytest.approx(all_gather_s(full, mesh.axis(2)), rel=1e-12)
    assert plain.fwd_comm_s == pytest.approx(2 * rs.fwd_comm_s, rel=1e-12)   # the all-reduce it replaces
