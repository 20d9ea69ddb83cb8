"""Tracing and lowering: parameter counts, FLOPs, IR details, error messages."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import graphs
from graphs import zoo
from graphs.ir import ATTENTION, MATMUL, UNKNOWN, VIEW

SMALL = {
    "gpt": "gpt:hidden=64,layers=2,heads=4,seq=32,vocab=100",
    "llama": "llama:hidden=64,layers=2,heads=4,kv_heads=2,seq=32,vocab=100,ffn=128",
    "moe": "moe:hidden=64,layers=2,heads=4,seq=32,vocab=100,experts=4",
}


@functools.cache
def load(name: str, **kw) -> graphs.OpGraph:
    """Each big model is traced once per test session (tests only read the graph)."""
    return graphs.load(name, **kw)


def alpa_gpt_params(h: int, l: int, V: int, s: int) -> float:
    return 12 * l * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * l * h))


# --- parameter counts --------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in zoo.list_models() if n.startswith("gpt")])
def test_alpa_gpt_param_counts_match_closed_form(name):
    cfg = zoo.get_config(name)
    expected = alpa_gpt_params(cfg.hidden, cfg.layers, cfg.vocab, cfg.seq)
    module_count = sum(p.numel() for p in zoo.build_module(cfg).parameters())
    graph_count = load(name).param_count
    assert graph_count == module_count
    assert graph_count == pytest.approx(expected, rel=0.01)


def test_gpt3_175b_and_llama2_7b_param_counts():
    assert load("gpt3-175b").param_count == pytest.approx(174.6e9, rel=0.005)
    assert load("llama2-7b").param_count == pytest.approx(6.74e9, rel=0.005)


def alpa_moe_params(h: int, l: int, V: int, E: int) -> float:
    """Alpa's benchmark formula: half the blocks dense, half MoE, MLPs 8h, tied embedding."""
    attn = h * (3 * h + 1) + h * (h + 1)
    mlp = h * (8 * h + 1) + 8 * h * (h + 1)
    return l / 2 * (attn + mlp + 4 * h) + l / 2 * (attn + E * mlp + 4 * h) + V * (h + 1)


@pytest.mark.parametrize("name", [n for n in zoo.list_models() if n.startswith("moe")])
def test_alpa_moe_param_counts(name):
    cfg = zoo.get_config(name)
    count = load(name).param_count
    assert count == sum(p.numel() for p in zoo.build_module(cfg).parameters())
    # ours adds learned positions and the gate, and has no expert biases
    assert count == pytest.approx(alpa_moe_params(cfg.hidden, cfg.layers, cfg.vocab,
                                                  cfg.experts), rel=0.01)
    label = float(name.split("-")[1].rstrip("mb")) * (1e6 if name.endswith("m") else 1e9)
    assert count == pytest.approx(label, rel=0.1)


def test_tied_weight_counted_once_and_owned_by_first_use():
    g = graphs.load(SMALL["gpt"])
    uses = [(n.name, o) for n in g.nodes() for o in n.operands if o.param == "wte.weight"]
    assert len(uses) == 2
    assert [o.owns_param for _, o in uses] == [True, False]
    assert g.node(uses[0][0]).op == "embedding" and g.node(uses[1][0]).op == "linear"
    module = zoo.build_module(SMALL["gpt"])
    assert g.param_count == sum(p.numel() for p in module.parameters())


# --- FLOPs ---------------------------------------------------------------------------------

def test_llama2_7b_forward_flops_closed_form():
    cfg = zoo.get_config("llama2-7b")
    g = load("llama2-7b", batch=1, seq=4096)
    tokens, s = 4096, 4096
    n_matmul_params = g.param_count - cfg.vocab * cfg.hidden - (2 * cfg.layers + 1) * cfg.hidden
    # 2 FLOPs per weight per token (the embedding lookup is free, the head is a matmul),
    # plus QK^T and PV: 4·s²·h per layer (causal not halved)
    closed = 2 * n_matmul_params * tokens + cfg.layers * 4 * s * s * cfg.hidden
    matmul_attention = sum(n.fwd_flops for n in g.nodes() if n.kind in (MATMUL, ATTENTION))
    assert matmul_attention == pytest.approx(closed, rel=1e-9)
    assert g.fwd_flops == pytest.approx(63e12, rel=0.02)
    assert g.bwd_flops == pytest.approx(2 * g.fwd_flops, rel=0.05)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_matmul_and_attention_flops_match_flop_counter(family):
    cfg = zoo.get_config(SMALL[family])
    module = zoo.build_module(cfg, device="cpu")
    ids, targets = zoo.example_inputs(cfg, batch=2, seq=32, device="cpu")
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        module(ids, targets)
    g = graphs.trace(module, (ids, targets))
    assert g.meta["trace_method"] == "symbolic_trace"
    ours = [n for n in g.nodes() if n.kind in (MATMUL, ATTENTION)]
    assert sum(n.fwd_flops for n in ours) == counter.get_total_flops()
    # per op: every linear's FLOPs equal the counter's for its module
    by_module = {k.split(".", 1)[1]: sum(v.values())
                 for k, v in counter.get_flop_counts().items() if "." in k}
    linears = [n for n in ours if n.op == "linear" and n.module_path in by_module]
    assert len(linears) >= 4 * cfg.layers
    for n in linears:
        assert n.fwd_flops == by_module[n.module_path], n.name
    attn = [n for n in ours if n.kind == ATTENTION]
    assert len(attn) == cfg.layers
    b, s, h = 2, 32, cfg.hidden
    for n in attn:
        assert n.fwd_flops == 4 * b * s * s * h


def test_backward_flops_and_bytes_rules():
    g = graphs.load(SMALL["llama"])
    for n in g.nodes():
        if n.kind == MATMUL and n.op == "linear":
            assert n.bwd_flops == 2 * n.fwd_flops
        if n.kind == ATTENTION:
            assert n.bwd_flops == 2.5 * n.fwd_flops
        if n.kind == VIEW:
            assert n.fwd_flops == 0 and n.bwd_flops == 0
            if not n.attrs.get("copy"):
                assert n.fwd_bytes == 0
    emb = next(n for n in g.nodes() if n.op == "embedding")
    assert emb.fwd_flops == 0
    # the copy after transpose(1, 2) moves bytes; the view before it does not
    reshape = next(n for n in g.nodes() if n.op == "reshape" and n.layer == 1)
    assert reshape.attrs["copy"] and reshape.fwd_bytes == 2 * reshape.out_bytes


def test_first_linear_of_a_plain_mlp_needs_no_input_gradient():
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    g = graphs.trace(mlp, (torch.randn(8, 16),), n_layers=2)
    first, second = [n for n in g.nodes() if n.op == "linear"]
    assert first.bwd_flops == first.fwd_flops      # dW only: inputs need no gradient
    assert second.bwd_flops == 2 * second.fwd_flops


# --- IR details --------------------------------------------------------------------------

def test_gpt_ir_shapes_equations_and_views():
    g = graphs.load(SMALL["gpt"], batch=2, seq=16)
    assert (g.batch, g.seq) == (2, 16)
    assert g.meta["family"] == "gpt" and g.meta["hidden"] == 64 and g.meta["dtype"] == "bf16"
    q = next(n for n in g.nodes() if n.module_path == "blocks.0.attn.q")
    assert q.op == "linear" and q.kind == MATMUL
    assert q.attrs["equation"] == "bsk,nk->bsn"
    assert [o.param for o in q.operands] == [None, "blocks.0.attn.q.weight",
                                             "blocks.0.attn.q.bias"]
    assert q.operands[1].shape == (64, 64) and q.operands[1].dtype == "bf16"
    assert q.fwd_flops == 2 * 2 * 16 * 64 * 64
    view = g.node(g.consumers(q.name)[0])
    assert view.op == "view" and view.out_shape == (2, 16, 4, 16)
    assert view.attrs["dim_groups"] == [[[0], [0]], [[1], [1]], [[2], [2, 3]]]
    tr = g.node(g.consumers(view.name)[0])
    assert tr.op == "transpose" and tr.attrs["perm"] == [0, 2, 1, 3]
    sdpa = next(n for n in g.nodes() if n.op == "sdpa")
    assert sdpa.attrs["is_causal"] is True and "gqa" not in sdpa.attrs
    loss = next(n for n in g.nodes() if n.op == "cross_entropy")
    assert loss.out_shape == () and loss.layer == len(g.layers) - 1
    ln = next(n for n in g.nodes() if n.op == "layer_norm")
    assert ln.attrs["normalized_ndim"] == 1 and ln.fwd_flops == 5 * 2 * 16 * 64
    ids = g.node("ids")
    assert ids.op == "placeholder" and ids.out_dtype == "int64"
    # positions come from arange: a constant operand, not a node
    wpe = next(n for n in g.nodes() if n.module_path == "wpe")
    assert wpe.operands[0].source is None and wpe.operands[0].param is None


def test_llama_gqa_rope_constants_and_rms_norm():
    g = graphs.load(SMALL["llama"])
    sdpa = next(n for n in g.nodes() if n.op == "sdpa")
    assert sdpa.operands[0].shape == (1, 4, 32, 16)
    assert sdpa.operands[1].shape == (1, 2, 32, 16)
    assert sdpa.attrs["gqa"] == 2
    norm = next(n for n in g.nodes() if n.module_path == "blocks.0.attn_norm")
    assert norm.op == "rms_norm" and norm.attrs["normalized_ndim"] == 1
    # RoPE tables are buffers: constant operands read inside the block
    consts = [o for n in g.layer_nodes(1) for o in n.operands
              if o.source is None and o.param is None]
    assert consts and all(o.shape == (32, 16) for o in consts)
    # a block's only activation input is the residual stream
    block = set(g.layers[1].nodes)
    external = {o.source for n in g.layer_nodes(1) for o in n.operands
                if o.source is not None and o.source not in block}
    assert len(external) == 1


def test_moe_einsums_and_expert_parameters():
    g = graphs.load(SMALL["moe"])
    eqs = [n.attrs["equation"] for n in g.nodes() if n.op == "einsum"]
    for eq in ("bsec,bsm->ebcm", "ebcm,emf->ebcf", "ebcf,efm->ebcm", "bsec,ebcm->bsm"):
        assert eq in eqs
    w1 = next(o for n in g.nodes() for o in n.operands if o.param == "blocks.1.moe.w1")
    assert w1.shape == (4, 64, 512) and w1.owns_param   # Alpa's MoE: ffn = 8h
    gate = next(n for n in g.nodes() if n.module_path == "blocks.1.moe.gate")
    assert gate.op == "linear" and gate.out_shape == (1, 32, 4)
    topk = next(n for n in g.nodes() if n.op == "topk")
    assert topk.attrs["dims"] == [2] and len(topk.out_shapes) == 2
    # capacity ceil(2·32/4·1.25) = 20 slots per expert
    dispatch = next(n for n in g.nodes() if n.attrs.get("equation") == "bsec,bsm->ebcm")
    assert dispatch.out_shape == (4, 1, 20, 64)
    # the routing masks carry no gradient
    assert not dispatch.operands[0].source is None
    assert g.node(dispatch.operands[0].source).attrs["requires_grad"] is False


def test_dtype_choice_sets_bytes():
    bf16 = graphs.load(SMALL["gpt"])
    fp32 = graphs.load(SMALL["gpt"], dtype="fp32")
    assert fp32.param_bytes == 2 * bf16.param_bytes == 4 * bf16.param_count
    with pytest.raises(ValueError, match="unknown dtype"):
        graphs.load(SMALL["gpt"], dtype="fp13")


# --- user modules, GraphModules, export --------------------------------------------------

class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.register_buffer("scale", torch.ones(16))

    def forward(self, x):
        y = self.fc2(F.gelu(self.fc1(x))) * self.scale
        return y.softmax(dim=-1).sum(dim=(0, 1))


def test_real_weight_module_traces_without_touching_weights():
    m = TwoLayer()
    g = graphs.trace(m, (torch.randn(2, 8, 16),), n_layers=2)
    ops = [n.op for n in g.nodes()]
    assert ops == ["placeholder", "linear", "gelu", "linear", "mul", "softmax", "sum", "output"]
    mul = next(n for n in g.nodes() if n.op == "mul")
    assert mul.operands[1].source is None and mul.operands[1].shape == (16,)
    sm = next(n for n in g.nodes() if n.op == "softmax")
    assert sm.attrs["dim"] == 2
    red = next(n for n in g.nodes() if n.op == "sum")
    assert red.attrs["dims"] == [0, 1] and red.attrs["keepdim"] is False
    assert g.param_count == sum(p.numel() for p in m.parameters())
    assert sum(len(L.nodes) for L in g.layers) == len(g)


def test_fx_graph_module_and_exported_program_are_accepted():
    m = TwoLayer()
    x = torch.randn(2, 8, 16)
    gm = torch.fx.symbolic_trace(m)
    g1 = graphs.trace(gm, (x,))
    assert g1.meta["trace_method"] == "graph_module"
    ep = torch.export.export(m, (x,), strict=False)
    g2 = graphs.trace(ep)
    assert g2.meta["trace_method"] == "export"
    for g in (g1, g2):
        assert g.param_count == sum(p.numel() for p in m.parameters())
        assert [n.op for n in g.nodes() if n.kind == MATMUL] == ["linear", "linear"]
        assert g.fwd_flops == g1.fwd_flops


class ShapeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[0] > 1:          # symbolic_trace cannot branch on a traced size
            return self.fc(x).relu()
        return x


def test_export_fallback_when_symbolic_trace_fails():
    g = graphs.trace(ShapeBranch(), (torch.randn(4, 8),))
    assert g.meta["trace_method"] == "export"
    assert [n.op for n in g.nodes()] == ["placeholder", "linear", "relu", "output"]
    assert g.node(next(n.name for n in g.nodes() if n.op == "linear")).operands[1].param == \
        "fc.weight"


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:
            return y * 2
        return y


def test_untraceable_module_names_line_and_suggests_export():
    with pytest.raises(graphs.TraceError) as info:
        graphs.trace(DataDependent(), (torch.randn(4, 8),))
    msg = str(info.value)
    assert "test_graphs_trace.py" in msg and "if y.sum() > 0:" in msg
    assert "torch.export" in msg and "DataDependent" in msg
    assert isinstance(info.value, ValueError)


class DataDependentShape(nn.Module):
    def forward(self, x):
        return torch.nonzero(x).float().sum()


def test_data_dependent_shape_names_the_op():
    with pytest.raises(graphs.TraceError, match="nonzero") as info:
        graphs.trace(DataDependentShape(), (torch.randn(4, 8),))
    assert "torch.nonzero(x)" in str(info.value)


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.conv(x).transpose(1, 2)
        return torch.roll(self.fc(y), 1, dims=1).mean()


def test_unsupported_ops_are_kept_and_listed():
    g = graphs.trace(Odd(), (torch.randn(2, 8, 5),), n_layers=2)
    unknown = [n for n in g.nodes() if n.kind == UNKNOWN]
    assert sorted(n.op for n in unknown) == ["Conv1d", "roll"]
    assert sorted(g.unsupported) == sorted(n.name for n in unknown)
    summary = graphs.summarize(g)
    assert sorted(u["op"] for u in summary["unsupported"]) == ["Conv1d", "roll"]
    # kept in the dataflow: the linear reads the conv's (transposed) output
    conv = next(n for n in unknown if n.op == "Conv1d")
    assert conv.param_count == 8 * 8 * 3 + 8
    assert g.consumers(conv.name)


def test_bad_example_inputs_say_what_is_missing():
    with pytest.raises(graphs.TraceError, match="'x'"):
        graphs.trace(TwoLayer(), ())
    with pytest.raises(graphs.GraphsError, match="example_inputs"):
        graphs.load(TwoLayer())


def test_big_models_trace_fast_on_meta():
    import time
    t0 = time.perf_counter()
    g = graphs.load("gpt3-175b")      # not cached: this one measures
    elapsed = time.perf_counter() - t0
    assert elapsed < 20, elapsed          # seconds, not minutes (a few s on a laptop)
    assert len(g.layers) == 98
    assert math.isclose(g.fwd_flops, 2 * g.param_count * 2048, rel_tol=0.15)


class ManyOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16))
        self.emb = nn.Parameter(torch.randn(10, 16))

    def forward(self, x, ids):
        e = F.embedding(ids, self.emb)                    # [2, 5, 16]
        y = x @ self.w.t()                                # a view of a param folds into the op
        y = torch.max(y, e)                               # pointwise, not a reduction
        values, index = y.max(dim=-1)
        a, b = y.chunk(2, dim=-1)
        q = torch.stack([a, b], dim=0).unbind(0)[0].unsqueeze(1).expand(2, 3, 5, 8)
        z = torch.einsum("...ij,...kj->...ik", q, q)      # [2, 3, 5, 5]
        z = z.masked_fill(torch.triu(torch.ones(5, 5, dtype=torch.bool), 1), 0.0)
        picked = y[:, None, 1:3]
        gathered = y[ids[0]]
        return (z.sum() + picked.mean() + gathered.sum() + values.sum()
                + index.float().sum() + torch.norm(y, 2, -1).sum())


def test_op_coverage_of_common_torch_calls():
    g = graphs.trace(ManyOps(), (torch.randn(2, 5, 16), torch.randint(0, 10, (2, 5))),
                     n_layers=1)
    by_op = {}
    for n in g.nodes():
        by_op.setdefault(n.op, []).append(n)
    emb = by_op["embedding"][0]
    assert [o.param for o in emb.operands] == [None, "emb"]
    mm = by_op["matmul"][0]
    assert mm.operands[1].param == "w" and mm.attrs["equation"] == "bmk,kn->bmn"
    assert by_op["maximum"][0].kind == "elementwise"
    red = by_op["max"][0]
    assert red.kind == "reduction" and red.attrs["dims"] == [2] and len(red.out_shapes) == 2
    indices = next(n for n in by_op["getitem"] if n.attrs.get("index") == 1
                   and n.operands[0].source == red.name)
    assert indices.operands[0].source_index == 1 and indices.attrs["requires_grad"] is False
    assert by_op["chunk"][0].attrs == {"dim": 2, "sizes": [8, 8], "copy": False,
                                       "requires_grad": True}
    assert by_op["stack"][0].attrs["dim"] == 0 and by_op["unbind"][0].attrs["dim"] == 0
    assert by_op["expand"][0].attrs["dim_groups"] == [[[0], [0]], [[1], [1]], [[2], [2]],
                                                      [[3], [3]]]
    assert by_op["einsum"][0].attrs["equation"] == "abij,abkj->abik"
    mask = by_op["masked_fill"][0].operands[1]
    assert mask.source is None and mask.shape == (5, 5) and mask.dtype == "bool"
    picked = next(n for n in by_op["getitem"] if n.out_shape == (2, 1, 2, 16))
    assert picked.attrs["dim_groups"] == [[[0], [0]], [[], [1]], [[1], [2]], [[2], [3]]]
    assert by_op["norm"][0].attrs["dims"] == [2]
    assert [n.op for n in g.nodes() if n.kind == UNKNOWN] == ["index"]   # y[ids[0]]: gather
    assert g.param_count == 16 * 16 + 10 * 16


# --- pinned IR -----------------------------------------------------------------------------

class EveryRule(nn.Module):
    """Reaches every lowering rule in graphs/lower_rules.py, from modules, functions and
    tensor methods (symbolic trace) or their aten ops (export)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.ln, self.rms, self.gn = nn.LayerNorm(16), nn.RMSNorm(16), nn.GroupNorm(2, 4)
        self.emb, self.drop, self.act = nn.Embedding(50, 16), nn.Dropout(0.1), nn.GELU()
        self.sm, self.lsm = nn.Softmax(dim=-1), nn.LogSoftmax(dim=1)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.w = nn.Parameter(torch.randn(16, 16))
        self.b3 = nn.Parameter(torch.randn(2, 8, 16))
        self.register_buffer("mask", torch.tril(torch.ones(8, 8)))
        self.ce = nn.CrossEntropyLoss(ignore_index=3)

    def forward(self, ids, tgt):
        e = self.emb(ids)                                                   # [2, 8, 16]
        h = self.rms(self.ln(self.drop(self.act(self.lin(e))) + e))
        h = F.dropout(F.layer_norm(h, (16,), eps=1e-3), 0.2)
        q = h.view(2, 8, 4, 4).permute(0, 2, 1, 3).contiguous()
        att = (torch.matmul(q, q.transpose(-1, -2)) * 0.5).masked_fill(self.mask == 0, -1e4)
        att = F.softmax(self.sm(att), dim=-1).log_softmax(-1).exp()
        o = torch.bmm(att.reshape(8, 8, 8), q.reshape(8, 8, 4)).reshape(2, 4, 8, 4)
        o = F.scaled_dot_product_attention(o, o, o, is_causal=True).transpose(1, 2).flatten(2)
        o = o + torch.einsum("bsh,hk->bsk", o, self.w) + torch.einsum("...h,hk", o, self.w.t())
        o = torch.baddbmm(self.b3, o, self.w.expand(2, 16, 16))
        a, b = o.split(8, dim=-1)
        c1, c2 = o.chunk(2, dim=1)
        o = torch.cat([a, b], -1) + torch.stack([c1, c2]).sum(0).repeat(1, 2, 1) + o.unbind(0)[0]
        o = o + o.narrow(1, 0, 8) + o.select(0, 1).unsqueeze(0) + o[:, None, 0].squeeze(1)[:, None]
        r = o.sum(-1) + o.mean(dim=(1, 2)).unsqueeze(-1) + o.amax(-1) + o.max(-1).values
        r = r + torch.max(o, o).sum(-1) + o.norm(dim=-1) + o.var(-1) + o.cumsum(1).sum(-1)
        r = r + o.topk(2, dim=-1).values.sum(-1) + torch.logsumexp(o, -1) + o[..., 0:16].T.T.sum(-1)
        r = r + (o > 0).to(o.dtype).sum(-1) + torch.where(o > 0, o, -o).clamp(0, 1).sum(-1)
        m = self.gn(self.conv(o[:, :, :4].permute(0, 2, 1)))                 # [2, 4, 8]
        r = r + m.sum(1) + o[:, torch.tensor([0, 1])].sum((1, 2)).unsqueeze(-1) + F.silu(r)
        logits = (self.lin(o) @ self.emb.weight.t()).view(-1, 50)
        loss = self.ce(logits, tgt.view(-1)) + F.cross_entropy(logits, tgt.view(-1), reduction="sum")
        return loss + F.nll_loss(self.lsm(logits), tgt.view(-1)) + r.sum() + torch.addmm(
            self.lin.bias, o[0], self.w).sum()


def ir_digest(g: graphs.OpGraph) -> str:
    """sha256 over every node's fields (op, kind, operands, output shapes, attrs with the
    equations and dim groups, FLOPs, bytes) and the edges."""
    nodes = [n.to_dict() for n in g.nodes()]
    edges = sorted([u, v, d["operand_indices"]] for u, v, d in g.g.edges(data=True))
    return hashlib.sha256(json.dumps([nodes, edges]).encode()).hexdigest()[:16]


def pinned_graphs():
    for name in ("gpt-1.3b", "llama2-7b", "moe-1.3b"):
        yield name, load(name)
    ids, tgt = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    for method in ("symbolic", "export"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # torch: x.T on a 3-D tensor is deprecated
            yield f"EveryRule/{method}", graphs.trace(EveryRule(), (ids, tgt), method=method)


# Digests of the IR as lowered before the rules became a registry (graphs/lower_rules.py).
# A change to lowering, annotation or the zoo that alters any node shows here; if it is
# intended, paste the new digests from the failure message.
PINNED_IR = {
    "gpt-1.3b": "d1f6124d950508bc",
    "llama2-7b": "374ab66581fd964d",
    "moe-1.3b": "49249a8b45e297d8",
    "EveryRule/symbolic": "76fae46703361142",
    "EveryRule/export": "29d18e3ba2b25d04",
}


def test_lowered_ir_is_pinned():
    got = {name: ir_digest(g) for name, g in pinned_graphs()}
    assert got == PINNED_IR


class LossAndLogits(nn.Module):
    """Returns (loss, logits) as HuggingFace's causal LMs do, with a dropout switched off."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.drop = nn.Dropout(0.0)
        self.head = nn.Linear(16, 50)

    def forward(self, ids, tgt):
        logits = self.head(self.drop(self.emb(ids)))
        return F.cross_entropy(logits.view(-1, 50), tgt.view(-1)), logits


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_only_the_loss_leaves_a_training_graph(method):
    """What a model returns beside its loss is not a graph output (no GPU gathers it), and a
    dropout of p=0 is the identity: a free view."""
    ids = torch.zeros(2, 8, dtype=torch.long)
    g = graphs.trace(LossAndLogits(), (ids, ids), method=method)
    out = next(n for n in g.nodes() if n.op == "output")
    assert [(o.shape, g.node(o.source).op) for o in out.operands] == [((), "cross_entropy")]
    dropped = [(n.op, n.kind, n.fwd_flops, n.fwd_bytes) for n in g.nodes() if n.module_path == "drop"]
    assert dropped == ([("alias", VIEW, 0.0, 0.0)] if method == "symbolic" else [])
    head = next(n for n in g.nodes() if n.op == "linear")
    assert g.node(head.operands[0].source).op == ("alias" if method == "symbolic" else "embedding")
    # without a scalar loss every output stays
    inference = graphs.trace(LossAndLogits().head, (torch.zeros(2, 16),), method=method)
    assert [o.shape for o in next(n for n in inference.nodes() if n.op == "output").operands] \
        == [(2, 50)]
