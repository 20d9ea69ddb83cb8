"""Running a plan on torch.distributed (DESIGN §9).

    from autopar.runtime import apply
    pm = apply(plan)                  # on every rank of a process group of plan.n_devices ranks
    loss = pm.step(batch)             # forward + backward over the global batch, optimizer step

apply lowers the plan to PyTorch's own engines (DDP, FSDP2, tensor parallel, pipelining; see
runtime.engines) where its layouts match one, and otherwise runs the fx/DTensor program of
runtime.apply, with a warning that names the stage and op.

`autopar run PLAN.json` launches the processes, trains a few steps, and compares the measured
step time with the plan's prediction (and, with --check, the numerics with one process).
"""

from .apply import ParallelModel, build_model, check_plan_matches, make_batch, rank_layout
from .engines import EngineMismatch, EngineModel, apply
from .program import NotAppliableError

__all__ = ["apply", "ParallelModel", "EngineModel", "EngineMismatch", "NotAppliableError", "build_model",
           "check_plan_matches", "make_batch", "rank_layout"]
