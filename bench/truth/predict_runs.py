"""`autopar run`'s own measured steps against the eager cost model (issue 13: "once the runtime
matches the native recipes, measure its runs too, and hold them to the same bars").

    python bench/truth/predict_runs.py [bench/results/runtime_vs_native_h200.json]
    python bench/truth/predict_runs.py --fit      # HOST_COMPILED_S_PER_BLOCK from its fit rows

Each autopar row of bench/runtime_vs_native.py's results (2 H200s, bf16) is planned again as
that benchmark made it (`make_plan`: build_3d for a strategy, autopar.plan for auto / auto-eager)
and priced with `evaluate(..., eager=True)`, the model of the eager engines `autopar run` uses.
Printed: measured and predicted step time and peak reserved memory, and their errors
((predicted - measured) / measured). Rows run with torch.compile per block are priced so (the
row's `compile`, `evaluate(..., compiled=...)`; autocast/eager.py "compiled blocks") and listed
apart, the GPT ones at microbatch 1 as the fit of HOST_COMPILED_S_PER_BLOCK (`--fit`), the
others held out. An auto row whose plan the planner no longer makes (it changed since the row
was measured) is skipped.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench/results/runtime_vs_native_h200.json"


def compiled_fit_row(row: dict) -> bool:
    """The rows HOST_COMPILED_S_PER_BLOCK is fitted on: compiled GPT rows at microbatch 1, whose
    step the host bounds (the default model's device time is a sixth to a third of the step)."""
    return bool(row.get("compile")) and row["model"].startswith("gpt") and row["microbatch"] == 1


def predict(row: dict) -> dict:
    import runtime_vs_native as bench

    import graphs
    from autopar.evaluation.evaluator import evaluate
    from autopar.hardware.presets import load_cluster
    from autopar.model import ModelSource

    spec = next((k for k, v in bench.NAMES.items() if v == row["model"]), row["model"])
    plan = bench.make_plan(spec, row["strategy"], row["microbatch"], 2, "dgx-h200")
    cl = load_cluster("dgx-h200", 1, 2)
    graph = ModelSource(spec).graph(plan.training.microbatch_size) if ":" in spec else \
        graphs.load(spec, batch=plan.training.microbatch_size)
    p = evaluate(plan, graph, cl, eager=True, compiled=bool(row.get("compile"))).prediction
    m = row["autopar"]
    label = plan.config.label or plan.strategy
    if label != row.get("plan"):
        return {"model": row["model"], "strategy": row["strategy"], "microbatch": row["microbatch"],
                "skipped": f"the planner now makes {label!r}, the row ran {row.get('plan')!r}"}
    return {"model": row["model"], "strategy": row["strategy"], "microbatch": row["microbatch"],
            "compiled": bool(row.get("compile")), "fit": compiled_fit_row(row),
            "plan": plan.config.label or plan.strategy, "n_microbatches": plan.training.n_microbatches,
            "n_blocks": len(graph.layers) - 2, "predicted_host_s": p.host_s,
            "measured_step_s": m["step_time_s"], "predicted_step_s": p.step_time_s,
            "step_error": p.step_time_s / m["step_time_s"] - 1,
            "measured_reserved_bytes": m["peak_reserved_bytes"], "predicted_reserved_bytes": p.peak_reserved_bytes,
            "memory_error": p.peak_reserved_bytes / m["peak_reserved_bytes"] - 1}


def fit(rows: list[dict]) -> float:
    """HOST_COMPILED_S_PER_BLOCK: on the fit rows (`compiled_fit_row`), the host seconds per
    compiled block and microbatch at which the predicted host time is the measured step (the
    host time is linear in it: the model's host at the constant less its blocks' share)."""
    from autopar.costmodel import eager
    k = eager.HOST_COMPILED_S_PER_BLOCK
    implied = [(r["measured_step_s"] - (r["predicted_host_s"] - k * r["n_microbatches"] * r["n_blocks"]))
               / (r["n_microbatches"] * r["n_blocks"]) for r in rows if r["fit"]]
    return statistics.median(implied)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fitting = "--fit" in argv
    argv = [a for a in argv if a != "--fit"]
    doc = json.loads(Path(argv[0] if argv else RESULTS).read_text())
    rows = [predict(r) for r in doc["rows"] if "autopar" in r and r["autopar"].get("engines")]
    for r in rows:
        if "skipped" in r:
            print(f"skipped {r['model']} {r['strategy']} mb{r['microbatch']}: {r['skipped']}")
    rows = [r for r in rows if "skipped" not in r]
    if fitting:
        print(f"HOST_COMPILED_S_PER_BLOCK = {fit(rows):.3e}")
        return 0
    print(f"{'model':18} {'strategy':11} {'mb':>3} {'comp':>4} {'meas ms':>8} {'pred ms':>8} {'err':>7} "
          f"{'meas GiB':>8} {'pred GiB':>8} {'err':>7}")
    for r in rows:
        print(f"{r['model']:18} {r['strategy']:11} {r['microbatch']:>3} {'yes' if r['compiled'] else 'no':>4} "
              f"{r['measured_step_s'] * 1e3:8.1f} {r['predicted_step_s'] * 1e3:8.1f} {r['step_error']:+7.1%} "
              f"{r['measured_reserved_bytes'] / 2**30:8.1f} {r['predicted_reserved_bytes'] / 2**30:8.1f} "
              f"{r['memory_error']:+7.1%}")
    parts = (("all", rows), ("eager", [r for r in rows if not r["compiled"]]),
             ("compiled", [r for r in rows if r["compiled"]]),
             ("comp fit", [r for r in rows if r["fit"]]), ("comp held", [r for r in rows if r["compiled"] and not r["fit"]]))
    for name, part in parts:
        if part:
            t = [abs(r["step_error"]) for r in part]
            mem = [abs(r["memory_error"]) for r in part]
            short = sum(r["memory_error"] < 0 for r in part)
            print(f"{name:9} rows {len(part):2}: time median {statistics.median(t):.1%} max {max(t):.1%}; "
                  f"memory median {statistics.median(mem):.1%} max {max(mem):.1%}; predicted short {short}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
