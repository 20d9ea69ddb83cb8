"""The op-graph IR: a networkx DiGraph of annotated operators.

Everything downstream (strategies, cost model, ILP, DP) reads only this module's types, never
torch.fx objects, so the planner can also run on graphs built by hand in tests.

Conventions
-----------
* One node per operator that produces a tensor (or a tuple of tensors, e.g. `split`).
* Parameters are not nodes: an operator that uses a weight lists it as an `Operand` with
  `param` set to the parameter's qualified name. A parameter used by several ops (tied
  embedding / head) owns its bytes in the first op only (`Operand.owns_param`).
* Buffers and constants that no parameter depends on (RoPE tables, masks) are operands with
  `source=None, param=None`: replicated constants, no decision.
* `op` is a normalised name (below); `kind` is the coarse class the cost model and the
  strategy generator switch on.
* Every matmul-like op (linear, matmul, bmm, einsum) carries `attrs["equation"]`, an einsum
  equation over its operands in order, e.g. linear `"bsk,nk->bsn"` (weight is [out, in]),
  so sharding rules are written once for all of them.
* Views carry `attrs["dim_groups"]`: a list of `[in_dims, out_dims]` pairs saying which input
  dims become which output dims (a reshape [b,s,h] -> [b,s,a,d] is
  `[[[0],[0]], [[1],[1]], [[2],[2,3]]]`); permute/transpose carry `attrs["perm"]`
  (output dim i is input dim perm[i]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

# Coarse kinds. Each op belongs to exactly one.
MATMUL = "matmul"            # linear / matmul / bmm / einsum (attrs["equation"])
ATTENTION = "attention"      # scaled_dot_product_attention, q,k,v [b, heads, s, d]
EMBEDDING = "embedding"      # ids [..] x weight [V, h] -> [.., h]
NORM = "norm"                # layer_norm / rms_norm over the last dim(s)
ELEMENTWISE = "elementwise"  # add, mul, gelu, silu, dropout, neg, cat-free pointwise ...
SOFTMAX = "softmax"          # softmax / log_softmax over attrs["dim"]
REDUCTION = "reduction"      # sum / mean / max / topk over attrs["dims"]
VIEW = "view"                # view / reshape / permute / transpose / split / getitem / contiguous ...
LOSS = "loss"                # cross_entropy -> scalar
INPUT = "input"              # placeholder (token ids, targets, ...)
OUTPUT = "output"            # the graph's output
UNKNOWN = "unknown"          # no rule: kept, costed as replicated, and listed

KINDS = (MATMUL, ATTENTION, EMBEDDING, NORM, ELEMENTWISE, SOFTMAX, REDUCTION, VIEW, LOSS,
         INPUT, OUTPUT, UNKNOWN)

DTYPE_BYTES = {"fp64": 8, "fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1,
               "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}") from None


def numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


@dataclass(frozen=True)
class Operand:
    """One tensor input of an op, in argument order."""

    shape: tuple[int, ...]
    dtype: str
    source: str | None = None      # producer node name (activations); None for params/constants
    source_index: int = 0          # which output of a multi-output producer
    param: str | None = None       # qualified parameter name when this operand is a weight
    owns_param: bool = False       # True on the first use of a parameter (counts its bytes)

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * dtype_bytes(self.dtype)

    @property
    def is_param(self) -> bool:
        return self.param is not None


@dataclass
class OpNode:
    name: str
    op: str                                  # normalised op name: "linear", "add", "sdpa", ...
    kind: str                                # one of KINDS
    operands: list[Operand] = field(default_factory=list)
    out_shapes: list[tuple[int, ...]] = field(default_factory=list)
    out_dtype: str = "fp32"
    attrs: dict[str, Any] = field(default_factory=dict)
    module_path: str = ""                    # e.g. "blocks.3.attn.qkv"
    layer: int = -1                          # index into OpGraph.layers (-1 before layering)
    target: str = ""                         # what the trace saw (for messages)
    fwd_flops: float = 0.0
    bwd_flops: float = 0.0
    fwd_bytes: float = 0.0                   # bytes read + written by the forward kernel(s)
    bwd_bytes: float = 0.0

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.out_shapes[0] if self.out_shapes else ()

    @property
    def out_bytes(self) -> int:
        return sum(numel(s) for s in self.out_shapes) * dtype_bytes(self.out_dtype)

    @property
    def param_operands(self) -> list[Operand]:
        return [o for o in self.operands if o.is_param]

    @property
    def param_bytes(self) -> int:
        """Bytes of the parameters this op owns (tied weights count once, at the first use)."""
        return sum(o.nbytes for o in self.operands if o.is_param and o.owns_param)

    @property
    def param_count(self) -> int:
        return sum(numel(o.shape) for o in self.operands if o.is_param and o.owns_param)

    def activation_operands(self) -> list[tuple[int, Operand]]:
        return [(i, o) for i, o in enumerate(self.operands) if o.source is not None]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["operands"] = [dataclasses.asdict(o) for o in self.operands]
        return d


@dataclass(frozen=True)
class Layer:
    """A contiguous group of ops; the unit the stage DP slices."""

    index: int
    name: str                    # "embed", "block.3", "head", "cluster.2", ...
    nodes: tuple[str, ...]       # node names in topological order
    structural_hash: str         # equal hashes <=> identical op sequences, attrs and shapes
    fwd_flops: float
    param_count: int


class OpGraph:
    """Annotated dataflow graph of one training forward pass.

    `g` is the networkx DiGraph; node `n` has `g.nodes[n]["op"]` -> OpNode. An edge u->v
    means v reads u's output; `g.edges[u, v]["operand_indices"]` lists which of v's operands.
    """

    def __init__(self, name: str = "model", batch: int = 1, seq: int = 0,
                 meta: dict[str, Any] | None = None):
        self.name = name
        self.batch = batch
        self.seq = seq
        self.meta: dict[str, Any] = dict(meta or {})   # hidden, heads, vocab, ... when known
        self.g = nx.DiGraph()
        self.layers: list[Layer] = []
        self.unsupported: list[str] = []                # node names whose op has no rule

    # construction -------------------------------------------------------------------------
    def add(self, node: OpNode) -> OpNode:
        if node.name in self.g:
            raise ValueError(f"duplicate node name {node.name!r}")
        self.g.add_node(node.name, op=node)
        for i, o in enumerate(node.operands):
            if o.source is not None:
                if o.source not in self.g:
                    raise ValueError(f"{node.name}: operand {i} reads unknown node {o.source!r}")
                if self.g.has_edge(o.source, node.name):
                    self.g.edges[o.source, node.name]["operand_indices"].append(i)
                else:
                    self.g.add_edge(o.source, node.name, operand_indices=[i])
        return node

    # queries ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.g.number_of_nodes()

    def __contains__(self, name: str) -> bool:
        return name in self.g

    def node(self, name: str) -> OpNode:
        return self.g.nodes[name]["op"]

    def nodes(self) -> Iterator[OpNode]:
        """Nodes in insertion order, which is a topological order."""
        for n in self.g.nodes:
            yield self.g.nodes[n]["op"]

    def consumers(self, name: str) -> list[str]:
        return list(self.g.successors(name))

    def producers(self, name: str) -> list[str]:
        return list(self.g.predecessors(name))

    @property
    def param_count(self) -> int:
        return sum(n.param_count for n in self.nodes())

    @property
    def param_bytes(self) -> int:
        return sum(n.param_bytes for n in self.nodes())

    @property
    def fwd_flops(self) -> float:
        return sum(n.fwd_flops for n in self.nodes())

    @property
    def bwd_flops(self) -> float:
        return sum(n.bwd_flops for n in self.nodes())

    def kind_histogram(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for n in self.nodes():
            hist[n.kind] = hist.get(n.kind, 0) + 1
        return dict(sorted(hist.items()))

    def layer_nodes(self, index: int) -> list[OpNode]:
        return [self.node(n) for n in self.layers[index].nodes]
