"""Intra-op pass: one ILP per (set of ops, logical mesh), and the cost of any assignment.

`StageProblem` turns a set of graph nodes on a mesh into the ILP of DESIGN §5: decision ops
enumerate strategies, followers join their leader's group (one ILP node per group), edges
between groups get resharding matrices, producers outside the set are fixed "boundary"
layouts. Both the ILP's objective (`ilp_arrays`) and the score of any assignment (`evaluate`)
are sums of one function of each op's cost record (`member_cost`, i.e. strategy.op_cost), plus
the resharding of the edges, so a searched plan and a hand-made plan are scored alike.

An edge costs its resharding in forward; in backward the gradient's way back (a slice's is an
all-gather) plus the resharding again (spec.reshard_backward_s), with one exception:
sequence parallelism's all-gather (`_gather_into_partial_s`). When the conversion only gathers
axes over which the consumer's gradient of that input is a partial sum (a column-parallel
matmul reading a sequence-split norm output), Megatron-LM runs, per tensor (shared by the
matmuls reading it, as their gradient all-reduce is): the all-gather in forward, in backward
the all-gather again (the stash keeps the split input) and a reduce-scatter of the gradient in
place of the all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from autopar.costmodel.collectives import ALL_GATHER, ALL_REDUCE, BACKWARD, REDUCE_SCATTER, Collective, collective_s
from autopar.costmodel.compute import ComputeModel
from autopar.costmodel.memory import param_state_bytes
from autopar.hardware.mesh import Mesh
from autopar.sharding.rules import decision_strategies, follow, is_decision, leader_operand
from autopar.sharding.spec import Spec, reshard_backward_s, reshard_collectives, reshard_s, shard_factor, spec_str
from autopar.sharding.strategy import OpCost, Strategy, op_cost, sharded_storage_cost
from graphs.ir import ATTENTION, ELEMENTWISE, INPUT, LOSS, MATMUL, NORM, SOFTMAX, VIEW, OpGraph, OpNode, dtype_bytes

# Ops whose backward needs their activation inputs (so those tensors stay stashed).
_SAVES_INPUTS = {"gelu", "silu", "relu", "tanh", "sigmoid", "exp", "pow", "rsqrt", "div", "mul", "sqrt",
                 "log", "sin", "cos", "softplus", "erf", "square", "reciprocal"}
_PURE_VIEWS = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "expand", "permute",
               "transpose", "split", "chunk", "getitem", "t", "unbind", "select", "slice", "narrow", "alias",
               "_unsafe_view", "expand_as", "view_as"}


@dataclass(frozen=True)
class Settings:
    n_microbatches: int = 1
    zero: int = 0                  # 0 none, 1 optimizer states, 2 + gradients, 3 + weights
    inflight: int = 1              # microbatches whose activations a stage holds at once


def saved_tensors(graph: OpGraph, names) -> tuple[dict[str, float], dict[str, float]]:
    """Which outputs stay stashed for backward: for each node, the factor of its output kept
    (1; dropout adds a 1-byte mask, recorded as 0.5 of a 2-byte tensor). Saves through pure
    views are charged to the op that owns the storage. The second dict holds producers outside
    `names` whose outputs the set keeps (a stage keeps the input it received): charged to the
    set that keeps them, so summing over layers counts every tensor once."""
    order = list(dict.fromkeys(names))
    names = set(order)
    saved: dict[str, float] = {}
    masks: dict[str, float] = {}
    outside: dict[str, float] = {}
    for name in order:
        v = graph.node(name)
        for src in _marked(graph, v):
            if src in names:
                saved[src] = max(saved.get(src, 0.0), 1.0)
            elif src in graph and graph.node(src).kind != INPUT:
                outside[src] = max(outside.get(src, 0.0), 1.0)
        if _keeps_dropout_mask(v):
            masks[name] = masks.get(name, 0.0) + 0.5 * 2 / max(1, dtype_bytes(v.out_dtype))
    # The mask is kept on top of the dropout's output when a later op saves that output too
    # (softmax -> dropout -> PV matmul keeps both), whatever order the ops are visited in.
    for name, w in masks.items():
        saved[name] = saved.get(name, 0.0) + w
    return saved, outside


def _marked(graph: OpGraph, v: OpNode) -> list[str]:
    """The producers whose outputs op `v`'s backward keeps, in the order saved_tensors marks
    them, each traced through pure views to the op that owns the storage: the same whatever
    set of ops `v` is in (saved_tensors sorts them into the set's and the outside's)."""
    out: list[str] = []

    def mark(src: str | None):
        seen = 0
        while src is not None and src in graph and seen < 64:
            n = graph.node(src)
            if n.kind == VIEW and n.op in _PURE_VIEWS:
                li = leader_operand(n)
                if li is None or n.operands[li].source is None:
                    break
                src = n.operands[li].source
                seen += 1
                continue
            break
        if src is not None:
            out.append(src)

    name = v.name
    k = v.kind
    acts = [o for o in v.operands if o.source is not None]
    if k in (MATMUL, ATTENTION, NORM, LOSS):
        for o in acts:
            if not (o.dtype.startswith("int") or o.dtype == "bool"):
                mark(o.source)
        if k == ATTENTION:
            mark(name)
    elif k == SOFTMAX:
        mark(name)
    elif k == ELEMENTWISE:
        if v.op in ("mul", "div"):
            # x * c and x / c (c a scalar or a constant buffer) need only c in backward;
            # an operand is kept only when another operand (activation or weight) needs
            # a gradient that reads it, or (div) the divisor is not a constant.
            needs = [o.source is not None or o.is_param for o in v.operands]
            for j, o in enumerate(v.operands):
                if o.source is None:
                    continue
                if v.op == "mul":
                    keep = any(needs[i] for i in range(len(v.operands)) if i != j)
                else:
                    keep = len(needs) > 1 and needs[1]
                if keep:
                    mark(o.source)
        elif v.op in _SAVES_INPUTS:
            for o in acts:
                mark(o.source)
    return out


def _grad_share(graph: OpGraph, names) -> dict[str, dict[int, float]]:
    """For each matmul operand: 1 / (number of matmuls reading the same tensor). Their partial
    input gradients are summed before one all-reduce (q, k, v reading one LayerNorm output;
    SwiGLU's gate and up projections), so each pays its share."""
    readers: dict[tuple, int] = {}
    for name in names:
        n = graph.node(name)
        if n.kind != MATMUL:
            continue
        for o in n.operands:
            if o.source is not None:
                readers[(o.source, o.source_index)] = readers.get((o.source, o.source_index), 0) + 1
    out: dict[str, dict[int, float]] = {}
    for name in names:
        n = graph.node(name)
        if n.kind != MATMUL:
            continue
        share = {j: 1.0 / readers[(o.source, o.source_index)] for j, o in enumerate(n.operands)
                 if o.source is not None and readers[(o.source, o.source_index)] > 1}
        if share:
            out[name] = share
    return out


_SHARED_MEMO: dict[int, tuple[OpGraph, frozenset[str]]] = {}


def _shared_params(graph: OpGraph) -> frozenset[str]:
    """Parameters that more than one op reads (a tied embedding and LM head), memoised per graph."""
    hit = _SHARED_MEMO.get(id(graph))
    if hit is not None and hit[0] is graph:
        return hit[1]
    readers: dict[str, int] = {}
    for n in graph.nodes():
        for o in n.operands:
            if o.is_param and o.param:
                readers[o.param] = readers.get(o.param, 0) + 1
    value = frozenset(p for p, c in readers.items() if c > 1)
    if len(_SHARED_MEMO) >= 64:
        _SHARED_MEMO.clear()
    _SHARED_MEMO[id(graph)] = (graph, value)
    return value


def _node_sig(n: OpNode) -> tuple:
    """Everything the strategy generator reads from a node, hashable, without its name."""
    return (n.op, n.kind, n.out_dtype, tuple(tuple(s) for s in n.out_shapes),
            tuple((tuple(o.shape), o.dtype, o.source is None, o.param is not None, o.owns_param, o.source_index)
                  for o in n.operands),
            _freeze(n.attrs), n.fwd_flops, n.bwd_flops, n.fwd_bytes, n.bwd_bytes)


def _freeze(x):
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return x


class _BySig:
    """A node keyed by its signature, so caches are shared by identical layers' nodes."""

    __slots__ = ("node", "sig", "_h")

    def __init__(self, node: OpNode):
        self.node = node
        self.sig = _node_sig(node)
        self._h = hash(self.sig)

    def __hash__(self) -> int:
        return self._h

    def __eq__(self, other) -> bool:
        return isinstance(other, _BySig) and self.sig == other.sig


# The ILP builder looks strategies and edge costs up many times per problem, and a planning
# run builds thousands of problems on a few dozen meshes. A Mesh hashes its whole Cluster, so
# the caches below key a (mesh, compute model) pair by a small int handed out once per pair.
_CONTEXTS: dict[tuple[Mesh, ComputeModel], int] = {}
_CONTEXT_OBJECTS: list[tuple[Mesh, ComputeModel]] = []


def _context_id(mesh: Mesh, cm: ComputeModel) -> int:
    cid = _CONTEXTS.get((mesh, cm))
    if cid is None:
        cid = _CONTEXTS[(mesh, cm)] = len(_CONTEXT_OBJECTS)
        _CONTEXT_OBJECTS.append((mesh, cm))
    return cid


# A node object's _BySig and its leader operand (None for a decision op); the entry holds
# the node, so its id is not reused while cached.
_SIGS: dict[int, tuple[OpNode, _BySig, int | None]] = {}


def _sig_of(n: OpNode) -> tuple[_BySig, int | None]:
    hit = _SIGS.get(id(n))
    if hit is not None and hit[0] is n:
        return hit[1], hit[2]
    if len(_SIGS) >= 200_000:
        _SIGS.clear()
    key = _BySig(n)
    li = None if is_decision(n) else leader_operand(n)
    _SIGS[id(n)] = (n, key, li)
    return key, li


@lru_cache(maxsize=100_000)
def _decision_cached(key: _BySig, mesh: Mesh, cm: ComputeModel) -> tuple[Strategy, ...]:
    return tuple(decision_strategies(key.node, mesh, cm))


@lru_cache(maxsize=100_000)
def _decision_by_id(key: _BySig, context: int) -> tuple[Strategy, ...]:
    return _decision_cached(key, *_CONTEXT_OBJECTS[context])


@lru_cache(maxsize=500_000)
def _follow_by_id(key: _BySig, spec: Spec, context: int) -> Strategy:
    return follow(key.node, spec, *_CONTEXT_OBJECTS[context])


@lru_cache(maxsize=100_000)
def _follow_all(key: _BySig, specs: tuple[Spec, ...], context: int) -> tuple[Strategy, ...]:
    """A follower's strategies, one per layout its leader's strategies emit."""
    return tuple(_follow_by_id(key, q, context) for q in specs)


@lru_cache(maxsize=500_000)
def _reshard_by_id(shape: tuple[int, ...], elem_bytes: int, src: Spec, dst: Spec, context: int) -> float:
    return reshard_s(shape, elem_bytes, src, dst, _CONTEXT_OBJECTS[context][0])


@lru_cache(maxsize=500_000)
def _reshard_backward_by_id(shape: tuple[int, ...], elem_bytes: int, src: Spec, dst: Spec, grad: bool,
                            context: int) -> float:
    return reshard_backward_s(shape, elem_bytes, src, dst, _CONTEXT_OBJECTS[context][0], grad)


@lru_cache(maxsize=500_000)
def _round_trip_by_id(shape: tuple[int, ...], elem_bytes: int, src: Spec, dst: Spec, grad: bool, context: int) -> float:
    """A cell of _reshard_matrix: the forward conversion plus its backward, summed as
    _reshard + _reshard_backward (one lookup instead of two per cell)."""
    return (_reshard_by_id(shape, elem_bytes, src, dst, context)
            + _reshard_backward_by_id(shape, elem_bytes, src, dst, grad, context))


def decision_names(graph: OpGraph, names: list[str], mesh: Mesh, cm: ComputeModel) -> dict[str, list[str]]:
    """The strategy names each decision op among `names` offers on `mesh` (what a StageProblem's
    groups would list, without building their followers)."""
    return {n: [s.name for s in _decision_cached(_BySig(graph.node(n)), mesh, cm)]
            for n in names if is_decision(graph.node(n))}


# StageProblem's memoised ILP inputs (see _member_arrays and _edge_costs): read-only arrays.
_MEMBER_MEMO: dict[tuple, tuple[tuple[Strategy, ...], np.ndarray, np.ndarray]] = {}
# Per (strategy ids, operand): what _edge_costs keys on of each strategy's gradient all-reduce;
# the entry holds the strategies, so their ids stay their own while it is kept.
_PARTIAL_MEMO: dict[tuple, tuple[tuple[Strategy, ...], tuple]] = {}
_EDGE_MEMO: dict[tuple, np.ndarray] = {}
# Memos keyed by strategy ids (ilp_arrays' edges, evaluate's edge seconds), and the strategies
# those ids name, kept alive here so that no id is reused while a key holds it; the three are
# cleared together. One dict of objects rather than a tuple per entry: the garbage collector
# walks every tracked container, and these memos hold ~100k entries.
_EDGE_FAST: dict[tuple, np.ndarray] = {}
_EDGE_FWD_BWD: dict[tuple, tuple[float, float]] = {}
_KEEP: dict[int, Strategy] = {}
_MEMO_ENTRIES = 50_000        # each memo is cleared when full: a bound on memory, not an LRU
_MATRIX, _ROW, _DIAGONAL = 0, 1, 2


def _remember(memo: dict, key: tuple, value) -> None:
    if len(memo) >= _MEMO_ENTRIES:
        memo.clear()
    memo[key] = value


def _remember_by_ids(memo: dict, key: tuple, value, strategies) -> None:
    """_remember for a memo keyed by the ids of `strategies` (see _KEEP)."""
    if len(memo) >= _MEMO_ENTRIES:
        _EDGE_FAST.clear()
        _EDGE_FWD_BWD.clear()
        _KEEP.clear()
    for st in strategies:
        _KEEP[id(st)] = st
    memo[key] = value


def _partial_grad_all_reduce(st: Strategy, j: int) -> Collective | None:
    """The backward all-reduce of operand j's gradient that `st` issues (a partial sum over
    the axes splitting letters the operand lacks), or None."""
    if j not in st.bwd_comm_operand:
        return None
    return next((c for c in st.collectives if c.operand == j and c.kind == ALL_REDUCE and c.phase == BACKWARD), None)


def _gather_into_partial_s(shape, eb: int, src: Spec, dst: Spec, st: Strategy, j: int, mesh: Mesh) -> float | None:
    """Backward seconds of Megatron's sequence-parallel all-gather, where it applies: the
    conversion `src` -> `dst` only all-gathers, over exactly the axes of the consumer's
    gradient all-reduce of operand j. The backward then all-gathers the split input again (for
    the weight gradient) and reduce-scatters the input gradient instead of all-reducing it,
    so the all-reduce that `st` charges is taken back here. None where it does not apply."""
    ar = _partial_grad_all_reduce(st, j)
    if ar is None:
        return None
    steps = reshard_collectives(shape, eb, src, dst, mesh)
    gathered = 0
    for c in steps:
        if c.kind != ALL_GATHER:
            return None
        gathered |= c.mask
    if gathered != ar.mask:
        return None
    regather = sum(c.time_s for c in steps)
    return regather + collective_s(REDUCE_SCATTER, ar.nbytes, mesh.axis(ar.mask)) - ar.time_s


# What a set of ops stashes, shares and reads depends on the graph and the names only, and
# the layer solver builds one set once per mesh and entry layout: keyed by (graph id, names),
# the entry holding the graph so that its id is not reused while cached.
_STRUCTURE_MEMO: dict[tuple, tuple] = {}


@dataclass(frozen=True)
class _Operand:
    """An activation operand of a member op, as ilp_arrays and evaluate read it."""

    name: str
    j: int
    source: str
    shape: object              # the operand's shape as the graph holds it (passed on as is)
    shape_key: tuple
    eb: int                    # bytes per element
    grad: bool                 # StageProblem._carries_grad
    share: float               # of the gradient all-reduce this op pays (_grad_share)


def _structure(graph: OpGraph, names: list[str]) -> tuple[dict[str, float], dict[str, float],
                                                           dict[str, dict[int, float]], tuple[_Operand, ...],
                                                           dict[tuple[str, int], _Operand]]:
    """saved_tensors, _grad_share and the activation operands of `names` (in order, and by
    (name, operand index)), memoised (read-only: StageProblem never writes them)."""
    key = (id(graph), tuple(names))
    hit = _STRUCTURE_MEMO.get(key)
    if hit is not None and hit[0] is graph:
        return hit[1]
    saved, outside = saved_tensors(graph, names)
    share = _grad_share(graph, names)
    ops = []
    for name in names:
        v = graph.node(name)
        for j, o in enumerate(v.operands):
            if o.source is None:
                continue
            ops.append(_Operand(name, j, o.source, o.shape, tuple(o.shape), dtype_bytes(o.dtype),
                                _carries_grad(graph, name, j), share.get(name, {}).get(j, 1.0)))
    value = (saved, outside, share, tuple(ops), {(op.name, op.j): op for op in ops})
    if len(_STRUCTURE_MEMO) >= 1024:      # each entry holds its graph: keep few
        _STRUCTURE_MEMO.clear()
    _STRUCTURE_MEMO[key] = (graph, value)
    return value


# What full recomputation reruns of an op (checkpoint_roles).
NOT_CHECKPOINTED, RERUN, NOT_RERUN = 0, 1, 2


def _keeps_dropout_mask(v: OpNode) -> bool:
    """Whether op `v` is a dropout that keeps its mask for the backward (p > 0)."""
    return v.kind == ELEMENTWISE and v.op == "dropout" and float(v.attrs.get("p", 0.0)) > 0


def _saves_own_output(v: OpNode) -> bool:
    """Whether op `v`'s backward keeps a tensor `v` makes (packed once its kernel has run): a
    norm's statistics, attention's output and log-sum-exp, softmax's output, dropout's mask."""
    return v.kind in (NORM, ATTENTION, SOFTMAX) or _keeps_dropout_mask(v)


def block_rerun(graph: OpGraph, names) -> list[str]:
    """The ops of one checkpointed block (`names`, in execution order) that torch's non-reentrant
    checkpoint reruns in the backward. It stops the recomputation as soon as the last tensor
    the forward saved is saved again (torch.utils.checkpoint, early_stop=True, the default):
    the ops after the last op that keeps a tensor are not rerun, nor that op itself when it
    keeps only tensors made before it (a linear packs its input and weight before its kernel
    runs). A GPT or Llama block ends in its MLP's output projection and the residual add, so
    neither is rerun: single-gpt-1.3b mb16's backward grows by 59.5 ms under full recomputation
    against an 80.7 ms forward (bench/results/truth_h200_2026-11-30.json)."""
    order = list(names)
    for k in range(len(order) - 1, -1, -1):
        v = graph.node(order[k])
        if _saves_own_output(v):
            return order[:k + 1]
        if _marked(graph, v):
            return order[:k]
    return []


def checkpoint_roles(graph: OpGraph) -> dict[str, int]:
    """Per op, what full recomputation does with it as the runtime runs it: the layers between
    the first and the last are the blocks, each checkpointed on its own (the embedding and the
    head, root units, never are: NOT_CHECKPOINTED); of a block's ops, RERUN or NOT_RERUN by
    torch's early stop (block_rerun). An engine that reruns the whole block (Megatron's
    CheckpointFunction, reentrant checkpointing) reruns the NOT_RERUN ops too."""
    hit = _ROLES.get(id(graph))
    if hit is not None and hit[0] is graph:
        return hit[1]
    roles: dict[str, int] = {}
    L = len(graph.layers)
    for li, layer in enumerate(graph.layers):
        if li == 0 or li == L - 1:
            roles.update(dict.fromkeys(layer.nodes, NOT_CHECKPOINTED))
            continue
        roles.update(dict.fromkeys(layer.nodes, NOT_RERUN))
        roles.update(dict.fromkeys(block_rerun(graph, layer.nodes), RERUN))
    if len(_ROLES) >= 64:
        _ROLES.clear()
    _ROLES[id(graph)] = (graph, roles)
    return roles


_ROLES: dict[int, tuple[OpGraph, dict[str, int]]] = {}

# Per structure (its operand tuple, which the entry holds so that the id stays its own, and
# its names: sets without activation operands share the one empty tuple): the names in order,
# each with its operands (StageProblem.evaluate's loop).
_BY_NAME: dict[int, tuple[tuple[_Operand, ...], tuple[str, ...], tuple[tuple[str, tuple[_Operand, ...]], ...]]] = {}


def _operands_by_name(names: list[str], operands: tuple[_Operand, ...]) -> tuple[tuple[str, tuple[_Operand, ...]], ...]:
    """Each of `names` (in order) with its activation operands (in operand order): `operands`
    (_structure's, of these names) split by op."""
    key = tuple(names)
    hit = _BY_NAME.get(id(operands))
    if hit is not None and hit[0] is operands and hit[1] == key:
        return hit[2]
    of: dict[str, list[_Operand]] = {name: [] for name in names}
    for op in operands:
        of[op.name].append(op)
    value = tuple((name, tuple(of[name])) for name in names)
    if len(_BY_NAME) >= 1024:
        _BY_NAME.clear()
    _BY_NAME[id(operands)] = (operands, key, value)
    return value


def _carries_grad(graph: OpGraph, name: str, j: int) -> bool:
    """Whether operand j of `name` sends a gradient back (data inputs, token ids and masks do not)."""
    o = graph.node(name).operands[j]
    if o.dtype.startswith("int") or o.dtype == "bool" or o.source is None:
        return False
    src = graph.node(o.source)
    return src.kind != INPUT and bool(src.attrs.get("requires_grad", True))


@dataclass
class Group:
    root: str
    members: list[str]
    strategies: dict[str, list[Strategy]]      # member -> aligned strategy list


@dataclass
class Evaluation:
    """Cost of one assignment of strategies to a stage's nodes (per microbatch unless noted)."""

    fwd_s: float
    bwd_s: float
    comm_s: float                  # of fwd_s + bwd_s, the part that is communication / resharding
    sync_s: float                  # per step: gradient all-reduce over partial axes (ZeRO 0/1), or the
                                   # all-gather of the updated weights (ZeRO-2); 0 under ZeRO-3
    # the forward full recomputation reruns, if the stage recomputes: its blocks' ops but the
    # tails torch's checkpoint does not rerun (checkpoint_roles), which recompute_tail_s holds
    # (an engine that reruns whole blocks adds it)
    recompute_fwd_s: float
    param_elems: float             # per device
    param_elems_zero: float        # per device with optimizer states sharded over the sync axes
    stash_bytes: float             # activations kept per microbatch in flight
    boundary_stash_bytes: float    # activations of the inputs of the stage's layers (full recompute)
    ops: list[dict] = field(default_factory=list)
    # Of param_elems and param_elems_zero, those of the ops whose parameters are stored sharded
    # (ZeRO-3) in a ZeRO-1/2 stage (StageProblem.solve_storage), and those ops.
    sharded_param_elems: float = 0.0
    sharded_param_elems_zero: float = 0.0
    sharded_ops: frozenset[str] = frozenset()
    recompute_tail_s: float = 0.0

    def recompute_s(self, early_stop: bool = True) -> float:
        """The forward full recomputation reruns: with torch's early stop (non-reentrant
        checkpoint), or (False) the whole blocks (Megatron's, reentrant checkpoint)."""
        return self.recompute_fwd_s if early_stop else self.recompute_fwd_s + self.recompute_tail_s

    @property
    def per_microbatch_s(self) -> float:
        return self.fwd_s + self.bwd_s

    def param_state_bytes(self, zero: int) -> float:
        if not self.sharded_ops:
            return param_state_bytes(self.param_elems, self.param_elems_zero, zero)
        return (param_state_bytes(self.param_elems - self.sharded_param_elems,
                                  self.param_elems_zero - self.sharded_param_elems_zero, zero)
                + param_state_bytes(self.sharded_param_elems, self.sharded_param_elems_zero, 3))


# The groups of a set of ops on a mesh depend on the entry layout only through the groups
# rooted at an op that follows a received tensor (its strategy follows the layout the tensor
# arrives in, and so do its group's members). The layer solver poses one set of ops on one mesh
# in many entry layouts, so everything else is built once per (graph, ops, mesh, compute model,
# strategy filters) and kept here: the groups, and per Settings their member sums and the edges
# between groups that follow no received tensor. Keyed by the graph's id, the entry holding the
# graph so that the id is not reused while cached; bounded like _STRUCTURE_MEMO. A template
# also remembers the strategy tuple its first decision op got from _decision_by_id: after that
# cache is cleared (rules swapped, as tests do) the tuple is a new object and the template is
# built again.
_TEMPLATE_MEMO: dict[tuple, _Template] = {}


class _Template:
    """What StageProblems of one (graph, ops, mesh, filters) share, whatever their entry layout."""

    def __init__(self, prob: StageProblem):
        self.graph = prob.graph
        self.groups = list(prob.groups)          # read-only Group objects (entry-dependent ones rebuilt)
        self.group_of = prob.group_of            # read-only
        # per group rooted at a follower of a received tensor: its members, their signature
        # keys and their leader operand's producer (outside the set for the root)
        self.entry_groups: list[tuple[int, list[tuple[str, _BySig, str]]]] = []
        g = prob.graph
        for gi, grp in enumerate(prob.groups):
            key, li = _sig_of(g.node(grp.root))
            if li is None:
                continue
            members = []
            for m in grp.members:
                mkey, mli = _sig_of(g.node(m))
                assert mli is not None                  # every member of such a group follows
                src = g.node(m).operands[mli].source
                assert src is not None
                members.append((m, mkey, src))
            self.entry_groups.append((gi, members))
        self.depends = {gi for gi, _ in self.entry_groups}
        # (signature key, strategy tuple) of the first decision op, or None
        self.probe: tuple[_BySig, tuple[Strategy, ...]] | None = None
        for grp in prob.groups:
            key, li = _sig_of(g.node(grp.root))
            if li is None:
                self.probe = (key, _decision_by_id(key, prob._context))
                break
        self.no_forbidden = []
        for grp in prob.groups:
            z = np.zeros(len(grp.strategies[grp.root]), bool)
            z.flags.writeable = False
            self.no_forbidden.append(z)
        self._settled: dict[Settings, tuple] = {}

    def groups_for(self, prob: StageProblem) -> list[Group]:
        """The template's groups with those that follow a received tensor built for `prob`'s
        entry layout (as StageProblem._build_groups builds them)."""
        groups = list(self.groups)
        ctx = prob._context
        for gi, members in self.entry_groups:
            root, rkey, rsrc = members[0]
            grp = Group(root, [root], {root: [_follow_by_id(rkey, prob._boundary_spec(rsrc), ctx)]})
            for m, mkey, src in members[1:]:
                grp.strategies[m] = list(_follow_all(mkey, tuple(s.out_spec for s in grp.strategies[src]), ctx))
                grp.members.append(m)
            groups[gi] = grp
        return groups

    def settled(self, prob: StageProblem, settings: Settings) -> tuple[list, list, list]:
        """Per group its member sums (None where the group follows a received tensor), and per
        operand in order (op, form, producer group, consumer group, costs): op None where the
        edge is settled (between groups that follow no received tensor), else the operand to
        work out per problem (prob._operand_edge)."""
        hit = self._settled.get(settings)
        if hit is not None:
            return hit
        member_cost: list[np.ndarray | None] = []
        member_mem: list[np.ndarray | None] = []
        for gi, grp in enumerate(prob.groups):
            if gi in self.depends:
                member_cost.append(None)
                member_mem.append(None)
                continue
            cost, mem = prob._member_sums(grp, settings)
            cost.flags.writeable = mem.flags.writeable = False
            member_cost.append(cost)
            member_mem.append(mem)
        plan: list[tuple] = []
        ids: dict[str, tuple[int, ...]] = {}
        for op in prob._operands:
            gv = self.group_of[op.name]
            gu = self.group_of.get(op.source, -1) if op.source in prob.inside else -1
            if gu < 0 or gu in self.depends or gv in self.depends:
                plan.append((op, 0, 0, 0, None))
            else:
                plan.append((None, *prob._operand_edge(op, ids)))
        value = (member_cost, member_mem, plan)
        self._settled[settings] = value
        return value


def _template_of(prob: StageProblem, allowed: dict[str, set[str]]) -> _Template:
    """Sets prob.groups and prob.group_of, from the template of its (graph, ops, mesh, filters)
    (made here, from prob's own groups, the first time)."""
    key = (id(prob.graph), tuple(prob.names), prob._context, prob.only_names,
           tuple(sorted((k, tuple(sorted(v))) for k, v in allowed.items())) if allowed else None)
    tpl = _TEMPLATE_MEMO.get(key)
    if (tpl is not None and tpl.graph is prob.graph
            and (tpl.probe is None or _decision_by_id(tpl.probe[0], prob._context) is tpl.probe[1])):
        prob.group_of = tpl.group_of
        prob.groups = tpl.groups_for(prob)
        return tpl
    prob._build_groups(allowed)
    tpl = _Template(prob)
    if len(_TEMPLATE_MEMO) >= 4096:      # each entry holds its graph: keep few
        _TEMPLATE_MEMO.clear()
    _TEMPLATE_MEMO[key] = tpl
    return tpl


def stage_shape_key(graph: OpGraph, names: list[str], boundary: dict[str, Spec]) -> tuple:
    """Everything a StageProblem without strategy filters (no `allowed`, `only_names` or
    `restrict_out`) reads of its ops and of the producers they read, with the ops' names
    replaced by their positions in `names` and the producers outside the set numbered in the
    order they are first read: per op its signature (what the strategy rules read, _node_sig)
    and where each operand comes from; per producer outside the set its layout as the problem
    takes it (`boundary`'s, else whole), whether it is a graph input, whether it needs a
    gradient, its shape and bytes; what the set stashes (saved_tensors, the outside producers'
    shares in their order). Two sets with equal keys on one mesh and compute model pose the
    same problem but for the ops' names: the same groups of the same strategy objects (the
    strategy caches key on the signature) and the same edges, so every figure `evaluate`
    sums is the same float in the same order (StageProblem.renamed). The signatures stay
    objects (_BySig compares them whole), never numbers a cache could reuse."""
    pos = {n: i for i, n in enumerate(names)}
    numbers: dict[str, int] = {}
    outside: list[tuple] = []

    def number(src: str) -> int:
        k = numbers.get(src)
        if k is None:
            k = numbers[src] = len(numbers)
            n = graph.node(src)
            outside.append((src in boundary, boundary.get(src), n.kind == INPUT,
                            bool(n.attrs.get("requires_grad", True)), tuple(n.out_shape), n.out_bytes))
        return k

    ops = []
    for name in names:
        n = graph.node(name)
        refs = tuple(None if o.source is None else pos[o.source] if o.source in pos else -1 - number(o.source)
                     for o in n.operands)
        ops.append((_sig_of(n)[0], refs))
    saved, saved_outside, *_ = _structure(graph, list(names))
    return (tuple(ops), tuple((pos[n], w) for n, w in saved.items()),
            tuple((number(s), w) for s, w in saved_outside.items()), tuple(number(s) for s in boundary),
            tuple(outside))


class _LayerShape:
    """A layer's ops with names replaced by positions (stage_layers_key), compared whole, its
    hash kept."""

    __slots__ = ("key", "_h")

    def __init__(self, key: tuple):
        self.key = key
        self._h = hash(key)

    def __hash__(self) -> int:
        return self._h

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, _LayerShape) and self.key == other.key)


# Per (graph id, layer): (graph, its _LayerShape, the producers outside the layer it reads or
# keeps, in the order the shape numbers them); per graph id: (graph, op -> (layer, position)).
# Each entry holds its graph, so that the id is not reused while cached.
_LAYER_SHAPES: dict[tuple[int, int], tuple[OpGraph, _LayerShape, tuple[str, ...]]] = {}
_SHAPES_SEEN: dict[_LayerShape, _LayerShape] = {}      # one object per shape: later compares are by identity
_PLACES: dict[int, tuple[OpGraph, dict[str, tuple[int, int]]]] = {}


def _layer_shape(graph: OpGraph, li: int) -> tuple[_LayerShape, tuple[str, ...]]:
    hit = _LAYER_SHAPES.get((id(graph), li))
    if hit is not None and hit[0] is graph:
        return hit[1], hit[2]
    nodes = graph.layers[li].nodes
    local = {n: i for i, n in enumerate(nodes)}
    ext: dict[str, int] = {}

    def ref(src: str) -> int:
        i = local.get(src)
        if i is not None:
            return i
        k = ext.get(src)
        if k is None:
            k = ext[src] = len(ext)
        return -1 - k

    ops = []
    for name in nodes:
        n = graph.node(name)
        ops.append((_sig_of(n)[0], tuple(None if o.source is None else ref(o.source) for o in n.operands),
                    tuple(ref(src) for src in _marked(graph, n))))
    shape = _LayerShape(tuple(ops))
    if len(_SHAPES_SEEN) >= 100_000:
        _SHAPES_SEEN.clear()
    shape = _SHAPES_SEEN.setdefault(shape, shape)
    if len(_LAYER_SHAPES) >= 100_000:
        _LAYER_SHAPES.clear()
    _LAYER_SHAPES[(id(graph), li)] = (graph, shape, tuple(ext))
    return shape, tuple(ext)


def _places(graph: OpGraph) -> dict[str, tuple[int, int]]:
    hit = _PLACES.get(id(graph))
    if hit is not None and hit[0] is graph:
        return hit[1]
    value = {n: (li, i) for li, layer in enumerate(graph.layers) for i, n in enumerate(layer.nodes)}
    if len(_PLACES) >= 64:
        _PLACES.clear()
    _PLACES[id(graph)] = (graph, value)
    return value


def stage_layers_key(graph: OpGraph, layers: tuple[int, int], boundary: dict[str, Spec]) -> tuple:
    """stage_shape_key of the ops of `layers` (graphs.query.stage_nodes), made from each
    layer's shape (made once per layer): per layer its ops' signatures and, by position in the
    layer or by a number of the layer's own, where their operands come from and what each op's
    backward keeps (_marked); per stage where the producers outside each layer are, by
    position in the stage or by a number of the stage's own, and what those outside the stage
    are (stage_shape_key's descriptions). Equal keys give equal stage_shape_keys: every part
    of that key, the saved and outside stash included (saved_tensors sorts the marks by where
    they land), follows from these (tests/unit/test_speed_h10_stage_sharing.py checks it)."""
    a, b = layers
    places = _places(graph)
    numbers: dict[str, int] = {}
    outside: list[tuple | None] = []

    def number(src: str) -> int:
        k = numbers.get(src)
        if k is None:
            k = numbers[src] = len(numbers)
            if src in graph:
                n = graph.node(src)
                outside.append((src in boundary, boundary.get(src), n.kind == INPUT,
                                bool(n.attrs.get("requires_grad", True)), tuple(n.out_shape), n.out_bytes))
            else:
                outside.append(None)
        return k

    shapes, refs = [], []
    offset = {}
    off = 0
    for li in range(a, b):
        offset[li] = off
        off += len(graph.layers[li].nodes)
    for li in range(a, b):
        shape, ext = _layer_shape(graph, li)
        shapes.append(shape)
        r = []
        for src in ext:
            at = places.get(src)
            r.append(offset[at[0]] + at[1] if at is not None and a <= at[0] < b else -1 - number(src))
        refs.append(tuple(r))
    return (tuple(shapes), tuple(refs), tuple(number(s) for s in boundary), tuple(outside))


class StageProblem:
    def __init__(self, graph: OpGraph, names: list[str], mesh: Mesh, cm: ComputeModel,
                 boundary: dict[str, Spec] | None = None, restrict_out: dict[str, Spec] | None = None,
                 allowed: dict[str, set[str]] | None = None, only_names: frozenset[str] | None = None):
        self.graph, self.mesh, self.cm = graph, mesh, cm
        self._context = _context_id(mesh, cm)
        self.names = list(names)
        self.inside = set(self.names)
        self.boundary = dict(boundary or {})
        (self.saved, self.saved_outside, self.grad_share,
         self._operands, self._operand_at) = _structure(graph, self.names)
        self.groups: list[Group] = []
        self.group_of: dict[str, int] = {}
        self.only_names = only_names
        self._plain = not allowed and only_names is None and not restrict_out    # renamed() may copy it
        tpl = _template_of(self, allowed or {})
        self._template: _Template | None = tpl
        self.forbidden = list(tpl.no_forbidden)
        for name, spec in (restrict_out or {}).items():
            gi = self.group_of[name]
            lst = self.groups[gi].strategies[name]
            self.forbidden[gi] = self.forbidden[gi] | np.array([s.out_spec != spec for s in lst])

    def renamed(self, names: list[str], boundary: dict[str, Spec]) -> StageProblem:
        """This problem posed on the ops `names` (names[i] in the place of self.names[i]) with
        `boundary`, where stage_shape_key(graph, names, boundary) equals this problem's: the
        same groups (each name mapped) of the same strategy objects, so `evaluate` of a choice
        gives the figures a StageProblem built on `names` would, to the bit (tests/unit/
        test_speed_h10_stage_sharing.py), without posing it again. Only for problems without
        strategy filters (the evaluator's)."""
        if not self._plain:
            raise ValueError("renamed: only a problem without allowed, only_names or restrict_out")
        m = dict(zip(self.names, names))
        p = object.__new__(StageProblem)
        p.graph, p.mesh, p.cm, p._context = self.graph, self.mesh, self.cm, self._context
        p.names = list(names)
        p.inside = set(p.names)
        p.boundary = dict(boundary)
        (p.saved, p.saved_outside, p.grad_share, p._operands, p._operand_at) = _structure(self.graph, p.names)
        p.only_names, p._plain = None, True
        p.groups = [Group(m[g.root], [m[x] for x in g.members], {m[k]: list(v) for k, v in g.strategies.items()})
                    for g in self.groups]
        p.group_of = {m[k]: gi for k, gi in self.group_of.items()}
        p._template = None           # made by ilp_arrays if asked (templates key on the names)
        p.forbidden = list(self.forbidden)
        return p

    # -- structure -----------------------------------------------------------------------
    def _boundary_spec(self, src: str) -> Spec:
        if src in self.boundary:
            return self.boundary[src]
        shape = self.graph.node(src).out_shape
        return tuple(0 for _ in shape)         # graph inputs arrive whole; slicing them is free

    def _build_groups(self, allowed: dict[str, set[str]]) -> None:
        g, mesh, ctx = self.graph, self.mesh, self._context
        for name in self.names:
            n = g.node(name)
            key, li = _sig_of(n)
            if li is None:
                sts = list(_decision_by_id(key, ctx))
                if self.only_names is not None and len(sts) > 1:
                    # e.g. Alpa's inter-only ablation: data-parallel strategies only
                    sts = [s for s in sts if s.name in self.only_names] or [min(sts, key=lambda s: s.name != "R")]
                if name in allowed:
                    keep = [s for s in sts if s.name in allowed[name]]
                    if not keep:
                        raise ValueError(f"{name}: none of the strategies {sorted(allowed[name])} exists on mesh "
                                         f"{mesh}; available: {[s.name for s in sts]}")
                    sts = keep
                self.group_of[name] = len(self.groups)
                self.groups.append(Group(name, [name], {name: sts}))
                continue
            src = n.operands[li].source
            assert src is not None          # a leader is an activation operand
            if src in self.inside:
                gi = self.group_of[src]
                grp = self.groups[gi]
                grp.strategies[name] = list(_follow_all(key, tuple(s.out_spec for s in grp.strategies[src]), ctx))
                grp.members.append(name)
                self.group_of[name] = gi
            else:
                st = _follow_by_id(key, self._boundary_spec(src), ctx)
                self.group_of[name] = len(self.groups)
                self.groups.append(Group(name, [name], {name: [st]}))

    def outside_stash_bytes(self) -> float:
        """Bytes per microbatch of received inputs the set keeps for backward."""
        total = 0.0
        for src, w in self.saved_outside.items():
            n = self.graph.node(src)
            spec = self._boundary_spec(src)
            total += w * n.out_bytes / (shard_factor(spec, self.mesh) if spec else 1)
        return total

    # -- ILP arrays ----------------------------------------------------------------------
    def member_cost(self, name: str, st: Strategy, settings: Settings, reshard: float = 0.0,
                    sharded: bool = False) -> OpCost:
        """The one cost of a member op under `st` (strategy.op_cost), with its share of the
        backward all-reduces of tensors several matmuls read (see `_grad_share`); `sharded`:
        its parameters stored ZeRO-3 in a ZeRO-1/2 stage (strategy.sharded_storage_cost)."""
        if sharded:
            return sharded_storage_cost(st, settings.zero, settings.n_microbatches, self.grad_share.get(name), reshard)
        return op_cost(st, settings.zero, self.grad_share.get(name), reshard)

    def _member_mem(self, name: str, st: Strategy, settings: Settings, sharded: bool = False) -> float:
        p = param_state_bytes(st.param_elems_local, st.param_elems_zero, 3 if sharded else settings.zero)
        return p + settings.inflight * self.saved.get(name, 0.0) * st.out_bytes_local

    # -- per-group parameter storage -----------------------------------------------------
    def storage_groups(self, settings: Settings) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """The groups whose parameters may be stored sharded (ZeRO-3) instead of at the
        stage's ZeRO level, with per strategy the change to the group's ILP cost and memory.
        The choice is per group, a decision op and the ops that follow its layout (a linear's
        weight and bias: one module, FSDP2's unit of storage). Offered in ZeRO-1/2 stages
        only: ZeRO-0 stores and syncs as ZeRO-1 does (the same collectives, more memory), and
        a ZeRO-3 stage stores everything sharded already. A group reading a parameter that
        another op reads too (a tied embedding and head) is left at the stage's level: the
        storage belongs to the parameter, not to one of its readers."""
        if settings.zero not in (1, 2):
            return {}
        shared = _shared_params(self.graph)
        B = settings.n_microbatches
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for gi, grp in enumerate(self.groups):
            owners = [m for m in grp.members
                      if any(o.owns_param for o in self.graph.node(m).operands if o.is_param)]
            if not owners or any(o.param in shared for m in grp.members
                                 for o in self.graph.node(m).operands if o.is_param):
                continue
            k = len(grp.strategies[grp.root])
            dc, dm = np.zeros(k), np.zeros(k)
            for m in owners:
                share = self.grad_share.get(m)
                for q, st in enumerate(grp.strategies[m]):
                    dc[q] += (sharded_storage_cost(st, settings.zero, B, share).objective_s(B)
                              - op_cost(st, settings.zero, share).objective_s(B))
                    dm[q] += self._member_mem(m, st, settings, True) - self._member_mem(m, st, settings)
            if np.any(dm != 0.0):
                out[gi] = (dc, dm)
        return out

    def sharded_members(self, roots) -> frozenset[str]:
        """The ops whose parameters are stored sharded when the groups rooted at `roots` are."""
        bad = [r for r in roots if r not in self.group_of or self.groups[self.group_of[r]].root != r]
        if bad:
            raise ValueError(f"sharded storage: {', '.join(sorted(bad))} not a decision op of this stage")
        return frozenset(m for r in roots for m in self.groups[self.group_of[r]].members)

    def ilp_arrays(self, settings: Settings):
        """(node costs, edges, node memory) of the ILP. The parts that do not depend on the
        entry layout (the groups' member sums, the edges among groups that follow no
        received tensor) come from the template (_Template.settled), the rest is worked out
        here; both are summed in the one order below, so the arrays are the same to the bit."""
        if self._template is None:
            # a renamed problem (renamed): its template's groups are the ones it holds
            self.groups, self.group_of = [], {}
            self._template = _template_of(self, {})
        member_cost, member_mem, plan = self._template.settled(self, settings)
        node_costs, node_mem = [], []
        none_forbidden = self._template.no_forbidden
        for gi, grp in enumerate(self.groups):
            pre = member_cost[gi]
            if pre is None:
                cost, mem = self._member_sums(grp, settings)
            else:
                cost, mem = pre.copy(), member_mem[gi].copy()
            if self.forbidden[gi] is not none_forbidden[gi]:      # else an all-False mask: a no-op
                cost[self.forbidden[gi]] = np.inf
            node_costs.append(cost)
            node_mem.append(mem)
        edges = []
        ids: dict[str, tuple[int, ...]] = {}       # member -> the ids of its strategies
        for op, form, gu, gv, arr in plan:
            if op is not None:
                form, gu, gv, arr = self._operand_edge(op, ids)
            if form == _ROW:
                node_costs[gv] += arr[0]
            elif form == _DIAGONAL:
                node_costs[gv] += arr
            else:
                edges.append((gu, gv, arr))
        return node_costs, edges, node_mem

    def _member_sums(self, grp: Group, settings: Settings) -> tuple[np.ndarray, np.ndarray]:
        """A group's node cost and memory before its edges: the sum of its members'."""
        k = len(grp.strategies[grp.root])
        cost = np.zeros(k)
        mem = np.zeros(k)
        for m in grp.members:
            m_cost, m_mem = self._member_arrays(m, grp.strategies[m], settings)
            cost += m_cost
            mem += m_mem
        return cost, mem

    def _operand_edge(self, op: _Operand, ids: dict[str, tuple[int, ...]]) -> tuple[int, int, int, np.ndarray]:
        """(form, producer group, consumer group, costs) of the edge into one operand
        (_edge_costs; -1 for the producer of a received tensor)."""
        name, j = op.name, op.j
        groups, group_of = self.groups, self.group_of
        gv = group_of[name]
        v_sts = groups[gv].strategies[name]
        v_ids = ids.get(name)
        if v_ids is None:
            v_ids = ids[name] = tuple(map(id, v_sts))
        u_key: tuple | None
        gu = -1
        if op.source not in self.inside:
            src = self._boundary_spec(op.source)
            form, u_sts, u_key = _ROW, None, src
        else:
            gu = group_of[op.source]
            u_sts = groups[gu].strategies[op.source]
            u_key = ids.get(op.source)
            if u_key is None:
                u_key = ids[op.source] = tuple(map(id, u_sts))
            form = _DIAGONAL if gu == gv else _MATRIX
        # Keyed by the strategy objects' ids (_KEEP holds them): the same objects recur
        # in every problem on a mesh, and ids are cheaper to key on than the layouts
        # _edge_costs keys on.
        fast = (form, self._context, op.shape_key, op.eb, op.grad, op.share, j, u_key, v_ids)
        arr = _EDGE_FAST.get(fast)
        if arr is None:
            need = tuple(s.in_specs[j] if j < len(s.in_specs) else None for s in v_sts)
            srcs = (src,) if u_sts is None else tuple(s.out_spec for s in u_sts)
            arr = self._edge_costs(form, name, j, op.shape, op.eb, srcs, need, v_sts)
            _remember_by_ids(_EDGE_FAST, fast, arr, [*v_sts, *(u_sts or ())])
        return form, gu, gv, arr

    def _member_arrays(self, name: str, sts: list[Strategy], settings: Settings) -> tuple[np.ndarray, np.ndarray]:
        """A member op's ILP objective (member_cost's objective_s, inlined) and memory per
        strategy of its group, memoised: the same strategy objects recur in every problem on
        a mesh."""
        share = self.grad_share.get(name)
        saved = self.saved.get(name, 0.0)
        key = (tuple(map(id, sts)), settings, saved, tuple(share.items()) if share else None)
        hit = _MEMBER_MEMO.get(key)
        if hit is not None:
            return hit[1], hit[2]
        B, zero, k = settings.n_microbatches, settings.zero, len(sts)
        cost = np.fromiter((op_cost(s, zero, share).objective_s(B) for s in sts), float, k)
        mem = np.fromiter((self._member_mem(name, s, settings) for s in sts), float, k)
        cost.flags.writeable = mem.flags.writeable = False
        _remember(_MEMBER_MEMO, key, (tuple(sts), cost, mem))   # the entry keeps the ids' objects alive
        return cost, mem

    def _edge_costs(self, form: int, name: str, j: int, shape, eb: int, srcs: tuple, dsts: tuple,
                    v_sts: list[Strategy]) -> np.ndarray:
        """Forward + backward seconds (_edge_s) of the edge into operand j of `name`, from a
        producer whose strategies emit `srcs` to a consumer whose strategies need `dsts` (0
        where a strategy needs nothing): _MATRIX, every pair [p, q]; _ROW, the matrix of one
        source; _DIAGONAL, the pairs [q, q] (producer and consumer in one group).

        Memoised on everything _edge_s reads: the mesh, the tensor, the layouts, whether a
        gradient flows back, and per consumer strategy the all-reduce that sequence
        parallelism's gather replaces (with the share of it this op pays)."""
        grad = self._carries_grad(name, j)
        share = self.grad_share.get(name, {}).get(j, 1.0)
        pkey = (tuple(map(id, v_sts)), j)
        hit_p = _PARTIAL_MEMO.get(pkey)
        if hit_p is None:
            partial = tuple(None if (ar := _partial_grad_all_reduce(s, j)) is None else (ar.mask, ar.nbytes, ar.time_s)
                            for s in v_sts)
            _remember(_PARTIAL_MEMO, pkey, (tuple(v_sts), partial))
        else:
            partial = hit_p[1]
        key = (form, self._context, tuple(shape), eb, grad, share, srcs, dsts, partial)
        hit = _EDGE_MEMO.get(key)
        if hit is not None:
            return hit
        if form == _DIAGONAL:
            out = np.array([self._edge_s(name, j, shape, eb, a, d, st) if d is not None else 0.0
                            for a, d, st in zip(srcs, dsts, v_sts)])
        else:
            out = self._reshard_matrix(name, j, shape, eb, list(srcs), list(dsts), v_sts, partial)
        out.flags.writeable = False
        _remember(_EDGE_MEMO, key, out)
        return out

    def _reshard_matrix(self, name, j, shape, eb, srcs, dsts, v_sts, partial=None) -> np.ndarray:
        """partial: _edge_costs' per-strategy gradient all-reduce key (computed here if None)."""
        us = list(dict.fromkeys(srcs))
        vs = list(dict.fromkeys(d for d in dsts if d is not None))
        grad = self._carries_grad(name, j)
        shape_key, ctx = tuple(shape), self._context
        small = np.array([[_round_trip_by_id(shape_key, eb, tuple(a), tuple(b), grad, ctx)
                           for b in vs] for a in us]).reshape(len(us), len(vs))
        if partial is None:
            partial = tuple(None if (ar := _partial_grad_all_reduce(s, j)) is None else (ar.mask, ar.nbytes, ar.time_s)
                            for s in v_sts)
        upos = {a: i for i, a in enumerate(us)}
        ui = np.array([upos[a] for a in srcs])
        vpos = {b: i for i, b in enumerate(vs)}
        out = np.zeros((len(srcs), len(dsts)))
        # The columns without a gather into a partial sum copy their cells from `small`, all
        # in one indexing.
        plain = [q for q, d in enumerate(dsts) if d is not None and partial[q] is None]
        if plain:
            out[:, plain] = small[ui[:, None], [vpos[dsts[q]] for q in plain]]
        # A column with sequence parallelism's gather depends on its strategy only through
        # the all-reduce that gather replaces (_gather_into_partial_s reads its mask, bytes
        # and seconds), so consumers that need one layout and replace one all-reduce share it.
        fused_cols: dict[tuple, np.ndarray] = {}
        for q, d in enumerate(dsts):
            ar = partial[q]
            if d is None or ar is None:
                continue
            ck = (d, *ar)
            col = fused_cols.get(ck)
            if col is None:
                col = fused_cols[ck] = np.array([self._edge_s(name, j, shape, eb, a, d, v_sts[q]) for a in us])[ui]
            out[:, q] = col
        return out

    def _reshard(self, shape, eb: int, src: Spec, dst: Spec) -> float:
        """spec.reshard_s on this problem's mesh, cached by the mesh's context id."""
        return _reshard_by_id(tuple(shape), eb, tuple(src), tuple(dst), self._context)

    def _reshard_backward(self, shape, eb: int, src: Spec, dst: Spec, grad: bool) -> float:
        """spec.reshard_backward_s on this problem's mesh, cached by the mesh's context id."""
        return _reshard_backward_by_id(tuple(shape), eb, tuple(src), tuple(dst), grad, self._context)

    def _carries_grad(self, name: str, j: int) -> bool:
        """Whether operand j of `name` sends a gradient back (data inputs, token ids and masks do not)."""
        op = self._operand_at.get((name, j))
        return op.grad if op is not None else _carries_grad(self.graph, name, j)

    def _edge_s(self, name: str, j: int, shape, eb: int, src: Spec, dst: Spec, st: Strategy) -> float:
        """Forward + backward seconds of converting operand j of `name` (strategy `st`) from
        `src` to `dst`."""
        fwd, bwd = self._edge_fwd_bwd_s(name, j, shape, eb, src, dst, st)
        return fwd + bwd

    def _edge_fwd_bwd_s(self, name: str, j: int, shape, eb: int, src: Spec, dst: Spec,
                        st: Strategy) -> tuple[float, float]:
        grad = self._carries_grad(name, j)
        share = self.grad_share.get(name, {}).get(j, 1.0)
        return self._edge_fwd_bwd_memo_s(name, j, shape, tuple(shape), eb, src, dst, grad, share, st)

    def _edge_fwd_bwd_memo_s(self, name: str, j: int, shape, shape_key: tuple, eb: int, src: Spec, dst: Spec,
                             grad: bool, share: float, st: Strategy) -> tuple[float, float]:
        """_edge_fwd_bwd_s with the operand's gradient flag and share given (evaluate reads
        them off its _Operand), memoised on everything _edge_fwd_bwd_fresh_s reads (_KEEP holds
        `st`, so its id stays its own): evaluate asks for the same edges in every problem on a
        mesh. The one place the memo's key is made."""
        key = (self._context, shape_key, eb, tuple(src), tuple(dst), grad, share, j, id(st))
        hit = _EDGE_FWD_BWD.get(key)
        if hit is not None:
            return hit
        value = self._edge_fwd_bwd_fresh_s(name, j, shape, eb, src, dst, st)
        _remember_by_ids(_EDGE_FWD_BWD, key, value, (st,))
        return value

    def _edge_fwd_bwd_fresh_s(self, name: str, j: int, shape, eb: int, src: Spec, dst: Spec,
                              st: Strategy) -> tuple[float, float]:
        t = self._reshard(shape, eb, src, dst)
        back = self._reshard_backward(shape, eb, src, dst, self._carries_grad(name, j))
        if t == 0.0:
            return 0.0, back
        fused = _gather_into_partial_s(shape, eb, src, dst, st, j, self.mesh)
        if fused is None:
            return t, back
        share = self.grad_share.get(name, {}).get(j, 1.0)
        return share * t, share * fused

    # -- solve / evaluate ----------------------------------------------------------------
    def solve(self, settings: Settings = Settings(), mem_budget_bytes: float | None = None,
              time_limit_s: float = 30.0, backend: str = "highs"):
        from solvers.ilp import solve_built_ilp, solve_sharding_ilp
        costs, edges, mem = self.ilp_arrays(settings)
        if mem_budget_bytes is None:
            # arrays built here: solve_built_ilp checks only their values
            return solve_built_ilp(costs, edges, time_limit_s=time_limit_s, backend=backend)
        mem_budget_bytes -= settings.inflight * self.outside_stash_bytes()
        return solve_sharding_ilp(costs, edges, mem, mem_budget_bytes, time_limit_s=time_limit_s, backend=backend)

    def solve_storage(self, settings: Settings, mem_budget_bytes: float | None = None,
                      time_limit_s: float = 30.0, backend: str = "highs"):
        """`solve` with each group's parameter storage a decision too (storage_groups): the
        ILP node of such a group lists its strategies twice, at the stage's ZeRO level and
        stored sharded, with the same edges. Returns (result, roots of the sharded groups);
        with no group to choose for, exactly `solve`'s result."""
        from solvers.ilp import solve_sharding_ilp
        alt = self.storage_groups(settings)
        if not alt:
            return self.solve(settings, mem_budget_bytes, time_limit_s, backend), frozenset()
        costs, edges, mem = self.ilp_arrays(settings)
        costs, mem = list(costs), list(mem)
        k = {gi: len(costs[gi]) for gi in alt}
        for gi, (dc, dm) in alt.items():
            costs[gi] = np.concatenate([costs[gi], costs[gi] + dc])
            mem[gi] = np.concatenate([mem[gi], mem[gi] + dm])
        edges = [(u, v, np.tile(arr, (2 if u in alt else 1, 2 if v in alt else 1))) for u, v, arr in edges]
        if mem_budget_bytes is not None:
            mem_budget_bytes -= settings.inflight * self.outside_stash_bytes()
        res = solve_sharding_ilp(costs, edges, mem if mem_budget_bytes is not None else None,
                                 mem_budget_bytes, time_limit_s=time_limit_s, backend=backend)
        if res.choice is None:
            return res, frozenset()
        choice = res.choice.copy()
        roots = set()
        for gi, kg in k.items():
            if choice[gi] >= kg:
                choice[gi] -= kg
                roots.add(self.groups[gi].root)
        return replace(res, choice=choice), frozenset(roots)

    def assignment(self, group_choice) -> dict[str, int]:
        return {m: int(group_choice[gi]) for gi, grp in enumerate(self.groups) for m in grp.members}

    def strategy_of(self, name: str, idx: int) -> Strategy:
        return self.groups[self.group_of[name]].strategies[name][idx]

    def choice_from_names(self, names: dict[str, str]) -> np.ndarray:
        """Group choice that gives each named decision node the named strategy."""
        choice = np.zeros(len(self.groups), dtype=np.int64)
        for gi, grp in enumerate(self.groups):
            want = names.get(grp.root)
            if want is None:
                continue
            lst = [s.name for s in grp.strategies[grp.root]]
            if want not in lst:
                raise ValueError(f"{grp.root}: strategy {want!r} not available on mesh {self.mesh}; have {lst}")
            choice[gi] = lst.index(want)
        return choice

    def evaluate(self, group_choice, settings: Settings = Settings(), with_ops: bool = False,
                 sharded_roots=frozenset()) -> Evaluation:
        """`sharded_roots`: the groups (by root) whose parameters are stored sharded
        (solve_storage)."""
        g, mesh = self.graph, self.mesh
        sharded = self.sharded_members(sharded_roots) if sharded_roots else frozenset()
        if sharded and settings.zero not in (1, 2):
            raise ValueError(f"sharded parameter storage per op needs ZeRO 1 or 2, the stage has ZeRO {settings.zero}")
        fwd = bwd = comm = sync = rec = tail = pe = pez = stash = spe = spez = 0.0
        roles = checkpoint_roles(g)
        ops = []
        groups, group_of, inside = self.groups, self.group_of, self.inside
        choice = [int(x) for x in group_choice]
        for name, operands in _operands_by_name(self.names, self._operands):
            gi = group_of[name]
            st = groups[gi].strategies[name][choice[gi]]
            in_specs = st.in_specs
            reshard = extra_bwd = 0.0       # the edges' forward; their backward beyond it
            for o in operands:
                j = o.j
                if j >= len(in_specs) or in_specs[j] is None:
                    continue
                if o.source in inside:
                    gu = group_of[o.source]
                    src = groups[gu].strategies[o.source][choice[gu]].out_spec
                else:
                    src = self._boundary_spec(o.source)
                # _edge_fwd_bwd_s with the operand's own fields (the same values)
                ef, eb = self._edge_fwd_bwd_memo_s(name, j, o.shape, o.shape_key, o.eb, src, in_specs[j],
                                                   o.grad, o.share, st)
                reshard += ef
                extra_bwd += eb - ef
            c = self.member_cost(name, st, settings, reshard, name in sharded)
            fwd += c.fwd_s
            bwd += c.bwd_s + extra_bwd
            comm += c.comm_s + extra_bwd
            sync += c.step_s
            role = roles.get(name, RERUN)
            if role == RERUN:
                rec += st.fwd_s + st.fwd_comm_s + reshard
            elif role == NOT_RERUN:
                tail += st.fwd_s + st.fwd_comm_s + reshard
            pe += st.param_elems_local
            pez += st.param_elems_zero
            if name in sharded:
                spe += st.param_elems_local
                spez += st.param_elems_zero
            stash += self.saved.get(name, 0.0) * st.out_bytes_local
            if with_ops:
                v = g.node(name)
                ops.append({"name": name, "op": v.op, "kind": v.kind, "strategy": st.name,
                            "out_spec": spec_str(st.out_spec),
                            "in_specs": [spec_str(s) if s is not None else None for s in st.in_specs],
                            "compute_s": st.fwd_s + st.bwd_s, "comm_s": c.comm_s + extra_bwd})
                if name in sharded:
                    ops[-1]["storage"] = "sharded"
        boundary = 0.0
        for bsrc, bspec in self.boundary.items():
            n = g.node(bsrc)
            boundary += n.out_bytes / shard_factor(bspec, mesh) if bspec else n.out_bytes
        stash += self.outside_stash_bytes()
        return Evaluation(fwd, bwd, comm, sync, rec, pe, pez, stash, boundary, ops, spe, spez, sharded, tail)

    def objective(self, group_choice, settings: Settings, sharded_roots=frozenset()) -> float:
        ev = self.evaluate(group_choice, settings, sharded_roots=sharded_roots)
        return ev.per_microbatch_s + ev.sync_s / settings.n_microbatches

    def size(self) -> dict[str, int]:
        n_strats = [len(grp.strategies[grp.root]) for grp in self.groups]
        return {"ops": len(self.names), "ilp_nodes": len(self.groups),
                "decision_nodes": sum(1 for k in n_strats if k > 1), "strategies": int(sum(n_strats))}
