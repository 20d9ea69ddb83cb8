"""`autopar run`'s own measured steps against the eager cost model (issue 13: "once the runtime
matches the native recipes, measure its runs too, and hold them to the same bars").

    python bench/truth/predict_runs.py [results.json ...]   # default: the two files below
    python bench/truth/predict_runs.py --fit      # the compiled host constants from their fit rows
    python bench/truth/predict_runs.py --attention-rows bench/results/attention_default_h200_2026-12-01.json
        # what-if: the H200 profile's attention rows replaced by that file's (SDPA's own backend)

Each autopar row of bench/runtime_vs_native.py's results (bench/results/runtime_vs_native_h200.json:
2 H200s; runtime_vs_native_h200_1gpu.json: one H200, plans on one device; bf16) is planned again
on its run's GPUs (the file's meta.runs) as that benchmark made it (`make_plan`: build_3d for a
strategy, autopar.plan for auto / auto-eager) and priced with `evaluate(..., eager=True)`, the
model of the eager engines `autopar run` uses; each file's rows are summarized as their own set.
Printed: measured and predicted step time and peak reserved memory, and their errors
((predicted - measured) / measured). Rows run with torch.compile per block are priced so (the
row's `compile`, `evaluate(..., compiled=...)`; autocast/eager.py "compiled blocks") and listed
apart, the GPT ones at microbatch 1 as the fit of the compiled host constants (`--fit`), the
others held out; HOST_COMPILED_S_PER_BLOCK's fit rows are those whose blocks are split (tp:
DTensor blocks), HOST_COMPILED_PLAIN_S_PER_BLOCK's those whose blocks are not. An auto row
whose plan the planner no longer makes (it changed since the row was measured) is skipped, and so
is one whose label the planner still makes but whose first stage the engines now lay out over
other data- and tensor-parallel degrees than the row's recorded layout (`layout_mismatch`: a
planner label names stages, layers and devices, not the ops' strategies: gpt-6.7b auto-eager mb4
ran the tensor-parallel blocks the planner made then, where it now makes ZeRO-1 data parallelism
under the same label, "1 stage: 34L@1x2").
A row run with DDP is compared with the model's peak with DDP's first buckets in step 2 or
without them, whichever its measured allocated is nearer to (predict.ddp_rebuild_comparison:
the benchmark's syncs leave them there or not), both errors printed beside it.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "truth"))     # predict (the corpus replay), beside this file
# 2 H200s (every strategy, compiled tensor-parallel rows) and one H200 (eager and compiled)
RESULTS = [ROOT / "bench/results/runtime_vs_native_h200.json", ROOT / "bench/results/runtime_vs_native_h200_1gpu.json"]


def split_blocks(row: dict) -> bool:
    """Whether the row's blocks ran with split weights (tensor parallelism: DTensor blocks), by
    the layout the runtime reported."""
    m = re.search(r"\btp=(\d+)", str(row["autopar"].get("layout", "")))
    return bool(m) and int(m.group(1)) > 1


def compiled_fit_row(row: dict) -> str:
    """Which host constant a row fits: the compiled GPT rows at microbatch 1, whose step the
    host bounds (the model's device time is a sixth to a half of the step), fit
    HOST_COMPILED_S_PER_BLOCK where their blocks are split ("split") and
    HOST_COMPILED_PLAIN_S_PER_BLOCK where not and the plan is one GPU's plain module ("plain");
    "" for the others (held out)."""
    if not (row.get("compile") and row["model"].startswith("gpt") and row["microbatch"] == 1):
        return ""
    if split_blocks(row):
        return "split"
    # the plain module on one GPU only: a compiled DDP row's host holds DDP's hooks besides
    return "plain" if str(row.get("plan", "")).startswith("dp1 tp1 pp1 ") else ""


def layout_mismatch(row: dict, plan, graph) -> str:
    """Why the row did not run `plan`'s first stage as the engines would now lay it out, or "":
    its recorded layout's (dp, tp) degrees (`autopar.layout`, rank 0's stage) against
    engines.match_stage of the plan's stage 0. "" where the row recorded none or the engines
    have no layout for the plan."""
    m = re.search(r"\bdp=(\d+), tp=(\d+)", str(row["autopar"].get("layout", "")))
    if not m:
        return ""
    from autopar.runtime.engines import EngineMismatch, match_stage
    try:
        now = match_stage(plan, graph, 0, "llama" if row["model"].startswith("llama") else "gpt")
    except EngineMismatch:
        return ""
    ran = (int(m.group(1)), int(m.group(2)))
    if (now.dp, now.tp) == ran:
        return ""
    return f"its first stage now runs dp={now.dp}, tp={now.tp}; the row ran dp={ran[0]}, tp={ran[1]}"


def plan_and_graph(row: dict, n_gpus: int):
    """The row's plan on `n_gpus` H200s as bench/runtime_vs_native.py made it (`make_plan`), and
    the graph it prices, at the plan's microbatch size."""
    import runtime_vs_native as bench

    import graphs
    from autopar.model import ModelSource

    spec = next((k for k, v in bench.NAMES.items() if v == row["model"]), row["model"])
    # an auto row that records its split is planned at it: the planner can make the row's
    # label at another microbatch size since (gpt-6.7b auto mb4 ran 4 x 4 sequences; with
    # the memory-bound kinds' bandwidths the planner makes the same label at 2 x 8)
    plan = bench.make_plan(spec, row["strategy"], row["microbatch"], n_gpus, "dgx-h200",
                           row.get("plan_n_microbatches", "auto"))
    graph = ModelSource(spec).graph(plan.training.microbatch_size) if ":" in spec else \
        graphs.load(spec, batch=plan.training.microbatch_size)
    return plan, graph


def predict(row: dict, n_gpus: int = 2, alloc_conf: str = "") -> dict:
    """The row's prediction on `n_gpus`, the allocator's reserve as `alloc_conf` (the run's
    PYTORCH_CUDA_ALLOC_CONF, meta.alloc_conf; "": default segments, as rows made before the
    runtime set expandable segments ran) sets it."""
    set_name = f"{n_gpus} GPU" + ("s" if n_gpus > 1 else "")
    from autopar.evaluation.evaluator import evaluate
    from autopar.hardware.presets import load_cluster

    plan, graph = plan_and_graph(row, n_gpus)
    cl = load_cluster("dgx-h200", 1, n_gpus)
    from predict import ddp_rebuild_comparison

    from autopar.costmodel.eager import expandable_segments
    expandable = expandable_segments(alloc_conf)
    p = evaluate(plan, graph, cl, eager=True, compiled=bool(row.get("compile")),
                 expandable_segments=expandable).prediction
    m = row["autopar"]
    # autopar run's DDP rebuilds its buckets in step 2 as native DDP does; the benchmark's syncs
    # leave the first buckets there at step 2's peak or not (predict.ddp_rebuild_comparison)
    rebuild = ddp_rebuild_comparison(
        m["peak_allocated_bytes"], m["peak_reserved_bytes"], p,
        lambda: evaluate(plan, graph, cl, eager=True, compiled=bool(row.get("compile")),
                         ddp_rebuild=False, expandable_segments=expandable).prediction)
    if rebuild and rebuild["compared"] == "without":
        p = rebuild["steady"]
    label = plan.config.label or plan.strategy
    other = layout_mismatch(row, plan, graph)
    if label != row.get("plan") or other:
        return {"model": row["model"], "strategy": row["strategy"], "microbatch": row["microbatch"],
                "skipped": f"the planner now makes {label!r}" + (f" ({other})" if other else "")
                + f", the row ran {row.get('plan')!r}"}
    return {"model": row["model"], "strategy": row["strategy"], "microbatch": row["microbatch"],
            "compiled": bool(row.get("compile")), "fit": compiled_fit_row(row), "set": set_name,
            "plan": plan.config.label or plan.strategy, "n_microbatches": plan.training.n_microbatches,
            "n_blocks": len(graph.layers) - 2, "predicted_host_s": p.host_s,
            "measured_step_s": m["step_time_s"], "predicted_step_s": p.step_time_s,
            "step_error": p.step_time_s / m["step_time_s"] - 1,
            "measured_reserved_bytes": m["peak_reserved_bytes"], "predicted_reserved_bytes": p.peak_reserved_bytes,
            "memory_error": p.peak_reserved_bytes / m["peak_reserved_bytes"] - 1, "row": row, "n_gpus": n_gpus,
            "ddp_rebuild": {k: v for k, v in rebuild.items() if k != "steady"} if rebuild else None}


CONSTANTS = {"split": "HOST_COMPILED_S_PER_BLOCK", "plain": "HOST_COMPILED_PLAIN_S_PER_BLOCK"}


def fit(rows: list[dict], kind: str) -> tuple[float, list[dict]]:
    """The host constant of `kind` (CONSTANTS): on its fit rows (`compiled_fit_row`), the median
    of the host seconds per compiled block and microbatch at which the predicted host time is
    the measured step (the host time is linear in it: the model's host at the constant less its
    blocks' share). With it, the rows' predicted device time (the step at a zero constant),
    which must lie below the measured step for the row to identify the constant."""
    from autopar.costmodel import eager
    name = CONSTANTS[kind]
    k = getattr(eager, name)
    implied, lines = [], []
    for r in rows:
        if r["fit"] != kind:
            continue
        calls = r["n_microbatches"] * r["n_blocks"]
        implied.append((r["measured_step_s"] - (r["predicted_host_s"] - k * calls)) / calls)
        setattr(eager, name, 0.0)
        try:
            device_s = predict(r["row"], r["n_gpus"])["predicted_step_s"]
        finally:
            setattr(eager, name, k)
        lines.append({"row": f"{r['set']} {r['model']} {r['strategy']} mb{r['microbatch']}",
                      "measured_step_s": r["measured_step_s"], "device_s": device_s, "calls": calls,
                      "implied_s": implied[-1]})
    return statistics.median(implied), lines


def use_attention_rows(path: Path, profile: str = "h200.json") -> None:
    """A what-if: price attention with `path`'s rows (a bench/results attention file) instead
    of the shipped profile's, in this process only."""
    from autopar.costmodel import compute
    from autopar.hardware.profiles import load_gpu_profile

    rows = json.loads(path.read_text())["rows"]
    prof = load_gpu_profile(profile)
    assert prof is not None, profile
    prof["attention"] = [{k: r[k] for k in ("dtype", "batch", "heads", "seq", "head_dim", "causal", "fwd_s", "bwd_s")}
                         for r in rows]
    compute._attention_eff.cache_clear()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    fitting = "--fit" in argv
    if "--attention-rows" in argv:
        i = argv.index("--attention-rows")
        use_attention_rows(Path(argv[i + 1]))
        del argv[i:i + 2]
    paths = [Path(a) for a in argv if a != "--fit"] or RESULTS
    rows = []
    for path in paths:
        doc = json.loads(path.read_text())
        meta = doc.get("meta", {})
        runs, gpus = meta.get("runs", {}), meta.get("gpus", 2)
        for r in doc["rows"]:
            if "autopar" in r and r["autopar"].get("engines"):
                run = runs.get(r.get("run"), meta)          # the row's run's meta, else the file's
                rows.append(predict(r, run.get("gpus", gpus), run.get("alloc_conf", "")))
    for r in rows:
        if "skipped" in r:
            print(f"skipped {r['model']} {r['strategy']} mb{r['microbatch']}: {r['skipped']}")
    rows = [r for r in rows if "skipped" not in r]
    if fitting:
        for kind, name in CONSTANTS.items():
            if any(r["fit"] == kind for r in rows):
                value, lines = fit(rows, kind)
                print(f"{name} = {value:.3e}")
                for x in lines:
                    print(f"  {x['row']}: measured {x['measured_step_s'] * 1e3:.1f} ms, device "
                          f"{x['device_s'] * 1e3:.1f} ms, {x['calls']} block calls, implied "
                          f"{x['implied_s'] * 1e3:.2f} ms")
        return 0
    print(f"{'set':6} {'model':18} {'strategy':11} {'mb':>3} {'comp':>4} {'meas ms':>8} {'pred ms':>8} {'err':>7} "
          f"{'meas GiB':>8} {'pred GiB':>8} {'err':>7}")
    for r in rows:
        d = r["ddp_rebuild"]
        print(f"{r['set']:6} {r['model']:18} {r['strategy']:11} {r['microbatch']:>3} "
              f"{'yes' if r['compiled'] else 'no':>4} "
              f"{r['measured_step_s'] * 1e3:8.1f} {r['predicted_step_s'] * 1e3:8.1f} {r['step_error']:+7.1%} "
              f"{r['measured_reserved_bytes'] / 2**30:8.1f} {r['predicted_reserved_bytes'] / 2**30:8.1f} "
              f"{r['memory_error']:+7.1%}"
              + (f"  DDP's first buckets in step 2: {d['compared']} (reserved {d['memory_error_with']:+.1%} "
                 f"with, {d['memory_error_without']:+.1%} without)" if d else ""))
    # each file's runs apart (the devices per plan differ), the constants' fit rows apart
    for set_name in dict.fromkeys(r["set"] for r in rows):
        in_set = [r for r in rows if r["set"] == set_name]
        parts = (("all", in_set), ("eager", [r for r in in_set if not r["compiled"]]),
                 ("compiled", [r for r in in_set if r["compiled"]]),
                 ("comp fit", [r for r in in_set if r["fit"]]),
                 ("comp held", [r for r in in_set if r["compiled"] and not r["fit"]]))
        for name, part in parts:
            if part:
                t = [abs(r["step_error"]) for r in part]
                mem = [abs(r["memory_error"]) for r in part]
                short = sum(r["memory_error"] < 0 for r in part)
                print(f"{set_name:6} {name:9} rows {len(part):2}: time median {statistics.median(t):.1%} "
                      f"max {max(t):.1%}; memory median {statistics.median(mem):.1%} max {max(mem):.1%}; "
                      f"predicted short {short}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
