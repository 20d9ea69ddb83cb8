"""Helpers the per-op rules share: strategy names, local output bytes, and the collectives and
memory terms of an op's own parameters."""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from autopar.costmodel.collectives import (
    ACTIVATION,
    ALL_GATHER,
    ALL_REDUCE,
    ALL_ZERO_LEVELS,
    BACKWARD,
    FORWARD,
    GRAD_SYNC,
    REDUCE_SCATTER,
    STEP,
    ZERO,
    Collective,
    all_reduce_share_s,
    collective_s,
    default_grad_sync_engine,
    grad_bucket_bytes,
)
from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh
from autopar.sharding.spec import Spec, axes_mask, axes_str, shard_factor
from graphs.ir import NORM, SOFTMAX, VIEW, OpNode, dtype_bytes, numel

GRAD_BYTES = 2          # gradients reduced in the training dtype (bf16/fp16)


def strategy_name(letters: Mapping[str, int]) -> str:
    """"b@0,n@1": index letter b split over mesh axis 0, n over axis 1 ("@01": both). "R": none."""
    return ",".join(f"{c}@{axes_str(m)}" for c, m in sorted(letters.items()) if m) or "R"


def strategy_letters(name: str) -> dict[str, int]:
    """The inverse of `strategy_name`: the letters a strategy splits and their mesh-axes masks.
    Suffixes ("+rs:n@1", ":parts", "+cp:ring") are not letters of the op's own split."""
    base = name.split("+", 1)[0].split(":", 1)[0]
    return {c: axes_mask(m) for c, m in (tok.split("@", 1) for tok in base.split(",") if "@" in tok)}


def collective(kind: str, mask: int, nbytes: float, phase: str, mesh: Mesh, purpose: str = ACTIVATION,
               zero: tuple[int, ...] = ALL_ZERO_LEVELS, operand: int = -1) -> Collective:
    """A collective over the mesh axes in `mask`, priced on `mesh`."""
    return Collective(kind, mask, nbytes, phase, collective_s(kind, nbytes, mesh.axis(mask)), purpose, zero, operand)


# The rules price the same local kernels again and again: one GEMM or elementwise shape recurs
# on every mesh that splits it alike, and on every microbatch of a layer class. ComputeModel's
# figures are pure functions of the model (a frozen GPU and dtype) and the arguments, so the
# rules remember them: 0.2 us a repeat against 1.1 us of roofline arithmetic (ComputeModel
# itself keeps only the GEMM efficiencies and the profile's constants).
@lru_cache(maxsize=200_000)
def matmul_s(cm: ComputeModel, m: int, n: int, k: int, batch: int = 1) -> float:
    """cm.matmul_s(m, n, k, batch), remembered."""
    return cm.matmul_s(m, n, k, batch)


@lru_cache(maxsize=200_000)
def memory_bound_s(cm: ComputeModel, nbytes: float, flops: float = 0.0, kernel: str = "add") -> float:
    """cm.memory_bound_s(nbytes, flops, kernel), remembered."""
    return cm.memory_bound_s(nbytes, flops, kernel)


# activations priced on the profile's gelu rows (erf / exp per element, not an add's stream)
ACTIVATION_OPS = frozenset({"gelu", "silu", "tanh", "sigmoid", "relu", "erf", "exp"})


def memory_kernel(node: OpNode) -> str:
    """The profile's memory-bound kernel (hardware.profiles.MEMORY_BOUND_KERNELS) an op is priced on."""
    if node.kind == NORM:
        return "layernorm"
    if node.kind == SOFTMAX:
        return "softmax"
    if node.kind == VIEW:
        return "copy"
    if node.op in ACTIVATION_OPS:
        return "gelu"
    return "add"


def backward_kernel(kernel: str) -> str:
    """The profile's kernel an op's backward is priced on: its own backward's rows for an
    activation or a norm (their backwards read two tensors and reduce), the forward's kind for
    the rest (an add's gradient is a copy or nothing; a copy's, a copy)."""
    return f"{kernel}_backward" if kernel in ("gelu", "layernorm") else kernel


def is_integer(dtype: str) -> bool:
    return dtype.startswith("int") or dtype == "bool"


def local_out_bytes(node: OpNode, spec: Spec, mesh: Mesh) -> float:
    if not node.out_shapes:
        return 0.0
    b = dtype_bytes(node.out_dtype)
    return sum(numel(s) * b / (shard_factor(spec, mesh) if len(spec) == len(s) else 1) for s in node.out_shapes)


@dataclass(frozen=True)
class ParamTerms:
    collectives: tuple[Collective, ...]
    elems_local: float
    elems_zero: float


def param_terms(node: OpNode, param_specs: Mapping[int, Spec], partial_mask_of: Mapping[int, int],
                mesh: Mesh, read_in_backward: Container[int] | None = None) -> ParamTerms:
    """Memory and the weight-gradient collectives of the op's parameters. A parameter whose
    gradient is a partial sum over mesh axes (they split letters it lacks) is all-reduced over
    them once per step (ZeRO 0/1: an all-reduce already is ZeRO-1's reduce-scatter + all-gather
    of the updated shard). ZeRO-2 reduce-scatters the gradient every microbatch and
    all-gathers the updated weights once per step. ZeRO-3 all-gathers the weight for the
    forward, again for the backward if the backward reads it (`read_in_backward`: operand
    indices, None for all; a bias or an embedding table is not read), and reduce-scatters the
    gradient. Memory and the per-step terms belong to the op owning the parameter; ZeRO-3's
    gathers happen at every use (a tied embedding and head gather the table twice)."""
    colls: list[Collective] = []
    elems = elems_zero = 0.0
    for i, spec in param_specs.items():
        o = node.operands[i]
        local = numel(o.shape) / shard_factor(spec, mesh)
        partial = partial_mask_of.get(i, 0)
        if o.owns_param:
            elems += local
            elems_zero += local / (mesh.factor(partial) if partial else 1)
        if not partial:
            continue
        grad, weight = local * GRAD_BYTES, local * dtype_bytes(o.dtype)
        if o.owns_param:
            # The gradient sync runs in the default engine's buckets (collectives.py, "the
            # data-parallel gradient sync"): this gradient's share of a full bucket's all-reduce,
            # not an all-reduce (and a latency) of its own. The evaluator and the planner's
            # tables schedule the buckets beside the backward (evaluator.grad_sync_buckets).
            axis = mesh.axis(partial)
            bucket = grad_bucket_bytes(default_grad_sync_engine(False), axis.size, GRAD_BYTES)
            colls += [Collective(ALL_REDUCE, partial, grad, STEP, all_reduce_share_s(grad, max(bucket, grad), axis), GRAD_SYNC,
                                 (0, 1)),
                      collective(REDUCE_SCATTER, partial, grad, BACKWARD, mesh, ZERO, (2,)),
                      collective(ALL_GATHER, partial, weight, STEP, mesh, ZERO, (2,))]
        colls.append(collective(ALL_GATHER, partial, weight, FORWARD, mesh, ZERO, (3,)))
        if read_in_backward is None or i in read_in_backward:
            colls.append(collective(ALL_GATHER, partial, weight, BACKWARD, mesh, ZERO, (3,)))
        colls.append(collective(REDUCE_SCATTER, partial, grad, BACKWARD, mesh, ZERO, (3,)))
    return ParamTerms(tuple(colls), elems, elems_zero)


def prod(xs: Iterable[float]) -> float:
    p = 1.0
    for x in xs:
        p *= x
    return p
