"""Fused projections (one q|k|v weight, one gate|up weight) get Megatron's tensor parallelism:
the fused output dim split per part, each part column-parallel, and the chunk / split / slices
that follow keep every part split with no communication (issue 14, item 3).

Oracle: the same decoder layer written with separate q, k, v, gate and up projections, solved
by the same ILP. Its communication must be the fused layer's exactly, and its time the fused
layer's up to the projections' own compute (one wide GEMM against three or two narrow ones)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autopar.costmodel.collectives import ALL_GATHER, ALL_REDUCE, STEP, collective_s
from autopar.costmodel.compute import ComputeModel
from autopar.evaluation.baselines import megatron_names
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.sharding.spec import mesh_dims, parse_spec, parts_of, spec_str, split_per_part
from autopar.sharding.stage_problem import Settings, StageProblem
from graphs.query import fused_parts, main_boundary

H100 = load_cluster("dgx-h100", 1)
CM = ComputeModel(H100.gpu, H100.gpu.training_dtype())
HIDDEN, HEADS, FF, SEQ = 4096, 32, 11008, 2048      # Llama-2-7B's layer: tensor parallelism pays


class Layer(nn.Module):
    """A pre-norm decoder layer; `qkv` is "separate", "fused" (chunk or, with GQA, split),
    "slices" (x[..., a:b]), "conv1d" (GPT-2's addmm with an [h, 3h] weight) or "neox"
    ([b, s, heads, 3*d] then split on the last dim)."""

    def __init__(self, qkv: str, kv_heads: int = HEADS, fused_mlp: bool = True):
        super().__init__()
        self.qkv_kind, self.kv, self.d, self.fused_mlp = qkv, kv_heads, HIDDEN // HEADS, fused_mlp
        n_qkv = (HEADS + 2 * kv_heads) * self.d
        self.n1, self.n2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        if qkv == "separate":
            self.q = nn.Linear(HIDDEN, HEADS * self.d)
            self.k = nn.Linear(HIDDEN, kv_heads * self.d)
            self.v = nn.Linear(HIDDEN, kv_heads * self.d)
        elif qkv == "conv1d":
            self.qkv_w = nn.Parameter(torch.empty(HIDDEN, n_qkv))
            self.qkv_b = nn.Parameter(torch.empty(n_qkv))
        else:
            self.qkv = nn.Linear(HIDDEN, n_qkv)
        if fused_mlp:
            self.gate_up = nn.Linear(HIDDEN, 2 * FF, bias=False)
        else:
            self.gate, self.up = nn.Linear(HIDDEN, FF, bias=False), nn.Linear(HIDDEN, FF, bias=False)
        self.o, self.down = nn.Linear(HIDDEN, HIDDEN), nn.Linear(FF, HIDDEN, bias=False)

    def attention_inputs(self, y):
        b, t, _ = y.shape
        hd, kd = HEADS * self.d, self.kv * self.d
        kind = self.qkv_kind
        if kind == "separate":
            q, k, v = self.q(y), self.k(y), self.v(y)
        elif kind == "neox":
            q, k, v = self.qkv(y).view(b, t, HEADS, 3 * self.d).split(self.d, dim=-1)
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        elif kind == "slices":
            qkv = self.qkv(y)
            q, k, v = qkv[..., :hd], qkv[..., hd:hd + kd], qkv[..., hd + kd:]
        else:
            qkv = (torch.addmm(self.qkv_b, y.view(-1, HIDDEN), self.qkv_w).view(b, t, -1) if kind == "conv1d"
                   else self.qkv(y))
            q, k, v = qkv.chunk(3, dim=-1) if self.kv == HEADS else qkv.split([hd, kd, kd], dim=-1)
        return (q.view(b, t, HEADS, self.d).transpose(1, 2), k.view(b, t, self.kv, self.d).transpose(1, 2),
                v.view(b, t, self.kv, self.d).transpose(1, 2))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.attention_inputs(self.n1(x))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != HEADS)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, HIDDEN))
        y = self.n2(x)
        g, u = self.gate_up(y).chunk(2, dim=-1) if self.fused_mlp else (self.gate(y), self.up(y))
        return x + self.down(F.silu(g) * u)


class Decoder(nn.Module):
    def __init__(self, qkv: str, kv_heads: int = HEADS, fused_mlp: bool = True, vocab: int = 4096):
        super().__init__()
        self.emb = nn.Embedding(vocab, HIDDEN)
        self.layers = nn.ModuleList([Layer(qkv, kv_heads, fused_mlp)])
        self.norm, self.head = nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, vocab, bias=False)

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def _graph(qkv: str, batch: int, kv_heads: int = HEADS):
    with torch.device("meta"):
        model = Decoder(qkv, kv_heads, fused_mlp=qkv != "separate")
    return ModelSource(model, example_inputs=(torch.zeros(batch, SEQ, dtype=torch.long, device="meta"),)).graph(batch)


def _solve(qkv: str, shape: tuple[int, int], batch: int, boundary, kv_heads: int = HEADS):
    g = _graph(qkv, batch, kv_heads)
    names = list(g.layers[1].nodes)
    mesh = Mesh(H100, Submesh(1, shape[0] * shape[1]), shape)
    prob = StageProblem(g, names, mesh, CM, boundary={main_boundary(g, names): boundary})
    settings = Settings(n_microbatches=4)
    res = prob.solve(settings)
    assert res.status == "optimal"
    ev = prob.evaluate(res.choice, settings)
    chosen = {_short(prob.graph.node(grp.root)): grp.strategies[grp.root][int(res.choice[gi])].name
              for gi, grp in enumerate(prob.groups) if len(grp.strategies[grp.root]) > 1}
    return prob, res, ev, chosen


def _short(node) -> str:
    """"attention", or a projection's module name ("qkv", "o", ...; GPT-2's "addmm")."""
    if node.kind == "attention":
        return "attention"
    return node.op if node.op == "addmm" else node.module_path.rpartition(".")[2]


def _projection_compute_s(prob, res, paths) -> float:
    """Forward + backward compute of the projections named by their module paths' last part."""
    total = 0.0
    for name in prob.names:
        if _short(prob.graph.node(name)) in paths:
            st = prob.strategy_of(name, int(res.choice[prob.group_of[name]]))
            total += st.fwd_s + st.bwd_s
    return total


def _step_bytes(prob, res) -> float:
    """Bytes of the once-per-step collectives (gradient sync) at ZeRO 0."""
    return sum(c.nbytes for name in prob.names
               for c in prob.strategy_of(name, int(res.choice[prob.group_of[name]])).runs(0) if c.phase == STEP)


SEPARATE = ("q", "k", "v", "gate", "up")
FUSED = ("qkv", "addmm", "gate_up")

@pytest.mark.parametrize("qkv", ["fused", "slices", "conv1d", "neox"])
@pytest.mark.parametrize("shape,batch,boundary", [((1, 8), 1, (0, 0, 0)), ((2, 4), 2, (1, 0, 0))])
def test_fused_layer_gets_megatron_tensor_parallelism(qkv, shape, batch, boundary):
    sep_prob, sep_res, sep, sep_chosen = _solve("separate", shape, batch, boundary)
    prob, res, ev, chosen = _solve(qkv, shape, batch, boundary)
    dp = "b@0," if shape[0] > 1 else ""
    # the separate layer is Megatron's pattern ...
    assert sep_chosen == {"q": f"{dp}n@1", "k": f"{dp}n@1", "v": f"{dp}n@1",
                          "attention": f"{dp}h@1", "o": f"{dp}k@1",
                          "gate": f"{dp}n@1", "up": f"{dp}n@1", "down": f"{dp}k@1"}
    # ... and so is the fused one: its fused output split per part (NeoX's [heads, 3*d] view
    # keeps the heads major, so a plain column split already is head-parallel there)
    per_part = "n@1" if qkv == "neox" else "n@1:parts"
    qkv_op = "addmm" if qkv == "conv1d" else "qkv"
    qkv_dp = dp.replace("b@", "m@")  if qkv == "conv1d" else dp     # addmm reads [b*s, h]: its batch letter is m
    assert chosen == {qkv_op: qkv_dp + per_part, "attention": f"{dp}h@1", "o": f"{dp}k@1",
                      "gate_up": f"{dp}n@1:parts", "down": f"{dp}k@1"}
    # the same communication, and the same time but for the projections' own GEMMs
    assert ev.comm_s == pytest.approx(sep.comm_s, rel=1e-9)
    # the gradient sync moves the same bytes, in fewer collectives (fewer latencies)
    assert _step_bytes(prob, res) == pytest.approx(_step_bytes(sep_prob, sep_res), rel=1e-9)
    assert ev.sync_s <= sep.sync_s
    fused_proj = _projection_compute_s(prob, res, FUSED)
    sep_proj = _projection_compute_s(sep_prob, sep_res, SEPARATE)
    assert ev.per_microbatch_s - fused_proj == pytest.approx(sep.per_microbatch_s - sep_proj, rel=1e-9)
    assert abs(ev.per_microbatch_s / sep.per_microbatch_s - 1) < 0.1
    # a backward never comes out cheaper than its forward
    assert ev.fwd_s <= ev.bwd_s and sep.fwd_s <= sep.bwd_s


def test_gqa_fused_qkv_unequal_parts():
    """q | k | v of 32 | 8 | 8 heads: the split sizes are unequal; each part still divides by 8."""
    sep_prob, sep_res, sep, sep_chosen = _solve("separate", (1, 8), 1, (0, 0, 0), kv_heads=8)
    prob, res, ev, chosen = _solve("fused", (1, 8), 1, (0, 0, 0), kv_heads=8)
    assert chosen["qkv"] == "n@1:parts" and chosen["attention"] == "h@1"
    qkv = next(n for n in prob.names if prob.graph.node(n).module_path.endswith(".qkv"))
    st = prob.strategy_of(qkv, int(res.choice[prob.group_of[qkv]]))
    d = HIDDEN // HEADS
    assert parts_of(st.out_spec[-1]) == (32 * d, 8 * d, 8 * d)
    assert spec_str(st.in_specs[1]) == f"S1[{32 * d},{8 * d},{8 * d}]R"
    assert ev.comm_s == pytest.approx(sep.comm_s, rel=1e-9)


def test_objective_is_the_evaluators_cost_with_per_part_splits():
    prob, res, ev, _ = _solve("fused", (2, 4), 2, (1, 0, 0))
    settings = Settings(n_microbatches=4)
    assert prob.objective(res.choice, settings) == pytest.approx(res.objective, rel=1e-9)


def test_fused_parts_found_through_views_and_slices_not_elsewhere():
    d = HIDDEN // HEADS
    for qkv, kv, want in [("fused", HEADS, (HIDDEN,) * 3), ("fused", 4, (HIDDEN, 4 * d, 4 * d)),
                          ("slices", 4, (HIDDEN, 4 * d, 4 * d)), ("conv1d", HEADS, (HIDDEN,) * 3)]:
        g = _graph(qkv, 1, kv)
        op = next(n for n in g.layers[1].nodes if g.node(n).op in ("linear", "addmm")
                  and g.node(n).out_shape[-1] == sum(want))
        assert fused_parts(g, op) == (len(g.node(op).out_shape) - 1, want), qkv
    g = _graph("neox", 1)
    assert all("fused_parts" not in g.node(n).attrs for n in g.layers[1].nodes if g.node(n).out_shape[-1] == 3 * HIDDEN)
    g = _graph("separate", 1)
    assert not any("fused_parts" in n.attrs for n in g.nodes())


def test_a_fused_output_read_elsewhere_too_keeps_todays_strategies():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(64, 192)

        def forward(self, x):
            y = self.qkv(x)
            q, k, v = y.chunk(3, dim=-1)
            return (q * k + v).sum() + y.mean()

    g = ModelSource(Odd(), example_inputs=(torch.randn(8, 16, 64),)).graph(8)
    assert fused_parts(g, "qkv") is None


def test_per_part_layout_is_written_truthfully_and_refused_as_a_dtensor_placement():
    mask = split_per_part(2, (1024, 256, 256))
    spec = (0, 0, mask)
    assert spec_str(spec) == "RRS1[1024,256,256]" and parse_spec(spec_str(spec)) == spec
    with pytest.raises(ValueError, match="per part"):
        mesh_dims(spec)


def test_hand_made_megatron_splits_fused_projections_per_part():
    """The 3D baselines' Megatron layout of a fused layer is the ILP's, at the same cost."""
    prob, res, ev, _ = _solve("fused", (1, 8), 1, (0, 0, 0))
    wanted = megatron_names(prob.graph, prob.names, 1, 8)
    names = {n: w[0] for n, w in wanted.items()}
    assert {names[n] for n in prob.names if _short(prob.graph.node(n)) in FUSED} == {"n@1:parts"}
    hand = prob.evaluate(prob.choice_from_names(names), Settings(n_microbatches=4))
    assert hand.per_microbatch_s == pytest.approx(ev.per_microbatch_s, rel=1e-9)
    # data parallel alone asks for no per-part split (none exists without a split fused letter)
    assert all(not w[0].endswith(":parts") for w in megatron_names(prob.graph, prob.names, 8, 1).values())


def test_backward_of_a_free_slice_is_the_gather_of_its_gradient():
    """The issue's backward-cheaper-than-forward: qkv split on its contraction (k@1) reads the
    replicated norm output through a free slice; in backward each device holds only its slice of
    that input's gradient, which the norm needs whole: an all-gather over axis 1, now charged
    (before, backward resharding was priced as the forward's, 0)."""
    g = _graph("fused", 1)
    names = list(g.layers[1].nodes)
    mesh = Mesh(H100, Submesh(1, 8), (1, 8))
    qkv = next(n for n in names if g.node(n).module_path.endswith(".qkv"))
    prob = StageProblem(g, names, mesh, CM, boundary={main_boundary(g, names): (0, 0, 0)}, allowed={qkv: {"k@1"}})
    choice = prob.choice_from_names({qkv: "k@1"})
    op = next(o for o in prob.evaluate(choice, Settings(n_microbatches=4), with_ops=True).ops if o["name"] == qkv)
    node = g.node(qkv)
    x_bytes, out_bytes = node.operands[0].nbytes, node.out_bytes
    want = collective_s(ALL_REDUCE, out_bytes, mesh.axis(2)) + collective_s(ALL_GATHER, x_bytes, mesh.axis(2))
    assert op["comm_s"] == pytest.approx(want, rel=1e-9)
