"""Attention (sdpa): batch, heads and sequence split over the mesh axes.

Batch and head splits need no communication: each head's queries, keys and values stay on one
device. A sequence split is context parallelism (CP): each rank keeps the queries, keys and
values of its own tokens, and the keys and values travel over the sequence axes, in one of two
ways, named by the strategy's suffix (`CP_SUFFIX`; `cp_of` reads it back):

  +cp:ring       ring attention: n-1 steps per pass, each rank sending its K,V block to its
                 successor while it computes attention against the block in hand. A step takes
                 max(compute, transfer) (collectives.ring_pass_s); the op's compute is the n
                 block steps and its RING_P2P records carry only the exposed rest. Backward
                 passes K,V and the dK,dV accumulators (twice the bytes), then sends dK,dV one
                 more hop home, which nothing overlaps.
  +cp:allgather  all-gather K and V over the sequence axes in forward (not overlapped), again
                 in backward, and reduce-scatter dK, dV.

Causal attention is load balanced (Megatron-CP, torch's context_parallel): the sequence is cut
into 2n chunks and rank r holds chunks r and 2n-1-r, so every ring step computes the same half
block, the FLOPs of a causal (s/n)-long attention; the sequence must divide into 2n chunks.
The layouts stay plain splits of the token dim (spec tokens S0/S1): which tokens a rank holds
costs nothing anywhere else, so the load-balanced chunk order is left to the runtime, which
permutes the token ids, positions and labels of a stage whose causal sdpa is sequence split.

The block compute is priced no faster than the same work in the batch split: a rank's share of
the whole-sequence kernel (the batch split's own kernel where the batch divides). Shorter
kernels are no more efficient per FLOP on any measured curve; the bound keeps a nearest-row
profile lookup from inverting that, and it is what makes the pruning below exact.

Exact pruning (`prune_seq`): the sequence is split only on axes the batch cannot take (the
microbatch does not divide by them, with the batch's own axes). Where it can, the batch split
is at least as good everywhere (see `rules/einsum.py`, "Why the sequence split needs offering
only where the batch cannot take its axes"); here the sequence split costs the batch split's
compute or more, plus communication. Of the two K/V exchanges an op keeps only those not
dominated (same layouts, memory and compute; forward and backward communication both no
cheaper is dropped).

Unfused attention (attrs["impl"] == "unfused", graphs/zoo/attention.py) splits over batch and
heads only, like Megatron's: every (batch, head) is an independent s x s problem, so a split
divides its GEMMs, score passes and kept scores exactly (ComputeModel.unfused_attention_s).
Its kept scores (probabilities, and with dropout the dropped ones and the mask) are part of the
strategy's `out_bytes_local`: the stash counts an op's saved output as saved factor x
out_bytes_local, and an attention op's own output is always kept (sharding/stage_problem.py),
so the scores are stashed, rebuilt under full recomputation, and never cross a stage boundary
(only the [b, h, s, d] output does: boundaries read the node's out_bytes).
"""

from __future__ import annotations

import itertools

from autopar.costmodel.collectives import (
    ALL_GATHER,
    BACKWARD,
    FORWARD,
    REDUCE_SCATTER,
    RING_P2P,
    Collective,
    ring_pass_exposed_s,
)
from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh
from autopar.sharding.rules.common import collective, local_out_bytes, strategy_letters, strategy_name
from autopar.sharding.strategy import Strategy
from graphs.annotate import is_unfused_attention, unfused_score_passes
from graphs.ir import OpNode, dtype_bytes

CP_SUFFIX = "+cp:"
CP_RING, CP_ALLGATHER = "ring", "allgather"
CP_KINDS = (CP_RING, CP_ALLGATHER)


def cp_of(name: str) -> tuple[int, str] | None:
    """(mesh-axes mask of the sequence split, "ring" | "allgather") of an attention strategy
    name, or None for one without context parallelism."""
    if CP_SUFFIX not in name:
        return None
    kind = name.split(CP_SUFFIX, 1)[1]
    if kind not in CP_KINDS:
        raise ValueError(f"attention strategy {name!r}: unknown context-parallel exchange {kind!r} "
                         f"(expected one of {', '.join(CP_KINDS)})")
    letters = strategy_letters(name)
    if not letters.get("s"):
        raise ValueError(f"attention strategy {name!r} names a context-parallel exchange but no sequence split (s@)")
    return letters["s"], kind


def attention_strategies(node: OpNode, mesh: Mesh, cm: ComputeModel, prune_seq: bool = True) -> list[Strategy]:
    """`prune_seq`: as for matmuls (rules/einsum.py)."""
    q, k = node.operands[0], node.operands[1]
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    causal = bool(node.attrs.get("is_causal", False))
    unfused = is_unfused_attention(node)
    out = []
    for combo in itertools.product([None, "b", "h"] if unfused else [None, "b", "h", "s"],
                                   repeat=len(mesh.live_axes)):
        lt: dict[str, int] = {}
        for bit, ch in zip(mesh.live_axes, combo):
            if ch:
                lt[ch] = lt.get(ch, 0) | bit
        mb, mh, ms = lt.get("b", 0), lt.get("h", 0), lt.get("s", 0)
        if b % mesh.factor(mb) or hq % mesh.factor(mh) or hkv % mesh.factor(mh):
            continue
        if ms and s % (mesh.factor(ms) * (2 if causal else 1)):
            continue
        if ms and prune_seq and b % mesh.factor(mb | ms) == 0:
            continue
        spec = (mb, mh, ms, 0)
        bl, hl = b // mesh.factor(mb), hq // mesh.factor(mh)
        specs = tuple(spec if o.source is not None else None for o in node.operands)
        out_bytes = local_out_bytes(node, spec, mesh)
        if unfused:
            fwd, bwd, kept_bytes = unfused_costs(node, bl, hl, cm)
            out.append(Strategy(strategy_name(lt), spec, specs, fwd, bwd, out_bytes_local=out_bytes + kept_bytes,
                                letters=lt))
            continue
        if not ms:
            kernel = fused_kernel(node)
            out.append(Strategy(strategy_name(lt), spec, specs, cm.attention_s(bl, hl, s, d, causal, kernel=kernel),
                                cm.attention_s(bl, hl, s, d, causal, True, kernel=kernel), out_bytes_local=out_bytes,
                                letters=lt))
            continue
        out.extend(_context_parallel(node, mesh, cm, lt, spec, specs, out_bytes))
    return out


def fused_kernel(node: OpNode) -> str:
    """The kernel of a fused attention op: "triton" for the Triton FlashAttention kernel (zoo
    attn=triton), else "flash" (ComputeModel.attention_s)."""
    return "triton" if node.attrs.get("impl") == "triton" else "flash"


def unfused_costs(node: OpNode, batch: int, heads: int, cm: ComputeModel) -> tuple[float, float, float]:
    """(forward s, backward s, kept score bytes) of unfused attention over `batch` sequences and
    `heads` query heads on one device (the local shares of a batch / head split)."""
    q, k = node.operands[0], node.operands[1]
    sq, d, skv = q.shape[2], q.shape[3], k.shape[2]
    if sq != skv:
        raise ValueError(f"{node.name}: unfused attention over {sq} queries and {skv} keys; only self-attention "
                         "(equal lengths) is priced")
    e = dtype_bytes(node.out_dtype)
    dropout = float(node.attrs.get("dropout_p", 0.0) or 0.0) > 0.0
    kept = float(batch) * heads * sq * skv * unfused_score_passes(e, dropout)[2]
    return (cm.unfused_attention_s(batch, heads, sq, d, dropout, elem_bytes=e),
            cm.unfused_attention_s(batch, heads, sq, d, dropout, backward=True, elem_bytes=e), kept)


def _block_compute_s(cm: ComputeModel, b: int, mb: int, ms: int, hl: int, s: int, d: int, causal: bool,
                     mesh: Mesh, backward: bool, kernel: str = "flash") -> float:
    """Compute seconds of one rank's sequence-split attention: n block steps, no faster than
    the same work in the batch split (module doc)."""
    n = mesh.factor(ms)
    bl = b // mesh.factor(mb)
    blocks = n * cm.attention_s(bl, hl, s // n, d, causal, backward, kernel)
    whole = mesh.factor(mb | ms)
    share = cm.attention_s(b // whole, hl, s, d, causal, backward, kernel) if b % whole == 0 else \
        cm.attention_s(bl, hl, s, d, causal, backward, kernel) / n
    return max(blocks, share)


def _context_parallel(node: OpNode, mesh: Mesh, cm: ComputeModel, lt: dict[str, int], spec, specs,
                      out_bytes: float) -> list[Strategy]:
    q, k = node.operands[0], node.operands[1]
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    causal = bool(node.attrs.get("is_causal", False))
    mb, mh, ms = lt.get("b", 0), lt.get("h", 0), lt.get("s", 0)
    n = mesh.factor(ms)
    hl = hq // mesh.factor(mh)
    fwd = _block_compute_s(cm, b, mb, ms, hl, s, d, causal, mesh, False, fused_kernel(node))
    bwd = _block_compute_s(cm, b, mb, ms, hl, s, d, causal, mesh, True, fused_kernel(node))
    # one rank's K and V: the block a ring step passes; n of them are the gathered K, V
    kv_block = 2 * (b // mesh.factor(mb)) * (hkv // mesh.factor(mh)) * (s // n) * d * dtype_bytes(k.dtype)
    axis = mesh.axis(ms)
    name = strategy_name(lt)
    ring = (Collective(RING_P2P, ms, (n - 1) * kv_block, FORWARD, ring_pass_exposed_s(kv_block, axis, fwd / n)),
            Collective(RING_P2P, ms, (n - 1) * 2 * kv_block + kv_block, BACKWARD,
                       ring_pass_exposed_s(2 * kv_block, axis, bwd / n, tail_bytes=kv_block)))
    full = n * kv_block
    gather = (collective(ALL_GATHER, ms, full, FORWARD, mesh), collective(ALL_GATHER, ms, full, BACKWARD, mesh),
              collective(REDUCE_SCATTER, ms, full, BACKWARD, mesh))
    cands = [Strategy(name + CP_SUFFIX + CP_RING, spec, specs, fwd, bwd, ring, out_bytes_local=out_bytes, letters=lt),
             Strategy(name + CP_SUFFIX + CP_ALLGATHER, spec, specs, fwd, bwd, gather, out_bytes_local=out_bytes,
                      letters=lt)]
    return [st for i, st in enumerate(cands) if not any(_dominates(o, st, j < i) for j, o in enumerate(cands) if j != i)]


def _dominates(a: Strategy, b: Strategy, tie_wins: bool) -> bool:
    """`a` makes `b` redundant: same layouts, compute and memory, and communication no dearer
    in forward and in backward (on a tie, the earlier one stays)."""
    le = a.fwd_comm_s <= b.fwd_comm_s and a.bwd_comm_s <= b.bwd_comm_s
    eq = a.fwd_comm_s == b.fwd_comm_s and a.bwd_comm_s == b.bwd_comm_s
    return le and (not eq or tie_wins)
