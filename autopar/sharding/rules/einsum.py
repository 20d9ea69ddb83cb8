"""Matmul-like ops written as einsums (linear, matmul, bmm, the MoE einsums): one strategy per
assignment of mesh axes to index letters, and for a split contracted letter a reduce-scatter
variant besides the all-reduce.

A fused projection (q|k|v or gate|up in one weight; `attrs["fused_parts"]`, set by
graphs/query.py) also gets, for each strategy splitting its fused output letter, the same
strategy with that letter split *per part* (sharding/spec.py): the weight's rows of every part
are split alike, so each part of the output comes out column-parallel and the split / chunk /
slices that follow keep it, with no communication (Megatron's layout for separate projections).
Compute and collectives are those of the plain split."""

from __future__ import annotations

import itertools

from autopar.costmodel.collectives import ALL_GATHER, ALL_REDUCE, BACKWARD, FORWARD, REDUCE_SCATTER, Collective
from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh
from autopar.sharding.rules.common import (
    collective,
    is_integer,
    local_out_bytes,
    matmul_s,
    param_terms,
    prod,
    strategy_letters,
    strategy_name,
)
from autopar.sharding.spec import split_per_part
from autopar.sharding.strategy import Strategy
from graphs.ir import ATTENTION, MATMUL, OpNode, dtype_bytes

PER_PART = ":parts"       # strategy-name suffix of a fused output letter split per part


def parse_equation(eq: str) -> tuple[list[str], str]:
    lhs, out = eq.replace(" ", "").split("->")
    return lhs.split(","), out


def _letter_sizes(ins: list[str], node: OpNode) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for term, o in zip(ins, node.operands):
        for ch, d in zip(term, o.shape):
            sizes[ch] = d
    return sizes


def batch_like_letters(ins: list[str], out: str, node: OpNode) -> list[str]:
    """The activation's letters a matmul with a weight treats alike: in the activation and the
    output, not in the weight (batch, then sequence, for "bsk,nk->bsn")."""
    if len(ins) >= 2 and node.operands[1].is_param:
        return [c for c in ins[0] if c in out and c not in ins[1]]
    return []


# Why the sequence split needs offering only where the batch cannot take its axes (exact):
# let T map an assignment of the stage's strategies to another by moving, in every tensor, the
# mesh axes that split a token dim other than the batch (the sequence) onto the batch dim.
# Where the microbatch divides by all the axes T puts on it, T(A) is offered (every rule
# enumerates every letter-to-axes assignment that divides) and costs no more than A:
#   - a matmul with a weight: its local problem (m = local batch x local sequence, n, k), its
#     output bytes and the axes its weight gradient is partial over (the batch's and the
#     sequence's alike, all-reduced as data parallelism's) are unchanged; so are followers,
#     whose compute depends on the local size only, and every memory term (local bytes);
#   - an edge: per mesh axis, T keeps whether the axis splits the tensor, so each gather of
#     the conversion stays a gather of the same bytes, and a move between two token dims (an
#     all-to-all) becomes no move; a view or slice that breaks a sequence split (gathering it)
#     keeps a batch split as its major dim; Megatron-SP's fused gather is priced no dearer
#     than the plain one;
#   - sdpa: the batch split computes at the price the sequence split is floored to, with no
#     communication (rules/attention.py).
# So min over the full set = min over the set without sequence splits the batch could take.
# tests/unit/test_context_parallel.py checks the equality on solved stages.
def _seq_split_redundant(batch_like: list[str], letters: dict[str, int], sizes: dict[str, int], mesh: Mesh) -> bool:
    rest = 0
    for c in batch_like[1:]:
        rest |= letters.get(c, 0)
    return bool(rest) and sizes[batch_like[0]] % mesh.factor(letters.get(batch_like[0], 0) | rest) == 0


def splits_sequence(node: OpNode, strategy_name: str) -> bool:
    """Whether the strategy named `strategy_name` is a context-parallel option of `node`: a
    matmul with a weight splitting one of its activation's later batch-like letters (the
    sequence), or an sdpa splitting its sequence ("s"). These are exactly the options context
    parallelism added to the space; the planner solves a layer again without them where its
    optimum uses one (search/layer_solver.py). Read from the name ("b@0,s@1+cp:ring",
    "k@1+rs:n@1:parts": the split letters are those before the first suffix), so the stage
    builder's cached strategy names serve."""
    if node.kind == ATTENTION:
        seq = ["s"]
    elif node.kind == MATMUL and "equation" in node.attrs and len(node.operands) >= 2:
        ins, out = parse_equation(node.attrs["equation"])
        seq = batch_like_letters(ins, out, node)[1:]
    else:
        return False
    split = strategy_letters(strategy_name)
    return any(c in split for c in seq)


def matmul_strategies(node: OpNode, mesh: Mesh, cm: ComputeModel, prune_seq: bool = True) -> list[Strategy]:
    """`prune_seq`: offer a split of the activation's later batch-like letters (the sequence)
    only where its first (the batch) cannot take those axes (exact: see above)."""
    ins, out = parse_equation(node.attrs["equation"])
    sizes = _letter_sizes(ins, node)
    cands = list(dict.fromkeys("".join(ins) + out))
    batch_like = batch_like_letters(ins, out, node)
    live = mesh.live_axes
    strategies = []
    for combo in itertools.product([None, *cands], repeat=len(live)):
        letters: dict[str, int] = {}
        for bit, ch in zip(live, combo):
            if ch is not None:
                letters[ch] = letters.get(ch, 0) | bit
        if any(sizes[ch] % mesh.factor(m) for ch, m in letters.items()):
            continue
        if (len(batch_like) > 1 and any(letters.get(c) for c in batch_like[1:]) and prune_seq
                and _seq_split_redundant(batch_like, letters, sizes, mesh)):
            continue
        variants = _einsum_variants(node, mesh, cm, ins, out, sizes, letters)
        strategies.extend(variants)
        strategies.extend(_per_part(node, mesh, ins, out, letters, variants))
    return strategies


def _per_part(node: OpNode, mesh: Mesh, ins: list[str], out: str, letters: dict[str, int],
              variants: list[Strategy]) -> list[Strategy]:
    """The variants again with the fused output letter split per part, where it is split and
    every part divides."""
    fused = node.attrs.get("fused_parts")
    if not fused:
        return []
    dim, parts = int(fused[0]), tuple(int(x) for x in fused[1])
    c = out[dim]
    axes = letters.get(c, 0)
    if not axes or any(p % mesh.factor(axes) for p in parts) or any(c in t for t in ins[:1]):
        return []
    mask = split_per_part(axes, parts)

    def respec(spec, term: str):
        return tuple(mask if ch == c else x for ch, x in zip(term, spec))

    res = []
    for st in variants:
        in_specs = [respec(sp, t) for sp, t in zip(st.in_specs, ins)]
        for sp in st.in_specs[len(ins):]:                  # a bias, along the last out letter
            in_specs.append(tuple(mask if x == axes and c == out[-1] else x for x in sp) if sp else sp)
        res.append(Strategy(st.name + PER_PART, respec(st.out_spec, out), tuple(in_specs), st.fwd_s, st.bwd_s,
                            st.collectives, st.param_elems_local, st.param_elems_zero, st.out_bytes_local,
                            st.letters))
    return res


def _einsum_variants(node: OpNode, mesh: Mesh, cm: ComputeModel, ins: list[str], out: str,
                     sizes: dict[str, int], letters: dict[str, int]) -> list[Strategy]:
    contracted = [c for c in dict.fromkeys("".join(ins)) if c not in out]
    partial = 0
    for c in contracted:
        partial |= letters.get(c, 0)
    in_specs = [tuple(letters.get(c, 0) for c in term) for term in ins]
    for j in range(len(ins), len(node.operands)):           # bias of a linear: along the last out letter
        o = node.operands[j]
        in_specs.append(tuple(letters.get(out[-1], 0) for _ in o.shape) if o.shape else ())
    out_spec = tuple(letters.get(c, 0) for c in out)

    loc = {c: sizes[c] / mesh.factor(letters.get(c, 0)) if letters.get(c) else sizes[c] for c in sizes}
    a, b = ins[0], ins[1] if len(ins) > 1 else ""
    batch = prod(loc[c] for c in dict.fromkeys(a) if c in b and c in out)
    m = prod(loc[c] for c in dict.fromkeys(a) if c in out and c not in b)
    n = prod(loc[c] for c in dict.fromkeys(b) if c in out and c not in a)
    k = prod(loc[c] for c in contracted)
    out_local = prod(loc[c] for c in out) * dtype_bytes(node.out_dtype)
    fwd = matmul_s(cm, int(m), int(n), int(k), int(batch))
    bwd = 0.0
    for i in range(min(2, len(ins))):
        if is_integer(node.operands[i].dtype):
            continue
        # grad of operand 0: [m,k] = [m,n] x [n,k]; of operand 1: [k,n] = [k,m] x [m,n]
        bwd += matmul_s(cm, int(m), int(k), int(n), int(batch)) if i == 0 else matmul_s(cm, int(k), int(n), int(m), int(batch))

    # Backward: the gradient of an activation operand is a partial sum over the axes that
    # split letters it lacks, all-reduced (shared among the tensor's readers, see Collective).
    grad_ars: list[Collective] = []
    partial_of: dict[int, int] = {}
    for i, term in enumerate(ins[:2]):
        o = node.operands[i]
        others = set(out) | set("".join(t for j, t in enumerate(ins) if j != i))
        pm = 0
        for c in others - set(term):
            pm |= letters.get(c, 0)
        if o.is_param:
            partial_of[i] = pm
        elif o.source is not None and pm and not is_integer(o.dtype):
            grad_local = prod(loc[c] for c in term) * dtype_bytes(o.dtype)
            grad_ars.append(collective(ALL_REDUCE, pm, grad_local, BACKWARD, mesh, operand=i))
    for j in range(len(ins), len(node.operands)):
        if node.operands[j].is_param:
            pm = 0
            for c in out[:-1]:
                pm |= letters.get(c, 0)
            partial_of[j] = pm
    # the backward reads a weight (to form the other operand's gradient), not a bias
    params = param_terms(node, {i: in_specs[i] for i, o in enumerate(node.operands) if o.is_param}, partial_of, mesh,
                         read_in_backward=range(len(ins)))

    def make(name: str, ospec: tuple[int, ...], output_colls: list[Collective]) -> Strategy:
        return Strategy(name, ospec, tuple(in_specs), fwd, bwd, (*output_colls, *grad_ars, *params.collectives),
                        params.elems_local, params.elems_zero, local_out_bytes(node, ospec, mesh), dict(letters))

    base_name = strategy_name(letters)
    variants = [make(base_name, out_spec, [collective(ALL_REDUCE, partial, out_local, FORWARD, mesh)] if partial else [])]
    if partial:
        # Reduce-scatter instead of all-reduce: the output comes out split on its first free
        # letter over the contracted axes (Alpa's / Megatron-SP's variant). Its backward
        # all-gathers the output gradient: every shard of the contraction reads all of it.
        for pos, c in enumerate(out):
            if letters.get(c, 0) == 0 and sizes[c] % mesh.factor(partial) == 0:
                ospec = list(out_spec)
                ospec[pos] = partial
                variants.append(make(base_name + "+rs:" + strategy_name({c: partial}), tuple(ospec),
                                     [collective(REDUCE_SCATTER, partial, out_local, FORWARD, mesh),
                                      collective(ALL_GATHER, partial, out_local, BACKWARD, mesh)]))
                break
    return variants
