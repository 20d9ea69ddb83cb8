"""A rank body for autopar.runtime.launch._launch that runs one training step of a plan under
torch.profiler and counts the collectives each rank issued (the c10d ops the profiler records),
with the step's full gradients, for tests that check how often an engine synchronises."""

from __future__ import annotations

from collections import Counter
from typing import Any


def count_collectives_body(rank: int, world: int, local_rank: int, cfg: Any) -> dict | None:
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from autopar.plan import Plan
    from autopar.runtime.apply import build_model, make_batch
    from autopar.runtime.engines import apply

    plan = Plan.from_json(cfg.plan_json)
    device = torch.device("cpu")
    pm = apply(plan, build_model(plan, device=device, seed=cfg.seed), device=device, optimizer="sgd", lr=0.0)
    batch = make_batch(plan, 0, cfg.seed)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss = pm.forward_backward(batch)
    counts = Counter(e.name for e in prof.events() if e.name.startswith("c10d::"))
    grads = pm.full_grads()
    mine = {"counts": dict(counts), "loss": None if loss is None else float(loss), "grads": grads}
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return {"ranks": gathered} if rank == 0 else None
