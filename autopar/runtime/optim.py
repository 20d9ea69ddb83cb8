"""The optimizer every runtime path builds (runtime.engines' EngineModel and ShardOptimizer,
runtime.apply's program path): one function, below both, so the engines and the fx/DTensor
program step their parameters alike."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def make_optimizer(params: Sequence[torch.Tensor], kind: str, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam (fused on CUDA and CPU, DTensor parameters included) or SGD. Fused, not foreach, for
    FSDP2's DTensors too: foreach Adam allocates an fp32 temporary the size of the local shard,
    which at the step sits beside FSDP2's reduce-scatter output (the peak of gpt-1.3b ZeRO-3 mb1
    on 2 H200s, bench/results/memory_peaks_h200_2026-12-01_zero3_mb1.txt); torch's DTensor runs
    _fused_adam_ on the local shards in place, and the eager memory model prices no optimizer
    temporaries (as torchtitan and bench/truth's fsdp2 recipe step FSDP2). The same for the
    program path's DTensor parameters and ZeRO-1/2 master shards. DTensor and plain parameters
    (norms under tensor parallelism) go in separate groups: a kernel over a list takes one kind
    only."""
    from torch.distributed.tensor import DTensor
    dtensors = [p for p in params if isinstance(p, DTensor)]
    plain = [p for p in params if not isinstance(p, DTensor)]
    groups = [{"params": g} for g in (dtensors, plain) if g]
    if kind == "adam":
        if device.type in ("cuda", "cpu"):
            return torch.optim.Adam(groups, lr=lr, fused=True)
        return torch.optim.Adam(groups, lr=lr, foreach=True)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {kind!r}")
