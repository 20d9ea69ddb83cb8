"""What an eager PyTorch training step costs beyond the transformer ops' roofline (issue 13).

Each term was missing from the per-op model and is found in the measured H200 corpus
(bench/results/truth_h200_2026-11-30.json; bench/truth/README.md describes the buckets).
The setting is the common recipe: bf16 autocast, fp32 master weights and gradients, fused
AdamW, the zoo's cross-entropy on fp32 logits. Constants marked "fitted" come from the GPT
rows of the corpus only (`python bench/truth/predict.py --fit` recomputes them); the Llama rows
are held out to check them.

Time:
- optimizer: fused AdamW moves 28 B per parameter (reads fp32 weight, grad, m, v; writes
  weight, m, v) at 3.47 TB/s on H200 (optimizer bucket of every row: 3.3-3.5 TB/s), 0.79 of the
  same GPU's streaming `add` bandwidth; other GPUs take the same share of theirs.
- cross-entropy in fp32: `F.cross_entropy` on bf16 logits upcasts them (read 2, write 4 B per
  logit), log-softmax (4 + 4), and in backward the NLL gradient (4), the log-softmax gradient
  (4 + 4 + 4) and the cast back (4 + 2): 36 B per logit element.
- precision casts: autocast casts every fp32 weight to bf16 once per autocast region (read 4,
  write 2 B per parameter; the step's one region holds all its microbatches), every
  microbatch's bf16 weight gradient is cast to fp32 (2 + 4) and, after the first microbatch,
  added into `.grad` (4 + 4 + 4): the "~18 B/param per microbatch" of the pp rows.
- autocast's fp32 residual stream: autocast runs layer_norm (and rms_norm) in fp32, so the
  norms read and write fp32 and so do the residual adds that take their fp32 outputs back
  (+2 B read and +2 B written per element each over the bf16 the graph assumes), and every
  linear fed by a norm casts its input to bf16 itself (read 4, write 2). The backward moves
  about twice the forward's bytes (fp32 gradients through the norms, the casts' gradients and
  their fp32 sum). Per element of a norm's output: 3 x (4 + 4 + 6 x linear consumers) B. On
  the GPT rows this is the blocks' gap: gpt-1.3b mb8 16 ms measured vs 13 ms, gpt-6.7b mb8
  41 vs 37 ms.
- DDP's gradient buckets: DistributedDataParallel copies every fp32 gradient into its
  all-reduce bucket (read 4, write 4 B per parameter; the ddp rows' "other" bucket, 2.5 ms per
  billion parameters, is 8.7 B per parameter at the AdamW bandwidth).
- host dispatch: eager PyTorch launches every op from Python; a step whose GPU work is short
  waits on the CPU. A linear (autocast casts, matmul, bias, and in backward two matmuls, the
  grad cast and accumulation) costs HOST_S_PER_LINEAR fitted on host-bound GPT rows; every
  other op the profile's eager launch overhead forward and again backward. DTensor tensor
  parallelism and FSDP2 add per-block host costs (fitted). The step takes max(host, device)
  on one GPU (the host runs ahead across steps); in a pipeline every microbatch's forward and
  backward take max(host, device), since the next stage waits on them.

Memory:
- cross-entropy: at the start of the loss backward the fp32 log-softmax output (saved, 4 B),
  its gradient (4) and the gradient of the logits (4) are live: 12 B per logit element. (In a
  one-microbatch step the fp32 weight gradients, 4 B per parameter, do not exist yet at that
  point, which the model's 16 B per parameter counts; that slack covers the GPT stashes it
  undercounts, ~10% at mb16. The recomputed rows measure 10.7-13.4 B per logit without it.)
- DDP's buckets hold a second fp32 copy of every gradient (4 B per parameter;
  gradient_as_bucket_view is off by default): ddp rows allocate 4.0-7.5 B per parameter more
  than single-GPU rows of the same model and microbatch.
- autocast's weight cache: one autocast region around several microbatches (a pipeline's
  schedule step) keeps the bf16 copy of every weight for the whole step (2 B per parameter).
- caching allocator: peak reserved exceeds peak allocated by up to RESERVE_FRACTION (fitted
  envelope of (reserved - allocated) / allocated over the GPT rows); FSDP2, whose all-gather and
  reduce-scatter streams keep pools of their own, by up to RESERVE_ZERO3_FRACTION (envelope of
  the GPT fsdp2 rows except fsdp2-gpt-1.3b-s1024-mb1, whose reserved is 2.0x its allocated
  memory, 17 GiB more, unexplained; there the model's peak is 50% short).
- outside the allocator: the CUDA context (0.77 GiB measured on every GPU) and NCCL's
  communicators and buffers (0.8-1.25 GiB measured with 2 GPUs: ddp/fsdp2 0.82, tp 0.94-1.19,
  pp 1.25).
"""

from __future__ import annotations

from .compute import ComputeModel

GIB = 2**30

# -- time -------------------------------------------------------------------------------------
ADAMW_BYTES_PER_PARAM = 28
ADAMW_BYTES_PER_S_H200 = 3.47e12          # fitted: optimizer bucket, GPT single/ddp rows (median)
STREAM_BYTES_PER_S_H200 = 4.384e12        # the H200 profile's streaming `add` bandwidth
ADAMW_STREAM_SHARE = ADAMW_BYTES_PER_S_H200 / STREAM_BYTES_PER_S_H200

CROSS_ENTROPY_BYTES_PER_LOGIT = 36        # fp32 upcast, log-softmax, their backward (see doc)
NORM_FP32_BYTES_PER_ELEMENT = 8          # norm and its residual add in fp32: +4 B each, forward
INPUT_CAST_BYTES_PER_ELEMENT = 6         # a linear's fp32 input cast to bf16, forward
AUTOCAST_BACKWARD_FACTOR = 2             # backward bytes per forward byte of these
WEIGHT_CAST_BYTES_PER_PARAM = 6           # fp32 weight -> bf16 copy, once per step
GRAD_CAST_BYTES_PER_PARAM = 6             # bf16 grad -> fp32 .grad (first microbatch)
GRAD_ACCUMULATE_BYTES_PER_PARAM = 18      # cast + .grad += (every later microbatch)

DDP_BUCKET_COPY_BYTES_PER_PARAM = 8

HOST_S_PER_LINEAR = 3.60e-4               # fitted: host-bound GPT single-GPU rows (fwd + bwd)
HOST_FORWARD_SHARE = 0.212                 # fitted: profiled host time, blocks fwd / (fwd + bwd), median
HOST_TP_S_PER_BLOCK = 1.04e-2             # fitted: GPT tp2 rows, DTensor dispatch per block
HOST_FSDP_S_PER_BLOCK = 5.51e-3            # fitted: GPT fsdp2 rows, FSDP2 hooks per block

# -- memory -----------------------------------------------------------------------------------
CROSS_ENTROPY_PEAK_BYTES_PER_LOGIT = 12
DDP_BUCKET_BYTES_PER_PARAM = 4
AUTOCAST_CACHE_BYTES_PER_PARAM = 2
RESERVE_FRACTION = 0.129                  # fitted envelope: (reserved - allocated) / allocated
RESERVE_ZERO3_FRACTION = 0.246            # fitted envelope of the GPT fsdp2 rows but one (see above)
CUDA_CONTEXT_BYTES = 0.77 * GIB
NCCL_BYTES = 1.25 * GIB


def optimizer_s(updated_params: float, cm: ComputeModel) -> float:
    """Fused AdamW over `updated_params` parameters (those this GPU updates)."""
    if updated_params <= 0:
        return 0.0
    return ADAMW_BYTES_PER_PARAM * updated_params / (cm.stream_bytes_per_s * ADAMW_STREAM_SHARE)


def cross_entropy_s(logits: float, cm: ComputeModel) -> float:
    """fp32 cross-entropy, forward and backward, over `logits` elements on this GPU."""
    return cm.memory_bound_s(CROSS_ENTROPY_BYTES_PER_LOGIT * logits) if logits > 0 else 0.0


def precision_casts_s(local_params: float, n_microbatches: int, cm: ComputeModel) -> float:
    """Per microbatch, on average: autocast's bf16 copies of the weights (once per step), the
    fp32 cast of the weight gradients, and their accumulation into `.grad` after the first
    microbatch."""
    if local_params <= 0:
        return 0.0
    b = max(1, n_microbatches)
    per_param = (WEIGHT_CAST_BYTES_PER_PARAM + GRAD_CAST_BYTES_PER_PARAM
                 + GRAD_ACCUMULATE_BYTES_PER_PARAM * (b - 1)) / b
    return per_param * local_params / (cm.stream_bytes_per_s * ADAMW_STREAM_SHARE)


def autocast_fp32_stream_s(norm_elements: float, linear_consumers: int, cm: ComputeModel) -> tuple[float, float]:
    """(forward, backward) seconds of one norm's fp32 traffic under autocast: the norm and its
    residual add in fp32, and the bf16 casts of its output by `linear_consumers` linears."""
    fwd_bytes = norm_elements * (NORM_FP32_BYTES_PER_ELEMENT + INPUT_CAST_BYTES_PER_ELEMENT * linear_consumers)
    bw = cm.stream_bytes_per_s * ADAMW_STREAM_SHARE
    return fwd_bytes / bw, AUTOCAST_BACKWARD_FACTOR * fwd_bytes / bw


def grad_bucket_copy_s(synced_params: float, cm: ComputeModel) -> float:
    """DDP's copy of the gradients of `synced_params` parameters into its buckets."""
    return DDP_BUCKET_COPY_BYTES_PER_PARAM * synced_params / cm.stream_bytes_per_s if synced_params > 0 else 0.0


def host_s(n_linears: int, n_other_ops: int, n_blocks: int, tp: bool, fsdp: bool,
           cm: ComputeModel) -> tuple[float, float]:
    """(forward, backward) host dispatch seconds of one microbatch through a stage."""
    total = (n_linears * HOST_S_PER_LINEAR + n_other_ops * 2 * cm.launch_s
             + n_blocks * ((HOST_TP_S_PER_BLOCK if tp else 0.0) + (HOST_FSDP_S_PER_BLOCK if fsdp else 0.0)))
    return total * HOST_FORWARD_SHARE, total * (1 - HOST_FORWARD_SHARE)


def state_bytes(local_params: float, ddp_buckets: bool, n_microbatches: int) -> float:
    """Bytes held for the whole step beyond weights, gradients and optimizer state: DDP's
    gradient buckets, and autocast's bf16 weight cache when one region spans microbatches."""
    return local_params * ((DDP_BUCKET_BYTES_PER_PARAM if ddp_buckets else 0)
                           + (AUTOCAST_CACHE_BYTES_PER_PARAM if n_microbatches > 1 else 0))


def reserved_bytes(allocated_bytes: float, zero3: bool) -> float:
    """What the caching allocator reserves at a peak of `allocated_bytes` allocated."""
    return allocated_bytes * (1 + (RESERVE_ZERO3_FRACTION if zero3 else RESERVE_FRACTION))


def outside_allocator_bytes(n_gpus: int) -> float:
    """CUDA context, and NCCL's communicators and buffers where the plan communicates."""
    return CUDA_CONTEXT_BYTES + (NCCL_BYTES if n_gpus > 1 else 0.0)


def device_peak_bytes(allocated_bytes: float, zero3: bool, n_gpus: int) -> float:
    """A GPU's peak memory: the allocator's reservation at `allocated_bytes` allocated, and what
    lies outside it."""
    return reserved_bytes(allocated_bytes, zero3) + outside_allocator_bytes(n_gpus)
