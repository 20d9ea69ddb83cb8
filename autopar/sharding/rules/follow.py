"""Followers (Alpa's "follow"): ops whose strategy is derived from their leading operand's
layout, so they add no decision to the ILP. One rule per kind (`FOLLOW_RULES`); a follower
that cannot keep the leader's split (a norm over a split dim, a reshape that breaks a split
dim) pays the communication that makes it correct.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from autopar.costmodel.collectives import ALL_GATHER, ALL_REDUCE, BACKWARD, FORWARD, Collective
from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh
from autopar.sharding.rules.common import (
    backward_kernel,
    collective,
    is_integer,
    local_out_bytes,
    memory_bound_s,
    memory_kernel,
    param_terms,
)
from autopar.sharding.spec import AXES, Spec, is_valid, parts_of, shard_factor, used_mask
from autopar.sharding.strategy import Strategy
from graphs.ir import LOSS, NORM, REDUCTION, SOFTMAX, VIEW, OpNode, dtype_bytes, numel
from graphs.query import slice_bounds

STAT_BYTES = 4          # row statistics (mean/var, max/sum) travel in fp32


def leader_operand(node: OpNode) -> int | None:
    """Index of the operand a follower takes its layout from: the first activation operand
    with the output's shape, else the first activation operand."""
    acts = node.activation_operands()
    if not acts:
        return None
    for i, o in acts:
        if tuple(o.shape) == tuple(node.out_shape):
            return i
    return acts[0][0]


@dataclass
class Layout:
    """What a follower rule decides: its output and operand layouts, the collectives it
    issues, and for each own parameter its layout and the axes its gradient is partial over."""

    out_spec: Spec
    in_specs: list
    collectives: list[Collective] = field(default_factory=list)
    param_specs: dict[int, Spec] = field(default_factory=dict)
    partial_of: dict[int, int] = field(default_factory=dict)
    shard_lead: bool = False       # compute is split like the leader (a reduction's output is smaller)


FollowRule = Callable[[OpNode, int, Spec, Mesh], Layout]


def follow(node: OpNode, lead_spec: Spec, mesh: Mesh, cm: ComputeModel) -> Strategy:
    """The strategy of a follower whose leading operand arrives in `lead_spec`."""
    li = leader_operand(node)
    assert li is not None, f"{node.name} has no activation operand to follow"
    if len(lead_spec) != len(node.operands[li].shape):
        raise ValueError(f"{node.name} ({node.op}): its input arrives in a layout of {len(lead_spec)} dims, "
                         f"but the tensor has shape {node.operands[li].shape}")
    lay = FOLLOW_RULES.get(node.kind, follow_elementwise)(node, li, lead_spec, mesh)
    out_spec = lay.out_spec
    f = shard_factor(out_spec, mesh) if out_spec else 1
    if lay.shard_lead:
        f = max(f, shard_factor(lead_spec, mesh))
    kernel = memory_kernel(node)
    fwd = memory_bound_s(cm, node.fwd_bytes / f, node.fwd_flops / f, kernel) if (node.fwd_bytes or node.fwd_flops) else 0.0
    bwd = (memory_bound_s(cm, node.bwd_bytes / f, node.bwd_flops / f, backward_kernel(kernel))
           if (node.bwd_bytes or node.bwd_flops) else 0.0)
    params = param_terms(node, lay.param_specs, lay.partial_of, mesh, _read_in_backward(node))
    return Strategy("follow", out_spec, tuple(lay.in_specs), fwd, bwd, (*lay.collectives, *params.collectives),
                    params.elems_local, params.elems_zero, local_out_bytes(node, out_spec, mesh))


def _read_in_backward(node: OpNode) -> list[int] | None:
    """Parameters the op's backward reads: all but an added one (a norm's backward takes its
    shift too, so autograd keeps it)."""
    if node.op in ("add", "sub"):
        return []
    return None


def _in_specs(node: OpNode, li: int, lead_spec: Spec) -> list:
    in_specs: list = [None] * len(node.operands)
    in_specs[li] = lead_spec
    return in_specs


def align(spec: Spec, src_shape, dst_shape) -> Spec:
    """Right-align a spec onto a broadcast operand's shape (size-1 dims replicated)."""
    out = [0] * len(dst_shape)
    for k in range(1, min(len(src_shape), len(dst_shape)) + 1):
        if dst_shape[-k] == src_shape[-k]:
            out[-k] = spec[-k]
    return tuple(out)


def _gather(shape, elem_bytes: int, spec: Spec, drop: int, phase: str, mesh: Mesh) -> Collective:
    """All-gather over the axes in `drop`, from layout `spec`, counted on the gathered size."""
    local = numel(shape) * elem_bytes / shard_factor(spec, mesh)
    return collective(ALL_GATHER, drop, local * mesh.axis(drop).size, phase, mesh)


def used_mask_except(full: Spec, part: Spec) -> int:
    """Axes split in `full` that `part` (a broadcast operand's spec) does not carry."""
    m = 0
    for x in full:
        m |= x & AXES
    for x in part:
        m &= ~x
    return m & AXES


# ---- views ------------------------------------------------------------------------------------

def follow_view(node: OpNode, li: int, lead_spec: Spec, mesh: Mesh) -> Layout:
    """Keeps the split where the view keeps the split dim whole (as its major part); else
    gathers the dim first (forward) and, in backward, gathers its gradient likewise."""
    lead = node.operands[li]
    out_shape = node.out_shape
    out_spec, drop = view_spec(node, lead_spec, mesh)
    lay = Layout(out_spec, _in_specs(node, li, lead_spec))
    if drop:
        eb = dtype_bytes(lead.dtype)
        lay.collectives = [_gather(lead.shape, eb, lead_spec, drop, FORWARD, mesh),
                           _gather(lead.shape, eb, lead_spec, drop, BACKWARD, mesh)]
    for i, o in node.activation_operands():       # cat's other operands come in the same layout
        if i != li:
            lay.in_specs[i] = align(out_spec, out_shape, o.shape) if len(o.shape) == len(out_shape) \
                else tuple(0 for _ in o.shape)
    return lay


def view_spec(node: OpNode, spec: Spec, mesh: Mesh) -> tuple[Spec, int]:
    """Output spec of a view-like op given its input spec, and the axes that had to be
    gathered because the view breaks a split dimension. A dim split per part (a fused
    projection's output) survives views that keep it whole; a split / chunk into exactly those
    parts, or a slice of exactly one part, leaves each part split plainly."""
    out_shape = node.out_shape
    a = node.attrs
    if "perm" in a:
        perm = a["perm"]
        if len(perm) == len(spec):
            return tuple(spec[p] for p in perm), 0
    cut = slice_bounds(node) if "index" in a else None
    if cut is not None and len(spec) == len(out_shape):
        d, start, stop = cut
        out = list(spec)
        parts = parts_of(spec[d])
        edges = [sum(parts[:i]) for i in range(len(parts) + 1)]
        if parts and any((edges[i], edges[i + 1]) == (start, stop) for i in range(len(parts))):
            out[d] = spec[d] & AXES                 # exactly one part: its chunk on every device
            return tuple(out), 0
        out[d] = 0                                  # any other slice of a split dim: gather it first
        return tuple(out), spec[d] & AXES
    if "dim_groups" in a:
        in_shape = node.operands[leader_operand(node) or 0].shape
        out = [0] * len(out_shape)
        drop = 0
        for in_dims, out_dims in a["dim_groups"]:
            m = 0
            for d in in_dims:
                m |= spec[d] & AXES if d < len(spec) else 0
            if not m:
                continue
            if not out_dims:
                drop |= m
                continue
            od = out_dims[0]
            whole = len(in_dims) == 1 and len(out_dims) == 1 and out_shape[od] == in_shape[in_dims[0]]
            if parts_of(spec[in_dims[0]]):          # a per-part dim survives only whole and alone
                if whole:
                    out[od] = spec[in_dims[0]]
                else:
                    drop |= m
                continue
            # the split survives only on the major input dim, landing on the major output dim
            # (not on a dim an index narrows: that is no longer the same dim)
            major_ok = all(spec[d] == 0 for d in in_dims[1:]) and spec[in_dims[0]] == m
            narrowed = len(in_dims) == 1 and len(out_dims) == 1 and not whole
            if major_ok and not narrowed and out_shape[od] % mesh.factor(m) == 0:
                out[od] = m
            else:
                drop |= m
        return tuple(out), drop
    if node.op in ("split", "chunk", "cat") or "sizes" in a:
        # splitting or joining along a split dim needs that dim whole first, unless it is split
        # per part and cut into exactly those parts
        d = a.get("dim", 0) % max(1, len(spec))
        if spec and spec[d]:
            out = list(spec)
            if node.op != "cat" and tuple(a.get("sizes") or ()) == parts_of(spec[d]):
                out[d] = spec[d] & AXES
                return tuple(out), 0
            out[d] = 0
            return tuple(out), spec[d] & AXES
        return tuple(spec), 0
    if node.op == "getitem" and len(spec) == len(out_shape):
        return tuple(spec), 0
    li = leader_operand(node)
    if len(spec) == len(out_shape) and li is not None and tuple(node.operands[li].shape) == tuple(out_shape):
        return tuple(spec), 0         # contiguous / clone / identity
    return tuple(0 for _ in out_shape), used_mask(spec)


# ---- ops reducing over dims: norms, softmax, losses, reductions ------------------------------

def _reduced_dims(node: OpNode, nd: int) -> list[int]:
    if node.kind == NORM:
        return list(range(nd - int(node.attrs.get("normalized_ndim", 1)), nd))
    if node.kind in (LOSS, SOFTMAX):
        return [nd - 1] if node.kind == LOSS else _attr_dims(node, nd)
    return _attr_dims(node, nd)


def _attr_dims(node: OpNode, nd: int) -> list[int]:
    dims = node.attrs.get("dims", node.attrs.get("dim", nd - 1))
    if dims is None:
        return list(range(nd))
    return [d % nd for d in (dims if isinstance(dims, (list, tuple)) else [dims])]


def _split_reduced(lead_spec: Spec, red_dims: list[int]) -> int:
    m = 0
    for d in red_dims:
        m |= lead_spec[d] & AXES
    return m


def _rows_local(lead_shape, lead_spec: Spec, red_dims: list[int], mesh: Mesh) -> float:
    """Rows (positions along the kept dims) one device holds."""
    return numel(lead_shape) / max(1, numel(lead_shape[d] for d in red_dims)) / shard_factor(
        tuple(x for i, x in enumerate(lead_spec) if i not in red_dims), mesh)


def _reducing_operands(node: OpNode, li: int, lead_spec: Spec, red_dims: list[int], lay: Layout) -> Layout:
    """Weights (a norm's scale and shift) along the reduced dims: their gradient is a partial sum
    over the axes splitting the kept dims. Other activations come aligned with the leader."""
    lead = node.operands[li]
    for i, o in enumerate(node.operands):
        if o.is_param:
            pspec = align(lead_spec, lead.shape, o.shape)
            lay.param_specs[i] = pspec
            lay.in_specs[i] = pspec
            pm = 0
            for d, x in enumerate(lead_spec):
                if d not in red_dims:
                    pm |= x & AXES
            lay.partial_of[i] = pm
        elif o.source is not None and i != li and lay.in_specs[i] is None:
            lay.in_specs[i] = align(lead_spec, lead.shape, o.shape)
    return lay


def follow_statistics(node: OpNode, li: int, lead_spec: Spec, mesh: Mesh) -> Layout:
    """Norms and softmax keep the leader's layout; over a split dim they all-reduce their row
    statistics (mean and variance, or max and sum: two fp32 values per row) in forward, and
    the matching two row sums in backward."""
    lead = node.operands[li]
    red_dims = _reduced_dims(node, len(lead.shape))
    split_red = _split_reduced(lead_spec, red_dims)
    lay = Layout(lead_spec, _in_specs(node, li, lead_spec))
    if split_red:
        stats = _rows_local(lead.shape, lead_spec, red_dims, mesh) * 2 * STAT_BYTES
        lay.collectives = [collective(ALL_REDUCE, split_red, stats, FORWARD, mesh),
                           collective(ALL_REDUCE, split_red, stats, BACKWARD, mesh)]
    return _reducing_operands(node, li, lead_spec, red_dims, lay)


def follow_loss(node: OpNode, li: int, lead_spec: Spec, mesh: Mesh) -> Layout:
    """Cross-entropy over (possibly vocab-split) logits: the scalar loss is replicated.
    Vocab-parallel (Megatron, torch's loss_parallel): each row's max, sum of exponentials and
    target logit are all-reduced one after another (the sum needs the max), so three
    all-reduces of one fp32 per row, each paying its own latency. The scalar loss is a sum over
    the batch split: a tiny all-reduce, not counted."""
    lead = node.operands[li]
    nd = len(lead.shape)
    red_dims = _reduced_dims(node, nd)
    split_red = _split_reduced(lead_spec, red_dims)
    lay = Layout(tuple(0 for _ in node.out_shape), _in_specs(node, li, lead_spec), shard_lead=True)
    if split_red:
        rows = _rows_local(lead.shape, lead_spec, red_dims, mesh)
        lay.collectives = [collective(ALL_REDUCE, split_red, rows * STAT_BYTES, FORWARD, mesh)] * 3
    for i, o in node.activation_operands():
        if i != li:
            lay.in_specs[i] = tuple(lead_spec[: len(o.shape)]) if len(o.shape) < nd else tuple(0 for _ in o.shape)
    return _reducing_operands(node, li, lead_spec, red_dims, lay)


def follow_reduction(node: OpNode, li: int, lead_spec: Spec, mesh: Mesh) -> Layout:
    """sum/mean/max... over a split dim all-reduce their (smaller) output; topk/argmax/sort
    gather the split dim first."""
    lead = node.operands[li]
    nd = len(lead.shape)
    out_shape = node.out_shape
    red_dims = _reduced_dims(node, nd)
    split_red = _split_reduced(lead_spec, red_dims)
    keep = bool(node.attrs.get("keepdim", False))
    spec = tuple(0 if i in red_dims else x for i, x in enumerate(lead_spec))
    out_spec = spec if keep or len(out_shape) == nd else tuple(x for i, x in enumerate(lead_spec) if i not in red_dims)
    if len(out_spec) != len(out_shape):
        out_spec = tuple(0 for _ in out_shape)
    lay = Layout(out_spec, _in_specs(node, li, lead_spec), shard_lead=True)
    if split_red:
        if node.op in ("sum", "mean", "amax", "amin", "max", "min", "norm"):
            out_local = numel(out_shape) * dtype_bytes(node.out_dtype) / max(1, shard_factor(out_spec, mesh))
            lay.collectives = [collective(ALL_REDUCE, split_red, out_local, FORWARD, mesh)]
        else:
            lay.collectives = [_gather(lead.shape, dtype_bytes(lead.dtype), lead_spec, split_red, FORWARD, mesh)]
    return _reducing_operands(node, li, lead_spec, red_dims, lay)


# ---- elementwise and everything else ------------------------------------------------------------

def follow_elementwise(node: OpNode, li: int, lead_spec: Spec, mesh: Mesh) -> Layout:
    """Keeps the leader's layout (aligned onto a broadcast output; replicated if it does not
    divide). A broadcast activation (GPT's learned positions [s, h] added to a batch-split
    [b, s, h]) gets a gradient summed over the dims it lacks: partial over the axes splitting
    them, all-reduced in backward."""
    lead = node.operands[li]
    out_shape = node.out_shape
    out_spec = align(lead_spec, lead.shape, out_shape) \
        if len(out_shape) != len(lead.shape) or tuple(out_shape) != tuple(lead.shape) else lead_spec
    if not is_valid(out_spec, out_shape, mesh) and any(out_spec):
        out_spec = tuple(0 for _ in out_shape)
    lay = Layout(out_spec, _in_specs(node, li, lead_spec))
    for i, o in enumerate(node.operands):
        if i == li or not (o.source is not None or o.is_param):
            continue
        lay.in_specs[i] = align(out_spec, out_shape, o.shape)
        if o.is_param:
            lay.param_specs[i] = lay.in_specs[i]
            lay.partial_of[i] = used_mask_except(out_spec, lay.in_specs[i])
        elif node.attrs.get("requires_grad", True) and not is_integer(o.dtype):
            missing = used_mask_except(out_spec, lay.in_specs[i])
            if missing:
                grad = numel(o.shape) * dtype_bytes(o.dtype) / shard_factor(lay.in_specs[i], mesh)
                lay.collectives.append(collective(ALL_REDUCE, missing, grad, BACKWARD, mesh))
    return lay


FOLLOW_RULES: dict[str, FollowRule] = {
    VIEW: follow_view,
    NORM: follow_statistics,
    SOFTMAX: follow_statistics,
    LOSS: follow_loss,
    REDUCTION: follow_reduction,
}
