"""Running a plan on torch.distributed (DESIGN §9).

    from autopar.runtime import apply
    pm = apply(plan)                  # on every rank of a process group of plan.n_devices ranks
    loss = pm.step(batch)             # forward + backward over the global batch, optimizer step

`autopar run PLAN.json` launches the processes, trains a few steps, and compares the measured
step time with the plan's prediction (and, with --check, the numerics with one process).
"""

from .apply import ParallelModel, apply, build_model, check_plan_matches, make_batch, rank_layout
from .program import NotAppliableError

__all__ = ["apply", "ParallelModel", "NotAppliableError", "build_model", "check_plan_matches", "make_batch",
           "rank_layout"]
