"""Each per-op rule of autopar/sharding/rules/ on hand-built nodes (tests/builders.py's Megatron
GPT, batch 8, seq 32, hidden 64, 4 heads): layouts, the collectives of its cost record, and
their prices against the ring alpha-beta closed forms."""

from __future__ import annotations

import pytest
from builders import megatron_gpt

import autopar
from autopar.costmodel.collectives import (
    ACTIVATION,
    ALL_GATHER,
    ALL_REDUCE,
    BACKWARD,
    FORWARD,
    GRAD_SYNC,
    REDUCE_SCATTER,
    STEP,
    ZERO,
)
from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.sharding.rules import DECISION_RULES, FOLLOW_RULES, decision_strategies, follow
from autopar.sharding.rules.attention import attention_strategies
from autopar.sharding.rules.follow import follow_elementwise
from autopar.sharding.spec import split_per_part
from autopar.sharding.strategy import op_cost
from graphs.annotate import annotate
from graphs.ir import ATTENTION, EMBEDDING, INPUT, LOSS, MATMUL, NORM, REDUCTION, SOFTMAX, VIEW, Operand, OpNode

P3 = load_cluster("p3.16xlarge", 1)
CM = ComputeModel(P3.gpu, P3.gpu.training_dtype())
B, S, H, A, V = 8, 32, 64, 4, 128
G = megatron_gpt(H, A, S, B, layers=1, vocab=V)


def mesh(d0: int, d1: int) -> Mesh:
    return Mesh(P3, Submesh(1, d0 * d1), (d0, d1))


def ring_all_reduce_s(nbytes: float, n: int) -> float:
    link = P3.intra_link
    return 2 * (n - 1) * link.latency_s + 2 * (n - 1) / n * nbytes / link.bandwidth_bytes_per_s


def bucket_share_s(nbytes: float, n: int) -> float:
    """A gradient's share of the all-reduce of a full Megatron-Core bucket of 40M bf16
    gradients (80 MB; collectives.py): its bandwidth term and its share of one ring latency."""
    link = P3.intra_link
    return 2 * (n - 1) * link.latency_s * nbytes / 80e6 + 2 * (n - 1) / n * nbytes / link.bandwidth_bytes_per_s


def ring_all_gather_s(nbytes: float, n: int) -> float:
    return ring_all_reduce_s(nbytes, n) / 2


def by_name(node: str, m: Mesh):
    return {s.name: s for s in decision_strategies(G.node(node), m, CM)}


def comm(st) -> list[tuple]:
    return [(c.kind, c.mask, c.nbytes, c.phase) for c in st.collectives if c.purpose == ACTIVATION]


def test_every_kind_has_a_rule():
    assert set(DECISION_RULES) == {MATMUL, ATTENTION, EMBEDDING, INPUT}
    assert set(FOLLOW_RULES) == {VIEW, NORM, SOFTMAX, LOSS, REDUCTION}     # others: follow_elementwise


# ---- einsum (linear, bmm) ------------------------------------------------------------------------

def test_column_parallel_linear_on_1x4():
    """x [b,s,h] @ W^T with W's output rows split 4 ways: no forward comm, the input gradient
    (b*s*h in bf16) all-reduced over axis 1 in backward, a quarter of the FLOPs."""
    m = mesh(1, 4)
    st = by_name("blocks.0.q", m)["n@1"]
    assert st.out_spec == (0, 0, 2) and st.in_specs == ((0, 0, 0), (2, 0), (2,))
    assert comm(st) == [(ALL_REDUCE, 2, B * S * H * 2, BACKWARD)]
    assert st.collectives[0].operand == 0
    assert st.bwd_comm_s == pytest.approx(ring_all_reduce_s(B * S * H * 2, 4), rel=1e-12)
    assert st.fwd_comm_s == 0.0
    assert st.fwd_s == CM.matmul_s(B * S, H // 4, H)
    assert st.param_elems_local == (H * H + H) / 4
    assert not st.runs(0)[1:]                                # no weight gradient to sync


def test_row_parallel_linear_all_reduce_and_reduce_scatter_variants():
    m = mesh(1, 4)
    sts = by_name("blocks.0.proj", m)
    ar, rs = sts["k@1"], sts["k@1+rs:b@1"]
    out_bytes = B * S * H * 2
    assert ar.out_spec == (0, 0, 0) and ar.in_specs[:2] == ((0, 0, 2), (0, 2))
    assert comm(ar) == [(ALL_REDUCE, 2, out_bytes, FORWARD)]
    assert ar.fwd_comm_s == pytest.approx(ring_all_reduce_s(out_bytes, 4), rel=1e-12)
    # the reduce-scatter variant leaves the output split on its first free letter (batch); its
    # backward all-gathers the output gradient (each k shard's input gradient reads all of it)
    assert rs.out_spec == (2, 0, 0)
    assert comm(rs) == [(REDUCE_SCATTER, 2, out_bytes, FORWARD), (ALL_GATHER, 2, out_bytes, BACKWARD)]
    assert rs.fwd_comm_s == pytest.approx(ring_all_gather_s(out_bytes, 4), rel=1e-12)
    assert rs.bwd_comm_s == pytest.approx(ring_all_gather_s(out_bytes, 4), rel=1e-12)
    assert rs.out_bytes_local == out_bytes / 4


def test_data_parallel_linear_weight_collectives_per_zero_level():
    """Batch split over 4: the weight gradient is partial over axis 0. ZeRO 0/1 all-reduce it
    once per step, in the default engine's buckets (its share of one); ZeRO-2 reduce-scatters it every microbatch and all-gathers the weights once
    per step; ZeRO-3 gathers the weights forward and backward and reduce-scatters the grad."""
    m = mesh(4, 1)
    st = by_name("blocks.0.fc1", m)["b@0"]
    n = 4 * H * H + 4 * H
    assert comm(st) == []
    assert st.param_elems_local == n and st.param_elems_zero == n / 4
    kinds = {z: sorted((c.kind, c.phase, c.purpose) for c in st.runs(z)) for z in range(4)}
    assert kinds[0] == kinds[1] == [(ALL_REDUCE, STEP, GRAD_SYNC)] * 2      # weight and bias
    assert kinds[2] == sorted([(REDUCE_SCATTER, BACKWARD, ZERO), (ALL_GATHER, STEP, ZERO)] * 2)
    # the backward reads the weight again (gathered again), not the bias
    assert kinds[3] == sorted([(ALL_GATHER, FORWARD, ZERO), (ALL_GATHER, BACKWARD, ZERO), (REDUCE_SCATTER, BACKWARD, ZERO),
                               (ALL_GATHER, FORWARD, ZERO), (REDUCE_SCATTER, BACKWARD, ZERO)])
    grad_ar = bucket_share_s(4 * H * H * 2, 4) + bucket_share_s(4 * H * 2, 4)
    assert st.grad_sync_s == pytest.approx(grad_ar, rel=1e-12)
    c1, c3 = op_cost(st, 1), op_cost(st, 3)
    assert c1.step_s == pytest.approx(grad_ar, rel=1e-12) and c1.comm_s == 0.0
    gather_w, gather_b = ring_all_gather_s(4 * H * H * 2, 4), ring_all_gather_s(4 * H * 2, 4)
    assert c3.step_s == 0.0
    assert c3.fwd_s - st.fwd_s == pytest.approx(gather_w + gather_b, rel=1e-12)
    assert c3.comm_s == pytest.approx(3 * gather_w + 2 * gather_b, rel=1e-12)    # RS costs an all-gather's time
    assert c1.objective_s(4) == pytest.approx(st.fwd_s + st.bwd_s + grad_ar / 4, rel=1e-12)


def test_batched_matmul_split_over_batch_and_heads_needs_no_comm():
    m = mesh(2, 2)
    st = by_name("blocks.0.scores", m)["b@0,h@1"]
    assert st.out_spec == (1, 2, 0, 0) and comm(st) == [] and not st.collectives
    assert st.fwd_s == CM.matmul_s(S, S, H // A, B * A // 4)


def test_split_contraction_of_two_activations_all_reduces_the_output():
    """scores = q k^T with the head dim k split: a forward all-reduce of the scores, no
    backward comm (each operand's gradient keeps the split)."""
    m = mesh(1, 2)
    st = by_name("blocks.0.scores", m)["k@1"]
    assert comm(st) == [(ALL_REDUCE, 2, B * A * S * S * 2, FORWARD)]


# ---- attention -----------------------------------------------------------------------------------

def _sdpa() -> OpNode:
    d = H // A
    ops = [Operand((B, A, S, d), "bf16", source=f"x{i}") for i in range(3)]
    node = OpNode("sdpa", "sdpa", ATTENTION, ops, [(B, A, S, d)], "bf16", {"is_causal": True}, "attn")
    node.attrs["requires_grad"] = True
    annotate(node, [True] * 3)
    return node


@pytest.mark.parametrize("name,spec,factor", [("b@0", (1, 0, 0, 0), (2, 1)), ("h@1", (0, 2, 0, 0), (1, 2)),
                                              ("b@0,h@1", (1, 2, 0, 0), (2, 2)), ("h@01", (0, 3, 0, 0), (1, 4))])
def test_attention_splits_batch_and_heads(name, spec, factor):
    st = {s.name: s for s in attention_strategies(_sdpa(), mesh(2, 2), CM)}[name]
    fb, fh = factor
    assert st.out_spec == spec and st.in_specs == (spec,) * 3 and not st.collectives
    assert st.fwd_s == CM.attention_s(B // fb, A // fh, S, H // A, True)
    assert st.bwd_s == CM.attention_s(B // fb, A // fh, S, H // A, True, True)


# ---- embedding and inputs ------------------------------------------------------------------------

def test_embedding_vocab_hidden_and_batch_splits_on_1x4():
    m = mesh(1, 4)
    sts = by_name("wte", m)
    out_bytes = B * S * H * 2
    vocab = sts["v@1"]            # Megatron's vocab-parallel lookup: partial output, all-reduced
    assert vocab.out_spec == (0, 0, 0) and vocab.in_specs[1] == (2, 0)
    assert comm(vocab) == [(ALL_REDUCE, 2, out_bytes, FORWARD)]
    hidden = sts["h@1"]
    assert hidden.out_spec == (0, 0, 2) and comm(hidden) == [] and hidden.param_elems_local == V * H / 4
    batch = sts["b@1"]            # the ids split: the table's gradient is partial over axis 1
    assert batch.out_spec == (2, 0, 0) and batch.in_specs[0] == (2, 0) and comm(batch) == []
    assert [(c.kind, c.nbytes) for c in batch.runs(0)] == [(ALL_REDUCE, V * H * 2)]


def test_inputs_split_their_batch_over_any_live_axes():
    sts = by_name("ids", mesh(2, 2))
    assert {n: s.out_spec for n, s in sts.items()} == {"R": (0, 0), "b@0": (1, 0), "b@1": (2, 0), "b@01": (3, 0)}
    assert all(not s.collectives and s.fwd_s == 0 for s in sts.values())
    assert set(by_name("ids", mesh(1, 4))) == {"R", "b@1"}


# ---- followers -----------------------------------------------------------------------------------

def test_norm_over_split_hidden_all_reduces_row_statistics():
    m = mesh(1, 4)
    st = follow(G.node("blocks.0.ln1"), (0, 0, 2), m, CM)
    rows = B * S
    assert st.out_spec == (0, 0, 2) and st.in_specs == ((0, 0, 2), (2,), (2,))
    assert comm(st) == [(ALL_REDUCE, 2, rows * 2 * 4, FORWARD), (ALL_REDUCE, 2, rows * 2 * 4, BACKWARD)]
    assert not st.runs(0)[2:]                            # weights split like hidden: no partial grad
    kept = follow(G.node("blocks.0.ln1"), (1, 0, 0), mesh(4, 1), CM)
    assert comm(kept) == [] and [c.kind for c in kept.runs(0)] == [ALL_REDUCE, ALL_REDUCE]   # weight, bias


def test_softmax_over_split_last_dim_all_reduces_max_and_sum():
    st = follow(G.node("blocks.0.softmax"), (0, 0, 0, 2), mesh(1, 2), CM)
    stats = B * A * S / 1 * 2 * 4
    assert comm(st) == [(ALL_REDUCE, 2, stats, FORWARD), (ALL_REDUCE, 2, stats, BACKWARD)]


def test_vocab_parallel_loss_all_reduces_three_statistics_per_row():
    """As torch's loss_parallel runs it: max, then sum of exponentials, then target logit, one
    all-reduce of one fp32 per row each (tests/integration/test_priced_collectives.py counts
    them on gloo)."""
    st = follow(G.node("loss"), (0, 2), mesh(1, 4), CM)
    assert st.out_spec == () and comm(st) == [(ALL_REDUCE, 2, B * S * 4, FORWARD)] * 3
    batch = follow(G.node("loss"), (2, 0), mesh(1, 4), CM)
    assert comm(batch) == [] and batch.in_specs[1] == (2,)


def test_view_that_breaks_a_split_gathers_it():
    """[b, s, 4, 16] -> [b, s, 64] keeps a head split (major dim); a split of the inner dim
    cannot survive: the tensor is gathered over that axis, forward and backward."""
    node = G.node("blocks.0.ctx_r")
    kept = follow(node, (0, 0, 2, 0), mesh(1, 4), CM)
    assert kept.out_spec == (0, 0, 2) and not kept.collectives
    broken = follow(node, (0, 0, 0, 2), mesh(1, 2), CM)
    full = B * S * H * 2
    assert broken.out_spec == (0, 0, 0)
    assert comm(broken) == [(ALL_GATHER, 2, full, FORWARD), (ALL_GATHER, 2, full, BACKWARD)]
    assert broken.fwd_comm_s == pytest.approx(ring_all_gather_s(full, 2), rel=1e-12)
    assert follow(G.node("blocks.0.q_t"), (1, 0, 2, 0), mesh(2, 2), CM).out_spec == (1, 2, 0, 0)   # transpose


def _reduction(op: str) -> OpNode:
    x = Operand((B, S, H), "bf16", source="x")
    node = OpNode(op, op, REDUCTION, [x], [(B, S)], "bf16", {"dim": 2, "keepdim": False}, "r")
    node.attrs["requires_grad"] = True
    annotate(node, [True])
    return node


def test_reduction_over_split_dim_all_reduces_its_output_or_gathers_for_argmax():
    m = mesh(1, 4)
    st = follow(_reduction("sum"), (1, 0, 2), m, CM)
    assert st.out_spec == (1, 0) and comm(st) == [(ALL_REDUCE, 2, B * S * 2, FORWARD)]
    arg = follow(_reduction("argmax"), (0, 0, 2), m, CM)
    assert comm(arg) == [(ALL_GATHER, 2, B * S * H * 2, FORWARD)]


def test_broadcast_add_all_reduces_the_small_operands_gradient():
    """positions [s, h] + tokens [b, s, h] split over batch: the positions' gradient is summed
    over the batch, partial over axis 0, all-reduced in backward."""
    tok = Operand((B, S, H), "bf16", source="tok")
    pos = Operand((S, H), "bf16", source="pos")
    node = OpNode("add", "add", "elementwise", [tok, pos], [(B, S, H)], "bf16", {"scalars": []}, "x")
    node.attrs["requires_grad"] = True
    annotate(node, [True, True])
    st = follow(node, (1, 0, 0), mesh(4, 1), CM)
    assert st.in_specs == ((1, 0, 0), (0, 0)) and comm(st) == [(ALL_REDUCE, 1, S * H * 2, BACKWARD)]
    assert FOLLOW_RULES.get(node.kind, follow_elementwise) is follow_elementwise


# ---- fused projections: a dim split per part ---------------------------------------------------

def _view(op: str, shape, out_shapes, attrs) -> OpNode:
    node = OpNode(op, op, VIEW, [Operand(tuple(shape), "bf16", source="qkv")], [tuple(s) for s in out_shapes], "bf16",
                  {**attrs, "copy": False, "requires_grad": True}, "v")
    annotate(node, [True])
    return node


QKV = (B, S, 3 * H)


def test_chunk_into_the_parts_keeps_each_part_column_split():
    """qkv [b, s, 3h] split per part over 4 devices, chunked into q, k, v: each comes out split
    on its last dim with no communication; into other sizes it is gathered first."""
    m = mesh(1, 4)
    per_part = split_per_part(2, (H, H, H))
    chunk = _view("chunk", QKV, [(B, S, H)] * 3, {"dim": 2, "sizes": [H, H, H]})
    st = follow(chunk, (0, 0, per_part), m, CM)
    assert st.out_spec == (0, 0, 2) and not st.collectives
    halves = _view("split", QKV, [(B, S, 3 * H // 2)] * 2, {"dim": 2, "sizes": [3 * H // 2] * 2})
    st = follow(halves, (0, 0, per_part), m, CM)
    full = B * S * 3 * H * 2
    assert st.out_spec == (0, 0, 0) and comm(st) == [(ALL_GATHER, 2, full, FORWARD), (ALL_GATHER, 2, full, BACKWARD)]
    # a plain split of the fused dim cannot be chunked in place either (today's behaviour)
    assert follow(chunk, (0, 0, 2), m, CM).out_spec == (0, 0, 0)


def test_slices_of_a_split_dim():
    """x[..., a:b] of exactly one part keeps its split; any other slice of a split dim (per part
    or plain) gathers the dim first, not keeping a split that no longer lines up."""
    m = mesh(1, 4)
    per_part = split_per_part(2, (H, H, H))
    k_slice = _view("getitem", QKV, [(B, S, H)], {"index": ["...", f"slice({H},{2 * H},None)"],
                                                   "dim_groups": [[[0], [0]], [[1], [1]], [[2], [2]]]})
    assert follow(k_slice, (0, 0, per_part), m, CM).out_spec == (0, 0, 2)
    assert not follow(k_slice, (0, 0, per_part), m, CM).collectives
    for spec in ((0, 0, 2), (0, 0, split_per_part(2, (2 * H, H)))):
        st = follow(k_slice, spec, m, CM)
        assert st.out_spec == (0, 0, 0) and [c.kind for c in st.collectives] == [ALL_GATHER, ALL_GATHER]
    # a slice along another dim keeps the per-part split
    rows = _view("getitem", QKV, [(B, S // 2, 3 * H)], {"index": ["slice(None,None,None)", f"slice(0,{S // 2},None)"],
                                                         "dim_groups": [[[0], [0]], [[1], [1]], [[2], [2]]]})
    assert follow(rows, (1, 0, per_part), mesh(2, 2), CM).out_spec == (1, 0, per_part)


def test_per_part_split_survives_only_views_that_keep_the_dim_whole():
    per_part = split_per_part(2, (H, H, H))
    flat = OpNode("view", "view", VIEW, [Operand((B * S, 3 * H), "bf16", source="addmm")], [QKV], "bf16",
                  {"dim_groups": [[[0], [0, 1]], [[1], [2]]], "copy": False, "requires_grad": True}, "v")
    annotate(flat, [True])
    assert follow(flat, (0, per_part), mesh(1, 4), CM).out_spec == (0, 0, per_part)
    heads = _view("view", QKV, [(B, S, 3, H)], {"dim_groups": [[[0], [0]], [[1], [1]], [[2], [2, 3]]]})
    st = follow(heads, (0, 0, per_part), mesh(1, 4), CM)
    assert st.out_spec == (0, 0, 0, 0) and [c.kind for c in st.collectives] == [ALL_GATHER, ALL_GATHER]


def test_fused_linear_offers_each_strategy_split_per_part_at_the_same_cost():
    node = OpNode("qkv", "linear", MATMUL, [Operand((B, S, H), "bf16", source="ln"),
                                            Operand((3 * H, H), "bf16", param="w", owns_param=True),
                                            Operand((3 * H,), "bf16", param="b", owns_param=True)],
                  [QKV], "bf16", {"equation": "bsk,nk->bsn", "bias": True, "requires_grad": True,
                                  "fused_parts": [2, [H, H, H]]}, "qkv")
    annotate(node, [True, True, True])
    m = mesh(2, 2)
    sts = {s.name: s for s in decision_strategies(node, m, CM)}
    per_part = split_per_part(2, (H, H, H))
    plain, parts = sts["b@0,n@1"], sts["b@0,n@1:parts"]
    assert parts.out_spec == (1, 0, per_part) and parts.in_specs == ((1, 0, 0), (per_part, 0), (per_part,))
    assert (parts.fwd_s, parts.bwd_s, parts.collectives) == (plain.fwd_s, plain.bwd_s, plain.collectives)
    assert sorted(n for n in sts if n.endswith(":parts")) == sorted(n + ":parts" for n in sts if "n@" in n
                                                                  and not n.endswith(":parts"))


def test_follower_given_a_layout_of_the_wrong_rank_says_so():
    with pytest.raises(ValueError, match="layout of 2 dims, but the tensor has shape"):
        follow(_reduction("mean"), (0, 0), mesh(1, 2), CM)


@pytest.mark.parametrize("which", ["mlp_loss", "embedding_ce"])
def test_planning_a_module_without_blocks(which):
    """Issue 14's crash: a graph without transformer blocks is cut into clusters whose inputs
    differ in rank; each is entered only in layouts of its own input. The plan re-evaluates to
    the same step time."""
    import torch  # deferred: importing torch costs seconds
    import torch.nn.functional as F

    class MLPLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)

        def forward(self, x):
            return self.b(F.gelu(self.a(x))).pow(2).mean()

    class EmbeddingCE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.h = torch.nn.Embedding(100, 64), torch.nn.Linear(64, 100)

        def forward(self, x, y):
            return F.cross_entropy(self.h(self.e(x)).view(-1, 100), y.view(-1))

    module, inputs = ((MLPLoss(), (torch.randn(8, 16, 64),)) if which == "mlp_loss" else
                      (EmbeddingCE(), (torch.randint(0, 100, (8, 16)), torch.randint(0, 100, (8, 16)))))
    with pytest.warns(UserWarning, match="pins the microbatch size"):
        p = autopar.plan(module, example_inputs=inputs, cluster="dgx-h100", nodes=1, gpus_per_node=2, workers=1)
    assert p.predicted.step_time_s > 0
    graph = ModelSource(module, example_inputs=inputs).graph(8)
    again = autopar.evaluate(p, graph, load_cluster("dgx-h100", 1, 2))
    assert again.predicted.step_time_s == pytest.approx(p.predicted.step_time_s, rel=1e-9)
