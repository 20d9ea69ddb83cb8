"""Plan a small GPT for 4 devices, then run the plan: 4 processes (gloo on CPU, or nccl on 4 GPUs),
a few training steps, measured vs predicted step time, and the loss and gradients compared with
one process.

    python examples/run_plan.py                 # CPU, 4 processes
    python examples/run_plan.py --device cuda   # needs 4 GPUs

The command line does the same with a plan file:

    autopar plan gpt:hidden=64,layers=4,heads=4,seq=32,vocab=128 --nodes 1 --gpus-per-node 4 \\
        --global-batch 8 -o plan.json
    autopar run plan.json --device cpu --check

Inside your own training script (started by torchrun, one process per device of the plan):

    from autopar.runtime import apply, make_batch
    pm = apply(plan, model, device=device)      # this rank's stage, meshes and shardings
    for step in range(n):
        loss = pm.step(make_batch(plan, step))  # forward + backward + optimizer step; the loss on the
                                                # last stage's ranks, None elsewhere
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import autopar
from autopar.runtime.launch import run_plan

MODEL = "gpt:hidden=64,layers=4,heads=4,seq=32,vocab=128"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()

    plan = autopar.plan(a.model, "p3.16xlarge", nodes=1, gpus_per_node=4, global_batch=8)
    print(f"plan: {plan.config.label}, predicted step time {plan.predicted.step_time_s * 1e3:.2f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plan.json"
        plan.to_json(path)
        out = run_plan(str(path), steps=a.steps, device=a.device, check=True)
    print(f"measured {out['measured_step_time_s'] * 1e3:.1f} ms per step on {out['n_processes']} {a.device} "
          f"processes (the prediction is for the plan's {plan.cluster.gpu} GPUs)")
    print(f"loss per step {[f'{x:.5f}' for x in out['losses']]}")
    print(f"vs one process: max |loss diff| {out['max_abs_loss_diff']:.2e}, "
          f"max |grad diff| {out['max_abs_grad_diff']:.2e} over {out['n_grads_compared']} gradients")


if __name__ == "__main__":      # run_plan spawns processes, which re-import this file
    main()
