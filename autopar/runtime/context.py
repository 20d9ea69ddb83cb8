"""Context parallelism (an attention op whose strategy splits the sequence, "+cp:ring" /
"+cp:allgather", sharding.rules.attention): what the runtime runs, and the checks made before
any process starts.

How it runs. On CUDA, a stage whose every op is Megatron's for (dp, cp) (the linears and the
head split the sequence over the cp axis, every attention op exchanges K/V the same way) runs on
PyTorch's engines (runtime.engines): DDP or FSDP2 over the dp x cp ranks, and around each
microbatch torch.distributed.tensor.experimental.context_parallel, which shards the tokens and
the position tables in its head-tail load-balanced order (the plan's causal token order) and
runs ring attention in the flash / memory-efficient kernels ("+cp:ring" rotates K/V with
all-to-all steps, "+cp:allgather" gathers them). Measured on 2 H200s (llama-1b-gqa at 16K
tokens, bf16): 0.99x the plain recipe (bench/runtime_vs_native.py, case llama-1b-gqa-16k:cp:1),
loss and gradients within 3e-7 of one process in fp32.

Everywhere else (CPU, where the numerics are tested with gloo; CP in pipelines or beside
tensor parallelism), the stage runs on the op-by-op program
(runtime.program.StageModule._context_parallel_attention): each rank's chunk of queries attends
to K and V all-gathered over the sequence axes, under a causal mask built from the chunk's
global positions; the K and V gradients are reduce-scattered back. Loss and gradients equal one
process's (tests/integration/test_runtime_context_parallel.py). It is the reference path, not a
fast one: contiguous chunks rather than the load-balanced order, and the all-gather exchange for
ring strategies too. torch's engine cannot serve the CPU tests: it swaps only the CUDA attention
kernels (flash, memory-efficient, cuDNN); on CPU it stops with "Operator
aten._scaled_dot_product_flash_attention_for_cpu.default does not have a sharding strategy
registered" (seen on torch 2.13).
"""

from __future__ import annotations

from autopar.plan import Plan
from autopar.sharding.spec import AXES, parse_spec
from graphs.ir import OpGraph
from graphs.query import stage_nodes

from .program import NotAppliableError, context_parallel_axes


def _axes(mask: int) -> str:
    axes = [str(k) for k in range(mask.bit_length()) if mask >> k & 1]
    return "mesh axis " + axes[0] if len(axes) == 1 else "mesh axes " + "+".join(axes)


def _fix(plan: Plan, n: int) -> str:
    """How to re-plan without a sequence split: microbatches the stage's devices divide, where
    the planner splits the batch and offers no sequence split (rules.attention, `prune_seq`)."""
    gb = plan.training.global_batch
    ks = [k for k in range(1, gb + 1) if gb % k == 0 and (gb // k) % n == 0]
    if ks:
        return (f"or re-plan with microbatches of a multiple of {n} sequences (e.g. `autopar plan {plan.model.name} "
                f"... --global-batch {gb} --microbatches {max(ks)}`), where the planner splits the batch instead")
    return f"or re-plan with a global batch that is a multiple of {n}, where the planner splits the batch instead"


def check_context_parallel(plan: Plan, ir: OpGraph) -> None:
    """NotAppliableError, naming the stage, the op and its layout, for a context-parallel
    attention op the runtime cannot run: an unknown K/V exchange, q/k/v not split over the
    sequence on the strategy's axes, or a sequence those axes do not divide evenly."""
    for s in plan.stages:
        ops = {o["name"]: o for o in s.ops}
        mesh = tuple(s.logical_mesh)
        lo, hi = s.layers
        mine = {n: ops[n] for n in stage_nodes(ir, (lo, hi)) if n in ops}
        try:
            found = context_parallel_axes(mine, ir)
        except NotAppliableError as e:
            raise NotAppliableError(f"stage {s.index}: {e}") from None
        for name, mask in found.items():
            op, node = mine[name], ir.node(name)
            strategy, specs = op.get("strategy"), op.get("in_specs") or []
            where = (f"stage {s.index} op {name} (context parallel: strategy {strategy!r}, in_specs {specs}, "
                     f"the sequence over {_axes(mask)} of the {mesh[0]}x{mesh[1]} mesh)")
            if len(specs) < 3 or any(not sp or len(parse_spec(sp)) != 4 or parse_spec(sp)[2] & AXES != mask
                                     for sp in specs[:3]):
                raise NotAppliableError(f"{where}: q, k and v must each split dim 2 (the sequence) over exactly "
                                        f"{_axes(mask)}; the plan's specs disagree with its strategy. Re-evaluate "
                                        f"the plan (autopar evaluate) {_fix(plan, len(s.device_ids))}")
            n = 1
            for a in range(len(mesh)):
                n *= mesh[a] if mask >> a & 1 else 1
            seq = node.operands[0].shape[2]
            if seq % n:
                raise NotAppliableError(f"{where}: the sequence of {seq} tokens does not split evenly over {n} "
                                        f"devices; use a sequence length that is a multiple of {n} "
                                        f"{_fix(plan, len(s.device_ids))}")
