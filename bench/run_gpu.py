"""Run one-GPU plans through autopar.runtime and hold the measured step time against the plan's
prediction.

For each microbatch size b: the Megatron plan (dp 1, tp 1, pp 1, one microbatch of b, so the
global batch is b) of a GPT that fills the GPU, evaluated on the cluster preset (dgx-h100), run
with `autopar.runtime.launch.run_plan` (one spawned process, nccl-free single device, autocast
in the plan's dtype, fused Adam, fp32 master weights), `--check` style: the same steps also run
as a plain PyTorch loop in one process, which gives the plain step time and the numeric diff.

    PYTHONPATH=. python3 bench/run_gpu.py --out bench/results/run_h100.json
    [--model gpt-1.3b] [--microbatches 1,2,4,8] [--steps 6] [--cluster dgx-h100]

Results are rewritten after every row, so a run cut short still leaves the rows it finished.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path


def plan_json(model: str, cluster: str, mb: int) -> str:
    from autopar.evaluation.baselines import Config3D, build_3d
    from autopar.hardware.presets import load_cluster
    from autopar.model import ModelSource
    cl = load_cluster(cluster, 1, 1)
    return build_3d(ModelSource(model), cl, mb, Config3D(1, 1, 1, mb)).to_json()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt-1.3b")
    ap.add_argument("--cluster", default="dgx-h100")
    ap.add_argument("--microbatches", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=6, help="per plan; the first is warm-up")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to try the script with a tiny model")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    import torch

    from autopar.runtime.launch import run_plan
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"what": "autopar run of 1-GPU Megatron plans (dp1 tp1 pp1, one microbatch per step): measured step "
                   "time (median after a warm-up step) vs the plan's predicted step_time_s; reference = the same "
                   "steps as a plain PyTorch loop in one process",
           "model": a.model, "cluster": a.cluster, "steps": a.steps,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "torch": torch.__version__, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "rows": []}
    print(f"{'mb':>3} {'predicted s':>12} {'measured s':>11} {'meas/pred':>9} {'plain torch s':>13} "
          f"{'runtime/plain':>13} {'mem GiB':>8} {'pred GiB':>8} {'|loss diff|':>11}", flush=True)
    for mb in [int(x) for x in a.microbatches.split(",")]:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "plan.json"
            path.write_text(plan_json(a.model, a.cluster, mb))
            try:
                r = run_plan(str(path), steps=a.steps, device=a.device, check=True, timeout_s=600)
            except Exception as e:  # noqa: BLE001 - an OOM at a large microbatch ends that row only
                doc["rows"].append({"microbatch": mb, "error": f"{type(e).__name__}: {str(e)[-2000:]}"})
                out_path.write_text(json.dumps(doc, indent=1))
                print(f"{mb:>3} failed: {str(e).strip().splitlines()[-1][:200]}", flush=True)
                continue
        row = {"microbatch": mb, "global_batch": r["global_batch"], "precision": r["precision"],
               "predicted_step_time_s": r["predicted_step_time_s"], "measured_step_time_s": r["measured_step_time_s"],
               "measured_over_predicted": r["measured_step_time_s"] / r["predicted_step_time_s"],
               "step_times_s": r["step_times_s"], "reference_step_time_s": r["reference_step_time_s"],
               "runtime_over_reference": r["measured_step_time_s"] / r["reference_step_time_s"],
               "max_memory_bytes": r.get("max_memory_bytes"),
               "predicted_peak_memory_bytes": r.get("predicted_peak_memory_bytes"),
               "losses": r["losses"], "reference_losses": r["reference_losses"],
               "max_abs_loss_diff": r["max_abs_loss_diff"], "max_abs_grad_diff": r["max_abs_grad_diff"],
               "wall_s": time.perf_counter() - t0}
        doc["rows"].append(row)
        out_path.write_text(json.dumps(doc, indent=1))
        gib = 2 ** 30
        print(f"{mb:>3} {row['predicted_step_time_s']:>12.4f} {row['measured_step_time_s']:>11.4f} "
              f"{row['measured_over_predicted']:>9.2f} {row['reference_step_time_s']:>13.4f} "
              f"{row['runtime_over_reference']:>13.3f} {(row['max_memory_bytes'] or 0) / gib:>8.1f} "
              f"{(row['predicted_peak_memory_bytes'] or 0) / gib:>8.1f} {row['max_abs_loss_diff']:>11.2e}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
