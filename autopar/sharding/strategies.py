"""Per-op parallel strategies on a logical mesh, with their costs.

Decision ops (matmuls, attention, embedding, graph inputs) enumerate strategies: which mesh
axis splits which index letter. Everything else *follows* its leading operand (Alpa's
"follow"): its strategy is derived from the leader's output spec, so it adds no decision to
the ILP. A follower that cannot keep the leader's split (a norm over a split dim, a reshape
that breaks a split dim) pays the communication that makes it correct.

Times are per microbatch, for the local (sharded) shapes on one device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from autopar.costmodel.collectives import all_gather_s, all_reduce_s, reduce_scatter_s
from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh
from autopar.sharding.spec import Spec, is_valid, shard_factor, spec_str, used_mask
from graphs.ir import (
    ATTENTION,
    EMBEDDING,
    INPUT,
    LOSS,
    MATMUL,
    NORM,
    OUTPUT,
    REDUCTION,
    SOFTMAX,
    UNKNOWN,
    VIEW,
    OpNode,
    dtype_bytes,
    numel,
)

GRAD_BYTES = 2          # gradients reduced in the training dtype (bf16/fp16)
DECISION_KINDS = (MATMUL, ATTENTION, EMBEDDING, INPUT, UNKNOWN, OUTPUT)


@dataclass
class Strategy:
    name: str
    out_spec: Spec
    in_specs: tuple                      # per operand: Spec, or None for constants
    fwd_s: float = 0.0                   # compute
    bwd_s: float = 0.0
    fwd_comm_s: float = 0.0
    bwd_comm_s: float = 0.0
    grad_sync_s: float = 0.0             # per step: all-reduce of weight grads over partial axes
    zero2_s: float = 0.0                 # per microbatch under ZeRO-2: reduce-scatter of grads
    zero2_step_s: float = 0.0            # per step under ZeRO-2: all-gather of the updated weights
    zero3_s: float = 0.0                 # per microbatch under ZeRO-3: gather weights fwd+bwd, RS grads
    param_elems_local: float = 0.0       # owned parameter elements on one device
    param_elems_zero: float = 0.0        # ... when optimizer state is sharded over the grad-sync axes
    out_bytes_local: float = 0.0
    letters: dict = field(default_factory=dict)   # letter -> mask, for matmul-like ops
    # Of bwd_comm_s, the all-reduce of each activation operand's gradient (by operand index).
    # Consumers of one tensor sum their partial gradients before reducing, so the stage
    # shares this cost among the tensor's matmul consumers.
    bwd_comm_operand: dict = field(default_factory=dict)

    def per_microbatch_s(self) -> float:
        return self.fwd_s + self.bwd_s + self.fwd_comm_s + self.bwd_comm_s


def strategy_name(letters: dict[str, int]) -> str:
    """"b@0,n@1": index letter b split over mesh axis 0, n over axis 1 ("@01": both). "R": none."""
    return ",".join(f"{c}@{'01' if m == 3 else m - 1}" for c, m in sorted(letters.items()) if m) or "R"


def _out_elem_bytes(node: OpNode) -> int:
    return dtype_bytes(node.out_dtype)


def _local_out_bytes(node: OpNode, spec: Spec, mesh: Mesh) -> float:
    if not node.out_shapes:
        return 0.0
    b = dtype_bytes(node.out_dtype)
    return sum(numel(s) * b / (shard_factor(spec, mesh) if len(spec) == len(s) else 1) for s in node.out_shapes)


def _param_terms(s: Strategy, node: OpNode, param_specs: dict[int, Spec], partial_mask_of: dict[int, int],
                 mesh: Mesh) -> None:
    """Fill memory and gradient-sync fields from the specs of the op's own parameters."""
    for i, spec in param_specs.items():
        o = node.operands[i]
        if not o.owns_param:
            continue
        local = numel(o.shape) / shard_factor(spec, mesh)
        partial = partial_mask_of.get(i, 0)
        s.param_elems_local += local
        s.param_elems_zero += local / (mesh.factor(partial) if partial else 1)
        if partial:
            ax = mesh.axis(partial)
            s.grad_sync_s += all_reduce_s(local * GRAD_BYTES, ax)
            s.zero2_s += reduce_scatter_s(local * GRAD_BYTES, ax)
            # Each rank updates its shard only, so the new weights are all-gathered once per
            # step (ZeRO-1's all-reduce already is that reduce-scatter + all-gather).
            s.zero2_step_s += all_gather_s(local * dtype_bytes(o.dtype), ax)
            s.zero3_s += 2 * all_gather_s(local * dtype_bytes(o.dtype), ax) + reduce_scatter_s(local * GRAD_BYTES, ax)


# ---- matmul-like ops (einsum) ----------------------------------------------------------------

def parse_equation(eq: str) -> tuple[list[str], str]:
    lhs, out = eq.replace(" ", "").split("->")
    return lhs.split(","), out


def _letter_sizes(ins: list[str], node: OpNode) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for term, o in zip(ins, node.operands):
        for ch, d in zip(term, o.shape):
            sizes[ch] = d
    return sizes


def _einsum_candidates(ins: list[str], out: str, node: OpNode) -> list[str]:
    letters = list(dict.fromkeys("".join(ins) + out))
    if len(ins) >= 2 and node.operands[1].is_param:
        # Splitting any one batch-like letter of the activation is the same algorithm as
        # splitting another (data parallel); keep the first only, so the ILP stays small.
        batch_like = [c for c in ins[0] if c in out and c not in ins[1]]
        letters = [c for c in letters if c not in batch_like[1:]]
    return letters


def matmul_strategies(node: OpNode, mesh: Mesh, cm: ComputeModel) -> list[Strategy]:
    ins, out = parse_equation(node.attrs["equation"])
    sizes = _letter_sizes(ins, node)
    cands = _einsum_candidates(ins, out, node)
    live = mesh.live_axes
    strategies = []
    for combo in itertools.product([None] + cands, repeat=len(live)):
        letters: dict[str, int] = {}
        for bit, ch in zip(live, combo):
            if ch is not None:
                letters[ch] = letters.get(ch, 0) | bit
        if any(sizes[ch] % mesh.factor(m) for ch, m in letters.items()):
            continue
        strategies.extend(_einsum_variants(node, mesh, cm, ins, out, sizes, letters))
    return strategies


def _einsum_variants(node, mesh, cm, ins, out, sizes, letters) -> list[Strategy]:
    contracted = [c for c in dict.fromkeys("".join(ins)) if c not in out]
    partial = 0
    for c in contracted:
        partial |= letters.get(c, 0)
    in_specs = []
    for term, o in zip(ins, node.operands):
        in_specs.append(tuple(letters.get(c, 0) for c in term))
    for j in range(len(ins), len(node.operands)):           # bias of a linear: along the last out letter
        o = node.operands[j]
        in_specs.append(tuple(letters.get(out[-1], 0) for _ in o.shape) if o.shape else ())
    out_spec = tuple(letters.get(c, 0) for c in out)

    loc = {c: sizes[c] / mesh.factor(letters.get(c, 0)) if letters.get(c) else sizes[c] for c in sizes}
    a, b = ins[0], ins[1] if len(ins) > 1 else ""
    batch = _prod(loc[c] for c in dict.fromkeys(a) if c in b and c in out)
    m = _prod(loc[c] for c in dict.fromkeys(a) if c in out and c not in b)
    n = _prod(loc[c] for c in dict.fromkeys(b) if c in out and c not in a)
    k = _prod(loc[c] for c in contracted)
    ebytes = _out_elem_bytes(node)
    out_local = _prod(loc[c] for c in out) * ebytes
    fwd = cm.matmul_s(int(m), int(n), int(k), int(batch))
    bwd = 0.0
    for i, term in enumerate(ins[:2]):
        if node.operands[i].dtype.startswith("int") or node.operands[i].dtype == "bool":
            continue
        # grad of operand 0: [m,k] = [m,n] x [n,k]; of operand 1: [k,n] = [k,m] x [m,n]
        bwd += cm.matmul_s(int(m), int(k), int(n), int(batch)) if i == 0 else cm.matmul_s(int(k), int(n), int(m), int(batch))

    base_name = strategy_name(letters)
    variants = []
    fwd_comm_ar = all_reduce_s(out_local, mesh.axis(partial)) if partial else 0.0
    bwd_comm = 0.0
    grad_ar: dict[int, float] = {}
    partial_of: dict[int, int] = {}
    for i, term in enumerate(ins[:2]):
        o = node.operands[i]
        others = set(out) | set("".join(t for j, t in enumerate(ins) if j != i))
        pm = 0
        for c in others - set(term):
            pm |= letters.get(c, 0)
        if o.is_param:
            partial_of[i] = pm
        elif o.source is not None and pm and not (o.dtype.startswith("int") or o.dtype == "bool"):
            grad_local = _prod(loc[c] for c in term) * dtype_bytes(o.dtype)
            ar = all_reduce_s(grad_local, mesh.axis(pm))
            bwd_comm += ar
            grad_ar[i] = ar
    for j in range(len(ins), len(node.operands)):
        o = node.operands[j]
        if o.is_param:
            pm = 0
            for c in out[:-1]:
                pm |= letters.get(c, 0)
            partial_of[j] = pm

    def make(name, ospec, fcomm):
        s = Strategy(name, ospec, tuple(in_specs), fwd, bwd, fcomm, bwd_comm, letters=dict(letters),
                     bwd_comm_operand=dict(grad_ar))
        s.out_bytes_local = _local_out_bytes(node, ospec, mesh)
        _param_terms(s, node, {i: in_specs[i] for i, o in enumerate(node.operands) if o.is_param}, partial_of, mesh)
        return s

    variants.append(make(base_name, out_spec, fwd_comm_ar))
    if partial:
        # Reduce-scatter instead of all-reduce: the output comes out split on its first free
        # letter over the contracted axes (Alpa's / Megatron-SP's variant).
        for pos, c in enumerate(out):
            if letters.get(c, 0) == 0 and sizes[c] % mesh.factor(partial) == 0:
                ospec = list(out_spec)
                ospec[pos] = partial
                variants.append(make(base_name + "+rs:" + strategy_name({c: partial}),
                                     tuple(ospec), reduce_scatter_s(out_local, mesh.axis(partial))))
                break
    return variants


def _prod(xs) -> float:
    p = 1.0
    for x in xs:
        p *= x
    return p


# ---- attention, embedding, inputs ------------------------------------------------------------

def attention_strategies(node: OpNode, mesh: Mesh, cm: ComputeModel) -> list[Strategy]:
    q, k = node.operands[0], node.operands[1]
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    causal = bool(node.attrs.get("is_causal", False))
    out = []
    for combo in itertools.product([None, "b", "h"], repeat=len(mesh.live_axes)):
        lt = {}
        for bit, ch in zip(mesh.live_axes, combo):
            if ch:
                lt[ch] = lt.get(ch, 0) | bit
        mb, mh = lt.get("b", 0), lt.get("h", 0)
        if b % mesh.factor(mb) or hq % mesh.factor(mh) or hkv % mesh.factor(mh):
            continue
        spec = (mb, mh, 0, 0)
        bl, hl = b // mesh.factor(mb), hq // mesh.factor(mh)
        specs = tuple(spec if o.source is not None else None for o in node.operands)
        st = Strategy(strategy_name(lt), spec, specs, cm.attention_s(bl, hl, s, d, causal), cm.attention_s(bl, hl, s, d, causal, True),
                      letters=lt)
        st.out_bytes_local = _local_out_bytes(node, spec, mesh)
        out.append(st)
    return out


def embedding_strategies(node: OpNode, mesh: Mesh, cm: ComputeModel) -> list[Strategy]:
    ids, w = node.operands[0], node.operands[1]
    has_ids = ids.source is not None
    letters_avail = (["b"] if has_ids and ids.shape else []) + ["v", "h"]
    res = []
    for combo in itertools.product([None] + letters_avail, repeat=len(mesh.live_axes)):
        lt = {}
        for bit, ch in zip(mesh.live_axes, combo):
            if ch:
                lt[ch] = lt.get(ch, 0) | bit
        mb, mv, mh = lt.get("b", 0), lt.get("v", 0), lt.get("h", 0)
        if (ids.shape and ids.shape[0] % mesh.factor(mb)) or w.shape[0] % mesh.factor(mv) or w.shape[1] % mesh.factor(mh):
            continue
        ids_spec = tuple([mb] + [0] * (len(ids.shape) - 1)) if ids.shape else ()
        out_spec = tuple([mb] + [0] * (len(node.out_shape) - 2) + [mh]) if len(node.out_shape) >= 2 else (mh,)
        w_spec = (mv, mh)
        out_local = _local_out_bytes(node, out_spec, mesh)
        st = Strategy(strategy_name(lt), out_spec, (ids_spec if has_ids else None, w_spec) + tuple(None for _ in node.operands[2:]),
                      cm.memory_bound_s(2 * out_local), cm.memory_bound_s(2 * out_local),
                      all_reduce_s(out_local, mesh.axis(mv)) if mv else 0.0, 0.0, letters=lt)
        st.out_bytes_local = out_local
        _param_terms(st, node, {1: w_spec}, {1: mb}, mesh)
        res.append(st)
    return res


def input_strategies(node: OpNode, mesh: Mesh) -> list[Strategy]:
    shape = node.out_shape
    if not shape:
        return [Strategy("R", (), ())]
    res = []
    for m in (0,) + tuple(x for x in (1, 2, 3) if all(mesh.factor(b) > 1 for b in (1, 2) if x & b)):
        spec = (m,) + (0,) * (len(shape) - 1)
        if m and not is_valid(spec, shape, mesh):
            continue
        st = Strategy(strategy_name({"b": m}), spec, ())
        st.out_bytes_local = _local_out_bytes(node, spec, mesh)
        res.append(st)
    return res


def replicated_strategy(node: OpNode, mesh: Mesh, cm: ComputeModel) -> Strategy:
    """Ops without a rule run whole on every device (inputs gathered by the edges)."""
    in_specs = tuple(tuple(0 for _ in o.shape) if (o.source is not None or o.is_param) else None
                     for o in node.operands)
    st = Strategy("R", tuple(0 for _ in node.out_shape), in_specs,
                  cm.memory_bound_s(node.fwd_bytes, node.fwd_flops) if (node.fwd_bytes or node.fwd_flops) else 0.0,
                  cm.memory_bound_s(node.bwd_bytes, node.bwd_flops) if (node.bwd_bytes or node.bwd_flops) else 0.0)
    st.out_bytes_local = node.out_bytes
    _param_terms(st, node, {i: in_specs[i] for i, o in enumerate(node.operands) if o.is_param}, {}, mesh)
    return st


def decision_strategies(node: OpNode, mesh: Mesh, cm: ComputeModel) -> list[Strategy]:
    if node.kind == MATMUL and "equation" in node.attrs and len(node.operands) >= 2:
        out = matmul_strategies(node, mesh, cm)
    elif node.kind == ATTENTION and len(node.operands) >= 3 and len(node.operands[0].shape) == 4:
        out = attention_strategies(node, mesh, cm)
    elif node.kind == EMBEDDING and len(node.operands) >= 2 and len(node.operands[1].shape) == 2:
        out = embedding_strategies(node, mesh, cm)
    elif node.kind == INPUT:
        out = input_strategies(node, mesh)
    else:
        out = []
    return out or [replicated_strategy(node, mesh, cm)]


def is_decision(node: OpNode) -> bool:
    return node.kind in DECISION_KINDS


# ---- followers -------------------------------------------------------------------------------

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


def _align(spec: Spec, src_shape, dst_shape) -> Spec:
    """Right-align a spec onto a broadcast operand's shape (size-1 dims replicated)."""
    out = [0] * len(dst_shape)
    for k in range(1, min(len(src_shape), len(dst_shape)) + 1):
        if dst_shape[-k] == src_shape[-k]:
            out[-k] = spec[-k]
    return tuple(out)


def _gather_cost(shape, elem_bytes, spec: Spec, drop: int, mesh: Mesh) -> float:
    """All-gather over the axes in `drop`, from layout `spec`, counted on the gathered size."""
    if not drop:
        return 0.0
    local = numel(shape) * elem_bytes / shard_factor(spec, mesh)
    ax = mesh.axis(drop)
    return all_gather_s(local * ax.size, ax)


def follow(node: OpNode, lead_spec: Spec, mesh: Mesh, cm: ComputeModel) -> Strategy:
    """The strategy of a follower whose leading operand arrives in `lead_spec`."""
    li = leader_operand(node)
    lead = node.operands[li]
    eb = _out_elem_bytes(node)
    kind = node.kind
    fwd_comm = bwd_comm = 0.0
    out_shape = node.out_shape
    in_specs: list = [None] * len(node.operands)
    in_specs[li] = lead_spec
    param_specs: dict[int, Spec] = {}
    partial_of: dict[int, int] = {}

    if kind == VIEW:
        out_spec, drop = view_spec(node, lead_spec, mesh)
        if drop:
            fwd_comm = bwd_comm = _gather_cost(lead.shape, dtype_bytes(lead.dtype), lead_spec, drop, mesh)
        for i, o in node.activation_operands():       # cat's other operands come in the same layout
            if i != li:
                in_specs[i] = _align(out_spec, out_shape, o.shape) if len(o.shape) == len(out_shape) else tuple(0 for _ in o.shape)
    elif kind in (NORM, SOFTMAX, LOSS, REDUCTION):
        nd = len(lead.shape)
        if kind == NORM:
            red_dims = list(range(nd - int(node.attrs.get("normalized_ndim", 1)), nd))
        elif kind == LOSS:
            red_dims = [nd - 1]
        else:
            dims = node.attrs.get("dims", node.attrs.get("dim", nd - 1))
            red_dims = [d % nd for d in (dims if isinstance(dims, (list, tuple)) else [dims])] if dims is not None else list(range(nd))
        split_red = 0
        for d in red_dims:
            split_red |= lead_spec[d]
        rows_local = numel(lead.shape) / max(1, numel(lead.shape[d] for d in red_dims)) / shard_factor(
            tuple(x for i, x in enumerate(lead_spec) if i not in red_dims), mesh)
        if kind == REDUCTION:
            keep = bool(node.attrs.get("keepdim", False))
            spec = [0 if i in red_dims else x for i, x in enumerate(lead_spec)]
            out_spec = tuple(spec) if keep or len(out_shape) == nd else tuple(x for i, x in enumerate(lead_spec) if i not in red_dims)
            if len(out_spec) != len(out_shape):
                out_spec = tuple(0 for _ in out_shape)
            if split_red:
                out_local = numel(out_shape) * eb / max(1, shard_factor(out_spec, mesh))
                if node.op in ("sum", "mean", "amax", "amin", "max", "min", "norm"):
                    fwd_comm = all_reduce_s(out_local, mesh.axis(split_red))
                else:   # topk / argmax / sort: gather the split dim first
                    fwd_comm = _gather_cost(lead.shape, dtype_bytes(lead.dtype), lead_spec, split_red, mesh)
        elif kind == LOSS:
            out_spec = tuple(0 for _ in out_shape)
            # Vocab-parallel cross-entropy: reduce max, sum-exp and target logit per row.
            if split_red:
                fwd_comm = all_reduce_s(rows_local * 3 * 4, mesh.axis(split_red))
            # The scalar loss is a sum over the batch split: a tiny all-reduce, not counted.
            for i, o in node.activation_operands():
                if i != li:
                    in_specs[i] = tuple(lead_spec[: len(o.shape)]) if len(o.shape) < nd else tuple(0 for _ in o.shape)
        else:
            out_spec = lead_spec
            if split_red:   # statistics (mean/var or max/sum) reduced across the split
                fwd_comm = bwd_comm = all_reduce_s(rows_local * 2 * 4, mesh.axis(split_red))
        for i, o in enumerate(node.operands):
            if o.is_param:                   # norm weight/bias along the normalised dims
                pspec = _align(lead_spec, lead.shape, o.shape)
                param_specs[i] = pspec
                in_specs[i] = pspec
                pm = 0
                for d, x in enumerate(lead_spec):
                    if d not in red_dims:
                        pm |= x
                partial_of[i] = pm
            elif o.source is not None and i != li and in_specs[i] is None:
                in_specs[i] = _align(lead_spec, lead.shape, o.shape)
    else:   # elementwise and anything else that keeps the leader's layout
        out_spec = _align(lead_spec, lead.shape, out_shape) if len(out_shape) != len(lead.shape) or tuple(out_shape) != tuple(lead.shape) else lead_spec
        if not is_valid(out_spec, out_shape, mesh) and any(out_spec):
            out_spec = tuple(0 for _ in out_shape)
        for i, o in enumerate(node.operands):
            if i == li:
                continue
            if o.source is not None or o.is_param:
                in_specs[i] = _align(out_spec, out_shape, o.shape)
                if o.is_param:
                    param_specs[i] = in_specs[i]
                    partial_of[i] = used_mask_except(out_spec, in_specs[i])
                elif node.attrs.get("requires_grad", True) and not (o.dtype.startswith("int") or o.dtype == "bool"):
                    # A broadcast activation (GPT's learned positions [s, h] added to a
                    # batch-split [b, s, h]) gets a gradient summed over the dims it lacks:
                    # partial over the axes splitting them, all-reduced in backward.
                    missing = used_mask_except(out_spec, in_specs[i])
                    if missing:
                        grad = numel(o.shape) * dtype_bytes(o.dtype) / shard_factor(in_specs[i], mesh)
                        bwd_comm += all_reduce_s(grad, mesh.axis(missing))

    f = shard_factor(out_spec, mesh) if out_spec else 1
    f = max(f, shard_factor(lead_spec, mesh) if kind in (REDUCTION, LOSS) else f)
    fwd = cm.memory_bound_s(node.fwd_bytes / f, node.fwd_flops / f) if (node.fwd_bytes or node.fwd_flops) else 0.0
    bwd = cm.memory_bound_s(node.bwd_bytes / f, node.bwd_flops / f) if (node.bwd_bytes or node.bwd_flops) else 0.0
    st = Strategy("follow", out_spec, tuple(in_specs), fwd, bwd, fwd_comm, bwd_comm)
    st.out_bytes_local = _local_out_bytes(node, out_spec, mesh)
    _param_terms(st, node, param_specs, partial_of, mesh)
    return st


def used_mask_except(full: Spec, part: Spec) -> int:
    """Axes split in `full` that `part` (a broadcast operand's spec) does not carry."""
    m = 0
    for x in full:
        m |= x
    for x in part:
        m &= ~x
    return m


def view_spec(node: OpNode, spec: Spec, mesh: Mesh) -> tuple[Spec, int]:
    """Output spec of a view-like op given its input spec, and the axes that had to be
    gathered because the view breaks a split dimension."""
    out_shape = node.out_shape
    a = node.attrs
    if "perm" in a:
        perm = a["perm"]
        if len(perm) == len(spec):
            return tuple(spec[p] for p in perm), 0
    if "dim_groups" in a:
        out = [0] * len(out_shape)
        drop = 0
        for in_dims, out_dims in a["dim_groups"]:
            m = 0
            for d in in_dims:
                m |= spec[d] if d < len(spec) else 0
            if not m:
                continue
            if not out_dims:
                drop |= m
                continue
            # the split survives only on the major input dim, landing on the major output dim
            major_ok = all(spec[d] == 0 for d in in_dims[1:]) and spec[in_dims[0]] == m
            od = out_dims[0]
            if major_ok and out_shape[od] % mesh.factor(m) == 0:
                out[od] = m
            else:
                drop |= m
        return tuple(out), drop
    if node.op in ("split", "chunk", "cat") or "sizes" in a:
        # splitting or joining along a split dim needs that dim whole first
        d = a.get("dim", 0) % max(1, len(spec))
        if spec and spec[d]:
            out = list(spec)
            out[d] = 0
            return tuple(out), spec[d]
        return tuple(spec), 0
    if node.op == "getitem" and len(spec) == len(out_shape):
        return tuple(spec), 0
    if len(spec) == len(out_shape) and tuple(node.operands[leader_operand(node)].shape) == tuple(out_shape):
        return tuple(spec), 0         # contiguous / clone / identity
    return tuple(0 for _ in out_shape), used_mask(spec)


def describe(st: Strategy) -> str:
    return f"{st.name} -> {spec_str(st.out_spec)}"
