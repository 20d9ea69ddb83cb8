"""Recomputing some of a stage's blocks (Megatron's --recompute-method block --recompute-num-layers
N), measured against the eager cost model's prediction (issue 15: per-layer recomputation).

    python bench/recompute_layers.py                      # 2 GPUs: llama-1b-gqa, dp2 mb4, N = 0, 4, 8, 12, 16
    python bench/recompute_layers.py --device cpu --quick # 2 gloo processes, a tiny model (a smoke test)
    python bench/recompute_layers.py --report bench/results/recompute_layers_h200.json  # no GPU: the stored
        # measurements against today's model

Each plan is build_3d's Megatron plan with full recomputation of the first N blocks (N = 0 is no
recomputation), run by `autopar run` for a few steps; printed: the eager model's predicted step
time and peak allocated memory per GPU against the measured ones. Time should grow and memory
fall about linearly in N. Rows go to bench/results/recompute_layers_<gpu>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_1B = "llama:hidden=2048,layers=16,heads=16,kv_heads=4,seq=2048,vocab=32000"
TINY = "llama:hidden=64,layers=4,heads=4,kv_heads=2,seq=32,vocab=128"


def plan_for(model: str, n_layers: int | None, micro: int, cluster: str, n_gpus: int):
    from autopar.evaluation.baselines import Config3D, build_3d
    from autopar.evaluation.evaluator import evaluate
    from autopar.hardware.presets import load_cluster
    from autopar.model import ModelSource
    cl = load_cluster(cluster, 1, n_gpus)
    cfg = (Config3D(n_gpus, 1, 1, micro) if n_layers == 0 else
           Config3D(n_gpus, 1, 1, micro, recompute="full", recompute_num_layers=n_layers))
    src = ModelSource(model)
    plan = build_3d(src, cl, 2 * n_gpus * micro, cfg)
    eager = evaluate(plan, src.graph(plan.training.microbatch_size), cl, eager=True).prediction
    return plan, eager


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="a tiny model (with --device cpu: a smoke test)")
    p.add_argument("--micro", type=int, default=4, help="sequences per GPU per microbatch")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default="")
    p.add_argument("--report", help="a stored rows file: predict its plans with the current model (no GPU)")
    a = p.parse_args(argv)
    if a.report:
        if not Path(a.report).is_file():
            p.error(f"--report {a.report}: no such file")
        try:
            stored = json.loads(Path(a.report).read_text())
            meta, stored_rows = stored["meta"], stored["rows"]
            model, micro, gpus = meta["model"], meta["micro"], meta["gpus"]
        except (ValueError, KeyError, TypeError) as e:
            p.error(f"--report {a.report}: not a file this script wrote ({type(e).__name__}: {e})")
        rows = []
        for r in stored_rows:
            _, eager = plan_for(model, r["recompute_num_layers"], micro, "dgx-h200", gpus)
            rows.append({**r, "predicted_step_s": eager.step_time_s,
                         "predicted_allocated_bytes": eager.peak_allocated_bytes})
        print(f"{a.report} ({meta.get('gpu')}, torch {meta.get('torch')}, {meta.get('date')}) "
              "against the current model:")
        _table(rows)
        return 0
    from autopar.runtime.launch import run_plan
    model = TINY if a.quick else LLAMA_1B
    layers = (0, 2, 4) if a.quick else (0, 4, 8, 12, 16)
    cluster = "dgx-h200" if a.device == "cuda" else "p3.16xlarge"
    rows = []
    for n in layers:
        plan, eager = plan_for(model, n, a.micro, cluster, 2)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "plan.json"
            path.write_text(plan.to_json())
            out = run_plan(str(path), steps=a.steps, device=a.device,
                           precision="bf16" if a.device == "cuda" else "fp32")
        row = {"recompute_num_layers": n, "plan": plan.config.label if plan.config else plan.strategy,
               "measured_step_s": out["measured_step_time_s"], "predicted_step_s": eager.step_time_s,
               "measured_allocated_bytes": out.get("max_memory_bytes"),
               "predicted_allocated_bytes": eager.peak_allocated_bytes, "engines": out["engines"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    _table(rows)
    if a.device == "cuda" or a.out:
        import torch
        gpu = torch.cuda.get_device_name(0).split()[-1].lower() if a.device == "cuda" else "cpu"
        meta = {"gpu": gpu, "torch": torch.__version__, "model": model, "gpus": 2, "micro": a.micro,
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "argv": " ".join(sys.argv[1:] if argv is None else argv)}
        path = Path(a.out or ROOT / "bench" / "results" / f"recompute_layers_{gpu}.json")
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


def _table(rows: list[dict]) -> None:
    print(f"\n{'N':>3} {'measured ms':>12} {'predicted ms':>13} {'err':>7} {'measured GiB':>13} {'predicted GiB':>14} "
          f"{'err':>7}")
    for r in rows:
        ma, pa = r["measured_allocated_bytes"], r["predicted_allocated_bytes"]
        mem = (f"{ma / 2**30:13.2f} {pa / 2**30:14.2f} {pa / ma - 1:+7.1%}" if ma and pa else f"{'-':>13} {'-':>14} {'':>7}")
        print(f"{r['recompute_num_layers']:>3} {r['measured_step_s'] * 1e3:12.1f} {r['predicted_step_s'] * 1e3:13.1f} "
              f"{r['predicted_step_s'] / r['measured_step_s'] - 1:+7.1%} {mem}")


if __name__ == "__main__":
    sys.exit(main())
