"""Collectives by alpha-beta (ring algorithms), and point-to-point transfers.

All times in seconds, sizes in bytes. `nbytes` of a collective is the size of the full tensor
each rank holds after an all-reduce / all-gather (i.e. n x the shard).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ..hardware.mesh import MeshAxis
from ..hardware.specs import Link

ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, ALL_TO_ALL = "all_reduce", "all_gather", "reduce_scatter", "all_to_all"
# Ring attention's K/V exchange: each rank passes a block to its successor, n-1 times per pass.
# A Collective of this kind carries only the *exposed* seconds (`ring_pass_exposed_s`), as the
# transfers overlap the attention compute of the block in hand.
RING_P2P = "ring_p2p"
# When a collective runs: in an op's forward or backward (every microbatch), or once per step
# after the last backward (gradient sync, ZeRO's gather of the updated weights).
FORWARD, BACKWARD, STEP = "forward", "backward", "step"
# Why: moving activations or their gradients, synchronising weight gradients (ZeRO 0/1), or
# ZeRO-2/3's sharded gradients and weights.
ACTIVATION, GRAD_SYNC, ZERO = "activation", "grad_sync", "zero"
ALL_ZERO_LEVELS = (0, 1, 2, 3)


@dataclass(frozen=True, slots=True)
class Collective:
    """One collective an op issues, priced on its mesh. `nbytes` is the full tensor (the
    convention above); `mask` the mesh axes of its group (1 axis 0, 2 axis 1, 3 both as one
    group). `zero` lists the ZeRO levels under which it runs. `operand`: for the backward
    all-reduce of an activation operand's gradient, that operand (the readers of one tensor
    sum their partial gradients before one all-reduce, so a stage shares it among them)."""

    kind: str
    mask: int
    nbytes: float
    phase: str
    time_s: float
    purpose: str = ACTIVATION
    zero: tuple[int, ...] = ALL_ZERO_LEVELS
    operand: int = -1


def collective_s(kind: str, nbytes: float, axis: MeshAxis) -> float:
    return _PRICE[kind](nbytes, axis)


# ---- collectives -----------------------------------------------------------------------------

def all_reduce_s(nbytes: float, axis: MeshAxis) -> float:
    """Ring all-reduce: 2(n-1) steps, each rank moves 2(n-1)/n of the buffer."""
    n = axis.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) * axis.latency_s + 2 * (n - 1) / n * nbytes / axis.bandwidth_bytes_per_s


def all_reduce_share_s(nbytes: float, of_bytes: float, axis: MeshAxis) -> float:
    """`nbytes`' share of one ring all-reduce of `of_bytes` (>= nbytes; inf: of an unbounded
    buffer): their bandwidth term and nbytes / of_bytes of its latency."""
    n = axis.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) * axis.latency_s * nbytes / of_bytes + 2 * (n - 1) / n * nbytes / axis.bandwidth_bytes_per_s


def all_gather_s(nbytes: float, axis: MeshAxis) -> float:
    """Ring all-gather to a `nbytes` result: half an all-reduce."""
    n = axis.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) * axis.latency_s + (n - 1) / n * nbytes / axis.bandwidth_bytes_per_s


def reduce_scatter_s(nbytes: float, axis: MeshAxis) -> float:
    """Ring reduce-scatter of a `nbytes` input: half an all-reduce."""
    return all_gather_s(nbytes, axis)


def all_to_all_s(nbytes: float, axis: MeshAxis) -> float:
    """All-to-all of a tensor of `nbytes` in total over the group: each rank holds nbytes/n
    and sends (n-1)/n of it, i.e. (n-1)/n^2 * nbytes per rank."""
    n = axis.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) * axis.latency_s + (n - 1) / (n * n) * nbytes / axis.bandwidth_bytes_per_s


def ring_step_s(block_bytes: float, axis: MeshAxis) -> float:
    """One ring step: every rank sends a `block_bytes` block to its successor while receiving
    one from its predecessor (full-duplex links, all ranks at once): one latency and one block
    over the axis' per-GPU bandwidth."""
    if axis.size <= 1 or block_bytes <= 0:
        return 0.0
    return axis.latency_s + block_bytes / axis.bandwidth_bytes_per_s


def ring_pass_s(block_bytes: float, axis: MeshAxis, step_compute_s: float, tail_bytes: float = 0.0) -> float:
    """Wall time of a ring pass over an axis of n ranks: n compute steps on the block in hand,
    the transfer of the next block overlapped with each of the first n-1 (so each of those
    steps takes max(compute, transfer)), then `tail_bytes` sent one more hop with nothing to
    overlap (ring attention's backward returns the accumulated dK, dV blocks home)."""
    return max(axis.size, 1) * step_compute_s + ring_pass_exposed_s(block_bytes, axis, step_compute_s, tail_bytes)


def ring_pass_exposed_s(block_bytes: float, axis: MeshAxis, step_compute_s: float, tail_bytes: float = 0.0) -> float:
    """Of `ring_pass_s`, the seconds beyond the n compute steps: per overlapped step
    max(compute, transfer) - compute, and the tail hop."""
    n = axis.size
    if n <= 1:
        return 0.0
    return (n - 1) * max(0.0, ring_step_s(block_bytes, axis) - step_compute_s) + ring_step_s(tail_bytes, axis)


def p2p_s(nbytes: float, link: Link) -> float:
    if nbytes <= 0:
        return 0.0
    return link.latency_s + nbytes / link.bandwidth_bytes_per_s


_PRICE = {ALL_REDUCE: all_reduce_s, ALL_GATHER: all_gather_s, REDUCE_SCATTER: reduce_scatter_s,
          ALL_TO_ALL: all_to_all_s}


# ---- overlap with compute ----------------------------------------------------------------------

# fitted: the compute's slowdown per second of collective hidden behind it (device-bound GPT
# fsdp2 rows of the H200 corpus, `bench/truth/predict.py --fit`; eager.py's docstring says how).
# NCCL's kernels share the SMs and HBM with the compute, so hidden is not free. One concept for
# every overlapped collective: FSDP2's prefetched gathers (eager.fsdp_block_comm_s) and the
# data-parallel gradient buckets below.
COMM_OVERLAP_SLOWDOWN = 0.521


def comm_overlap_s(hidden_comm_s: float) -> float:
    """The compute's slowdown while `hidden_comm_s` of collectives run beside it: NCCL's kernels
    take SMs and HBM bandwidth, and FSDP2's copy-in / copy-out kernels run on its streams."""
    return COMM_OVERLAP_SLOWDOWN * hidden_comm_s


# ---- the data-parallel gradient sync as engines run it -----------------------------------------
# No engine all-reduces one gradient at a time: each packs the gradients into buckets in the
# order the backward makes them (last layer first) and all-reduces a bucket at a time, on one
# communication stream. The engines of today launch a bucket as soon as its last gradient is made,
# beside the rest of the backward, so only what the remaining backward does not cover is exposed;
# older ones reduce after the backward, all of it exposed. Per engine (GRAD_SYNC_ENGINES):
#
# PyTorch DDP ("ddp", `autopar run`'s engine for data parallelism, the eager recipe):
# bucket_cap_mb=25, i.e. 25 MiB per bucket (torch/nn/parallel/distributed.py), overlapped. Its
# buckets hold the parameters' dtype, fp32 under autocast's fp32 master weights: twice the bytes
# of the graph's bf16 gradients (the H200 ddp rows' NCCL time, 17-19 ms per billion parameters on
# 2 GPUs, is the fp32 all-reduce's: bench/calibration/FINDINGS.md section 10).
DDP = "ddp"
DDP_BUCKET_BYTES = 25 * 2**20
DDP_REDUCE_BYTES_FACTOR = 2.0
# Megatron-Core's DistributedDataParallel with --overlap-grad-reduce ("megatron-core", the fused
# engines' model and autopar's default): bucket_size defaults to max(40_000_000, 1_000_000 x dp
# size) parameters (megatron/core/distributed/distributed_data_parallel_config.py: "larger DP
# sizes need larger buckets to ensure collectives do not become latency-bound"), overlapped,
# reduced in the gradients' dtype (grad_reduce_in_fp32 defaults to False).
MEGATRON_CORE = "megatron-core"
MEGATRON_BUCKET_PARAMS = 40_000_000
MEGATRON_BUCKET_PARAMS_PER_DP_RANK = 1_000_000
# Megatron-LM before Megatron-Core ("megatron-local", --DDP-impl local, its default, 2019-2022):
# every gradient of a dtype in one flat buffer, all-reduced after the backward
# (megatron/model/distributed.py, allreduce_gradients / allreduce_params, called by train_step
# after the backward): one bucket, not overlapped.
MEGATRON_LOCAL = "megatron-local"
# DeepSpeed's pipeline engine (Megatron-DeepSpeed, "deepspeed"): after the schedule, ZeRO-1/2's
# reduce in buckets of reduce_bucket_size = 500_000_000 elements (DeepSpeed's default;
# PipelineEngine._exec_reduce_grads), not overlapped.
DEEPSPEED = "deepspeed"
DEEPSPEED_BUCKET_PARAMS = 500_000_000
GRAD_SYNC_ENGINES = (DDP, MEGATRON_CORE, MEGATRON_LOCAL, DEEPSPEED)


def zero_gathers_per_unit(engine: str) -> bool:
    """Whether `engine` runs ZeRO-2/3's gathers and reduce-scatters one flat buffer per unit
    (a transformer block), prefetched beside the compute (the evaluator's `zero_units`), as
    PyTorch FSDP and FSDP2 do (llm-foundry, torchtitan, `autopar run`) and Megatron-Core's
    FSDP; else one collective per parameter tensor, exposed: DeepSpeed's ZeRO-3 of the
    Megatron-DeepSpeed era fetches each submodule's parameters at that submodule's hook
    (PartitionedParameterCoordinator.fetch_sub_module), a collective per module's tensors."""
    _check_engine(engine)
    return engine != DEEPSPEED


def default_grad_sync_engine(eager: bool) -> str:
    """The engine a plan runs on: PyTorch DDP for the eager recipe, else Megatron-Core's."""
    return DDP if eager else MEGATRON_CORE


def _check_engine(engine: str) -> None:
    if engine not in GRAD_SYNC_ENGINES:
        raise ValueError(f"unknown gradient sync engine {engine!r}; known: {', '.join(GRAD_SYNC_ENGINES)}")


def grad_bucket_bytes(engine: str, dp_size: int, grad_bytes_per_param: float) -> float:
    """Bytes of one full gradient bucket of `engine` on a data-parallel group of `dp_size`
    ranks, in the bytes the bucket's collective moves (constants above; inf: one bucket)."""
    _check_engine(engine)
    if engine == DDP:
        return float(DDP_BUCKET_BYTES)
    if engine == MEGATRON_LOCAL:
        return math.inf
    if engine == DEEPSPEED:
        return DEEPSPEED_BUCKET_PARAMS * grad_bytes_per_param
    return max(MEGATRON_BUCKET_PARAMS, MEGATRON_BUCKET_PARAMS_PER_DP_RANK * dp_size) * grad_bytes_per_param


def grad_reduce_factor(engine: str) -> float:
    """The bytes a gradient bucket moves per byte of the graph's (training-dtype) gradients."""
    _check_engine(engine)
    return DDP_REDUCE_BYTES_FACTOR if engine == DDP else 1.0


def grad_sync_overlaps(engine: str) -> bool:
    """Whether `engine` launches a bucket beside the backward (else after it)."""
    _check_engine(engine)
    return engine in (DDP, MEGATRON_CORE)


@dataclass(frozen=True, slots=True)
class Bucket:
    """One gradient bucket: when its last gradient is made (seconds from the start of the
    backward that makes it), its group's mesh-axes mask, and the bytes its all-reduce moves."""

    ready_s: float
    mask: int
    nbytes: float


def fill_buckets(grads: Iterable[tuple[float, int, float]], bucket_bytes: dict[int, float],
                 end_s: float) -> list[Bucket]:
    """Buckets of gradients `(made_s, mask, nbytes)` given in the order the backward makes them:
    each process group (mask) fills its own bucket, which closes when it reaches
    `bucket_bytes[mask]` (a gradient is never split: a larger one fills a bucket alone, as in
    DDP and Megatron-Core); what is left closes at `end_s`, the end of the backward."""
    open_bytes: dict[int, float] = {}
    out: list[Bucket] = []
    for made_s, mask, nbytes in grads:
        if nbytes <= 0:
            continue
        held = open_bytes.get(mask, 0.0) + nbytes
        if held >= bucket_bytes[mask]:
            out.append(Bucket(made_s, mask, held))
            held = 0.0
        open_bytes[mask] = held
    out += [Bucket(end_s, m, b) for m, b in open_bytes.items() if b > 0]
    return out


def stream_end_s(jobs: Iterable[tuple[float, float]]) -> float:
    """When one stream that runs jobs `(ready_s, seconds)` in order of readiness, each as soon
    as it is ready and the stream is free, finishes them all (0 for none)."""
    end = -math.inf
    for ready_s, dur_s in sorted(jobs):
        end = max(end, ready_s) + dur_s
    return end if math.isfinite(end) else 0.0


def overlapped_sync_s(jobs: Iterable[tuple[float, float]], end_s: float) -> tuple[float, float]:
    """(exposed, hidden) seconds of collectives `(ready_s, seconds)` on one stream beside
    compute that ends at `end_s`: exposed is how long the stream runs past it. Every job is
    ready by `end_s`, so from then on the stream is busy until it finishes, and what ran
    before `end_s` is the rest."""
    jobs = list(jobs)
    total = sum(d for _, d in jobs)
    if not jobs:
        return 0.0, 0.0
    if max(r for r, _ in jobs) > end_s + 1e-12 * max(1.0, end_s):
        raise ValueError(f"a collective is ready at {max(r for r, _ in jobs)} s, after the compute ends at {end_s} s")
    exposed = max(0.0, stream_end_s(jobs) - end_s)
    return exposed, max(0.0, total - exposed)
