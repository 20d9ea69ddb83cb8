"""FLOP and byte estimates of one op, computed from its IR fields only.

Because these functions read nothing but an `OpNode`, the cost model can call them again on
sharded shapes. Conventions (also in DESIGN §3):

* matmul-like: 2 FLOPs per multiply-add, i.e. 2 x the product of every index size in
  `attrs["equation"]` (2·m·n·k for a plain matmul); the bias add of `linear` is not counted,
  as in `torch.utils.flop_counter`.
* sdpa: 2·b·hq·sq·skv·d for QK^T plus 2·b·hq·sq·skv·dv for PV (= 4·b·hq·s²·d). A causal mask
  does NOT halve it: that is what FlopCounterMode reports and what dense kernels execute
  (flash kernels skip masked tiles; the cost model may apply that discount, not the graph).
  The softmax inside sdpa is not counted.
* unfused attention (attrs["impl"] == "unfused", graphs/zoo/attention.py): the same GEMM FLOPs
  forward and 2x backward (dP, dV, dQ, dK: four GEMMs, no recompute inside the kernel); its
  bytes add the passes over the score matrix of `unfused_score_passes`.
* elementwise: 1 FLOP per output element; norm and softmax: 5 per element; reduction: 1 per
  input element; cross-entropy: 5 per logit; views, embedding lookups, inputs: 0.
* backward: matmul 1x forward per operand that needs a gradient (so 2x for a linear whose
  input is an activation), attention 2.5x, norm 2x, everything else 1x; embedding backward
  is a scatter-add, 1 FLOP per output element. Ops whose output needs no gradient (integer
  and mask arithmetic, anything fed only by token ids) have 0 backward.
* bytes: forward reads every operand and writes every output, except pure views (0, they
  only rename dims) and embedding (reads only the looked-up rows). Backward reads the output
  gradient and the saved operands and writes a gradient for each operand that needs one.
"""

from __future__ import annotations

from .ir import (
    ATTENTION,
    ELEMENTWISE,
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

BWD_FACTOR = {ATTENTION: 2.5, NORM: 2.0, ELEMENTWISE: 1.0, SOFTMAX: 1.0, REDUCTION: 1.0,
              LOSS: 1.0, UNKNOWN: 1.0}


def equation_sizes(equation: str, shapes: list[tuple[int, ...]]) -> dict[str, int]:
    """Size of every index letter of an einsum equation, from its operands' shapes."""
    lhs = equation.split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for spec, shape in zip(lhs, shapes):
        for letter, size in zip(spec, shape):
            # broadcasting: a dim of size 1 in one operand takes the other's size
            sizes[letter] = max(sizes.get(letter, 1), int(size))
    return sizes


def matmul_flops(equation: str, shapes: list[tuple[int, ...]]) -> float:
    total = 1.0
    for size in equation_sizes(equation, shapes).values():
        total *= size
    n_inputs = len(equation.split("->")[0].split(","))
    return 2.0 * total if n_inputs >= 2 else total


def sdpa_flops(q: tuple[int, ...], k: tuple[int, ...], v: tuple[int, ...]) -> float:
    batch_heads = numel(q[:-2])
    sq, d = q[-2], q[-1]
    skv, dv = k[-2], v[-1]
    return 2.0 * batch_heads * sq * skv * d + 2.0 * batch_heads * sq * skv * dv


UNFUSED = "unfused"


def is_unfused_attention(node: OpNode) -> bool:
    return node.kind == ATTENTION and node.attrs.get("impl") == UNFUSED


def unfused_score_passes(elem_bytes: int, dropout: bool) -> tuple[tuple[float, ...], tuple[float, ...], float]:
    """Bytes per score element of unfused attention's memory-bound kernels, forward and
    backward (one entry per kernel), and the bytes per score element kept for backward, at
    `elem_bytes` per score (2 in fp16/bf16). Kernels as Megatron-LM runs them:
    forward   scale+mask+softmax (fused): read S, write P                  2e
              dropout: read P, write P' and a 1-byte mask                  2e + 1
    backward  dropout: read dP' and the mask, write dP                     2e + 1
              softmax (scale fused): read dP and P, write dS               3e
    kept      P (softmax backward and, without dropout, dV = P^T dO)       e
              with dropout also P' (for dV) and the mask                   + e + 1
    (Korthikanti et al. 2022: 5 bytes per element with dropout in fp16.)"""
    e = float(elem_bytes)
    if dropout:
        return (2 * e, 2 * e + 1), (2 * e + 1, 3 * e), 2 * e + 1
    return (2 * e,), (3 * e,), e


def _unfused_score_elems(node: OpNode) -> float:
    q, k = node.operands[0].shape, node.operands[1].shape
    return float(numel(q[:-1]) * k[-2])


def _unfused_dropout(node: OpNode) -> bool:
    return float(node.attrs.get("dropout_p", 0.0) or 0.0) > 0.0


def _is_noop_cast(node: OpNode) -> bool:
    return node.op == "to" and bool(node.operands) and node.operands[0].dtype == node.out_dtype


def fwd_flops(node: OpNode) -> float:
    kind = node.kind
    if _is_noop_cast(node):
        return 0.0
    out_numel = sum(numel(s) for s in node.out_shapes)
    if kind == MATMUL:
        return matmul_flops(node.attrs["equation"], [o.shape for o in node.operands])
    if kind == ATTENTION:
        q, k, v = (o.shape for o in node.operands[:3])
        return sdpa_flops(q, k, v)
    if kind in (NORM, SOFTMAX):
        return 5.0 * out_numel
    if kind == LOSS:
        return 5.0 * numel(node.operands[0].shape)
    if kind == REDUCTION:
        return float(numel(node.operands[0].shape)) if node.operands else 0.0
    if kind in (ELEMENTWISE, UNKNOWN):
        return float(out_numel)
    return 0.0   # VIEW, EMBEDDING, INPUT, OUTPUT


def fwd_bytes(node: OpNode) -> float:
    kind = node.kind
    if kind in (INPUT, OUTPUT):
        return 0.0
    if (kind == VIEW and not node.attrs.get("copy", False)) or _is_noop_cast(node):
        return 0.0
    if kind == EMBEDDING:
        ids = node.operands[0]
        return float(ids.nbytes + 2 * node.out_bytes)
    total = float(sum(o.nbytes for o in node.operands) + node.out_bytes)
    if is_unfused_attention(node):
        # QK^T writes the scores and PV reads the (dropped) probabilities, beside the passes
        fwd, _, _ = unfused_score_passes(dtype_bytes(node.out_dtype), _unfused_dropout(node))
        total += _unfused_score_elems(node) * (2 * dtype_bytes(node.out_dtype) + sum(fwd))
    return total


def bwd_flops(node: OpNode, grad_operands: list[bool]) -> float:
    """grad_operands[i]: operand i needs a gradient (a parameter, or an activation that does)."""
    if not any(grad_operands) or node.kind in (VIEW, INPUT, OUTPUT):
        return 0.0
    if node.kind == MATMUL:
        return node.fwd_flops * sum(1 for g in grad_operands[:2] if g)
    if node.kind == EMBEDDING:
        return float(sum(numel(s) for s in node.out_shapes))
    if is_unfused_attention(node):
        return 2.0 * node.fwd_flops
    return node.fwd_flops * BWD_FACTOR.get(node.kind, 1.0)


def bwd_bytes(node: OpNode, grad_operands: list[bool]) -> float:
    if not any(grad_operands) or node.kind in (INPUT, OUTPUT):
        return 0.0
    if node.kind == VIEW or _is_noop_cast(node):
        return node.fwd_bytes          # a copy's gradient is a copy back; a view's is free
    if node.kind == EMBEDDING:
        return node.fwd_bytes          # read dY rows, scatter-add them into dW
    grad_out = node.out_bytes
    saved = sum(o.nbytes for o in node.operands)
    grads = sum(o.nbytes for o, g in zip(node.operands, grad_operands) if g)
    if node.kind == MATMUL:
        # one matmul per operand gradient: reads dY and the other operand, writes the grad
        a, b = node.operands[0], node.operands[1]
        total = 0.0
        if grad_operands[0]:
            total += grad_out + b.nbytes + a.nbytes
        if grad_operands[1]:
            total += grad_out + a.nbytes + b.nbytes
        return float(total)
    total = float(grad_out + saved + grads)
    if is_unfused_attention(node):
        # the dP GEMM writes dP, dV's reads P', dQ's and dK's read dS: four score-matrix
        # touches beside the passes
        _, bwd, _ = unfused_score_passes(dtype_bytes(node.out_dtype), _unfused_dropout(node))
        total += _unfused_score_elems(node) * (4 * dtype_bytes(node.out_dtype) + sum(bwd))
    return total


def annotate(node: OpNode, grad_operands: list[bool]) -> OpNode:
    """Fill node.fwd_flops/bwd_flops/fwd_bytes/bwd_bytes in place and return it."""
    node.fwd_flops = fwd_flops(node)
    node.fwd_bytes = fwd_bytes(node)
    node.bwd_flops = bwd_flops(node, grad_operands)
    node.bwd_bytes = bwd_bytes(node, grad_operands)
    return node

