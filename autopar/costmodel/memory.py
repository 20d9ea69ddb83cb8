"""Memory per device: parameter and optimizer state under ZeRO, and the activations in flight
under a pipeline schedule. Bytes throughout.

Mixed-precision Adam keeps 16 bytes per parameter: a bf16/fp16 weight (2) and gradient (2),
and fp32 master weight, first and second moments (12). ZeRO shards, over the data-parallel
degree, the optimizer state (ZeRO-1), also the gradients (ZeRO-2), also the weights (ZeRO-3).
"""

from __future__ import annotations

import numpy as np

ADAM_BYTES_PER_PARAM = 16       # bf16 weight 2 + bf16 grad 2 + fp32 master, m, v 12
ADAM_STEP_BYTES = 30            # bytes moved per updated parameter by one Adam step


def param_state_bytes(param_elems: float, param_elems_zero: float, zero: int) -> float:
    """Weights, gradients and Adam state of `param_elems` local parameters, of which
    `param_elems_zero` remain per device once sharded over the data-parallel degree."""
    e, ez = param_elems, param_elems_zero
    if zero <= 0:
        return ADAM_BYTES_PER_PARAM * e
    if zero == 1:
        return 4 * e + 12 * ez
    if zero == 2:
        return 2 * e + 14 * ez
    return ADAM_BYTES_PER_PARAM * ez


def inflight(schedule: str, stage_index: int, n_stages: int, n_microbatches: int, chunks: int = 1) -> float:
    """Microbatches whose activations a stage holds at its peak: all of them under GPipe,
    (stages after it + 1) under 1F1B, and under interleaved 1F1B the warm-up forwards plus the
    first steady-state one, counted in whole-stage stashes (each of the v chunks holds 1/v)."""
    if schedule == "gpipe":
        return float(n_microbatches)
    if schedule == "interleaved":
        total = n_microbatches * chunks
        warm = min((n_stages - stage_index - 1) * 2 + (chunks - 1) * n_stages, total)
        return min(warm + 1, total) / chunks
    return float(min(n_stages - stage_index, n_microbatches))



RECOMPUTE = ("none", "selective", "full")


def stash_after_recompute(recompute: str, stash_bytes, layer_input_bytes=0.0, attention_core_stash_bytes=0.0,
                          recomputed_stash_bytes=None):
    """Activations one microbatch in flight keeps for its backward, from the stash without
    recomputation. "none": all of it. "selective" (Korthikanti et al.): without the attention
    core's saves (the [s, s] scores, rebuilt in backward). "full": only its layers' inputs; with
    `recomputed_stash_bytes` (Megatron's block method: some of the layers recomputed, the rest
    kept), the kept layers' stash, `stash_bytes` less the recomputed ones', plus the recomputed
    layers' inputs (`layer_input_bytes`). With every layer recomputed the two agree to the bit
    (x - x is 0). Floats or numpy arrays alike."""
    if recompute == "full":
        if recomputed_stash_bytes is None:
            return layer_input_bytes
        return stash_bytes - recomputed_stash_bytes + layer_input_bytes
    if recompute == "selective":
        return stash_bytes - attention_core_stash_bytes
    if recompute != "none":
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    return stash_bytes


def working_after_recompute(recompute: str, max_layer_stash_bytes=0.0):
    """Transient activations on top of the stashes: full recomputation rebuilds one layer's
    stash at a time during backward, so the largest recomputed layer's stash (a kept layer's
    stash of the microbatch being backwarded is freed before the recomputed layers, which come
    first in the stage, are rebuilt)."""
    return max_layer_stash_bytes if recompute == "full" else 0.0


def stage_working_bytes(recompute_working_bytes, loss_peak_bytes=0.0, block_buffer_bytes=0.0):
    """A stage's transient activations on top of its stashes under the eager recipe: the fp32
    loss tensors peak at the start of the loss backward and the recomputed layer later, so
    not at once (the larger of the two); FSDP2's block buffers come on top of either (summed:
    conservative, the gpt-6.7b mb8 row needs it). Floats or numpy arrays alike (the planner's
    tables and the evaluator both use this)."""
    return np.maximum(recompute_working_bytes, loss_peak_bytes) + block_buffer_bytes


def activation_bytes(inflight, stash_bytes, working_bytes):
    """A stage's activations at its peak: `inflight` microbatches' stashes (after
    recomputation) plus the working set."""
    return inflight * stash_bytes + working_bytes
