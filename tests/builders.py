"""Hand-built op graphs for tests: no tracer involved, every node written out.

`megatron_gpt(...)` is the GPT of Megatron-LM's activation-memory paper (Korthikanti et al.,
"Reducing Activation Recomputation in Large Transformer Models", 2022, §4.1) with *eager*
attention: LN, QKV linears (separate or fused), view/transpose to heads, QK^T bmm, scale,
softmax, dropout, PV bmm, transpose/reshape back, output linear, dropout, residual add, LN,
fc1, GELU, fc2, dropout, residual add. Layer 0 is the token embedding, the last layer the final
LN, the LM head and the loss, as the zoo's graphs are laid out.
"""

from __future__ import annotations

import math

from graphs.annotate import annotate
from graphs.ir import ELEMENTWISE, EMBEDDING, INPUT, LOSS, MATMUL, NORM, SOFTMAX, VIEW, Operand, OpGraph, OpNode
from graphs.layers import assign_layers
from graphs.lower_rules import linear_equation, reshape_dim_groups

DT = "bf16"


class _B:
    """A tiny graph writer: each call adds one annotated node and returns its name."""

    def __init__(self, g: OpGraph):
        self.g = g
        self.owned: set[str] = set()

    def act(self, name: str) -> Operand:
        n = self.g.node(name)
        return Operand(n.out_shape, n.out_dtype, source=name)

    def param(self, pname: str, shape) -> Operand:
        owns = pname not in self.owned
        self.owned.add(pname)
        return Operand(tuple(shape), DT, param=pname, owns_param=owns)

    def add(self, name, op, kind, operands, out_shape, path, attrs=None, out_dtype=DT, grads=None):
        node = OpNode(name, op, kind, list(operands), [tuple(out_shape)], out_dtype, dict(attrs or {}), path)
        if grads is None:   # activations and float params need gradients; ids and constants do not
            grads = [(o.source is not None and not o.dtype.startswith("int")) or o.is_param for o in operands]
        node.attrs["requires_grad"] = kind != INPUT and any(grads)
        annotate(node, grads if node.attrs["requires_grad"] else [False] * len(grads))
        self.g.add(node)
        return name

    # -- ops -------------------------------------------------------------------------------
    def linear(self, name, x, pname, n_out, path, bias=True):
        xs = self.g.node(x).out_shape
        k = xs[-1]
        ops = [self.act(x), self.param(pname + ".weight", (n_out, k))]
        if bias:
            ops.append(self.param(pname + ".bias", (n_out,)))
        return self.add(name, "linear", MATMUL, ops, xs[:-1] + (n_out,), path,
                        {"equation": linear_equation(len(xs)), "bias": bias})

    def layer_norm(self, name, x, pname, path):
        h = self.g.node(x).out_shape[-1]
        ops = [self.act(x), self.param(pname + ".weight", (h,)), self.param(pname + ".bias", (h,))]
        return self.add(name, "layer_norm", NORM, ops, self.g.node(x).out_shape, path,
                        {"normalized_ndim": 1, "eps": 1e-5})

    def view(self, name, x, shape, path, copy=False, op="view"):
        src = self.g.node(x).out_shape
        return self.add(name, op, VIEW, [self.act(x)], shape, path,
                        {"dim_groups": reshape_dim_groups(tuple(src), tuple(shape)), "copy": copy})

    def transpose(self, name, x, d0, d1, path):
        src = self.g.node(x).out_shape
        perm = list(range(len(src)))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return self.add(name, "transpose", VIEW, [self.act(x)], tuple(src[p] for p in perm), path,
                        {"perm": perm, "copy": False})

    def bmm4(self, name, a, b, path):
        """torch.matmul of two [b, heads, m, k] x [b, heads, k, n] activations."""
        sa, sb = self.g.node(a).out_shape, self.g.node(b).out_shape
        return self.add(name, "matmul", MATMUL, [self.act(a), self.act(b)], sa[:-1] + (sb[-1],), path,
                        {"equation": "bhmk,bhkn->bhmn"})

    def pointwise(self, name, op, xs, path, **attrs):
        ops = [self.act(x) for x in xs]
        return self.add(name, op, ELEMENTWISE, ops, self.g.node(xs[0]).out_shape, path,
                        {"scalars": attrs.pop("scalars", []), **attrs})


def megatron_gpt(hidden: int = 64, heads: int = 4, seq: int = 32, batch: int = 2, layers: int = 1,
                 vocab: int = 128, ffn: int | None = None, fused_qkv: bool = False, dropout: float = 0.1,
                 name: str = "megatron-gpt") -> OpGraph:
    """The IR of a Megatron GPT (see module doc): layers are embed, block.0..L-1, head."""
    h, a, s, b = hidden, heads, seq, batch
    d = h // a
    f = ffn or 4 * h
    g = OpGraph(name, batch=b, seq=s, meta={"family": "gpt", "hidden": h, "layers": layers, "heads": a,
                                            "kv_heads": a, "ffn": f, "vocab": vocab, "seq": s, "tied": False})
    w = _B(g)
    w.add("ids", "placeholder", INPUT, [], (b, s), "", {"input": "ids"}, out_dtype="int64")
    w.add("targets", "placeholder", INPUT, [], (b, s), "", {"input": "targets"}, out_dtype="int64")
    x = w.add("wte", "embedding", EMBEDDING, [w.act("ids"), w.param("wte.weight", (vocab, h))], (b, s, h), "wte")
    for i in range(layers):
        p = f"blocks.{i}"
        ln1 = w.layer_norm(f"{p}.ln1", x, f"{p}.ln1", f"{p}.ln1")
        heads_of = {}
        if fused_qkv:
            qkv = w.linear(f"{p}.qkv", ln1, f"{p}.attn.qkv", 3 * h, f"{p}.attn.qkv")
            qkv4 = w.view(f"{p}.qkv_view", qkv, (b, s, a, 3 * d), f"{p}.attn")
            node = OpNode(f"{p}.qkv_split", "split", VIEW, [w.act(qkv4)], [(b, s, a, d)] * 3, DT,
                          {"dim": 3, "sizes": [d, d, d], "copy": False}, f"{p}.attn")
            node.attrs["requires_grad"] = True
            annotate(node, [True])
            g.add(node)
            for j, c in enumerate("qkv"):
                gi = OpNode(f"{p}.{c}_get", "getitem", VIEW,
                            [Operand((b, s, a, 3 * d)[:3] + (d,), DT, source=node.name, source_index=j)],
                            [(b, s, a, d)], DT, {"index": j, "copy": False}, f"{p}.attn")
                gi.attrs["requires_grad"] = True
                annotate(gi, [True])
                g.add(gi)
                heads_of[c] = w.transpose(f"{p}.{c}_t", gi.name, 1, 2, f"{p}.attn")
        else:
            for c in "qkv":
                lin = w.linear(f"{p}.{c}", ln1, f"{p}.attn.{c}", h, f"{p}.attn.{c}")
                v4 = w.view(f"{p}.{c}_view", lin, (b, s, a, d), f"{p}.attn")
                heads_of[c] = w.transpose(f"{p}.{c}_t", v4, 1, 2, f"{p}.attn")
        kT = w.transpose(f"{p}.k_T", heads_of["k"], 2, 3, f"{p}.attn")
        scores = w.bmm4(f"{p}.scores", heads_of["q"], kT, f"{p}.attn")
        scaled = w.pointwise(f"{p}.scale", "mul", [scores], f"{p}.attn", scalars=[1 / math.sqrt(d)])
        probs = w.add(f"{p}.softmax", "softmax", SOFTMAX, [w.act(scaled)], g.node(scaled).out_shape,
                      f"{p}.attn", {"dim": 3})
        if dropout > 0:
            probs = w.pointwise(f"{p}.attn_drop", "dropout", [probs], f"{p}.attn", p=dropout)
        ctx = w.bmm4(f"{p}.ctx", probs, heads_of["v"], f"{p}.attn")
        ctx_t = w.transpose(f"{p}.ctx_t", ctx, 1, 2, f"{p}.attn")
        ctx_r = w.view(f"{p}.ctx_r", ctx_t, (b, s, h), f"{p}.attn", copy=True, op="reshape")
        proj = w.linear(f"{p}.proj", ctx_r, f"{p}.attn.proj", h, f"{p}.attn.proj")
        if dropout > 0:
            proj = w.pointwise(f"{p}.proj_drop", "dropout", [proj], f"{p}.attn", p=dropout)
        res1 = w.pointwise(f"{p}.add1", "add", [x, proj], p)
        ln2 = w.layer_norm(f"{p}.ln2", res1, f"{p}.ln2", f"{p}.ln2")
        fc1 = w.linear(f"{p}.fc1", ln2, f"{p}.mlp.fc1", f, f"{p}.mlp.fc1")
        act = w.pointwise(f"{p}.gelu", "gelu", [fc1], f"{p}.mlp")
        fc2 = w.linear(f"{p}.fc2", act, f"{p}.mlp.fc2", h, f"{p}.mlp.fc2")
        if dropout > 0:
            fc2 = w.pointwise(f"{p}.mlp_drop", "dropout", [fc2], f"{p}.mlp", p=dropout)
        x = w.pointwise(f"{p}.add2", "add", [res1, fc2], p)
    lnf = w.layer_norm("ln_f", x, "ln_f", "ln_f")
    logits = w.linear("head", lnf, "head", vocab, "head", bias=False)
    flat = w.view("logits_flat", logits, (b * s, vocab), "")
    tflat = w.add("targets_flat", "view", VIEW, [w.act("targets")], (b * s,), "",
                  {"dim_groups": [[[0, 1], [0]]], "copy": False}, out_dtype="int64", grads=[False])
    w.add("loss", "cross_entropy", LOSS, [w.act(flat), w.act(tflat)], (), "",
          {"reduction": "mean", "ignore_index": -100}, out_dtype="fp32")
    assign_layers(g)
    return g


def block_names(g: OpGraph, i: int = 0) -> list[str]:
    """Node names of transformer block i (graph layer i + 1)."""
    return list(g.layers[i + 1].nodes)


def rotated_strategy_plans(base, cluster, label: str) -> list[str]:
    """One-stage plans, as JSON, made from `base` (a one-stage plan of a zoo model) that together
    give every decision op each of its strategies: plan k gives op i its ((k + i) mod n_i)-th."""
    import copy
    import dataclasses

    import graphs
    from autopar.costmodel.compute import ComputeModel
    from autopar.evaluation.evaluator import evaluate
    from autopar.hardware.mesh import Mesh, Submesh
    from autopar.plan import Plan
    from autopar.sharding.stage_problem import StageProblem
    from graphs.query import stage_nodes
    g = graphs.load(base.model.name, batch=base.training.microbatch_size)
    st = base.stages[0]
    prob = StageProblem(g, stage_nodes(g, tuple(st.layers)), Mesh(cluster, Submesh(*st.submesh), tuple(st.logical_mesh)),
                        ComputeModel(cluster.gpu, base.training.dtype))
    roots = [(gr.root, [x.name for x in gr.strategies[gr.root]]) for gr in prob.groups]
    out = []
    for k in range(max(len(names) for _, names in roots)):
        p = Plan.from_dict(copy.deepcopy(base.to_dict()))
        p.stages[0].strategies = {r: names[(k + i) % len(names)] for i, (r, names) in enumerate(roots)}
        p.config = dataclasses.replace(p.config, label=f"{label} #{k}")
        out.append(evaluate(p, g, cluster).to_json())
    return out
